//! The Redis store: a small pool of blocking worker threads that run
//! request-time lookups ([`Job`]s) so no reactor ever waits on Redis, and
//! hand each [`Outcome`] to the [`Completions`] sink start-up wired (the
//! asking reactor's mailbox). The job queue is bounded: past it a request
//! gets 503 rather than unbounded memory; jobs nobody waits for (lease
//! releases) have a queue of their own that never refuses one.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::warn;
use redis::Value;

use super::connect::{worth_a_fresh_link, Deployment, Link};
use super::lease::{self, LeaseAnswer};
use super::protocol::{
    device_id, devices_key, mints_key, status_key, ticket_key, Job, Outcome, Reply, StreamFacts,
    MINT_WINDOW_MS, REVOKE_CHANNEL,
};
use super::Completions;

const QUEUE_BOUND: usize = 16_384;
const WORKERS: usize = 4;

/// The lease scripts, hashed once; run by EVALSHA.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(lease::ACQUIRE));
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(lease::RELEASE));

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
    pub fn start(redis: Arc<Deployment>, completions: Completions) -> RedisPool {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_BOUND);
        let (fired, fired_rx) = crossbeam_channel::unbounded();
        let pending = Arc::new(AtomicUsize::new(0));
        for n in 0..WORKERS {
            let (redis, completions) = (redis.clone(), completions.clone());
            let queues = (rx.clone(), fired_rx.clone());
            let pending = pending.clone();
            let spawned = thread::Builder::new()
                .name(format!("redis-worker-{n}"))
                .spawn(move || worker(&redis, queues, &completions, &pending));
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
/// sat idle (Redis restarted, a proxy dropped it, a Sentinel failover killed
/// or demoted its master, a Cluster moved slots under it) fails on first
/// use: the job then runs once more on a fresh connection (to the new
/// master), so the first request after an outage does not fail. Safe for
/// every job: each is idempotent, or (PUBLISH) was never delivered by a
/// connection that was already dead.
pub fn run_once_more(redis: &Deployment, con: &mut Option<Link>, job: &Job) -> Outcome {
    let reused = con.is_some();
    let result = match attempt(redis, con, job) {
        Err(e) if reused && worth_a_fresh_link(&e) => attempt(redis, con, job),
        other => other,
    };
    result.unwrap_or_else(|e| {
        warn!("redis lookup failed: {e}");
        Outcome::Unavailable
    })
}

fn attempt(redis: &Deployment, con: &mut Option<Link>, job: &Job) -> redis::RedisResult<Outcome> {
    let c = match con {
        Some(c) => c,
        None => con.insert(redis.link()?),
    };
    let result = run(c, job);
    if result.is_err() {
        *con = None;
    }
    result
}

type Queues = (Receiver<(Job, Option<Reply>)>, Receiver<Job>);

fn worker(redis: &Deployment, queues: Queues, completions: &Completions, pending: &AtomicUsize) {
    let (jobs, fired) = queues;
    let mut con: Option<Link> = None;
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
        let outcome = run_once_more(redis, &mut con, &job);
        if let (Outcome::Unavailable, None) = (&outcome, &reply) {
            warn!("redis job nobody waits for was lost (Redis unavailable)");
        }
        pending.fetch_sub(1, SeqCst);
        if let Some(reply) = reply {
            completions(reply, outcome);
        }
    }
}

/// `EVALSHA` of `script` on one lease: KEYS the lease key and this
/// instance's counter, then `args`.
fn lease_call(script: &redis::Script, ask: &lease::LeaseAsk, args: &[u64]) -> redis::Cmd {
    let mut evalsha = redis::cmd("EVALSHA");
    evalsha
        .arg(script.get_hash())
        .arg(2)
        .arg(&ask.key)
        .arg(ask.counter())
        .arg(&*ask.instance);
    for a in args {
        evalsha.arg(*a);
    }
    evalsha
}

/// Runs `cmds` (EVALSHAs of `script`) in one batch; a Redis that lost its
/// script cache (a restart) gets the script loaded and the batch runs again.
fn scripted(
    link: &mut Link,
    script: &redis::Script,
    cmds: Vec<redis::Cmd>,
) -> redis::RedisResult<Vec<Value>> {
    match link.batch(cmds.clone()) {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            script.load(link.con())?;
            link.batch(cmds)
        }
        other => other,
    }
}

/// Runs the lease script for `user` and, in the same round trip, for `ip`
/// (in a Cluster, one per node of their slots).
fn acquire(
    link: &mut Link,
    user: &lease::LeaseAsk,
    ip: Option<&lease::LeaseAsk>,
) -> redis::RedisResult<(LeaseAnswer, Option<LeaseAnswer>)> {
    let cmds = std::iter::once(user)
        .chain(ip)
        .map(|ask| lease_call(&ACQUIRE, ask, &[u64::from(ask.limit), ask.ttl_ms]))
        .collect();
    let answers = scripted(link, &ACQUIRE, cmds)?;
    // Every lease asked is answered (or the batch failed): a release must
    // match a lease taken, since counters, unlike set members, add up.
    let mut answers = answers.into_iter().map(|v| {
        redis::from_redis_value::<i64>(v)
            .map(LeaseAnswer::from_script)
            .map_err(redis::RedisError::from)
    });
    let user = next_answer(&mut answers)?;
    let ip = match ip {
        Some(_) => Some(next_answer(&mut answers)?),
        None => None,
    };
    Ok((user, ip))
}

fn next_answer(
    answers: &mut impl Iterator<Item = redis::RedisResult<LeaseAnswer>>,
) -> redis::RedisResult<LeaseAnswer> {
    answers.next().unwrap_or_else(|| {
        Err((
            redis::ErrorKind::UnexpectedReturnType,
            "a lease answer is missing",
        )
            .into())
    })
}

/// Gives one lease on `ask.key` back.
fn release(link: &mut Link, ask: &lease::LeaseAsk) -> redis::RedisResult<()> {
    scripted(link, &RELEASE, vec![lease_call(&RELEASE, ask, &[])]).map(drop)
}

/// One job, one round trip (pipelined where it needs several commands; in
/// a Cluster, one per node holding its keys). No script spans hash slots:
/// the mint script touches one key, the lease scripts a lease key and the
/// counters of its instances, hash-tagged into one slot.
fn run(link: &mut Link, job: &Job) -> redis::RedisResult<Outcome> {
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
                .invoke(link.con())?;
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
                .query::<()>(link.con())?;
            Outcome::TicketStored
        }
        Job::Owned { user } => {
            let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                .arg(devices_key(user))
                .query(link.con())?;
            Outcome::Owned(members.into_iter().filter_map(device_id).collect())
        }
        Job::DeleteTicket { id, user } => {
            let key = ticket_key(id);
            let owner: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(link.con())?;
            match owner {
                None => Outcome::NotFound,
                Some(o) if o != user.key.as_bytes() => Outcome::NotOwner,
                Some(_) => {
                    // Gone from Redis, then every instance closes the
                    // streams opened with it (contract 7.2).
                    let mut del = redis::cmd("DEL");
                    del.arg(&key);
                    let mut publish = redis::cmd("PUBLISH");
                    publish.arg(REVOKE_CHANNEL).arg(id);
                    let (n, _): (u64, u64) = redis::from_redis_value(Value::Array(
                        link.transaction(vec![del, publish])?,
                    ))?;
                    if n == 0 {
                        Outcome::NotFound
                    } else {
                        Outcome::Deleted
                    }
                }
            }
        }
        Job::TicketAlive { id } => {
            let n: u64 = redis::cmd("EXISTS").arg(ticket_key(id)).query(link.con())?;
            Outcome::TicketAlive(n == 1)
        }
        Job::StreamFacts {
            ticket_id,
            user,
            check,
            status_of,
            lease,
            ip_lease,
        } => {
            // Single-key commands only (GET per status, not one MGET), so a
            // Cluster sends each to the node of its slot.
            let mut cmds = vec![redis::cmd("EXISTS")];
            cmds[0].arg(ticket_key(ticket_id));
            match check {
                Some(devices) if !devices.is_empty() => {
                    let mut smismember = redis::cmd("SMISMEMBER");
                    smismember.arg(devices_key(user)).arg(devices);
                    cmds.push(smismember);
                }
                Some(_) => {}
                None => {
                    let mut smembers = redis::cmd("SMEMBERS");
                    smembers.arg(devices_key(user));
                    cmds.push(smembers);
                }
            }
            for device in status_of {
                let mut get = redis::cmd("GET");
                get.arg(status_key(device));
                cmds.push(get);
            }
            let mut values = link.batch(cmds)?.into_iter();
            let mut facts = StreamFacts {
                ticket_alive: matches!(values.next(), Some(Value::Int(1))),
                ..StreamFacts::default()
            };
            match check {
                Some(devices) if !devices.is_empty() => {
                    facts.owned = redis::from_redis_value::<Vec<bool>>(next(&mut values)?)?;
                }
                Some(_) => {}
                // Members that are not UTF-8 name no device a stream could
                // ask for: skipped, never an error for the user's streams.
                None => {
                    facts.owned_set = redis::from_redis_value::<Vec<Vec<u8>>>(next(&mut values)?)?
                        .into_iter()
                        .filter_map(device_id)
                        .map(String::from)
                        .collect()
                }
            }
            // A status that is not UTF-8 is sent as what it can be.
            facts.statuses = values
                .map(|v| {
                    redis::from_redis_value::<Option<Vec<u8>>>(v)
                        .map(|s| s.map(|b| String::from_utf8_lossy(&b).into_owned()))
                })
                .collect::<Result<_, _>>()?;
            let checks_pass = facts.ticket_alive && facts.owned.iter().all(|o| *o);
            if let (Some(ask), true) = (lease, checks_pass) {
                // Both leases in one round trip; the address's counts only
                // if the user's is granted (all or nothing, below).
                let (user, ip) = acquire(link, ask, ip_lease.as_ref())?;
                facts.lease = user;
                facts.lease_ask = Some(ask.clone());
                if let (Some(ip), Some(ip_ask)) = (ip, ip_lease) {
                    facts.ip_lease = ip;
                    facts.ip_lease_ask = Some(ip_ask.clone());
                    let undo = match (user, ip) {
                        // The address is full: the user's goes back.
                        (LeaseAnswer::Granted { .. }, LeaseAnswer::Refused { .. }) => Some(ask),
                        // The user is full: the address's goes back.
                        (LeaseAnswer::Refused { .. }, LeaseAnswer::Granted { .. }) => Some(ip_ask),
                        _ => None,
                    };
                    if let Some(undo) = undo {
                        release(link, undo)?;
                    }
                    if let LeaseAnswer::Refused { .. } = user {
                        facts.ip_lease = LeaseAnswer::NotAsked;
                        facts.ip_lease_ask = None;
                    }
                }
            }
            Outcome::Facts(Box::new(facts))
        }
        Job::ReleaseLease(ask) => {
            release(link, ask)?;
            Outcome::Published
        }
        Job::Publish { channel, payload } => {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query::<u64>(link.con())?;
            Outcome::Published
        }
    })
}

/// The next reply of a batch; a batch answers every command it sent.
fn next(values: &mut impl Iterator<Item = Value>) -> redis::RedisResult<Value> {
    values
        .next()
        .ok_or_else(|| (redis::ErrorKind::UnexpectedReturnType, "a reply is missing").into())
}
