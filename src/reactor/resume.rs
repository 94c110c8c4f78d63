//! Resuming streams: what a stream that opens with `Last-Event-ID` gets
//! before live frames, and the streams waiting for an id this reactor has
//! not routed yet.
//!
//! A resume is one of three (see [`crate::stream::replay`]): the frames
//! after the client's id; `replay-gap` then the held frames newer than its
//! id (it is unknown or older than the window); or a wait, when the id may
//! still come by (another instance's log reader, or another reactor, was a
//! little ahead). A waiting stream is not in the subscription index: frames
//! below its id are ones its client already has. The wait ends when its id
//! comes by (it takes what follows), when the log passes the id without
//! showing it, or after [`RESUME_WAIT_MS`]; the last two are `replay-gap`
//! and live frames from there. So a bogus id costs a stream at most that
//! long, never its events: the gap tells the client what it did not get.

use std::sync::atomic::Ordering::Relaxed;

use super::Reactor;

use crate::stream::frame::{Event, EventId, Frame, Purpose, REPLAY_GAP};
use crate::stream::replay::Resume;
use crate::stream::subscriptions::{wants, Filter};

/// How long (ms) a resuming stream waits for its id to come by. A real id
/// from an instance whose reader is ahead arrives within milliseconds; a
/// reader further behind than this is better told `replay-gap` than kept
/// silent.
pub const RESUME_WAIT_MS: u64 = 2_000;

/// A stream resuming from an id not routed here yet.
pub(super) struct Waiting {
    pub key: usize,
    /// The client's `Last-Event-ID`.
    pub want: EventId,
    /// Reactor clock (ms) at which it stops waiting.
    pub until: u64,
}

impl Reactor {
    /// Queues on a stream that is opening what it missed since `raw` (its
    /// `Last-Event-ID`), or makes it wait for that id. True when it waits:
    /// it must not be subscribed yet.
    pub(super) fn resume(
        &mut self,
        key: usize,
        purpose: Purpose,
        filter: &Filter,
        raw: &str,
    ) -> bool {
        let id = EventId::parse(raw);
        let resume = match id {
            Some(id) => self.gw.hub.resume(id, self.last_routed),
            // Nothing to compare with: all the window holds follows the gap.
            None => Resume::Gap(self.gw.hub.held(self.last_routed)),
        };
        let now = self.now();
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let frames = match (resume, id) {
            (Resume::Ahead, Some(want)) => {
                self.gw.metrics.replays_served.fetch_add(1, Relaxed);
                let until = now + RESUME_WAIT_MS;
                self.waiting.push(Waiting { key, want, until });
                return true;
            }
            (Resume::Frames(frames), _) => {
                self.gw.metrics.replays_served.fetch_add(1, Relaxed);
                frames
            }
            (Resume::Gap(held), _) => {
                self.gw.metrics.replay_gaps.fetch_add(1, Relaxed);
                // When the first thing held is the log's own marker of a
                // hole (a Redis that lost the log), it says the same at the
                // same point, with an id: one marker, not two.
                let first = held.iter().find(|f| wants(purpose, filter, f));
                if first.is_none_or(|f| f.event != Event::System) {
                    conn.outbox.push_frame(&Frame::system(REPLAY_GAP));
                }
                held
            }
            // A wait needs an id; without one there was nothing to wait for.
            (Resume::Ahead, None) => Vec::new(),
        };
        for f in frames.iter().filter(|f| wants(purpose, filter, f)) {
            conn.outbox.push_frame(f);
        }
        false
    }

    /// Streams waiting for `id` or an older one: a stream whose own id is
    /// `id` takes what follows it (returned, to subscribe after this frame);
    /// one whose id was passed without coming by named an id this cluster
    /// never issued: `replay-gap`, and it takes this frame on.
    pub(super) fn settle(&mut self, id: EventId) -> Vec<usize> {
        let mut after = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let Waiting { key, want, .. } = self.waiting[i];
            if id < want {
                i += 1;
                continue;
            }
            self.waiting.swap_remove(i);
            if id == want {
                after.push(key);
            } else {
                self.gap_then_live(key);
            }
        }
        after
    }

    /// When stream `key` stops waiting for its id, if it waits.
    pub(super) fn waits_until(&self, key: usize) -> Option<u64> {
        self.waiting.iter().find(|w| w.key == key).map(|w| w.until)
    }

    pub(super) fn is_waiting(&self, key: usize) -> bool {
        self.waits_until(key).is_some()
    }

    /// Ends stream `key`'s wait if its time is up: its id never came by
    /// (never issued, or this reader is far behind), so what was routed
    /// meanwhile below it is a hole to tell, and live frames follow.
    pub(super) fn end_wait_if_due(&mut self, key: usize, now: u64) {
        let Some(i) = self.waiting.iter().position(|w| w.key == key) else {
            return;
        };
        if now >= self.waiting[i].until {
            self.waiting.swap_remove(i);
            self.gap_then_live(key);
        }
    }

    /// Takes stream `key` out of the waiting list (it closes); false when it
    /// was not waiting (it is in the subscription index).
    pub(super) fn stop_waiting(&mut self, key: usize) -> bool {
        match self.waiting.iter().position(|w| w.key == key) {
            Some(i) => {
                self.waiting.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Every waiting stream goes live now (it was just told `replay-gap`
    /// for a hole: waiting for an id is pointless).
    pub(super) fn end_waits(&mut self) {
        for w in std::mem::take(&mut self.waiting) {
            self.subscribe(w.key);
        }
    }

    fn gap_then_live(&mut self, key: usize) {
        self.gw.metrics.replay_gaps.fetch_add(1, Relaxed);
        if self.push_frame(key, &Frame::system(REPLAY_GAP)) {
            self.subscribe(key);
        }
    }

    /// Puts an open stream into the index.
    pub(super) fn subscribe(&mut self, key: usize) {
        if let Some(s) = self.conns.get(key).and_then(|c| c.stream()) {
            self.subs.add(key, s.purpose, &s.filter);
        }
    }
}
