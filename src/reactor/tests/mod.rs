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

use super::conn::Phase;
use super::mailbox::Inbox;
use super::Reactor;
use crate::config::Config;
use crate::context::Gateway;
use crate::store::memory::Memory;

mod deadlines;
mod interleavings;
mod scenarios;

const SECRET: &str = "in-process-test-secret-of-32-bytes!";

pub(super) struct Lab {
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

pub(super) struct Client {
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
