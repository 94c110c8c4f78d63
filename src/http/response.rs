//! Responses: status line, headers and body in one buffer, written with the
//! same outbox as stream frames. Errors use the contract's JSON shape
//! `{"statusCode", "message", "error"}`.

use std::borrow::Cow;
use std::io::Write;

use serde_json::{json, Value};

/// The first bytes of every stream, flushed at once so `onopen` fires even
/// behind a proxy: tell the browser to retry after 3 s, then a comment.
pub const STREAM_PREAMBLE: &[u8] = b"retry: 3000\n: connected\n\n";

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Cow<'static, [u8]>,
    pub headers: Vec<(&'static str, String)>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    pub fn json(status: u16, value: &Value) -> Response {
        Response {
            status,
            content_type: "application/json; charset=utf-8",
            body: Cow::Owned(value.to_string().into_bytes()),
            headers: Vec::new(),
            close: false,
        }
    }

    /// The contract's error shape.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &error_body(status, message))
    }

    pub fn with_extra(status: u16, message: &str, extra: Value) -> Response {
        let mut body = error_body(status, message);
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        Response::json(status, &body)
    }

    pub fn bytes(status: u16, content_type: &'static str, body: &'static [u8]) -> Response {
        Response {
            status,
            content_type,
            body: Cow::Borrowed(body),
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: Cow::Owned(body.into_bytes()),
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn empty(status: u16) -> Response {
        Response::bytes(status, "", b"")
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub fn closing(mut self) -> Response {
        self.close = true;
        self
    }

    /// The `message` of a JSON error body, for logs ("" for other bodies).
    pub fn message(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The wire bytes. `head_only` for HEAD requests; `cors` is the allowed
    /// origin to echo, if any.
    pub fn encode(&self, head_only: bool, keep_alive: bool, cors: Option<&str>) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        let _ = write!(out, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if !self.content_type.is_empty() {
            let _ = write!(out, "Content-Type: {}\r\n", self.content_type);
        }
        if self.status != 204 {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        if self.content_type.starts_with("application/json") {
            out.extend_from_slice(b"Cache-Control: no-store\r\n");
        }
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        cors_headers(&mut out, cors);
        let close = self.close || !keep_alive;
        out.extend_from_slice(if close {
            b"Connection: close\r\n\r\n"
        } else {
            b"Connection: keep-alive\r\n\r\n"
        });
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn error_body(status: u16, message: &str) -> Value {
    json!({"statusCode": status, "message": message, "error": reason(status)})
}

/// `*` (the wildcard) is granted without credentials; a listed origin with. Either way
/// Retry-After is exposed, so a page on another origin can read it on a 429 or 503 (the
/// browser client waits that long before asking for a ticket again).
fn cors_headers(out: &mut Vec<u8>, cors: Option<&str>) {
    if cors == Some("*") {
        out.extend_from_slice(
            b"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: Retry-After\r\n",
        );
    } else if let Some(origin) = cors {
        let _ = write!(
            out,
            "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nAccess-Control-Expose-Headers: Retry-After\r\nVary: Origin\r\n"
        );
    }
}

/// The head of a stream response plus its preamble. No Content-Length and no
/// chunking: the body runs until the connection closes.
pub fn stream_head(cors: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache, no-transform\r\nX-Accel-Buffering: no\r\n",
    );
    cors_headers(&mut out, cors);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(STREAM_PREAMBLE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_contract_shape() {
        let r = Response::error(401, "Stream authentication required");
        let text = String::from_utf8(r.encode(false, true, None)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.ends_with("Connection: keep-alive"));
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            json!({"statusCode": 401, "message": "Stream authentication required", "error": "Unauthorized"})
        );
    }

    #[test]
    fn cross_origin_pages_can_read_retry_after() {
        let r = Response::error(429, "Too many stream tickets").header("Retry-After", "20");
        let cors = String::from_utf8(r.encode(false, true, Some("http://app"))).unwrap();
        assert!(cors.contains("Retry-After: 20\r\n"));
        assert!(cors.contains("Access-Control-Expose-Headers: Retry-After\r\n"));
        let any = String::from_utf8(r.encode(false, true, Some("*"))).unwrap();
        assert!(any.contains("Access-Control-Expose-Headers: Retry-After\r\n"));
        let same_origin = String::from_utf8(r.encode(false, true, None)).unwrap();
        assert!(!same_origin.contains("Access-Control-Expose-Headers"));
    }

    #[test]
    fn extras_merge_and_head_requests_carry_no_body() {
        let r = Response::with_extra(429, "limit", json!({"limits": {"data": 1}}));
        let bytes = r.encode(true, false, Some("http://app"));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.ends_with("Connection: close\r\n\r\n"));
        assert!(text.contains(
            "Access-Control-Allow-Origin: http://app\r\nAccess-Control-Allow-Credentials: true\r\n"
        ));
        let full = String::from_utf8(r.encode(false, true, None)).unwrap();
        let body: Value = serde_json::from_str(full.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["limits"]["data"], 1);
        assert_eq!(body["statusCode"], 429);
    }

    #[test]
    fn stream_heads_disable_buffering() {
        let text = String::from_utf8(stream_head(None)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        for h in [
            "Content-Type: text/event-stream\r\n",
            "Cache-Control: no-cache, no-transform\r\n",
            "X-Accel-Buffering: no\r\n",
        ] {
            assert!(text.contains(h), "{h}");
        }
        assert!(!text.contains("Content-Length"));
        assert!(text.ends_with("\r\n\r\nretry: 3000\n: connected\n\n"));
    }
}
