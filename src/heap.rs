//! The heap after a burst: when many streams open or close at once, their
//! requests' short-lived buffers (heads, store lookups, responses, log
//! lines) end up as free chunks between the long-lived ones, pages the
//! allocator keeps resident. One thread looks every [`TICK`] and, after at
//! least [`BURST`] streams opened or closed since it last did, asks glibc
//! (`malloc_trim`) to hand free pages back to the kernel, so a gateway at
//! rest holds about what its open streams need. Elsewhere (not glibc) the
//! thread is not started.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::stream::registry::Registry;

/// How often the trimmer looks.
pub const TICK: Duration = Duration::from_millis(500);
/// Streams opened plus streams closed since the last trim that make one worth it.
pub const BURST: u64 = 1024;

/// Streams opened plus closed so far: every close was an open, so closes
/// are the opens no longer counted open.
fn churn(metrics: &Metrics, registry: &Registry) -> u64 {
    let opened = metrics.streams_opened.load(Relaxed);
    let open = registry.total() as u64;
    opened + opened.saturating_sub(open)
}

/// Whether the churn since `last` makes a trim worth it.
pub fn due(last: u64, now: u64) -> bool {
    now.saturating_sub(last) >= BURST
}

/// Starts the trimming thread (glibc only).
pub fn start_trimming(metrics: Arc<Metrics>, registry: Arc<Registry>) -> std::io::Result<()> {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("heap-trimmer".into())
        .spawn(move || {
            let mut last = churn(&metrics, &registry);
            loop {
                std::thread::sleep(TICK);
                let now = churn(&metrics, &registry);
                if due(last, now) {
                    trim();
                    last = now;
                }
            }
        })?;
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists under
    // its locks; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_after_a_burst_only() {
        assert!(!due(0, BURST - 1));
        assert!(due(0, BURST));
        assert!(due(10, 10 + 5 * BURST));
        // The counters never go back; if they seemed to, nothing is due.
        assert!(!due(BURST * 3, BURST));
    }

    #[test]
    fn churn_counts_opens_and_closes() {
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(
            crate::stream::registry::Limits {
                alerts: 1,
                data: 1,
                per_ip: 1,
            },
            metrics.clone(),
        );
        metrics.streams_opened.store(10, Relaxed);
        // 10 opened, 0 open now: 10 closed.
        assert_eq!(churn(&metrics, &registry), 20);
    }
}
