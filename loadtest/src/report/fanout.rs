//! The fanout tables of a report section: per publish rate, every server's
//! deliveries, loss, latency and CPU, the ratios between servers, and why a
//! step was not clean.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{columns, pair_label, pairs, ratio, Col, Results};
use crate::scenario::fanout::{FanoutResult, Step};

/// Why a step was not clean, from its numbers (the same tests as the scenario).
fn unclean(s: &Step, step_secs: f64) -> String {
    let mut why = Vec::new();
    if s.lost > 0 {
        why.push(format!("{} lost", s.lost));
    }
    if s.dups > 0 {
        why.push(format!("{} duplicated", s.dups));
    }
    if s.closed_by_server > 0 {
        why.push(format!("{} streams closed", s.closed_by_server));
    }
    if !s.publish_errors.is_empty() {
        let e: Vec<String> = s
            .publish_errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        why.push(format!("publishes refused ({})", e.join(", ")));
    }
    if (s.sent as f64) < 0.9 * s.rate as f64 * step_secs || s.publish_secs > step_secs * 1.2 {
        why.push(format!(
            "rate not reached ({} events in {:.1} s = {:.0}/s)",
            s.sent,
            s.publish_secs,
            s.sent as f64 / s.publish_secs.max(1e-9)
        ));
    }
    if s.p99_ms >= 1000.0 {
        why.push(format!("p99 {:.0} ms", s.p99_ms));
    }
    why.join(", ")
}

fn delivered_pct(s: &Step) -> f64 {
    s.delivered as f64 / s.expected.max(1) as f64 * 100.0
}

/// "in step / in the end": the share of the expected deliveries that had
/// arrived when the publisher finished the step, and once the streams settled.
fn delivered_cell(s: &Step) -> String {
    if s.delivered_in_window == 0 && s.delivered > 0 {
        return format!("{:.1}%", delivered_pct(s));
    }
    format!(
        "{:.1}% / {:.1}%",
        s.delivered_in_window as f64 / s.expected.max(1) as f64 * 100.0,
        delivered_pct(s)
    )
}

/// Whether the server's processes were measured (`loadtest run` without
/// `--pid` measures none: a live server never has zero RSS).
fn measured(s: &Step) -> bool {
    s.server_rss_kib > 0 || s.server_cpu_secs > 0.0
}

/// How the streams opened, and every error by kind: opening (after the
/// retries), publishing, and streams the server closed.
fn open_table(md: &mut String, runs: &[&FanoutResult], cols: &[Col]) {
    let _ = writeln!(
        md,
        "\n| target | streams opened | time to open all (s) | opens/s | errors by kind |\n|---|---:|---:|---:|---|"
    );
    for c in cols {
        let Some(x) = runs.iter().find(|x| c.is(&x.target, x.instances)) else {
            continue;
        };
        let mut kinds: BTreeMap<String, u64> = x.open.errors.clone();
        if x.open.failed > 0 {
            kinds.insert("gave up".into(), x.open.failed);
        }
        for s in &x.steps {
            for (k, v) in &s.publish_errors {
                *kinds.entry(k.clone()).or_default() += v;
            }
            if s.closed_by_server > 0 {
                *kinds.entry("closed_by_server".into()).or_default() += s.closed_by_server;
            }
        }
        let errors = if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let opens_per_sec = if x.open.secs > 0.0 {
            format!("{:.0}", x.open.opened as f64 / x.open.secs)
        } else {
            "–".into()
        };
        let _ = writeln!(
            md,
            "| {} | {}/{} | {:.2} | {opens_per_sec} | {errors} |",
            c.label(),
            x.open.opened,
            x.open.clients,
            x.open.secs
        );
    }
}

/// Server + Redis CPU-seconds per million deliveries.
pub(super) fn cpu_with_redis(s: &Step) -> f64 {
    if s.delivered == 0 {
        return 0.0;
    }
    (s.server_cpu_secs + s.redis_cpu_secs) / s.delivered as f64 * 1e6
}

pub(super) fn fanout_tables(md: &mut String, r: &Results) {
    let mut sizes: Vec<(u64, u64)> = r.fanout.iter().map(|f| (f.streams, f.devices)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for (n, devices) in sizes {
        let runs: Vec<&FanoutResult> = r
            .fanout
            .iter()
            .filter(|x| x.streams == n && x.devices == devices)
            .collect();
        let cols = columns(runs.iter().map(|x| (x.target.as_str(), x.instances)));
        let run_of = |c: &Col| runs.iter().find(|x| c.is(&x.target, x.instances)).copied();
        let step = |c: &Col, rate: u64| -> Option<&Step> {
            run_of(c).and_then(|x| x.steps.iter().find(|s| s.rate == rate))
        };
        let _ = writeln!(md, "### fanout — {n} streams, {devices} devices\n");
        let _ = writeln!(
            md,
            "Each event goes to {:.0} streams. {} A step is clean without loss, duplicates, closed streams, \
             refused publishes, with the rate reached and p99 under 1 s. Latency is publish (wall-clock ns in the payload) → parsed by the client. deliveries/s: \
             counted while the events were being published. \"delivered\" = deliveries counted / (events published × \
             streams per device), when the publisher finished the step / once the streams settled; \"lost\" = \
             deliveries still missing once the streams went quiet for 2 s after the step (at most 15 s). CPU-s per \
             M deliveries: the server's processes; \"+ Redis\" adds redis-server's (which takes the events in for \
             the gateway and the baseline; nchan takes them in itself over HTTP). CPU % columns: server, Redis, the \
             load client's workers, and processes outside this run, in % of one core over the step (the machine \
             has {} cores: when they add up to its capacity, the box is the limit).\n",
            n as f64 / devices as f64,
            if r.url.is_some() {
                format!("One step: the publisher sent its rate for {} s.", r.step_secs)
            } else {
                format!(
                    "The publisher steps its rate up ({} s per step) and stops after the first step that is not clean.",
                    r.step_secs
                )
            },
            r.machine.as_ref().map(|m| m.nproc).unwrap_or(0)
        );
        let floor = cols.iter().find(|c| c.target == "floor").copied();
        let (floor_head, floor_rule) = if floor.is_some() {
            (" × floor |", "---:|")
        } else {
            ("", "")
        };
        let _ = writeln!(
            md,
            "| events/s | target | deliveries/s | delivered | lost | dup | p50 ms | p99 ms | p99.9 ms | max ms | CPU-s per M deliveries | + Redis |{floor_head} server / Redis / client / other CPU % | clean |"
        );
        let _ = writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{floor_rule}---:|:-:|"
        );
        let mut rates: Vec<u64> = runs
            .iter()
            .flat_map(|x| x.steps.iter().map(|s| s.rate))
            .collect();
        rates.sort_unstable();
        rates.dedup();
        for &rate in &rates {
            let floor_cpu = floor.and_then(|f| step(&f, rate)).map(|s| s.cpu_secs_per_m);
            for c in &cols {
                let Some(s) = step(c, rate) else { continue };
                let floor_cell = if floor.is_some() {
                    format!(" {} |", ratio(Some(s.cpu_secs_per_m), floor_cpu))
                } else {
                    String::new()
                };
                let (cpu_m, cpu_r, cpu_pct) = if measured(s) {
                    (
                        format!("{:.2}", s.cpu_secs_per_m),
                        format!("{:.2}", cpu_with_redis(s)),
                        format!("{:.0}", s.server_cpu_pct),
                    )
                } else {
                    ("–".into(), "–".into(), "–".into())
                };
                let _ = writeln!(
                    md,
                    "| {rate} | {} | {:.0} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {cpu_m} | {cpu_r} |{floor_cell} {cpu_pct} / {:.0} / {:.0} / {:.0} | {} |",
                    c.label(),
                    s.deliveries_per_sec,
                    delivered_cell(s),
                    s.lost,
                    s.dups,
                    s.p50_ms,
                    s.p99_ms,
                    s.p999_ms,
                    s.max_ms,
                    s.redis_cpu_pct,
                    s.client_cpu_pct,
                    s.foreign_cpu_pct,
                    if s.clean { "yes" } else { "**no**" }
                );
            }
        }
        for p in pairs(&cols) {
            if p.1.target == "floor" {
                continue;
            }
            let (a, b) = (p.0, p.1);
            let b_max = run_of(&b).map(|x| x.max_clean_rate).unwrap_or(0);
            let a_max = run_of(&a).map(|x| x.max_clean_rate).unwrap_or(0);
            let _ = writeln!(
                md,
                "\n**{}** per step (p50, p99 and CPU below 1.00x: {} was faster / used less):\n",
                pair_label(&p),
                a.label()
            );
            let _ = writeln!(
                md,
                "| events/s | delivered {} | delivered {} | deliveries/s | p50 | p99 | CPU-s per M deliveries | CPU-s per M, + Redis | |",
                a.label(),
                b.label()
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            for &rate in &rates {
                let (Some(x), Some(y)) = (step(&a, rate), step(&b, rate)) else {
                    continue;
                };
                let mut mark = Vec::new();
                if rate == b_max && b_max > 0 {
                    mark.push(format!("{}'s highest clean step", b.label()));
                }
                if rate == a_max && a_max > 0 {
                    mark.push(format!("{}'s highest clean step", a.label()));
                }
                let _ = writeln!(
                    md,
                    "| {rate} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    delivered_cell(x),
                    delivered_cell(y),
                    ratio(Some(x.deliveries_per_sec), Some(y.deliveries_per_sec)),
                    ratio(Some(x.p50_ms), Some(y.p50_ms)),
                    ratio(Some(x.p99_ms), Some(y.p99_ms)),
                    ratio(Some(x.cpu_secs_per_m), Some(y.cpu_secs_per_m)),
                    ratio(Some(cpu_with_redis(x)), Some(cpu_with_redis(y))),
                    mark.join("; ")
                );
            }
        }
        open_table(md, &runs, &cols);
        let mut lines = Vec::new();
        for c in &cols {
            let Some(x) = run_of(c) else { continue };
            let first_bad = x.steps.iter().find(|s| !s.clean);
            let what = match first_bad {
                None => format!(
                    "**{}**: every step clean, up to {} ev/s",
                    c.label(),
                    x.max_clean_rate
                ),
                Some(s) => format!(
                    "**{}**: highest clean step {} ev/s; at {} ev/s it did not keep up: {:.0} deliveries/s of {:.0} asked, delivered {} (in step / in the end), p50 {:.0} ms, p99 {:.0} ms ({})",
                    c.label(),
                    x.max_clean_rate,
                    s.rate,
                    s.deliveries_per_sec,
                    s.rate as f64 * x.open.opened as f64 / x.devices.max(1) as f64,
                    delivered_cell(s),
                    s.p50_ms,
                    s.p99_ms,
                    unclean(s, r.step_secs)
                ),
            };
            lines.push(what);
        }
        let _ = writeln!(md);
        for l in lines {
            let _ = writeln!(md, "- {l}");
        }
        md.push('\n');
    }
}
