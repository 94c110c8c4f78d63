//! sse-gateway: a Server-Sent Events gateway for industrial dashboards.
//!
//! Data flows one way: **bus → frames → subscriptions → outboxes → sockets**.
//! Lookups go out to the store and come back through a completion sink that
//! start-up wires to the reactors, so the store never knows a reactor.
//!
//! The crate is layered; each layer uses only the ones above it:
//!
//! | layer | modules | owns |
//! |---|---|---|
//! | leaves | [`time`], [`config`], [`log`], [`metrics`], [`http`], [`heap`] | clocks, flags, logging, counters, request heads and responses, the allocator |
//! | model | [`stream::frame`], [`stream::subscriptions`], [`auth`] | events, purposes, filters, ids; who is asking |
//! | state | [`stream::registry`], [`stream::replay`], [`stream`] | open streams and limits, the replay window, an open stream |
//! | store | [`store`] | the lookup protocol, its memory and Redis backends, leases |
//! | ingress | [`ingress`] | the bus turned into frames: the hub, the Redis subscriber, rate limit, demo |
//! | context | [`context`] | what every reactor and route shares |
//! | HTTP API | [`routes`] | what each request means |
//! | reactor | [`reactor`] | sockets: the poll loop, the exchange, the fan-out |
//! | start-up | [`startup`] | building it all, threads, signals |

pub mod auth;
pub mod config;
pub mod context;
pub mod heap;
pub mod http;
pub mod ingress;
pub mod log;
pub mod metrics;
pub mod reactor;
pub mod routes;
pub mod startup;
pub mod store;
pub mod stream;
pub mod time;
