//! One simulated browser tab of the many-stream client: its slot (who it
//! is, what it has seen), its connection and handshake phase, the requests
//! it sends, the sockets it dials, and what it counts from its stream's
//! bytes. The loop that drives many of them is the client module.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};
use sse_testkit::{access_token, enc, find, FrameReader};

use crate::hist::Histogram;
use crate::protocol::{Route, Stats, StreamKind, TargetKind};
use crate::wire::{json_u64, Dechunker};

/// Nanoseconds since the Unix epoch: the clock of every latency figure.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Source address `k` of worker `index`: 127.(10+index).x.y, spread over
/// 250 x 250 hosts, so neither the ephemeral port range nor a per-IP limit
/// binds.
pub fn source_addr(index: u32, k: u64) -> SocketAddr {
    let b = 10 + (index % 200) as u8;
    let c = ((k / 250) % 250) as u8;
    let d = (k % 250) as u8 + 1;
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, b, c, d), 0))
}

/// The reconnection delay before a server sent `retry:` (EventSource's
/// default is of this order).
pub const DEFAULT_RETRY_MS: u64 = 1000;

/// One simulated browser tab.
pub struct Slot {
    pub user: String,
    pub device: String,
    pub token: Option<String>,
    pub ticket: Option<String>,
    pub conn: Option<usize>,
    pub attempt: u32,
    pub open: bool,
    /// Highest `seq` seen and how many distinct events arrived in order.
    pub highest: u64,
    pub unique: u64,
    pub dups: u64,
    /// Reopen with `Last-Event-ID` when the server closes the stream.
    pub resume: bool,
    /// The id of the last block that had one (what EventSource would send).
    pub last_id: Option<String>,
    /// The reconnection delay the server asked for (`retry:`), in ms.
    pub retry_ms: u64,
    /// When the server closed this tab's stream, until it is open again.
    pub closed_at: Option<Instant>,
}

impl Slot {
    /// A tab of `user` on `device` that has opened nothing yet.
    pub fn new(user: String, device: String) -> Slot {
        Slot {
            user,
            device,
            token: None,
            ticket: None,
            conn: None,
            attempt: 0,
            open: false,
            highest: 0,
            unique: 0,
            dups: 0,
            resume: false,
            last_id: None,
            retry_ms: DEFAULT_RETRY_MS,
            closed_at: None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    /// The ticket request is out; waiting for its response.
    Ticket,
    /// The stream request is out; waiting for its head.
    Stream,
    Streaming,
}

pub struct Conn {
    pub sock: TcpStream,
    /// The TLS session over `sock`, to an `https://` server.
    pub tls: Option<Box<rustls::ClientConnection>>,
    pub slot: usize,
    pub phase: Phase,
    pub out: Vec<u8>,
    pub out_pos: usize,
    pub input: Vec<u8>,
    pub chunked: Option<Dechunker>,
    pub sse: FrameReader,
    pub deadline: Instant,
}

pub struct Target {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    pub host: String,
    /// The access-token secret.
    pub secret: String,
    /// The requests of a [`TargetKind::Url`] server.
    pub route: Option<Route>,
    /// What every connection's TLS session starts from (an `https://` server).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// The server at `addr`; a [`TargetKind::Url`] server needs its
    /// `route`. The servers the harness starts are on loopback; a server
    /// given by URL may be anywhere.
    pub fn new(
        kind: TargetKind,
        addr: &str,
        secret: &str,
        route: Option<Route>,
    ) -> Result<Target, String> {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("addr {addr}: {e}"))?;
        if kind == TargetKind::Url && route.is_none() {
            return Err("a url target needs a route".into());
        }
        let tls = match route.as_ref().and_then(|r| r.tls.as_ref()) {
            Some(setup) => Some(setup.client_config()?),
            None => None,
        };
        Ok(Target {
            kind,
            addr,
            tls,
            host: route
                .as_ref()
                .and_then(|r| r.host.clone())
                .unwrap_or_else(|| addr.to_string()),
            secret: secret.to_owned(),
            route,
        })
    }
}

/// The ticket request, or the stream request when a ticket is at hand.
pub fn first_request(
    target: &Target,
    kind: Option<StreamKind>,
    slot: &mut Slot,
) -> Result<Vec<u8>, String> {
    if target.kind == TargetKind::Floor {
        return Ok(format!(
            "GET /floor?deviceId={} HTTP/1.1\r\nHost: {}\r\n\r\n",
            slot.device, target.host
        )
        .into_bytes());
    }
    if target.kind == TargetKind::Nchan {
        return Ok(format!(
            "GET /sub?deviceId={} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
            slot.device, target.host
        )
        .into_bytes());
    }
    let route = target.route.as_ref();
    let ticket_path = match route {
        Some(r) => r.ticket_path.as_deref(),
        None => Some("/sse/stream-ticket"),
    };
    let Some(ticket_path) = ticket_path.filter(|_| slot.ticket.is_none()) else {
        if route.is_some() {
            // A server without tickets may want the bearer on the stream.
            authorize(target, slot)?;
        }
        return Ok(stream_request(target, slot, kind));
    };
    authorize(target, slot)?;
    let body = match route {
        Some(r) => r.ticket_body.clone(),
        None => {
            let purpose = match kind {
                Some(StreamKind::Alerts) => "alerts",
                _ => "data",
            };
            format!(r#"{{"purpose":"{purpose}","ttlSeconds":3600}}"#)
        }
    };
    Ok(format!(
        "POST {ticket_path} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        target.host,
        authorization(slot),
        body.len(),
        body
    )
    .into_bytes())
}

/// Gives the tab its access token once: the route's fixed bearer, or one
/// minted from the target's secret (none when there is neither).
fn authorize(target: &Target, slot: &mut Slot) -> Result<(), String> {
    if slot.token.is_some() {
        return Ok(());
    }
    let route = target.route.as_ref();
    if let Some(bearer) = route.and_then(|r| r.bearer.as_ref()) {
        slot.token = Some(bearer.clone());
        return Ok(());
    }
    if target.secret.is_empty() {
        return Ok(());
    }
    let role = route.and_then(|r| r.role.as_deref());
    let token = access_token(&target.secret, &slot.user, role, 7200);
    if token.is_empty() {
        return Err("jwt".into());
    }
    slot.token = Some(token);
    Ok(())
}

/// The tab's `Authorization` header line, or nothing.
fn authorization(slot: &Slot) -> String {
    slot.token
        .as_deref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default()
}

/// Streaming bytes: de-chunk, parse, count.
pub fn body(
    conn: &mut Conn,
    slot: &mut Slot,
    stats: &mut Stats,
    hist: &mut Histogram,
    total_dups: &mut u64,
    scratch: &mut Vec<u8>,
    bytes: &[u8],
) -> Result<(), String> {
    let data: &[u8] = match conn.chunked.as_mut() {
        Some(d) => {
            scratch.clear();
            let done = d
                .feed(bytes, scratch)
                .map_err(|_| "bad_chunk".to_string())?;
            if done {
                return Err("stream_ended".into());
            }
            scratch
        }
        None => bytes,
    };
    let now = now_ns();
    conn.sse
        .feed(data, |block| {
            if let Some(ms) = block.retry {
                slot.retry_ms = ms;
            }
            // Any block with an id sets the last event id, as in EventSource.
            if let Some(id) = block.id.filter(|id| id.iter().all(u8::is_ascii_graphic)) {
                slot.last_id = Some(String::from_utf8_lossy(id).into_owned());
            }
            // A block without data dispatches nothing (preamble, comments).
            let Some(data) = block.data.as_deref() else {
                return;
            };
            let name = block.event.unwrap_or(b"message");
            // Another server's events are ours when they carry the clock.
            let ours = matches!(name, b"realtime-update" | b"machine-alert")
                || (name != b"system" && find(data, b"\"t_pub_ns\":").is_some());
            if name == b"system" {
                stats.heartbeats += 1;
                if find(data, br#""kind":"replay-gap""#).is_some() {
                    stats.replay_gaps += 1;
                } else if find(data, br#""kind":"shutdown""#).is_some() {
                    stats.shutdowns += 1;
                }
            }
            if !ours {
                return;
            }
            stats.events += 1;
            if let Some(t) = json_u64(data, b"\"t_pub_ns\":") {
                hist.record_ns(now.saturating_sub(t));
            }
            if let Some(seq) = json_u64(data, b"\"seq\":") {
                if seq > slot.highest {
                    slot.highest = seq;
                    slot.unique += 1;
                } else {
                    slot.dups += 1;
                    stats.dups += 1;
                    *total_dups += 1;
                }
            }
        })
        .map_err(|_| "event_too_large".to_string())
}

pub fn stream_request(target: &Target, slot: &Slot, kind: Option<StreamKind>) -> Vec<u8> {
    let ticket = slot.ticket.as_deref().unwrap_or("");
    let (path, auth) = match (&target.route, kind) {
        (Some(r), _) => (
            r.stream_path
                .replace("{ticket}", &enc(ticket))
                .replace("{device}", &enc(&slot.device))
                .replace("{user}", &enc(&slot.user)),
            // Without tickets the stream itself carries the bearer, if any.
            if r.ticket_path.is_none() {
                authorization(slot)
            } else {
                String::new()
            },
        ),
        (None, Some(StreamKind::Alerts)) => (format!("/sse/alerts?ticket={ticket}"), String::new()),
        (None, _) => (
            format!("/sse/stream?deviceId={}&ticket={ticket}", slot.device),
            String::new(),
        ),
    };
    let resume = match slot.last_id.as_deref() {
        Some(id) if slot.resume => format!("Last-Event-ID: {id}\r\n"),
        _ => String::new(),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Accept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n",
        target.host
    )
    .into_bytes()
}

impl Conn {
    /// Whether a write is due: request bytes not sent yet, or TLS records.
    pub fn wants_write(&self) -> bool {
        self.out_pos < self.out.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Reads response bytes (decrypted, over TLS).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            Some(tls) => crate::tls::read(tls, &mut self.sock, buf),
            None => self.sock.read(buf),
        }
    }
}

pub fn flush(conn: &mut Conn) -> io::Result<()> {
    if conn.phase == Phase::Connecting {
        return Ok(());
    }
    if let Some(tls) = conn.tls.as_deref_mut() {
        while conn.out_pos < conn.out.len() {
            match crate::tls::write(tls, &mut conn.sock, &conn.out[conn.out_pos..])? {
                0 => break, // rustls's buffer is full until the socket drains
                n => conn.out_pos += n,
            }
        }
        return crate::tls::send_pending(tls, &mut conn.sock);
    }
    while conn.out_pos < conn.out.len() {
        match conn.sock.write(&conn.out[conn.out_pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => conn.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether connections to `dst` get source addresses of their own (see
/// [`source_addr`]): only in 127.0.0.0/8, where every address is this
/// machine's. Elsewhere the kernel picks the source, and one source
/// address reaches one server port about 28,000 times at once (the
/// ephemeral port range).
pub fn spreads_sources(dst: &SocketAddr) -> bool {
    matches!(dst, SocketAddr::V4(a) if a.ip().is_loopback())
}

/// A non-blocking socket (bound to `src` if given) connecting to `dst`.
pub fn connect_from(src: Option<SocketAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(src) = src {
        sock.bind(&src.into())?;
    }
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}

/// A short name for an I/O error, for the error table.
pub fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EADDRNOTAVAIL) => "addrnotavail".into(),
        Some(libc::EADDRINUSE) => "addrinuse".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "nofile".into(),
        Some(libc::ETIMEDOUT) => "timedout".into(),
        Some(libc::EPIPE) => "pipe".into(),
        Some(n) => format!("errno{n}"),
        // A TLS failure (a certificate refused, an alert): rustls says what.
        None if e.kind() == io::ErrorKind::InvalidData => format!("tls ({e})"),
        None => format!("{:?}", e.kind()).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sse_gateway::auth::token::TokenKey;

    fn slot() -> Slot {
        Slot::new("u7".into(), "d3".into())
    }

    fn target(kind: TargetKind) -> Target {
        Target {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            host: "127.0.0.1:8080".into(),
            secret: "load-secret".into(),
            route: None,
            tls: None,
        }
    }

    #[test]
    fn a_tab_asks_for_a_ticket_with_a_token_the_gateway_verifies_then_streams() {
        let (t, mut s) = (target(TargetKind::Gateway), slot());
        let req = String::from_utf8(first_request(&t, Some(StreamKind::Alerts), &mut s).unwrap())
            .unwrap();
        assert!(req.starts_with("POST /sse/stream-ticket HTTP/1.1\r\n"));
        assert!(req.ends_with(r#"{"purpose":"alerts","ttlSeconds":3600}"#));
        let token = s.token.clone().unwrap();
        assert!(req.contains(&format!("Authorization: Bearer {token}\r\n")));
        let who = TokenKey::new(b"load-secret").verify(&token).expect("valid");
        assert_eq!(who.user.to_string(), "u7");
        s.ticket = Some("tk".into());
        let req = first_request(&t, Some(StreamKind::Data), &mut s).unwrap();
        assert!(req.starts_with(b"GET /sse/stream?deviceId=d3&ticket=tk HTTP/1.1\r\n"));
        let floor = first_request(&target(TargetKind::Floor), None, &mut slot()).unwrap();
        assert!(floor.starts_with(b"GET /floor?deviceId=d3 HTTP/1.1\r\n"));
    }

    #[test]
    fn a_resuming_tab_keeps_the_last_id_and_retry_and_sends_last_event_id() {
        let t = target(TargetKind::Gateway);
        let mut s = slot();
        s.ticket = Some("tk".into());
        let mut conn = Conn {
            sock: TcpStream::from_std(
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| std::net::TcpStream::connect(l.local_addr()?))
                    .unwrap(),
            ),
            tls: None,
            slot: 0,
            phase: Phase::Streaming,
            out: Vec::new(),
            out_pos: 0,
            input: Vec::new(),
            chunked: None,
            sse: FrameReader::default(),
            deadline: Instant::now(),
        };
        let (mut stats, mut hist, mut dups, mut scratch) =
            (Stats::default(), Histogram::default(), 0, Vec::new());
        let bytes = b"id: 5-1\nevent: realtime-update\ndata: {\"seq\":1}\n\nevent: system\ndata: {\"kind\":\"replay-gap\"}\n\nretry: 2500\nevent: system\ndata: {\"kind\":\"shutdown\"}\n\n";
        body(
            &mut conn,
            &mut s,
            &mut stats,
            &mut hist,
            &mut dups,
            &mut scratch,
            bytes,
        )
        .unwrap();
        assert_eq!((s.last_id.as_deref(), s.retry_ms), (Some("5-1"), 2500));
        assert_eq!(
            (stats.events, stats.replay_gaps, stats.shutdowns),
            (1, 1, 1)
        );
        let plain = stream_request(&t, &s, Some(StreamKind::Data));
        assert!(!String::from_utf8(plain).unwrap().contains("Last-Event-ID"));
        s.resume = true;
        let req = String::from_utf8(stream_request(&t, &s, Some(StreamKind::Data))).unwrap();
        assert!(req.contains("\r\nLast-Event-ID: 5-1\r\n\r\n"), "{req}");
    }

    #[test]
    fn a_server_named_by_url_gets_its_host_header_and_sources_only_on_127() {
        let route = Route {
            stream_path: "/s?d={device}".into(),
            ticket_path: None,
            ticket_body: String::new(),
            bearer: None,
            role: None,
            host: Some("gw.example:8080".into()),
            tls: None,
            sources: Vec::new(),
        };
        let t = Target::new(TargetKind::Url, "192.0.2.1:8080", "", Some(route)).unwrap();
        let req = String::from_utf8(first_request(&t, None, &mut slot()).unwrap()).unwrap();
        assert!(
            req.starts_with("GET /s?d=d3 HTTP/1.1\r\nHost: gw.example:8080\r\n"),
            "{req}"
        );
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(spreads_sources(&at("127.0.0.1:80")));
        for elsewhere in ["[::1]:80", "192.0.2.1:80", "10.1.2.3:80"] {
            assert!(!spreads_sources(&at(elsewhere)), "{elsewhere}");
        }
    }

    #[test]
    fn source_addresses_are_distinct_loopback_hosts_per_worker() {
        let mut seen = std::collections::HashSet::new();
        for index in [0, 1] {
            for k in 0..1000 {
                let a = source_addr(index, k);
                assert!(a.ip().is_loopback() && a.port() == 0, "{a}");
                assert!(seen.insert(a.ip()), "{a} twice");
            }
        }
    }
}
