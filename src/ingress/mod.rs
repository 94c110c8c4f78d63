//! Ingress: where events come from and how they reach the reactors. It
//! only turns the bus into frames; lookups are the store's business.
//!
//! In embedded mode (`POST /sse/publish`, the demo machines) a message goes
//! through [`Hub::publish`]: checked, given the next id, encoded once into an
//! `Arc<Frame>`, appended to the replay window and sent to every reactor's
//! mailbox. In Redis mode the subscriber hands what it hears to the
//! [`clusterlog`]: its leader checks each message once ([`Hub::admit`]) and
//! appends it to the log, and every instance's log reader hands the entries
//! to [`Hub::logged`], under the log's ids. Either way the position in the
//! sequence and the sends happen under one lock, so every reactor sees
//! frames in order. Revocations and access changes go to every reactor the
//! same way.
//!
//! - [`subscriber`]: the blocking Redis subscriber thread.
//! - [`clusterlog`]: the cluster log (leader lease, writer, reader).
//! - [`conflate`]: the per-device rate limit.
//! - [`demo`]: simulated machines for `--demo`.

pub mod clusterlog;
pub mod conflate;
pub mod demo;
pub mod subscriber;

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::auth::UserId;
use crate::metrics::Metrics;
use crate::reactor::mailbox::{Inbox, Mailboxes};
use crate::stream::frame::{self, Event, EventId, Frame, Message, Rejected};
use crate::stream::replay::{ReplayWindow, Resume};
use crate::time::epoch_ms;
use conflate::{Conflator, Offer};

/// Where the bus stands with Redis, for `/health` and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisState {
    Embedded = 0,
    Up = 1,
    Down = 2,
}

impl RedisState {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Embedded => "embedded",
            RedisState::Up => "up",
            RedisState::Down => "down",
        }
    }
}

/// What [`Hub::publish`] did with a good message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Sent to the reactors with this id.
    Sent(EventId),
    /// Held by the per-device rate limit; the newest value goes out later.
    Held,
}

struct Sequence {
    last_ms: u64,
    last_pos: u64,
    replay: ReplayWindow,
}

pub struct Hub {
    mailboxes: Mailboxes,
    seq: Mutex<Sequence>,
    redis: AtomicU8,
    metrics: Arc<Metrics>,
    conflator: Option<Arc<Conflator>>,
    /// Bus messages over this many bytes are dropped (`--max-event-bytes`).
    max_event_bytes: usize,
    /// Redis mode: the cluster log's writer, where values the rate limit
    /// held go when they are due (the log gives them their ids).
    log_writer: Option<clusterlog::Inlet>,
    draining: AtomicBool,
    /// The cluster log's writer is done: it holds no lease (drain).
    resigned: (Mutex<bool>, Condvar),
}

impl Hub {
    pub fn new(
        mailboxes: Mailboxes,
        replay: ReplayWindow,
        redis: RedisState,
        metrics: Arc<Metrics>,
    ) -> Hub {
        Hub {
            mailboxes,
            seq: Mutex::new(Sequence {
                last_ms: 0,
                last_pos: replay.last_pos(),
                replay,
            }),
            redis: AtomicU8::new(redis as u8),
            metrics,
            conflator: None,
            max_event_bytes: usize::MAX,
            log_writer: None,
            draining: AtomicBool::new(false),
            resigned: (Mutex::new(false), Condvar::new()),
        }
    }

    /// Drops bus messages over `bytes` from now on.
    pub fn limit_event_bytes(&mut self, bytes: usize) {
        self.max_event_bytes = bytes;
    }

    /// Redis mode: events are the cluster log's, and held values go to its
    /// writer through `log_writer`.
    pub fn write_through(&mut self, log_writer: clusterlog::Inlet) {
        self.log_writer = Some(log_writer);
    }

    /// Whether `realtime-update` passes the per-device rate limit.
    pub fn rate_limited(&self) -> bool {
        self.conflator.is_some()
    }

    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// Limits `realtime-update` to `per_second` events per device (newest
    /// value wins); starts the thread that sends held values.
    pub fn limit_rate(hub: &mut Hub, per_second: f64) -> Arc<Conflator> {
        let c = Arc::new(Conflator::new(per_second));
        hub.conflator = Some(c.clone());
        c
    }

    /// The body of the thread that sends values the rate limit held.
    pub fn run_conflator(self: &Arc<Hub>, conflator: &Conflator) {
        conflator.run(|msg| match &self.log_writer {
            Some(writer) => {
                if !writer.offer(clusterlog::Input::Released(msg)) {
                    self.metrics.mailbox_overflows.fetch_add(1, Relaxed);
                }
            }
            None => {
                self.emit(msg, epoch_ms());
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Sequence> {
        // A panic while holding this lock cannot leave the sequence torn (every
        // field is written after the fallible work), so poisoning is ignored.
        self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a message as if it arrived on Redis `channel` (embedded
    /// mode, the demo). Bad messages are counted and refused; they never
    /// reach a stream.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> Result<Published, Rejected> {
        match self.admit(channel, payload)? {
            Some(msg) => Ok(Published::Sent(self.emit(msg, epoch_ms()))),
            None => Ok(Published::Held),
        }
    }

    /// Checks a bus message and passes it through the per-device rate
    /// limit: the message to send now, or None when the limit holds it.
    /// Bad messages are counted and refused.
    pub fn admit(&self, channel: &str, payload: &[u8]) -> Result<Option<Message>, Rejected> {
        if payload.len() > self.max_event_bytes {
            self.metrics.dropped_too_large.fetch_add(1, Relaxed);
            return Err(Rejected::TooLarge);
        }
        let now = epoch_ms();
        let msg = match frame::message(channel, payload, now) {
            Ok(m) => m,
            Err(e) => {
                match e {
                    Rejected::NoDeviceId => self.metrics.dropped_no_device.fetch_add(1, Relaxed),
                    _ => self.metrics.dropped_not_json.fetch_add(1, Relaxed),
                };
                return Err(e);
            }
        };
        self.metrics.received(msg.event);
        Ok(match (&self.conflator, msg.event) {
            (Some(c), Event::RealtimeUpdate) => match c.offer(msg, now) {
                Offer::Send(m) => Some(m),
                Offer::Held { replaced } => {
                    if replaced {
                        self.metrics.conflated.fetch_add(1, Relaxed);
                    }
                    None
                }
            },
            _ => Some(msg),
        })
    }

    /// Embedded mode: gives a checked message its id, encodes it once and
    /// sends it to every reactor.
    fn emit(&self, msg: Message, now: u64) -> EventId {
        let frame = self.sequence(now, true, |pos, ms| {
            let id = EventId { ms, seq: pos };
            Frame::encode(Some(id), msg.event, &msg.device, &msg.data)
        });
        frame.id.unwrap_or_default()
    }

    /// Redis mode: an entry of the cluster log, under the log's id, to
    /// every reactor.
    pub fn logged(&self, id: EventId, event: Event, device: &str, data: &[u8]) {
        self.sequence(epoch_ms(), true, |_, _| {
            Frame::encode(Some(id), event, device, data)
        });
    }

    /// Redis mode at start: entries of the cluster log from before this
    /// process, into the replay window only.
    pub fn preload(&self, id: EventId, event: Event, device: &str, data: &[u8]) {
        self.sequence(epoch_ms(), false, |_, _| {
            Frame::encode(Some(id), event, device, data)
        });
    }

    /// Redis mode: the cluster log lost entries this process never read.
    /// Every stream receives `replay-gap` here, and no resume spans it.
    pub fn broken(&self) {
        self.metrics.log_breaks.fetch_add(1, Relaxed);
        self.sequence(epoch_ms(), true, |_, _| {
            Frame::encode(None, Event::System, "", frame::REPLAY_GAP.as_bytes())
        });
    }

    /// Under the sequence lock: the next position, the frame `encode` makes
    /// with it (and the millisecond an id of this process would carry),
    /// into the replay window and, when `send`, to every reactor, in order.
    fn sequence(&self, now: u64, send: bool, encode: impl FnOnce(u64, u64) -> Frame) -> Arc<Frame> {
        let mut s = self.lock();
        s.last_ms = s.last_ms.max(now);
        s.last_pos += 1;
        let mut frame = encode(s.last_pos, s.last_ms);
        frame.pos = s.last_pos;
        let frame = Arc::new(frame);
        s.replay.push(frame.clone(), now);
        self.metrics
            .replay_events
            .store(s.replay.len() as u64, Relaxed);
        self.metrics
            .replay_bytes
            .store(s.replay.bytes() as u64, Relaxed);
        if send {
            for mailbox in self.mailboxes.iter() {
                if !mailbox.send_frame(frame.clone()) {
                    // That reactor is far behind; it takes the frame from the
                    // replay window when it sees the hole in the sequence.
                    self.metrics.mailbox_overflows.fetch_add(1, Relaxed);
                }
            }
        }
        frame
    }

    /// Sends a `system` frame to every stream of every reactor.
    pub fn broadcast_system(&self, frame: Arc<Frame>) {
        for mailbox in self.mailboxes.iter() {
            mailbox.send(Inbox::System(frame.clone()));
        }
    }

    /// Tells every reactor to drain (and the cluster log's writer to hand
    /// its lease over).
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
        for mailbox in self.mailboxes.iter() {
            mailbox.send(Inbox::Drain);
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// The cluster log's writer gave its lease up for the drain.
    pub fn log_resigned(&self) {
        let (done, changed) = &self.resigned;
        *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        changed.notify_all();
    }

    /// Waits (at most `limit`) until the log's writer holds no lease, so
    /// the next leader takes over at once rather than when it expires.
    pub fn wait_resigned(&self, limit: std::time::Duration) {
        let (done, changed) = &self.resigned;
        let guard = done.lock().unwrap_or_else(|p| p.into_inner());
        let _ = changed.wait_timeout_while(guard, limit, |done| !*done);
    }

    /// The position of the newest frame sent (the base before any).
    pub fn last_pos(&self) -> u64 {
        self.lock().last_pos
    }

    /// Tells every reactor that ticket `ticket` was revoked.
    pub fn revoke(&self, ticket: uuid::Uuid) {
        for mailbox in self.mailboxes.iter() {
            mailbox.send(Inbox::Revoke { ticket });
        }
    }

    /// Tells every reactor which devices `user` owns now.
    pub fn access_changed(&self, user: &UserId, owned: HashSet<Box<str>>) {
        let owned = Arc::new(owned);
        for mailbox in self.mailboxes.iter() {
            mailbox.send(Inbox::Access {
                user: user.clone(),
                owned: owned.clone(),
            });
        }
    }

    /// What a stream resuming after `last` has missed, up to the newest frame
    /// its reactor has routed (position `upto`).
    pub fn resume(&self, last: EventId, upto: u64) -> Resume {
        self.lock().replay.after_id(last, upto, epoch_ms())
    }

    /// What a reactor that routed through position `pos` missed, up to `upto`.
    pub fn catch_up(&self, pos: u64, upto: u64) -> Resume {
        self.lock().replay.after_pos(pos, upto, epoch_ms())
    }

    /// Every frame the replay window still holds up to position `upto`.
    pub fn held(&self, upto: u64) -> Vec<Arc<Frame>> {
        self.lock().replay.held(upto, epoch_ms())
    }

    pub fn redis_state(&self) -> RedisState {
        match self.redis.load(Relaxed) {
            0 => RedisState::Embedded,
            1 => RedisState::Up,
            _ => RedisState::Down,
        }
    }

    pub fn set_redis_state(&self, s: RedisState) {
        self.redis.store(s as u8, Relaxed);
        self.metrics
            .redis_up
            .store(u64::from(s != RedisState::Down), Relaxed);
    }

    pub fn mailboxes(&self) -> &Mailboxes {
        &self.mailboxes
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Publishes an event already known by kind (demo machines).
    pub fn publish_event(&self, event: Event, payload: &[u8]) -> Result<Published, Rejected> {
        let channel = frame::CHANNELS
            .iter()
            .find(|c| Event::from_channel(c) == Some(event))
            .ok_or(Rejected::UnknownChannel)?;
        self.publish(channel, payload)
    }
}
