//! The replay window: the most recent frames of the bus, bounded by count and
//! age, so a client that reconnects with `Last-Event-ID` gets what it missed.
//!
//! Every frame with an id passes through here in order, so the window holds a
//! contiguous run of sequence numbers. That makes "did this client miss
//! something we no longer hold?" a comparison, not a search: if any frame
//! newer than the client's id was evicted, the answer is a `replay-gap`.

use std::collections::VecDeque;
use std::sync::Arc;

use super::frame::{EventId, Frame};

pub struct ReplayWindow {
    frames: VecDeque<(u64, Arc<Frame>)>,
    max_events: usize,
    max_age_ms: u64,
    bytes: usize,
    /// Highest sequence number evicted (0: none yet).
    evicted_through: u64,
    /// Highest sequence number pushed (0: none yet).
    last_seq: u64,
    /// Ids older than this were issued by another process.
    start_ms: u64,
}

/// What a resuming stream gets.
#[derive(Debug)]
pub enum Resume {
    /// The frames after the client's id, oldest first (maybe none).
    Frames(Vec<Arc<Frame>>),
    /// The id is unknown or older than the window: the client may have missed
    /// events and should refetch history.
    Gap,
}

impl ReplayWindow {
    /// A window for a process that started at `start_ms` and numbers its
    /// first frame `seq_base + 1`.
    pub fn new(max_events: usize, max_age_ms: u64, start_ms: u64, seq_base: u64) -> ReplayWindow {
        ReplayWindow {
            frames: VecDeque::with_capacity(max_events.min(4096)),
            max_events,
            max_age_ms,
            bytes: 0,
            evicted_through: seq_base,
            last_seq: seq_base,
            start_ms,
        }
    }

    /// Appends a frame (which must carry the next sequence number).
    pub fn push(&mut self, frame: Arc<Frame>, now_ms: u64) {
        let Some(id) = frame.id else { return };
        self.last_seq = id.seq;
        if self.max_events == 0 {
            self.evicted_through = id.seq;
            return;
        }
        self.bytes += frame.len();
        self.frames.push_back((now_ms, frame));
        while self.frames.len() > self.max_events {
            self.evict_front();
        }
        self.expire(now_ms);
    }

    /// Drops frames older than the age bound.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.frames.front() {
            if now_ms.saturating_sub(*at) < self.max_age_ms {
                break;
            }
            self.evict_front();
        }
    }

    fn evict_front(&mut self) {
        if let Some((_, f)) = self.frames.pop_front() {
            self.bytes -= f.len();
            if let Some(id) = f.id {
                self.evicted_through = id.seq;
            }
        }
    }

    /// Frames after `last` up to and including sequence `upto` (the newest a
    /// reactor has already routed; later ones reach the stream live).
    pub fn since(&mut self, last: EventId, upto: u64, now_ms: u64) -> Resume {
        self.expire(now_ms);
        if last.seq > self.last_seq || last.ms < self.start_ms || last.seq < self.evicted_through {
            return Resume::Gap;
        }
        let first = self.evicted_through + 1;
        // The client's own frame, if still held, must be the one it names.
        if last.seq >= first {
            match self.frames.get((last.seq - first) as usize) {
                Some((_, f)) if f.id == Some(last) => {}
                _ => return Resume::Gap,
            }
        }
        let start = (last.seq + 1 - first) as usize;
        let frames = self
            .frames
            .range(start.min(self.frames.len())..)
            .take_while(|(_, f)| f.id.is_some_and(|id| id.seq <= upto))
            .map(|(_, f)| f.clone())
            .collect();
        Resume::Frames(frames)
    }

    /// Every frame still held up to and including sequence `upto`, oldest
    /// first (what a reactor that lost track can still deliver after its
    /// `replay-gap`).
    pub fn held(&mut self, upto: u64, now_ms: u64) -> Vec<Arc<Frame>> {
        self.expire(now_ms);
        self.frames
            .iter()
            .map(|(_, f)| f)
            .take_while(|f| f.id.is_some_and(|id| id.seq <= upto))
            .cloned()
            .collect()
    }

    /// The sequence number of the newest frame pushed (the base when none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::frame::Event;

    fn frame(ms: u64, seq: u64) -> Arc<Frame> {
        Arc::new(Frame::encode(
            Some(EventId { ms, seq }),
            Event::SpcUpdate,
            "d",
            b"{}",
        ))
    }

    fn seqs(r: Resume) -> Option<Vec<u64>> {
        match r {
            Resume::Frames(f) => Some(f.iter().map(|f| f.id.unwrap().seq).collect()),
            Resume::Gap => None,
        }
    }

    #[test]
    fn resumes_from_the_window_or_reports_a_gap() {
        let mut w = ReplayWindow::new(3, 10_000, 100, 0);
        for seq in 1..=5 {
            w.push(frame(100 + seq, seq), 1000);
        }
        assert_eq!(w.len(), 3); // holds 3, 4, 5; evicted through 2
        let id = |seq| EventId { ms: 100 + seq, seq };
        let table = [
            (id(2), 5, Some(vec![3, 4, 5])), // newest evicted frame is the client's own: nothing missed
            (id(3), 5, Some(vec![4, 5])),
            (id(4), 4, Some(vec![])), // the reactor has not routed 5 yet: it comes live
            (id(5), 5, Some(vec![])),
            (id(1), 5, None),                       // 2 was evicted: gap
            (id(6), 5, None),                       // never issued here
            (EventId { ms: 999, seq: 4 }, 5, None), // seq ours, ms not: another process
            (EventId { ms: 50, seq: 4 }, 5, None),  // before this process started
        ];
        for (last, upto, want) in table {
            assert_eq!(seqs(w.since(last, upto, 1000)), want, "{last}");
        }
    }

    #[test]
    fn old_frames_age_out() {
        let mut w = ReplayWindow::new(100, 1_000, 0, 0);
        w.push(frame(1, 1), 0);
        w.push(frame(2, 2), 500);
        assert_eq!(
            seqs(w.since(EventId { ms: 1, seq: 1 }, 2, 900)),
            Some(vec![2])
        );
        assert_eq!(
            seqs(w.since(EventId { ms: 1, seq: 1 }, 2, 1_200)),
            Some(vec![2])
        );
        assert_eq!(seqs(w.since(EventId { ms: 0, seq: 0 }, 2, 1_200)), None);
        assert_eq!(
            seqs(w.since(EventId { ms: 2, seq: 2 }, 2, 1_600)),
            Some(vec![])
        );
        assert_eq!(w.len(), 0);
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn ids_of_another_process_are_a_gap_not_a_silent_loss() {
        // Two processes number from random bases far apart: an id from one is
        // never mistaken for a position in the other's sequence.
        let base = 1 << 40;
        let mut w = ReplayWindow::new(10, 10_000, 0, base);
        w.push(frame(5, base + 1), 0);
        w.push(frame(6, base + 2), 0);
        assert_eq!(
            seqs(w.since(
                EventId {
                    ms: 5,
                    seq: base + 1
                },
                base + 2,
                0
            )),
            Some(vec![base + 2])
        );
        assert_eq!(seqs(w.since(EventId { ms: 5, seq: 1 }, base + 2, 0)), None);
        assert_eq!(
            seqs(w.since(
                EventId {
                    ms: 5,
                    seq: 7 << 40
                },
                base + 2,
                0
            )),
            None
        );
    }

    #[test]
    fn a_disabled_window_serves_only_the_newest_id() {
        let mut w = ReplayWindow::new(0, 1_000, 0, 0);
        w.push(frame(1, 1), 0);
        w.push(frame(2, 2), 0);
        assert_eq!(seqs(w.since(EventId { ms: 2, seq: 2 }, 2, 0)), Some(vec![]));
        assert_eq!(seqs(w.since(EventId { ms: 1, seq: 1 }, 2, 0)), None);
    }
}
