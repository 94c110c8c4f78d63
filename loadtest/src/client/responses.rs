//! A stream's socket events, from connect to streaming: the connect's
//! completion, writing the request, reading what comes back, and the
//! ticket and stream responses that move the tab on (or fail it, to be
//! retried). Split from the client's loop so each reads in one sitting.

use std::io;

use mio::Poll;
use serde::Deserialize;
use sse_testkit::parse_head;

use super::{now_ns, Client};
use crate::tab::{body, errno_name, flush, stream_request, Phase};
use crate::wire::Dechunker;

/// Response bytes buffered before the head or ticket body is complete.
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Deserialize)]
struct TicketResponse {
    ticket: String,
}

impl Client {
    pub fn on_event(&mut self, poll: &Poll, key: usize, readable: bool, writable: bool) {
        let Some(Some(conn)) = self.conns.get_mut(key) else {
            return;
        };
        if conn.phase == Phase::Connecting && (writable || readable) {
            match conn.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let kind = format!("connect_{}", errno_name(&e));
                    return self.fail(poll, key, &kind);
                }
            }
            match conn.sock.peer_addr() {
                Ok(_) => {
                    conn.phase = if conn.out.starts_with(b"POST") {
                        Phase::Ticket
                    } else {
                        Phase::Stream
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    let kind = format!("connect_{}", errno_name(&e));
                    return self.fail(poll, key, &kind);
                }
            }
        }
        if writable || conn.wants_write() {
            if let Err(e) = flush(conn) {
                let kind = format!("write_{}", errno_name(&e));
                return self.fail(poll, key, &kind);
            }
        }
        if readable {
            self.read(poll, key);
        }
    }

    pub(super) fn read(&mut self, poll: &Poll, key: usize) {
        // One buffer for every read (zeroing 64 KiB per readiness was a
        // tenth of the client's time).
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(64 * 1024, 0);
        self.read_into(poll, key, &mut buf);
        self.read_buf = buf;
    }

    fn read_into(&mut self, poll: &Poll, key: usize, buf: &mut [u8]) {
        // Bounded: a socket that keeps delivering yields after 64 reads and
        // is read again on the next turn.
        for _ in 0..64 {
            let Some(Some(conn)) = self.conns.get_mut(key) else {
                return;
            };
            match conn.read(buf) {
                Ok(0) => {
                    return self.fail(poll, key, "eof");
                }
                Ok(n) => {
                    if let Err(kind) = self.on_bytes(key, &buf[..n]) {
                        return self.fail(poll, key, &kind);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let kind = format!("read_{}", errno_name(&e));
                    return self.fail(poll, key, &kind);
                }
            }
        }
        self.more.push(key);
    }

    fn on_bytes(&mut self, key: usize, bytes: &[u8]) -> Result<(), String> {
        let Some(Some(conn)) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if conn.phase == Phase::Streaming {
            return self.stream_bytes(key, bytes);
        }
        conn.input.extend_from_slice(bytes);
        if conn.input.len() > MAX_RESPONSE {
            return Err("response_too_large".into());
        }
        let (head, start) = match parse_head(&conn.input) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(_) => return Err("bad_response".into()),
        };
        let content_length = match head.header("content-length").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => return Err("bad_response".into()),
        };
        match conn.phase {
            Phase::Ticket => {
                let need = start + content_length;
                if conn.input.len() < need {
                    return Ok(());
                }
                if head.status != 200 {
                    return Err(format!("ticket_{}", head.status));
                }
                let parsed: Result<TicketResponse, _> =
                    serde_json::from_slice(&conn.input[start..need]);
                let Ok(t) = parsed else {
                    return Err("ticket_body".into());
                };
                conn.input.clear();
                let slot = &mut self.slots[conn.slot];
                slot.ticket = Some(t.ticket);
                let Some(target) = self.target.as_ref() else {
                    return Err("no_target".into());
                };
                let kind = self.clients.as_ref().map(|c| c.kind);
                conn.out = stream_request(target, slot, kind);
                conn.out_pos = 0;
                conn.phase = Phase::Stream;
                flush(conn).map_err(|e| format!("write_{}", errno_name(&e)))?;
                Ok(())
            }
            Phase::Stream => {
                if head.status != 200 {
                    return Err(format!("http_{}", head.status));
                }
                let rest = conn.input.split_off(start);
                conn.input = Vec::new();
                conn.phase = Phase::Streaming;
                if head.is_chunked() {
                    conn.chunked = Some(Dechunker::default());
                }
                self.inflight = self.inflight.saturating_sub(1);
                self.stats.opened += 1;
                self.stats.open_now += 1;
                self.stats.last_open_ns = now_ns();
                let slot = &mut self.slots[conn.slot];
                slot.open = true;
                slot.attempt = 0;
                if let Some(at) = slot.closed_at.take() {
                    self.stats.resumed += 1;
                    self.resume_hist.record_ns(at.elapsed().as_nanos() as u64);
                }
                // What came with the head is the stream's first bytes.
                self.stream_bytes(key, &rest)
            }
            _ => Ok(()),
        }
    }

    /// Hands a streaming connection's bytes to its tab: de-chunked, parsed
    /// as SSE, counted.
    fn stream_bytes(&mut self, key: usize, bytes: &[u8]) -> Result<(), String> {
        let Some(Some(conn)) = self.conns.get_mut(key) else {
            return Ok(());
        };
        let slot = &mut self.slots[conn.slot];
        body(
            conn,
            slot,
            &mut self.stats,
            &mut self.hist,
            &mut self.total_dups,
            &mut self.scratch,
            bytes,
        )
    }
}
