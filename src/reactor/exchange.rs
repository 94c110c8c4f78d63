//! The request exchange: bytes in, a request parsed, a route chosen, a store
//! lookup handed out and its outcome taken back, a response queued. Every
//! step has a deadline (see `conn.rs`), and an outcome that arrives for a
//! request that has moved on (timed out, client gone) is not lost: a lease
//! it took is given back.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use log::{debug, info};

use super::conn::{Exchange, Phase, ReadOutcome, Retry, READ_BUFFER_CAP, STREAM_INPUT_CAP};
use super::mailbox::Inbox;
use super::{ms, Cause, Reactor};
use crate::http::head::{self, Method, Parse, MAX_HEAD_BYTES};
use crate::http::query;
use crate::http::response::Response;
use crate::routes::{self, Action, Pending, Request, Resolution};
use crate::store::lease::LeaseAnswer;
use crate::store::protocol::{Job, Outcome, Reply};

/// How long a request may wait on the store before it is answered 503.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stream refused by a limit waits before its second look when
/// its probes are all answered: time for another instance to release the
/// lease of a reload's close.
const LIMIT_RETRY: Duration = Duration::from_millis(100);
/// How long it waits at most for probes of a busy reactor.
const PROBE_WAIT: Duration = Duration::from_secs(1);

impl Reactor {
    pub(super) fn on_readable(&mut self, key: usize) {
        let now = self.now();
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
                if conn.idle && !conn.input.is_empty() {
                    // The first byte of the next request: its clocks start.
                    conn.idle = false;
                    conn.start_request(now);
                    self.arm_reading(key);
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
                    s.input = s.input.saturating_add(u16::try_from(n).unwrap_or(u16::MAX));
                    if s.input as usize > STREAM_INPUT_CAP {
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
    pub(super) fn process_requests(&mut self, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if !matches!(conn.phase, Phase::Reading) || conn.input.is_empty() {
                return;
            }
            let head_known = conn.head_found();
            if !conn.head_complete() && conn.input.len() <= MAX_HEAD_BYTES {
                return;
            }
            let head = match head::parse(conn.input.bytes()) {
                Parse::Partial => return,
                Parse::Error(e) => {
                    let status = e.status();
                    debug!("bad request from {}: {}", conn.peer(), e.reason());
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
                // The head's deadline is met; from here the request's bounds it.
                if !head_known {
                    self.arm_reading(key);
                }
                return;
            }
            let input = conn.input.take();
            conn.scanned = 0;
            self.handle(key, &head, &input[head.head_len..total]);
            if let Some(conn) = self.conns.get_mut(key) {
                // Keep what followed (a pipelined request), unless the
                // handler already moved on.
                conn.input.keep(&input[total..]);
            }
        }
    }

    fn handle(&mut self, key: usize, head: &head::Head, body: &[u8]) {
        self.gw.metrics.requests.fetch_add(1, Relaxed);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let client =
            routes::client_ip(&self.gw.config, conn.peer_ip, head.forwarded_for.as_deref());
        let exchange = Exchange {
            keep_alive: head.keep_alive && !self.draining,
            head_only: head.method == Method::Head,
            cors: self.gw.config.allowed_origin(head.origin.as_deref()),
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

    /// When the current request of `key` must be done, its response
    /// included: `--request-timeout-secs` from its first byte (reactor
    /// clock, ms).
    pub(super) fn request_deadline(&self, key: usize) -> u64 {
        let now = self.now();
        let limit = ms(self.gw.config.request_timeout_secs);
        self.conns
            .get(key)
            .map_or(now, |c| c.started_at(now) + limit)
    }

    /// Arms the deadline of a request being read: its head must be complete
    /// `--head-timeout-secs` after its first byte (slowloris), and the whole
    /// request, body included, by the request deadline, whichever is first.
    pub(super) fn arm_reading(&mut self, key: usize) {
        let now = self.now();
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let head = conn.started_at(now) + ms(self.gw.config.head_timeout_secs);
        let request = self.request_deadline(key);
        let at = if conn.head_found() {
            request
        } else {
            head.min(request)
        };
        self.arm_at(key, at);
    }

    /// Hands `job` to the store; the connection waits (at most
    /// [`LOOKUP_TIMEOUT`], and never past the request deadline) for its
    /// outcome.
    pub(super) fn lookup(&mut self, key: usize, job: Job, pending: Pending, exchange: Exchange) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        self.next_serial = self.next_serial.wrapping_add(1);
        conn.serial = self.next_serial;
        let reply = Reply {
            reactor: self.index,
            conn: key,
            serial: conn.serial,
        };
        conn.phase = Phase::Waiting(Box::new((pending, exchange)));
        let at = (self.now() + ms(LOOKUP_TIMEOUT)).min(self.request_deadline(key));
        self.arm_at(key, at);
        if let Some(outcome) = self.gw.store.submit(job, reply) {
            self.on_outcome(key, reply.serial, outcome);
        }
    }

    /// The store did not answer in time: 503, and the outcome, if it ever
    /// comes, finds the connection moved on.
    pub(super) fn lookup_timed_out(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Waiting(waiting) = std::mem::replace(&mut conn.phase, Phase::Reading) else {
            return;
        };
        let (_, exchange) = *waiting;
        let r = Response::error(503, "Redis did not answer in time, try again shortly")
            .header("Retry-After", "1");
        self.respond(key, &exchange, r);
    }

    pub(super) fn on_outcome(&mut self, key: usize, serial: u32, outcome: Outcome) {
        let current = self
            .conns
            .get(key)
            .is_some_and(|c| c.serial == serial && matches!(c.phase, Phase::Waiting(_)));
        if !current {
            // An answer for a request that has moved on (timed out, or its
            // client left): a lease taken for it must not hold the user's
            // slot until it expires.
            if let Outcome::Facts(facts) = outcome {
                let facts = *facts;
                let leases = [
                    (facts.lease, facts.lease_ask),
                    (facts.ip_lease, facts.ip_lease_ask),
                ];
                for (answer, ask) in leases {
                    if let (LeaseAnswer::Granted { .. }, Some(ask)) = (answer, ask) {
                        info!(
                            "lease of a stream request that gave up released: {}",
                            ask.key
                        );
                        self.gw.store.fire(Job::ReleaseLease(ask));
                    }
                }
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
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
                        client = conn.peer(),
                        reason = r.message();
                        "stream refused"
                    );
                }
                self.respond(key, &exchange, r);
            }
            Resolution::Open { stream, .. } if self.draining => {
                self.gw
                    .stream_closed(&stream.user, stream.client, stream.purpose, stream.id);
                let r = Response::error(503, "Shutting down, reconnect shortly");
                self.respond(key, &exchange, r);
            }
            Resolution::Open {
                stream,
                snapshot,
                last_event_id,
            } => self.open_stream(key, &exchange, stream, snapshot, last_event_id),
            Resolution::Retry(request, holders) => {
                conn.phase = Phase::Retrying(Box::new(Retry {
                    request: *request,
                    exchange,
                    probes: holders.len(),
                    freed: false,
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
    /// slot. Then tells the asker whether it did.
    pub(super) fn probe(&mut self, conn: usize, asker: Reply) {
        let streaming = |r: &Self| r.conns.get(conn).is_some_and(|c| c.stream().is_some());
        let held = streaming(self);
        if held {
            self.on_readable(conn);
        }
        let freed = held && !streaming(self);
        if asker.reactor == self.index {
            self.on_probed(asker.conn, asker.serial, freed);
        } else if let Some(mailbox) = self.gw.hub.mailboxes().get(asker.reactor) {
            mailbox.send(Inbox::Probed {
                conn: asker.conn,
                serial: asker.serial,
                freed,
            });
        }
    }

    pub(super) fn on_probed(&mut self, key: usize, serial: u32, freed: bool) {
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
        retry.freed |= freed;
        // Nothing freed: the retry timer (armed with the probes) gives the
        // second look, and a close still on its way the time to arrive.
        if retry.probes == 0 && retry.freed {
            self.retry_now(key);
        }
    }

    /// A refused stream's timer: the second look, unless probes of a lagging
    /// reactor are still out (then wait for them, up to [`PROBE_WAIT`]).
    pub(super) fn retry_timer(&mut self, key: usize) {
        let now = self.now();
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if let Phase::Retrying(retry) = &conn.phase {
            if retry.probes > 0 && now < conn.started_at(now) + ms(PROBE_WAIT) {
                return self.arm(key, LIMIT_RETRY);
            }
        }
        self.retry_now(key);
    }

    /// The second look at a stream a limit refused.
    pub(super) fn retry_now(&mut self, key: usize) {
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

    /// Queues a response; it must be written by the exchange's deadline.
    pub(super) fn respond(&mut self, key: usize, exchange: &Exchange, r: Response) {
        if r.status >= 400 {
            self.gw.metrics.rejected(r.status);
        }
        let at = self.request_deadline(key);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let close = r.close || !exchange.keep_alive || self.draining;
        conn.outbox
            .push_bytes(r.encode(exchange.head_only, !close, exchange.cors.as_deref()));
        conn.phase = Phase::Responding { close };
        self.arm_at(key, at);
        self.mark_dirty(key);
    }
}
