//! Connections per client IP that are not streams: reading a request,
//! waiting on a lookup, writing a response, or idle in keep-alive. Streams
//! have their own per-IP limit (the registry); this one stops a single
//! address from pinning descriptors with connections that never become
//! streams. Counted by peer address at accept (before any `X-Forwarded-For`
//! is known), so trusted proxies are not counted at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
pub struct PeerCounts {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

impl PeerCounts {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more connection from `ip`, or false when it already has `cap`.
    pub fn enter(&self, ip: IpAddr, cap: u32) -> bool {
        let mut counts = self.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= cap {
            return false;
        }
        *n += 1;
        true
    }

    /// One connection from `ip` closed or became a stream.
    pub fn leave(&self, ip: IpAddr) {
        let mut counts = self.lock();
        if let Some(n) = counts.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&ip);
            }
        }
    }

    /// Addresses with a connection counted (for tests: zero when all closed).
    pub fn addresses(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_forgets_empty_ones() {
        let p = PeerCounts::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        assert!(p.enter(a, 2) && p.enter(a, 2));
        assert!(!p.enter(a, 2), "third from a");
        assert!(p.enter(b, 2), "b is not a");
        p.leave(a);
        assert!(p.enter(a, 2));
        for ip in [a, a, b, b] {
            p.leave(ip);
        }
        assert_eq!(p.addresses(), 0);
    }
}
