//! The Redis subscriber: one thread holds a Pub/Sub connection on the
//! contract's channels and hands every ingest message, raw, to the cluster
//! log's writer (which only the leader turns into log entries); revocations
//! (`sse:revoke`) and access changes (`sse:access-changed`) go to every
//! reactor. When Redis goes away it tells every stream `degraded`,
//! reconnects with capped exponential backoff and jitter, resubscribes and
//! tells them `recovered`. Where it reconnects (the server, the master the
//! Sentinels name now, the next Cluster node) is the [`Deployment`]'s
//! business; the subscriber wakes up every second to learn whether its
//! master is still the one the Sentinels name, and leaves it when not.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use rand::Rng;

use std::sync::atomic::Ordering::Relaxed;

use super::clusterlog::{channel_index, Inlet, Input};
use super::{Hub, RedisState};
use crate::store::connect::{Deployment, Link};
use crate::store::protocol::{Job, Outcome, ACCESS_CHANGED_CHANNEL, REVOKE_CHANNEL};
use crate::store::redis::run_once_more;
use crate::stream::frame::{Frame, CHANNELS};

/// How often a quiet subscriber wakes up: to leave a master the Sentinels
/// no longer name (a graceful failover leaves the old one up and silent).
const WAKE: Duration = Duration::from_secs(1);
/// How long a connection may stay silent before a PING proves it: a silent
/// network can leave a read blocked forever.
const PROVE_AFTER: Duration = Duration::from_secs(15);

/// Starts the subscriber thread; what it hears on the ingest channels goes
/// to the cluster log's writer (`heard`).
pub fn subscribe(
    redis: Arc<Deployment>,
    hub: Arc<Hub>,
    heard: Inlet,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("redis-subscriber".into())
        .spawn(move || subscriber(&redis, hub, &heard))
}

/// Where the subscriber stands in an outage.
#[derive(Default)]
struct Outage {
    /// Streams were told `degraded` and not yet `recovered`.
    degraded: bool,
    /// Failed connects since the last good one: the backoff's exponent.
    failures: u32,
    /// Subscribed at least once: a later loss is a hole in what was heard
    /// (before the first subscription nothing was heard, which is no hole).
    subscribed: bool,
}

fn subscriber(redis: &Deployment, hub: Arc<Hub>, heard: &Inlet) {
    let mut outage = Outage::default();
    loop {
        match listen(redis, &hub, heard, &mut outage) {
            Ok(()) => return,
            Err(e) => {
                // The first failure of an outage (or of the start: a wrong
                // password or CA is told here, once) is logged.
                if outage.failures == 0 {
                    warn!(
                        "redis subscriber cannot reach Redis ({}): {e}",
                        redis.describe()
                    );
                }
                redis.pubsub_failed();
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

fn listen(
    redis: &Deployment,
    hub: &Hub,
    heard: &Inlet,
    outage: &mut Outage,
) -> redis::RedisResult<()> {
    let (mut con, tenure) = redis.pubsub()?;
    // Access changes need a set read, which a subscribed connection cannot do.
    let mut reads: Option<Link> = None;
    let mut pubsub = con.as_pubsub();
    pubsub.subscribe(&CHANNELS[..])?;
    pubsub.subscribe(&[REVOKE_CHANNEL, ACCESS_CHANGED_CHANNEL][..])?;
    pubsub.set_read_timeout(Some(WAKE))?;
    let mut heard_at = Instant::now();
    if hub.redis_state() != RedisState::Up {
        info!(
            "redis subscriber connected ({}), channels: {}",
            redis.describe(),
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
        // Pub/Sub keeps nothing for a subscriber that was away: whatever was
        // published meanwhile was not heard here. The log's writer knows
        // (and streams get `replay-gap` after `recovered`).
        if outage.subscribed {
            heard.mark_break();
        }
    }
    outage.subscribed = true;
    heard.mark_subscribed();
    loop {
        let message = pubsub.get_message();
        if tenure.over() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the Sentinels name another master now",
            )
            .into());
        }
        match message {
            Ok(msg) => match msg.get_channel_name() {
                REVOKE_CHANNEL => revoke(hub, msg.get_payload_bytes()),
                ACCESS_CHANGED_CHANNEL => {
                    access_changed(redis, &mut reads, hub, msg.get_payload_bytes())
                }
                channel => hear(hub, heard, channel, msg.get_payload_bytes()),
            },
            Err(e) if e.is_timeout() => {
                if heard_at.elapsed() >= PROVE_AFTER {
                    pubsub.ping::<redis::Value>()?;
                    heard_at = Instant::now();
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        heard_at = Instant::now();
    }
}

/// An ingest message, raw, to the log's writer. Only the leader checks and
/// parses it; a message over `--max-event-bytes` is dropped and counted
/// here, on every instance.
fn hear(hub: &Hub, heard: &Inlet, channel: &str, payload: &[u8]) {
    let Some(channel) = channel_index(channel) else {
        return;
    };
    if payload.len() > hub.max_event_bytes() {
        hub.metrics().dropped_too_large.fetch_add(1, Relaxed);
        return;
    }
    let input = Input::Heard {
        channel,
        payload: payload.to_vec(),
    };
    if !heard.offer(input) {
        // The writer is far behind: what it misses is a hole it must mark.
        hub.metrics().mailbox_overflows.fetch_add(1, Relaxed);
        heard.mark_break();
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
fn access_changed(redis: &Deployment, reads: &mut Option<Link>, hub: &Hub, payload: &[u8]) {
    let user = std::str::from_utf8(payload)
        .ok()
        .map(str::trim)
        .filter(|u| !u.is_empty() && u.len() <= crate::auth::MAX_USER_ID_BYTES);
    let Some(user) = user.map(crate::auth::UserId::named) else {
        warn!("ignored a {ACCESS_CHANGED_CHANNEL} message that is not a user id");
        return;
    };
    match run_once_more(redis, reads, &Job::Owned { user: user.clone() }) {
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
