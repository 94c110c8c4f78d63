//! A tiny HTTP/1.1 client for tests, one connection per request, every read
//! bounded by a deadline: [`request`], [`get`], [`post`], [`delete`] for
//! well-formed exchanges, [`send_raw`] for hostile bytes. [`parse_head`] is
//! the one response-head parser, also used by the load harness's
//! non-blocking client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Default bound of one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed HTTP response. Header names are lowercased.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The whole status line, without CRLF.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the body comes in `Transfer-Encoding: chunked`.
    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Where `needle` first occurs in `hay` (never, for an empty needle). Jumps
/// between occurrences of the needle's first byte: the load harness runs it
/// on every event it receives.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut i = 0;
    while i <= last_start {
        i += hay[i..=last_start].iter().position(|&b| b == first)?;
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The response head at the start of `buf` (body left empty) and the offset
/// where its body starts; Ok(None) while the blank line has not arrived, Err
/// when the status line is not `HTTP/<version> <status>`.
pub fn parse_head(buf: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let status = Some(&status_line)
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let r = Response {
        status,
        status_line,
        headers,
        body: Vec::new(),
    };
    Ok(Some((r, end + 4)))
}

/// Reads one response head from `stream` into `buf` (which may already hold
/// bytes); returns the parsed head and the offset where the body starts.
pub(crate) fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<(Response, usize)> {
    loop {
        if let Some(head) = parse_head(buf)? {
            return Ok(head);
        }
        if read_some(stream, buf, deadline)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a complete head: {:?}",
                    String::from_utf8_lossy(buf)
                ),
            ));
        }
    }
}

/// One read bounded by `deadline`; Ok(0) at end of stream, TimedOut after it.
pub(crate) fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `raw` on a new connection and reads one response: the body by
/// Content-Length, none for 204/304/HEAD-less cases, else until close.
pub fn try_request(addr: SocketAddr, raw: &[u8], timeout: Duration) -> io::Result<Response> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(addr, timeout)?;
    s.write_all(raw)?;
    let mut buf = Vec::new();
    let (mut r, start) = read_head(&mut s, &mut buf, deadline)?;
    let head_request = raw.starts_with(b"HEAD ");
    match r.header("content-length").map(|v| v.parse::<usize>()) {
        Some(Ok(n)) if !head_request => {
            while buf.len() < start + n {
                if read_some(&mut s, &mut buf, deadline)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
            }
            r.body = buf[start..start + n].to_vec();
        }
        Some(Err(_)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad Content-Length",
            ))
        }
        _ if head_request
            || r.status == 204
            || r.status == 304
            || (100..200).contains(&r.status) => {}
        _ => {
            while read_some(&mut s, &mut buf, deadline)? > 0 {}
            r.body = buf[start..].to_vec();
        }
    }
    Ok(r)
}

/// [`try_request`] with [`HTTP_TIMEOUT`]; panics on I/O errors.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    try_request(addr, raw, HTTP_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "request to {addr} failed: {e}\nrequest: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        )
    })
}

/// The bytes of a request: `Host` and `Connection: close` added, and
/// `Content-Length` (plus `Content-Type: application/json` unless given)
/// when `body` is not empty.
pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, &build_request("GET", path, headers, ""))
}

pub fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    request(addr, &build_request("POST", path, headers, body))
}

pub fn delete(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, &build_request("DELETE", path, headers, ""))
}

/// What a raw exchange produced.
#[derive(Debug)]
pub struct Raw {
    /// Everything read.
    pub bytes: Vec<u8>,
    /// Whether the server closed (EOF or reset) within the timeout.
    pub closed: bool,
}

impl Raw {
    /// The first response in `bytes`, if its head is complete.
    pub fn response(&self) -> Option<Response> {
        let (mut r, start) = parse_head(&self.bytes).ok()??;
        let rest = &self.bytes[start..];
        let n = r
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(rest.len())
            .min(rest.len());
        r.body = rest[..n].to_vec();
        Some(r)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Hostile input: writes `bytes` (write errors, such as a reset by a server
/// that already answered, are ignored), then reads until the server closes or
/// `timeout` passes.
pub fn send_raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Raw {
    let deadline = Instant::now() + timeout;
    let mut s = connect(addr, timeout).expect("connect");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let closed = loop {
        match read_some(&mut s, &mut out, deadline) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break false,
            Err(_) => break true,
        }
    };
    Raw { bytes: out, closed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse() {
        let h = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nxyz";
        let (r, start) = parse_head(h).unwrap().unwrap();
        assert_eq!((r.status, start, r.is_chunked()), (200, h.len() - 3, true));
        assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
        let (r, _) = parse_head(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.header("content-length")), (429, Some("12")));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
        let raw = Raw {
            bytes: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}extra".to_vec(),
            closed: true,
        };
        assert_eq!(raw.response().map(|r| r.body), Some(b"{}".to_vec()));
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"ab", b""), None);
    }
}
