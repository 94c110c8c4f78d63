//! The store: what a request needs to know that lives outside the process
//! (Redis) or, in embedded mode, in it: tickets, device ownership, status
//! snapshots, mint windows and cluster-wide leases.
//!
//! A reactor describes what it needs as a [`Job`]; the embedded store
//! answers at once (a map lookup under a mutex), the Redis store hands the
//! job to a worker thread and the [`Outcome`] comes back through the
//! [`Completions`] sink that start-up wires to the reactors' mailboxes. The
//! store never knows what a reactor is: it answers an address ([`Reply`]).
//!
//! - [`protocol`]: jobs, outcomes, addresses and the Redis key names.
//! - [`memory`]: the embedded store.
//! - [`redis`]: the Redis worker pool.
//! - [`pipeline`]: stream lookups and ticket writes, grouped into shared round trips.
//! - [`connect`]: where Redis is (one server, Sentinel, Cluster) and how to connect.
//! - [`address`]: node addresses and the timeouts of every connection.
//! - [`sentinel`]: the master the Sentinels name, followed through failovers.
//! - [`cluster`]: a Cluster's seeds and the nodes it names.
//! - [`lease`]: cluster-wide per-user limits.

pub mod address;
pub mod cluster;
pub mod connect;
pub mod lease;
pub mod memory;
pub mod pipeline;
pub mod protocol;
pub mod redis;
pub mod sentinel;

use std::sync::Arc;

use memory::Memory;
use protocol::{Job, Outcome, Reply};
use redis::RedisPool;

/// Where a late outcome goes: start-up makes it post to the asking
/// reactor's mailbox.
pub type Completions = Arc<dyn Fn(Reply, Outcome) + Send + Sync>;

pub enum Store {
    Memory(Memory),
    Redis(RedisPool),
}

impl Store {
    /// Runs `job`: Some(outcome) now, or None when the outcome will arrive
    /// later through the completions sink, addressed to `reply`.
    pub fn submit(&self, job: Job, reply: Reply) -> Option<Outcome> {
        match self {
            Store::Memory(m) => m.submit(job, reply),
            Store::Redis(pool) => pool.submit(job, reply),
        }
    }

    /// Runs `job` for its effect only; nobody waits for the outcome.
    pub fn fire(&self, job: Job) {
        match self {
            Store::Memory(m) => {
                m.run(job);
            }
            Store::Redis(pool) => pool.fire(job),
        }
    }

    pub fn memory(&self) -> Option<&Memory> {
        match self {
            Store::Memory(m) => Some(m),
            Store::Redis(_) => None,
        }
    }
}
