//! The connection state machine, driven in-process: one reactor assembled
//! as start-up assembles it (embedded store, one worker), turned one loop
//! turn at a time by the test, with real loopback sockets as clients and
//! store lookups held back so they finish late, in any order. Nothing runs
//! on another thread, so each scenario is replayed the same way every time.
//!
//! The named scenarios are the races that black-box tests can only hit by
//! timing (page reload, pipelining, partial writes, slow consumers, drain,
//! a client that leaves during its lookup); the property test throws
//! arbitrary interleavings at it and checks against a small model that
//! every connection ends or progresses and nothing leaks: no slab entry, no
//! registry slot, no per-IP count, no timer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Events;
use proptest::prelude::*;

use super::conn::Phase;
use super::mailbox::Inbox;
use super::Reactor;
use crate::config::Config;
use crate::context::Gateway;
use crate::store::memory::Memory;

const SECRET: &str = "in-process-test-secret-of-32-bytes!";

struct Lab {
    reactor: Reactor,
    gw: Arc<Gateway>,
    events: Events,
    addr: SocketAddr,
}

impl Lab {
    /// A reactor with `args` on top of: embedded, one worker, port 0.
    fn new(args: &[&str]) -> Lab {
        let mut argv = vec![
            "sse-gateway",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--jwt-secret",
            SECRET,
        ];
        argv.extend_from_slice(args);
        let config = Config::from_args(argv).expect("flags");
        let mut assembly = crate::startup::assemble(config).expect("assemble");
        let reactor = assembly.reactors.pop().expect("one reactor");
        Lab {
            reactor,
            gw: assembly.gw,
            events: Events::with_capacity(256),
            addr: assembly.local,
        }
    }

    fn memory(&self) -> &Memory {
        self.gw.store.memory().expect("embedded")
    }

    /// One loop turn that does not wait.
    fn turn(&mut self) {
        self.reactor
            .turn(&mut self.events, Some(Duration::ZERO))
            .expect("turn");
    }

    /// Turns (waiting at most 5 ms each) until `done` holds or `limit`
    /// passes; whether it held.
    fn until(&mut self, limit: Duration, mut done: impl FnMut(&mut Lab) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            self.reactor
                .turn(&mut self.events, Some(Duration::from_millis(5)))
                .expect("turn");
        }
    }

    /// Answers every held lookup, in the order given by `order` (indexes
    /// taken modulo the count), through the mailbox as Redis would.
    fn release(&mut self, order: &[usize]) {
        let mut held = self.memory().take_held();
        let mut sequence = Vec::new();
        for i in order {
            if !held.is_empty() {
                sequence.push(held.remove(i % held.len()));
            }
        }
        sequence.append(&mut held);
        for (job, reply) in sequence {
            let outcome = self.memory().run(job);
            self.gw.hub.mailboxes()[0].send(Inbox::Outcome {
                conn: reply.conn,
                serial: reply.serial,
                outcome,
            });
        }
    }

    fn token(&self, user: &str) -> String {
        crate::auth::token::TokenKey::new(SECRET.as_bytes()).mint(user, None, 600)
    }

    /// A fresh ticket for `user`, minted through the reactor.
    fn ticket(&mut self, user: &str) -> String {
        let mut c = Client::connect(self);
        let body = format!(
            "POST /sse/stream-ticket HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.token(user)
        );
        c.send(body.as_bytes());
        let held = self.memory().take_held();
        for (job, reply) in held {
            let outcome = self.memory().run(job);
            self.gw.hub.mailboxes()[0].send(Inbox::Outcome {
                conn: reply.conn,
                serial: reply.serial,
                outcome,
            });
        }
        assert!(self.until(Duration::from_secs(2), |_| c.pump().closed));
        let text = c.text();
        let at = text.find("\"ticket\":\"").expect("a ticket") + 10;
        text[at..at + text[at..].find('"').expect("end")].to_owned()
    }

    /// Phases of the open connections.
    fn phases(&self) -> Vec<&'static str> {
        self.reactor
            .conns
            .iter()
            .map(|(_, c)| match c.phase {
                Phase::Reading => "reading",
                Phase::Waiting(_) => "waiting",
                Phase::Retrying(_) => "retrying",
                Phase::Responding { .. } => "responding",
                Phase::Streaming(_) => "streaming",
                Phase::Closing { .. } => "closing",
            })
            .collect()
    }

    /// Registry slots agree with the streaming connections.
    fn check_slots(&self) {
        let streaming = self.phases().iter().filter(|p| **p == "streaming").count();
        assert_eq!(self.gw.registry.total(), streaming, "slots vs streams");
    }

    /// Nothing left: no connection, slot, per-IP count or timer.
    fn check_empty(&self) {
        assert_eq!(self.reactor.connections(), 0, "{:?}", self.phases());
        assert_eq!(self.gw.registry.total(), 0, "registry slots");
        assert_eq!(self.gw.peers.addresses(), 0, "per-IP counts");
        assert_eq!(self.reactor.wheel.len(), 0, "timers");
    }
}

struct Client {
    sock: TcpStream,
    got: Vec<u8>,
    closed: bool,
}

impl Client {
    fn connect(lab: &mut Lab) -> Client {
        Client::connect_with(lab, None)
    }

    /// A client whose receive buffer is `rcvbuf` bytes (partial writes).
    fn connect_with(lab: &mut Lab, rcvbuf: Option<usize>) -> Client {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).expect("rcvbuf");
        }
        sock.connect(&lab.addr.into()).expect("connect");
        sock.set_nonblocking(true).expect("nonblocking");
        lab.turn();
        Client {
            sock: sock.into(),
            got: Vec::new(),
            closed: false,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.sock.write_all(bytes);
    }

    /// Reads what is there (at most `max` bytes).
    fn read_some(&mut self, max: usize) -> &mut Client {
        let mut buf = vec![0u8; max.max(1)];
        match self.sock.read(&mut buf) {
            Ok(0) => self.closed = true,
            Ok(n) => self.got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.closed = true,
        }
        self
    }

    /// Reads everything there is now.
    fn pump(&mut self) -> &mut Client {
        for _ in 0..64 {
            let before = (self.got.len(), self.closed);
            self.read_some(65536);
            if (self.got.len(), self.closed) == before {
                break;
            }
        }
        self
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).into_owned()
    }

    fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
}

fn stream_request(ticket: &str, device: &str) -> Vec<u8> {
    format!("GET /sse/stream?ticket={ticket}&deviceId={device} HTTP/1.1\r\nHost: t\r\n\r\n")
        .into_bytes()
}

const T: Duration = Duration::from_secs(2);

#[test]
fn a_page_reload_never_meets_429() {
    let mut lab = Lab::new(&[]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut first = Client::connect(&mut lab);
    first.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| first.pump().statuses() == [200]));
    lab.check_slots();
    // The reload: the old page's socket closes and the new one asks in the
    // same instant; the reactor sees the request before the close.
    let mut second = Client::connect(&mut lab);
    second.send(&stream_request(&ticket, "M1"));
    drop(first);
    assert!(lab.until(T, |_| !second.pump().statuses().is_empty()));
    assert_eq!(second.statuses(), [200], "{}", second.text());
    lab.check_slots();
    drop(second);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut lab = Lab::new(&[]);
    let mut c = Client::connect(&mut lab);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\nDELETE /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(lab.until(T, |_| c.pump().closed));
    assert_eq!(c.statuses(), [200, 404, 405]);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

#[test]
fn a_large_response_completes_through_partial_writes() {
    let mut lab = Lab::new(&[]);
    let mut c = Client::connect_with(&mut lab, Some(2048));
    c.send(b"GET /sse/client.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let want = include_bytes!("../../web/sse-client.js").len();
    // Read a little at a time: the reactor meets a full socket buffer over
    // and over, and must resume exactly where it stopped.
    assert!(lab.until(Duration::from_secs(5), |lab| {
        lab.turn();
        c.read_some(700).closed
    }));
    let text = c.text();
    let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
    assert_eq!(body.len(), want);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

#[test]
fn a_slow_consumer_is_closed_and_a_fast_one_keeps_up() {
    let mut lab = Lab::new(&["--max-backlog-bytes", "20000", "--max-data-per-user", "5"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut slow = Client::connect_with(&mut lab, Some(2048));
    slow.send(&stream_request(&ticket, "M1"));
    let mut fast = Client::connect(&mut lab);
    fast.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| fast.pump().statuses() == [200]));
    assert!(lab.until(T, |lab| lab.gw.registry.total() == 2));
    // 6 MB: more than every socket buffer between the slow client and us.
    let pad = "x".repeat(10_000);
    for n in 0..600 {
        let msg = format!(r#"{{"deviceId":"M1","data":{{"n":{n},"pad":"{pad}"}}}}"#);
        lab.gw
            .hub
            .publish("mqtt:realtime:processed", msg.as_bytes())
            .expect("published");
        lab.turn();
        fast.pump();
    }
    assert!(lab.until(T, |lab| lab.gw.registry.total() == 1));
    assert!(lab.until(T, |_| fast.pump().text().contains("\"n\":599")));
    assert_eq!(
        lab.gw
            .metrics
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_drain_says_shutdown_to_streams_and_closes_everything() {
    let mut lab = Lab::new(&["--drain-secs", "1"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut s = Client::connect(&mut lab);
    s.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| s.pump().statuses() == [200]));
    let _idle = Client::connect(&mut lab);
    lab.gw.hub.drain();
    let mut drained = false;
    assert!(lab.until(T, |lab| {
        drained = lab
            .reactor
            .turn(&mut lab.events, Some(Duration::from_millis(5)))
            .expect("turn");
        drained
    }));
    s.pump();
    assert!(s.text().contains("{\"kind\":\"shutdown\"}"), "{}", s.text());
    assert_eq!(lab.reactor.connections(), 0);
    assert_eq!(lab.gw.registry.total(), 0);
    assert_eq!(lab.gw.peers.addresses(), 0);
}

#[test]
fn a_client_that_leaves_during_its_lookup_holds_nothing() {
    let mut lab = Lab::new(&[]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    lab.memory().hold();
    let mut c = Client::connect(&mut lab);
    c.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |lab| lab.phases() == ["waiting"]));
    drop(c);
    lab.turns_for(Duration::from_millis(20));
    lab.release(&[]);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
    // And the user's slot is free for the next page.
    let mut again = Client::connect(&mut lab);
    again.send(&stream_request(&ticket, "M1"));
    lab.turns_for(Duration::from_millis(20));
    lab.release(&[]);
    assert!(lab.until(T, |_| again.pump().statuses() == [200]));
}

#[test]
fn a_lookup_that_never_comes_back_is_answered_503() {
    let mut lab = Lab::new(&[]);
    lab.memory().hold();
    let mut c = Client::connect(&mut lab);
    let body = format!(
        "POST /sse/stream-ticket HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        lab.token("u1")
    );
    c.send(body.as_bytes());
    assert!(lab.until(Duration::from_secs(4), |_| !c.pump().statuses().is_empty()));
    assert_eq!(c.statuses(), [503]);
    assert!(c.text().contains("Retry-After: 1"));
    // Its late answer finds the connection moved on.
    lab.release(&[]);
    lab.turns_for(Duration::from_millis(20));
    assert_eq!(lab.phases(), ["reading"]);
}

impl Lab {
    fn turns_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.reactor
                .turn(&mut self.events, Some(Duration::from_millis(2)))
                .expect("turn");
        }
    }
}

/// Frames of the stream's device, in order: `n` values, and `replay-gap`s.
fn values(c: &Client) -> Vec<String> {
    c.text()
        .split("\n\n")
        .filter_map(|block| {
            if block.contains("\"kind\":\"replay-gap\"") {
                return Some("gap".to_owned());
            }
            let at = block.find("\"n\":")? + 4;
            let end = at + block[at..].find(|ch: char| !ch.is_ascii_digit())?;
            Some(block[at..end].to_owned())
        })
        .collect()
}

#[test]
fn a_reactor_whose_mailbox_overflowed_recovers_the_frames_from_the_replay_window() {
    let mut lab = Lab::new(&["--mailbox-frames", "4"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut s = Client::connect(&mut lab);
    s.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| s.pump().statuses() == [200]));
    // 50 events while the reactor does not turn: 46 find its mailbox full.
    for n in 0..50 {
        let msg = format!(r#"{{"deviceId":"M1","data":{{"n":{n}}}}}"#);
        lab.gw
            .hub
            .publish("mqtt:realtime:processed", msg.as_bytes())
            .expect("published");
    }
    let want: Vec<String> = (0..50).map(|n| n.to_string()).collect();
    assert!(lab.until(T, |_| values(s.pump()).len() >= 50));
    assert_eq!(values(&s), want, "every frame once, in order");
    let overflowed = lab
        .gw
        .metrics
        .mailbox_overflows
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(overflowed, 46);
}

#[test]
fn frames_the_replay_window_no_longer_holds_become_a_replay_gap() {
    let mut lab = Lab::new(&["--mailbox-frames", "4", "--replay-events", "8"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut s = Client::connect(&mut lab);
    s.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| s.pump().statuses() == [200]));
    for n in 0..50 {
        let msg = format!(r#"{{"deviceId":"M1","data":{{"n":{n}}}}}"#);
        lab.gw
            .hub
            .publish("mqtt:realtime:processed", msg.as_bytes())
            .expect("published");
    }
    // The first four arrive; the window (8 events) no longer holds the
    // hole: a gap at that point, then what it holds, never a silent loss.
    assert!(lab.until(T, |_| values(s.pump()).last().map(String::as_str)
        == Some("49")));
    let mut want: Vec<String> = ["0", "1", "2", "3", "gap"].map(String::from).to_vec();
    want.extend((42..50).map(|n| n.to_string()));
    assert_eq!(values(&s), want);
}

// ----- the property test --------------------------------------------------------

/// What a client may do.
#[derive(Debug, Clone)]
enum Op {
    Connect {
        small_buffer: bool,
    },
    /// Send one request of a kind (index into `requests`).
    Send {
        client: usize,
        kind: usize,
    },
    /// Send part of a request head.
    SendPart {
        client: usize,
        kind: usize,
        cut: usize,
    },
    Read {
        client: usize,
        max: usize,
    },
    Close {
        client: usize,
    },
    /// Answer the held lookups in this order.
    Release {
        order: Vec<usize>,
    },
    Publish {
        device: usize,
        size: usize,
    },
    Turn,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<bool>().prop_map(|small_buffer| Op::Connect { small_buffer }),
        (0..6usize, 0..7usize).prop_map(|(client, kind)| Op::Send { client, kind }),
        (0..6usize, 0..7usize, 1..40usize).prop_map(|(client, kind, cut)| Op::SendPart {
            client,
            kind,
            cut
        }),
        (0..6usize, 1..4096usize).prop_map(|(client, max)| Op::Read { client, max }),
        (0..6usize).prop_map(|client| Op::Close { client }),
        prop::collection::vec(0..8usize, 0..4).prop_map(|order| Op::Release { order }),
        (0..2usize, 0..3000usize).prop_map(|(device, size)| Op::Publish { device, size }),
        Just(Op::Turn),
    ]
}

/// The requests a client sends: (bytes, the statuses the model allows).
fn requests(tickets: &[String]) -> Vec<(Vec<u8>, &'static [u16])> {
    vec![
        (b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), &[200]),
        (stream_request(&tickets[0], "M1"), &[200, 429, 503]),
        (stream_request(&tickets[1], "M2"), &[200, 429, 503]),
        (stream_request("nope", "M1"), &[401]),
        (
            b"GET /sse/client.js HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            &[200],
        ),
        (b"\x16\x03\x01 garbage\r\n\r\n".to_vec(), &[400]),
        (
            b"POST /sse/publish HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            &[411],
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Whatever the clients do, and in whatever order lookups finish:
    /// every answer is one the model allows, registry slots match open
    /// streams at every step, every connection that is not a stream ends by
    /// its deadlines, and once the clients are gone nothing is left.
    #[test]
    fn every_connection_ends_or_progresses_and_nothing_leaks(ops in prop::collection::vec(op(), 1..60)) {
        run_ops(ops)?;
    }
}

fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut lab = Lab::new(&[
        "--head-timeout-secs",
        "0.3",
        "--request-timeout-secs",
        "0.3",
        "--keepalive-idle-secs",
        "0.3",
        "--write-stall-secs",
        "0.3",
        "--heartbeat-secs",
        "0.1",
        "--max-backlog-bytes",
        "30000",
    ]);
    lab.memory().grant("u1", "M1");
    lab.memory().grant("u2", "M2");
    let tickets = [lab.ticket("u1"), lab.ticket("u2")];
    let requests = requests(&tickets);
    lab.memory().hold();
    let mut clients: Vec<Option<Client>> = Vec::new();
    for op in ops {
        match op {
            Op::Connect { small_buffer } if clients.len() < 6 => {
                let rcvbuf = small_buffer.then_some(2048);
                clients.push(Some(Client::connect_with(&mut lab, rcvbuf)));
            }
            Op::Connect { .. } => {}
            Op::Send { client, kind } => {
                if let Some(Some(c)) = clients.get_mut(client) {
                    c.send(&requests[kind].0);
                }
            }
            Op::SendPart { client, kind, cut } => {
                if let Some(Some(c)) = clients.get_mut(client) {
                    let bytes = &requests[kind].0;
                    c.send(&bytes[..cut.min(bytes.len())]);
                }
            }
            Op::Read { client, max } => {
                if let Some(Some(c)) = clients.get_mut(client) {
                    c.read_some(max);
                }
            }
            Op::Close { client } => {
                if let Some(slot) = clients.get_mut(client) {
                    slot.take();
                }
            }
            Op::Release { order } => lab.release(&order),
            Op::Publish { device, size } => {
                let msg = format!(
                    r#"{{"deviceId":"M{}","data":"{}"}}"#,
                    device + 1,
                    "x".repeat(size)
                );
                let _ = lab
                    .gw
                    .hub
                    .publish("mqtt:realtime:processed", msg.as_bytes());
            }
            Op::Turn => {}
        }
        lab.turn();
        lab.check_slots();
    }
    // Lookups finish late but finish; then deadlines end every
    // connection that is not a stream, even if its client never closes.
    lab.release(&[]);
    let ended = lab.until(Duration::from_secs(3), |lab| {
        lab.release(&[]);
        lab.phases().iter().all(|p| *p == "streaming")
    });
    prop_assert!(ended, "stuck: {:?}", lab.phases());
    lab.check_slots();
    // Every answer a client got is one the model allows.
    for c in clients.iter_mut().flatten() {
        c.pump();
        for status in c.statuses() {
            let allowed = requests.iter().any(|(_, ok)| ok.contains(&status));
            prop_assert!(allowed, "unexpected status {status}: {}", c.text());
        }
    }
    // The clients leave: nothing is left behind.
    clients.clear();
    let empty = lab.until(Duration::from_secs(3), |lab| lab.reactor.connections() == 0);
    prop_assert!(empty, "left: {:?}", lab.phases());
    lab.check_empty();
    Ok(())
}
