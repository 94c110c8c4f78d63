//! [`SseStream`]: one event stream over a blocking socket, read frame by
//! frame with a deadline on every wait, and the paths that open one.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::frame::{parse_frame, Frame};
use crate::gateway::Gateway;
use crate::http::{connect, read_head, read_some, Response, HTTP_TIMEOUT};
use crate::redis_server::Redis;

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/sse/stream` for `devices` with `ticket`.
pub fn data_path(ticket: &str, devices: &[&str]) -> String {
    let list: Vec<String> = devices.iter().map(|d| enc(d)).collect();
    format!("/sse/stream?ticket={ticket}&deviceIds={}", list.join(","))
}

/// `/sse/alerts` with `ticket`.
pub fn alerts_path(ticket: &str) -> String {
    format!("/sse/alerts?ticket={ticket}")
}

/// A data stream of `user` (granted `devices` in Redis) on `devices`.
pub fn data_stream(redis: &Redis, gw: &Gateway, user: &str, devices: &[&str]) -> SseStream {
    redis.grant(user, devices);
    let (ticket, _) = gw.ticket_for(user, r#"{"purpose":"data"}"#);
    SseStream::must_open(gw.addr(), &data_path(&ticket, devices), &[])
}

/// An open event stream over a raw socket.
pub struct SseStream {
    stream: TcpStream,
    head: Response,
    /// Every body byte received so far.
    raw: Vec<u8>,
    /// Offset in `raw` of the first byte not yet returned as a frame.
    pos: usize,
    closed: bool,
}

impl SseStream {
    /// `GET path_and_query` with `Accept: text/event-stream` and
    /// `extra_headers`. Ok when the answer is 200; else Err with the complete
    /// (refusal) response. Panics on I/O errors or when no head arrives
    /// within [`HTTP_TIMEOUT`].
    pub fn open(
        addr: SocketAddr,
        path_and_query: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<SseStream, Response> {
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
        );
        for (n, v) in extra_headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let deadline = Instant::now() + HTTP_TIMEOUT;
        let mut stream = connect(addr, HTTP_TIMEOUT).expect("connect");
        stream
            .write_all(req.as_bytes())
            .expect("send stream request");
        let mut buf = Vec::new();
        let (mut head, start) = read_head(&mut stream, &mut buf, deadline)
            .unwrap_or_else(|e| panic!("no response head for {path_and_query}: {e}"));
        if head.status != 200 {
            if let Some(Ok(n)) = head.header("content-length").map(|v| v.parse::<usize>()) {
                while buf.len() < start + n {
                    match read_some(&mut stream, &mut buf, deadline) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                head.body = buf[start..(start + n).min(buf.len())].to_vec();
            }
            return Err(head);
        }
        Ok(SseStream {
            stream,
            head,
            raw: buf[start..].to_vec(),
            pos: 0,
            closed: false,
        })
    }

    /// [`SseStream::open`], panicking (with the refusal) unless 200.
    pub fn must_open(
        addr: SocketAddr,
        path_and_query: &str,
        extra_headers: &[(&str, &str)],
    ) -> SseStream {
        match SseStream::open(addr, path_and_query, extra_headers) {
            Ok(s) => s,
            Err(r) => panic!("stream {path_and_query} refused: {} {}", r.status, r.text()),
        }
    }

    /// The response head (status line and lowercased headers).
    pub fn head(&self) -> &Response {
        &self.head
    }

    /// Every body byte received so far.
    pub fn raw_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Whether the server closed the stream (as far as has been read).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// One read into the buffer, bounded by `deadline`; false when nothing
    /// more can arrive before it (timeout or close).
    fn fill(&mut self, deadline: Instant) -> bool {
        if self.closed {
            return false;
        }
        match read_some(&mut self.stream, &mut self.raw, deadline) {
            Ok(0) => {
                self.closed = true;
                false
            }
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => false,
            Err(_) => {
                self.closed = true;
                false
            }
        }
    }

    /// The next block (any kind), or None when none completes within
    /// `timeout` or the stream closed.
    pub fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((f, n)) = parse_frame(&self.raw[self.pos..], self.closed) {
                self.pos += n;
                return Some(f);
            }
            if !self.fill(deadline) {
                // One last look: the close may complete a CR-ended block.
                if let Some((f, n)) = parse_frame(&self.raw[self.pos..], self.closed) {
                    self.pos += n;
                    return Some(f);
                }
                return None;
            }
        }
    }

    /// The next frame that is an event, skipping control blocks (preamble,
    /// comments) and heartbeats; None on timeout or close.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.next_frame(left)?;
            if !f.is_control() && !f.is_heartbeat() {
                return Some(f);
            }
        }
    }

    /// The next event (see [`SseStream::next_event`]), which must be called
    /// `name`; panics otherwise, showing what arrived.
    pub fn expect_event(&mut self, name: &str, timeout: Duration) -> Frame {
        match self.next_event(timeout) {
            Some(f) if f.event.as_deref() == Some(name) => f,
            Some(f) => panic!("expected event {name:?}, got {:?}", f.raw),
            None => panic!(
                "no {name:?} event within {timeout:?} (closed: {}); unparsed: {:?}",
                self.closed,
                String::from_utf8_lossy(&self.raw[self.pos..])
            ),
        }
    }

    /// The proof that nothing arrived before a sentinel: the next event must
    /// be `name` and satisfy `is_sentinel`; panics otherwise, showing what
    /// arrived instead. Publish the sentinel after whatever must not arrive:
    /// events are delivered in order, so this is exact, with no fixed wait.
    #[track_caller]
    pub fn expect_sentinel(
        &mut self,
        name: &str,
        timeout: Duration,
        is_sentinel: impl Fn(&Frame) -> bool,
    ) -> Frame {
        let f = self.expect_event(name, timeout);
        assert!(
            is_sentinel(&f),
            "expected the sentinel {name:?} next, got {:?}",
            f.raw
        );
        f
    }

    /// The next heartbeat, skipping control blocks but no event; panics when
    /// an event comes first or none arrives within `timeout`.
    #[track_caller]
    pub fn expect_heartbeat(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Some(f) if f.is_heartbeat() => return f,
                Some(f) if f.is_control() => {}
                Some(f) => panic!("expected a heartbeat, got {:?}", f.raw),
                None => panic!("no heartbeat within {timeout:?} (closed: {})", self.closed),
            }
        }
    }

    /// Whether the server closes the stream within `timeout` (reading and
    /// keeping whatever arrives meanwhile).
    pub fn is_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.closed && Instant::now() < deadline {
            self.fill(deadline);
        }
        self.closed
    }
}
