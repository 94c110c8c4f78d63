//! Cluster-wide limits: with several gateways on one Redis, a user's open
//! streams of a purpose, and an address's open streams, are counted across
//! all of them through leases.
//!
//! A lease key (`sse:leases:{<user>:<purpose>}`, `sse:leases-ip:{<ip>}`)
//! is a hash: instance → how many streams that instance holds on it. A stream
//! opening asks Redis, atomically (one Lua script, one key): how many
//! leases do *other* live instances hold? If those alone reach the limit,
//! the answer is 429; otherwise this instance's entry goes up by one, and
//! the reactor adds this instance's own open streams from its local
//! registry at the moment the answer arrives. The local registry forgets a
//! closed stream at once, so a page reload on the same instance never waits
//! for a lease release to reach Redis. A release takes the entry down by
//! one (and away at zero; the key goes with its last entry).
//!
//! Liveness is per instance, not per lease: every instance beats in one
//! sorted set ([`INSTANCES_KEY`], scored by Redis's clock) every third of
//! [`Leases::ttl`] (two heartbeat periods, at least 1 s), and learns from
//! the same call which instances stopped beating longer than that ago. Their
//! entries count for nothing and are taken out of the keys that scripts
//! touch. So renewal costs one call per instance, however many users and
//! addresses it holds streams for: an instance that dies without cleaning
//! up stops counting a lease lifetime (plus at most a third) later, as
//! before. A lease key itself lives [`KEY_LIFE`] from its last acquire or
//! renewal, renewed by its holders every third of that: the expiry only
//! removes keys whose every holder died.
//!
//! Every script touches one key (Redis Cluster: one slot). An instance that
//! started after the others last beat is not in their list of dead ones,
//! so it counts at once; an instance that exits cleanly leaves the set.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::warn;
use redis::Value;

use super::connect::{command, Deployment, Link, NUMBER_LEN, SHA_LEN};
use crate::stream::frame::Purpose;
use crate::stream::registry::Registry;

/// Lease keys renewed per pipeline.
const RENEW_BATCH: usize = 1024;
/// The sorted set of instances and their last beats (ms, Redis's clock).
pub const INSTANCES_KEY: &str = "sse:instances";
/// How long a lease key lives after its last acquire or renewal.
pub const KEY_LIFE: Duration = Duration::from_secs(3600);
/// How long a dead instance stays in [`INSTANCES_KEY`]: past every renewal
/// of the keys it held (a third of [`KEY_LIFE`]), which takes it out of them.
const FORGET_AFTER: Duration = KEY_LIFE;
/// Dead instances listed at most, the longest dead first (each is an
/// argument of every acquire; past this many crashes within the hour, the
/// latest count as live until the older ones are forgotten).
const DEAD_MAX: usize = 256;
/// An instance id is 32 hex digits; longer names in the set are not ours.
const INSTANCE_ID_MAX: usize = 64;

/// KEYS[1] the lease key; ARGV: instance, limit, the key's life (ms), then
/// the dead instances. Returns the number of other live instances'
/// leases; negative (`-1 - others`) when the limit is reached and nothing
/// was taken. O(instances holding the key).
pub const ACQUIRE: &str = r#"
local dead = {}
for i = 4, #ARGV do dead[ARGV[i]] = true end
local others = 0
local held = redis.call('HGETALL', KEYS[1])
for i = 1, #held, 2 do
  local inst = held[i]
  if inst ~= ARGV[1] then
    if dead[inst] then redis.call('HDEL', KEYS[1], inst)
    else others = others + (tonumber(held[i + 1]) or 0) end
  end
end
if others >= tonumber(ARGV[2]) then return -1 - others end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return others
"#;

/// KEYS[1] the lease key, ARGV[1] the instance: one lease back. An entry
/// taken out meanwhile (HINCRBY would leave -1) is removed, never left
/// negative.
pub const RELEASE: &str = r#"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"#;

/// KEYS[1] a lease key; ARGV: instance, the key's life (ms), then the dead
/// instances. Takes the dead out, and extends the key's life while this
/// instance still holds a lease on it.
const RENEW: &str = r#"
for i = 3, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// KEYS[1] [`INSTANCES_KEY`]; ARGV: instance, ttl (ms), forget after (ms),
/// how many to list. Beats now (Redis's clock), forgets the long dead, and
/// returns (at most that many of) the instances that have not beaten
/// within the ttl.
const BEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])),
  'LIMIT', 0, ARGV[4])
"#;

/// The scripts the request pipelines run, hashed once; run by EVALSHA.
pub static ACQUIRE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACQUIRE));
pub static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// `EVALSHA` of [`ACQUIRE`] on `ask`'s key.
pub fn acquire(ask: &LeaseAsk) -> redis::Cmd {
    let mut evalsha = evalsha(&ACQUIRE_SCRIPT, ask, 2 + ask.dead.len());
    evalsha.arg(ask.limit).arg(KEY_LIFE.as_millis() as u64);
    for inst in ask.dead.iter() {
        evalsha.arg(&**inst);
    }
    evalsha
}

/// `EVALSHA` of [`RELEASE`] on `ask`'s key.
pub fn release(ask: &LeaseAsk) -> redis::Cmd {
    evalsha(&RELEASE_SCRIPT, ask, 0)
}

/// `EVALSHA` with `ask`'s key and instance, and room for `more` arguments
/// (numbers, or dead instances' ids, each about as long as `instance`).
fn evalsha(script: &redis::Script, ask: &LeaseAsk, more: usize) -> redis::Cmd {
    // The SHA, the key count, the key, the instance, then the rest.
    let each = NUMBER_LEN.max(ask.instance.len());
    let text = SHA_LEN + 1 + ask.key.len() + ask.instance.len() + more * each;
    let mut evalsha = command("EVALSHA", 5 + more, text);
    evalsha
        .arg(script.get_hash())
        .arg(1)
        .arg(&ask.key)
        .arg(&*ask.instance);
    evalsha
}

/// The lease key of a client address (its /64 for IPv6): the per-IP limit
/// held across instances as the per-user one is.
pub fn ip_key(ip: IpAddr) -> String {
    format!("sse:leases-ip:{{{ip}}}")
}

/// The lease key of a user's streams of one purpose.
pub fn key(user: &str, purpose: Purpose) -> String {
    format!("sse:leases:{{{user}:{}}}", purpose.as_str())
}

/// Instances that stopped beating, as this instance last heard.
pub type Dead = Arc<[Box<str>]>;

/// What a stream opening asks of Redis: one lease on `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub key: String,
    pub instance: Arc<str>,
    pub limit: u32,
    /// Whose entries count for nothing (and are taken out).
    pub dead: Dead,
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

/// This instance's leases: its id, how long it counts after its last
/// beat, and who it last heard had stopped beating.
pub struct Leases {
    pub instance: Arc<str>,
    /// How long after its last beat an instance still counts.
    pub ttl: Duration,
    dead: Mutex<Dead>,
    redis: OnceLock<Arc<Deployment>>,
}

impl Leases {
    pub fn new(heartbeat: Duration) -> Leases {
        Leases {
            instance: uuid::Uuid::new_v4().simple().to_string().into(),
            ttl: (heartbeat * 2).max(Duration::from_secs(1)),
            dead: Mutex::new(Arc::from(Vec::new())),
            redis: OnceLock::new(),
        }
    }

    fn ask_on(&self, key: String, limit: u32) -> LeaseAsk {
        LeaseAsk {
            key,
            instance: self.instance.clone(),
            limit,
            dead: self.dead(),
        }
    }

    fn dead(&self) -> Dead {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn ask(&self, user: &str, purpose: Purpose, limit: u32) -> LeaseAsk {
        self.ask_on(key(user, purpose), limit)
    }

    /// The lease a stream from `ip` (already reduced to its limit key) takes.
    pub fn ask_ip(&self, ip: IpAddr, limit: u32) -> LeaseAsk {
        self.ask_on(ip_key(ip), limit)
    }

    /// Starts the thread that beats for this instance and renews its keys.
    pub fn start_renewing(
        self: &Arc<Self>,
        redis: Arc<Deployment>,
        registry: Arc<Registry>,
    ) -> std::io::Result<()> {
        let leases = self.clone();
        let _ = self.redis.set(redis.clone());
        thread::Builder::new()
            .name("lease-renewer".into())
            .spawn(move || leases.renew_forever(&redis, &registry))?;
        Ok(())
    }

    /// One beat: this instance is alive; the dead ones are remembered
    /// (never this one: another instance may have taken it for dead, but it
    /// never takes its own entries out).
    pub fn beat(&self, link: &mut Link) -> redis::RedisResult<()> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(BEAT)
            .arg(1)
            .arg(INSTANCES_KEY)
            .arg(&*self.instance)
            .arg(self.ttl.as_millis() as u64)
            .arg(FORGET_AFTER.as_millis() as u64)
            .arg(DEAD_MAX);
        let dead: Vec<String> = eval.query(link.con())?;
        let dead: Dead = dead
            .into_iter()
            .filter(|d| **d != *self.instance && d.len() <= INSTANCE_ID_MAX)
            .map(String::into_boxed_str)
            .collect();
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = dead;
        Ok(())
    }

    /// The calls that renew the lease keys `keys`, taking the dead out.
    pub fn renewals(&self, keys: &[String]) -> Vec<redis::Cmd> {
        let dead = self.dead();
        keys.iter()
            .map(|k| {
                let mut eval = redis::cmd("EVAL");
                eval.arg(RENEW)
                    .arg(1)
                    .arg(k)
                    .arg(&*self.instance)
                    .arg(KEY_LIFE.as_millis() as u64);
                for inst in dead.iter() {
                    eval.arg(&**inst);
                }
                eval
            })
            .collect()
    }

    /// Renews `registry`'s lease keys, in pipelines of a bounded size with
    /// their key names made batch by batch: one for 100,000 keys would need
    /// tens of megabytes of buffers, which the allocator keeps. In a
    /// Cluster, each goes to the nodes of its keys' slots.
    pub fn renew_keys(&self, link: &mut Link, registry: &Registry) -> redis::RedisResult<()> {
        let (users, ips) = registry.lease_holders();
        let users = users.iter().map(|(user, purpose)| key(user, *purpose));
        let mut keys = users.chain(ips.into_iter().map(ip_key));
        loop {
            let batch: Vec<String> = keys.by_ref().take(RENEW_BATCH).collect();
            if batch.is_empty() {
                return Ok(());
            }
            link.batch(self.renewals(&batch))?;
        }
    }

    /// Takes this instance out of the set of instances (a clean exit, its
    /// leases given back): it never shows up as dead. Best effort.
    pub fn leave(&self) {
        let Some(Ok(mut link)) = self.redis.get().map(|r| r.link()) else {
            return;
        };
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(INSTANCES_KEY).arg(&*self.instance);
        if let Err(e) = zrem.query::<Value>(link.con()) {
            warn!("could not leave {INSTANCES_KEY}: {e}");
        }
    }

    /// One round of the renewer: a beat, and the lease keys once they are
    /// due (`keys_due` moves on when they were renewed).
    pub fn round(
        &self,
        link: &mut Link,
        registry: &Registry,
        keys_due: &mut Instant,
    ) -> redis::RedisResult<()> {
        self.beat(link)?;
        if Instant::now() >= *keys_due {
            self.renew_keys(link, registry)?;
            *keys_due = Instant::now() + KEY_LIFE / 3;
        }
        Ok(())
    }

    fn renew_forever(&self, redis: &Deployment, registry: &Registry) {
        let mut con: Option<Link> = None;
        let mut keys_due = Instant::now() + KEY_LIFE / 3;
        loop {
            if con.is_none() {
                con = redis.link().ok();
            }
            if let Some(c) = con.as_mut() {
                if let Err(e) = self.round(c, registry, &mut keys_due) {
                    warn!("lease renewal failed: {e}");
                    con = None;
                }
            }
            thread::sleep(self.ttl / 3);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scripts against a real redis-server: two instances sharing one
    //! limit, releases, a dead instance's entries dropped, and renewal that
    //! costs one call per instance between the rare renewals of the keys.

    use super::*;
    use crate::auth::UserId;
    use crate::stream::registry::{Elsewhere, Limits, Slot};
    use sse_testkit::redis_server::Redis;

    fn instance(ttl_ms: u64) -> Leases {
        let mut leases = Leases::new(Duration::from_secs(1));
        leases.ttl = Duration::from_millis(ttl_ms);
        leases
    }

    fn link(redis: &Redis) -> Link {
        let mut link = Link::from(redis.con());
        for script in [ACQUIRE, RELEASE] {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query(link.con())
                .expect("load");
        }
        link
    }

    fn acquire(leases: &Leases, link: &mut Link, key: &str, limit: u32) -> LeaseAnswer {
        let v: i64 = super::acquire(&leases.ask_on(key.to_owned(), limit))
            .query(link.con())
            .expect("acquire");
        LeaseAnswer::from_script(v)
    }

    fn release(leases: &Leases, link: &mut Link, key: &str) -> i64 {
        super::release(&leases.ask_on(key.to_owned(), 0))
            .query(link.con())
            .expect("release")
    }

    fn entry(link: &mut Link, key: &str, leases: &Leases) -> Option<i64> {
        redis::cmd("HGET")
            .arg(key)
            .arg(&*leases.instance)
            .query(link.con())
            .expect("hget")
    }

    #[test]
    fn instances_share_a_limit_and_a_dead_instances_leases_count_no_more() {
        let redis = Redis::start();
        let mut link = link(&redis);
        let key = key("alice", Purpose::Data);
        let (a, b) = (instance(300), instance(300));
        a.beat(&mut link).expect("beat");
        b.beat(&mut link).expect("beat");
        for n in 0..3 {
            assert_eq!(
                acquire(&a, &mut link, &key, 5),
                LeaseAnswer::Granted { others: 0 },
                "a's own leases never count against it ({n})"
            );
        }
        assert_eq!(
            acquire(&b, &mut link, &key, 3),
            LeaseAnswer::Refused { others: 3 }
        );
        assert_eq!(
            acquire(&b, &mut link, &key, 5),
            LeaseAnswer::Granted { others: 3 }
        );
        assert_eq!(
            acquire(&a, &mut link, &key, 5),
            LeaseAnswer::Granted { others: 1 }
        );
        assert_eq!(release(&a, &mut link, &key), 3);
        // Limit 0 takes nothing and says how many others hold; an instance
        // that never beat yet is nobody's dead one.
        let probe = instance(1000);
        assert_eq!(
            acquire(&probe, &mut link, &key, 0),
            LeaseAnswer::Refused { others: 4 }
        );
        // A release with no lease taken leaves nothing behind.
        let gone = ip_key("10.0.0.1".parse().expect("ip"));
        assert_eq!(release(&a, &mut link, &gone), -1);
        let left: u64 = redis::cmd("EXISTS")
            .arg(&gone)
            .query(link.con())
            .expect("exists");
        assert_eq!(left, 0);
        // b dies: a, beating on, hears of it once b's last beat is older
        // than the ttl (300 ms); b's lease counts no more and is taken out.
        let started = Instant::now();
        while a.dead().is_empty() && started.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(20)); // polling Redis's clock
            a.beat(&mut link).expect("beat");
        }
        assert_eq!(&*a.dead(), &[Box::from(&*b.instance)]);
        assert_eq!(
            acquire(&a, &mut link, &key, 0),
            LeaseAnswer::Refused { others: 0 }
        );
        assert_eq!(entry(&mut link, &key, &b), None, "taken out");
        assert_eq!(entry(&mut link, &key, &a), Some(3));
        // a gives everything back: its entry and the key go.
        for _ in 0..3 {
            release(&a, &mut link, &key);
        }
        let left: u64 = redis::cmd("EXISTS")
            .arg(&key)
            .query(link.con())
            .expect("exists");
        assert_eq!(left, 0);
        // A clean exit leaves the set of instances: never heard of as dead.
        let _ = a.redis.set(Deployment::at(&redis.url()));
        a.leave();
        let listed: Option<f64> = redis::cmd("ZSCORE")
            .arg(INSTANCES_KEY)
            .arg(&*a.instance)
            .query(link.con())
            .expect("zscore");
        assert_eq!(listed, None);
    }

    /// Redis's count of calls of `command` since the last look.
    fn calls(link: &mut Link, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(link.con())
            .expect("info");
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(link.con())
            .expect("resetstat");
        let line = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_renewal_round_is_one_call_however_many_leases_until_the_keys_are_due() {
        let redis = Redis::start();
        let mut link = link(&redis);
        let leases = instance(60_000);
        let registry = Registry::new(
            Limits {
                alerts: 10,
                data: 10,
                per_ip: 10_000,
            },
            Arc::default(),
        );
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        for n in 0..2000u128 {
            let user = UserId::named(&format!("u{n}"));
            let slot = Slot {
                id: uuid::Uuid::from_u128(n + 1),
                purpose: Purpose::Data,
                devices: Vec::new().into(),
                connected_at_ms: 0,
                owner: (0, 0),
            };
            registry
                .open(&user, ip, slot, Elsewhere::default())
                .expect("open");
            acquire(&leases, &mut link, &key(&user.key, Purpose::Data), 10);
        }
        acquire(&leases, &mut link, &ip_key(ip), 10_000);
        calls(&mut link, "eval");
        let mut keys_due = Instant::now() + Duration::from_secs(60);
        for _ in 0..3 {
            leases
                .round(&mut link, &registry, &mut keys_due)
                .expect("round");
        }
        assert_eq!(calls(&mut link, "eval"), 3, "one beat a round");
        // Due: every key is renewed once, its life extended.
        let _: () = redis::cmd("PEXPIRE")
            .arg(key("u7", Purpose::Data))
            .arg(5000)
            .query(link.con())
            .expect("pexpire");
        keys_due = Instant::now();
        leases
            .round(&mut link, &registry, &mut keys_due)
            .expect("round");
        assert_eq!(calls(&mut link, "eval"), 1 + 2001);
        assert!(keys_due > Instant::now() + KEY_LIFE / 4);
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key("u7", Purpose::Data))
            .query(link.con())
            .expect("pttl");
        assert!(ttl > 5000, "renewed: {ttl} ms");
    }
}
