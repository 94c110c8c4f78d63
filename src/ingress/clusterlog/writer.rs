//! The log's writer: one thread per instance that keeps what the subscriber
//! heard ([`Heard`]) and, while this instance holds the leader lease, writes
//! it to the log.
//!
//! The lease is `SET sse:{log}:leader <instance> NX PX 1000`, renewed every
//! 200 ms, so a killed leader is replaced within about 1.2 s. Writes are a
//! script that appends only while the lease is the writer's own: a leader
//! that stalled past its lease can never write after its successor.
//!
//! A leader that just took the lease, or whose write failed (the connection
//! died: was the write applied or not?), first syncs: it reads the log's
//! newest entries, finds them in what it heard and writes from there. When
//! the tail is not found (this instance heard nothing of it, or lost its own
//! Pub/Sub connection since), it writes a gap marker first: every stream gets
//! `replay-gap` at the point where ingest may have been missed.
//!
//! A log that lost entries this instance's reader had read (a Redis
//! restarted without persistence, a failover to a replica that lagged) does
//! not tell what was written any more; what the reader read last does
//! ([`Delivered`]): the leader writes only what was heard after it. Those
//! events reached the streams from the old log; writing them again would
//! hand them out twice under new ids.
//!
//! At shutdown the leader gives the lease up, so another instance takes over
//! within a tick instead of a lease's lifetime.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use redis::Value;

use super::cursor::{Delivered, TAIL};
use super::heard::{self, Alignment, Heard, Mark};
use super::reader::{entries, field};
use super::script::{self, Entry};
use super::{Input, Outlet, EVENTS_KEY};
use crate::ingress::Hub;
use crate::store::connect::{Deployment, Link};
use crate::stream::frame::{self, Event, EventId, Message, CHANNELS};
use crate::time::epoch_ms;

/// How long the leader lease lives without renewal.
pub const LEASE_MS: u64 = 1000;
/// How often the lease is renewed, or tried for by a standby.
const TICK: Duration = Duration::from_millis(200);
/// How long this instance must have heard Pub/Sub without a break before
/// it may write a gap marker as leader: longer than a lease lives plus a
/// tick, so what it heard reaches back past whatever the last leader had not
/// written yet. A younger instance that takes the lease and does not find
/// the log's tail in what it heard gives the lease back at once, for an
/// older instance (which heard more) to take: a replacement started in a
/// rolling restart never writes a needless gap marker. A cluster starting
/// cold (an empty log) needs no waiting.
const COVER: Duration = Duration::from_millis(1500);
/// Entries written per script call at most.
const BATCH: usize = 512;
/// The leader appends at most once per this long: what is heard within a
/// moment of the last append waits for the rest of it and goes in one script
/// call, so a steady flow costs Redis (and every log reader) one call per
/// window instead of one per event. A message heard after a quiet moment is
/// appended at once.
const APPEND_EVERY: Duration = Duration::from_millis(1);

enum Role {
    Standby,
    /// Holds the lease; `next` is the index in [`Heard`] of the next mark to
    /// write, once synced.
    Leading {
        synced: bool,
        next: u64,
        gap_first: bool,
    },
    /// Shutting down: never leads again.
    Resigned,
}

pub struct Writer {
    redis: Arc<Deployment>,
    hub: Arc<Hub>,
    inputs: Outlet,
    me: String,
    link: Option<Link>,
    heard: Heard,
    role: Role,
    released: Vec<Message>,
    /// `MAXLEN` and the age bound (ms) of the log.
    bounds: (usize, u64),
    failing: bool,
    /// When this instance last appended to the log (see [`APPEND_EVERY`]).
    last_append: Option<Instant>,
    /// When the log was last trimmed by age (once a second is enough).
    trimmed: Option<Instant>,
    /// Since when Pub/Sub was heard without a break (None: not subscribed).
    covered_since: Option<Instant>,
    /// Gave the lease back for being too young at this time: wait [`COVER`]
    /// before trying again.
    hold_off: Option<Instant>,
    /// What this instance's reader read last.
    delivered: Arc<Delivered>,
}

/// Starts the writer thread.
pub fn start(
    redis: Arc<Deployment>,
    hub: Arc<Hub>,
    inputs: Outlet,
    bounds: (usize, u64),
    delivered: Arc<Delivered>,
) -> std::io::Result<thread::JoinHandle<()>> {
    let writer = Writer {
        redis,
        hub,
        inputs,
        me: uuid::Uuid::new_v4().simple().to_string(),
        link: None,
        heard: Heard::default(),
        role: Role::Standby,
        released: Vec::new(),
        bounds,
        failing: false,
        last_append: None,
        trimmed: None,
        covered_since: None,
        hold_off: None,
        delivered,
    };
    thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || writer.run())
}

impl Writer {
    fn run(mut self) {
        self.hub.metrics().cluster_log.store(1, Relaxed);
        let mut last_tick: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let resigning = self.hub.draining() && !matches!(self.role, Role::Resigned);
            if resigning || last_tick.is_none_or(|t| now.duration_since(t) >= TICK) {
                last_tick = Some(now);
                self.tick();
            }
            match self.inputs.next(Some(Duration::from_millis(50))) {
                Ok(input) => self.take(input),
                Err(false) => {}
                Err(true) => return,
            }
            for _ in 0..BATCH * 8 {
                match self.inputs.next(None) {
                    Ok(input) => self.take(input),
                    Err(_) => break,
                }
            }
            if let Some(at) = self.last_append.map(|t| t + APPEND_EVERY) {
                while let Some(wait) = at.checked_duration_since(Instant::now()) {
                    match self.inputs.next(Some(wait)) {
                        Ok(input) => self.take(input),
                        Err(false) => break,
                        Err(true) => return,
                    }
                }
            }
            self.write();
            let keep_from = match self.role {
                Role::Leading { next, synced, .. } => Some(if synced { next } else { 0 }),
                _ => None,
            };
            self.heard.trim(now, keep_from);
        }
    }

    fn take(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Heard { channel, payload } => {
                let hash = heard::hash(channel, &payload);
                self.heard.push(
                    now,
                    Mark::Message {
                        channel,
                        payload: Some(payload.into_boxed_slice()),
                        hash,
                    },
                );
            }
            Input::Break => {
                self.covered_since = None;
                self.heard.push(now, Mark::Break);
            }
            Input::Subscribed => {
                self.covered_since.get_or_insert(now);
            }
            Input::Released(msg) => {
                if let Role::Leading { .. } = self.role {
                    self.released.push(msg);
                }
            }
        }
    }

    fn link(&mut self) -> redis::RedisResult<&mut Link> {
        match self.link {
            Some(ref mut link) => Ok(link),
            None => Ok(self.link.insert(self.redis.link()?)),
        }
    }

    /// Keeps the lease (or tries for it), and gives it up at shutdown.
    fn tick(&mut self) {
        let me = self.me.clone();
        let draining = self.hub.draining();
        let result = match self.role {
            Role::Resigned => return,
            _ if draining => {
                let was = matches!(self.role, Role::Leading { .. });
                self.role = Role::Resigned;
                if was {
                    self.resign();
                    info!("cluster log: leader lease handed over (shutting down)");
                }
                self.hub.log_resigned();
                return;
            }
            Role::Standby if self.hold_off.is_some_and(|t| t.elapsed() < COVER) => return,
            Role::Standby => self.link().and_then(|l| script::acquire(l, &me, LEASE_MS)),
            Role::Leading { .. } => self.link().and_then(|l| script::renew(l, &me, LEASE_MS)),
        };
        match (result, &self.role) {
            (Ok(true), Role::Standby) => {
                info!("cluster log: this instance leads (writes ingest to the log)");
                self.role = Role::Leading {
                    synced: false,
                    next: 0,
                    gap_first: false,
                };
                self.set_leader(true);
            }
            (Ok(false), Role::Leading { .. }) => {
                warn!("cluster log: the leader lease was lost to another instance");
                self.role = Role::Standby;
                self.released.clear();
                self.set_leader(false);
            }
            (Ok(_), _) => self.failing = false,
            (Err(e), _) => self.failed(&e),
        }
    }

    /// Gives the lease up (if it is still this instance's).
    fn resign(&mut self) {
        self.set_leader(false);
        let me = self.me.clone();
        let _ = self.link().and_then(|l| script::resign(l, &me));
    }

    fn set_leader(&self, leading: bool) {
        self.hub
            .metrics()
            .cluster_leader
            .store(u64::from(leading), Relaxed);
    }

    fn failed(&mut self, e: &redis::RedisError) {
        if !self.failing {
            warn!("cluster log writer: redis: {e}");
        }
        self.failing = true;
        self.link = None;
        if let Role::Leading { synced, .. } = &mut self.role {
            // Was the last write applied? The next sync will tell.
            *synced = false;
        }
    }

    /// While leading: syncs if needed, then writes what was heard since.
    fn write(&mut self) {
        let Role::Leading { synced, .. } = self.role else {
            return;
        };
        if !synced {
            if let Err(e) = self.sync() {
                self.failed(&e);
                return;
            }
        }
        loop {
            let Role::Leading {
                next, gap_first, ..
            } = self.role
            else {
                return;
            };
            let (entries, upto) = self.entries(next, gap_first);
            if entries.is_empty() {
                self.set_next(upto, false);
                return;
            }
            match self.append(&entries) {
                Ok(()) => {
                    self.last_append = Some(Instant::now());
                    self.heard.forget(next, upto);
                    let gaps = entries.iter().filter(|e| e.is_gap()).count();
                    self.hub
                        .metrics()
                        .log_gaps_written
                        .fetch_add(gaps as u64, Relaxed);
                    self.set_next(upto, false);
                    self.failing = false;
                }
                Err(e) if e.code() == Some("NOTLEADER") => {
                    warn!("cluster log: a write was refused, the lease is another instance's");
                    self.role = Role::Standby;
                    self.released.clear();
                    self.set_leader(false);
                    return;
                }
                Err(e) => {
                    self.failed(&e);
                    return;
                }
            }
            if upto >= self.heard.end() && self.released.is_empty() {
                return;
            }
        }
    }

    fn set_next(&mut self, upto: u64, gap: bool) {
        if let Role::Leading {
            next, gap_first, ..
        } = &mut self.role
        {
            *next = upto;
            *gap_first = gap;
        }
    }

    /// Finds the log's tail in what was heard: where writing resumes.
    fn sync(&mut self) -> redis::RedisResult<()> {
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(EVENTS_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(TAIL)
            .query(self.link()?.con())?;
        let newest_first = entries(reply);
        let log_newest = newest_first
            .first()
            .and_then(|(id, _)| EventId::parse(std::str::from_utf8(id).ok()?))
            .unwrap_or_default();
        let tail: Vec<u64> = newest_first
            .iter()
            .filter_map(|(_, fields)| field(fields, b"h"))
            .filter_map(|h| std::str::from_utf8(h).ok()?.parse().ok())
            .filter(|h| *h != 0)
            .collect();
        let rate_limited = self.hub.rate_limited();
        let max = self.hub.max_event_bytes();
        let skipped = |mark: &Mark| match mark {
            Mark::Message {
                channel, payload, ..
            } => {
                let name = CHANNELS[usize::from(*channel) % CHANNELS.len()];
                // A payload already written or forgotten cannot be checked:
                // assume it may lie between two entries.
                payload.as_ref().is_none_or(|p| {
                    p.len() > max
                        || (rate_limited
                            && Event::from_channel(name) == Some(Event::RealtimeUpdate))
                        || frame::message(name, p, 0).is_err()
                })
            }
            Mark::Break => false,
        };
        let (read_newest, read_tail) = self.delivered.snapshot();
        let logged = self.heard.align(&tail, skipped);
        let alignment = if read_newest > log_newest {
            // The log lost entries the reader had read: those are the
            // newest evidence of what was written.
            match (self.heard.align(&read_tail, skipped), logged) {
                (Alignment::After(read), Alignment::After(log)) => Alignment::After(read.max(log)),
                (Alignment::After(read), _) => {
                    info!("cluster log: the log lost entries read here (its newest id {log_newest} is below {read_newest}); writing what was heard after them");
                    Alignment::After(read)
                }
                _ => logged,
            }
        } else {
            logged
        };
        let (next, gap) = match alignment {
            Alignment::After(i) => (i + 1, false),
            Alignment::EmptyLog => match self.heard.after_last_break() {
                Some(after) => (after, true),
                None => (self.heard.first(), false),
            },
            Alignment::NotFound => (
                self.heard.after_last_break().unwrap_or(self.heard.first()),
                true,
            ),
        };
        let young = self.covered_since.is_none_or(|t| t.elapsed() < COVER);
        if gap && young {
            // An older instance may have heard what this one did not.
            info!("cluster log: the log's tail was not heard here yet; leaving the lead to an older instance");
            self.hold_off = Some(Instant::now());
            self.resign();
            self.role = Role::Standby;
            return Ok(());
        }
        if gap {
            warn!(
                "cluster log: what the last leader wrote was not heard here; writing a gap marker"
            );
        }
        if let Role::Leading { synced, .. } = &mut self.role {
            *synced = true;
        }
        self.set_next(next, gap);
        Ok(())
    }

    /// The entries to append from index `from` on, and the index after the
    /// last mark they cover.
    fn entries(&mut self, from: u64, gap_first: bool) -> (Vec<Entry>, u64) {
        let mut out = Vec::new();
        if gap_first {
            out.push(Entry::gap());
        }
        let mut upto = from.max(self.heard.first());
        let hub = &self.hub;
        for (i, mark) in self.heard.since(from).take(BATCH) {
            upto = i + 1;
            match mark {
                // Not heard here, or forgotten: a hole to mark (once).
                Mark::Break | Mark::Message { payload: None, .. } => {
                    if out.last().is_none_or(|e: &Entry| !e.is_gap()) {
                        out.push(Entry::gap());
                    }
                }
                Mark::Message {
                    channel,
                    payload: Some(payload),
                    hash,
                } => {
                    let name = CHANNELS[usize::from(*channel) % CHANNELS.len()];
                    // Bad messages are counted inside and never written.
                    if let Ok(Some(msg)) = hub.admit(name, payload) {
                        out.push(Entry::of(msg, *hash));
                    }
                }
            }
        }
        let room = BATCH.saturating_sub(out.len());
        let released = self.released.len().min(room);
        out.extend(self.released.drain(..released).map(|m| Entry::of(m, 0)));
        (out, upto)
    }

    fn append(&mut self, entries: &[Entry]) -> redis::RedisResult<()> {
        let (maxlen, age_ms) = self.bounds;
        let trim = self
            .trimmed
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let minid = trim.then(|| epoch_ms().saturating_sub(age_ms));
        let me = self.me.clone();
        script::append(self.link()?, &me, maxlen, minid, entries)?;
        if trim {
            self.trimmed = Some(Instant::now());
        }
        Ok(())
    }
}
