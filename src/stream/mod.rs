//! Streams, from event to subscriber: the encoded [`frame`], each reactor's
//! [`subscriptions`] index, the shared [`registry`] of open streams and their
//! limits, the [`replay`] window behind `Last-Event-ID`, and [`Stream`], an
//! open stream as its reactor keeps it.

pub mod frame;
pub mod registry;
pub mod replay;
pub mod subscriptions;

use std::net::IpAddr;
use std::sync::Arc;

use frame::Purpose;
use registry::StreamId;
use subscriptions::Filter;

/// [`Stream::unacked_kib`] when the kernel did not say.
pub const UNACKED_UNKNOWN: u16 = u16::MAX;

/// An open stream: who holds it, what it receives, and how its client keeps
/// up. Built by the routes when its slot is taken; owned by the connection
/// that carries it.
pub struct Stream {
    pub id: StreamId,
    /// The ticket it was opened with (a revocation names it).
    pub ticket: uuid::Uuid,
    /// The user's id as the registry and the leases key it, one allocation
    /// shared with them (whether `sub` was a number only matters to JSON
    /// answers, and a stream gives none).
    pub user: Arc<str>,
    /// Opened with an admin ticket: access changes do not narrow it.
    pub admin: bool,
    pub client: IpAddr,
    pub purpose: Purpose,
    pub filter: Filter,
    /// Reactor clock when it opened, in tenths of a second (what the
    /// closing log line reports; 32 bits of them last 13 years).
    pub opened: u32,
    /// Bytes the client sent since (should stay 0; it is cut off past
    /// 16 KiB, so 16 bits hold it).
    pub input: u16,
    /// Reactor clock (ms) of the next heartbeat.
    pub next_heartbeat: u64,
    /// Reactor clock (ms, wrapping at 32 bits like the connection's write
    /// stamp) since which the client has taken none of the queued bytes; 0
    /// while it keeps up.
    pub stalled_since: u32,
    /// While stalled: the KiB the kernel held unacknowledged for the socket
    /// when the stall was last seen (`conn::unacked_kib`); fewer at the next
    /// look means the client took some. [`UNACKED_UNKNOWN`] when not known.
    /// KiB, in 16 bits, keep the row at its size (see `conn.rs`'s test): a
    /// client that takes less than a KiB between two looks (tens of
    /// seconds) is not seen taking any.
    pub unacked_kib: u16,
}
