//! What the store is asked ([`Job`]) and answers ([`Outcome`]), where an
//! answer goes ([`Reply`]), and the names of the Redis keys and channels of
//! the contract and of the gateway's own.

use super::lease::{LeaseAnswer, LeaseAsk};
use crate::auth::UserId;

/// Where an outcome goes: connection `conn` of reactor `reactor`, if it is
/// still the same request (`serial`).
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub reactor: usize,
    pub conn: usize,
    pub serial: u32,
}

// Most jobs are stream lookups, the largest variant: boxing it would add
// an allocation to nearly every job for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Job {
    /// `SET sse:ticket:<id> <user> EXAT <exp>`, if `user` has minted fewer
    /// than `per_minute` tickets in the last minute (cluster-wide): the key
    /// lives until the ticket's `exp` (Unix seconds), not a moment longer.
    PutTicket {
        id: String,
        user: UserId,
        exp_secs: u64,
        per_minute: u32,
    },
    /// The devices `user` owns now (`SMEMBERS user:<id>:devices`).
    Owned { user: UserId },
    /// Delete ticket `id` if `user` owns it.
    DeleteTicket { id: String, user: UserId },
    /// Does `sse:ticket:<id>` still exist?
    TicketAlive { id: String },
    /// Everything a stream needs before it opens, in one round trip.
    StreamFacts {
        ticket_id: String,
        user: UserId,
        /// Data stream: the devices whose ownership to check (empty: admin,
        /// no check). Alerts stream: None, fetch the owned set.
        check: Option<Vec<String>>,
        /// Devices whose `machine:<id>:status` to fetch.
        status_of: Vec<String>,
        /// Redis mode: take a cluster-wide lease once the checks pass.
        lease: Option<LeaseAsk>,
        /// Redis mode: and one for the client's address.
        ip_lease: Option<LeaseAsk>,
    },
    /// Give one lease back: a closed stream's, or one taken for a request
    /// that gave up (no reply).
    ReleaseLease(LeaseAsk),
    /// `PUBLISH channel payload` (Redis mode `/sse/publish`).
    Publish { channel: String, payload: Vec<u8> },
}

#[derive(Debug)]
pub enum Outcome {
    /// The store could not answer (Redis down or overloaded): 503.
    Unavailable,
    TicketStored,
    /// The user minted too many tickets; the next slot frees in this many seconds.
    TooManyTickets {
        retry_after_secs: u64,
    },
    Owned(std::collections::HashSet<Box<str>>),
    Deleted,
    NotFound,
    NotOwner,
    TicketAlive(bool),
    /// Boxed: the largest answer, and the mailbox carries every answer.
    Facts(Box<StreamFacts>),
    Published,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct StreamFacts {
    pub ticket_alive: bool,
    /// For a data stream: ownership of each checked device, in order.
    pub owned: Vec<bool>,
    /// For an alerts stream: the devices the user owns.
    pub owned_set: Vec<String>,
    /// `machine:<id>:status` for each device of `status_of` (None: absent).
    pub statuses: Vec<Option<String>>,
    pub lease: LeaseAnswer,
    /// The lease asked for (to give it back if the request has moved on).
    pub lease_ask: Option<LeaseAsk>,
    /// The client address's lease (taken only once the user's is granted;
    /// when it is refused, the user's is given back at once).
    pub ip_lease: LeaseAnswer,
    pub ip_lease_ask: Option<LeaseAsk>,
}

pub fn ticket_key(id: &str) -> String {
    format!("sse:ticket:{id}")
}

pub fn devices_key(user: &UserId) -> String {
    format!("user:{}:devices", user.key)
}

pub fn status_key(device: &str) -> String {
    format!("machine:{device}:status")
}

/// The sorted set of a user's recent ticket mints (scored by time), the
/// cluster-wide window behind `--max-tickets-per-minute`.
pub fn mints_key(user: &UserId) -> String {
    format!("sse:mints:{}", user.key)
}

/// The window of the ticket-mint limit.
pub const MINT_WINDOW_MS: u64 = 60_000;

/// Redis channel on which a revoked ticket's id is published.
pub const REVOKE_CHANNEL: &str = "sse:revoke";
/// Redis channel on which the main app publishes a user id whose devices changed.
pub const ACCESS_CHANGED_CHANNEL: &str = "sse:access-changed";

/// A set member from Redis as a device id: valid UTF-8 of at most 128
/// bytes (a device a stream could name), or nothing.
pub fn device_id(bytes: Vec<u8>) -> Option<Box<str>> {
    (bytes.len() <= 128)
        .then(|| String::from_utf8(bytes).ok())
        .flatten()
        .map(String::into_boxed_str)
}
