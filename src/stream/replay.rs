//! The replay window: the most recent frames of the bus, bounded by count and
//! age, so a client that reconnects with `Last-Event-ID` gets what it missed.
//!
//! Every frame passes through here in order of its position in the process's
//! sequence (`Frame::pos`, consecutive), so the window holds a contiguous run
//! of positions: "did a reactor miss something we no longer hold?" is a
//! comparison. A client names an id, not a position: ids increase with
//! positions, so it is found by binary search. An id the window does not
//! hold is a `replay-gap`, followed by the held frames newer than that id
//! (for an id older than the window, all of them: what the client missed
//! that is still here), unless it is exactly the newest one evicted (the
//! client missed precisely what is held) or, with a cluster log, newer than
//! anything here yet, by at most [`AHEAD_SLACK_MS`] past the clock or the
//! newest id here (another instance's log reader was ahead of ours: the
//! stream waits for it live). A resume never gives a frame at or below the id named.
//!
//! A frame without an id in the sequence is a break (a hole this process
//! found in the cluster log): the window forgets everything before it, so no
//! resume ever spans the hole.

use std::collections::VecDeque;
use std::sync::Arc;

use super::frame::{EventId, Frame};

/// How far (ms) past both the newest id read here and this host's clock a
/// resume id may be and still be waited for. Ids are the log's clock when
/// written, so a real one is at most clock skew ahead; one further out was
/// never issued (a bogus or far-future id) and would wait for ever.
pub const AHEAD_SLACK_MS: u64 = 1_000;

pub struct ReplayWindow {
    /// (arrival ms, frame); every frame here has an id and they hold
    /// positions `evicted_through + 1 ..= last_pos`.
    frames: VecDeque<(u64, Arc<Frame>)>,
    max_events: usize,
    max_age_ms: u64,
    bytes: usize,
    /// Position of the newest frame evicted (or of the newest break).
    evicted_through: u64,
    /// The id of the frame at `evicted_through`, while known: a client that
    /// names it missed exactly what the window holds.
    floor: Option<EventId>,
    last_pos: u64,
    /// Ids newer than the newest held may still arrive (a cluster log read
    /// by every instance at its own pace) instead of being unknown.
    newer_may_come: bool,
}

/// What a resuming stream gets.
#[derive(Debug)]
pub enum Resume {
    /// The frames after the client's id, oldest first (maybe none).
    Frames(Vec<Arc<Frame>>),
    /// The client's id is not routed here yet: it arrives live, and the
    /// stream takes what follows it.
    Ahead,
    /// The id is unknown or older than the window: the client may have missed
    /// events and should refetch history. It gets `replay-gap`, then these
    /// held frames (the ones newer than its id), oldest first.
    Gap(Vec<Arc<Frame>>),
}

impl ReplayWindow {
    /// A window whose first frame takes position `pos_base + 1`.
    /// `newer_may_come`: see [`Resume::Ahead`].
    pub fn new(
        max_events: usize,
        max_age_ms: u64,
        pos_base: u64,
        newer_may_come: bool,
    ) -> ReplayWindow {
        ReplayWindow {
            frames: VecDeque::with_capacity(max_events.min(4096)),
            max_events,
            max_age_ms,
            bytes: 0,
            evicted_through: pos_base,
            floor: None,
            last_pos: pos_base,
            newer_may_come,
        }
    }

    /// Appends a frame (which must carry the next position).
    pub fn push(&mut self, frame: Arc<Frame>, now_ms: u64) {
        self.last_pos = frame.pos;
        let Some(id) = frame.id else {
            // A break: nothing before it can be resumed across it.
            self.frames.clear();
            self.bytes = 0;
            self.evicted_through = frame.pos;
            self.floor = None;
            return;
        };
        if self.max_events == 0 {
            self.evicted_through = frame.pos;
            self.floor = Some(id);
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
            self.evicted_through = f.pos;
            self.floor = f.id;
        }
    }

    /// What a client whose last event was `last` missed, up to and including
    /// position `upto` (the newest its reactor has routed; later frames
    /// reach the stream live).
    pub fn after_id(&mut self, last: EventId, upto: u64, now_ms: u64) -> Resume {
        self.expire(now_ms);
        if self.floor == Some(last) {
            return Resume::Frames(self.held_from(0, upto));
        }
        match self.frames.binary_search_by(|(_, f)| f.id.cmp(&Some(last))) {
            Ok(i) if self.frames[i].1.pos > upto => Resume::Ahead,
            Ok(i) => Resume::Frames(self.held_from(i + 1, upto)),
            Err(i) if i == self.frames.len() && self.newer_may_come => {
                let newest = self.frames.back().and_then(|(_, f)| f.id).or(self.floor);
                let latest_ms = newest.map_or(now_ms, |n| n.ms.max(now_ms));
                let may_come = last.ms <= latest_ms.saturating_add(AHEAD_SLACK_MS);
                if may_come && newest.is_none_or(|n| last > n) {
                    Resume::Ahead
                } else {
                    Resume::Gap(Vec::new())
                }
            }
            // Every held frame from `i` on is newer than the client's id.
            Err(i) => Resume::Gap(self.held_from(i, upto)),
        }
    }

    /// What a reactor that routed through position `pos` missed, up to and
    /// including `upto`.
    pub fn after_pos(&mut self, pos: u64, upto: u64, now_ms: u64) -> Resume {
        self.expire(now_ms);
        if pos < self.evicted_through || pos > self.last_pos {
            return Resume::Gap(self.held_from(0, upto));
        }
        Resume::Frames(self.held_from((pos - self.evicted_through) as usize, upto))
    }

    fn held_from(&self, start: usize, upto: u64) -> Vec<Arc<Frame>> {
        self.frames
            .range(start.min(self.frames.len())..)
            .take_while(|(_, f)| f.pos <= upto)
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// Every frame still held up to and including position `upto`, oldest
    /// first (what a stream whose id means nothing here can still get after
    /// its `replay-gap`).
    pub fn held(&mut self, upto: u64, now_ms: u64) -> Vec<Arc<Frame>> {
        self.expire(now_ms);
        self.held_from(0, upto)
    }

    /// The position of the newest frame pushed (the base when none).
    pub fn last_pos(&self) -> u64 {
        self.last_pos
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
    use proptest::prelude::*;

    fn frame(ms: u64, seq: u64, pos: u64) -> Arc<Frame> {
        let mut f = Frame::encode(Some(EventId { ms, seq }), Event::SpcUpdate, "d", b"{}");
        f.pos = pos;
        Arc::new(f)
    }

    fn gap_frame(pos: u64) -> Arc<Frame> {
        let mut f = Frame::encode(None, Event::System, "", br#"{"kind":"replay-gap"}"#);
        f.pos = pos;
        Arc::new(f)
    }

    /// Positions of the frames a resume gives, `GAP` first for a gap.
    fn poss(r: Resume) -> Vec<u64> {
        match r {
            Resume::Frames(f) => f.iter().map(|f| f.pos).collect(),
            Resume::Ahead => vec![AHEAD],
            Resume::Gap(f) => std::iter::once(GAP)
                .chain(f.iter().map(|f| f.pos))
                .collect(),
        }
    }

    /// Not positions (frames take positions from 1 on): what `poss` writes
    /// for a wait, and for the `replay-gap` marker.
    const AHEAD: u64 = u64::MAX;
    const GAP: u64 = 0;
    /// A resume with nothing missed.
    const NOTHING: [u64; 0] = [];

    #[test]
    fn resumes_from_the_window_or_reports_a_gap() {
        let mut w = ReplayWindow::new(3, 10_000, 0, false);
        for pos in 1..=5 {
            // Ids as a cluster log makes them: several per millisecond.
            w.push(frame(100 + pos / 2, pos % 2, pos), 1000);
        }
        assert_eq!(w.len(), 3); // holds 3, 4, 5; evicted through 2
        let id = |pos: u64| EventId {
            ms: 100 + pos / 2,
            seq: pos % 2,
        };
        let table = [
            (id(2), 5, vec![3, 4, 5]), // the newest evicted frame is the client's own: nothing missed
            (id(3), 5, vec![4, 5]),
            (id(4), 4, vec![]),
            (id(5), 5, vec![]),
            (id(5), 4, vec![AHEAD]), // held but not routed by this reactor yet
            (id(1), 5, vec![GAP, 3, 4, 5]), // 2 was evicted: gap, then what is held
            (id(1), 4, vec![GAP, 3, 4]), // ...up to what this reactor routed
            (id(6), 5, vec![GAP]),   // never issued here
            (EventId { ms: 101, seq: 7 }, 5, vec![GAP, 4, 5]), // inside the range, not an id we hold
            (EventId { ms: 50, seq: 4 }, 5, vec![GAP, 3, 4, 5]), // before the window
        ];
        for (last, upto, want) in table {
            assert_eq!(
                poss(w.after_id(last, upto, 1000)),
                want,
                "{last} upto {upto}"
            );
        }
    }

    #[test]
    fn with_a_cluster_log_a_newer_id_is_waited_for_not_a_gap() {
        let mut w = ReplayWindow::new(3, 10_000, 0, true);
        assert_eq!(poss(w.after_id(EventId { ms: 7, seq: 0 }, 0, 0)), [AHEAD]);
        w.push(frame(10, 0, 1), 0);
        w.push(frame(10, 1, 2), 0);
        assert_eq!(poss(w.after_id(EventId { ms: 10, seq: 2 }, 2, 0)), [AHEAD]);
        assert_eq!(
            poss(w.after_id(EventId { ms: 9, seq: 0 }, 2, 0)),
            [GAP, 1, 2]
        );
    }

    #[test]
    fn an_id_further_ahead_than_the_slack_is_a_gap_not_a_wait() {
        let mut w = ReplayWindow::new(3, 10_000, 0, true);
        let ahead = |ms| EventId { ms, seq: 0 };
        let now = 5_000;
        // Nothing read yet: measured from the clock.
        assert_eq!(
            poss(w.after_id(ahead(now + AHEAD_SLACK_MS), 0, now)),
            [AHEAD]
        );
        assert_eq!(
            poss(w.after_id(ahead(now + AHEAD_SLACK_MS + 1), 0, now)),
            [GAP]
        );
        // The newest id read here is later than the clock: from it.
        w.push(frame(now + 3_000, 0, 1), now);
        let from = now + 3_000 + AHEAD_SLACK_MS;
        assert_eq!(poss(w.after_id(ahead(from), 1, now)), [AHEAD]);
        assert_eq!(poss(w.after_id(ahead(from + 1), 1, now)), [GAP]);
        for far in [u64::MAX, 99_999_999_999_999] {
            let id = EventId { ms: far, seq: far };
            assert_eq!(poss(w.after_id(id, 1, now)), [GAP]);
        }
    }

    #[test]
    fn a_break_forgets_everything_before_it() {
        let mut w = ReplayWindow::new(10, 10_000, 0, true);
        w.push(frame(10, 0, 1), 0);
        w.push(gap_frame(2), 0);
        w.push(frame(12, 0, 3), 0);
        // Resumed across the hole: told of it, then what follows it.
        assert_eq!(poss(w.after_id(EventId { ms: 10, seq: 0 }, 3, 0)), [GAP, 3]);
        assert_eq!(poss(w.after_pos(1, 3, 0)), [GAP, 3]);
        assert_eq!(poss(w.after_pos(2, 3, 0)), [3]);
        assert_eq!(poss(w.after_id(EventId { ms: 12, seq: 0 }, 3, 0)), NOTHING);
    }

    #[test]
    fn old_frames_age_out() {
        let mut w = ReplayWindow::new(100, 1_000, 0, false);
        w.push(frame(1, 1, 1), 0);
        w.push(frame(2, 2, 2), 500);
        let id = |ms, seq| EventId { ms, seq };
        assert_eq!(poss(w.after_id(id(1, 1), 2, 900)), [2]);
        assert_eq!(poss(w.after_id(id(1, 1), 2, 1_200)), [2]);
        assert_eq!(poss(w.after_id(id(0, 0), 2, 1_200)), [GAP, 2]);
        assert_eq!(poss(w.after_id(id(2, 2), 2, 1_600)), NOTHING);
        assert_eq!(w.len(), 0);
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn a_disabled_window_serves_only_the_newest_id() {
        let mut w = ReplayWindow::new(0, 1_000, 0, false);
        w.push(frame(1, 1, 1), 0);
        w.push(frame(2, 2, 2), 0);
        let id = |ms, seq| EventId { ms, seq };
        assert_eq!(poss(w.after_id(id(2, 2), 2, 0)), NOTHING);
        assert_eq!(poss(w.after_id(id(1, 1), 2, 0)), [GAP]);
    }

    /// The naive model: every frame ever pushed, and which are still held.
    fn naive(
        pushed: &[(Option<EventId>, u64)],
        held_from: usize,
        last: EventId,
        upto: u64,
    ) -> Vec<u64> {
        let held = &pushed[held_from..];
        let routed = |f: &&(Option<EventId>, u64)| f.1 <= upto;
        if held_from > 0 && pushed[held_from - 1].0 == Some(last) {
            return held.iter().filter(routed).map(|f| f.1).collect();
        }
        let Some(at) = held.iter().position(|f| f.0 == Some(last)) else {
            // Unknown: the gap, then every held frame newer than the id.
            let newer = held.iter().filter(|f| f.0 > Some(last)).filter(routed);
            return std::iter::once(GAP).chain(newer.map(|f| f.1)).collect();
        };
        if held[at].1 > upto {
            return vec![AHEAD];
        }
        held[at + 1..].iter().filter(routed).map(|f| f.1).collect()
    }

    proptest! {
        #[test]
        fn finds_ids_as_a_linear_scan_does(
            steps in proptest::collection::vec((0u64..3, 0u64..3), 1..40),
            cap in 1usize..8,
            probe in 0usize..48,
            upto_back in 0u64..3,
        ) {
            let mut w = ReplayWindow::new(cap, 1_000_000, 0, false);
            let (mut ms, mut seq, mut pushed) = (100u64, 0u64, Vec::new());
            for (pos, (dms, dseq)) in (1u64..).zip(&steps) {
                if *dms > 0 { ms += dms; seq = 0; } else { seq += 1 + dseq; }
                let id = EventId { ms, seq };
                w.push(frame(ms, seq, pos), 0);
                pushed.push((Some(id), pos));
            }
            let held_from = pushed.len() - w.len();
            let upto = w.last_pos().saturating_sub(upto_back);
            let last = pushed
                .get(probe)
                .and_then(|f| f.0)
                .unwrap_or(EventId { ms: 100 + probe as u64, seq: 99 });
            prop_assert_eq!(poss(w.after_id(last, upto, 0)), naive(&pushed, held_from, last, upto));
        }
    }
}
