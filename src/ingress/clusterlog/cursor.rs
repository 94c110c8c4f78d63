//! Where a log reader stands, what it has handed to its streams, and the
//! rules that keep what its streams receive exact: ids only ever rise, no
//! entry reaches a stream twice, and one hole is one `replay-gap`.
//!
//! The log can lose entries a reader already delivered: a Redis restarted
//! without persistence, a failover to a replica that lagged, writes to a
//! demoted master. Its ids then fall below, or jump past, the reader's
//! position. The reader never rewinds into such a log: it reads on from the
//! log's newest entry, tells its streams `replay-gap` once, and hands on
//! only entries whose ids lie above everything it delivered.
//!
//! [`Delivered`] is the same knowledge shared with the writer: a new leader
//! facing a log that lost entries finds the newest ones this instance read
//! in what it heard, and writes only what follows them.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::stream::frame::EventId;

/// The newest log entries (their hashes) compared with what was heard.
pub const TAIL: usize = 16;

/// A reader's place in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The last entry read: where the next `XREAD` goes on from.
    pub id: EventId,
    /// The newest id handed to streams (the replay window's, preloaded
    /// ones too): nothing at or below it is handed on again.
    pub delivered: EventId,
    /// A `replay-gap` went out after the last event delivered: a second
    /// one there would tell of the same hole.
    pub gap_told: bool,
}

/// What to do with one entry read from the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Hand it to the streams; `gap_first`: tell them `replay-gap` first.
    Deliver { gap_first: bool },
    /// Leave it out; `gap`: tell the streams `replay-gap` instead.
    Skip { gap: bool },
}

impl Cursor {
    /// A cursor at `id`, everything up to it delivered (a preload, or the
    /// log's end).
    pub fn at(id: EventId) -> Cursor {
        Cursor {
            id,
            delivered: id,
            gap_told: false,
        }
    }

    /// The log's newest id is `newest`. Below this reader's position the
    /// log lost entries it read (and may count again under ids it already
    /// used): read on from the log's newest entry, never from its start,
    /// and tell the hole unless it is told already. True when a
    /// `replay-gap` is to go out now.
    pub fn log_newest(&mut self, newest: EventId) -> bool {
        if newest >= self.id {
            return false;
        }
        self.id = newest;
        self.tell_gap()
    }

    /// The entry `id` was read (`marker`: it is a gap marker a leader
    /// wrote). A jump in the count is a hole; an id at or below one already
    /// delivered can never reach a stream with a rising id, so it is left
    /// out and told as a hole; a hole already told is not told again.
    pub fn entry(&mut self, id: EventId, marker: bool) -> Step {
        let hole = self.id.seq != 0 && id.seq != self.id.seq.wrapping_add(1);
        self.id = id;
        if id <= self.delivered {
            return Step::Skip {
                gap: self.tell_gap(),
            };
        }
        if marker {
            // The marker is the hole's `replay-gap`, with its id.
            if self.gap_told {
                return Step::Skip { gap: false };
            }
            self.delivered = id;
            self.gap_told = true;
            return Step::Deliver { gap_first: false };
        }
        let gap_first = hole && self.tell_gap();
        self.delivered = id;
        self.gap_told = false;
        Step::Deliver { gap_first }
    }

    fn tell_gap(&mut self) -> bool {
        !std::mem::replace(&mut self.gap_told, true)
    }
}

/// What this instance's reader read last, for the writer: the newest id
/// delivered and the hashes of the newest entries (0s, gap markers and
/// released values, left out).
#[derive(Default)]
pub struct Delivered {
    tail: Mutex<(EventId, VecDeque<u64>)>,
}

impl Delivered {
    /// After a batch of entries: `delivered` and their hashes, oldest first.
    pub fn record(&self, delivered: EventId, hashes: &[u64]) {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.0 = tail.0.max(delivered);
        let kept = &mut tail.1;
        let newest = &hashes[hashes.len().saturating_sub(TAIL)..];
        kept.extend(newest.iter().filter(|h| **h != 0));
        while kept.len() > TAIL {
            kept.pop_front();
        }
    }

    /// The newest id delivered and the newest hashes, newest first.
    pub fn snapshot(&self) -> (EventId, Vec<u64>) {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        (tail.0, tail.1.iter().rev().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EventId {
        EventId { ms, seq }
    }

    const GO: Step = Step::Deliver { gap_first: false };

    #[test]
    fn a_log_that_started_over_is_read_on_from_its_end_never_from_its_start() {
        let mut c = Cursor::at(id(100, 50));
        // A failover to a replica that lagged: the log ends at 30.
        assert!(c.log_newest(id(90, 30)), "the hole is told");
        assert_eq!(c.id, id(90, 30), "read on from the log's end, not 0-0");
        assert!(!c.log_newest(id(90, 30)), "told once");
        // A write under a clock that is behind: below what was delivered.
        assert_eq!(c.entry(id(95, 31), false), Step::Skip { gap: false });
        // Newer than everything delivered: on, with no second gap.
        assert_eq!(c.entry(id(101, 32), false), GO);
        assert_eq!(c.delivered, id(101, 32));
        assert_eq!(c.entry(id(101, 33), false), GO);
    }

    #[test]
    fn an_id_at_or_below_one_delivered_never_goes_out_and_is_told_once() {
        let mut c = Cursor::at(id(100, 50));
        assert_eq!(c.entry(id(100, 51), false), GO);
        c.id = id(0, 0); // as after a rewind
        assert_eq!(c.entry(id(100, 50), false), Step::Skip { gap: true });
        assert_eq!(c.entry(id(100, 51), false), Step::Skip { gap: false });
        assert_eq!(c.entry(id(100, 52), false), GO);
    }

    #[test]
    fn one_hole_is_one_replay_gap_preferably_the_leaders_marker() {
        let mut c = Cursor::at(id(100, 50));
        // A Redis restart: the count starts again, with a marker first.
        assert_eq!(c.entry(id(200, 1), true), GO);
        assert!(c.gap_told);
        assert_eq!(c.entry(id(200, 2), true), Step::Skip { gap: false });
        assert_eq!(c.entry(id(200, 3), false), GO);
        // A jump with no marker: told before the event.
        assert_eq!(
            c.entry(id(200, 9), false),
            Step::Deliver { gap_first: true }
        );
        // A marker after an event is a new hole.
        assert_eq!(c.entry(id(200, 10), true), GO);
        // The jump behind it is that same hole.
        assert_eq!(c.entry(id(200, 20), false), GO);
    }

    #[test]
    fn the_writers_view_keeps_the_newest_hashes_newest_first() {
        let d = Delivered::default();
        d.record(id(1, 3), &[1, 0, 2, 3]);
        assert_eq!(d.snapshot(), (id(1, 3), vec![3, 2, 1]));
        let many: Vec<u64> = (10..10 + 2 * TAIL as u64).collect();
        d.record(id(1, 1), &many);
        let (newest, hashes) = d.snapshot();
        assert_eq!(newest, id(1, 3), "never moves back");
        assert_eq!(hashes.len(), TAIL);
        assert_eq!(hashes[0], 9 + 2 * TAIL as u64);
    }
}
