//! Everything that reaches open streams: bus frames routed by device (and
//! recovered from the replay window when the mailbox overflowed),
//! heartbeats and write-stall deadlines, `system` frames, and the drain.
//! Resumes (`Last-Event-ID`) are [`super::resume`]'s, revocations
//! [`super::revocation`]'s.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use log::info;
use rand::Rng;

use super::conn::{stamp, stamped_at, tenths, unacked_kib, Exchange, Flush, Input, Phase};
use super::mailbox::Inbox;
use super::{ms, Cause, Listening, Reactor, TIMER_DRAIN};

use crate::http::response::{self, Response};
use crate::stream::frame::{Event, Frame, REPLAY_GAP};
use crate::stream::replay::Resume;
use crate::stream::subscriptions::Filter;
use crate::stream::{Stream, UNACKED_UNKNOWN};

/// Mailbox messages handled per turn before flushing, so a flood of frames
/// never holds written output back for long.
const INBOX_BATCH: usize = 4096;
/// Bytes past which a held stream is written without waiting out its
/// coalescing window (at most half the slow-consumer bound).
const HOLD_BYTES: usize = 16 * 1024;

impl Reactor {
    pub(super) fn drain_inbox(&mut self) {
        for _ in 0..INBOX_BATCH {
            let Ok(msg) = self.inbox.control.try_recv() else {
                break;
            };
            match msg {
                Inbox::System(frame) => {
                    for key in self.stream_keys() {
                        self.push_frame(key, &frame);
                    }
                }
                Inbox::Outcome {
                    conn,
                    serial,
                    outcome,
                } => self.on_outcome(conn, serial, outcome),
                Inbox::Probe { conn, asker } => self.probe(conn, asker),
                Inbox::Probed {
                    conn,
                    serial,
                    freed,
                } => self.on_probed(conn, serial, freed),
                Inbox::Revoke { ticket } => self.revoke(ticket),
                Inbox::Access { user, owned } => self.access_changed(&user, owned),
                Inbox::Drain => self.drain(),
            }
        }
        // Read the flag first: a frame refused after this look is seen by
        // the next turn's look.
        let overflowed = self.mailbox().take_overflow();
        for _ in 0..INBOX_BATCH {
            let Ok(frame) = self.inbox.frames.try_recv() else {
                break;
            };
            if frame.pos <= self.last_routed {
                continue; // already taken from the replay window
            }
            if frame.pos > self.last_routed + 1 {
                self.fill_gap(frame.pos - 1);
            }
            self.last_routed = frame.pos;
            self.route(&frame);
        }
        if overflowed {
            // The newest frames may be the ones refused, with none behind
            // them to show the hole: catch up to the hub's newest now.
            let newest = self.gw.hub.last_pos();
            if newest > self.last_routed {
                self.fill_gap(newest);
            }
        }
    }

    /// Fans a bus frame out, first settling the streams waiting for their
    /// resume id to come by.
    fn route(&mut self, frame: &Arc<Frame>) {
        let Some(id) = frame.id.filter(|_| !self.waiting.is_empty()) else {
            return self.fan_out(frame);
        };
        let after = self.settle(id);
        self.fan_out(frame);
        for key in after {
            self.subscribe(key);
        }
    }

    fn stream_keys(&self) -> Vec<usize> {
        self.conns
            .iter()
            .filter(|(_, c)| c.stream().is_some())
            .map(|(k, _)| k)
            .collect()
    }

    /// The mailbox overflowed: frames after `last_routed` up to `upto` never
    /// arrived. Route them from the replay window, or, when it no longer
    /// holds them, tell every stream here `replay-gap` at this point, then
    /// route what the window still holds after the hole (as a stream
    /// resuming from too old an id gets it).
    fn fill_gap(&mut self, upto: u64) {
        let held = match self.gw.hub.catch_up(self.last_routed, upto) {
            Resume::Frames(frames) => {
                for frame in frames {
                    self.last_routed = frame.pos;
                    self.route(&frame);
                }
                return;
            }
            Resume::Gap(held) => held,
            // Not an answer to a position: a hole with nothing held after it.
            Resume::Ahead => Vec::new(),
        };
        let gap = Frame::system(REPLAY_GAP);
        for key in self.stream_keys() {
            self.gw.metrics.replay_gaps.fetch_add(1, Relaxed);
            self.push_frame(key, &gap);
        }
        self.end_waits();
        for frame in held {
            if frame.pos > self.last_routed {
                self.last_routed = frame.pos;
                self.fan_out(&frame);
            }
        }
        self.last_routed = self.last_routed.max(upto);
    }

    /// Queues a bus frame on every stream that subscribed to its device (a
    /// gap marker on every stream).
    fn fan_out(&mut self, frame: &Arc<Frame>) {
        if frame.event == Event::System {
            for key in self.stream_keys() {
                self.gw.metrics.replay_gaps.fetch_add(1, Relaxed);
                self.push_frame(key, frame);
            }
            return;
        }
        let max = self.gw.config.max_backlog_bytes;
        let now = self.now();
        let coalesce = self.gw.config.coalesce_ms;
        let hold_max = HOLD_BYTES.min(max / 2);
        if self.held.is_empty() {
            self.held_since = now;
        }
        let (conns, dirty, held) = (&mut self.conns, &mut self.dirty, &mut self.held);
        let mut slow: Vec<usize> = Vec::new();
        let mut delivered = 0;
        self.subs.each(frame, |key| {
            let Some(conn) = conns.get_mut(key) else {
                return;
            };
            let backlog = conn.backlog();
            conn.outbox.push_frame(frame);
            delivered += 1;
            let queued = conn.outbox.queued();
            // A frame reaching an empty outbox never makes a stream slow,
            // whatever its size: only a backlog the client left does.
            if backlog > 0 && queued > max {
                slow.push(key);
                return;
            }
            if conn.write_blocked {
                return; // the writable edge flushes it
            }
            // Written a moment ago: this frame waits (at most `coalesce`
            // ms) for the ones behind it, to leave together; unless enough
            // is queued for a write of its own.
            let hold = queued <= hold_max && conn.written_within(now, coalesce);
            match (conn.flush, hold) {
                (Flush::No, true) => {
                    conn.flush = Flush::Held;
                    held.push(key);
                }
                (Flush::No, false) | (Flush::Held, false) => {
                    conn.flush = Flush::Now;
                    dirty.push(key);
                }
                (Flush::Now, _) | (Flush::Held, true) => {}
            }
        });
        self.gw.metrics.delivered(frame.event, delivered);
        self.lag.note(frame, delivered);
        for key in slow {
            self.gw.metrics.slow_consumers.fetch_add(1, Relaxed);
            self.close(key, Cause::SlowConsumer);
        }
    }

    /// Queues a frame; a stream whose backlog passes the bound is closed.
    pub(super) fn push_frame(&mut self, key: usize, frame: &Arc<Frame>) -> bool {
        let max = self.gw.config.max_backlog_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let backlog = conn.backlog();
        conn.outbox.push_frame(frame);
        if backlog > 0 && conn.outbox.queued() > max {
            self.gw.metrics.slow_consumers.fetch_add(1, Relaxed);
            self.close(key, Cause::SlowConsumer);
            return false;
        }
        self.mark_dirty(key);
        true
    }

    // ----- heartbeats and write stalls ----------------------------------------

    /// When the next heartbeat is due after `now`: rounded up to a tick of
    /// an eighth of the period (at most 100 ms), so streams opened close
    /// together share a wake-up and a heartbeat frame. Never early, at most
    /// one tick late.
    fn next_heartbeat(&self, now: u64) -> u64 {
        let period = ms(self.gw.config.heartbeat_secs);
        let tick = (period / 8).clamp(1, 100);
        (now + period).div_ceil(tick) * tick
    }

    /// Arms a stream's timer for its next heartbeat, or its write-stall
    /// deadline if that comes first.
    pub(super) fn arm_stream(&mut self, key: usize) {
        let stall = ms(self.gw.config.write_stall_secs);
        let Some(s) = self.conns.get(key).and_then(|c| c.stream()) else {
            return;
        };
        let at = stall_deadline(s, self.now(), stall)
            .map_or(s.next_heartbeat, |d| d.min(s.next_heartbeat));
        let at = self.waits_until(key).map_or(at, |w| w.min(at));
        self.arm_at(key, at);
    }

    pub(super) fn on_stream_timer(&mut self, key: usize) {
        let now = self.now();
        self.end_wait_if_due(key, now);
        let stall = ms(self.gw.config.write_stall_secs);
        let next = self.next_heartbeat(now);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Streaming(s) = &mut conn.phase else {
            return;
        };
        if s.stalled_since != 0 && took_bytes(s, &conn.socket) {
            // Not stalled: the client is reading, only slowly.
            s.stalled_since = stamp(now);
        }
        if stall_deadline(s, now, stall).is_some_and(|d| now >= d) {
            self.gw.metrics.write_stalls.fetch_add(1, Relaxed);
            self.close(key, Cause::WriteStall);
            return;
        }
        if now >= s.next_heartbeat {
            s.next_heartbeat = next;
            if let Some(conn) = self.conns.get_mut(key) {
                conn.outbox.trim();
            }
            let frame = self.heartbeat_frame();
            self.gw.metrics.heartbeats.fetch_add(1, Relaxed);
            if !self.push_frame(key, &frame) {
                return;
            }
        }
        self.arm_stream(key);
    }

    fn heartbeat_frame(&mut self) -> Arc<Frame> {
        let ms = crate::time::epoch_ms();
        match &self.heartbeat {
            Some((at, f)) if *at == ms => f.clone(),
            _ => {
                let f = Frame::heartbeat(ms);
                self.heartbeat = Some((ms, f.clone()));
                f
            }
        }
    }

    // ----- opening ------------------------------------------------------------

    pub(super) fn open_stream(
        &mut self,
        key: usize,
        exchange: &Exchange,
        mut stream: Box<Stream>,
        snapshot: Vec<u8>,
        last_event_id: Option<String>,
    ) {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(key) else {
            self.gw
                .stream_closed(&stream.user, stream.client, stream.purpose, stream.id);
            return;
        };
        if self.recent.refuses(conn.started_at(now), &mut stream) {
            self.gw
                .stream_closed(&stream.user, stream.client, stream.purpose, stream.id);
            let r = Response::error(401, "Stream ticket revoked");
            return self.respond(key, exchange, r);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // Its requests' responses do not count as its writes (they would
        // keep the outbox's room and hold its first frames).
        conn.wrote_at = 0;
        conn.outbox
            .push_bytes(response::stream_head(exchange.cors.as_deref()));
        if !snapshot.is_empty() {
            conn.outbox.push_bytes(snapshot);
        }
        let waits = last_event_id
            .as_deref()
            .is_some_and(|raw| self.resume(key, stream.purpose, &stream.filter, raw));
        info!(
            id:% = stream.id,
            user:% = stream.user,
            purpose = stream.purpose.as_str(),
            devices = match &stream.filter {
                Filter::All => "all".to_owned(),
                Filter::Devices(d) => d.len().to_string(),
            },
            client = stream.client;
            "stream open"
        );
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.counted {
            conn.counted = false;
            self.gw.peers.leave(crate::config::limit_key(conn.peer_ip));
        }
        if !waits {
            self.subs.add(key, stream.purpose, &stream.filter);
        }
        stream.opened = tenths(now);
        stream.next_heartbeat = self.next_heartbeat(now);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.phase = Phase::Streaming(*stream);
        conn.input = Input::default();
        self.mark_dirty(key);
        self.arm_stream(key);
        // The client may have gone while the lookup ran: its FIN's readiness
        // edge was spent then, so look now.
        self.on_readable(key);
    }

    // ----- drain --------------------------------------------------------------

    /// SIGTERM: stop accepting, tell every stream to come back in 1..5 s
    /// (random, so clients do not return all at once), flush, close.
    pub(super) fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        if let Listening::Open(mut l) | Listening::Paused(mut l) =
            std::mem::replace(&mut self.listener, Listening::Closed)
        {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let deadline = self.now() + ms(self.gw.config.drain_secs);
        self.wheel.insert(deadline, TIMER_DRAIN);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        let mut rng = rand::rng();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            match &conn.phase {
                Phase::Streaming(_) => {
                    let retry = rng.random_range(1000..=5000);
                    let bye = format!(
                        "retry: {retry}\nevent: system\ndata: {{\"kind\":\"shutdown\"}}\n\n"
                    );
                    conn.outbox.push_bytes(bye.into_bytes());
                    self.end_stream(key, Cause::Drained);
                    self.mark_dirty(key);
                }
                Phase::Reading if conn.input.is_empty() => self.close(key, Cause::Drained),
                Phase::Responding { .. } => conn.phase = Phase::Responding { close: true },
                _ => {}
            }
        }
    }
}

/// Whether the client of a stalled stream took bytes since the last look:
/// the kernel's count of unacknowledged bytes went down (only the gateway's
/// writes raise it, and a write that sends bytes starts the stall, and its
/// count, afresh). Asked at
/// the stream's timers while it is stalled (its heartbeats and its stall
/// deadline), so a slow reader is never cut off, and one that stops reading
/// is cut off `--write-stall-secs` after its last byte taken, late by at
/// most the time between two looks (a heartbeat period, or the stall's if
/// shorter).
fn took_bytes(s: &mut Stream, socket: &mio::net::TcpStream) -> bool {
    let Some(now) = unacked_kib(socket) else {
        return false;
    };
    let before = std::mem::replace(&mut s.unacked_kib, now);
    before != UNACKED_UNKNOWN && now < before
}

/// When a stalled stream is cut off: `stall` ms after its client last took
/// a byte (reactor clock); None while it keeps up.
fn stall_deadline(s: &Stream, now: u64, stall: u64) -> Option<u64> {
    (s.stalled_since != 0).then(|| stamped_at(s.stalled_since, now) + stall)
}
