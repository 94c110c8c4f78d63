//! The live progress line on stderr while streams open and events flow:
//! redrawn in place when stderr is a terminal, and written as a plain line
//! at most once a second when it is not (a log file, CI), so a log gets a
//! readable history instead of carriage returns.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::fleet::Totals;

/// How often a plain (not a terminal) line is written at most.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

pub struct Progress {
    terminal: bool,
    /// A line is drawn in place and not yet ended by a newline.
    drawn: bool,
    last: Option<Instant>,
}

impl Progress {
    /// Progress on this process's stderr.
    pub fn stderr() -> Progress {
        // SAFETY: isatty(2) only inspects the descriptor.
        let terminal = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress {
            terminal,
            drawn: false,
            last: None,
        }
    }

    /// Shows `line`: in place on a terminal; otherwise when a second has
    /// passed since the last one, or when `force`d (a final state).
    pub fn show(&mut self, line: &str, force: bool) {
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.drawn = true;
            return;
        }
        if force || self.last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            let _ = writeln!(err, "{line}");
            self.last = Some(Instant::now());
        }
    }

    /// Ends a line drawn in place, so what follows starts on its own line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What is flowing: `label: open 300/300 | sent 1,200 | received 360,000 |
/// errors 0 | p99 3.21 ms | 4.5 s`.
pub fn live_line(label: &str, t: &Totals, total: u64, sent: u64, secs: f64) -> String {
    let s = &t.stats;
    let errors: u64 = s.errors.values().sum::<u64>() + s.closed_by_server;
    let p99 = if t.hist.max_ns() > 0 {
        format!("{:.2} ms", t.hist.quantile_ms(0.99))
    } else {
        "–".into()
    };
    format!(
        "  {label}: open {}/{total} | sent {sent} | received {} | errors {errors} | p99 {p99} | {secs:.1} s",
        s.open_now, s.events
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_what_flows() {
        let mut t = Totals::default();
        t.stats.open_now = 3;
        t.stats.events = 12;
        t.stats.errors.insert("http_429".into(), 2);
        t.stats.closed_by_server = 1;
        let line = live_line("run", &t, 4, 5, 1.25);
        assert_eq!(
            line,
            "  run: open 3/4 | sent 5 | received 12 | errors 3 | p99 – | 1.2 s"
        );
        t.hist.record_ns(2_000_000);
        assert!(live_line("run", &t, 4, 5, 1.0).contains("p99 2.00 ms"));
    }
}
