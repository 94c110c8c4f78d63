//! Writing and closing: the dirty list (connections that got output this
//! turn), the held list (streams coalescing their frames, see the
//! reactor's module doc), the flush that sends both, what a finished flush
//! moves the connection's state machine on to, and the close.

use std::sync::atomic::Ordering::Relaxed;

use log::info;

use super::conn::{stamp, tenths, unacked_kib, Flush, Phase};
use super::outbox::Flushed;
use super::{Cause, Reactor, KEEP_RING_MS, LINGER};
use crate::stream::UNACKED_UNKNOWN;

impl Reactor {
    pub(super) fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.flush == Flush::No && !conn.write_blocked {
                conn.flush = Flush::Now;
                self.dirty.push(key);
            }
        }
    }

    /// When the held streams are to be written, if any are held.
    pub(super) fn held_until(&self) -> Option<u64> {
        let wait = u64::from(self.gw.config.coalesce_ms);
        (!self.held.is_empty()).then_some(self.held_since + wait)
    }

    pub(super) fn flush_dirty(&mut self) {
        let now = self.now();
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            // A key listed twice (its connection closed and the slot was
            // reused) is flushed once.
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.flush != Flush::No) else {
                continue;
            };
            conn.flush = Flush::No;
            let quiet = !conn.written_within(now, KEEP_RING_MS);
            let flushed = conn.flush();
            if matches!(flushed, Ok((_, true))) {
                conn.wrote(now);
            }
            match flushed {
                Ok((Flushed::All, _)) => {
                    if quiet {
                        conn.outbox.trim();
                    }
                    if let Phase::Streaming(s) = &mut conn.phase {
                        s.stalled_since = 0;
                    }
                    self.on_flushed(key);
                }
                // The writable edge will come; until then output only queues.
                Ok((Flushed::Blocked, progressed)) => {
                    conn.write_blocked = true;
                    if let Phase::Streaming(s) = &mut conn.phase {
                        let first = s.stalled_since == 0;
                        if first || progressed {
                            s.stalled_since = stamp(now);
                            // What the kernel holds now, to tell later whether
                            // the client took any (a blocked write only: a
                            // stream that keeps up never asks).
                            s.unacked_kib = unacked_kib(&conn.socket).unwrap_or(UNACKED_UNKNOWN);
                        }
                        if first {
                            self.arm_stream(key);
                        }
                    }
                }
                Err(_) => self.close(key, Cause::WriteFailed),
            }
        }
        // Handlers run from on_flushed may have queued more; keep the list's
        // allocation and whatever they added.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    /// Everything queued was written: move the state machine on.
    pub(super) fn on_flushed(&mut self, key: usize) {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.phase {
            Phase::Responding { close: false } => {
                conn.phase = Phase::Reading;
                // The next request's clock starts now if it is already here
                // (pipelined); otherwise the connection idles in keep-alive.
                conn.idle = conn.input.is_empty();
                conn.start_request(now);
                if conn.idle {
                    self.arm(key, self.gw.config.keepalive_idle_secs);
                } else {
                    self.arm_reading(key);
                }
                self.process_requests(key);
                let blocked = self
                    .conns
                    .get(key)
                    .is_some_and(|c| c.read_blocked && matches!(c.phase, Phase::Reading));
                if blocked {
                    self.on_readable(key);
                }
            }
            Phase::Responding { close: true } | Phase::Closing { shut: false } => {
                // Shut our side and wait briefly for the client's FIN, so
                // unread request bytes never turn the close into a reset
                // that destroys the response in flight.
                let _ = conn.socket.shutdown(std::net::Shutdown::Write);
                conn.phase = Phase::Closing { shut: true };
                self.arm(key, LINGER);
                self.on_readable(key);
            }
            _ => {}
        }
    }

    /// Takes a stream out of the index and gives back its limit slot.
    pub(super) fn end_stream(&mut self, key: usize, cause: Cause) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Streaming(stream) =
            std::mem::replace(&mut conn.phase, Phase::Closing { shut: false })
        else {
            return;
        };
        if !self.stop_waiting(key) {
            self.subs.remove(key, stream.purpose, &stream.filter);
        }
        self.gw
            .stream_closed(&stream.user, stream.client, stream.purpose, stream.id);
        let secs = f64::from(tenths(self.now()).wrapping_sub(stream.opened)) / 10.0;
        info!(
            id:% = stream.id,
            user:% = stream.user,
            purpose = stream.purpose.as_str(),
            secs = (secs * 10.0).round() / 10.0,
            cause:? = cause;
            "stream closed"
        );
    }

    pub(super) fn close(&mut self, key: usize, cause: Cause) {
        self.end_stream(key, cause);
        self.disarm(key);
        if self.conns.contains(key) {
            let mut conn = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut conn.socket);
            if conn.counted {
                self.gw.peers.leave(crate::config::limit_key(conn.peer_ip));
            }
            conn.outbox.clear();
            self.gw.metrics.connections_open.fetch_sub(1, Relaxed);
        }
    }
}
