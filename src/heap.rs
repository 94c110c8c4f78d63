//! The process heap (glibc's malloc): how the gateway keeps what a burst of
//! opens took from staying resident under thousands of idle streams.
//!
//! An idle stream allocates nothing, but opening one does: its request,
//! its store lookups, its response, on two reactors and the Redis workers.
//! Two settings keep that transient memory from outliving the burst:
//!
//! - **One arena** ([`share_one_arena`]). glibc gives each thread that meets
//!   contention an arena of its own, and each arena keeps the free space its
//!   thread's share of a burst left. With one, the reactors and the workers
//!   reuse one pool. Per-thread caches still serve most small allocations
//!   without the arena's lock, and delivering an event allocates nothing.
//! - **A trim after a burst** ([`Trim`], [`start_trimming`]). Once a burst
//!   of connections has passed (a quarter of a second without a new one),
//!   `malloc_trim` gives the free pages back to the kernel. Never during
//!   one: pages given back would only be taken again.
//!
//! Elsewhere than glibc both are no-ops.

use std::thread;
use std::time::Duration;

/// How often the trimmer looks at the accept counter.
pub const TRIM_TICK: Duration = Duration::from_millis(250);

/// Connections accepted since the last trim that make a burst worth one.
pub const TRIM_AFTER: u64 = 1_000;

/// Every thread allocates from one arena. Called first thing in `main`,
/// before any thread starts.
pub fn share_one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no thread is
    // allocating concurrently this early, and any value is valid for it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// When to trim, from the count of accepted connections read once a tick:
/// after at least [`TRIM_AFTER`] since the last trim, in the first tick
/// that accepted none (a storm of reconnects accepts thousands a second; a
/// trickle of page loads leaves whole ticks without one).
#[derive(Debug, Default)]
pub struct Trim {
    at_last_trim: u64,
    at_last_tick: u64,
}

impl Trim {
    pub fn new(accepted: u64) -> Trim {
        Trim {
            at_last_trim: accepted,
            at_last_tick: accepted,
        }
    }

    /// Whether to trim now, `accepted` being the counter's value this tick.
    pub fn due(&mut self, accepted: u64) -> bool {
        let calm = accepted == self.at_last_tick;
        self.at_last_tick = accepted;
        if calm && accepted.saturating_sub(self.at_last_trim) >= TRIM_AFTER {
            self.at_last_trim = accepted;
            return true;
        }
        false
    }
}

/// Starts the thread that trims the heap after each burst of connections
/// (`accepted` reads their count). It sleeps between ticks and ends with
/// the process.
pub fn start_trimming(accepted: impl Fn() -> u64 + Send + 'static) -> std::io::Result<()> {
    thread::Builder::new()
        .name("heap-trim".into())
        .spawn(move || {
            let mut trim = Trim::new(accepted());
            loop {
                thread::sleep(TRIM_TICK);
                if trim.due(accepted()) {
                    let started = std::time::Instant::now();
                    give_back_free_pages();
                    log::debug!("heap trimmed after a burst in {:?}", started.elapsed());
                }
            }
        })?;
    Ok(())
}

fn give_back_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arena's lock itself; 0 keeps no pad.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_trimmed_once_when_it_is_over_and_never_during_it() {
        let mut t = Trim::new(0);
        // A storm: 1,500 a tick for four ticks, a pause, a straggler, calm.
        let history = [1_500, 3_000, 4_500, 6_000, 6_000, 6_001, 6_001, 6_001];
        let got: Vec<bool> = history.iter().map(|&a| t.due(a)).collect();
        assert_eq!(got, [false, false, false, false, true, false, false, false]);
    }

    #[test]
    fn a_trickle_of_opens_is_trimmed_once_it_adds_up() {
        let mut t = Trim::new(0);
        // Page loads, one every other tick: the calm tick after the 1,000th
        // trims, and no other tick does.
        let got: Vec<bool> = (1..=2_500).map(|i| t.due(i / 2)).collect();
        assert_eq!(got.iter().position(|&d| d), Some(2_000));
        assert_eq!(got.iter().filter(|&&d| d).count(), 1);
    }
}
