//! The idle table of a report section: every server's memory, CPU and
//! descriptors with N quiet streams open, side by side, with the ratios.

use std::fmt::Write as _;

use super::{columns, errors, fds, num, pair_label, pairs, ratio, Col, Results};
use crate::scenario::idle::IdleResult;

pub(super) fn idle_tables(md: &mut String, r: &Results) {
    if r.idle.is_empty() {
        return;
    }
    let _ = writeln!(md, "### idle\n");
    let _ = writeln!(
        md,
        "N data streams receiving only heartbeats. RSS per stream = (server VmRSS after opening − before) / N, \
         summed over the server's processes; PSS likewise from `smaps_rollup` (pages shared between processes, \
         such as nginx's shared memory or N copies of one binary, split between them instead of counted in \
         each). Idle CPU = server utime+stime over the idle window, in % of one core; Redis CPU is the \
         redis-server meanwhile (lease renewals, for the gateway). Descriptors per process: what each server \
         process holds with the streams open (streams + listeners, Redis links, logs).\n"
    );
    let cols = columns(r.idle.iter().map(|i| (i.target.as_str(), i.instances)));
    let pairs = pairs(&cols);
    let mut head = "| streams | metric |".to_string();
    let mut rule = "|---:|---|".to_string();
    for c in &cols {
        let _ = write!(head, " {} |", c.label());
        rule.push_str("---:|");
    }
    for p in &pairs {
        let _ = write!(head, " {} |", pair_label(p));
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    let mut sizes: Vec<u64> = r.idle.iter().map(|i| i.streams).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let get = |c: &Col| {
            r.idle
                .iter()
                .find(|i| i.streams == n && c.is(&i.target, i.instances))
        };
        type Metric = (&'static str, fn(&IdleResult) -> Option<f64>, usize, bool);
        let metrics: [Metric; 7] = [
            ("time to open all (s)", |i| Some(i.open.secs), 2, true),
            (
                "RSS per stream (KiB)",
                |i| Some(i.rss_per_stream_bytes / 1024.0),
                2,
                true,
            ),
            (
                "PSS per stream (KiB)",
                |i| {
                    (i.pss_after_kib > 0 && i.open.opened > 0).then(|| {
                        i.pss_after_kib.saturating_sub(i.pss_before_kib) as f64
                            / i.open.opened as f64
                    })
                },
                2,
                true,
            ),
            ("idle CPU (% of a core)", |i| Some(i.cpu_pct), 2, true),
            (
                "server RSS after (MiB)",
                |i| Some(i.rss_after_kib as f64 / 1024.0),
                1,
                true,
            ),
            (
                "Redis CPU meanwhile (% of a core)",
                |i| i.redis_cpu_pct,
                2,
                false,
            ),
            (
                "other processes' CPU meanwhile (% of a core)",
                |i| Some(i.foreign_cpu_pct),
                0,
                false,
            ),
        ];
        for (name, f, digits, ratios) in metrics {
            let mut line = format!("| {n} | {name} |");
            for c in &cols {
                let _ = write!(line, " {} |", num(get(c).and_then(f), digits));
            }
            for (a, b) in &pairs {
                let cell = if ratios {
                    ratio(get(a).and_then(f), get(b).and_then(f))
                } else {
                    String::new()
                };
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(md, "{line}");
        }
        type TextRow = (&'static str, fn(&IdleResult, u64) -> String);
        let text_rows: [TextRow; 2] = [
            ("descriptors per process", |i, _| fds(&i.fds_per_process)),
            ("opened (errors)", |i, n| {
                format!("{}/{} ({})", i.open.opened, n, errors(&i.open))
            }),
        ];
        for (name, f) in text_rows {
            let mut line = format!("| {n} | {name} |");
            for c in &cols {
                let _ = write!(line, " {} |", get(c).map(|i| f(i, n)).unwrap_or("–".into()));
            }
            line.push_str(&" |".repeat(pairs.len()));
            let _ = writeln!(md, "{line}");
        }
    }
    md.push('\n');
}
