//! Streams, from event to subscriber: the encoded [`frame`], the [`routes`]
//! that decide what a request means, the shared [`registry`] of open streams
//! and their limits, each reactor's [`subscriptions`] index, and the
//! [`replay`] window behind `Last-Event-ID`.

pub mod frame;
pub mod registry;
pub mod replay;
pub mod routes;
pub mod subscriptions;
