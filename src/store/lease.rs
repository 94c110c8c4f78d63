//! Cluster-wide limits: with several gateways on one Redis, a user's open
//! streams of a purpose, and an address's open streams, are counted across
//! all of them through leases.
//!
//! A lease key (`sse:lease:{<user>:<purpose>}`, `sse:lease-ip:{<ip>}`) is a
//! small set of the instances that hold leases on it; each such instance
//! keeps one counter `<lease key>:<instance>` (same hash slot: the hash tag
//! is in the prefix) with one expiry. A stream opening asks Redis,
//! atomically (one Lua script, one slot): how many leases do *other*
//! instances hold (the sum of their counters; an instance whose counter
//! expired leaves the set)? If those alone reach the limit, the answer is
//! 429; otherwise this instance's counter goes up by one, and the reactor
//! adds this instance's own open streams from its local registry at the
//! moment the answer arrives. The local registry forgets a closed stream at
//! once, so a page reload on the same instance never waits for a lease
//! release to reach Redis. A release takes the counter down by one (and
//! the counter and the set entry away at zero).
//!
//! One thread per instance renews every third of a lease's lifetime (two
//! heartbeat periods, at least 1 s): two `PEXPIRE`s per lease key the
//! instance holds streams on, however many streams that is. An instance
//! that dies without cleaning up stops renewing, and its counters expire.
//!
//! The scripts read other instances' counters by names they build from
//! `KEYS[1]`: undeclared keys, but in `KEYS[1]`'s hash slot by construction,
//! which Redis Cluster allows (a script may touch any key of a slot its
//! node serves).

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::Duration;

use log::warn;

use super::connect::{Deployment, Link};
use crate::auth::UserId;
use crate::stream::frame::Purpose;
use crate::stream::registry::Registry;

/// Lease keys renewed per pipeline.
const RENEW_BATCH: usize = 1024;

/// KEYS[1] the lease key (the set of holding instances), KEYS[2] this
/// instance's counter; ARGV: instance, limit, lifetime (ms). Returns the
/// number of other instances' live leases; negative (`-1 - others`) when
/// the limit is reached and nothing was taken. O(instances holding the key).
pub const ACQUIRE: &str = r#"
local others = 0
for _, inst in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if inst ~= ARGV[1] then
    local n = tonumber(redis.call('GET', KEYS[1] .. ':' .. inst) or '0') or 0
    if n > 0 then others = others + n else redis.call('SREM', KEYS[1], inst) end
  end
end
if others >= tonumber(ARGV[2]) then return -1 - others end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return others
"#;

/// KEYS as [`ACQUIRE`]'s, ARGV[1] the instance: one lease back. A counter
/// that expired meanwhile (DECR would make it -1) is removed, never left
/// negative or without an expiry.
pub const RELEASE: &str = r#"
local n = redis.call('DECR', KEYS[2])
if n <= 0 then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[1], ARGV[1])
end
return n
"#;

/// The scripts, hashed once; run by EVALSHA.
pub static ACQUIRE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACQUIRE));
pub static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// `EVALSHA` of `script` ([`ACQUIRE_SCRIPT`] or [`RELEASE_SCRIPT`]) on one
/// lease: KEYS the lease key and this instance's counter, ARGV the
/// instance, then `args`.
pub fn call(script: &redis::Script, ask: &LeaseAsk, args: &[u64]) -> redis::Cmd {
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

/// The lease key of a client address (its /64 for IPv6): the per-IP limit
/// held across instances as the per-user one is.
pub fn ip_key(ip: IpAddr) -> String {
    format!("sse:lease-ip:{{{ip}}}")
}

/// The lease key of a user's streams of one purpose.
pub fn key(user: &str, purpose: Purpose) -> String {
    format!("sse:lease:{{{user}:{}}}", purpose.as_str())
}

/// The counter of `instance`'s leases on lease key `key`; same hash slot.
pub fn counter_key(key: &str, instance: &str) -> String {
    format!("{key}:{instance}")
}

/// What a stream opening asks of Redis: one lease on `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub key: String,
    pub instance: Arc<str>,
    pub limit: u32,
    pub ttl_ms: u64,
}

impl LeaseAsk {
    pub fn counter(&self) -> String {
        counter_key(&self.key, &self.instance)
    }
}

/// Redis's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseAnswer {
    /// Embedded mode, or the request failed before the limit check.
    #[default]
    NotAsked,
    /// Added; `others` leases are held by other instances.
    Granted { others: u32 },
    /// The limit is reached counting `others` leases of other instances.
    Refused { others: u32 },
}

impl LeaseAnswer {
    pub fn from_script(v: i64) -> LeaseAnswer {
        if v >= 0 {
            LeaseAnswer::Granted {
                others: u32::try_from(v).unwrap_or(u32::MAX),
            }
        } else {
            LeaseAnswer::Refused {
                others: u32::try_from(-1 - v).unwrap_or(u32::MAX),
            }
        }
    }

    pub fn others(self) -> u32 {
        match self {
            LeaseAnswer::NotAsked => 0,
            LeaseAnswer::Granted { others } | LeaseAnswer::Refused { others } => others,
        }
    }
}

/// This instance's leases: its id and how long a lease lives.
pub struct Leases {
    pub instance: Arc<str>,
    pub ttl: Duration,
}

impl Leases {
    pub fn new(heartbeat: Duration) -> Leases {
        Leases {
            instance: uuid::Uuid::new_v4().simple().to_string().into(),
            ttl: (heartbeat * 2).max(Duration::from_secs(1)),
        }
    }

    fn ask_on(&self, key: String, limit: u32) -> LeaseAsk {
        LeaseAsk {
            key,
            instance: self.instance.clone(),
            limit,
            ttl_ms: self.ttl.as_millis() as u64,
        }
    }

    pub fn ask(&self, user: &UserId, purpose: Purpose, limit: u32) -> LeaseAsk {
        self.ask_on(key(&user.key, purpose), limit)
    }

    /// The lease a stream from `ip` (already reduced to its limit key) takes.
    pub fn ask_ip(&self, ip: IpAddr, limit: u32) -> LeaseAsk {
        self.ask_on(ip_key(ip), limit)
    }

    /// Starts the thread that renews this instance's lease counters.
    pub fn start_renewing(
        self: &Arc<Self>,
        redis: Arc<Deployment>,
        registry: Arc<Registry>,
    ) -> std::io::Result<()> {
        let leases = self.clone();
        thread::Builder::new()
            .name("lease-renewer".into())
            .spawn(move || leases.renew_forever(&redis, &registry))?;
        Ok(())
    }

    /// The commands that renew this instance's leases on `keys`: its
    /// counter's and the key's lifetime. PEXPIRE never brings back a
    /// counter that a release removed since the registry was read.
    pub fn renewals(&self, keys: &[String]) -> Vec<redis::Cmd> {
        let ttl = self.ttl.as_millis() as u64;
        let mut cmds = Vec::with_capacity(keys.len() * 2);
        for k in keys {
            for name in [counter_key(k, &self.instance), k.clone()] {
                let mut pexpire = redis::cmd("PEXPIRE");
                pexpire.arg(name).arg(ttl);
                cmds.push(pexpire);
            }
        }
        cmds
    }

    fn renew_forever(&self, redis: &Deployment, registry: &Registry) {
        let period = self.ttl / 3;
        let mut con: Option<Link> = None;
        loop {
            thread::sleep(period);
            let (users, ips) = registry.lease_holders();
            if users.is_empty() && ips.is_empty() {
                continue;
            }
            if con.is_none() {
                con = redis.link().ok();
            }
            let Some(c) = con.as_mut() else { continue };
            // In pipelines of a bounded size, their key names made batch by
            // batch: one for 100,000 keys would need tens of megabytes of
            // buffers, which the allocator keeps. In a Cluster, each goes
            // to the nodes of its keys' slots.
            let users = users.iter().map(|(user, purpose)| key(user, *purpose));
            let mut keys = users.chain(ips.into_iter().map(ip_key));
            loop {
                let batch: Vec<String> = keys.by_ref().take(RENEW_BATCH).collect();
                if batch.is_empty() {
                    break;
                }
                if let Err(e) = c.batch(self.renewals(&batch)) {
                    warn!("lease renewal failed: {e}");
                    con = None;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scripts against a real redis-server: two instances sharing one
    //! limit, releases, a dead instance's counter expiring.

    use super::*;
    use sse_testkit::redis_server::Redis;

    struct Instance {
        leases: Leases,
    }

    impl Instance {
        fn new(ttl_ms: u64) -> Instance {
            let mut leases = Leases::new(Duration::from_secs(1));
            leases.ttl = Duration::from_millis(ttl_ms);
            Instance { leases }
        }

        fn acquire(&self, con: &mut redis::Connection, key: &str, limit: u32) -> LeaseAnswer {
            let ask = self.leases.ask_on(key.to_owned(), limit);
            let v: i64 = redis::Script::new(ACQUIRE)
                .key(&ask.key)
                .key(ask.counter())
                .arg(&*ask.instance)
                .arg(ask.limit)
                .arg(ask.ttl_ms)
                .invoke(con)
                .expect("acquire");
            LeaseAnswer::from_script(v)
        }

        fn release(&self, con: &mut redis::Connection, key: &str) -> i64 {
            redis::Script::new(RELEASE)
                .key(key)
                .key(counter_key(key, &self.leases.instance))
                .arg(&*self.leases.instance)
                .invoke(con)
                .expect("release")
        }
    }

    #[test]
    fn instances_share_a_limit_and_a_dead_instances_count_expires() {
        let redis = Redis::start();
        let mut con = redis.con();
        let key = key("alice", Purpose::Data);
        let (a, b) = (Instance::new(60_000), Instance::new(300));
        for n in 0..3 {
            assert_eq!(
                a.acquire(&mut con, &key, 5),
                LeaseAnswer::Granted { others: 0 },
                "a's own leases never count against it ({n})"
            );
        }
        assert_eq!(
            b.acquire(&mut con, &key, 3),
            LeaseAnswer::Refused { others: 3 }
        );
        assert_eq!(
            b.acquire(&mut con, &key, 5),
            LeaseAnswer::Granted { others: 3 }
        );
        assert_eq!(
            a.acquire(&mut con, &key, 5),
            LeaseAnswer::Granted { others: 1 }
        );
        assert_eq!(a.release(&mut con, &key), 3);
        // Limit 0 takes nothing and says how many others hold.
        let probe = Instance::new(1000);
        assert_eq!(
            probe.acquire(&mut con, &key, 0),
            LeaseAnswer::Refused { others: 4 }
        );
        // A release whose counter expired meanwhile leaves nothing behind.
        let gone = ip_key("10.0.0.1".parse().expect("ip"));
        assert_eq!(a.release(&mut con, &gone), -1);
        let left: u64 = redis::cmd("EXISTS")
            .arg(&gone)
            .arg(counter_key(&gone, &a.leases.instance))
            .query(&mut con)
            .expect("exists");
        assert_eq!(left, 0);
        // b dies: its counter expires unrenewed (300 ms) and counts no more;
        // a's, renewed, stays.
        let renewed: Vec<i64> = redis::pipe()
            .add_command(a.leases.renewals(std::slice::from_ref(&key))[0].clone())
            .query(&mut con)
            .expect("renew");
        assert_eq!(renewed, vec![1]);
        let started = std::time::Instant::now();
        let mut seen = LeaseAnswer::NotAsked;
        while started.elapsed() < Duration::from_secs(5) {
            seen = probe.acquire(&mut con, &key, 0);
            if seen == (LeaseAnswer::Refused { others: 3 }) {
                break;
            }
            thread::sleep(Duration::from_millis(20)); // polling Redis's clock
        }
        assert_eq!(seen, LeaseAnswer::Refused { others: 3 }, "b expired");
        // a gives everything back: its counter and the key go.
        for _ in 0..3 {
            a.release(&mut con, &key);
        }
        let left: u64 = redis::cmd("EXISTS")
            .arg(&key)
            .arg(counter_key(&key, &a.leases.instance))
            .query(&mut con)
            .expect("exists");
        assert_eq!(left, 0);
    }
}
