//! Where a Redis node is and how one connection to it is opened: the
//! `host:port` lists of the flags, the URL's scheme, login and db pointed at
//! one node, and the timeouts every connection of the gateway gets. Shared
//! by the one-server, Sentinel and Cluster deployments.

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, RedisResult, TlsCertificates};

/// Longest wait for a connection to be set up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest wait for an answer. Longer than the reactors' 2 s lookup
/// deadline, so that a lookup Redis answers late still comes back (and a
/// lease it took is given back) instead of dying with its connection while
/// Redis runs it anyway.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's host and port.
pub type Node = (String, u16);

/// `host:port` entries of a list flag.
pub fn addresses(flag: &str, entries: &[String]) -> Result<Vec<Node>, String> {
    entries
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            entry
                .rsplit_once(':')
                .and_then(|(host, port)| {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
                    (!host.is_empty()).then(|| (host.to_owned(), port))
                })
                .ok_or_else(|| format!("{flag}: `{entry}` is not host:port"))
        })
        .collect()
}

/// `template` (scheme, user, password, db) pointed at `host:port`.
pub fn at(template: &ConnectionInfo, (host, port): Node) -> ConnectionInfo {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    template.clone().set_addr(addr)
}

/// A client for `info`, with the CA and client certificate when given.
pub fn client(info: ConnectionInfo, certs: &Option<TlsCertificates>) -> RedisResult<redis::Client> {
    match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
        None => redis::Client::open(info),
    }
}

/// A connection through `client`, set up within [`CONNECT_TIMEOUT`] and
/// with `io` on every read and write.
pub fn connection(client: &redis::Client, io: Duration) -> RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(io))?;
    con.set_write_timeout(Some(io))?;
    Ok(con)
}
