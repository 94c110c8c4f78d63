//! The reactor: one thread, one `mio::Poll`, one SO_REUSEPORT listener, and
//! every connection it accepted in a slab. Its only blocking call is `poll`;
//! everything that may wait (Redis) runs on other threads and answers
//! through the mailbox.
//!
//! One loop turn ([`Reactor::turn`]):
//! 1. `poll` for socket readiness (or a mailbox wake-up, or the next timer);
//! 2. accept, read and parse requests, answer them or hand lookups to the
//!    store;
//! 3. drain the mailbox: route each bus frame to its subscribers' outboxes,
//!    apply store outcomes, revocations and probes;
//! 4. fire due timers (heartbeats, deadlines, lingering closes);
//! 5. flush every connection that got output this turn, one `send` (or
//!    `sendmsg` of several frames) each.
//!
//! When the loop is idle a frame is therefore written as soon as it arrives;
//! under load, everything a socket got during the turn leaves in one call.
//! A stream written less than `--coalesce-ms` ago (16 ms: a frame of a
//! 60 Hz display) is *held*: its frames wait at most that long and leave
//! together, so a busy stream costs a write per window, not per frame,
//! while a stream that gets a frame now and then is written at once.
//!
//! The reactor's work is split by job, one file each, all `impl Reactor`:
//! this file is the loop (poll, accept, timers); [`flush`] writes queued
//! output (and holds busy streams' frames to coalesce them) and closes;
//! [`exchange`] is the request exchange (request → lookup → outcome →
//! response); [`fanout`] is everything that reaches open streams (bus
//! frames, heartbeats, system frames, drain), [`resume`] what a stream
//! opening with `Last-Event-ID` gets first, [`revocation`] what closes
//! them when a ticket or an access is withdrawn.
//!
//! - [`conn`]: a connection's state machine and socket I/O.
//! - [`outbox`]: queued frames and the write that sends them.
//! - [`timer`]: the timing wheel.
//! - [`mailbox`]: how other threads reach a reactor.
//! - [`listener`]: SO_REUSEPORT listeners.
//! - [`peers`]: the per-IP cap on connections that are not streams.

pub mod conn;
mod exchange;
mod fanout;
mod flush;
pub mod listener;
pub mod mailbox;
pub mod outbox;
pub mod peers;
mod resume;
mod revocation;
pub mod timer;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::context::Gateway;
use crate::stream::frame::Frame;
use conn::{Conn, Phase};
use mailbox::{Inboxes, Mailbox};
use timer::TimerWheel;

const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);
/// Timer values that are not connection keys.
const TIMER_ACCEPT: u32 = u32::MAX;
const TIMER_DRAIN: u32 = u32::MAX - 1;

/// A connection's key as its timer's value. Keys index a slab of open
/// descriptors, so they stay far below the two values above.
fn timer_value(key: usize) -> u32 {
    debug_assert!(key < TIMER_DRAIN as usize);
    key as u32
}

/// How long a closing connection waits for the client to close its side
/// (or, flushing a last message, for the client to take it).
const LINGER: Duration = Duration::from_secs(2);
/// A connection written within this many ms keeps its outbox's room after
/// a flush (a stream with traffic never allocates per frame); one written
/// less often gives it back, so an idle stream holds no buffer.
const KEEP_RING_MS: u32 = 1000;
/// How long accepting pauses after running out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection ended, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    ClientClosed,
    SlowConsumer,
    WriteStall,
    Revoked,
    Drained,
    HeadTimeout,
    Idle,
    RequestTimeout,
    TooChatty,
    WriteFailed,
    Done,
}

/// The listening socket, or why there is none.
enum Listening {
    Open(TcpListener),
    /// Out of descriptors: accepting resumes when the backoff timer fires.
    Paused(TcpListener),
    /// Draining: no new connections.
    Closed,
}

pub struct Reactor {
    index: usize,
    gw: Arc<Gateway>,
    poll: Poll,
    listener: Listening,
    conns: Slab<Conn>,
    wheel: TimerWheel,
    inbox: Inboxes,
    subs: crate::stream::subscriptions::Subscriptions,
    dirty: Vec<usize>,
    /// Streams whose frames wait to be coalesced (written less than
    /// `--coalesce-ms` ago), flushed together once the first has waited
    /// that long; `held_since` is when the first came.
    held: Vec<usize>,
    held_since: u64,
    epoch: Instant,
    /// The position of the newest bus frame routed here: a frame whose
    /// position is not the next one shows that the mailbox overflowed in
    /// between.
    last_routed: u64,
    /// Streams resuming from an id not routed here yet (another instance's
    /// log reader was ahead): subscribed once it comes by, or with
    /// `replay-gap` once it cannot (see [`resume`]).
    waiting: Vec<resume::Waiting>,
    /// The heartbeat frame of the current millisecond, shared by every stream
    /// whose heartbeat falls due in it.
    heartbeat: Option<(u64, Arc<Frame>)>,
    draining: bool,
    expired: Vec<u32>,
    /// Numbers store lookups, so an outcome for a connection that has since
    /// closed (its slab slot reused) is recognised and dropped. 32 bits
    /// that wrap: an outcome is at most seconds late, and 2^32 lookups take
    /// a reactor days.
    next_serial: u32,
    /// Revocations of the last few seconds, checked when a stream opens: a
    /// revocation that overtook the stream's own lookup still reaches it.
    recent: revocation::Recent,
    /// Publish→write lag of the frames written this turn.
    lag: crate::metrics::lag::LagProbe,
}

impl Reactor {
    pub fn new(
        index: usize,
        gw: Arc<Gateway>,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Inboxes,
    ) -> io::Result<Reactor> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let last_routed = gw.hub.last_pos();
        Ok(Reactor {
            index,
            gw,
            poll,
            listener: Listening::Open(listener),
            conns: Slab::with_capacity(1024),
            wheel: TimerWheel::new(0),
            inbox,
            subs: Default::default(),
            dirty: Vec::new(),
            held: Vec::new(),
            held_since: 0,
            epoch: Instant::now(),
            last_routed,
            waiting: Vec::new(),
            heartbeat: None,
            draining: false,
            expired: Vec::new(),
            next_serial: 0,
            recent: Default::default(),
            lag: Default::default(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn mailbox(&self) -> &Mailbox {
        &self.gw.hub.mailboxes()[self.index]
    }

    /// Runs until drained.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.turn(&mut events, None)? {
                return Ok(());
            }
        }
    }

    /// One loop turn, waiting at most `max_wait` (None: until the next
    /// timer or wake-up). True once drained and empty.
    pub fn turn(&mut self, events: &mut Events, max_wait: Option<Duration>) -> io::Result<bool> {
        let timeout = if !self.dirty.is_empty() || !self.mailbox().arm(&self.inbox) {
            Some(Duration::ZERO)
        } else {
            let release = self.held_until();
            let next = match self.wheel.next_deadline() {
                Some(d) => Some(d.min(release.unwrap_or(u64::MAX))),
                None => release,
            }
            .map(|d| Duration::from_millis(d.saturating_sub(self.now())));
            match (next, max_wait) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match self.poll.poll(events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        self.mailbox().disarm();
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept(),
                WAKER => {}
                Token(key) => {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.on_readable(key);
                    }
                    if event.is_writable() {
                        if let Some(conn) = self.conns.get_mut(key) {
                            conn.write_blocked = false;
                        }
                        self.mark_dirty(key);
                    }
                }
            }
        }
        self.drain_inbox();
        self.fire_timers();
        if self.held_until().is_some_and(|at| self.now() >= at) {
            self.dirty.append(&mut self.held);
        }
        self.flush_dirty();
        self.lag.record(&self.gw.metrics.lag);
        Ok(self.draining && self.conns.is_empty())
    }

    /// Open connections (for in-process tests).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    // ----- accepting -------------------------------------------------------

    fn accept(&mut self) {
        let Listening::Open(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut socket, peer)) => {
                    let counted = !self.gw.config.is_trusted_proxy(peer.ip());
                    let ip = crate::config::limit_key(peer.ip());
                    let cap = self.gw.config.max_requests_per_ip;
                    if counted && !self.gw.peers.enter(ip, cap) {
                        // Dropped unread: one address may not pin more.
                        self.gw.metrics.peer_refusals.fetch_add(1, Relaxed);
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut socket,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("register failed: {e}");
                        if counted {
                            self.gw.peers.leave(ip);
                        }
                        continue;
                    }
                    let now = self.epoch.elapsed().as_millis() as u64;
                    let mut conn = Conn::new(socket, peer, now);
                    conn.counted = counted;
                    // The head's deadline (`arm_reading`'s, without a
                    // borrow of the whole reactor while the listener is held).
                    let c = &self.gw.config;
                    let head = ms(c.head_timeout_secs.min(c.request_timeout_secs));
                    conn.timer = Some(self.wheel.insert(now + head, timer_value(key)));
                    entry.insert(conn);
                    self.gw.metrics.connections_accepted.fetch_add(1, Relaxed);
                    self.gw.metrics.connections_open.fetch_add(1, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.gw.metrics.accept_errors.fetch_add(1, Relaxed);
                    if listener::is_resource_exhaustion(&e) {
                        // Out of descriptors: the pending connection stays in
                        // the backlog; try again shortly instead of spinning.
                        warn!("accept paused for {ACCEPT_BACKOFF:?}: {e}");
                        if let Listening::Open(l) =
                            std::mem::replace(&mut self.listener, Listening::Closed)
                        {
                            self.listener = Listening::Paused(l);
                        }
                        let at = self.now() + ms(ACCEPT_BACKOFF);
                        self.wheel.insert(at, TIMER_ACCEPT);
                    } else {
                        warn!("accept failed: {e}");
                    }
                    return;
                }
            }
        }
    }

    // ----- timers ----------------------------------------------------------

    /// (Re)arms the connection's one timer.
    fn arm(&mut self, key: usize, after: Duration) {
        let at = self.now() + ms(after);
        self.arm_at(key, at);
    }

    fn arm_at(&mut self, key: usize, at: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(old) = conn.timer.take() {
            self.wheel.cancel(old);
        }
        conn.timer = Some(self.wheel.insert(at, timer_value(key)));
    }

    fn disarm(&mut self, key: usize) {
        if let Some(t) = self.conns.get_mut(key).and_then(|c| c.timer.take()) {
            self.wheel.cancel(t);
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.poll(now, &mut expired);
        for value in expired.drain(..) {
            match value {
                TIMER_ACCEPT => {
                    if let Listening::Paused(l) =
                        std::mem::replace(&mut self.listener, Listening::Closed)
                    {
                        self.listener = Listening::Open(l);
                    }
                    self.accept();
                }
                TIMER_DRAIN => {
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.close(key, Cause::Drained);
                    }
                }
                key => self.on_timer(key as usize),
            }
        }
        self.expired = expired;
    }

    /// A connection's deadline passed: what that means depends on its phase.
    fn on_timer(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.timer = None;
        if let Phase::Streaming(_) = conn.phase {
            return self.on_stream_timer(key);
        }
        // Whether the request's own deadline has passed (a stream has none).
        // A millisecond's grace: a request begun in a millisecond whose low
        // 32 bits are 0 reads its start back a millisecond late (`stamp`).
        let late = self.now() + 1 >= self.request_deadline(key);
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        match &conn.phase {
            Phase::Streaming(_) => self.on_stream_timer(key),
            Phase::Reading => {
                let cause = if conn.idle {
                    Cause::Idle
                } else if conn.head_found() || late {
                    Cause::RequestTimeout
                } else {
                    Cause::HeadTimeout
                };
                self.gw.metrics.request_timeouts.fetch_add(1, Relaxed);
                self.close(key, cause);
            }
            // The lookup's 2 s, unless the request deadline came first.
            Phase::Waiting(_) if !late => self.lookup_timed_out(key),
            Phase::Retrying(_) => self.retry_timer(key),
            Phase::Waiting(_) | Phase::Responding { .. } => {
                self.gw.metrics.request_timeouts.fetch_add(1, Relaxed);
                self.close(key, Cause::RequestTimeout);
            }
            Phase::Closing { .. } => self.close(key, Cause::Done),
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
