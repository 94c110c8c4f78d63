//! Latency histogram: log-linear buckets over microseconds (32 sub-buckets per
//! power of two, so a reported percentile is within ~3% of the true value),
//! cheap to record into, and mergeable across worker processes through a
//! sparse `[bucket, count]` list.

use serde::{Deserialize, Serialize};

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = 2048;

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    max_ns: u64,
}

/// The wire form of a histogram.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sparse {
    pub buckets: Vec<(u16, u64)>,
    pub max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            max_ns: 0,
        }
    }
}

fn index(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros();
    let shift = msb - SUB_BITS;
    let top = us >> shift; // in [SUB, 2*SUB)
    let i = SUB + u64::from(shift) * SUB + (top - SUB);
    (i as usize).min(BUCKETS - 1)
}

/// The middle of bucket `i`, in microseconds.
fn value(i: usize) -> f64 {
    let i = i as u64;
    if i < SUB {
        return i as f64 + 0.5;
    }
    let shift = (i - SUB) / SUB;
    let top = SUB + (i - SUB) % SUB;
    let low = top << shift;
    low as f64 + (1u64 << shift) as f64 / 2.0
}

impl Histogram {
    pub fn record_ns(&mut self, ns: u64) {
        self.counts[index(ns / 1000)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            return self.max_ns as f64 / 1e6;
        }
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let v = value(i) / 1000.0;
                return v.min(self.max_ns as f64 / 1e6);
            }
        }
        self.max_ns as f64 / 1e6
    }

    pub fn merge(&mut self, other: &Sparse) {
        for &(i, c) in &other.buckets {
            if let Some(slot) = self.counts.get_mut(usize::from(i)) {
                *slot += c;
                self.count += c;
            }
        }
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn sparse(&self) -> Sparse {
        Sparse {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u16, *c))
                .collect(),
            max_ns: self.max_ns,
        }
    }

    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.count = 0;
        self.max_ns = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for us in (0..10_000_000u64).step_by(997) {
            let i = index(us);
            assert!(i >= last);
            last = i;
            let v = value(i);
            assert!(
                (v - us as f64).abs() <= (us as f64 * 0.035).max(1.0),
                "{us} {v}"
            );
        }
    }

    #[test]
    fn quantiles_and_merge() {
        let mut a = Histogram::default();
        for ms in 1..=100u64 {
            a.record_ns(ms * 1_000_000);
        }
        assert!((a.quantile_ms(0.5) - 50.0).abs() < 2.0);
        assert!((a.quantile_ms(0.99) - 99.0).abs() < 3.5);
        assert_eq!(a.quantile_ms(1.0), 100.0);
        let mut b = Histogram::default();
        b.merge(&a.sparse());
        assert_eq!(b.count(), 100);
        assert_eq!(b.max_ns(), 100_000_000);
        assert_eq!(Histogram::default().quantile_ms(0.5), 0.0);
    }
}
