//! What this instance heard on Pub/Sub in the last few seconds, in order,
//! and where the cluster log's tail falls in it.
//!
//! Every instance hears every ingest message; only the leader writes them
//! to the log. When leadership moves (the leader was killed, or handed over
//! at shutdown), the new leader finds the log's newest entries in what it
//! heard and writes what follows them: nothing lost, nothing twice. An
//! entry is recognised by the hash of its channel and raw payload, which
//! the log keeps with it. A [`Mark::Break`] is where this instance's own
//! Pub/Sub connection was lost: what lies behind it was never heard here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long heard messages are kept: longer than a leader lease lives, so a
/// killed leader's last unwritten messages are still here when another
/// instance takes over.
pub const KEEP: Duration = Duration::from_secs(5);
/// Messages kept at most, whatever their age.
pub const MAX_ENTRIES: usize = 100_000;
/// Payload bytes kept at most: past it the oldest payloads are forgotten
/// (their hashes stay, for the alignment), and a leader that would have to
/// write one writes a gap marker instead.
pub const MAX_BYTES: usize = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    Message {
        /// Index into `frame::CHANNELS`.
        channel: u8,
        /// None once written (or forgotten past [`MAX_BYTES`]).
        payload: Option<Box<[u8]>>,
        hash: u64,
    },
    /// This instance's Pub/Sub connection was lost here.
    Break,
}

/// FNV-1a over the channel index and the payload: stable across processes
/// and versions, so any instance recognises what another one wrote.
pub fn hash(channel: u8, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in std::iter::once(&channel).chain(payload) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // 0 is what a gap marker carries.
    h.max(1)
}

/// Where the log's tail falls in what was heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alignment {
    /// The log holds nothing to compare with.
    EmptyLog,
    /// The log's newest message is the one heard at this index.
    After(u64),
    /// The log's newest message was not heard here (or too long ago).
    NotFound,
}

#[derive(Default)]
pub struct Heard {
    marks: VecDeque<(Instant, Mark)>,
    /// Index of `marks[0]` since the start (indexes never move).
    base: u64,
    /// Payload bytes held.
    bytes: usize,
    /// Index of the oldest mark that may still hold a payload.
    payloads_from: u64,
}

impl Heard {
    pub fn push(&mut self, at: Instant, mark: Mark) {
        if let Mark::Message {
            payload: Some(p), ..
        } = &mark
        {
            self.bytes += p.len();
        }
        self.marks.push_back((at, mark));
        while self.bytes > MAX_BYTES && self.payloads_from < self.end() {
            self.forget(self.payloads_from, self.payloads_from + 1);
            self.payloads_from += 1;
        }
    }

    /// Drops the payloads of marks `from..upto` (written: only their hashes
    /// matter now).
    pub fn forget(&mut self, from: u64, upto: u64) {
        let start = from.saturating_sub(self.base) as usize;
        let end = (upto.saturating_sub(self.base) as usize).min(self.marks.len());
        for (_, mark) in self.marks.range_mut(start.min(end)..end) {
            if let Mark::Message { payload, .. } = mark {
                if let Some(p) = payload.take() {
                    self.bytes -= p.len();
                }
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets marks older than [`KEEP`] or past [`MAX_ENTRIES`], but never
    /// one at or after index `keep_from` (not written yet).
    pub fn trim(&mut self, now: Instant, keep_from: Option<u64>) {
        while let Some((at, _)) = self.marks.front() {
            let old = now.saturating_duration_since(*at) > KEEP || self.marks.len() > MAX_ENTRIES;
            let unwritten = keep_from.is_some_and(|k| self.base >= k);
            if !old || (unwritten && self.marks.len() <= MAX_ENTRIES) {
                break;
            }
            self.forget(self.base, self.base + 1);
            self.marks.pop_front();
            self.base += 1;
            self.payloads_from = self.payloads_from.max(self.base);
        }
    }

    /// The index of the first mark held.
    pub fn first(&self) -> u64 {
        self.base
    }

    /// The index the next mark pushed will take.
    pub fn end(&self) -> u64 {
        self.base + self.marks.len() as u64
    }

    /// Marks from index `from` on (from the first held when it is older).
    pub fn since(&self, from: u64) -> impl Iterator<Item = (u64, &Mark)> {
        let skip = from.saturating_sub(self.base) as usize;
        (self.base..)
            .zip(self.marks.iter().map(|(_, m)| m))
            .skip(skip)
    }

    /// Just after the newest break (the first index when there is none):
    /// where writing starts when the log's tail is not found.
    pub fn after_last_break(&self) -> Option<u64> {
        self.marks
            .iter()
            .rposition(|(_, m)| *m == Mark::Break)
            .map(|i| self.base + i as u64 + 1)
    }

    /// Finds the log's tail, `tail` being the hashes of its newest messages,
    /// newest first. Between two of them lie only heard messages the leader
    /// did not write (`skipped`: invalid, or held by the rate limit); a
    /// break, or the start of what was heard, ends the comparison early.
    pub fn align(&self, tail: &[u64], skipped: impl Fn(&Mark) -> bool) -> Alignment {
        let Some((&newest, older)) = tail.split_first() else {
            return Alignment::EmptyLog;
        };
        let is = |i: usize, want: u64| matches!(&self.marks[i].1, Mark::Message { hash, .. } if *hash == want);
        'candidates: for i in (0..self.marks.len()).rev() {
            if !is(i, newest) {
                continue;
            }
            let mut j = i;
            for &want in older {
                loop {
                    if j == 0 {
                        // What was heard starts here: accept what matched.
                        break;
                    }
                    j -= 1;
                    let mark = &self.marks[j].1;
                    if *mark == Mark::Break {
                        // Behind a break nothing can be compared: accept.
                        return Alignment::After(self.base + i as u64);
                    }
                    if is(j, want) {
                        break;
                    }
                    if !skipped(mark) {
                        continue 'candidates;
                    }
                }
                if j == 0 && !is(0, want) {
                    break;
                }
            }
            return Alignment::After(self.base + i as u64);
        }
        Alignment::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> Mark {
        let payload: Box<[u8]> = Box::new([n]);
        Mark::Message {
            channel: 0,
            hash: hash(0, &payload),
            payload: Some(payload),
        }
    }

    fn h(n: u8) -> u64 {
        hash(0, &[n])
    }

    /// Odd payloads are what a leader would not write.
    fn odd(m: &Mark) -> bool {
        matches!(m, Mark::Message { payload: Some(p), .. } if p[0] % 2 == 1)
    }

    fn none(_: &Mark) -> bool {
        false
    }

    fn heard(marks: &[Option<u8>]) -> Heard {
        let mut heard = Heard::default();
        let now = Instant::now();
        for m in marks {
            heard.push(now, m.map_or(Mark::Break, message));
        }
        heard
    }

    #[test]
    fn the_tail_is_found_after_what_the_leader_dropped() {
        // Heard 2, 4, 5, 6, 8; the leader wrote 2, 6 (5 was invalid) and died.
        let heard = heard(&[Some(2), Some(4), Some(5), Some(6), Some(8)]);
        assert_eq!(heard.align(&[h(6), h(4), h(2)], odd), Alignment::After(3));
        // 4 would have been written: a log of 6 after 2 is another history.
        assert_eq!(heard.align(&[h(6), h(2)], odd), Alignment::NotFound);
        assert_eq!(heard.align(&[], odd), Alignment::EmptyLog);
        assert_eq!(heard.align(&[h(9)], odd), Alignment::NotFound);
    }

    #[test]
    fn a_repeated_payload_is_told_apart_by_what_came_before_it() {
        // 7 was heard twice; the log's tail is the first 7 (after 1, 2).
        let heard = heard(&[Some(1), Some(2), Some(7), Some(3), Some(7), Some(8)]);
        assert_eq!(heard.align(&[h(7), h(2), h(1)], none), Alignment::After(2));
        assert_eq!(heard.align(&[h(7), h(3), h(7)], none), Alignment::After(4));
        // 2 then 3 was never heard next to each other: another history.
        assert_eq!(heard.align(&[h(7), h(3), h(2)], none), Alignment::NotFound);
    }

    #[test]
    fn a_tail_older_than_what_was_heard_still_aligns_on_what_matches() {
        let heard = heard(&[Some(4), Some(5), Some(6)]);
        assert_eq!(heard.align(&[h(5), h(4), h(3)], none), Alignment::After(1));
    }

    #[test]
    fn breaks_are_where_writing_restarts_when_the_tail_is_lost() {
        let heard = heard(&[Some(1), None, Some(2), Some(3)]);
        assert_eq!(heard.after_last_break(), Some(2));
        assert_eq!(heard.align(&[h(2), h(1)], none), Alignment::After(2));
        assert_eq!(heard.since(2).count(), 2);
    }

    #[test]
    fn old_marks_go_but_unwritten_ones_stay() {
        let mut heard = Heard::default();
        let t0 = Instant::now();
        heard.push(t0, message(1));
        heard.push(t0, message(2));
        heard.push(t0 + KEEP, message(3));
        let later = t0 + KEEP + Duration::from_millis(1);
        heard.trim(later, Some(1));
        assert_eq!((heard.first(), heard.end()), (1, 3));
        heard.trim(later, None);
        assert_eq!((heard.first(), heard.end()), (2, 3));
        assert_eq!(heard.bytes(), 1);
    }

    #[test]
    fn payloads_are_dropped_once_written_or_past_the_byte_bound() {
        let mut heard = Heard::default();
        let now = Instant::now();
        let big = |n: u8| {
            let payload: Box<[u8]> = vec![n; MAX_BYTES / 3].into();
            Mark::Message {
                channel: 0,
                hash: hash(0, &payload),
                payload: Some(payload),
            }
        };
        for n in 0..4 {
            heard.push(now, big(n));
        }
        assert!(heard.bytes() <= MAX_BYTES);
        assert!(matches!(
            heard.since(0).next(),
            Some((0, Mark::Message { payload: None, .. }))
        ));
        heard.forget(0, 4);
        assert_eq!(heard.bytes(), 0);
        assert_eq!(heard.end(), 4);
    }

    /// The naive model of [`Heard::align`] for logs without drops or
    /// breaks: the newest index whose preceding run equals the tail.
    #[test]
    fn matches_a_plain_suffix_search_on_clean_histories() {
        let history: Vec<u8> = (0..200u32).map(|i| (i * 7 % 23) as u8).collect();
        let heard = heard(&history.iter().map(|n| Some(*n)).collect::<Vec<_>>());
        for written in 1..history.len() {
            let tail: Vec<u64> = history[..written]
                .iter()
                .rev()
                .take(8)
                .map(|n| h(*n))
                .collect();
            let naive = (0..history.len())
                .rev()
                .find(|&i| {
                    (0..tail.len().min(i + 1)).all(|k| h(history[i - k]) == tail[k])
                        && (i + 1 >= tail.len())
                })
                .map_or(Alignment::NotFound, |i| Alignment::After(i as u64));
            assert_eq!(heard.align(&tail, none), naive, "written {written}");
        }
    }
}
