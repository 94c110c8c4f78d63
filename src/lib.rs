//! sse-gateway: a Server-Sent Events gateway for industrial dashboards.
//!
//! Data flows one way: **bus → frames → subscriptions → outboxes → sockets**.
//! The [`bus`] turns Redis (or in-process) messages into encoded frames, the
//! [`reactor`] threads route each frame to the outboxes of the streams that
//! subscribed to its device and write them out; [`stream`] holds what a
//! stream is, [`http`] what a request is, [`auth`] who is asking.

pub mod auth;
pub mod bus;
pub mod config;
pub mod gateway;
pub mod http;
pub mod log;
pub mod metrics;
pub mod reactor;
pub mod stream;
pub mod time;
