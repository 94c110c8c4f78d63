//! The publish→write lag histogram: how long an event took from the moment
//! its id was given (the id is `<epoch_ms>-<seq>`, so every frame carries its
//! publish time) to the reactor turn that flushed it to its streams.
//!
//! The cost is kept off the per-delivery hot path: a reactor notes the publish
//! time of each frame it routed to at least one stream (a push into a reused
//! vector, once per frame per reactor, not per stream), and after the turn's
//! flush reads the clock once and folds the whole turn into the shared
//! buckets with one atomic add per touched bucket. A stream whose socket was
//! blocked waits longer than this says; that wait shows as backlog and
//! write-stall closes instead.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::stream::frame::Frame;

/// Upper bounds of the buckets, in milliseconds (ids have millisecond
/// resolution, so nothing finer is meaningful). A last `+Inf` bucket follows.
pub const BOUNDS_MS: [u64; 13] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Shared, process-wide buckets (non-cumulative; cumulated when rendered).
#[derive(Default)]
pub struct LagHistogram {
    buckets: [AtomicU64; BOUNDS_MS.len() + 1],
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl LagHistogram {
    /// Adds one observation per publish time in `published`, all measured
    /// against the one clock reading `now_ms`. A publish time ahead of the
    /// clock (another host's id) counts as no lag.
    pub fn observe(&self, now_ms: u64, published: &[u64]) {
        let mut local = [0u64; BOUNDS_MS.len() + 1];
        let mut sum = 0u64;
        for &ms in published {
            let lag = now_ms.saturating_sub(ms);
            sum = sum.saturating_add(lag);
            let i = BOUNDS_MS.partition_point(|b| *b < lag);
            local[i] += 1;
        }
        for (bucket, n) in self.buckets.iter().zip(local) {
            if n > 0 {
                bucket.fetch_add(n, Relaxed);
            }
        }
        self.sum_ms.fetch_add(sum, Relaxed);
        self.count.fetch_add(published.len() as u64, Relaxed);
    }

    /// Appends the family in Prometheus text format, in seconds.
    pub fn render(&self, o: &mut String, name: &str, help: &str) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            match BOUNDS_MS.get(i) {
                Some(ms) => {
                    let le = *ms as f64 / 1000.0;
                    let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_ms.load(Relaxed) as f64 / 1000.0;
        let _ = writeln!(o, "{name}_sum {sum}");
        let _ = writeln!(o, "{name}_count {cumulative}");
    }
}

/// One reactor's publish times of the frames it routed this turn.
#[derive(Default)]
pub struct LagProbe {
    published: Vec<u64>,
}

impl LagProbe {
    /// Remembers `frame`'s publish time when it went to at least one stream.
    pub fn note(&mut self, frame: &Frame, delivered: u64) {
        if let (Some(id), true) = (frame.id, delivered > 0) {
            self.published.push(id.ms);
        }
    }

    /// After the turn's flush: one clock read, every noted frame observed.
    pub fn record(&mut self, histogram: &LagHistogram) {
        if self.published.is_empty() {
            return;
        }
        histogram.observe(crate::time::epoch_ms(), &self.published);
        self.published.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::frame::{Event, EventId};

    #[test]
    fn buckets_are_cumulative_and_in_seconds() {
        let h = LagHistogram::default();
        // lags 0, 1, 3, 40 and 60 000 ms
        h.observe(100_000, &[100_000, 99_999, 99_997, 99_960, 40_000, 100_500]);
        let mut o = String::new();
        h.render(&mut o, "lag_seconds", "Lag.");
        assert!(o.contains("# TYPE lag_seconds histogram\n"), "{o}");
        assert!(o.contains("lag_seconds_bucket{le=\"0.001\"} 3\n"), "{o}");
        assert!(o.contains("lag_seconds_bucket{le=\"0.005\"} 4\n"), "{o}");
        assert!(o.contains("lag_seconds_bucket{le=\"0.05\"} 5\n"), "{o}");
        assert!(o.contains("lag_seconds_bucket{le=\"10\"} 5\n"), "{o}");
        assert!(o.contains("lag_seconds_bucket{le=\"+Inf\"} 6\n"), "{o}");
        assert!(o.contains("lag_seconds_count 6\n"), "{o}");
        assert!(o.contains("lag_seconds_sum 60.044\n"), "{o}");
    }

    #[test]
    fn a_probe_notes_only_delivered_frames_with_ids() {
        let now = crate::time::epoch_ms();
        let id = Some(EventId { ms: now, seq: 1 });
        let delivered = Frame::encode(id, Event::SpcUpdate, "D1", b"{}");
        let mut probe = LagProbe::default();
        probe.note(&delivered, 2);
        probe.note(&delivered, 0);
        probe.note(&Frame::encode(None, Event::SpcUpdate, "D1", b"{}"), 1);
        let h = LagHistogram::default();
        probe.record(&h);
        probe.record(&h);
        assert_eq!(h.count.load(Relaxed), 1);
    }
}
