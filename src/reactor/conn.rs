//! One client connection and its explicit state machine:
//!
//! ```text
//!   Reading ──request──▶ Waiting (store lookup) ──▶ Responding ──flushed──▶ Reading (keep-alive)
//!      │                      │                        └──────────────▶ Closing
//!      └──request───────────▶ Responding                                  ▲
//!                             └──────────▶ Streaming ──drain / error──────┘
//! ```
//! The reactor owns the transitions; this file owns the per-connection data
//! and the socket I/O (read what is there, write what is queued).

use std::io::{self, Read};
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::auth::UserId;
use crate::reactor::outbox::{Flushed, Outbox};
use crate::reactor::timer::TimerKey;
use crate::stream::frame::Purpose;
use crate::stream::routes::{Filter, Pending, StreamRequest};

/// Bytes a connection may buffer while reading requests: a full head and
/// body, plus room for a pipelined request behind them.
pub const READ_BUFFER_CAP: usize = 32 * 1024;
/// Bytes a stream's client may send before it is cut off (it should send none).
pub const STREAM_INPUT_CAP: usize = 16 * 1024;

/// What a request needs remembered while its answer is being prepared.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub keep_alive: bool,
    pub head_only: bool,
    /// The allowed CORS origin to echo, if any.
    pub cors: Option<String>,
    pub path: String,
}

pub struct Retry {
    pub request: StreamRequest,
    pub exchange: Exchange,
    /// Probes not answered yet.
    pub probes: usize,
}

pub struct Stream {
    pub id: crate::stream::registry::StreamId,
    pub user: UserId,
    pub client: std::net::IpAddr,
    pub purpose: Purpose,
    pub filter: Filter,
    /// Reactor clock (ms) when it opened.
    pub opened: u64,
    /// Bytes the client sent since (should stay 0).
    pub input: usize,
}

pub enum Phase {
    /// Waiting for (the rest of) a request head and body.
    Reading,
    /// A store lookup is in flight for this request (boxed: most
    /// connections are streams, and this keeps every slab entry small).
    Waiting(Box<(Pending, Exchange)>),
    /// A limit refused a stream once; when the probes of the slots' holders
    /// have all answered (or a timer fires) it gets a second look (see
    /// `Resolution::Retry`).
    Retrying(Box<Retry>),
    /// A response is queued; then `Reading` again or, if `close`, `Closing`.
    Responding { close: bool },
    /// An open SSE stream.
    Streaming(Box<Stream>),
    /// Flushing the last bytes, then the write side is shut and the socket is
    /// closed once the client closes too (or a linger timer fires).
    Closing { shut: bool },
}

pub struct Conn {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    pub phase: Phase,
    /// Request bytes not yet consumed.
    pub input: Vec<u8>,
    pub outbox: Outbox,
    pub timer: Option<TimerKey>,
    /// Tells a store outcome for an earlier request of this slot apart.
    pub serial: u64,
    /// In the reactor's flush list this turn.
    pub dirty: bool,
    /// The socket buffer is full: wait for the writable edge before writing.
    pub write_blocked: bool,
    /// Reading stopped at the buffer cap or mid-request; read again when
    /// the phase returns to `Reading`.
    pub read_blocked: bool,
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The socket has no more bytes for now.
    Drained,
    /// The buffer is full; bytes may remain in the socket.
    Full,
    /// The client closed its side (or the socket failed).
    Closed,
}

impl Conn {
    pub fn new(socket: TcpStream, peer: SocketAddr) -> Conn {
        Conn {
            socket,
            peer,
            phase: Phase::Reading,
            input: Vec::new(),
            outbox: Outbox::default(),
            timer: None,
            serial: 0,
            dirty: false,
            write_blocked: false,
            read_blocked: false,
        }
    }

    /// Reads into `input` until the socket is drained or `input` holds `cap` bytes.
    pub fn read_request_bytes(&mut self, cap: usize) -> ReadOutcome {
        let mut chunk = [0u8; 4096];
        loop {
            let room = cap.saturating_sub(self.input.len()).min(chunk.len());
            if room == 0 {
                return ReadOutcome::Full;
            }
            match self.socket.read(&mut chunk[..room]) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadOutcome::Closed,
            }
        }
    }

    /// Reads and throws away whatever the client sends; returns the count and
    /// whether the client is gone.
    pub fn discard_input(&mut self) -> (usize, bool) {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        loop {
            match self.socket.read(&mut sink) {
                Ok(0) => return (total, true),
                Ok(n) => {
                    total += n;
                    if total > STREAM_INPUT_CAP {
                        return (total, false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (total, false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (total, true),
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<Flushed> {
        self.outbox.flush(&mut self.socket)
    }

    pub fn stream(&self) -> Option<&Stream> {
        match &self.phase {
            Phase::Streaming(s) => Some(s),
            _ => None,
        }
    }
}
