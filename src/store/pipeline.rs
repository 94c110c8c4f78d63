//! Stream lookups and ticket writes in shared round trips. A Redis worker
//! that finds several of them queued takes up to [`GROUP`] and runs each
//! stage of all of them as one pipeline: first every stream's reads (ticket
//! alive, ownership, statuses) and every ticket's mint-window script, then
//! every lease script and ticket `SET` that the first answers allow. One
//! job alone runs the same two stages. A lease refused after its pair was
//! granted is given back in a third, rare round trip.
//!
//! No command here spans hash slots (contract 7.5, Cluster): a pipeline is
//! split per node by the Cluster link, and each script touches one slot.

use std::sync::LazyLock;

use log::warn;
use redis::{RedisResult, Value};

use super::connect::{command, Link, NUMBER_LEN, SHA_LEN};
use super::lease::{self, LeaseAnswer, LeaseAsk};
use super::protocol::{
    device_id, devices_key, mints_key, status_key, ticket_key, Job, Outcome, StreamFacts,
    MINT_WINDOW_MS,
};

/// Jobs run together at most. Measured with 10,000 streams opening 256 at
/// a time: 8 opened them as fast as 32 did (both about 1.5× one at a
/// time), and held less memory afterwards (the bigger the group, the more
/// of a burst's buffers the allocator keeps: 1.03 KiB per idle stream at 8,
/// 1.10 at 32, 0.90 alone).
pub const GROUP: usize = 8;

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

/// Whether `job` can share a group.
pub fn groupable(job: &Job) -> bool {
    matches!(job, Job::StreamFacts { .. } | Job::PutTicket { .. })
}

/// Runs `cmds` in one batch; a Redis that lost its script cache (a restart)
/// gets every script loaded and the batch runs again. Only an EVALSHA
/// answers NOSCRIPT, and one that does has not run; the other commands of
/// a stage are reads or an idempotent `SET`.
fn stage(link: &mut Link, cmds: Vec<redis::Cmd>) -> RedisResult<Vec<Value>> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    link.batch_reloading(cmds, |link| {
        for script in [&*MINTS, &*lease::ACQUIRE_SCRIPT, &*lease::RELEASE_SCRIPT] {
            script.load(link.con())?;
        }
        Ok(())
    })
}

/// A job between its stages.
enum Midway {
    Ticket { count: i64 },
    Facts(Box<StreamFacts>),
    Other,
}

/// The first stage of `job`.
fn first(job: &Job) -> Vec<redis::Cmd> {
    match job {
        Job::PutTicket {
            id,
            user,
            per_minute,
            ..
        } => {
            let key = mints_key(user);
            // The SHA, the key count, the key, now, the id, the limit, the window.
            let text = SHA_LEN + 1 + key.len() + id.len() + 3 * NUMBER_LEN;
            let mut evalsha = command("EVALSHA", 8, text);
            evalsha
                .arg(MINTS.get_hash())
                .arg(1)
                .arg(key)
                .arg(crate::time::epoch_ms())
                .arg(id)
                .arg(per_minute)
                .arg(MINT_WINDOW_MS);
            vec![evalsha]
        }
        Job::StreamFacts {
            ticket_id,
            user,
            check,
            status_of,
            ..
        } => {
            // Single-key commands only (GET per status, not one MGET), so a
            // Cluster sends each to the node of its slot.
            let mut cmds = Vec::with_capacity(2 + status_of.len());
            let key = ticket_key(ticket_id);
            let mut exists = command("EXISTS", 2, key.len());
            exists.arg(key);
            cmds.push(exists);
            match check {
                Some(devices) if !devices.is_empty() => {
                    let key = devices_key(user);
                    let listed: usize = devices.iter().map(|d| d.len()).sum();
                    let mut smismember =
                        command("SMISMEMBER", 2 + devices.len(), key.len() + listed);
                    smismember.arg(key).arg(devices);
                    cmds.push(smismember);
                }
                Some(_) => {}
                None => {
                    let key = devices_key(user);
                    let mut smembers = command("SMEMBERS", 2, key.len());
                    smembers.arg(key);
                    cmds.push(smembers);
                }
            }
            for device in status_of {
                let key = status_key(device);
                let mut get = command("GET", 2, key.len());
                get.arg(key);
                cmds.push(get);
            }
            cmds
        }
        _ => Vec::new(),
    }
}

/// What the first stage's `values` (all of this job's) say.
fn read_first(job: &Job, values: Vec<Value>) -> RedisResult<Midway> {
    let mut values = values.into_iter();
    Ok(match job {
        Job::PutTicket { .. } => Midway::Ticket {
            count: redis::from_redis_value(next(&mut values)?)?,
        },
        Job::StreamFacts { check, .. } => {
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
            Midway::Facts(Box::new(facts))
        }
        _ => Midway::Other,
    })
}

/// The leases a stream asks for once its checks pass: the user's, then the
/// address's, in the same round trip.
fn leases_due<'a>(job: &'a Job, midway: &Midway) -> Option<(&'a LeaseAsk, Option<&'a LeaseAsk>)> {
    let (
        Job::StreamFacts {
            lease: Some(ask),
            ip_lease,
            ..
        },
        Midway::Facts(facts),
    ) = (job, midway)
    else {
        return None;
    };
    let checks_pass = facts.ticket_alive && facts.owned.iter().all(|o| *o);
    checks_pass.then_some((ask, ip_lease.as_ref()))
}

/// The second stage of `job`.
fn second(job: &Job, midway: &Midway) -> Vec<redis::Cmd> {
    match (job, midway) {
        (
            Job::PutTicket {
                id, user, exp_secs, ..
            },
            Midway::Ticket { count },
        ) if *count >= 0 => {
            let key = ticket_key(id);
            let text = key.len() + user.key.len() + "EXAT".len() + NUMBER_LEN;
            let mut set = command("SET", 5, text);
            set.arg(key).arg(&*user.key).arg("EXAT").arg(exp_secs);
            vec![set]
        }
        _ => match leases_due(job, midway) {
            Some((user, ip)) => std::iter::once(user)
                .chain(ip)
                .map(lease::acquire)
                .collect(),
            None => Vec::new(),
        },
    }
}

/// The outcome, from the second stage's `values` (all of this job's).
fn finish(link: &mut Link, job: &Job, midway: Midway, values: Vec<Value>) -> RedisResult<Outcome> {
    let due = leases_due(job, &midway);
    Ok(match midway {
        Midway::Ticket { count } if count < 0 => Outcome::TooManyTickets {
            retry_after_secs: count.unsigned_abs().div_ceil(1000).max(1),
        },
        Midway::Ticket { .. } => {
            next(&mut values.into_iter())?;
            Outcome::TicketStored
        }
        Midway::Facts(mut facts) => {
            if let Some((ask, ip_ask)) = due {
                settle(link, &mut facts, values, ask, ip_ask)?;
            }
            Outcome::Facts(facts)
        }
        Midway::Other => Outcome::Unavailable,
    })
}

/// Records the lease answers in `facts`: the address's counts only if the
/// user's is granted (all or nothing), so a refusal of one gives the other
/// back at once.
fn settle(
    link: &mut Link,
    facts: &mut StreamFacts,
    values: Vec<Value>,
    ask: &LeaseAsk,
    ip_ask: Option<&LeaseAsk>,
) -> RedisResult<()> {
    // Every lease asked is answered (or the stage failed): a release must
    // match a lease taken, since the entries count them.
    let mut answers = values.into_iter().map(|v| {
        redis::from_redis_value::<i64>(v)
            .map(LeaseAnswer::from_script)
            .map_err(redis::RedisError::from)
    });
    let user = next_answer(&mut answers)?;
    facts.lease = user;
    facts.lease_ask = Some(ask.clone());
    let Some(ip_ask) = ip_ask else {
        return Ok(());
    };
    let ip = next_answer(&mut answers)?;
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
        release(link, [undo])?;
    }
    if let LeaseAnswer::Refused { .. } = user {
        facts.ip_lease = LeaseAnswer::NotAsked;
        facts.ip_lease_ask = None;
    }
    Ok(())
}

/// Gives one lease back on each of `asks`' keys, in one round trip.
pub fn release<'a>(
    link: &mut Link,
    asks: impl IntoIterator<Item = &'a LeaseAsk>,
) -> RedisResult<()> {
    stage(link, asks.into_iter().map(lease::release).collect()).map(drop)
}

/// Runs `jobs` (each [`groupable`]) in two shared round trips; their
/// outcomes in order. Err only when the first stage failed: it takes no
/// lease, so the jobs may run again. Once leases may have been taken, a
/// failure is each failed job's own outcome (`Unavailable`), never a rerun
/// that would take them twice.
pub fn run_group(link: &mut Link, jobs: &[&Job]) -> RedisResult<Vec<Outcome>> {
    let mut cmds = Vec::new();
    let mut sizes = Vec::with_capacity(jobs.len());
    for job in jobs {
        let c = first(job);
        sizes.push(c.len());
        cmds.extend(c);
    }
    let mut values = stage(link, cmds)?.into_iter();
    let mut midways = Vec::with_capacity(jobs.len());
    for (job, n) in jobs.iter().zip(&sizes) {
        midways.push(read_first(job, take(&mut values, *n)?)?);
    }
    let mut cmds = Vec::new();
    sizes.clear();
    for (job, midway) in jobs.iter().zip(&midways) {
        let c = second(job, midway);
        sizes.push(c.len());
        cmds.extend(c);
    }
    let mut values = match stage(link, cmds) {
        Ok(values) => values.into_iter(),
        Err(e) => {
            warn!("redis lookup failed after its checks: {e}");
            return Ok(jobs.iter().map(|_| Outcome::Unavailable).collect());
        }
    };
    let mut outcomes = Vec::with_capacity(jobs.len());
    for ((job, midway), n) in jobs.iter().zip(midways).zip(sizes) {
        let outcome = take(&mut values, n).and_then(|mine| finish(link, job, midway, mine));
        outcomes.push(outcome.unwrap_or_else(|e| {
            warn!("redis lookup failed after its checks: {e}");
            Outcome::Unavailable
        }));
    }
    Ok(outcomes)
}

/// The next `n` replies of a batch; a batch answers every command it sent.
fn take(values: &mut impl Iterator<Item = Value>, n: usize) -> RedisResult<Vec<Value>> {
    let part: Vec<Value> = values.take(n).collect();
    if part.len() == n {
        Ok(part)
    } else {
        Err((redis::ErrorKind::UnexpectedReturnType, "a reply is missing").into())
    }
}

fn next(values: &mut impl Iterator<Item = Value>) -> RedisResult<Value> {
    values
        .next()
        .ok_or_else(|| (redis::ErrorKind::UnexpectedReturnType, "a reply is missing").into())
}

fn next_answer(
    answers: &mut impl Iterator<Item = RedisResult<LeaseAnswer>>,
) -> RedisResult<LeaseAnswer> {
    answers.next().unwrap_or_else(|| {
        Err((
            redis::ErrorKind::UnexpectedReturnType,
            "a lease answer is missing",
        )
            .into())
    })
}

#[cfg(test)]
mod tests {
    //! A group against a real redis-server gives each job the outcome it
    //! gets alone, with leases counted once each.

    use super::*;
    use crate::auth::UserId;
    use crate::stream::frame::Purpose;
    use sse_testkit::redis_server::Redis;

    fn stream_job(leases: &lease::Leases, user: &str, ticket: &str, device: &str) -> Job {
        let user = UserId::named(user);
        Job::StreamFacts {
            ticket_id: ticket.into(),
            lease: Some(leases.ask(&user.key, Purpose::Data, 1)),
            ip_lease: Some(leases.ask_ip("10.1.2.3".parse().expect("ip"), 2)),
            user,
            check: Some(vec![device.into()]),
            status_of: vec![device.into()],
        }
    }

    fn ticket_job(user: &str, id: &str) -> Job {
        Job::PutTicket {
            id: id.into(),
            user: UserId::named(user),
            exp_secs: crate::time::epoch_ms() / 1000 + 60,
            per_minute: 1,
        }
    }

    #[test]
    fn a_group_answers_each_job_as_it_would_alone() {
        let redis = Redis::start();
        redis.grant("ann", &["M1"]);
        redis.grant("bob", &["M2"]);
        let mut con = redis.con();
        for (key, value) in [("sse:ticket:t1", "ann"), ("sse:ticket:t2", "bob")] {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query::<()>(&mut con)
                .expect("set");
        }
        redis::cmd("SET")
            .arg("machine:M1:status")
            .arg("{}")
            .query::<()>(&mut con)
            .expect("set");
        let client = redis::Client::open(redis.url()).expect("client");
        let mut link = Link::from(client.get_connection().expect("connection"));
        let leases = lease::Leases::new(std::time::Duration::from_secs(5));
        let jobs = [
            stream_job(&leases, "ann", "t1", "M1"),
            ticket_job("cid", "x1"),
            stream_job(&leases, "bob", "t2", "M1"), // not bob's device
            ticket_job("cid", "x2"),                // past 1 a minute
            stream_job(&leases, "ann", "t1", "M1"),
            stream_job(&leases, "bob", "t2", "M2"), // a third on the address
        ];
        let refs: Vec<&Job> = jobs.iter().collect();
        // Scripts not loaded yet: the group loads them and runs again.
        let outcomes = run_group(&mut link, &refs).expect("group");
        let facts = |o: &Outcome| match o {
            Outcome::Facts(f) => (f.ticket_alive, f.owned.clone(), f.lease, f.ip_lease),
            other => panic!("not facts: {other:?}"),
        };
        let granted = LeaseAnswer::Granted { others: 0 };
        assert_eq!(facts(&outcomes[0]), (true, vec![true], granted, granted));
        assert!(matches!(outcomes[1], Outcome::TicketStored));
        assert_eq!(
            facts(&outcomes[2]),
            (
                true,
                vec![false],
                LeaseAnswer::NotAsked,
                LeaseAnswer::NotAsked
            )
        );
        assert!(matches!(outcomes[3], Outcome::TooManyTickets { .. }));
        // This instance's own leases never count against it (the registry
        // counts them): the same user again is granted here.
        assert_eq!(facts(&outcomes[4]), (true, vec![true], granted, granted));
        assert_eq!(facts(&outcomes[5]), (true, vec![true], granted, granted));
        if let Outcome::Facts(f) = &outcomes[0] {
            assert_eq!(f.statuses, vec![Some("{}".to_owned())]);
        }
        // Three streams granted: three leases on the address, one entry.
        let ask = leases.ask_ip("10.1.2.3".parse().expect("ip"), 2);
        let held: i64 = redis::cmd("HGET")
            .arg(&ask.key)
            .arg(&*ask.instance)
            .query(&mut con)
            .expect("hget");
        assert_eq!(held, 3);
        let stored: Option<String> = redis::cmd("GET")
            .arg("sse:ticket:x1")
            .query(&mut con)
            .expect("get");
        assert_eq!(stored.as_deref(), Some("cid"));
    }
}
