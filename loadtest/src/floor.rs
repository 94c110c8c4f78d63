//! The floor: what this machine can do at best. `loadtest floor-server` is a
//! minimal single-threaded mio program with no HTTP framework and no Redis:
//! it accepts loopback connections, reads the request line only to learn the
//! device, writes the gateway's own stream head and preamble
//! ([`stream_head`]), and then, at the rate it is told, writes each event's
//! frame to every socket of that device with one `write` per frame. The frame
//! is built by the gateway's own code ([`message_for`] for the `data:` line,
//! [`Frame::encode`] for the bytes), so it is byte for byte what the gateway
//! would send. Its CPU-seconds per
//! million deliveries is the yardstick every server figure is divided by.
//!
//! It is steered over stdin/stdout like a worker ([`FloorPublisher`] is the
//! coordinator's side).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::process::{ChildStdin, ChildStdout};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use serde::{Deserialize, Serialize};

use sse_gateway::http::response::stream_head;
use sse_gateway::stream::frame::{message_for, Event, EventId, Frame};

use crate::client::now_ns;
use crate::publisher::{Publish, Step};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
const MAX_LIFETIME: Duration = Duration::from_secs(3 * 3600);
/// A client that lets this much pile up is dropped, as a slow consumer.
const MAX_PENDING: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum FloorCommand {
    Step { rate: u64, secs: f64 },
    Quit,
}

#[derive(Serialize, Deserialize, Default)]
pub struct FloorStep {
    pub sent: u64,
    pub secs: f64,
    pub published: BTreeMap<String, u64>,
    pub dropped: u64,
}

struct Conn {
    sock: TcpStream,
    request: Vec<u8>,
    device: Option<usize>,
    pending: Vec<u8>,
}

struct Active {
    start: Instant,
    rate: u64,
    total: u64,
    done: u64,
    limit: f64,
}

pub fn run(port: u16, devices: usize, prefix: &str) -> i32 {
    match serve(port, devices.max(1), prefix) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("floor-server: {e}");
            1
        }
    }
}

fn serve(port: u16, devices: usize, prefix: &str) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut listener = listen(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel::<FloorCommand>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Ok(cmd) = serde_json::from_str::<FloorCommand>(&line) {
                if tx.send(cmd).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
        }
        let _ = tx.send(FloorCommand::Quit);
        let _ = waker.wake();
    });

    let names: Vec<String> = (0..devices).map(|d| format!("{prefix}{d}")).collect();
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut subs: Vec<Vec<usize>> = vec![Vec::new(); devices];
    let mut seq = vec![0u64; devices];
    let mut conns: slab_lite::Slab<Conn> = slab_lite::Slab::default();
    let mut events = Events::with_capacity(1024);
    let mut active: Option<Active> = None;
    let (mut next_dev, mut global_seq, mut dropped) = (0usize, 0u64, 0u64);
    let born = Instant::now();
    let head = stream_head(None);
    // The greeting: the coordinator waits for it before connecting.
    println!("ready");
    io::stdout().flush()?;
    loop {
        let timeout = if active.is_some() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(50)
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => loop {
                    match listener.accept() {
                        Ok((mut sock, _)) => {
                            let _ = sock.set_nodelay(true);
                            let key = conns.vacant_key();
                            if poll
                                .registry()
                                .register(
                                    &mut sock,
                                    Token(key),
                                    Interest::READABLE | Interest::WRITABLE,
                                )
                                .is_ok()
                            {
                                conns.insert(Conn {
                                    sock,
                                    request: Vec::new(),
                                    device: None,
                                    pending: Vec::new(),
                                });
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                },
                WAKER => {}
                Token(key) => {
                    let gone = match conns.get_mut(key) {
                        Some(c) => on_ready(
                            c,
                            ev.is_readable() || ev.is_read_closed(),
                            &index,
                            &mut subs,
                            key,
                            &head,
                        ),
                        None => false,
                    };
                    if gone {
                        close(&mut conns, &mut subs, &poll, key);
                    }
                }
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                FloorCommand::Step { rate, secs } => {
                    active = Some(Active {
                        start: Instant::now(),
                        rate,
                        total: (rate as f64 * secs).round() as u64,
                        done: 0,
                        limit: secs * 3.0 + 5.0,
                    });
                }
                FloorCommand::Quit => return Ok(()),
            }
        }
        if let Some(a) = active.as_mut() {
            let elapsed = a.start.elapsed().as_secs_f64();
            let due = ((elapsed * a.rate as f64) as u64).min(a.total);
            let mut slow = Vec::new();
            while a.done < due {
                let d = next_dev;
                next_dev = (next_dev + 1) % devices;
                seq[d] += 1;
                global_seq += 1;
                let frame = frame_bytes(&names[d], seq[d], global_seq);
                for &key in &subs[d] {
                    if let Some(c) = conns.get_mut(key) {
                        if !send(c, &frame) {
                            slow.push(key);
                        }
                    }
                }
                a.done += 1;
            }
            for key in slow {
                dropped += 1;
                close(&mut conns, &mut subs, &poll, key);
            }
            if a.done >= a.total || elapsed > a.limit {
                let reply = FloorStep {
                    sent: a.done,
                    secs: elapsed,
                    published: names.iter().cloned().zip(seq.iter().copied()).collect(),
                    dropped,
                };
                println!("{}", serde_json::to_string(&reply).unwrap_or_default());
                io::stdout().flush()?;
                active = None;
            }
        }
        if born.elapsed() > MAX_LIFETIME {
            return Ok(());
        }
    }
}

/// A listener with the gateway's backlog, so a burst of connects is not
/// dropped and retried after the kernel's 1 s SYN timeout.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(8192)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Reads the request (once) or discards input; flushes what is pending.
/// Returns true when the connection is finished.
fn on_ready(
    c: &mut Conn,
    readable: bool,
    index: &HashMap<&str, usize>,
    subs: &mut [Vec<usize>],
    key: usize,
    head: &[u8],
) -> bool {
    if readable {
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            match c.sock.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) if c.device.is_none() => {
                    c.request.extend_from_slice(&buf[..n]);
                    if c.request.len() > 8192 {
                        return true;
                    }
                    if sse_testkit::find(&c.request, b"\r\n\r\n").is_some() {
                        let Some(d) = device_of(&c.request).and_then(|d| index.get(d.as_str()))
                        else {
                            return true;
                        };
                        c.device = Some(*d);
                        subs[*d].push(key);
                        c.request = Vec::new();
                        if !send(c, head) {
                            return true;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
    if !c.pending.is_empty() {
        match c.sock.write(&c.pending) {
            Ok(n) => {
                c.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

/// One `write` of the frame, or queue it behind what is pending. False when
/// the client is too far behind.
fn send(c: &mut Conn, frame: &[u8]) -> bool {
    if c.pending.is_empty() {
        match c.sock.write(frame) {
            Ok(n) if n == frame.len() => return true,
            Ok(n) => c.pending.extend_from_slice(&frame[n..]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.pending.extend_from_slice(frame),
            Err(_) => return false,
        }
    } else {
        c.pending.extend_from_slice(frame);
    }
    c.pending.len() <= MAX_PENDING
}

fn close(conns: &mut slab_lite::Slab<Conn>, subs: &mut [Vec<usize>], poll: &Poll, key: usize) {
    if let Some(mut c) = conns.remove(key) {
        let _ = poll.registry().deregister(&mut c.sock);
        if let Some(list) = c.device.and_then(|d| subs.get_mut(d)) {
            if let Some(i) = list.iter().position(|k| *k == key) {
                list.swap_remove(i);
            }
        }
    }
}

/// `deviceId=` from the request line.
fn device_of(request: &[u8]) -> Option<String> {
    let line = request.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let query = line.split(' ').nth(1)?.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("deviceId="))
        .map(str::to_owned)
}

/// The frame the gateway sends for this event, built by the gateway's own
/// code: the `data:` line from the published payload (with its
/// `"timestamp"`), then the encoded frame.
pub fn frame_bytes(device: &str, seq: u64, global: u64) -> Vec<u8> {
    let ns = now_ns();
    let ms = ns / 1_000_000;
    let payload = format!(r#"{{"deviceId":"{device}","data":{{"seq":{seq},"t_pub_ns":{ns}}}}}"#);
    let id = EventId { ms, seq: global };
    match message_for(Event::RealtimeUpdate, payload.as_bytes(), ms) {
        Ok(m) => Frame::encode(Some(id), m.event, &m.device, &m.data)
            .bytes
            .into_vec(),
        // Device names are the floor's own (`d0`...), so the payload is JSON.
        Err(_) => Vec::new(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for epoch milliseconds: the gateway's own
/// formatter, so the floor's frames are byte for byte the gateway's.
pub use sse_gateway::time::iso8601;

/// The coordinator's handle on a floor server's control pipes.
pub struct FloorPublisher {
    stdin: ChildStdin,
    replies: Receiver<String>,
    published: BTreeMap<String, u64>,
}

impl FloorPublisher {
    /// Takes the pipes and waits (bounded) for the server's `ready`.
    pub fn new(stdin: ChildStdin, stdout: ChildStdout) -> Result<FloorPublisher, String> {
        let rx = crate::proc::lines(stdout);
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l == "ready" => {}
            other => return Err(format!("floor-server did not start: {other:?}")),
        }
        Ok(FloorPublisher {
            stdin,
            replies: rx,
            published: BTreeMap::new(),
        })
    }
}

impl Publish for FloorPublisher {
    fn step(&mut self, rate: u64, secs: f64) -> Result<Step, String> {
        let cmd =
            serde_json::to_string(&FloorCommand::Step { rate, secs }).map_err(|e| e.to_string())?;
        writeln!(self.stdin, "{cmd}").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        let wait = Duration::from_secs_f64(secs * 3.0 + 15.0);
        let line = self
            .replies
            .recv_timeout(wait)
            .map_err(|_| "floor-server did not finish its step".to_string())?;
        let r: FloorStep =
            serde_json::from_str(&line).map_err(|e| format!("floor said {line}: {e}"))?;
        self.published = r.published;
        Ok(Step {
            sent: r.sent,
            secs: r.secs,
        })
    }

    fn published(&self) -> BTreeMap<String, u64> {
        self.published.clone()
    }
}

impl Drop for FloorPublisher {
    fn drop(&mut self) {
        if let Ok(cmd) = serde_json::to_string(&FloorCommand::Quit) {
            let _ = writeln!(self.stdin, "{cmd}");
            let _ = self.stdin.flush();
        }
    }
}

/// A small slab: connections by reusable index.
mod slab_lite {
    pub struct Slab<T> {
        items: Vec<Option<T>>,
        free: Vec<usize>,
    }

    impl<T> Default for Slab<T> {
        fn default() -> Self {
            Slab {
                items: Vec::new(),
                free: Vec::new(),
            }
        }
    }

    impl<T> Slab<T> {
        pub fn vacant_key(&self) -> usize {
            self.free.last().copied().unwrap_or(self.items.len())
        }

        pub fn insert(&mut self, item: T) -> usize {
            match self.free.pop() {
                Some(k) => {
                    self.items[k] = Some(item);
                    k
                }
                None => {
                    self.items.push(Some(item));
                    self.items.len() - 1
                }
            }
        }

        pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
            self.items.get_mut(key).and_then(Option::as_mut)
        }

        pub fn remove(&mut self, key: usize) -> Option<T> {
            let item = self.items.get_mut(key)?.take();
            if item.is_some() {
                self.free.push(key);
            }
            item
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_769_517_296_789), "2026-01-27T12:34:56.789Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn frames_and_requests() {
        let f = String::from_utf8(frame_bytes("d3", 7, 9)).unwrap();
        assert!(f.starts_with("id: "));
        assert!(f.contains("\nevent: realtime-update\ndata: {\"deviceId\":\"d3\",\"data\":{\"seq\":7,\"t_pub_ns\":"));
        assert!(f.ends_with("Z\"}\n\n"));
        assert_eq!(
            device_of(b"GET /floor?x=1&deviceId=d12 HTTP/1.1\r\nHost: a\r\n\r\n").as_deref(),
            Some("d12")
        );
        assert_eq!(device_of(b"GET /floor HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn what_the_floor_sends_is_what_the_client_reads() {
        let mut bytes = stream_head(None);
        let (head, start) = sse_testkit::parse_head(&bytes).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert!(!head.is_chunked());
        bytes.extend(frame_bytes("d3", 7, 9));
        let mut got = Vec::new();
        sse_testkit::FrameReader::default()
            .feed(&bytes[start..], |b| {
                let data = b.data.as_deref().unwrap_or_default();
                got.push((
                    b.event.map(<[u8]>::to_vec),
                    b.id.is_some_and(|id| id.ends_with(b"-9")),
                    crate::wire::json_u64(data, b"\"seq\":"),
                    crate::wire::json_u64(data, b"\"t_pub_ns\":").is_some(),
                ))
            })
            .unwrap();
        assert_eq!(
            got,
            vec![
                (None, false, None, false),
                (Some(b"realtime-update".to_vec()), true, Some(7), true)
            ]
        );
    }
}
