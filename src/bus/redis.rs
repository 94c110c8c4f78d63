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
use crate::bus::store::{devices_key, status_key, ticket_key, Job, Outcome, Reply, StreamFacts};
use crate::bus::{Hub, RedisState};
use crate::reactor::mailbox::{Inbox, Mailboxes};
use crate::stream::frame::{Frame, CHANNELS};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const QUEUE_BOUND: usize = 16_384;
const WORKERS: usize = 4;

/// The lease script, hashed once; `invoke` runs it by EVALSHA.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(lease::ACQUIRE));

pub struct RedisPool {
    jobs: Sender<(Job, Option<Reply>)>,
    /// Jobs submitted and not finished yet (queued or running).
    pending: Arc<AtomicUsize>,
}

impl RedisPool {
    pub fn start(client: redis::Client, mailboxes: Mailboxes) -> RedisPool {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_BOUND);
        let pending = Arc::new(AtomicUsize::new(0));
        for n in 0..WORKERS {
            let (client, rx, mailboxes) = (client.clone(), rx.clone(), mailboxes.clone());
            let pending = pending.clone();
            let spawned = thread::Builder::new()
                .name(format!("redis-worker-{n}"))
                .spawn(move || worker(client, rx, mailboxes, &pending));
            if let Err(e) = spawned {
                warn!("could not start redis worker: {e}");
            }
        }
        RedisPool { jobs: tx, pending }
    }

    pub fn submit(&self, job: Job, reply: Option<Reply>) -> Option<Outcome> {
        self.pending.fetch_add(1, SeqCst);
        match self.jobs.try_send((job, reply)) {
            Ok(()) => None,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, SeqCst);
                Some(Outcome::Unavailable)
            }
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

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

fn worker(
    client: redis::Client,
    jobs: Receiver<(Job, Option<Reply>)>,
    mailboxes: Mailboxes,
    pending: &AtomicUsize,
) {
    let mut con: Option<redis::Connection> = None;
    for (job, reply) in jobs.iter() {
        if con.is_none() {
            con = connect(&client).ok();
        }
        let outcome = match con.as_mut() {
            Some(c) => match run(c, job) {
                Ok(o) => o,
                Err(e) => {
                    warn!("redis lookup failed: {e}");
                    con = None;
                    Outcome::Unavailable
                }
            },
            None => Outcome::Unavailable,
        };
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
fn run(con: &mut redis::Connection, job: Job) -> redis::RedisResult<Outcome> {
    Ok(match job {
        Job::PutTicket { id, user, ttl_secs } => {
            redis::cmd("SET")
                .arg(ticket_key(&id))
                .arg(&*user.key)
                .arg("EX")
                .arg(ttl_secs)
                .query::<()>(con)?;
            Outcome::TicketStored
        }
        Job::DeleteTicket { id, user } => {
            let key = ticket_key(&id);
            let owner: Option<String> = redis::cmd("GET").arg(&key).query(con)?;
            match owner {
                None => Outcome::NotFound,
                Some(o) if o != *user.key => Outcome::NotOwner,
                Some(_) => {
                    let n: u64 = redis::cmd("DEL").arg(&key).query(con)?;
                    if n == 0 {
                        Outcome::NotFound
                    } else {
                        Outcome::Deleted
                    }
                }
            }
        }
        Job::TicketAlive { id } => {
            let n: u64 = redis::cmd("EXISTS").arg(ticket_key(&id)).query(con)?;
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
            pipe.cmd("EXISTS").arg(ticket_key(&ticket_id));
            match &check {
                Some(devices) if !devices.is_empty() => {
                    pipe.cmd("SMISMEMBER").arg(devices_key(&user)).arg(devices);
                }
                Some(_) => {
                    pipe.cmd("PING");
                }
                None => {
                    pipe.cmd("SMEMBERS").arg(devices_key(&user));
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
                (None, Some(v)) => facts.owned_set = redis::from_redis_value::<Vec<String>>(v)?,
                _ => {}
            }
            if let Some(v) = statuses {
                facts.statuses = redis::from_redis_value::<Vec<Option<String>>>(v)?;
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
    let mut pubsub = con.as_pubsub();
    pubsub.subscribe(&CHANNELS[..])?;
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
            Ok(msg) => {
                // Bad messages are counted inside and never stop the loop.
                let _ = hub.publish(msg.get_channel_name(), msg.get_payload_bytes());
            }
            Err(e) if e.is_timeout() => {
                pubsub.ping::<redis::Value>()?;
            }
            Err(e) => return Err(e),
        }
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
