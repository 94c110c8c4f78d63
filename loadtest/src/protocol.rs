//! What the coordinator and its worker processes say to each other: one JSON
//! object per line, commands on the worker's stdin, one reply per command on
//! its stdout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hist::Sparse;

/// Which kind of server the workers talk to, which decides the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// sse-gateway: ticket, then stream.
    Gateway,
    /// The NestJS baseline: same contract.
    Nestjs,
    /// The floor server: a bare GET, no ticket.
    Floor,
    /// nginx + nchan (`loadtest/peers/nchan.conf`): a bare EventSource GET on
    /// its subscriber location, no ticket, no Redis.
    Nchan,
    /// A server the harness did not start (`loadtest run --url`): requests
    /// built from a [`Route`].
    Url,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Gateway => "gateway",
            TargetKind::Nestjs => "nestjs",
            TargetKind::Floor => "floor",
            TargetKind::Nchan => "nchan",
            TargetKind::Url => "url",
        }
    }

    /// Whether it speaks the contract (tickets, Redis) or is a peer driven
    /// through its own publish path.
    pub fn uses_redis(self) -> bool {
        matches!(self, TargetKind::Gateway | TargetKind::Nestjs)
    }
}

/// How a client of a [`TargetKind::Url`] server opens its stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The stream's path and query; `{ticket}`, `{device}` and `{user}` are
    /// filled in (percent-encoded).
    pub stream_path: String,
    /// The ticket endpoint's path (POST, on the same server and connection);
    /// None: no tickets.
    pub ticket_path: Option<String>,
    /// The ticket request's JSON body.
    pub ticket_body: String,
    /// One access token for every client; None: minted per client from the
    /// jwt secret, or no `Authorization` at all when that is empty too.
    pub bearer: Option<String>,
    /// The `role` claim of minted access tokens.
    pub role: Option<String>,
    /// The `Host` header: the URL's `HOST:PORT` as given (a name, for a
    /// server behind a proxy that routes by it); None: the address.
    #[serde(default)]
    pub host: Option<String>,
    /// TLS to the server (an `https://` URL); None: plain TCP.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsSetup>,
    /// Local addresses the streams connect from, in turn (each reaches
    /// one server port about 28,000 times at once); empty: see
    /// `tab::spreads_sources`.
    #[serde(default)]
    pub sources: Vec<std::net::IpAddr>,
}

/// Which stream a client opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Data,
    Alerts,
}

/// Clients `first..first+count` of a scenario: client `i` is user
/// `{user_prefix}{i}` and streams device `{device_prefix}{i % devices}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Clients {
    pub first: u64,
    pub count: u64,
    pub user_prefix: String,
    pub device_prefix: String,
    pub devices: u64,
    pub kind: StreamKind,
    /// Reopen a stream the server closed, after the `retry:` it asked for,
    /// with the `Last-Event-ID` of the last event received (as EventSource
    /// does); off for the scenarios that drop and reconnect themselves.
    #[serde(default)]
    pub resume: bool,
}

impl Clients {
    pub fn user(&self, i: u64) -> String {
        format!("{}{}", self.user_prefix, i)
    }

    pub fn device(&self, i: u64) -> String {
        format!("{}{}", self.device_prefix, i % self.devices.max(1))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Open these clients through the full flow, at most `concurrency`
    /// handshakes in flight, each retried up to `attempts` times.
    Open {
        target: TargetKind,
        addr: String,
        jwt_secret: String,
        clients: Clients,
        concurrency: usize,
        attempts: u32,
        /// The requests of a [`TargetKind::Url`] server.
        #[serde(default)]
        route: Option<Box<Route>>,
        /// This worker's opens started per second (None: unpaced).
        #[serde(default)]
        open_rate: Option<f64>,
    },
    /// Close every stream (the client side drops).
    Drop,
    /// Reopen every client with the ticket it already has, as EventSource does.
    Reconnect {
        concurrency: usize,
        attempts: u32,
    },
    /// Counters and the latency histogram since the last reset.
    Stats,
    /// Zero the counters and the histogram (sequence tracking is kept).
    Reset,
    /// Count what is missing given how many events were published per device.
    Check {
        published: BTreeMap<String, u64>,
    },
    Quit,
}

/// A worker's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub clients: u64,
    pub open_now: u64,
    /// Successful opens since the last reset.
    pub opened: u64,
    /// Clients that gave up after their last attempt.
    pub failed: u64,
    /// Handshakes in flight or waiting to retry.
    pub pending: u64,
    /// Errors by kind (`http_429`, `ticket_401`, `connect`, `reset`, `timeout`...).
    pub errors: BTreeMap<String, u64>,
    /// Wall-clock ns (UNIX epoch) of the newest successful open.
    pub last_open_ns: u64,
    /// Data and alert events received.
    pub events: u64,
    pub heartbeats: u64,
    /// Events whose sequence number was not above the stream's highest.
    pub dups: u64,
    /// Streams that ended without the client asking.
    pub closed_by_server: u64,
    pub latency: Sparse,
    /// `event: system` `{"kind":"replay-gap"}` received.
    #[serde(default)]
    pub replay_gaps: u64,
    /// `event: system` `{"kind":"shutdown"}` received.
    #[serde(default)]
    pub shutdowns: u64,
    /// Streams reopened with `Last-Event-ID` after the server closed them.
    #[serde(default)]
    pub resumed: u64,
    /// Time from the server closing a stream to its reopened stream's head.
    #[serde(default)]
    pub resume: Sparse,
}

/// The answer to [`Command::Check`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Check {
    /// Published events that never reached a stream that wanted them.
    pub lost: u64,
    /// Deliveries that were expected (published x subscribers).
    pub expected: u64,
    pub unique: u64,
    pub dups: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Stats(Stats),
    Check(Check),
    Error { message: String },
}
