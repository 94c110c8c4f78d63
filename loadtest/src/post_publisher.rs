//! An event source over HTTP: each event is a `POST` to a [`PostRoute`],
//! pipelined on a few keep-alive connections, with the same payload the Redis
//! publisher sends (`{"deviceId":"d17","data":{"seq":N,"t_pub_ns":T}}`): to
//! nchan's publisher location `POST /pub?id=<device>` (`loadtest/peers/nchan.conf`)
//! as it is, or to the gateway's `POST /sse/publish` wrapped as
//! `{"channel":..,"message":..}` with an admin bearer. A device always goes
//! over the same connection, so its events arrive in order. A reader thread
//! per connection counts the responses (2xx = taken; anything else is
//! counted as a publish error by status). To an `https://` server each
//! connection is a TLS session split between the two threads.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sse_testkit::enc;

use crate::publisher::{await_replies, event_payload, pace, Publish, Rotation, Step};

/// A response body larger than this ends the reader (nchan's and the
/// gateway's are ~100 bytes).
const MAX_BODY: usize = 64 * 1024;

/// Where and how each event is POSTed.
#[derive(Clone, Debug)]
pub struct PostRoute {
    /// The path, with `{device}` filled in: `/pub?id={device}` for nchan.
    pub path: String,
    /// `Authorization: Bearer` of every request.
    pub bearer: Option<String>,
    /// Some(channel): the body is `{"channel":channel,"message":<event>}`
    /// (`POST /sse/publish`); None: the event itself.
    pub channel: Option<String>,
}

impl PostRoute {
    /// nchan's publisher location in `peers/nchan.conf`.
    pub fn nchan() -> PostRoute {
        PostRoute {
            path: "/pub?id={device}".into(),
            bearer: None,
            channel: None,
        }
    }
}

/// One keep-alive connection's writing end.
enum Conn {
    Plain(TcpStream),
    Tls(crate::tls::TlsWriter),
}

impl Conn {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes),
            Conn::Tls(w) => w.write_all(bytes),
        }
    }

    fn shutdown(&self) {
        match self {
            Conn::Plain(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Conn::Tls(w) => w.shutdown(),
        }
    }
}

pub struct PostPublisher {
    route: PostRoute,
    conns: Vec<Conn>,
    replies: Arc<AtomicU64>,
    /// Responses other than 201/202, by status (0: unreadable response).
    refused: Arc<Mutex<BTreeMap<u16, u64>>>,
    host: String,
    devices: Rotation,
    sent: u64,
}

impl PostPublisher {
    /// `host`: the `Host` header (None: `addr`), and the TLS name when
    /// `tls` is given.
    pub fn connect(
        addr: SocketAddr,
        host: Option<&str>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        route: PostRoute,
        devices: Vec<String>,
        connections: usize,
    ) -> Result<PostPublisher, String> {
        if devices.is_empty() {
            return Err("the HTTP publisher needs a device".into());
        }
        let replies = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let mut conns = Vec::new();
        for i in 0..connections.max(1) {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("publish to {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            let (conn, reader): (Conn, Box<dyn Read + Send>) = match tls {
                Some(config) => {
                    let name = host.map_or_else(|| addr.to_string(), str::to_owned);
                    let (w, r) = crate::tls::split_blocking(config, &name, s)
                        .map_err(|e| format!("publish to {addr}: tls: {e}"))?;
                    (Conn::Tls(w), Box::new(r))
                }
                None => {
                    let r = s.try_clone().map_err(|e| e.to_string())?;
                    (Conn::Plain(s), Box::new(r))
                }
            };
            let (r, f) = (replies.clone(), refused.clone());
            std::thread::Builder::new()
                .name(format!("post-replies-{i}"))
                .spawn(move || read_responses(reader, &r, &f))
                .map_err(|e| e.to_string())?;
            conns.push(conn);
        }
        Ok(PostPublisher {
            route,
            conns,
            replies,
            refused,
            host: host.map_or_else(|| addr.to_string(), str::to_owned),
            devices: Rotation::new(devices),
            sent: 0,
        })
    }

    fn push_event(&mut self, bufs: &mut [Vec<u8>]) {
        let (d, device, seq) = self.devices.next();
        let event = event_payload(device, "data", seq);
        let body = match &self.route.channel {
            Some(channel) => format!(r#"{{"channel":"{channel}","message":{event}}}"#),
            None => event,
        };
        let path = self.route.path.replace("{device}", &enc(device));
        let auth = self
            .route
            .bearer
            .as_deref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let out = &mut bufs[d % bufs.len()];
        let _ = write!(
            out,
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.sent += 1;
    }

    /// Waits (bounded) until the server has answered every POST sent.
    fn wait_replies(&self, limit: Duration) -> Result<(), String> {
        await_replies(
            &self.replies,
            self.sent,
            limit,
            "the server answered {} of {} POSTs",
        )
    }
}

fn read_responses(s: impl Read, replies: &AtomicU64, refused: &Mutex<BTreeMap<u16, u64>>) {
    let mut r = BufReader::with_capacity(256 * 1024, s);
    let mut line = String::new();
    let mut body = vec![0u8; MAX_BODY];
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        if length > MAX_BODY || r.read_exact(&mut body[..length]).is_err() {
            return;
        }
        if !(200..300).contains(&status) {
            if let Ok(mut m) = refused.lock() {
                *m.entry(status).or_default() += 1;
            }
        }
        replies.fetch_add(1, Relaxed);
    }
}

impl Publish for PostPublisher {
    fn step(&mut self, rate: u64, secs: f64) -> Result<Step, String> {
        let mut bufs: Vec<Vec<u8>> = (0..self.conns.len())
            .map(|_| Vec::with_capacity(256 * 1024))
            .collect();
        let step = pace(rate, secs, |n| {
            bufs.iter_mut().for_each(Vec::clear);
            for _ in 0..n {
                self.push_event(&mut bufs);
            }
            for (conn, buf) in self.conns.iter_mut().zip(&bufs) {
                conn.write_all(buf).map_err(|e| format!("publish: {e}"))?;
            }
            Ok(())
        })?;
        Ok(step)
    }

    fn settle(&mut self) -> Result<(), String> {
        self.wait_replies(Duration::from_secs(30))
    }

    fn published(&self) -> BTreeMap<String, u64> {
        self.devices.published()
    }

    fn errors(&self) -> BTreeMap<String, u64> {
        self.refused
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("publish_http_{k}"), *v))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for PostPublisher {
    fn drop(&mut self) {
        for c in &self.conns {
            c.shutdown();
        }
    }
}
