//! HTTP/1.1, only as much as the gateway speaks: request heads parsed with
//! httparse under hard limits ([`head`]), query strings ([`query`]), and
//! responses written in one buffer ([`response`]). No framework, no body
//! streaming: requests are small and the streams go the other way.

pub mod head;
pub mod query;
pub mod response;
