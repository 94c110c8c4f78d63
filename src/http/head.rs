//! Parsing of one HTTP/1.1 request head, for the reactor.
//!
//! The reactor appends every read to a per-connection buffer and calls
//! [`parse`] on it. This module turns the bytes at the front of that buffer
//! into a small owned [`Head`] holding only what the gateway routes,
//! authorises and logs on (plus the body length it must read next), or says
//! which error status to answer before closing the connection.
//!
//! Tokenising is httparse's job. This module adds the policy httparse leaves
//! to its caller, chosen so that no request can be framed differently by us
//! and by a proxy in front of us (request smuggling):
//! - every line must end in CRLF (httparse also accepts a bare LF);
//! - the request-target must be origin-form: `/path[?query]`, no fragment;
//! - no Transfer-Encoding at all (we accept no chunked bodies): 411, also
//!   next to a Content-Length (RFC 9112 lets the coding override the
//!   length, so a proxy may frame that body differently); and at most one
//!   Content-Length, made of decimal digits only;
//! - at most one Host, Authorization, Origin, Last-Event-ID and
//!   Access-Control-Request-Method: a second one is ambiguous, so 400;
//! - the size limits below (431 and 413).
//!
//! httparse itself rejects obsolete line folding, bytes outside the token
//! set in header names (including whitespace before the colon), control
//! bytes in header values, malformed request lines and versions other than
//! HTTP/1.0 and HTTP/1.1.
//!
//! Choices:
//! - Empty lines (CRLF) before the request line are skipped, as RFC 9112
//!   §2.2 allows; they count in `head_len` and towards `MAX_HEAD_BYTES`.
//! - `MAX_HEAD_BYTES` is inclusive: a head of exactly 8192 bytes is parsed,
//!   one of 8193 is 431.
//! - A missing Host is tolerated: the gateway serves one origin and never
//!   uses it, and hand-written health checks often omit it.
//! - Header names are matched case-insensitively; method names are
//!   case-sensitive (RFC 9110 §9.1), so `get` is [`Method::Other`].
//!
//! [`parse`] starts over on every call. That costs at most one scan of
//! `MAX_HEAD_BYTES` per read and keeps the parser stateless.

/// A head longer than this is answered 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// A declared body longer than this is answered 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// More header lines than this is answered 431.
const MAX_HEADERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Delete,
    Options,
    /// Any other syntactically valid method token (the router answers 405).
    Other,
}

/// What the gateway needs from a request head, owned so that the buffer can
/// be drained right after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    /// Raw path, before `?`, not percent-decoded.
    pub path: String,
    /// Raw query after `?`, `""` if none.
    pub query: String,
    /// HTTP/1.1 (else HTTP/1.0).
    pub http11: bool,
    /// HTTP/1.1: true unless `Connection: close`; HTTP/1.0: only with
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// Bytes of the head, including leading empty lines and the final CRLF
    /// CRLF: the body (or a pipelined request) starts at this offset.
    pub head_len: usize,
    /// Declared body length, 0 when absent.
    pub content_length: usize,
    pub authorization: Option<String>,
    pub last_event_id: Option<String>,
    pub origin: Option<String>,
    /// Every X-Forwarded-For header joined with ", ", in order.
    pub forwarded_for: Option<String>,
    pub access_control_request_method: Option<String>,
    /// Every Access-Control-Request-Headers header joined with ", ".
    pub access_control_request_headers: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 431: the head is over `MAX_HEAD_BYTES` or has too many header lines.
    TooLarge,
    /// 413: Content-Length is over `MAX_BODY_BYTES`.
    BodyTooLarge,
    /// 411: a chunked body (any Transfer-Encoding, with or without a
    /// Content-Length). It is never read; the connection is closed.
    LengthRequired,
    /// 400, with a short human reason; the connection must be closed.
    Malformed(&'static str),
}

impl HeadError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::BodyTooLarge => 413,
            HeadError::LengthRequired => 411,
            HeadError::Malformed(_) => 400,
        }
    }

    /// A short human reason, fit for a response body or a log line.
    pub fn reason(&self) -> &'static str {
        match self {
            HeadError::TooLarge => "request header fields too large",
            HeadError::BodyTooLarge => "content too large",
            HeadError::LengthRequired => "a chunked body is not accepted: send Content-Length",
            HeadError::Malformed(reason) => reason,
        }
    }
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status(), self.reason())
    }
}

impl std::error::Error for HeadError {}

#[derive(Debug)]
pub enum Parse {
    /// Read more and call again.
    Partial,
    Complete(Head),
    /// Answer `status()` and close.
    Error(HeadError),
}

/// Parses the request head at the start of `buf`. Partial while incomplete
/// and under MAX_HEAD_BYTES; TooLarge once MAX_HEAD_BYTES bytes arrived
/// without a complete head (a complete head longer than that is also
/// TooLarge). Bytes after the head (body, pipelined requests) are not looked
/// at.
pub fn parse(buf: &[u8]) -> Parse {
    match parse_head(buf) {
        Ok(Some(head)) => Parse::Complete(head),
        Ok(None) => Parse::Partial,
        Err(error) => Parse::Error(error),
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    use HeadError::Malformed;

    // Never look past the limit: a head not complete within it is too large
    // whatever follows.
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(from_httparse(error)),
    };

    // httparse accepts a bare LF as a line end; a proxy that does not would
    // see different header lines than we do.
    let head_bytes = &window[..head_len];
    let bare_lf = |w: &[u8]| matches!(w, [prev, b'\n'] if *prev != b'\r');
    if head_bytes.first() == Some(&b'\n') || head_bytes.windows(2).any(bare_lf) {
        return Err(Malformed("line not ended by CRLF"));
    }

    let method = match req.method.unwrap_or_default() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or_default();
    if !target.starts_with('/') {
        return Err(Malformed("request-target is not an absolute path"));
    }
    if target.contains('#') {
        return Err(Malformed("fragment in request-target"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let http11 = match req.version {
        Some(1) => true,
        Some(0) => false,
        _ => return Err(Malformed("unsupported HTTP version")),
    };

    let mut head = Head {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        http11,
        keep_alive: false,
        head_len,
        content_length: 0,
        authorization: None,
        last_event_id: None,
        origin: None,
        forwarded_for: None,
        access_control_request_method: None,
        access_control_request_headers: None,
    };
    let mut content_length = None;
    let mut transfer_encoding = false;
    let mut seen_host = false;
    let (mut close, mut keep_alive_token) = (false, false);

    for header in req.headers.iter() {
        let (name, value) = (header.name, header.value);
        let is = |candidate: &str| name.eq_ignore_ascii_case(candidate);
        if is("content-length") {
            if content_length.is_some() {
                return Err(Malformed("duplicate Content-Length"));
            }
            content_length = Some(parse_content_length(value)?);
        } else if is("transfer-encoding") {
            transfer_encoding = true;
        } else if is("host") {
            if seen_host {
                return Err(Malformed("duplicate Host"));
            }
            seen_host = true;
        } else if is("connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is("authorization") {
            set_once(&mut head.authorization, value, "duplicate Authorization")?;
        } else if is("last-event-id") {
            set_once(&mut head.last_event_id, value, "duplicate Last-Event-ID")?;
        } else if is("origin") {
            set_once(&mut head.origin, value, "duplicate Origin")?;
        } else if is("access-control-request-method") {
            let slot = &mut head.access_control_request_method;
            set_once(slot, value, "duplicate Access-Control-Request-Method")?;
        } else if is("x-forwarded-for") {
            append(&mut head.forwarded_for, value)?;
        } else if is("access-control-request-headers") {
            append(&mut head.access_control_request_headers, value)?;
        }
    }

    // Checked after the loop so that a smuggling shape (say a huge
    // Content-Length next to a Transfer-Encoding) is a 411, not a 413. A
    // Content-Length beside it changes nothing: the coding would override
    // it (RFC 9112 6.3), so the body is chunked all the same, and the
    // connection closes after the answer either way. The codings are not
    // read: the gateway takes none of them, chunked or not.
    if transfer_encoding {
        return Err(HeadError::LengthRequired);
    }
    head.content_length = content_length.unwrap_or(0);
    if head.content_length > MAX_BODY_BYTES {
        return Err(HeadError::BodyTooLarge);
    }
    head.keep_alive = !close && (http11 || keep_alive_token);
    Ok(Some(head))
}

fn from_httparse(error: httparse::Error) -> HeadError {
    use HeadError::Malformed;
    match error {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        // Also obsolete line folding: the continuation line starts with
        // whitespace, which is not a header-name byte.
        httparse::Error::HeaderName => Malformed("invalid header name"),
        httparse::Error::HeaderValue => Malformed("invalid header value"),
        httparse::Error::NewLine => Malformed("invalid line ending"),
        httparse::Error::Version => Malformed("unsupported HTTP version"),
        // Bad method token, empty or non-UTF-8 request-target, stray spaces.
        _ => Malformed("invalid request line"),
    }
}

/// `1*DIGIT` and nothing else: `str::parse` would also take a leading `+`.
fn parse_content_length(value: &[u8]) -> Result<usize, HeadError> {
    let invalid = HeadError::Malformed("invalid Content-Length");
    if value.is_empty() {
        return Err(invalid);
    }
    value
        .iter()
        .try_fold(0usize, |n, &b| {
            let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
            n.checked_mul(10)?.checked_add(usize::from(digit))
        })
        .ok_or(invalid)
}

/// Trims optional whitespace (SP / HTAB) around a list element.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn utf8(value: &[u8]) -> Result<&str, HeadError> {
    std::str::from_utf8(value).map_err(|_| HeadError::Malformed("header value is not UTF-8"))
}

/// Stores a single-valued header, refusing a second occurrence.
fn set_once(
    slot: &mut Option<String>,
    value: &[u8],
    duplicate: &'static str,
) -> Result<(), HeadError> {
    if slot.is_some() {
        return Err(HeadError::Malformed(duplicate));
    }
    *slot = Some(utf8(value)?.to_owned());
    Ok(())
}

/// Appends to a list-valued header, as if all its lines were one
/// comma-separated line (RFC 9110 §5.3). Empty lines add nothing.
fn append(slot: &mut Option<String>, value: &[u8]) -> Result<(), HeadError> {
    let value = utf8(value)?;
    match slot {
        _ if value.is_empty() => {}
        Some(list) => {
            list.push_str(", ");
            list.push_str(value);
        }
        None => *slot = Some(value.to_owned()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GET: &[u8] = b"GET /sse/events?topic=line-4&ticket=t%20k HTTP/1.1\r\n\
        Host: gw.example\r\n\
        Accept: text/event-stream\r\n\
        Authorization: Bearer eyJ.x.y\r\n\
        Last-Event-ID: 42\r\n\
        Origin: https://dash.example\r\n\
        X-Forwarded-For: 10.0.0.1\r\n\
        x-forwarded-for:  10.0.0.2, 10.0.0.3 \r\n\
        \r\n";
    const POST: &[u8] = b"POST /sse/stream-ticket HTTP/1.1\r\n\
        Host: gw.example\r\n\
        Content-Type: application/json\r\n\
        Content-Length: 13\r\n\
        Connection: close\r\n\
        \r\n\
        {\"topic\":\"a\"}";
    const OPTIONS: &[u8] = b"OPTIONS /sse/events HTTP/1.1\r\n\
        Host: gw.example\r\n\
        Origin: https://dash.example\r\n\
        Access-Control-Request-Method: GET\r\n\
        Access-Control-Request-Headers: authorization\r\n\
        Access-Control-Request-Headers: last-event-id\r\n\
        \r\n";

    fn head(method: Method, path: &str, head_len: usize) -> Head {
        Head {
            method,
            path: path.to_owned(),
            query: String::new(),
            http11: true,
            keep_alive: true,
            head_len,
            content_length: 0,
            authorization: None,
            last_event_id: None,
            origin: None,
            forwarded_for: None,
            access_control_request_method: None,
            access_control_request_headers: None,
        }
    }

    fn complete(buf: &[u8]) -> Head {
        match parse(buf) {
            Parse::Complete(head) => head,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn error(buf: &[u8]) -> HeadError {
        match parse(buf) {
            Parse::Error(error) => error,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn end_of_head(req: &[u8]) -> usize {
        req.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no end")
            + 4
    }

    fn expected_samples() -> Vec<(&'static [u8], Head)> {
        let mut get = head(Method::Get, "/sse/events", end_of_head(GET));
        get.query = "topic=line-4&ticket=t%20k".into();
        get.authorization = Some("Bearer eyJ.x.y".into());
        get.last_event_id = Some("42".into());
        get.origin = Some("https://dash.example".into());
        get.forwarded_for = Some("10.0.0.1, 10.0.0.2, 10.0.0.3".into());
        let mut post = head(Method::Post, "/sse/stream-ticket", end_of_head(POST));
        post.content_length = 13;
        post.keep_alive = false;
        let mut options = head(Method::Options, "/sse/events", end_of_head(OPTIONS));
        options.origin = Some("https://dash.example".into());
        options.access_control_request_method = Some("GET".into());
        options.access_control_request_headers = Some("authorization, last-event-id".into());
        vec![(GET, get), (POST, post), (OPTIONS, options)]
    }

    #[test]
    fn every_split_point_is_partial_until_the_head_is_complete() {
        for (req, expected) in expected_samples() {
            assert_eq!(complete(req), expected);
            for i in 0..expected.head_len {
                assert!(matches!(parse(&req[..i]), Parse::Partial), "prefix {i}");
            }
            for i in expected.head_len..=req.len() {
                assert_eq!(complete(&req[..i]), expected, "prefix {i}");
            }
        }
    }

    #[test]
    fn pipelined_bytes_are_not_consumed() {
        for (req, expected) in expected_samples() {
            let mut two = req.to_vec();
            two.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            assert_eq!(complete(&two), expected);
            let next = &two[req.len()..];
            assert_eq!(complete(next).path, "/next");
        }
    }

    /// A GET of exactly `total` bytes, padded with one header.
    fn sized_head(total: usize) -> Vec<u8> {
        let base = b"GET / HTTP/1.1\r\nX-Pad: \r\n\r\n".len();
        let pad = "a".repeat(total - base);
        format!("GET / HTTP/1.1\r\nX-Pad: {pad}\r\n\r\n").into_bytes()
    }

    fn with_headers(n: usize) -> Vec<u8> {
        let lines: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
        format!("GET / HTTP/1.1\r\n{lines}\r\n").into_bytes()
    }

    #[test]
    fn head_size_boundary() {
        assert_eq!(
            complete(&sized_head(MAX_HEAD_BYTES)).head_len,
            MAX_HEAD_BYTES
        );
        assert_eq!(error(&sized_head(MAX_HEAD_BYTES + 1)), HeadError::TooLarge);
        // A body after a head of exactly the limit does not count.
        let mut with_body = sized_head(MAX_HEAD_BYTES);
        with_body.extend_from_slice(b"trailing");
        assert_eq!(complete(&with_body).head_len, MAX_HEAD_BYTES);
        // Incomplete: Partial just below the limit, TooLarge at it.
        let unfinished = sized_head(MAX_HEAD_BYTES + 10);
        assert!(matches!(
            parse(&unfinished[..MAX_HEAD_BYTES - 1]),
            Parse::Partial
        ));
        assert_eq!(error(&unfinished[..MAX_HEAD_BYTES]), HeadError::TooLarge);
        assert_eq!(error(&vec![b'\r'; 2 * MAX_HEAD_BYTES][..]).status(), 400);
    }

    #[test]
    fn header_count_boundary() {
        assert_eq!(complete(&with_headers(MAX_HEADERS)).method, Method::Get);
        assert_eq!(error(&with_headers(MAX_HEADERS + 1)), HeadError::TooLarge);
    }

    #[test]
    fn body_size_boundary() {
        let req = |n: usize| format!("POST /x HTTP/1.1\r\nContent-Length: {n}\r\n\r\n");
        let limit = complete(req(MAX_BODY_BYTES).as_bytes());
        assert_eq!(limit.content_length, MAX_BODY_BYTES);
        assert_eq!(
            error(req(MAX_BODY_BYTES + 1).as_bytes()),
            HeadError::BodyTooLarge
        );
        assert_eq!(HeadError::BodyTooLarge.status(), 413);
    }

    #[test]
    fn a_chunked_body_is_411_and_never_read() {
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n",
            // With a Content-Length as well, whichever comes first: the
            // coding overrides the length (RFC 9112 6.3), a smuggling shape.
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
            // Even one that would be 413 alone.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 99999\r\n\r\n",
        ] {
            match parse(raw) {
                Parse::Error(e) => assert_eq!(e.status(), 411, "{e}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn malformed_requests_are_400() {
        #[rustfmt::skip]
        let cases: &[(&str, &[u8], &str)] = &[
            ("two equal CL", b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", "duplicate Content-Length"),
            ("two CL", b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n", "duplicate Content-Length"),
            ("CL letters", b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", "invalid Content-Length"),
            ("CL plus", b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", "invalid Content-Length"),
            ("CL minus", b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
            ("CL hex", b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", "invalid Content-Length"),
            ("CL list", b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", "invalid Content-Length"),
            ("CL inner space", b"POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\n", "invalid Content-Length"),
            ("CL empty", b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", "invalid Content-Length"),
            ("CL overflow", b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", "invalid Content-Length"),
            ("obs-fold SP", b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", "invalid header name"),
            ("obs-fold HTAB", b"GET / HTTP/1.1\r\nX-A: a\r\n\tb\r\n\r\n", "invalid header name"),
            ("fold first line", b"GET / HTTP/1.1\r\n X-A: a\r\n\r\n", "invalid header name"),
            ("space in name", b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "invalid header name"),
            ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "invalid header name"),
            ("bad name byte", b"GET / HTTP/1.1\r\nX(y): z\r\n\r\n", "invalid header name"),
            ("empty name", b"GET / HTTP/1.1\r\n: z\r\n\r\n", "invalid header name"),
            ("no colon", b"GET / HTTP/1.1\r\nX-A\r\n\r\n", "invalid header name"),
            ("NUL in value", b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n", "invalid header value"),
            ("CR in value", b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n", "invalid header value"),
            ("DEL in value", b"GET / HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n", "invalid header value"),
            ("bare LF", b"GET / HTTP/1.1\nHost: x\n\n", "line not ended by CRLF"),
            ("bare LF at end", b"GET / HTTP/1.1\r\nHost: x\r\n\n", "line not ended by CRLF"),
            ("bare LF header", b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", "line not ended by CRLF"),
            ("bare LF leading", b"\nGET / HTTP/1.1\r\n\r\n", "line not ended by CRLF"),
            ("absolute-form", b"GET http://gw/x HTTP/1.1\r\n\r\n", "request-target is not an absolute path"),
            ("asterisk", b"OPTIONS * HTTP/1.1\r\n\r\n", "request-target is not an absolute path"),
            ("relative", b"GET x HTTP/1.1\r\n\r\n", "request-target is not an absolute path"),
            ("fragment", b"GET /a#b HTTP/1.1\r\n\r\n", "fragment in request-target"),
            ("non-UTF-8 target", b"GET /\xff HTTP/1.1\r\n\r\n", "invalid request line"),
            ("two spaces", b"GET  / HTTP/1.1\r\n\r\n", "invalid request line"),
            ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
            ("HTTP/1.2", b"GET / HTTP/1.2\r\n\r\n", "unsupported HTTP version"),
            ("HTTP/0.9", b"GET / HTTP/0.9\r\n\r\n", "unsupported HTTP version"),
            ("lowercase version", b"GET / http/1.1\r\n\r\n", "unsupported HTTP version"),
            ("no version", b"GET /\r\n\r\n", "invalid request line"),
            ("trailing space", b"GET / HTTP/1.1 \r\n\r\n", "invalid line ending"),
            ("bad method", b"GE(T / HTTP/1.1\r\n\r\n", "invalid request line"),
            ("NUL method", b"\0GET / HTTP/1.1\r\n\r\n", "invalid request line"),
            ("no method", b" / HTTP/1.1\r\n\r\n", "invalid request line"),
            ("bad CRLF", b"GET / HTTP/1.1\r\r\n\r\n", "invalid line ending"),
            ("two Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", "duplicate Host"),
            ("two Authorization", b"GET / HTTP/1.1\r\nAuthorization: a\r\nauthorization: b\r\n\r\n", "duplicate Authorization"),
            ("two Origin", b"GET / HTTP/1.1\r\nOrigin: a\r\nOrigin: b\r\n\r\n", "duplicate Origin"),
            ("two Last-Event-ID", b"GET / HTTP/1.1\r\nLast-Event-ID: 1\r\nLast-Event-ID: 2\r\n\r\n", "duplicate Last-Event-ID"),
            ("two ACRM", b"OPTIONS / HTTP/1.1\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Method: GET\r\n\r\n", "duplicate Access-Control-Request-Method"),
            ("non-UTF-8 kept", b"GET / HTTP/1.1\r\nAuthorization: \xff\xfe\r\n\r\n", "header value is not UTF-8"),
            ("non-UTF-8 list", b"GET / HTTP/1.1\r\nX-Forwarded-For: \xc3\r\n\r\n", "header value is not UTF-8"),
        ];
        for (name, req, reason) in cases {
            assert_eq!(error(req), HeadError::Malformed(reason), "{name}");
            assert_eq!(HeadError::Malformed(reason).status(), 400);
            // No prefix of a bad head passes for a good one.
            for i in 0..req.len() {
                assert!(
                    !matches!(parse(&req[..i]), Parse::Complete(_)),
                    "{name} at {i}"
                );
            }
        }
    }

    #[test]
    fn keep_alive_follows_version_and_connection_tokens() {
        let cases = [
            ("1.1", "", true),
            ("1.1", "Connection: close\r\n", false),
            ("1.1", "Connection: Upgrade, CLOSE\r\n", false),
            (
                "1.1",
                "Connection: keep-alive\r\nConnection: close\r\n",
                false,
            ),
            ("1.1", "Connection: closed\r\n", true),
            ("1.0", "", false),
            ("1.0", "Connection: Keep-Alive\r\n", true),
            ("1.0", "Connection: foo ,\tkeep-alive \r\n", true),
            ("1.0", "Connection: keep-alive, close\r\n", false),
        ];
        for (version, headers, expected) in cases {
            let req = format!("GET / HTTP/{version}\r\n{headers}\r\n");
            let head = complete(req.as_bytes());
            assert_eq!(head.http11, version == "1.1", "{req:?}");
            assert_eq!(head.keep_alive, expected, "{req:?}");
        }
    }

    #[test]
    fn methods_are_case_sensitive_tokens() {
        let cases = [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("PATCH", Method::Other),
            ("get", Method::Other),
            ("M-SEARCH", Method::Other),
        ];
        for (token, method) in cases {
            let req = format!("{token} / HTTP/1.1\r\n\r\n");
            assert_eq!(complete(req.as_bytes()).method, method, "{token}");
        }
    }

    #[test]
    fn details_of_accepted_heads() {
        // Leading empty lines are skipped but counted.
        let lead = complete(b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n");
        assert_eq!((lead.path.as_str(), lead.head_len), ("/a", 23));
        // An empty query and a query holding '?'.
        let q = complete(b"GET /a? HTTP/1.1\r\n\r\n");
        assert_eq!((q.path.as_str(), q.query.as_str()), ("/a", ""));
        let q = complete(b"GET /a?b=?&c HTTP/1.1\r\n\r\n");
        assert_eq!((q.path.as_str(), q.query.as_str()), ("/a", "b=?&c"));
        // The path is kept raw.
        assert_eq!(complete(b"GET /a%2Fb HTTP/1.1\r\n\r\n").path, "/a%2Fb");
        // Unkept headers may carry obs-text; kept ones are trimmed.
        let h = complete(b"GET / HTTP/1.1\r\nX-Latin: caf\xe9\r\nOrigin: \t o \t\r\n\r\n");
        assert_eq!(h.origin.as_deref(), Some("o"));
        // Empty kept values are Some(""); empty list entries add nothing.
        let h = complete(b"GET / HTTP/1.1\r\nLast-Event-ID:\r\nX-Forwarded-For:\r\n\r\n");
        assert_eq!(
            (h.last_event_id.as_deref(), h.forwarded_for),
            (Some(""), None)
        );
        // Leading zeros are still decimal.
        assert_eq!(
            complete(b"POST / HTTP/1.1\r\nContent-Length: 007\r\n\r\n").content_length,
            7
        );
        assert_eq!(
            HeadError::TooLarge.to_string(),
            "431 request header fields too large"
        );
    }

    /// A well-formed request and the Head it must parse to.
    fn well_formed() -> impl Strategy<Value = (Vec<u8>, Head)> {
        let method = prop::sample::select(vec![
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("PUT", Method::Other),
        ]);
        let value = "[!-~]([ -~]{0,30}[!-~])?";
        (
            (
                method,
                "/[A-Za-z0-9/%._~-]{0,30}",
                prop::option::of("[A-Za-z0-9=&%+._~-]{0,30}"),
            ),
            (
                any::<bool>(),
                prop::option::of(0..=MAX_BODY_BYTES),
                0..4usize,
            ),
            prop::collection::vec(("X-[A-Za-z0-9-]{1,12}", value), 0..12),
            (
                prop::option::of(value),
                prop::option::of(value),
                prop::option::of(value),
            ),
            prop::collection::vec("[0-9.:a-f]{1,20}", 0..3),
        )
            .prop_map(|(line, meta, extra, kept, xff)| {
                let ((token, method), path, query) = line;
                let (http11, content_length, connection) = meta;
                let (authorization, last_event_id, origin) = kept;
                let target = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                let version = if http11 { "1.1" } else { "1.0" };
                let mut text = format!("{token} {target} HTTP/{version}\r\nHost: gw\r\n");
                for (name, value) in &extra {
                    text.push_str(&format!("{name}: {value}\r\n"));
                }
                let conn = ["", "close", "keep-alive", "Upgrade, Keep-Alive"][connection];
                if !conn.is_empty() {
                    text.push_str(&format!("Connection: {conn}\r\n"));
                }
                let kept_names = ["Authorization", "Last-Event-ID", "Origin"];
                for (name, value) in
                    kept_names
                        .iter()
                        .zip([&authorization, &last_event_id, &origin])
                {
                    if let Some(value) = value {
                        text.push_str(&format!("{name}: {value}\r\n"));
                    }
                }
                for ip in &xff {
                    text.push_str(&format!("X-Forwarded-For: {ip}\r\n"));
                }
                if let Some(n) = content_length {
                    text.push_str(&format!("Content-Length: {n}\r\n"));
                }
                text.push_str("\r\n");
                let expected = Head {
                    method,
                    path,
                    query: query.unwrap_or_default(),
                    http11,
                    keep_alive: conn != "close" && (http11 || connection >= 2),
                    head_len: text.len(),
                    content_length: content_length.unwrap_or(0),
                    authorization,
                    last_event_id,
                    origin,
                    forwarded_for: (!xff.is_empty()).then(|| xff.join(", ")),
                    access_control_request_method: None,
                    access_control_request_headers: None,
                };
                text.push_str("body bytes or a pipelined request");
                (text.into_bytes(), expected)
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..10_000)) {
            if let Parse::Complete(head) = parse(&bytes) {
                prop_assert!(head.head_len <= bytes.len().min(MAX_HEAD_BYTES));
            }
        }

        #[test]
        fn http_like_bytes_never_panic(
            line in "[A-Z]{1,7} /[ -~]{0,20} HTTP/1\\.[01]\r\n",
            rest in prop::collection::vec(
                prop::sample::select(b"\r\n\0\t :,aZ09-\x7f\xff".to_vec()), 0..200),
        ) {
            let mut bytes = line.into_bytes();
            bytes.extend(rest);
            if let Parse::Complete(head) = parse(&bytes) {
                prop_assert!(head.head_len <= bytes.len());
            }
        }

        #[test]
        fn well_formed_requests_parse_identically_at_any_split(
            (req, expected) in well_formed(),
            split in any::<prop::sample::Index>(),
        ) {
            let head = complete(&req);
            prop_assert_eq!(&head, &expected);
            let i = split.index(req.len() + 1);
            match parse(&req[..i]) {
                Parse::Partial => prop_assert!(i < expected.head_len),
                Parse::Complete(prefix) => prop_assert_eq!(prefix, expected),
                Parse::Error(e) => prop_assert!(false, "prefix {} gave {:?}", i, e),
            }
        }
    }
}
