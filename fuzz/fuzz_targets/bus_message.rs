//! Any payload a Redis publisher sends, on every channel: never a panic; a
//! message that becomes a frame has one line of valid JSON with a timestamp.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_gateway::stream::frame::{message, Frame, CHANNELS};

fuzz_target!(|data: &[u8]| {
    for channel in CHANNELS {
        if let Ok(m) = message(channel, data, 1_795_307_831_033) {
            assert!(!m.data.contains(&b'\n') && !m.data.contains(&b'\r'));
            let v: serde_json::Value = serde_json::from_slice(&m.data).expect("valid JSON");
            assert!(v.get("timestamp").is_some());
            let f = Frame::encode(None, m.event, &m.device, &m.data);
            assert!(f.bytes.ends_with(b"\n\n"));
        }
    }
});
