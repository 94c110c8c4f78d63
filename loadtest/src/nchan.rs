//! The nchan peer's event source: each event is an HTTP `POST /pub?id=<device>`
//! to nchan's publisher location (`loadtest/peers/nchan.conf`), pipelined on a
//! few keep-alive connections, with the same payload the Redis publisher sends
//! (`{"deviceId":"d17","data":{"seq":N,"t_pub_ns":T}}`). A device always goes
//! over the same connection, so its events reach nchan in order. A reader
//! thread per connection counts the responses (201/202 = stored; anything
//! else is counted as a publish error).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::now_ns;
use crate::publisher::{await_replies, pace, Publish, Step};

/// A response body larger than this ends the reader (nchan's are ~100 bytes).
const MAX_BODY: usize = 64 * 1024;

pub struct NchanPublisher {
    conns: Vec<TcpStream>,
    replies: Arc<AtomicU64>,
    /// Responses other than 201/202, by status (0: unreadable response).
    refused: Arc<Mutex<BTreeMap<u16, u64>>>,
    host: String,
    devices: Vec<String>,
    seq: Vec<u64>,
    next: usize,
    sent: u64,
}

impl NchanPublisher {
    pub fn connect(
        addr: SocketAddr,
        devices: Vec<String>,
        connections: usize,
    ) -> Result<NchanPublisher, String> {
        if !addr.ip().is_loopback() || devices.is_empty() {
            return Err("nchan publisher needs a loopback address and a device".into());
        }
        let replies = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let mut conns = Vec::new();
        for i in 0..connections.max(1) {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("nchan {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            let reader = s.try_clone().map_err(|e| e.to_string())?;
            let (r, f) = (replies.clone(), refused.clone());
            std::thread::Builder::new()
                .name(format!("nchan-replies-{i}"))
                .spawn(move || read_responses(reader, &r, &f))
                .map_err(|e| e.to_string())?;
            conns.push(s);
        }
        Ok(NchanPublisher {
            conns,
            replies,
            refused,
            host: addr.to_string(),
            seq: vec![0; devices.len()],
            devices,
            next: 0,
            sent: 0,
        })
    }

    fn push_event(&mut self, bufs: &mut [Vec<u8>]) {
        let d = self.next;
        self.next = (self.next + 1) % self.devices.len();
        self.seq[d] += 1;
        let payload = format!(
            r#"{{"deviceId":"{}","data":{{"seq":{},"t_pub_ns":{}}}}}"#,
            self.devices[d],
            self.seq[d],
            now_ns()
        );
        let out = &mut bufs[d % bufs.len()];
        let _ = write!(
            out,
            "POST /pub?id={} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{payload}",
            self.devices[d],
            self.host,
            payload.len()
        );
        self.sent += 1;
    }

    /// Waits (bounded) until nchan has answered every POST sent.
    fn wait_replies(&self, limit: Duration) -> Result<(), String> {
        await_replies(
            &self.replies,
            self.sent,
            limit,
            "nchan answered {} of {} POSTs",
        )
    }
}

fn read_responses(s: TcpStream, replies: &AtomicU64, refused: &Mutex<BTreeMap<u16, u64>>) {
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
        if status != 201 && status != 202 {
            if let Ok(mut m) = refused.lock() {
                *m.entry(status).or_default() += 1;
            }
        }
        replies.fetch_add(1, Relaxed);
    }
}

impl Publish for NchanPublisher {
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
                conn.write_all(buf)
                    .map_err(|e| format!("nchan publish: {e}"))?;
            }
            Ok(())
        })?;
        Ok(step)
    }

    fn settle(&mut self) -> Result<(), String> {
        self.wait_replies(Duration::from_secs(30))
    }

    fn published(&self) -> BTreeMap<String, u64> {
        self.devices
            .iter()
            .cloned()
            .zip(self.seq.iter().copied())
            .collect()
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

impl Drop for NchanPublisher {
    fn drop(&mut self) {
        for c in &self.conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
