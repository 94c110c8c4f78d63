//! Any bytes a client sends, fed to the request-head parser whole and split
//! at every point the fuzzer picks: never a panic, and a split never changes
//! the answer once the head is complete.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_gateway::http::head::{parse, Parse};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Parse::Complete(head) = &whole {
        assert!(head.head_len <= data.len());
        // The same head parses identically with nothing after it.
        match parse(&data[..head.head_len]) {
            Parse::Complete(again) => assert_eq!(&again, head),
            other => panic!("prefix parsed differently: {other:?}"),
        }
        // Every shorter prefix is Partial or the same error class, never Complete.
        for cut in [head.head_len / 2, head.head_len.saturating_sub(1)] {
            assert!(!matches!(parse(&data[..cut]), Parse::Complete(_)));
        }
    }
});
