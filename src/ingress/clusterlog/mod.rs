//! The cluster log (Redis mode): one Redis Stream that gives every event its
//! id, the same on every gateway instance, and that every instance delivers
//! from.
//!
//! Every instance subscribes to the ingest channels. One of them at a time,
//! the leader (a lease in Redis, renewed several times a second), checks
//! each message, parses it once and appends it to the log with `XADD`,
//! fenced by a script that refuses the write unless the lease is still its
//! own. Redis assigns the entry id `<ms>-<seq>`: the event's id everywhere.
//! Every instance, the leader too, reads the log with `XREAD BLOCK` from the
//! last entry it delivered and hands each entry to the hub, which encodes it
//! once and sends it to the reactors. Live delivery and catching up after a
//! lost connection are the same code path.
//!
//! - [`writer`]: the leader lease, and writing what was heard.
//! - [`heard`]: what this instance heard recently, so a new leader writes
//!   exactly what the old one had not (nothing lost, nothing twice).
//! - [`reader`]: reading the log, noticing holes, preloading the replay
//!   window at start.
//! - [`cursor`]: where a reader stands and what its streams had: ids only
//!   rise, nothing is handed on twice, one hole is one `replay-gap`.
//! - [`script`]: the lease commands and the append script.
//!
//! An entry's id is `<ms>-<n>`: Redis's clock and a count of every entry
//! ever written, which the write script keeps. So ids increase by their
//! `<seq>` alone as well as by the pair, and a reader sees a hole (entries
//! trimmed before it read them, a Redis that lost the log) as a jump in `n`
//! and tells its streams `replay-gap`.

pub mod cursor;
pub mod heard;
pub mod reader;
pub mod script;
pub mod writer;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::stream::frame::{Event, Message, CHANNELS};

/// Inputs waiting for the writer, at most.
const QUEUE_INPUTS: usize = 65_536;
/// Payload bytes waiting for the writer, at most.
const QUEUE_BYTES: usize = 32 << 20;

/// The log itself, a Redis Stream.
pub const EVENTS_KEY: &str = "sse:{log}:events";
/// The leader lease: the leader's instance id, with a short expiry.
pub const LEADER_KEY: &str = "sse:{log}:leader";
/// The id of the newest entry ever written, `<ms>-<n>`: where the next
/// one's count goes on from, even after the log was trimmed empty.
pub const LAST_KEY: &str = "sse:{log}:last";

/// What the Pub/Sub subscriber and the rate limit hand the writer.
#[derive(Debug)]
pub enum Input {
    /// A message on ingest channel `CHANNELS[channel]`, raw.
    Heard { channel: u8, payload: Vec<u8> },
    /// The subscriber lost its connection: what was published until it
    /// subscribed again was not heard here.
    Break,
    /// The subscriber is subscribed (again): hearing starts here.
    Subscribed,
    /// A value the per-device rate limit held, now due (checked already).
    Released(Message),
}

/// The way into the writer, bounded by count and by payload bytes: a
/// writer stuck on Redis never makes the process hold more than that.
#[derive(Clone)]
pub struct Inlet {
    tx: Sender<Input>,
    bytes: Arc<AtomicUsize>,
}

/// The writer's end of the queue.
pub struct Outlet {
    rx: Receiver<Input>,
    bytes: Arc<AtomicUsize>,
}

pub fn queue() -> (Inlet, Outlet) {
    // Unbounded underneath, bounded by `offer`: an array channel of
    // 65,536 slots would take its 4 MiB up front in every process.
    let (tx, rx) = crossbeam_channel::unbounded();
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Inlet {
            tx,
            bytes: bytes.clone(),
        },
        Outlet { rx, bytes },
    )
}

fn payload_len(input: &Input) -> usize {
    match input {
        Input::Heard { payload, .. } => payload.len(),
        Input::Released(m) => m.data.len(),
        Input::Break | Input::Subscribed => 0,
    }
}

impl Inlet {
    /// Queues `input`; false when the queue is full (the input is dropped).
    pub fn offer(&self, input: Input) -> bool {
        let len = payload_len(&input);
        if self.bytes.load(Relaxed) + len > QUEUE_BYTES || self.tx.len() >= QUEUE_INPUTS {
            return false;
        }
        match self.tx.send(input) {
            Ok(()) => {
                self.bytes.fetch_add(len, Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Queues a break, past the bound: after a refused message the writer
    /// must learn that something is missing.
    pub fn mark_break(&self) {
        let _ = self.tx.send(Input::Break);
    }

    /// Tells the writer that the subscriber is subscribed (again), past
    /// the bound as a break is.
    pub fn mark_subscribed(&self) {
        let _ = self.tx.send(Input::Subscribed);
    }
}

impl Outlet {
    /// The next input, waiting at most `wait`; Err(true) once every inlet
    /// is gone.
    pub fn next(&self, wait: Option<Duration>) -> Result<Input, bool> {
        let input = match wait {
            Some(wait) => self
                .rx
                .recv_timeout(wait)
                .map_err(|e| e == RecvTimeoutError::Disconnected)?,
            None => self.rx.try_recv().map_err(|e| e.is_disconnected())?,
        };
        self.bytes.fetch_sub(payload_len(&input), Relaxed);
        Ok(input)
    }
}

/// The channel index of an ingest channel name.
pub fn channel_index(name: &str) -> Option<u8> {
    CHANNELS.iter().position(|c| *c == name).map(|i| i as u8)
}

/// An event's name as the log stores it, back to the event.
pub fn event_named(name: &[u8]) -> Option<Event> {
    Event::ALL.into_iter().find(|e| e.name().as_bytes() == name)
}

/// The log's trimming bounds: at least what the replay window holds, and
/// never less than a few seconds and a thousand entries, so an instance that
/// lost its connection for a moment catches up instead of finding a hole.
pub fn log_bounds(replay_events: usize, replay_secs: u64) -> (usize, u64) {
    (replay_events.max(1024), replay_secs.max(30) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for e in Event::ALL {
            assert_eq!(event_named(e.name().as_bytes()), Some(e));
        }
        assert_eq!(event_named(b"nope"), None);
        assert_eq!(channel_index("machine:alarms"), Some(4));
        assert_eq!(channel_index("other"), None);
    }

    #[test]
    fn the_queue_refuses_past_its_bound_but_never_a_break() {
        let (inlet, outlet) = queue();
        for n in 0..QUEUE_INPUTS {
            assert!(inlet.offer(Input::Subscribed), "input {n} refused");
        }
        assert!(!inlet.offer(Input::Subscribed), "one past the bound");
        inlet.mark_break(); // the break takes a place past the bound
        for _ in 0..2 {
            assert!(matches!(outlet.next(None), Ok(Input::Subscribed)));
        }
        assert!(inlet.offer(Input::Subscribed), "room again");
    }
}
