//! `sse-testkit`: the one test kit of sse-gateway, used by the black-box
//! tests in `tests/` and by the load harness in `loadtest/`, so that the
//! repository has one SSE frame parser, one HTTP response-head parser and one
//! way to mint tokens (the gateway's own).
//!
//! Everything here talks to real processes over loopback and is bounded in
//! time: no helper blocks for longer than the timeout it is given (or a
//! documented default), so no test can hang.
//!
//! - [`frame`]: the `text/event-stream` parser ([`parse_block`], owned
//!   [`Frame`]s, the incremental [`FrameReader`]).
//! - [`stream`]: [`SseStream`], an event stream over a blocking socket, and
//!   the paths that open one.
//! - [`http`]: a raw HTTP/1.1 client ([`request`], [`get`], [`post`],
//!   [`delete`], [`send_raw`]) and [`parse_head`].
//! - [`tokens`]: access tokens through the gateway's `TokenKey`, and crafted
//!   ones.
//! - [`redis_server`]: [`Redis`], a private `redis-server`, killed on drop.
//! - [`gateway`]: [`Gateway`] / [`GatewayBuilder`], the gateway binary on a
//!   free port, its stderr collected, SIGKILLed on drop; [`run_cli`].
//! - [`probe`]: [`wait_until`], [`free_port`], [`metric_sum`], the clock,
//!   and /proc.

pub mod frame;
pub mod gateway;
pub mod http;
pub mod probe;
pub mod redis_server;
pub mod stream;
pub mod tokens;

pub use frame::{parse_block, parse_frame, Block, Frame, FrameReader, FrameTooLarge, MAX_FRAME};
pub use gateway::{gateway_binary, run_cli, Gateway, GatewayBuilder, SECRET};
pub use http::{
    build_request, delete, find, get, parse_head, post, request, send_raw, try_request, Raw,
    Response, HTTP_TIMEOUT,
};
pub use probe::{
    free_port, is_iso_ms, iso_to_ms, metric_sum, now_ms, proc_cpu_ticks, proc_fds, proc_rss_kib,
    try_free_port, wait_until,
};
pub use redis_server::{redis_server_args, Redis};
pub use stream::{alerts_path, data_path, data_stream, enc, SseStream};
pub use tokens::{access_token, sign_hs256};
