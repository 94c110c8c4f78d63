//! Everything that reaches open streams: bus frames routed by device (and
//! recovered from the replay window when the mailbox overflowed), heartbeats
//! and write-stall deadlines, `system` frames, revocations and access
//! changes, and the drain.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use log::info;
use rand::Rng;

use super::conn::{Exchange, Phase};
use super::mailbox::Inbox;
use super::{ms, Cause, Listening, Reactor, LINGER, TIMER_DRAIN};
use crate::auth::UserId;
use crate::http::response::{self, Response};
use crate::stream::frame::{Event, EventId, Frame, Purpose};
use crate::stream::replay::Resume;
use crate::stream::subscriptions::{wants, Filter};
use crate::stream::Stream;

/// Mailbox messages handled per turn before flushing, so a flood of frames
/// never holds written output back for long.
const INBOX_BATCH: usize = 4096;
/// How long a revocation is remembered for streams still opening.
const RECENT_MS: u64 = 10_000;
/// Revocations remembered at most.
const RECENT_MAX: usize = 1024;

/// A revocation, as streams still opening must check it.
enum Revocation {
    Ticket(uuid::Uuid),
    Access(UserId, Arc<HashSet<Box<str>>>),
}

/// Revocations of the last [`RECENT_MS`], newest last.
#[derive(Default)]
pub(super) struct Recent(VecDeque<(u64, Revocation)>);

impl Recent {
    fn push(&mut self, now: u64, r: Revocation) {
        while self
            .0
            .front()
            .is_some_and(|(at, _)| at + RECENT_MS < now || self.0.len() >= RECENT_MAX)
        {
            self.0.pop_front();
        }
        self.0.push_back((now, r));
    }

    /// Whether a revocation since `since` (the stream's request) refuses
    /// `stream`, about to open; an access change narrows an alert stream's
    /// filter instead.
    fn refuses(&self, since: u64, stream: &mut Stream) -> bool {
        for (_, r) in self.0.iter().filter(|(at, _)| *at >= since) {
            match r {
                Revocation::Ticket(t) if *t == stream.ticket => return true,
                Revocation::Access(user, owned) if user.key == stream.user.key && !stream.admin => {
                    match &stream.filter {
                        Filter::Devices(d) if stream.purpose == Purpose::Data => {
                            if d.iter().any(|d| !owned.contains(d)) {
                                return true;
                            }
                        }
                        _ => stream.filter = Filter::Devices(owned.iter().cloned().collect()),
                    }
                }
                _ => {}
            }
        }
        false
    }
}

fn revoked_frame() -> Arc<Frame> {
    Frame::system(r#"{"kind":"revoked"}"#)
}

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
                Inbox::Probed { conn, serial } => self.on_probed(conn, serial),
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
            if let Some(id) = frame.id {
                if id.seq <= self.last_routed.seq {
                    continue; // already taken from the replay window
                }
                if id.seq > self.last_routed.seq + 1 {
                    self.fill_gap(id.seq - 1);
                }
                self.last_routed = id;
            }
            self.fan_out(&frame);
        }
        if overflowed {
            // The newest frames may be the ones refused, with none behind
            // them to show the hole: catch up to the hub's newest now.
            let newest = self.gw.hub.last_id().seq;
            if newest > self.last_routed.seq {
                self.fill_gap(newest);
            }
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
    /// holds them, tell every stream here `replay-gap` at this point.
    fn fill_gap(&mut self, upto: u64) {
        match self.gw.hub.resume(self.last_routed, upto) {
            Resume::Frames(frames) => {
                for frame in frames {
                    if let Some(id) = frame.id {
                        self.last_routed = id;
                    }
                    self.fan_out(&frame);
                }
            }
            Resume::Gap => {
                let gap = Frame::system(r#"{"kind":"replay-gap"}"#);
                for key in self.stream_keys() {
                    self.gw.metrics.replay_gaps.fetch_add(1, Relaxed);
                    self.push_frame(key, &gap);
                }
                // After the hole, what the window still holds.
                for frame in self.gw.hub.held(upto) {
                    match frame.id {
                        Some(id) if id.seq > self.last_routed.seq => self.last_routed = id,
                        _ => continue,
                    }
                    self.fan_out(&frame);
                }
                self.last_routed.seq = self.last_routed.seq.max(upto);
            }
        }
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
        let (conns, dirty) = (&mut self.conns, &mut self.dirty);
        let mut slow: Vec<usize> = Vec::new();
        let mut delivered = 0;
        self.subs.each(frame, |key| {
            let Some(conn) = conns.get_mut(key) else {
                return;
            };
            let backlog = conn.outbox.queued();
            conn.outbox.push_frame(frame);
            delivered += 1;
            // A frame reaching an empty outbox never makes a stream slow,
            // whatever its size: only a backlog the client left does.
            if backlog > 0 && conn.outbox.queued() > max {
                slow.push(key);
            } else if !conn.dirty && !conn.write_blocked {
                conn.dirty = true;
                dirty.push(key);
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
        let backlog = conn.outbox.queued();
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
        let mut at = s.next_heartbeat;
        if s.stalled_since != 0 {
            at = at.min(s.stalled_since + stall);
        }
        self.arm_at(key, at);
    }

    pub(super) fn on_stream_timer(&mut self, key: usize) {
        let now = self.now();
        let stall = ms(self.gw.config.write_stall_secs);
        let next = self.next_heartbeat(now);
        let Some(Phase::Streaming(s)) = self.conns.get_mut(key).map(|c| &mut c.phase) else {
            return;
        };
        if s.stalled_since != 0 && now >= s.stalled_since + stall {
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
        if self.recent.refuses(conn.started, &mut stream) {
            self.gw
                .stream_closed(&stream.user, stream.client, stream.purpose, stream.id);
            let r = Response::error(401, "Stream ticket revoked");
            return self.respond(key, exchange, r);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.outbox
            .push_bytes(response::stream_head(exchange.cors.as_deref()));
        if !snapshot.is_empty() {
            conn.outbox.push_bytes(snapshot);
        }
        if let Some(raw) = last_event_id.as_deref() {
            let resume = match EventId::parse(raw) {
                Some(id) => self.gw.hub.resume(id, self.last_routed.seq),
                None => Resume::Gap,
            };
            match resume {
                Resume::Frames(frames) => {
                    self.gw.metrics.replays_served.fetch_add(1, Relaxed);
                    for f in frames
                        .iter()
                        .filter(|f| wants(stream.purpose, &stream.filter, f))
                    {
                        conn.outbox.push_frame(f);
                    }
                }
                Resume::Gap => {
                    self.gw.metrics.replay_gaps.fetch_add(1, Relaxed);
                    conn.outbox
                        .push_frame(&Frame::system(r#"{"kind":"replay-gap"}"#));
                }
            }
        }
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
        if conn.counted {
            conn.counted = false;
            self.gw
                .peers
                .leave(crate::config::limit_key(conn.peer.ip()));
        }
        self.subs.add(key, stream.purpose, &stream.filter);
        stream.opened = now;
        stream.next_heartbeat = self.next_heartbeat(now);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.phase = Phase::Streaming(stream);
        conn.input = Vec::new();
        self.mark_dirty(key);
        self.arm_stream(key);
        // The client may have gone while the lookup ran: its FIN's readiness
        // edge was spent then, so look now.
        self.on_readable(key);
    }

    // ----- revocation ---------------------------------------------------------

    /// Says `revoked` to a stream and closes it once that is written (or
    /// after a short linger if the client does not take it).
    fn end_revoked(&mut self, key: usize) {
        self.gw.metrics.revoked.fetch_add(1, Relaxed);
        if !self.push_frame(key, &revoked_frame()) {
            return;
        }
        self.end_stream(key, Cause::Revoked);
        self.arm(key, LINGER);
        self.mark_dirty(key);
    }

    /// Ticket `ticket` was revoked: every stream opened with it ends.
    fn revoke(&mut self, ticket: uuid::Uuid) {
        self.recent.push(self.now(), Revocation::Ticket(ticket));
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.stream().is_some_and(|s| s.ticket == ticket))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.end_revoked(key);
        }
    }

    /// `user` owns exactly `owned` now: data streams naming anything else
    /// end; alert streams follow the new set.
    fn access_changed(&mut self, user: &UserId, owned: Arc<HashSet<Box<str>>>) {
        self.recent
            .push(self.now(), Revocation::Access(user.clone(), owned.clone()));
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.stream()
                    .is_some_and(|s| s.user.key == user.key && !s.admin)
            })
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let Some(Phase::Streaming(s)) = self.conns.get_mut(key).map(|c| &mut c.phase) else {
                continue;
            };
            match (&s.filter, s.purpose) {
                (Filter::Devices(d), Purpose::Data) => {
                    if d.iter().any(|d| !owned.contains(d)) {
                        self.end_revoked(key);
                    }
                }
                (old, _) => {
                    let new = Filter::Devices(owned.iter().cloned().collect());
                    self.subs.remove(key, s.purpose, old);
                    self.subs.add(key, s.purpose, &new);
                    s.filter = new;
                }
            }
        }
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
