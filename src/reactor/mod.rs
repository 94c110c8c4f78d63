//! The reactor: one thread, one `mio::Poll`, one SO_REUSEPORT listener, and
//! every connection it accepted in a slab. It never blocks except in `poll`.
//!
//! One loop turn:
//! 1. `poll` for socket readiness (or a mailbox wake-up, or the next timer);
//! 2. accept, read and parse requests, answer them or hand lookups to the
//!    store;
//! 3. drain the mailbox: route each bus frame to its subscribers' outboxes,
//!    apply store outcomes;
//! 4. fire due timers (heartbeats, head timeouts, lingering closes);
//! 5. flush every connection that got output this turn, one `writev` each.
//!
//! When the loop is idle a frame is therefore written as soon as it arrives;
//! under load, everything a socket got during the turn leaves in one call.
//!
//! - [`conn`]: a connection's state machine and socket I/O.
//! - [`outbox`]: queued frames and the `writev` that sends them.
//! - [`timer`]: the timing wheel.
//! - [`mailbox`]: how other threads reach a reactor.
//! - [`listener`]: SO_REUSEPORT listeners.

pub mod conn;
pub mod listener;
pub mod mailbox;
pub mod outbox;
pub mod timer;

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use rand::Rng;
use slab::Slab;

use crate::bus::store::{Job, Outcome, Reply};
use crate::gateway::Gateway;
use crate::http::head::{self, Method, Parse};
use crate::http::query;
use crate::http::response::{self, Response};
use crate::stream::frame::{EventId, Frame};
use crate::stream::replay::Resume;
use crate::stream::routes::{self, Action, Pending, Request, Resolution, StreamSpec};
use crate::stream::subscriptions::{wants, Subscriptions};
use conn::{Conn, Exchange, Phase, ReadOutcome, Retry, Stream, READ_BUFFER_CAP};
use mailbox::{Inbox, Mailbox};
use outbox::Flushed;
use timer::TimerWheel;

const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);
/// Timer values that are not connection keys.
const TIMER_ACCEPT: usize = usize::MAX;
const TIMER_DRAIN: usize = usize::MAX - 1;

/// A request head must be complete this long after the connection opens or
/// the previous response is sent.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// How long a stream refused by a limit waits for its probes before the second look
/// (time for another reactor or instance to process a reload's close).
const LIMIT_RETRY: Duration = Duration::from_millis(100);
/// How long accepting pauses after running out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Mailbox messages handled per turn before flushing, so a flood of frames
/// never holds written output back for long.
const INBOX_BATCH: usize = 4096;

/// Why a connection ended, for the log.
#[derive(Clone, Copy, Debug)]
enum Cause {
    ClientClosed,
    SlowConsumer,
    Drained,
    HeadTimeout,
    TooChatty,
    WriteFailed,
    Done,
}

pub struct Reactor {
    index: usize,
    gw: Arc<Gateway>,
    poll: Poll,
    listener: Option<TcpListener>,
    accept_paused: bool,
    conns: Slab<Conn>,
    wheel: TimerWheel,
    inbox: Receiver<Inbox>,
    subs: Subscriptions,
    dirty: Vec<usize>,
    epoch: Instant,
    /// Sequence number of the newest bus frame routed here.
    last_routed: u64,
    /// The heartbeat frame of the current millisecond, shared by every stream
    /// whose heartbeat falls due in it.
    heartbeat: Option<(u64, Arc<Frame>)>,
    draining: bool,
    expired: Vec<usize>,
    /// Numbers store lookups, so an outcome for a connection that has since
    /// closed (its slab slot reused) is recognised and dropped.
    next_serial: u64,
    lag: crate::metrics::lag::LagProbe,
}

impl Reactor {
    pub fn new(
        index: usize,
        gw: Arc<Gateway>,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<Inbox>,
    ) -> io::Result<Reactor> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Reactor {
            index,
            gw,
            poll,
            listener: Some(listener),
            accept_paused: false,
            conns: Slab::with_capacity(1024),
            wheel: TimerWheel::new(0),
            inbox,
            subs: Subscriptions::default(),
            dirty: Vec::new(),
            epoch: Instant::now(),
            last_routed: 0,
            heartbeat: None,
            draining: false,
            expired: Vec::new(),
            next_serial: 0,
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
            let timeout = if !self.dirty.is_empty() || !self.mailbox().arm(&self.inbox) {
                Some(Duration::ZERO)
            } else {
                self.wheel
                    .next_deadline()
                    .map(|d| Duration::from_millis(d.saturating_sub(self.now())))
            };
            match self.poll.poll(&mut events, timeout) {
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
            self.flush_dirty();
            self.lag.record(&self.gw.metrics.lag);
            if self.draining && self.conns.is_empty() {
                return Ok(());
            }
        }
    }

    // ----- accepting -------------------------------------------------------

    fn accept(&mut self) {
        if self.accept_paused {
            return;
        }
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut socket,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("register failed: {e}");
                        continue;
                    }
                    let mut conn = Conn::new(socket, peer);
                    let at =
                        self.epoch.elapsed().as_millis() as u64 + HEAD_TIMEOUT.as_millis() as u64;
                    conn.timer = Some(self.wheel.insert(at, key));
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
                        self.accept_paused = true;
                        let at = self.epoch.elapsed().as_millis() as u64
                            + ACCEPT_BACKOFF.as_millis() as u64;
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
        let at = self.now() + after.as_millis() as u64;
        self.arm_at(key, at);
    }

    /// Arms the next heartbeat, its deadline rounded up to a tick of an
    /// eighth of the period (at most 100 ms): streams opened close together
    /// then share a wake-up and a heartbeat frame instead of waking the loop
    /// one by one. A heartbeat is never early, at most one tick late.
    fn arm_heartbeat(&mut self, key: usize) {
        let period = self.gw.config.heartbeat_secs.as_millis() as u64;
        let tick = (period / 8).clamp(1, 100);
        let at = (self.now() + period).div_ceil(tick) * tick;
        self.arm_at(key, at);
    }

    fn arm_at(&mut self, key: usize, at: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(old) = conn.timer.take() {
            self.wheel.cancel(old);
        }
        conn.timer = Some(self.wheel.insert(at, key));
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
                    self.accept_paused = false;
                    self.accept();
                }
                TIMER_DRAIN => {
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.close(key, Cause::Drained);
                    }
                }
                key => self.on_timer(key),
            }
        }
        self.expired = expired;
    }

    fn on_timer(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.timer = None;
        match &conn.phase {
            Phase::Streaming(_) => {
                let frame = self.heartbeat_frame();
                self.push_frame(key, &frame);
                self.gw.metrics.heartbeats.fetch_add(1, Relaxed);
                self.arm_heartbeat(key);
            }
            Phase::Reading => self.close(key, Cause::HeadTimeout),
            Phase::Closing { .. } => self.close(key, Cause::Done),
            Phase::Retrying(_) => self.retry_now(key),
            Phase::Waiting(_) | Phase::Responding { .. } => {}
        }
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

    // ----- reading and requests --------------------------------------------

    fn on_readable(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match &mut conn.phase {
            Phase::Reading => {
                let outcome = conn.read_request_bytes(READ_BUFFER_CAP);
                conn.read_blocked = outcome == ReadOutcome::Full;
                if outcome == ReadOutcome::Closed {
                    self.close(key, Cause::ClientClosed);
                    return;
                }
                self.process_requests(key);
            }
            Phase::Streaming(_) | Phase::Closing { .. } => {
                let (n, gone) = conn.discard_input();
                if gone {
                    self.close(key, Cause::ClientClosed);
                    return;
                }
                if let Phase::Streaming(s) = &mut conn.phase {
                    s.input += n;
                    if s.input > conn::STREAM_INPUT_CAP {
                        self.close(key, Cause::TooChatty);
                    }
                }
            }
            // Leave bytes in the kernel until this request is answered.
            Phase::Waiting(_) | Phase::Retrying(_) | Phase::Responding { .. } => {
                conn.read_blocked = true
            }
        }
    }

    /// Parses and handles every complete request in the buffer, one at a time
    /// (a pipelined request waits until the previous response is flushed).
    fn process_requests(&mut self, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if !matches!(conn.phase, Phase::Reading) || conn.input.is_empty() {
                return;
            }
            let head = match head::parse(&conn.input) {
                Parse::Partial => return,
                Parse::Error(e) => {
                    let status = e.status();
                    debug!("bad request from {}: {}", conn.peer, e.reason());
                    self.gw.metrics.rejected(status);
                    let r = Response::error(status, e.reason()).closing();
                    let exchange = Exchange {
                        keep_alive: false,
                        head_only: false,
                        cors: None,
                        path: String::new(),
                    };
                    self.respond(key, &exchange, r);
                    return;
                }
                Parse::Complete(h) => h,
            };
            let total = head.head_len + head.content_length;
            if conn.input.len() < total {
                // The body is still arriving (it fits: the parser capped it).
                return;
            }
            let input = std::mem::take(&mut conn.input);
            self.handle(key, &head, &input[head.head_len..total]);
            if let Some(conn) = self.conns.get_mut(key) {
                // Keep what followed (a pipelined request), unless the
                // handler already moved on.
                conn.input = input[total..].to_vec();
            }
        }
    }

    fn handle(&mut self, key: usize, head: &head::Head, body: &[u8]) {
        self.gw.metrics.requests.fetch_add(1, Relaxed);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let client = routes::client_ip(
            &self.gw.config,
            conn.peer.ip(),
            head.forwarded_for.as_deref(),
        );
        let exchange = Exchange {
            keep_alive: head.keep_alive && !self.draining,
            head_only: head.method == Method::Head,
            cors: self
                .gw
                .config
                .allowed_origin(head.origin.as_deref())
                .map(str::to_owned),
            path: head.path.clone(),
        };
        let request = Request { head, body, client };
        match routes::route(&self.gw, &request) {
            Action::Respond(r) => {
                if r.status >= 400 && matches!(head.path.as_str(), "/sse/stream" | "/sse/alerts") {
                    // The query says which devices; its ticket is never logged.
                    info!(
                        status = r.status,
                        path = head.path.as_str(),
                        query = query::redact(&head.query, "ticket"),
                        client = client,
                        reason = r.message();
                        "stream refused"
                    );
                }
                self.respond(key, &exchange, r)
            }
            Action::Lookup(job, pending) => self.lookup(key, job, pending, exchange),
        }
    }

    /// Hands `job` to the store; the connection waits for its outcome.
    fn lookup(&mut self, key: usize, job: Job, pending: Pending, exchange: Exchange) {
        self.disarm(key);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        self.next_serial += 1;
        conn.serial = self.next_serial;
        let reply = Reply {
            reactor: self.index,
            conn: key,
            serial: conn.serial,
        };
        conn.phase = Phase::Waiting(Box::new((pending, exchange)));
        if let Some(outcome) = self.gw.store.submit(job, reply) {
            self.on_outcome(key, reply.serial, outcome);
        }
    }

    fn on_outcome(&mut self, key: usize, serial: u64, outcome: Outcome) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.serial != serial || !matches!(conn.phase, Phase::Waiting(_)) {
            return; // an answer for a connection that has moved on
        }
        let Phase::Waiting(waiting) = std::mem::replace(&mut conn.phase, Phase::Reading) else {
            return;
        };
        let (pending, exchange) = *waiting;
        let user = match &pending {
            Pending::Stream(s) => Some(s.ticket.user.clone()),
            _ => None,
        };
        match routes::resolve(&self.gw, pending, outcome, (self.index, key)) {
            Resolution::Respond(r) => {
                if let Some(user) = user {
                    info!(
                        status = r.status,
                        path = exchange.path.as_str(),
                        user:% = user,
                        client = conn.peer,
                        reason = r.message();
                        "stream refused"
                    );
                }
                self.respond(key, &exchange, r);
            }
            Resolution::Open(spec) if self.draining => {
                let user = &spec.ticket.user;
                self.gw
                    .stream_closed(user, spec.client, spec.purpose, spec.id);
                let r = Response::error(503, "Shutting down, reconnect shortly");
                self.respond(key, &exchange, r);
            }
            Resolution::Open(spec) => self.open_stream(key, &exchange, spec),
            Resolution::Retry(request, holders) => {
                conn.phase = Phase::Retrying(Box::new(Retry {
                    request: *request,
                    exchange,
                    probes: holders.len(),
                }));
                let asker = Reply {
                    reactor: self.index,
                    conn: key,
                    serial: conn.serial,
                };
                self.arm(key, LIMIT_RETRY);
                for (reactor, conn) in holders {
                    if reactor == self.index {
                        self.probe(conn, asker);
                    } else if let Some(mailbox) = self.gw.hub.mailboxes().get(reactor) {
                        mailbox.send(Inbox::Probe { conn, asker });
                    }
                }
            }
        }
    }

    /// Looks at a stream whose slot another request wants: if its client has
    /// gone (the FIN is waiting in the socket), it closes now and frees the
    /// slot. Then tells the asker.
    fn probe(&mut self, conn: usize, asker: Reply) {
        if self.conns.get(conn).is_some_and(|c| c.stream().is_some()) {
            self.on_readable(conn);
        }
        if asker.reactor == self.index {
            self.on_probed(asker.conn, asker.serial);
        } else if let Some(mailbox) = self.gw.hub.mailboxes().get(asker.reactor) {
            mailbox.send(Inbox::Probed {
                conn: asker.conn,
                serial: asker.serial,
            });
        }
    }

    fn on_probed(&mut self, key: usize, serial: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Retrying(retry) = &mut conn.phase else {
            return;
        };
        if conn.serial != serial {
            return;
        }
        retry.probes = retry.probes.saturating_sub(1);
        if retry.probes == 0 {
            self.disarm(key);
            self.retry_now(key);
        }
    }

    /// The second look at a stream a limit refused.
    fn retry_now(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Retrying(retry) = std::mem::replace(&mut conn.phase, Phase::Reading) else {
            return;
        };
        let Retry {
            request, exchange, ..
        } = *retry;
        let job = routes::stream_job(&self.gw, &request);
        self.lookup(key, job, Pending::Stream(request), exchange);
    }

    fn respond(&mut self, key: usize, exchange: &Exchange, r: Response) {
        if r.status >= 400 {
            self.gw.metrics.rejected(r.status);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let close = r.close || !exchange.keep_alive || self.draining;
        conn.outbox
            .push_bytes(r.encode(exchange.head_only, !close, exchange.cors.as_deref()));
        conn.phase = Phase::Responding { close };
        self.mark_dirty(key);
    }

    // ----- streams ---------------------------------------------------------

    fn open_stream(&mut self, key: usize, exchange: &Exchange, spec: StreamSpec) {
        let now = self.now();
        let hub = self.gw.hub.clone();
        let Some(conn) = self.conns.get_mut(key) else {
            let user = &spec.ticket.user;
            self.gw
                .stream_closed(user, spec.client, spec.purpose, spec.id);
            return;
        };
        conn.outbox
            .push_bytes(response::stream_head(exchange.cors.as_deref()));
        if !spec.snapshot.is_empty() {
            conn.outbox.push_bytes(spec.snapshot);
        }
        if let Some(raw) = spec.last_event_id.as_deref() {
            let resume = match EventId::parse(raw) {
                Some(id) => hub.resume(id, self.last_routed),
                None => Resume::Gap,
            };
            match resume {
                Resume::Frames(frames) => {
                    self.gw.metrics.replays_served.fetch_add(1, Relaxed);
                    for f in frames
                        .iter()
                        .filter(|f| wants(spec.purpose, &spec.filter, f))
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
            id:% = spec.id,
            user:% = spec.ticket.user,
            purpose = spec.purpose.as_str(),
            devices = match &spec.filter {
                routes::Filter::All => "all".to_owned(),
                routes::Filter::Devices(d) => d.len().to_string(),
            },
            client = spec.client;
            "stream open"
        );
        self.subs.add(key, spec.purpose, &spec.filter);
        conn.phase = Phase::Streaming(Box::new(Stream {
            id: spec.id,
            user: spec.ticket.user,
            client: spec.client,
            purpose: spec.purpose,
            filter: spec.filter,
            opened: now,
            input: 0,
        }));
        conn.input = Vec::new();
        self.mark_dirty(key);
        self.arm_heartbeat(key);
        // The client may have gone while the lookup ran: its FIN's readiness
        // edge was spent then, so look now.
        self.on_readable(key);
    }

    /// Queues a frame; a stream whose backlog passes the bound is closed.
    fn push_frame(&mut self, key: usize, frame: &Arc<Frame>) -> bool {
        let max = self.gw.config.max_backlog_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        conn.outbox.push_frame(frame);
        if conn.outbox.queued() > max {
            self.gw.metrics.slow_consumers.fetch_add(1, Relaxed);
            self.close(key, Cause::SlowConsumer);
            return false;
        }
        if !conn.dirty && !conn.write_blocked {
            conn.dirty = true;
            self.dirty.push(key);
        }
        true
    }

    fn drain_inbox(&mut self) {
        let mut slow: Vec<usize> = Vec::new();
        for _ in 0..INBOX_BATCH {
            let Ok(msg) = self.inbox.try_recv() else {
                break;
            };
            match msg {
                Inbox::Frame(frame) => {
                    if let Some(id) = frame.id {
                        self.last_routed = id.seq;
                    }
                    let max = self.gw.config.max_backlog_bytes;
                    let (conns, dirty) = (&mut self.conns, &mut self.dirty);
                    let mut delivered = 0;
                    self.subs.each(&frame, |key| {
                        let Some(conn) = conns.get_mut(key) else {
                            return;
                        };
                        conn.outbox.push_frame(&frame);
                        delivered += 1;
                        if conn.outbox.queued() > max {
                            slow.push(key);
                        } else if !conn.dirty && !conn.write_blocked {
                            conn.dirty = true;
                            dirty.push(key);
                        }
                    });
                    self.gw.metrics.delivered(frame.event, delivered);
                    self.lag.note(&frame, delivered);
                    for key in slow.drain(..) {
                        self.gw.metrics.slow_consumers.fetch_add(1, Relaxed);
                        self.close(key, Cause::SlowConsumer);
                    }
                }
                Inbox::System(frame) => {
                    let keys: Vec<usize> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.stream().is_some())
                        .map(|(k, _)| k)
                        .collect();
                    for key in keys {
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
                Inbox::Drain => self.drain(),
            }
        }
    }

    /// SIGTERM: stop accepting, tell every stream to come back in 1..5 s
    /// (random, so clients do not return all at once), flush, close.
    fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let deadline = self.now() + self.gw.config.drain_secs.as_millis() as u64;
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
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.phase = Phase::Closing { shut: false };
                    }
                    self.mark_dirty(key);
                }
                Phase::Reading if conn.input.is_empty() => self.close(key, Cause::Drained),
                Phase::Responding { .. } => conn.phase = Phase::Responding { close: true },
                _ => {}
            }
        }
    }

    // ----- writing and closing ---------------------------------------------

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty && !conn.write_blocked {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            match conn.flush() {
                Ok(Flushed::All) => self.on_flushed(key),
                // The writable edge will come; until then output only queues.
                Ok(Flushed::Blocked) => conn.write_blocked = true,
                Err(_) => self.close(key, Cause::WriteFailed),
            }
        }
        // Handlers run from on_flushed may have queued more; keep the list's
        // allocation and whatever they added.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    /// Everything queued was written: move the state machine on.
    fn on_flushed(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.phase {
            Phase::Responding { close: false } => {
                conn.phase = Phase::Reading;
                self.arm(key, HEAD_TIMEOUT);
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
    fn end_stream(&mut self, key: usize, cause: Cause) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Streaming(stream) =
            std::mem::replace(&mut conn.phase, Phase::Closing { shut: false })
        else {
            return;
        };
        self.subs.remove(key, stream.purpose, &stream.filter);
        self.gw
            .stream_closed(&stream.user, stream.client, stream.purpose, stream.id);
        let secs = self.now().saturating_sub(stream.opened) as f64 / 1000.0;
        info!(
            id:% = stream.id,
            user:% = stream.user,
            purpose = stream.purpose.as_str(),
            secs = (secs * 10.0).round() / 10.0,
            cause:? = cause;
            "stream closed"
        );
    }

    fn close(&mut self, key: usize, cause: Cause) {
        self.end_stream(key, cause);
        self.disarm(key);
        if self.conns.contains(key) {
            let mut conn = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut conn.socket);
            conn.outbox.clear();
            self.gw.metrics.connections_open.fetch_sub(1, Relaxed);
        }
    }
}
