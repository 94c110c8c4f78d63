//! Query-string and path percent-decoding, on the raw strings kept in
//! `head::Head`.
//!
//! Routing needs a parameter or a path segment decoded; logging needs the
//! query with secrets (stream tickets) masked. Everything borrows from the
//! input unless decoding actually changes it, and nothing panics on bad
//! input.

use std::borrow::Cow;

/// The first value of `name` in a raw query string (`a=1&b=x%20y`),
/// percent-decoded ('+' is a space). None when absent; `Some("")` for a bare
/// `name` or `name=`. Invalid escapes or non-UTF-8 results -> the raw text
/// is kept as is (never panic). Names are compared after decoding too, so
/// `tick%65t` is `ticket`.
pub fn param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    pairs(query)
        .find(|(key, _)| key_is(key, name))
        .map(|(_, value)| percent_decode(value, true).unwrap_or(Cow::Borrowed(value)))
}

/// The path percent-decoded (for `/sse/stream-ticket/<id>` style routes);
/// None if it decodes to invalid UTF-8 or holds a malformed escape (`%zz`,
/// a trailing `%4`). '+' stays '+'. `%2F` decodes to '/', so split the raw
/// path into segments first and decode each segment.
pub fn decode(s: &str) -> Option<Cow<'_, str>> {
    percent_decode(s, false)
}

/// The query with the value of `name` replaced by `***`, for logs (tickets
/// must never be logged). Every occurrence is masked, not only the first
/// one that [`param`] returns; everything else is kept byte for byte.
pub fn redact(query: &str, name: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if key_is(key, name) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
    }
    out
}

/// `key=value` pairs in order; empty pairs (`a=1&&b=2`) are skipped and a
/// pair without '=' has an empty value.
fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

fn key_is(key: &str, name: &str) -> bool {
    key == name || percent_decode(key, true).is_some_and(|key| key == name)
}

/// Strict percent-decoding: None on a malformed escape or invalid UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<Cow<'_, str>> {
    let needs_work = |b: &u8| *b == b'%' || (plus_is_space && *b == b'+');
    if !s.as_bytes().iter().any(needs_work) {
        return Some(Cow::Borrowed(s));
    }
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let [b, tail @ ..] = rest {
        rest = tail;
        match b {
            b'%' => {
                let [hi, lo, tail @ ..] = rest else {
                    return None;
                };
                out.push(hex(*hi)? << 4 | hex(*lo)?);
                rest = tail;
            }
            b'+' if plus_is_space => out.push(b' '),
            _ => out.push(*b),
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn param_decodes_the_first_value() {
        let q = "topic=line%204&ticket=a+b%2Bc&topic=second&flag&empty=&&x=%E2%9C%93";
        assert_eq!(param(q, "topic").as_deref(), Some("line 4"));
        assert_eq!(param(q, "ticket").as_deref(), Some("a b+c"));
        assert_eq!(param(q, "flag").as_deref(), Some(""));
        assert_eq!(param(q, "empty").as_deref(), Some(""));
        assert_eq!(param(q, "x").as_deref(), Some("✓"));
        assert_eq!(param(q, "missing"), None);
        assert_eq!(param(q, ""), None);
        assert_eq!(param("", "topic"), None);
        // Names are decoded too, and values may hold '=' and '?'.
        assert_eq!(param("tick%65t=1", "ticket").as_deref(), Some("1"));
        assert_eq!(param("a=b=c?", "a").as_deref(), Some("b=c?"));
        // Nothing to decode: borrowed, no allocation.
        assert!(matches!(
            param("a=plain", "a"),
            Some(Cow::Borrowed("plain"))
        ));
    }

    #[test]
    fn bad_escapes_keep_the_raw_value() {
        for raw in ["%zz", "50%", "%4", "%e9", "%C3%28", "a+%ff"] {
            let q = format!("v={raw}");
            assert_eq!(param(&q, "v").as_deref(), Some(raw));
        }
    }

    #[test]
    fn decode_is_strict_and_leaves_plus_alone() {
        assert_eq!(
            decode("/sse/stream-ticket/ab%2Dc").as_deref(),
            Some("/sse/stream-ticket/ab-c")
        );
        assert_eq!(decode("a+b%20c").as_deref(), Some("a+b c"));
        assert_eq!(decode("%e2%9c%93").as_deref(), Some("✓"));
        assert!(matches!(decode("/plain"), Some(Cow::Borrowed("/plain"))));
        for bad in ["%ff", "%C3%28", "%zz", "%4", "%"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn redact_masks_every_value_of_the_name() {
        let cases = [
            ("topic=a&ticket=secret&x=1", "topic=a&ticket=***&x=1"),
            ("ticket=one&ticket=two", "ticket=***&ticket=***"),
            ("tick%65t=secret", "tick%65t=***"),
            ("ticket=", "ticket=***"),
            ("ticket=a=b", "ticket=***"),
            ("ticket", "ticket"),
            ("tickets=1&xticket=2", "tickets=1&xticket=2"),
            ("a=1&&b=2", "a=1&&b=2"),
            ("", ""),
        ];
        for (query, redacted) in cases {
            assert_eq!(redact(query, "ticket"), redacted, "{query}");
        }
    }

    proptest! {
        #[test]
        fn never_panic(q in "[a-z%+=&0-9A-F\u{e9}]{0,40}", name in "[a-z%]{0,3}") {
            let _ = param(&q, &name);
            let _ = decode(&q);
            let redacted = redact(&q, &name);
            // Only values change, and every value of `name` is masked.
            prop_assert_eq!(redacted.split('&').count(), q.split('&').count());
            for (key, value) in pairs(&redacted) {
                if key_is(key, &name) && !value.is_empty() {
                    prop_assert_eq!(value, "***");
                }
            }
        }

        #[test]
        fn decode_inverts_encoding(s in "\\PC{0,20}") {
            let encoded: String = s.bytes().map(|b| format!("%{b:02X}")).collect();
            prop_assert_eq!(decode(&encoded), Some(Cow::Borrowed(s.as_str())));
            let q = format!("k={encoded}");
            prop_assert_eq!(param(&q, "k"), Some(Cow::Borrowed(s.as_str())));
        }
    }
}
