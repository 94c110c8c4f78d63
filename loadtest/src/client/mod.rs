//! The many-stream client that runs inside each worker process: one mio
//! `Poll`, one non-blocking socket per stream, each bound to its own source
//! address in 127.0.0.0/8 before connecting to a loopback server (so
//! neither the ephemeral port range nor any per-IP limit binds), or to the
//! `--source` addresses in turn (a server elsewhere otherwise sees the
//! machine's own address), driven through the real flow:
//!
//! ```text
//! connect ─▶ POST /sse/stream-ticket (Bearer) ─▶ GET /sse/stream?deviceId&ticket ─▶ streaming
//!                                   (same keep-alive connection)
//! ```
//! (a server at a URL: the same, with the paths of its route, or the
//! stream alone when it has no tickets).
//! A reconnect reuses the ticket, as EventSource reuses its URL. Streaming
//! bytes are de-chunked when the server chunks them, parsed as SSE by the
//! test kit's parser, and each data/alert event's `seq` and `t_pub_ns` feed
//! the loss/duplicate counters and the latency histogram. Access tokens are
//! minted by the gateway's own minter, through the kit.
//!
//! This file is the client's state and loop (opening, pacing, starting,
//! retrying, failing); [`responses`] is what a socket's events do, from
//! the connect's completion to the stream head.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Interest, Poll, Token};
use sse_testkit::FrameReader;

use crate::hist::Histogram;
use crate::protocol::{Check, Clients, Stats};
pub use crate::tab::now_ns;
use crate::tab::{
    connect_from, errno_name, first_request, source_addr, spreads_sources, Conn, Phase, Slot,
    Target,
};

/// A handshake (connect, ticket, stream head) must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// New handshakes started per loop turn, so events keep being served.
const STARTS_PER_TURN: usize = 256;

mod responses;

pub struct Client {
    index: u32,
    target: Option<Target>,
    clients: Option<Clients>,
    slots: Vec<Slot>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    queue: VecDeque<usize>,
    retry: Vec<(Instant, usize)>,
    inflight: usize,
    concurrency: usize,
    attempts: u32,
    /// Source addresses handed out so far.
    sources: u64,
    stats: Stats,
    hist: Histogram,
    /// Close-to-reopen times of streams resumed after the server closed them.
    resume_hist: Histogram,
    total_dups: u64,
    scratch: Vec<u8>,
    /// What sockets are read into.
    read_buf: Vec<u8>,
    rng: u64,
    /// Sockets whose read loop stopped at its bound with data possibly left:
    /// read again next turn (no new readiness edge will come for it).
    more: Vec<usize>,
    /// The opening's rate, when paced.
    pace: Option<Pace>,
}

/// Opens started at a rate: the first at once, the n-th (from 0) once
/// n / rate seconds have passed.
#[derive(Debug)]
struct Pace {
    per_sec: f64,
    since: Instant,
    started: u64,
}

impl Pace {
    fn allows(&self, now: Instant) -> bool {
        let due = (self.per_sec * now.duration_since(self.since).as_secs_f64()).floor();
        (self.started as f64) <= due
    }
}

impl Client {
    pub fn new(index: u32) -> Client {
        Client {
            index,
            target: None,
            clients: None,
            slots: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            queue: VecDeque::new(),
            retry: Vec::new(),
            inflight: 0,
            concurrency: 1,
            attempts: 1,
            sources: 0,
            stats: Stats::default(),
            hist: Histogram::default(),
            resume_hist: Histogram::default(),
            total_dups: 0,
            scratch: Vec::with_capacity(64 * 1024),
            read_buf: vec![0; 64 * 1024],
            rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(index),
            more: Vec::new(),
            pace: None,
        }
    }

    /// Something is waiting to start (and may start now), or to be read.
    pub fn has_queued(&self) -> bool {
        let may_start = self.pace.as_ref().is_none_or(|p| p.allows(Instant::now()));
        (!self.queue.is_empty() && self.inflight < self.concurrency && may_start)
            || !self.more.is_empty()
    }

    /// Continues the reads that stopped at their bound last turn.
    pub fn read_more(&mut self, poll: &Poll) {
        for key in std::mem::take(&mut self.more) {
            self.read(poll, key);
        }
    }

    pub fn open(
        &mut self,
        target: Target,
        clients: Clients,
        concurrency: usize,
        attempts: u32,
        open_rate: Option<f64>,
    ) -> Result<(), String> {
        if self.clients.is_some() {
            return Err("clients already opened in this worker".into());
        }
        self.target = Some(target);
        for i in clients.first..clients.first + clients.count {
            let mut slot = Slot::new(clients.user(i), clients.device(i));
            slot.resume = clients.resume;
            self.slots.push(slot);
        }
        self.clients = Some(clients);
        self.stats.clients = self.slots.len() as u64;
        self.concurrency = concurrency.max(1);
        self.attempts = attempts.max(1);
        self.queue.extend(0..self.slots.len());
        self.pace = open_rate.filter(|r| *r > 0.0).map(|per_sec| Pace {
            per_sec,
            since: Instant::now(),
            started: 0,
        });
        Ok(())
    }

    /// Reopens every closed client, all at once (a storm: unpaced).
    pub fn reconnect(&mut self, concurrency: usize, attempts: u32) {
        self.pace = None;
        self.concurrency = concurrency.max(1);
        self.attempts = attempts.max(1);
        self.queue.clear();
        self.retry.clear();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.conn.is_none() {
                slot.attempt = 0;
                self.queue.push_back(i);
            }
        }
    }

    /// Closes every connection, as tabs that all go away at once.
    pub fn drop_all(&mut self, poll: &Poll) {
        self.queue.clear();
        self.retry.clear();
        for key in 0..self.conns.len() {
            if let Some(mut conn) = self.conns[key].take() {
                let _ = poll.registry().deregister(&mut conn.sock);
                self.free.push(key);
                if let Some(slot) = self.slots.get_mut(conn.slot) {
                    slot.conn = None;
                    slot.open = false;
                }
            }
        }
        self.inflight = 0;
        self.stats.open_now = 0;
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.pending = (self.queue.len() + self.retry.len() + self.inflight) as u64;
        s.latency = self.hist.sparse();
        s.resume = self.resume_hist.sparse();
        s
    }

    pub fn reset(&mut self) {
        let (clients, open_now) = (self.stats.clients, self.stats.open_now);
        self.stats = Stats {
            clients,
            open_now,
            ..Stats::default()
        };
        self.hist.clear();
        self.resume_hist.clear();
    }

    pub fn check(&self, published: &BTreeMap<String, u64>) -> Check {
        let mut c = Check {
            dups: self.total_dups,
            ..Check::default()
        };
        for slot in &self.slots {
            let p = published.get(&slot.device).copied().unwrap_or(0);
            c.expected += p;
            c.unique += slot.unique.min(p);
            c.lost += p.saturating_sub(slot.unique);
        }
        c
    }

    // ----- the loop's work ---------------------------------------------------

    /// Starts queued handshakes and due retries; fails handshakes that are late.
    pub fn tick(&mut self, poll: &Poll) {
        let now = Instant::now();
        if !self.retry.is_empty() {
            let mut due = Vec::new();
            self.retry.retain(|(at, slot)| {
                if *at <= now {
                    due.push(*slot);
                    false
                } else {
                    true
                }
            });
            self.queue.extend(due);
        }
        let mut started = 0;
        while self.inflight < self.concurrency && started < STARTS_PER_TURN {
            if self.pace.as_ref().is_some_and(|p| !p.allows(now)) {
                break;
            }
            let Some(slot) = self.queue.pop_front() else {
                break;
            };
            started += 1;
            if let Some(p) = self.pace.as_mut() {
                p.started += 1;
            }
            self.start(poll, slot);
        }
    }

    pub fn expire(&mut self, poll: &Poll) {
        let now = Instant::now();
        let late: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(k, c)| {
                c.as_ref()
                    .filter(|c| c.phase != Phase::Streaming && c.deadline <= now)
                    .map(|_| k)
            })
            .collect();
        for key in late {
            self.fail(poll, key, "timeout");
        }
    }

    /// The next stream's source address: the route's given ones in turn,
    /// else one of its own in 127.0.0.0/8 for a loopback server (see
    /// [`source_addr`]); None: the kernel's choice.
    fn source(&mut self) -> Option<SocketAddr> {
        let target = self.target.as_ref()?;
        let k = self.sources;
        let given = target.route.as_ref().map_or(&[][..], |r| &r.sources[..]);
        let src = match given.len() {
            0 if spreads_sources(&target.addr) => source_addr(self.index, k),
            0 => return None,
            n => SocketAddr::new(given[(k % n as u64) as usize], 0),
        };
        self.sources += 1;
        Some(src)
    }

    fn start(&mut self, poll: &Poll, slot_idx: usize) {
        let Some(target) = self.target.as_ref() else {
            return;
        };
        let addr = target.addr;
        let tls = target
            .tls
            .as_ref()
            .map(|config| crate::tls::connection(config, &target.host).map(Box::new))
            .transpose();
        let (request, tls) = match (self.first_request(slot_idx), tls) {
            (Ok(r), Ok(tls)) => (r, tls),
            (Err(e), _) | (_, Err(e)) => {
                *self.stats.errors.entry(e).or_default() += 1;
                self.stats.failed += 1;
                return;
            }
        };
        let src = self.source();
        let sock = match connect_from(src, addr) {
            Ok(s) => s,
            Err(e) => {
                self.note_error(&format!("socket_{}", errno_name(&e)));
                self.retry_or_fail(slot_idx);
                return;
            }
        };
        let key = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let mut conn = Conn {
            sock,
            tls,
            slot: slot_idx,
            phase: Phase::Connecting,
            out: request,
            out_pos: 0,
            input: Vec::new(),
            chunked: None,
            sse: FrameReader::default(),
            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
        };
        if let Err(e) = poll.registry().register(
            &mut conn.sock,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(key);
            self.note_error(&format!("register_{}", errno_name(&e)));
            self.retry_or_fail(slot_idx);
            return;
        }
        self.conns[key] = Some(conn);
        self.slots[slot_idx].conn = Some(key);
        self.inflight += 1;
    }

    /// The ticket request, or the stream request when a ticket is at hand.
    fn first_request(&mut self, slot_idx: usize) -> Result<Vec<u8>, String> {
        let Some(target) = self.target.as_ref() else {
            return Err("no_target".into());
        };
        let kind = self.clients.as_ref().map(|c| c.kind);
        first_request(target, kind, &mut self.slots[slot_idx])
    }

    fn note_error(&mut self, kind: &str) {
        *self.stats.errors.entry(kind.to_owned()).or_default() += 1;
    }

    fn retry_or_fail(&mut self, slot_idx: usize) {
        let slot = &mut self.slots[slot_idx];
        slot.attempt += 1;
        if slot.attempt < self.attempts {
            // 100 ms doubling to 1.6 s, with jitter, as a browser would back off.
            let base = 100u64 << slot.attempt.min(4);
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let wait = base / 2 + self.rng % (base / 2 + 1);
            self.retry
                .push((Instant::now() + Duration::from_millis(wait), slot_idx));
        } else {
            self.stats.failed += 1;
        }
    }

    /// Ends a handshake or stream with error `kind`, retrying handshakes.
    fn fail(&mut self, poll: &Poll, key: usize, kind: &str) {
        let Some(mut conn) = self.conns.get_mut(key).and_then(Option::take) else {
            return;
        };
        let _ = poll.registry().deregister(&mut conn.sock);
        self.free.push(key);
        let slot_idx = conn.slot;
        if let Some(slot) = self.slots.get_mut(slot_idx) {
            slot.conn = None;
        }
        if conn.phase == Phase::Streaming {
            self.stats.open_now = self.stats.open_now.saturating_sub(1);
            self.stats.closed_by_server += 1;
            if let Some(slot) = self.slots.get_mut(slot_idx) {
                slot.open = false;
                if slot.resume {
                    // As EventSource: wait the server's `retry:`, then reopen
                    // with the last event id.
                    let now = Instant::now();
                    slot.closed_at = Some(now);
                    slot.attempt = 0;
                    let at = now + Duration::from_millis(slot.retry_ms);
                    self.retry.push((at, slot_idx));
                }
            }
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        self.note_error(kind);
        self.retry_or_fail(slot_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_opening_starts_one_at_once_then_the_rate() {
        let since = Instant::now();
        let mut pace = Pace {
            per_sec: 10.0,
            since,
            started: 0,
        };
        assert!(pace.allows(since));
        pace.started = 1;
        assert!(!pace.allows(since));
        assert!(!pace.allows(since + Duration::from_millis(99)));
        assert!(pace.allows(since + Duration::from_millis(100)));
        pace.started = 10;
        assert!(!pace.allows(since + Duration::from_millis(999)));
        assert!(pace.allows(since + Duration::from_secs(1)));
    }
}
