//! Redis, the distributed engine under the gateway, spoken through blocking
//! threads so no reactor ever waits on it:
//!
//! - one subscriber thread holds a Pub/Sub connection on the contract's
//!   channels and feeds every message to the [`Hub`]; when Redis goes away it
//!   tells every stream `degraded`, reconnects with capped exponential backoff
//!   and jitter, resubscribes and tells them `recovered`;
//! - a small pool of worker threads runs request-time lookups ([`Job`]s) and
//!   sends each [`Outcome`] back to the asking reactor's mailbox. The job queue
//!   is bounded: past it a request gets 503 rather than unbounded memory.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{info, warn};
use rand::Rng;

use crate::bus::lease::{self, LeaseAnswer};
use crate::bus::store::{
    device_id, devices_key, mints_key, status_key, ticket_key, Job, Outcome, Reply, StreamFacts,
    ACCESS_CHANGED_CHANNEL, MINT_WINDOW_MS, REVOKE_CHANNEL,
};
use crate::bus::{Hub, RedisState};
use crate::reactor::mailbox::{Inbox, Mailboxes};
use crate::stream::frame::{Frame, CHANNELS};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longer than the reactors' 2 s lookup deadline, so that a lookup Redis
/// answers late still comes back (and a lease it took is given back)
/// instead of dying with its connection while Redis runs it anyway.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const QUEUE_BOUND: usize = 16_384;
const WORKERS: usize = 4;

/// The lease script, hashed once; `invoke` runs it by EVALSHA.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(lease::ACQUIRE));

/// The mint-limit script: a sliding window of one minute per user, in one
/// sorted set (one key, so one hash slot). Returns the count after adding,
/// or `-ms` (the wait until the oldest mint leaves the window) when full.
const MINT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[4])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return -math.max(1, oldest[2] + ARGV[4] - ARGV[1])
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"#;
static MINTS: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(MINT));

pub struct RedisPool {
    jobs: Sender<(Job, Option<Reply>)>,
    /// Jobs nobody waits for (lease releases): never refused for a full
    /// queue, since a lost release would hold a user's slot on every other
    /// instance until the lease expires. Bounded by the streams that close.
    fired: Sender<Job>,
    /// Jobs submitted and not finished yet (queued or running).
    pending: Arc<AtomicUsize>,
}

impl RedisPool {
    pub fn start(client: redis::Client, mailboxes: Mailboxes) -> RedisPool {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_BOUND);
        let (fired, fired_rx) = crossbeam_channel::unbounded();
        let pending = Arc::new(AtomicUsize::new(0));
        for n in 0..WORKERS {
            let (client, mailboxes) = (client.clone(), mailboxes.clone());
            let queues = (rx.clone(), fired_rx.clone());
            let pending = pending.clone();
            let spawned = thread::Builder::new()
                .name(format!("redis-worker-{n}"))
                .spawn(move || worker(client, queues, mailboxes, &pending));
            if let Err(e) = spawned {
                warn!("could not start redis worker: {e}");
            }
        }
        RedisPool {
            jobs: tx,
            fired,
            pending,
        }
    }

    /// Queues `job`; its outcome goes to `reply`. Some(Unavailable) at once
    /// when the queue is full.
    pub fn submit(&self, job: Job, reply: Reply) -> Option<Outcome> {
        self.pending.fetch_add(1, SeqCst);
        match self.jobs.try_send((job, Some(reply))) {
            Ok(()) => None,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, SeqCst);
                Some(Outcome::Unavailable)
            }
        }
    }

    /// Queues `job` for its effect only.
    pub fn fire(&self, job: Job) {
        self.pending.fetch_add(1, SeqCst);
        if self.fired.send(job).is_err() {
            self.pending.fetch_sub(1, SeqCst);
        }
    }

    /// Waits (at most `limit`) until every submitted job has run: on exit,
    /// so the lease releases of the last closed streams reach Redis instead
    /// of holding those users' slots until the leases expire.
    pub fn finish(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.pending.load(SeqCst) > 0 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Runs `job` on the worker's connection. A connection that died while it
/// sat idle (Redis restarted, a proxy dropped it) fails on first use: the
/// job then runs once more on a fresh connection, so the first request
/// after an outage does not fail. Safe for every job: each is idempotent,
/// or (PUBLISH) was never delivered by a connection that was already dead.
fn run_once_more(
    client: &redis::Client,
    con: &mut Option<redis::Connection>,
    job: &Job,
) -> Outcome {
    let reused = con.is_some();
    let result = match attempt(client, con, job) {
        Err(e) if reused && !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error()) => {
            attempt(client, con, job)
        }
        other => other,
    };
    result.unwrap_or_else(|e| {
        warn!("redis lookup failed: {e}");
        Outcome::Unavailable
    })
}

fn attempt(
    client: &redis::Client,
    con: &mut Option<redis::Connection>,
    job: &Job,
) -> redis::RedisResult<Outcome> {
    let c = match con {
        Some(c) => c,
        None => con.insert(connect(client)?),
    };
    let result = run(c, job);
    if result.is_err() {
        *con = None;
    }
    result
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

type Queues = (Receiver<(Job, Option<Reply>)>, Receiver<Job>);

fn worker(client: redis::Client, queues: Queues, mailboxes: Mailboxes, pending: &AtomicUsize) {
    let (jobs, fired) = queues;
    let mut con: Option<redis::Connection> = None;
    loop {
        let (job, reply) = crossbeam_channel::select! {
            recv(fired) -> job => match job {
                Ok(job) => (job, None),
                Err(_) => return,
            },
            recv(jobs) -> job => match job {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let outcome = run_once_more(&client, &mut con, &job);
        if let (Outcome::Unavailable, None) = (&outcome, &reply) {
            warn!("redis job nobody waits for was lost (Redis unavailable)");
        }
        pending.fetch_sub(1, SeqCst);
        let Some(reply) = reply else { continue };
        if let Some(mailbox) = mailboxes.get(reply.reactor) {
            mailbox.send(Inbox::Outcome {
                conn: reply.conn,
                serial: reply.serial,
                outcome,
            });
        }
    }
}

/// One job, one round trip (pipelined where it needs several commands).
fn run(con: &mut redis::Connection, job: &Job) -> redis::RedisResult<Outcome> {
    Ok(match job {
        Job::PutTicket {
            id,
            user,
            ttl_secs,
            per_minute,
        } => {
            let now = crate::time::epoch_ms();
            let count: i64 = MINTS
                .key(mints_key(user))
                .arg(now)
                .arg(id)
                .arg(per_minute)
                .arg(MINT_WINDOW_MS)
                .invoke(con)?;
            if count < 0 {
                return Ok(Outcome::TooManyTickets {
                    retry_after_secs: count.unsigned_abs().div_ceil(1000).max(1),
                });
            }
            redis::cmd("SET")
                .arg(ticket_key(id))
                .arg(&*user.key)
                .arg("EX")
                .arg(ttl_secs)
                .query::<()>(con)?;
            Outcome::TicketStored
        }
        Job::Owned { user } => {
            let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS").arg(devices_key(user)).query(con)?;
            Outcome::Owned(members.into_iter().filter_map(device_id).collect())
        }
        Job::DeleteTicket { id, user } => {
            let key = ticket_key(id);
            let owner: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(con)?;
            match owner {
                None => Outcome::NotFound,
                Some(o) if o != user.key.as_bytes() => Outcome::NotOwner,
                Some(_) => {
                    // Gone from Redis, then every instance closes the
                    // streams opened with it (contract 7.2).
                    let (n, _): (u64, u64) = redis::pipe()
                        .atomic()
                        .cmd("DEL")
                        .arg(&key)
                        .cmd("PUBLISH")
                        .arg(REVOKE_CHANNEL)
                        .arg(id)
                        .query(con)?;
                    if n == 0 {
                        Outcome::NotFound
                    } else {
                        Outcome::Deleted
                    }
                }
            }
        }
        Job::TicketAlive { id } => {
            let n: u64 = redis::cmd("EXISTS").arg(ticket_key(id)).query(con)?;
            Outcome::TicketAlive(n == 1)
        }
        Job::StreamFacts {
            ticket_id,
            user,
            check,
            status_of,
            lease,
        } => {
            let mut pipe = redis::pipe();
            pipe.cmd("EXISTS").arg(ticket_key(ticket_id));
            match check {
                Some(devices) if !devices.is_empty() => {
                    pipe.cmd("SMISMEMBER").arg(devices_key(user)).arg(devices);
                }
                Some(_) => {
                    pipe.cmd("PING");
                }
                None => {
                    pipe.cmd("SMEMBERS").arg(devices_key(user));
                }
            }
            if !status_of.is_empty() {
                pipe.cmd("MGET")
                    .arg(status_of.iter().map(|d| status_key(d)).collect::<Vec<_>>());
            }
            let mut values: Vec<redis::Value> = pipe.query(con)?;
            let mut facts = StreamFacts::default();
            let statuses = if status_of.is_empty() {
                None
            } else {
                values.pop()
            };
            let membership = values.pop();
            let exists = values.pop();
            facts.ticket_alive = matches!(exists, Some(redis::Value::Int(1)));
            match (&check, membership) {
                (Some(devices), Some(v)) if !devices.is_empty() => {
                    facts.owned = redis::from_redis_value::<Vec<bool>>(v)?;
                }
                // Members that are not UTF-8 name no device a stream could
                // ask for: skipped, never an error for the user's streams.
                (None, Some(v)) => {
                    facts.owned_set = redis::from_redis_value::<Vec<Vec<u8>>>(v)?
                        .into_iter()
                        .filter_map(device_id)
                        .map(String::from)
                        .collect()
                }
                _ => {}
            }
            if let Some(v) = statuses {
                // A status that is not UTF-8 is sent as what it can be.
                facts.statuses = redis::from_redis_value::<Vec<Option<Vec<u8>>>>(v)?
                    .into_iter()
                    .map(|s| s.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect();
            }
            let checks_pass = facts.ticket_alive && facts.owned.iter().all(|o| *o);
            if let (Some(ask), true) = (lease, checks_pass) {
                let now = crate::time::epoch_ms();
                let answer: i64 = ACQUIRE
                    .key(&ask.key)
                    .arg(now)
                    .arg(now + ask.ttl_ms)
                    .arg(&ask.member)
                    .arg(&ask.prefix)
                    .arg(ask.limit)
                    .arg(ask.ttl_ms)
                    .invoke(con)?;
                facts.lease = LeaseAnswer::from_script(answer);
                facts.lease_ask = Some(ask.clone());
            }
            Outcome::Facts(facts)
        }
        Job::ReleaseLease { key, member } => {
            redis::cmd("ZREM").arg(key).arg(member).query::<u64>(con)?;
            Outcome::Published
        }
        Job::Publish { channel, payload } => {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query::<u64>(con)?;
            Outcome::Published
        }
    })
}

/// Starts the subscriber thread.
pub fn subscribe(client: redis::Client, hub: Arc<Hub>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("redis-subscriber".into())
        .spawn(move || subscriber(client, hub))
}

/// Where the subscriber stands in an outage.
#[derive(Default)]
struct Outage {
    /// Streams were told `degraded` and not yet `recovered`.
    degraded: bool,
    /// Failed connects since the last good one: the backoff's exponent.
    failures: u32,
}

fn subscriber(client: redis::Client, hub: Arc<Hub>) {
    let mut outage = Outage::default();
    loop {
        match listen(&client, &hub, &mut outage) {
            Ok(()) => return,
            Err(e) => {
                if hub.redis_state() != RedisState::Down {
                    warn!("redis subscriber lost Redis: {e}");
                }
                hub.set_redis_state(RedisState::Down);
                if !outage.degraded {
                    outage.degraded = true;
                    hub.broadcast_system(Frame::system(r#"{"kind":"degraded"}"#));
                }
                outage.failures = outage.failures.saturating_add(1);
                thread::sleep(backoff(outage.failures));
            }
        }
    }
}

/// Capped exponential backoff with jitter: a random wait between half and
/// all of 100 ms doubling per failure, capped at 5 s.
pub fn backoff(failures: u32) -> Duration {
    let cap_ms = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 2..=cap_ms))
}

fn listen(client: &redis::Client, hub: &Hub, outage: &mut Outage) -> redis::RedisResult<()> {
    let mut con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    // Access changes need a set read, which a subscribed connection cannot do.
    let mut reads: Option<redis::Connection> = None;
    let mut pubsub = con.as_pubsub();
    pubsub.subscribe(&CHANNELS[..])?;
    pubsub.subscribe(&[REVOKE_CHANNEL, ACCESS_CHANGED_CHANNEL][..])?;
    // A silent network can leave a read blocked forever: wake up now and then
    // and prove the connection with a PING.
    pubsub.set_read_timeout(Some(Duration::from_secs(15)))?;
    if hub.redis_state() != RedisState::Up {
        info!(
            "redis subscriber connected, channels: {}",
            CHANNELS.join(", ")
        );
    }
    hub.set_redis_state(RedisState::Up);
    // The next outage starts its backoff from the beginning again.
    outage.failures = 0;
    if outage.degraded {
        outage.degraded = false;
        hub.metrics()
            .redis_reconnects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        hub.broadcast_system(Frame::system(r#"{"kind":"recovered"}"#));
    }
    loop {
        match pubsub.get_message() {
            Ok(msg) => match msg.get_channel_name() {
                REVOKE_CHANNEL => revoke(hub, msg.get_payload_bytes()),
                ACCESS_CHANGED_CHANNEL => {
                    access_changed(client, &mut reads, hub, msg.get_payload_bytes())
                }
                // Bad messages are counted inside and never stop the loop.
                channel => {
                    let _ = hub.publish(channel, msg.get_payload_bytes());
                }
            },
            Err(e) if e.is_timeout() => {
                pubsub.ping::<redis::Value>()?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `PUBLISH sse:revoke <ticket id>`: every stream opened with it ends.
fn revoke(hub: &Hub, payload: &[u8]) {
    match std::str::from_utf8(payload)
        .ok()
        .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
    {
        Some(ticket) => hub.revoke(ticket),
        None => warn!("ignored a {REVOKE_CHANNEL} message that is not a ticket id"),
    }
}

/// `PUBLISH sse:access-changed <user id>`: read the user's devices again
/// and let every reactor apply them.
fn access_changed(
    client: &redis::Client,
    reads: &mut Option<redis::Connection>,
    hub: &Hub,
    payload: &[u8],
) {
    let user = std::str::from_utf8(payload)
        .ok()
        .map(str::trim)
        .filter(|u| !u.is_empty() && u.len() <= crate::auth::MAX_USER_ID_BYTES);
    let Some(user) = user.map(crate::auth::UserId::named) else {
        warn!("ignored a {ACCESS_CHANGED_CHANNEL} message that is not a user id");
        return;
    };
    match run_once_more(client, reads, &Job::Owned { user: user.clone() }) {
        Outcome::Owned(owned) => hub.access_changed(&user, owned),
        _ => warn!("could not read the devices of user {user} after an access change"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_five_seconds() {
        for (failures, lo, hi) in [
            (1, 100, 200),
            (2, 200, 400),
            (5, 1600, 3200),
            (6, 2500, 5000),
            (60, 2500, 5000),
        ] {
            for _ in 0..50 {
                let d = backoff(failures).as_millis() as u64;
                assert!((lo..=hi).contains(&d), "{failures}: {d}");
            }
        }
    }
}
