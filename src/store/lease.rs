//! Cluster-wide per-user limits: with several gateways on one Redis, a user's
//! open streams are counted across all of them through leases.
//!
//! Each open stream holds a member `<instance>:<stream id>` in the sorted set
//! `sse:lease:<user>:<purpose>`, scored by its expiry (epoch ms). A stream
//! opening asks Redis, atomically (one Lua script): after dropping expired
//! members, how many leases do *other* instances hold? If those alone reach
//! the limit, the answer is 429; otherwise the lease is added and the
//! reactor adds this instance's own open streams from its local registry,
//! at the moment the answer arrives. The local registry forgets a closed
//! stream at once, so a page reload on the same instance never waits for a
//! lease release to reach Redis.
//!
//! Leases are renewed by one thread per instance every third of their
//! lifetime (two heartbeat periods, at least 1 s), released when a stream
//! closes, and simply expire when an instance dies without cleaning up.

use std::net::IpAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::warn;

use super::connect::{Deployment, Link};
use crate::auth::UserId;
use crate::stream::frame::Purpose;
use crate::stream::registry::{Registry, StreamId};
use crate::time::epoch_ms;

/// Streams renewed per pipeline.
const RENEW_BATCH: usize = 512;

/// Returns the number of other instances' live leases; negative
/// (`-1 - others`) when the limit is reached and nothing was added.
/// KEYS[1] holds every instance's leases, KEYS[2] this instance's (same
/// hash slot): others = the two counts' difference, O(log n) whatever the
/// size, so an address with thousands of streams costs what a user does.
pub const ACQUIRE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local others = redis.call('ZCARD', KEYS[1]) - redis.call('ZCARD', KEYS[2])
if others >= tonumber(ARGV[4]) then return -1 - others end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return others
"#;

/// The lease set of a client address (its /64 for IPv6): the per-IP limit
/// held across instances as the per-user one is.
pub fn ip_key(ip: IpAddr) -> String {
    format!("sse:lease-ip:{{{ip}}}")
}

/// The lease set of a user's streams of one purpose.
pub fn key(user: &str, purpose: Purpose) -> String {
    format!("sse:lease:{{{user}:{}}}", purpose.as_str())
}

/// The part of lease set `key` that the instance of `member`
/// (`<instance>:<stream id>`) holds; same hash slot as `key`.
pub fn own_key(key: &str, member: &str) -> String {
    let instance = member.split(':').next().unwrap_or(member);
    format!("{key}:{instance}")
}

/// What a stream opening asks of Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub key: String,
    pub member: String,
    pub limit: u32,
    pub ttl_ms: u64,
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
            LeaseAnswer::Granted { others: v as u32 }
        } else {
            LeaseAnswer::Refused {
                others: (-1 - v) as u32,
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
    pub instance: String,
    pub ttl: Duration,
}

impl Leases {
    pub fn new(heartbeat: Duration) -> Leases {
        Leases {
            instance: uuid::Uuid::new_v4().simple().to_string(),
            ttl: (heartbeat * 2).max(Duration::from_secs(1)),
        }
    }

    pub fn member(&self, stream_id: StreamId) -> String {
        format!("{}:{stream_id}", self.instance)
    }

    pub fn ask(
        &self,
        user: &UserId,
        purpose: Purpose,
        stream_id: StreamId,
        limit: u32,
    ) -> LeaseAsk {
        LeaseAsk {
            key: key(&user.key, purpose),
            member: self.member(stream_id),
            limit,
            ttl_ms: self.ttl.as_millis() as u64,
        }
    }

    /// The lease a stream from `ip` (already reduced to its limit key) takes.
    pub fn ask_ip(&self, ip: IpAddr, stream_id: StreamId, limit: u32) -> LeaseAsk {
        LeaseAsk {
            key: ip_key(ip),
            member: self.member(stream_id),
            limit,
            ttl_ms: self.ttl.as_millis() as u64,
        }
    }

    /// Starts the thread that renews every local stream's lease.
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

    fn renew_forever(&self, redis: &Deployment, registry: &Registry) {
        let period = self.ttl / 3;
        let mut con: Option<Link> = None;
        loop {
            thread::sleep(period);
            let streams = registry.all();
            if streams.is_empty() {
                continue;
            }
            if con.is_none() {
                con = redis.link().ok();
            }
            let Some(c) = con.as_mut() else { continue };
            let expiry = epoch_ms() + self.ttl.as_millis() as u64;
            // In pipelines of a bounded size: one for 100,000 streams would
            // need tens of megabytes of buffers, which the allocator keeps.
            // In a Cluster, each goes to the nodes of its keys' slots.
            for batch in streams.chunks(RENEW_BATCH) {
                let mut cmds = Vec::with_capacity(batch.len() * 4 + 8);
                // Each set's lifetime once per batch, however many of its
                // members the batch renews (an address may hold thousands).
                let mut sets = std::collections::BTreeSet::new();
                for (user, purpose, id, ip) in batch {
                    let member = self.member(*id);
                    for set in [ip_key(*ip), key(user, *purpose)] {
                        let own = own_key(&set, &member);
                        for k in [set, own] {
                            // XX: never bring back a lease released since
                            // the snapshot.
                            let mut zadd = redis::cmd("ZADD");
                            zadd.arg(&k).arg("XX").arg(expiry).arg(&member);
                            cmds.push(zadd);
                            sets.insert(k);
                        }
                    }
                }
                for k in sets {
                    let mut pexpire = redis::cmd("PEXPIRE");
                    pexpire.arg(&k).arg(self.ttl.as_millis() as u64);
                    cmds.push(pexpire);
                }
                if let Err(e) = c.batch(cmds) {
                    warn!("lease renewal failed: {e}");
                    con = None;
                    break;
                }
            }
        }
    }
}
