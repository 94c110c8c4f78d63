//! The shared context: what every reactor and route reads (configuration,
//! keys, the hub, the store, the registry of open streams, leases, metrics).
//! Built once by [`crate::startup`], shared behind an `Arc`, never rebuilt.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::auth::ticket::TicketKey;
use crate::auth::token::TokenKey;
use crate::config::Config;
use crate::ingress::Hub;
use crate::metrics::Metrics;
use crate::reactor::peers::PeerCounts;
use crate::store::lease::Leases;
use crate::store::protocol::Job;
use crate::store::Store;
use crate::stream::frame::Purpose;
use crate::stream::registry::{Registry, StreamId};

impl Gateway {
    /// A stream ended (or never started after taking its slot): free its
    /// limit slot here and its lease in Redis.
    pub fn stream_closed(&self, user: &str, ip: IpAddr, purpose: Purpose, stream_id: StreamId) {
        self.registry.close(user, ip, stream_id);
        self.release_lease(user, ip, purpose);
    }

    /// Gives back a stream's cluster-wide leases, its user's and its
    /// address's (Redis mode).
    pub fn release_lease(&self, user: &str, ip: IpAddr, purpose: Purpose) {
        if let Some(leases) = &self.leases {
            let ip = crate::config::limit_key(ip);
            for ask in [leases.ask(user, purpose, 0), leases.ask_ip(ip, 0)] {
                self.store.fire(Job::ReleaseLease(ask));
            }
        }
    }
}

/// What every reactor shares.
pub struct Gateway {
    pub config: Config,
    pub tokens: TokenKey,
    pub tickets: TicketKey,
    pub hub: Arc<Hub>,
    pub store: Store,
    pub registry: Arc<Registry>,
    /// Redis mode: cluster-wide per-user limits.
    pub leases: Option<Arc<Leases>>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// `--demo`: an access token for user `demo`, served at `/demo/token`.
    pub demo_token: Option<String>,
    /// Connections per client IP that are not streams.
    pub peers: PeerCounts,
}
