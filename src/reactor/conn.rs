//! One client connection and its explicit state machine:
//!
//! ```text
//!             ┌──────────── flushed, keep-alive ─────────────┐
//!             ▼                                               │
//!   Reading ──request──▶ Waiting (store lookup) ──answer──▶ Responding ──flushed, close──▶ Closing
//!      │          │          │   ▲      └──lookup timeout (503)──▲                            ▲
//!      │          │          │   └─ Retrying (limit probes) ◀─┘  │                            │
//!      │          │          └──opened──▶ Streaming ──drain / revoked / write stall──────────┘
//!      │          └──answered at once────────────────────────────┘
//!      └── head or request timeout, keep-alive idle, client gone, socket error: closed at once (no Closing)
//!   Waiting, Responding ── request timeout: closed at once
//! ```
//! Every phase has a deadline, so every connection progresses or goes.
//! A request's own deadline, `--request-timeout-secs` from its first byte,
//! bounds it from that byte to its response's last: Reading (its head within
//! `--head-timeout-secs` of the first byte, then its body; between requests,
//! `--keepalive-idle-secs` idle), Waiting (2 s, then 503), Retrying (100 ms),
//! Responding. Then Streaming (heartbeats; `--write-stall-secs` while the
//! client takes none of the unsent bytes), Closing (2 s linger). The reactor
//! owns the transitions; this file owns the per-connection data and the
//! socket I/O.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr};

use mio::net::TcpStream;

use crate::reactor::outbox::{Flushed, Outbox};
use crate::reactor::timer::TimerKey;
use crate::routes::{Pending, StreamRequest};
use crate::stream::Stream;

/// Bytes a connection may buffer while reading requests: a full head and
/// body, plus room for a pipelined request behind them.
pub const READ_BUFFER_CAP: usize = 32 * 1024;
/// `scanned` once the head's end was found (only the body may be missing).
const HEAD_FOUND: u16 = u16::MAX;
const _: () = assert!(READ_BUFFER_CAP < HEAD_FOUND as usize);
/// Bytes a stream's client may send before it is cut off (it should send none).
pub const STREAM_INPUT_CAP: usize = 16 * 1024;

/// Request bytes not yet consumed, behind one pointer: a stream reads no
/// request once it is open, so its row holds 8 bytes and no buffer here,
/// not a vector's 24.
#[derive(Default)]
#[allow(clippy::box_collection)] // the box is the point: 8 bytes, not 24
pub struct Input(Option<Box<Vec<u8>>>);

impl Input {
    pub fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.0.get_or_insert_default().extend_from_slice(bytes);
    }

    /// Takes every byte out, leaving no buffer behind.
    pub fn take(&mut self) -> Vec<u8> {
        self.0.take().map_or_else(Vec::new, |b| *b)
    }

    /// Keeps `rest` (a pipelined request's first bytes), or nothing.
    pub fn keep(&mut self, rest: &[u8]) {
        self.0 = (!rest.is_empty()).then(|| Box::new(rest.to_vec()));
    }
}

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
    /// A probe found its stream's client gone and freed the slot: the
    /// second look comes when the probes are in. Otherwise it waits for the
    /// retry timer: a client's close can reach the kernel's socket a moment
    /// after its next request does (another CPU's backlog, a proxy that
    /// closes upstream late), and a reload must not meet 429 for that.
    pub freed: bool,
}

pub enum Phase {
    /// Waiting for (the rest of) a request head and body.
    Reading,
    /// A store lookup is in flight for this request (boxed: most
    /// connections are streams, and this keeps every slab entry small).
    Waiting(Box<(Pending, Exchange)>),
    /// A limit refused a stream once; when the probes of the slots' holders
    /// have all answered and one freed a slot, or when a timer fires, it
    /// gets a second look (see `Resolution::Retry`).
    Retrying(Box<Retry>),
    /// A response is queued; then `Reading` again or, if `close`, `Closing`.
    Responding { close: bool },
    /// An open SSE stream, kept in the slab row itself: most connections
    /// are streams, and a separate allocation per stream would cost its
    /// header and scatter long-lived chunks among the transient ones.
    Streaming(Stream),
    /// Flushing the last bytes, then the write side is shut and the socket is
    /// closed once the client closes too (or a linger timer fires).
    Closing { shut: bool },
}

/// A slab row: every field is sized for a connection that is an idle
/// stream most of its life (160 bytes; a test holds it there).
pub struct Conn {
    pub socket: TcpStream,
    /// The peer's address (limits count it). Not its port: only a log line
    /// of a refused request names that, and asks the socket (see [`Conn::peer`]).
    pub peer_ip: IpAddr,
    pub phase: Phase,
    /// Request bytes not yet consumed.
    pub input: Input,
    pub outbox: Outbox,
    pub timer: Option<TimerKey>,
    /// Tells a store outcome for an earlier request of this slot apart.
    pub serial: u32,
    /// Whether, and when, the reactor will flush it.
    pub flush: Flush,
    /// The socket buffer is full: wait for the writable edge before writing.
    pub write_blocked: bool,
    /// Reading stopped at the buffer cap or mid-request; read again when
    /// the phase returns to `Reading`.
    pub read_blocked: bool,
    /// Reading, between requests: no byte of the next one has arrived.
    pub idle: bool,
    /// Counted in the per-IP cap of connections that are not streams.
    pub counted: bool,
    /// Reactor clock (ms, a 32-bit stamp: see [`stamp`]) when the current
    /// request's first byte arrived; [`Conn::started_at`] reads it.
    started: u32,
    /// How much of `input` was already searched for the end of the head
    /// (`input` holds at most [`READ_BUFFER_CAP`] bytes, below 2^16).
    pub scanned: u16,
    /// Reactor clock (ms, wrapping at 32 bits: it only measures the time
    /// since) of the last write that sent bytes since the stream opened; 0
    /// for none (a request's response does not make a stream look busy).
    pub wrote_at: u32,
}

/// The reactor clock as a connection keeps it: 32 bits that wrap, never 0
/// (0 is "none"). Only ever read back as the time since, which is exact
/// below 49 days: far past the deadlines that read it (a request's, a write
/// stall's), unless a flag sets one longer; a write stall of 49 days or more
/// then never ends a stream.
pub fn stamp(now: u64) -> u32 {
    (now as u32).max(1)
}

/// Milliseconds from `stamp` to `now`, both read the same way: a write in
/// the reactor's first millisecond is 0 ms old then, not 2^32 - 1.
pub fn since(stamp_at: u32, now: u64) -> u32 {
    stamp(now).wrapping_sub(stamp_at)
}

/// The reactor clock (ms) a stamp was taken at, read at `now`.
pub fn stamped_at(stamp_at: u32, now: u64) -> u64 {
    now.saturating_sub(u64::from(since(stamp_at, now)))
}

/// The reactor clock in tenths of a second, 32 bits (13 years): when a
/// stream opened, for the duration its closing line reports.
pub fn tenths(now: u64) -> u32 {
    (now / 100) as u32
}

/// KiB the kernel holds for `socket` that its peer has not acknowledged
/// (sent or not yet sent; Linux's SIOCOUTQ), rounded down, at most
/// `UNACKED_UNKNOWN - 1` (64 MiB). They go down only as the client's TCP
/// takes them, so a stalled stream asks it to tell a slow reader from one
/// that reads nothing (see `fanout`'s `took_bytes`): the socket is reported
/// writable again only once much of its send buffer has drained, which a
/// slow reader takes long to do. A system call, made only while a stream
/// is stalled. None where the kernel does not say.
pub fn unacked_kib(socket: &TcpStream) -> Option<u16> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one int through
        // the pointer, which points at `n`, alive for the call; the
        // descriptor is the socket's own, open while `socket` is borrowed.
        let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        let kib = u16::try_from(n / 1024).unwrap_or(u16::MAX);
        (r == 0 && n >= 0).then_some(kib.min(crate::stream::UNACKED_UNKNOWN - 1))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

/// The socket written with `send`/`sendmsg`: the socket calls, which skip
/// the file layer `write`/`writev` pass through (and never raise SIGPIPE).
struct Sender<'a>(socket2::SockRef<'a>);

impl Write for Sender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.send_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a connection stands in the reactor's flushing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Nothing scheduled (nothing new queued, or waiting for writability).
    No,
    /// In the dirty list: written at the end of this turn.
    Now,
    /// In the held list: written when the coalescing window ends (or moved
    /// to the dirty list once a write's worth is queued).
    Held,
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
    pub fn new(socket: TcpStream, peer: SocketAddr, now: u64) -> Conn {
        Conn {
            socket,
            peer_ip: peer.ip(),
            phase: Phase::Reading,
            input: Input::default(),
            outbox: Outbox::default(),
            timer: None,
            serial: 0,
            flush: Flush::No,
            write_blocked: false,
            read_blocked: false,
            idle: false,
            counted: false,
            started: stamp(now),
            scanned: 0,
            wrote_at: 0,
        }
    }

    /// Whether `input` holds a whole head (its blank line). Searches only
    /// the bytes not searched before, so a head that arrives one byte at a
    /// time costs linear time, not quadratic. `scanned` goes back to 0 when
    /// a request is taken out of `input`.
    pub fn head_complete(&mut self) -> bool {
        if self.scanned == HEAD_FOUND {
            return true;
        }
        let tail = &self.input.bytes()[(self.scanned as usize).saturating_sub(2)..];
        let found =
            tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
        self.scanned = if found {
            HEAD_FOUND
        } else {
            u16::try_from(self.input.len()).unwrap_or(0)
        };
        found
    }

    /// Whether the current request's head is known complete: only its body
    /// may still be arriving (the request deadline, not the head's, bounds it).
    pub fn head_found(&self) -> bool {
        self.scanned == HEAD_FOUND
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
                Ok(n) => self.input.extend(&chunk[..n]),
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

    /// Writes what is queued; also says whether the client took any byte.
    pub fn flush(&mut self) -> io::Result<(Flushed, bool)> {
        let before = self.outbox.queued();
        let flushed = self
            .outbox
            .flush(&mut Sender(socket2::SockRef::from(&self.socket)))?;
        Ok((flushed, self.outbox.queued() < before))
    }

    /// The current request's first byte arrived now (reactor clock, ms).
    pub fn start_request(&mut self, now: u64) {
        self.started = stamp(now);
    }

    /// When the current request's first byte arrived (reactor clock, ms).
    pub fn started_at(&self, now: u64) -> u64 {
        stamped_at(self.started, now)
    }

    /// Whether the stream sent bytes within the last `ms` milliseconds.
    pub fn written_within(&self, now: u64, ms: u32) -> bool {
        self.wrote_at != 0 && since(self.wrote_at, now) < ms
    }

    /// Notes a write that sent bytes.
    pub fn wrote(&mut self, now: u64) {
        self.wrote_at = stamp(now);
    }

    /// Queued bytes the client has left unread: a held stream's are all
    /// the gateway's own (it was written out before they came).
    pub fn backlog(&self) -> usize {
        if self.flush == Flush::Held {
            0
        } else {
            self.outbox.queued()
        }
    }

    /// The peer's address and port, for the log lines of refused requests
    /// (a system call: rare lines only).
    pub fn peer(&self) -> SocketAddr {
        self.socket
            .peer_addr()
            .unwrap_or(SocketAddr::new(self.peer_ip, 0))
    }

    pub fn stream(&self) -> Option<&Stream> {
        match &self.phase {
            Phase::Streaming(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{since, stamp, stamped_at, tenths};

    /// A stream written in the reactor's first millisecond was written 0 ms
    /// before, in that millisecond (it read as 2^32 - 1 ms, and the frames
    /// that followed at once were not held); the clock's wrap is seamless.
    #[test]
    fn a_write_is_as_old_as_the_clock_says_from_its_first_millisecond_past_the_wrap() {
        assert_eq!(since(stamp(0), 0), 0);
        assert_eq!(since(stamp(0), 1), 0);
        assert_eq!(since(stamp(5), 1005), 1000);
        let wrap = 1u64 << 32;
        assert_eq!(since(stamp(wrap - 1), wrap + 9), 10);
    }

    /// A request's start and a stall's, kept as 32-bit stamps, read back as
    /// the clock they were taken at: past the wrap, and days later.
    #[test]
    fn a_stamp_reads_back_as_the_clock_it_was_taken_at() {
        let wrap = 1u64 << 32;
        for taken in [5, wrap - 3, wrap, wrap + 7, 3 * wrap + 1] {
            for later in [0, 1, 999, 3 * 86_400_000] {
                // A stamp is never 0, so one taken in the wrap's own
                // millisecond reads a millisecond later.
                let want = if taken as u32 == 0 && later > 0 {
                    taken + 1
                } else {
                    taken
                };
                assert_eq!(
                    stamped_at(stamp(taken), taken + later),
                    want,
                    "{taken} + {later}"
                );
            }
        }
        // Tenths of a second go on where the millisecond stamp wraps.
        let opened = tenths(wrap + 250);
        assert_eq!(tenths(wrap + 250 + 1234 * 100).wrapping_sub(opened), 1234);
    }

    /// Every connection is a slab row of this size, most of them idle
    /// streams: a field that grows it costs every stream. 160 bytes in a
    /// release build (it was 288; 232 before the outbox went behind a
    /// pointer and three clocks to 32 bits; 176 before a stream kept its
    /// user as the bare shared id, timer keys got a never-zero generation,
    /// the head scan went to 16 bits and the peer's port to the socket).
    /// mio's socket is 4 bytes there and 16 in a debug build (it carries a
    /// selector id), so a debug build checks the row beside the socket,
    /// padding included.
    #[test]
    fn a_connection_row_is_160_bytes() {
        use std::mem::size_of;
        let socket = size_of::<mio::net::TcpStream>();
        assert!(size_of::<super::Conn>() - socket <= 160);
        #[cfg(not(debug_assertions))]
        assert_eq!(size_of::<super::Conn>(), 160);
    }
}
