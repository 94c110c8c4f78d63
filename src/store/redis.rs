//! The Redis store: a small pool of blocking worker threads that run
//! request-time lookups ([`Job`]s) so no reactor ever waits on Redis, and
//! hand each [`Outcome`] to the [`Completions`] sink start-up wired (the
//! asking reactor's mailbox). The job queue is bounded: past it a request
//! gets 503 rather than unbounded memory; jobs nobody waits for (lease
//! releases) have a queue of their own that never refuses one.
//! A worker that finds several stream lookups or ticket writes queued runs
//! them together, a round trip per stage ([`super::pipeline`]).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::warn;
use redis::Value;

use super::connect::{worth_a_fresh_link, Deployment, Link};
use super::lease::LeaseAsk;
use super::pipeline;
use super::protocol::{device_id, devices_key, ticket_key, Job, Outcome, Reply, REVOKE_CHANNEL};
use super::Completions;

/// Lookups waiting for a worker, at most; past it, 503 at once.
const QUEUE_BOUND: usize = 16_384;
/// Worker threads, each with its own Redis link. A worker runs what is
/// queued behind the job it took in shared round trips, so two keep up with
/// an open storm as four did (~5,000 opens/s here either way). When each
/// thread had a malloc arena of its own (before `crate::heap` made it one),
/// each worker's kept its share of a storm's transient memory afterwards:
/// ~35 bytes per stream at 10,000 streams for each.
const WORKERS: usize = 2;
/// Lease releases sent in one round trip at most.
const RELEASE_BATCH: usize = 256;

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
        // Unbounded underneath, bounded by `submit`: an array channel of
        // 16,384 jobs would take its 4 MiB up front in every process.
        let (tx, rx) = crossbeam_channel::unbounded();
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
        if self.jobs.len() >= QUEUE_BOUND {
            return Some(Outcome::Unavailable);
        }
        self.pending.fetch_add(1, SeqCst);
        match self.jobs.send((job, Some(reply))) {
            Ok(()) => None,
            Err(_) => {
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
    once_more(redis, con, |c| run(c, job)).unwrap_or_else(|e| {
        warn!("redis lookup failed: {e}");
        Outcome::Unavailable
    })
}

/// Runs `work` on the worker's connection (made when there is none). A
/// connection that failed is dropped; one that had died while idle gets
/// one more try, on a fresh connection.
fn once_more<T>(
    redis: &Deployment,
    con: &mut Option<Link>,
    work: impl Fn(&mut Link) -> redis::RedisResult<T>,
) -> redis::RedisResult<T> {
    let reused = con.is_some();
    let attempt = |con: &mut Option<Link>| {
        let c = match con {
            Some(c) => c,
            None => con.insert(redis.link()?),
        };
        let result = work(c);
        // A link whose batch failed as a dead connection fails goes too,
        // even when the failure was taken as an answer.
        if result.is_err() || c.spoiled() {
            *con = None;
        }
        result
    };
    match attempt(con) {
        Err(e) if reused && worth_a_fresh_link(&e) => attempt(con),
        other => other,
    }
}

type Queues = (Receiver<(Job, Option<Reply>)>, Receiver<Job>);

fn worker(redis: &Deployment, queues: Queues, completions: &Completions, pending: &AtomicUsize) {
    let (jobs, fired) = queues;
    let mut con: Option<Link> = None;
    let done = |reply: Option<Reply>, outcome: Outcome| {
        if let (Outcome::Unavailable, None) = (&outcome, &reply) {
            warn!("redis job nobody waits for was lost (Redis unavailable)");
        }
        pending.fetch_sub(1, SeqCst);
        if let Some(reply) = reply {
            completions(reply, outcome);
        }
    };
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
        let (job, reply) = match (job, reply) {
            (Job::ReleaseLease(first), None) => {
                // More closed streams' releases waiting (a reconnect storm
                // closes thousands at once): one round trip for all of them.
                let mut asks = vec![first];
                let mut after = None;
                while asks.len() < RELEASE_BATCH {
                    match fired.try_recv() {
                        Ok(Job::ReleaseLease(ask)) => asks.push(ask),
                        Ok(other) => {
                            after = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let released = release_once_more(redis, &mut con, &asks);
                for _ in &asks {
                    done(
                        None,
                        if released {
                            Outcome::Published
                        } else {
                            Outcome::Unavailable
                        },
                    );
                }
                if let Some(job) = after {
                    done(None, run_once_more(redis, &mut con, &job));
                }
                continue;
            }
            other => other,
        };
        if !pipeline::groupable(&job) {
            done(reply, run_once_more(redis, &mut con, &job));
            continue;
        }
        // More stream lookups and ticket writes waiting: one round trip per
        // stage for all of them. A job of another kind ends the group and
        // runs after it.
        let mut group = vec![(job, reply)];
        let mut after = None;
        while group.len() < pipeline::GROUP {
            match jobs.try_recv() {
                Ok(next) if pipeline::groupable(&next.0) => group.push(next),
                Ok(other) => {
                    after = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let outcomes = run_group_once_more(redis, &mut con, &group);
        for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
            done(reply, outcome);
        }
        if let Some((job, reply)) = after {
            done(reply, run_once_more(redis, &mut con, &job));
        }
    }
}

/// Runs lease releases in one round trip; on a connection that died while
/// idle, once more on a fresh one (as [`run_once_more`]). Whether they ran.
fn release_once_more(redis: &Deployment, con: &mut Option<Link>, asks: &[LeaseAsk]) -> bool {
    once_more(redis, con, |c| pipeline::release(c, asks))
        .map_err(|e| warn!("{} lease releases failed: {e}", asks.len()))
        .is_ok()
}

/// A group's outcomes, in order: on a connection that died while idle, the
/// group runs once more on a fresh one (as [`run_once_more`]); a group
/// whose first stage fails otherwise runs job by job, so one bad job (a key
/// of the wrong type) fails alone.
fn run_group_once_more(
    redis: &Deployment,
    con: &mut Option<Link>,
    group: &[(Job, Option<Reply>)],
) -> Vec<Outcome> {
    let jobs: Vec<&Job> = group.iter().map(|(job, _)| job).collect();
    let result = once_more(redis, con, |c| pipeline::run_group(c, &jobs));
    match result {
        Ok(outcomes) => outcomes,
        Err(_) if jobs.len() > 1 => jobs
            .iter()
            .map(|job| run_once_more(redis, con, job))
            .collect(),
        Err(e) => {
            warn!("redis lookup failed: {e}");
            vec![Outcome::Unavailable]
        }
    }
}

/// One job, one round trip (pipelined where it needs several commands; in
/// a Cluster, one per node holding its keys). No script spans hash slots:
/// the mint script and the lease scripts each touch one key.
fn run(link: &mut Link, job: &Job) -> redis::RedisResult<Outcome> {
    Ok(match job {
        Job::PutTicket { .. } | Job::StreamFacts { .. } => {
            let mut outcomes = pipeline::run_group(link, &[job])?;
            outcomes.pop().unwrap_or(Outcome::Unavailable)
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
        Job::ReleaseLease(ask) => {
            pipeline::release(link, [ask])?;
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

#[cfg(test)]
mod tests {
    //! The pool against a real redis-server.

    use super::*;
    use crate::store::lease::{self, Leases};
    use crate::stream::frame::Purpose;
    use sse_testkit::redis_server::Redis;

    /// Socket reads Redis has processed: one per round trip of a client
    /// that waits for its answers.
    fn reads(con: &mut redis::Connection) -> u64 {
        let info: String = redis::cmd("INFO").arg("stats").query(con).expect("info");
        info.lines()
            .find_map(|l| l.strip_prefix("total_reads_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("total_reads_processed")
    }

    #[test]
    fn a_burst_of_lease_releases_shares_round_trips() {
        let redis = Redis::start();
        let pool = RedisPool::start(Deployment::at(&redis.url()), Arc::new(|_, _| {}));
        let leases = Leases::new(Duration::from_secs(5));
        let mut con = redis.con();
        lease::ACQUIRE_SCRIPT.load(&mut con).expect("load");
        lease::RELEASE_SCRIPT.load(&mut con).expect("load");
        let asks: Vec<_> = (0..1000)
            .map(|n| leases.ask(&format!("u{n}"), Purpose::Data, 5))
            .collect();
        let mut pipe = redis::pipe();
        for ask in &asks {
            pipe.add_command(lease::acquire(ask));
        }
        let granted: Vec<i64> = pipe.query(&mut con).expect("acquire");
        assert!(granted.iter().all(|&others| others == 0));
        let before = reads(&mut con);
        for ask in asks {
            pool.fire(Job::ReleaseLease(ask));
        }
        pool.finish(Duration::from_secs(10));
        let after = reads(&mut con);
        let left: u64 = redis::cmd("DBSIZE").query(&mut con).expect("dbsize");
        assert_eq!(left, 0, "every lease given back, every key gone");
        // One by one they took a round trip each (over 1,000 reads).
        assert!(after - before < 200, "{} reads", after - before);
    }
}
