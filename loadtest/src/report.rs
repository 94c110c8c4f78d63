//! The results of a compare run: one JSON document with every number, and
//! `RESULTS.md` with a table per scenario, each gateway figure next to the
//! baseline's and the floor's, and the ratios.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::proc::Machine;
use crate::scenario::broadcast::BroadcastResult;
use crate::scenario::fanout::{FanoutResult, Step};
use crate::scenario::idle::IdleResult;
use crate::scenario::storm::StormResult;
use crate::scenario::Opened;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub command: String,
    pub machine: Option<Machine>,
    pub started_utc: String,
    pub duration_secs: f64,
    pub heartbeat_secs: f64,
    pub idle_secs: f64,
    pub step_secs: f64,
    pub idle: Vec<IdleResult>,
    pub fanout: Vec<FanoutResult>,
    pub broadcast: Vec<BroadcastResult>,
    pub storm: Vec<StormResult>,
    /// Failures and observations gathered during the run.
    pub notes: Vec<String>,
    /// Chart files, relative to the report.
    #[serde(default)]
    pub charts: Vec<String>,
}

/// `a / b`, or a dash when either side is missing or b is zero.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn errors(o: &Opened) -> String {
    if o.errors.is_empty() && o.failed == 0 {
        return "0".into();
    }
    let mut s: Vec<String> = o.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    if o.failed > 0 {
        s.push(format!("gave up: {}", o.failed));
    }
    s.join(", ")
}

const TARGETS: [&str; 3] = ["gateway", "nestjs", "floor"];

pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# sse-gateway load test results\n");
    let _ = writeln!(
        md,
        "Produced by `loadtest compare` (loadtest/README.md). Every server ran alone on this machine, \
         restarted fresh for each scenario, with the load client (worker processes) and Redis on the same cores; \
         all traffic on loopback.\n"
    );
    let _ = writeln!(md, "- command (from the repository root): `{}`", r.command);
    if let Some(m) = &r.machine {
        let _ = writeln!(
            md,
            "- machine: {} CPUs (`nproc`), {}, Linux {}, descriptor limit {} per process",
            m.nproc, m.model, m.kernel, m.fd_limit
        );
    }
    let _ = writeln!(
        md,
        "- started {} UTC, took {:.0} s; heartbeat period {} s on both servers; idle window {} s; fanout steps {} s each",
        r.started_utc, r.duration_secs, r.heartbeat_secs, r.idle_secs, r.step_secs
    );
    let _ = writeln!(
        md,
        "- targets: **gateway** = `target/release/sse-gateway` (Redis mode); **nestjs** = `loadtest/nestjs-baseline` \
         (`node dist/main.js`); **floor** = `loadtest floor-server`, a bare mio program writing the same frame bytes \
         to the same sockets, one `write` per frame, no HTTP or Redis: what this machine does at best.\n"
    );

    idle_tables(&mut md, r);
    fanout_tables(&mut md, r);
    broadcast_table(&mut md, r);
    storm_table(&mut md, r);

    if !r.charts.is_empty() {
        let _ = writeln!(md, "## Charts\n");
        for c in &r.charts {
            let _ = writeln!(md, "![{c}]({c})\n");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "## Notes from the run\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    let _ = writeln!(md, "Raw numbers: `loadtest/results.json`.");
    md
}

fn idle_tables(md: &mut String, r: &Results) {
    if r.idle.is_empty() {
        return;
    }
    let _ = writeln!(md, "## idle\n");
    let _ = writeln!(
        md,
        "N data streams receiving only heartbeats. RSS per stream = (server VmRSS after opening − before) / N. \
         Idle CPU = server utime+stime over the idle window, in % of one core.\n"
    );
    let _ = writeln!(
        md,
        "| streams | metric | gateway | nestjs | floor | gateway/nestjs | gateway/floor |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|");
    let mut sizes: Vec<u64> = r.idle.iter().map(|i| i.streams).collect();
    sizes.dedup();
    for n in sizes {
        let get = |t: &str| r.idle.iter().find(|i| i.streams == n && i.target == t);
        type Metric = (&'static str, fn(&IdleResult) -> f64, usize);
        let metrics: [Metric; 5] = [
            ("time to open all (s)", |i| i.open.secs, 2),
            (
                "RSS per stream (KiB)",
                |i| i.rss_per_stream_bytes / 1024.0,
                2,
            ),
            ("idle CPU (% of a core)", |i| i.cpu_pct, 2),
            (
                "server RSS after (MiB)",
                |i| i.rss_after_kib as f64 / 1024.0,
                1,
            ),
            (
                "other processes' CPU meanwhile (% of a core)",
                |i| i.foreign_cpu_pct,
                0,
            ),
        ];
        for (name, f, digits) in metrics {
            let vals: Vec<Option<f64>> = TARGETS.iter().map(|t| get(t).map(f)).collect();
            let ratios = !name.starts_with("other");
            let _ = writeln!(
                md,
                "| {n} | {name} | {} | {} | {} | {} | {} |",
                num(vals[0], digits),
                num(vals[1], digits),
                num(vals[2], digits),
                if ratios {
                    ratio(vals[0], vals[1])
                } else {
                    String::new()
                },
                if ratios {
                    ratio(vals[0], vals[2])
                } else {
                    String::new()
                }
            );
        }
        let errs: Vec<String> = TARGETS
            .iter()
            .map(|t| {
                get(t)
                    .map(|i| format!("{}/{} ({})", i.open.opened, n, errors(&i.open)))
                    .unwrap_or("–".into())
            })
            .collect();
        let _ = writeln!(
            md,
            "| {n} | opened (errors) | {} | {} | {} | | |",
            errs[0], errs[1], errs[2]
        );
    }
    md.push('\n');
}

fn fanout_tables(md: &mut String, r: &Results) {
    let mut sizes: Vec<(u64, u64)> = r.fanout.iter().map(|f| (f.streams, f.devices)).collect();
    sizes.dedup();
    for (n, devices) in sizes {
        let runs: Vec<&FanoutResult> = TARGETS
            .iter()
            .filter_map(|t| r.fanout.iter().find(|x| x.streams == n && x.target == *t))
            .collect();
        let _ = writeln!(md, "## fanout — {n} streams, {devices} devices\n");
        let _ = writeln!(
            md,
            "Each event goes to {:.0} streams. The publisher steps its rate up ({} s per step) and stops after the first \
             step that is not clean (loss, duplicates, closed streams, rate not reached, or p99 ≥ 1 s). Latency is \
             publish (wall-clock ns in the payload) → parsed by the client. CPU is the server process only. \
             \"lost\" = deliveries still missing once the stream went quiet for 2 s after the step (at most 15 s). \
             CPU % columns: the server, the load client's workers, and processes outside this run, in % of one core \
             over the step (the machine has {} cores: when they add up to its capacity, the box is the limit).\n",
            n as f64 / devices as f64,
            r.step_secs,
            r.machine.as_ref().map(|m| m.nproc).unwrap_or(0)
        );
        let _ = writeln!(
            md,
            "| events/s | target | deliveries/s | lost | dup | p50 ms | p99 ms | p99.9 ms | max ms | CPU-s per M deliveries | × floor | server / client / other CPU % | clean |"
        );
        let _ = writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"
        );
        let mut rates: Vec<u64> = runs
            .iter()
            .flat_map(|x| x.steps.iter().map(|s| s.rate))
            .collect();
        rates.sort_unstable();
        rates.dedup();
        let step = |t: &str, rate: u64| -> Option<&Step> {
            runs.iter()
                .find(|x| x.target == t)
                .and_then(|x| x.steps.iter().find(|s| s.rate == rate))
        };
        for &rate in &rates {
            let floor_cpu = step("floor", rate).map(|s| s.cpu_secs_per_m);
            for t in TARGETS {
                let Some(s) = step(t, rate) else { continue };
                let _ = writeln!(
                    md,
                    "| {rate} | {t} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {:.0} / {:.0} / {:.0} | {} |",
                    s.deliveries_per_sec,
                    s.lost,
                    s.dups,
                    s.p50_ms,
                    s.p99_ms,
                    s.p999_ms,
                    s.max_ms,
                    s.cpu_secs_per_m,
                    ratio(Some(s.cpu_secs_per_m), floor_cpu),
                    s.server_cpu_pct,
                    s.client_cpu_pct,
                    s.foreign_cpu_pct,
                    if s.clean { "yes" } else { "**no**" }
                );
            }
        }
        let _ = writeln!(md, "\n**gateway / nestjs** per step:\n");
        let _ = writeln!(
            md,
            "| events/s | deliveries/s | p50 | p99 | CPU-s per M deliveries |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
        for &rate in &rates {
            let (g, b) = (step("gateway", rate), step("nestjs", rate));
            if g.is_none() || b.is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {rate} | {} | {} | {} | {} |",
                ratio(
                    g.map(|s| s.deliveries_per_sec),
                    b.map(|s| s.deliveries_per_sec)
                ),
                ratio(g.map(|s| s.p50_ms), b.map(|s| s.p50_ms)),
                ratio(g.map(|s| s.p99_ms), b.map(|s| s.p99_ms)),
                ratio(g.map(|s| s.cpu_secs_per_m), b.map(|s| s.cpu_secs_per_m)),
            );
        }
        let clean: Vec<String> = runs
            .iter()
            .map(|x| format!("{} {} ev/s", x.target, x.max_clean_rate))
            .collect();
        let _ = writeln!(md, "\nHighest clean step: {}.\n", clean.join(", "));
    }
}

fn broadcast_table(md: &mut String, r: &Results) {
    if r.broadcast.is_empty() {
        return;
    }
    let _ = writeln!(md, "## broadcast\n");
    let _ = writeln!(
        md,
        "N alert streams whose users all own one device; one `machine:alerts` event is published per round; \
         time from publish until the last client parsed it (median and worst over the rounds) and the median client.\n"
    );
    let _ = writeln!(md, "| streams | target | all received | last client, median of rounds (ms) | last client, worst (ms) | median client (ms) | other load % |");
    let _ = writeln!(md, "|---:|---|:-:|---:|---:|---:|---:|");
    let mut sizes: Vec<u64> = r.broadcast.iter().map(|b| b.streams).collect();
    sizes.dedup();
    for n in sizes {
        let mut meds = Vec::new();
        for t in ["gateway", "nestjs"] {
            let Some(b) = r.broadcast.iter().find(|b| b.streams == n && b.target == t) else {
                meds.push(None);
                continue;
            };
            let mut last: Vec<f64> = b.rounds.iter().map(|x| x.last_ms).collect();
            last.sort_by(f64::total_cmp);
            let med = last.get(last.len() / 2).copied();
            let worst = last.last().copied();
            let mut p50: Vec<f64> = b.rounds.iter().map(|x| x.p50_ms).collect();
            p50.sort_by(f64::total_cmp);
            meds.push(med);
            let _ = writeln!(
                md,
                "| {n} | {t} | {} ({}/{} open) | {} | {} | {} | {:.0} |",
                if b.all_received { "yes" } else { "**no**" },
                b.open.opened,
                n,
                num(med, 1),
                num(worst, 1),
                num(p50.get(p50.len() / 2).copied(), 1),
                b.foreign_cpu_pct
            );
        }
        let _ = writeln!(
            md,
            "| {n} | gateway/nestjs | | {} | | | |",
            ratio(meds[0], meds[1])
        );
    }
    md.push('\n');
}

fn storm_table(md: &mut String, r: &Results) {
    if r.storm.is_empty() {
        return;
    }
    let _ = writeln!(md, "## storm\n");
    let _ = writeln!(
        md,
        "N clients connect at once (ticket + stream, no pacing), then all drop at once and reconnect at once \
         with their tickets. Failed attempts are retried after 50–1600 ms, up to the attempt limit. \
         A `http_429` on reconnect is a closed stream whose limit slot was not yet free.\n"
    );
    let _ = writeln!(md, "| clients | target | connect: all open (s) | connect errors | reconnect: all open (s) | reconnect errors | other load % |");
    let _ = writeln!(md, "|---:|---|---:|---|---:|---|---:|");
    let mut sizes: Vec<u64> = r.storm.iter().map(|s| s.clients).collect();
    sizes.dedup();
    for n in sizes {
        let mut c = Vec::new();
        for t in ["gateway", "nestjs"] {
            let Some(s) = r.storm.iter().find(|s| s.clients == n && s.target == t) else {
                c.push((None, None));
                continue;
            };
            let _ = writeln!(
                md,
                "| {n} | {t} | {:.2} ({}/{n}) | {} | {:.2} ({}/{n}) | {} | {:.0} |",
                s.connect.secs,
                s.connect.opened,
                errors(&s.connect),
                s.reconnect.secs,
                s.reconnect.opened,
                errors(&s.reconnect),
                s.foreign_cpu_pct
            );
            c.push((Some(s.connect.secs), Some(s.reconnect.secs)));
        }
        if c.len() == 2 {
            let _ = writeln!(
                md,
                "| {n} | gateway/nestjs | {} | | {} | | |",
                ratio(c[0].0, c[1].0),
                ratio(c[0].1, c[1].1)
            );
        }
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_empty_report() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25x");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "–");
        assert_eq!(ratio(None, Some(1.0)), "–");
        let md = markdown(&Results {
            command: "loadtest compare".into(),
            ..Results::default()
        });
        assert!(md.contains("`loadtest compare`"));
    }
}
