//! The results of compare runs: one JSON document with every number of every
//! run (one run per `--section`), and `RESULTS.md` with a section per run,
//! each with the exact command that produced it and a table per scenario:
//! every server's figure side by side (the gateway once per instance count)
//! and the ratios gateway / nestjs, gateway / floor, gateway / nchan and
//! gateway ×N / gateway.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::proc::Machine;
use crate::scenario::broadcast::BroadcastResult;
use crate::scenario::fanout::{FanoutResult, Step};
use crate::scenario::idle::IdleResult;
use crate::scenario::label;
use crate::scenario::storm::StormResult;
use crate::scenario::Opened;

/// Every run, in the order they appear in RESULTS.md.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Document {
    pub runs: Vec<Results>,
}

impl Document {
    /// Reads a results.json: this shape, or the older single run. A missing
    /// file is an empty document.
    pub fn load(path: &Path) -> Result<Document, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Document::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if let Ok(d) = serde_json::from_str::<Document>(&text) {
            return Ok(d);
        }
        serde_json::from_str::<Results>(&text)
            .map(|r| Document { runs: vec![r] })
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces the run of the same section, or adds it (the default
    /// `compare` section first, the others in the order they were first run).
    pub fn upsert(&mut self, r: Results) {
        match self.runs.iter_mut().find(|x| x.section == r.section) {
            Some(slot) => *slot = r,
            None if r.section == DEFAULT_SECTION => self.runs.insert(0, r),
            None => self.runs.push(r),
        }
    }
}

pub const DEFAULT_SECTION: &str = "compare";

fn default_section() -> String {
    DEFAULT_SECTION.into()
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub command: String,
    /// What the run is stored under (`--section`).
    #[serde(default = "default_section")]
    pub section: String,
    /// Its heading (`--title`; empty: from the section).
    #[serde(default)]
    pub title: String,
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

impl Results {
    pub fn heading(&self) -> String {
        if !self.title.is_empty() {
            self.title.clone()
        } else if self.section == DEFAULT_SECTION {
            "Comparison at the default sizes".into()
        } else {
            self.section.clone()
        }
    }
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

/// The order targets appear in, left to right.
const TARGETS: [&str; 4] = ["gateway", "nestjs", "floor", "nchan"];

/// A column of a table: one server, the gateway once per instance count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Col<'a> {
    order: usize,
    instances: usize,
    target: &'a str,
}

impl Col<'_> {
    fn label(&self) -> String {
        label(self.target, self.instances)
    }
    fn is(&self, target: &str, instances: usize) -> bool {
        self.target == target && self.instances == instances
    }
}

fn columns<'a>(items: impl Iterator<Item = (&'a str, usize)>) -> Vec<Col<'a>> {
    let mut cols: Vec<Col> = items
        .map(|(target, instances)| Col {
            order: TARGETS.iter().position(|t| *t == target).unwrap_or(9),
            instances,
            target,
        })
        .collect();
    cols.sort();
    cols.dedup();
    cols
}

/// The pairs compared by ratio: (numerator, denominator). The gateway with
/// the fewest instances against every other server, and every gateway with
/// more instances against it.
fn pairs<'a>(cols: &[Col<'a>]) -> Vec<(Col<'a>, Col<'a>)> {
    let Some(base) = cols.iter().find(|c| c.target == "gateway").copied() else {
        return Vec::new();
    };
    cols.iter()
        .filter(|c| **c != base)
        .map(|c| {
            if c.target == "gateway" {
                (*c, base)
            } else {
                (base, *c)
            }
        })
        .collect()
}

fn pair_label(p: &(Col, Col)) -> String {
    format!("{}/{}", p.0.label(), p.1.label())
}

pub fn markdown(doc: &Document) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# sse-gateway load test results\n");
    let _ = writeln!(
        md,
        "Produced by `loadtest compare` (loadtest/README.md); each section below is one run, with the exact \
         command that produced it (from the repository root). Every server ran alone on this machine, restarted \
         fresh for each scenario, with the load client (worker processes) and Redis on the same cores; all \
         traffic on loopback.\n"
    );
    if let Some(m) = doc.runs.iter().find_map(|r| r.machine.as_ref()) {
        let _ = writeln!(
            md,
            "- machine: {} CPUs (`nproc`), {}, Linux {}, descriptor limit {} per process",
            m.nproc, m.model, m.kernel, m.fd_limit
        );
    }
    let _ = writeln!(
        md,
        "- targets: **gateway** = `target/release/sse-gateway` (Redis mode; **gateway ×N** = N gateway processes \
         on one redis-server, all started with the same `--listen` address: they bind with SO_REUSEPORT and the \
         kernel spreads the connections; RSS and CPU are summed over the N processes); **nestjs** = \
         `loadtest/nestjs-baseline` (`node dist/main.js`); **floor** = `loadtest floor-server`, a bare mio program \
         writing the same frame bytes to the same sockets, one `write` per frame, no HTTP or Redis: what this \
         machine does at best; **nchan** = nginx with Debian's `libnginx-mod-nchan` and \
         `loadtest/peers/nchan.conf` (one worker per core), driven through nchan's own locations: EventSource \
         subscribers on `/sub?deviceId=`, events POSTed to `/pub?id=`; no tickets and no Redis, so its CPU \
         includes taking in the events (HTTP), which for the gateway Redis does (shown separately). RSS and \
         CPU of nchan are summed over nginx's master and workers."
    );
    let _ = writeln!(md, "- sections:");
    for r in &doc.runs {
        let _ = writeln!(md, "  - {} — `{}`", r.heading(), r.command);
    }
    md.push('\n');
    if doc.runs.len() > 1 {
        glance(&mut md, doc);
    }
    for r in &doc.runs {
        md.push_str(&section_markdown(r));
    }
    let _ = writeln!(md, "Raw numbers: `loadtest/results.json`.");
    md
}

/// The gateway's rows of every section side by side, by process count: what
/// one process and several hold and carry on this machine.
fn glance(md: &mut String, doc: &Document) {
    let idle: Vec<(&Results, &IdleResult)> = doc
        .runs
        .iter()
        .flat_map(|r| r.idle.iter().map(move |i| (r, i)))
        .filter(|(_, i)| i.target == "gateway")
        .collect();
    let fanout: Vec<(&Results, &FanoutResult)> = doc
        .runs
        .iter()
        .flat_map(|r| r.fanout.iter().map(move |f| (r, f)))
        .filter(|(_, f)| f.target == "gateway")
        .collect();
    if idle.is_empty() && fanout.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## The gateway at a glance (every section, by process count)
"
    );
    if !idle.is_empty() {
        let _ = writeln!(
            md,
            "| idle streams | gateway processes | opened | time to open all (s) | RSS per stream (KiB) | RSS, all processes (MiB) | idle CPU (% of a core) | Redis CPU (% of a core) | descriptors per process | section |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for (r, i) in idle {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {} | {} |",
                thousands(i.streams),
                i.instances,
                thousands(i.open.opened),
                i.open.secs,
                i.rss_per_stream_bytes / 1024.0,
                i.rss_after_kib as f64 / 1024.0,
                i.cpu_pct,
                num(i.redis_cpu_pct, 2),
                fds(&i.fds_per_process),
                r.heading()
            );
        }
        md.push('\n');
    }
    if !fanout.is_empty() {
        let _ = writeln!(
            md,
            "| fanout streams | gateway processes | highest clean step (ev/s) | deliveries/s there | p50 / p99 there (ms) | CPU-s per M deliveries there (+ Redis) | section |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---|");
        for (r, f) in fanout {
            let best = f
                .steps
                .iter()
                .find(|s| s.rate == f.max_clean_rate && s.clean);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                thousands(f.streams),
                f.instances,
                f.max_clean_rate,
                best.map_or("–".into(), |s| format!("{:.0}", s.deliveries_per_sec)),
                best.map_or("–".into(), |s| format!(
                    "{:.2} / {:.2}",
                    s.p50_ms, s.p99_ms
                )),
                best.map_or("–".into(), |s| format!(
                    "{:.2} ({:.2})",
                    s.cpu_secs_per_m,
                    cpu_with_redis(s)
                )),
                r.heading()
            );
        }
        md.push('\n');
    }
}

/// One run: its command, its tables, its charts and notes.
pub fn section_markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## {}\n", r.heading());
    let _ = writeln!(md, "- command: `{}`", r.command);
    let _ = writeln!(
        md,
        "- started {} UTC, took {:.0} s; heartbeat period {} s on every server; idle window {} s; fanout steps {} s each\n",
        r.started_utc, r.duration_secs, r.heartbeat_secs, r.idle_secs, r.step_secs
    );
    idle_tables(&mut md, r);
    fanout_tables(&mut md, r);
    broadcast_table(&mut md, r);
    storm_table(&mut md, r);
    if !r.charts.is_empty() {
        let _ = writeln!(md, "### Charts\n");
        for c in &r.charts {
            let _ = writeln!(md, "![{c}]({c})\n");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "### Notes from the run\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    md
}

/// "19,034" or "16,512–16,901 over 6".
fn fds(v: &[u64]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(lo), _) if v.len() == 1 => thousands(*lo),
        (Some(lo), Some(hi)) => format!("{}–{} over {}", thousands(*lo), thousands(*hi), v.len()),
        _ => "–".into(),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn idle_tables(md: &mut String, r: &Results) {
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

/// Server + Redis CPU-seconds per million deliveries.
fn cpu_with_redis(s: &Step) -> f64 {
    if s.delivered == 0 {
        return 0.0;
    }
    (s.server_cpu_secs + s.redis_cpu_secs) / s.delivered as f64 * 1e6
}

fn fanout_tables(md: &mut String, r: &Results) {
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
            "Each event goes to {:.0} streams. The publisher steps its rate up ({} s per step) and stops after the \
             first step that is not clean (loss, duplicates, closed streams, refused publishes, rate not reached, \
             or p99 ≥ 1 s). Latency is publish (wall-clock ns in the payload) → parsed by the client. deliveries/s: \
             counted while the events were being published. \"delivered\" = deliveries counted / (events published × \
             streams per device), when the publisher finished the step / once the streams settled; \"lost\" = \
             deliveries still missing once the streams went quiet for 2 s after the step (at most 15 s). CPU-s per \
             M deliveries: the server's processes; \"+ Redis\" adds redis-server's (which takes the events in for \
             the gateway and the baseline; nchan takes them in itself over HTTP). CPU % columns: server, Redis, the \
             load client's workers, and processes outside this run, in % of one core over the step (the machine \
             has {} cores: when they add up to its capacity, the box is the limit).\n",
            n as f64 / devices as f64,
            r.step_secs,
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
                let _ = writeln!(
                    md,
                    "| {rate} | {} | {:.0} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} |{floor_cell} {:.0} / {:.0} / {:.0} / {:.0} | {} |",
                    c.label(),
                    s.deliveries_per_sec,
                    delivered_cell(s),
                    s.lost,
                    s.dups,
                    s.p50_ms,
                    s.p99_ms,
                    s.p999_ms,
                    s.max_ms,
                    s.cpu_secs_per_m,
                    cpu_with_redis(s),
                    s.server_cpu_pct,
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

fn broadcast_table(md: &mut String, r: &Results) {
    if r.broadcast.is_empty() {
        return;
    }
    let _ = writeln!(md, "### broadcast\n");
    let _ = writeln!(
        md,
        "N alert streams whose users all own one device; one `machine:alerts` event is published per round; \
         time from publish until the last client parsed it (median and worst over the rounds) and the median client.\n"
    );
    let _ = writeln!(md, "| streams | target | all received | last client, median of rounds (ms) | last client, worst (ms) | median client (ms) | other load % |");
    let _ = writeln!(md, "|---:|---|:-:|---:|---:|---:|---:|");
    let mut sizes: Vec<u64> = r.broadcast.iter().map(|b| b.streams).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let cols = columns(r.broadcast.iter().map(|b| (b.target.as_str(), b.instances)));
    for n in sizes {
        let mut meds: Vec<(Col, Option<f64>)> = Vec::new();
        for c in &cols {
            let Some(b) = r
                .broadcast
                .iter()
                .find(|b| b.streams == n && c.is(&b.target, b.instances))
            else {
                continue;
            };
            let mut last: Vec<f64> = b.rounds.iter().map(|x| x.last_ms).collect();
            last.sort_by(f64::total_cmp);
            let med = last.get(last.len() / 2).copied();
            let worst = last.last().copied();
            let mut p50: Vec<f64> = b.rounds.iter().map(|x| x.p50_ms).collect();
            p50.sort_by(f64::total_cmp);
            meds.push((*c, med));
            let _ = writeln!(
                md,
                "| {n} | {} | {} ({}/{} open) | {} | {} | {} | {:.0} |",
                c.label(),
                if b.all_received { "yes" } else { "**no**" },
                b.open.opened,
                n,
                num(med, 1),
                num(worst, 1),
                num(p50.get(p50.len() / 2).copied(), 1),
                b.foreign_cpu_pct
            );
        }
        for p in pairs(&cols) {
            let get = |c: &Col| meds.iter().find(|(x, _)| x == c).and_then(|(_, m)| *m);
            let _ = writeln!(
                md,
                "| {n} | {} | | {} | | | |",
                pair_label(&p),
                ratio(get(&p.0), get(&p.1))
            );
        }
    }
    md.push('\n');
}

fn storm_table(md: &mut String, r: &Results) {
    if r.storm.is_empty() {
        return;
    }
    let _ = writeln!(md, "### storm\n");
    let _ = writeln!(
        md,
        "N clients connect at once (ticket + stream, no pacing), then all drop at once and reconnect at once \
         with their tickets. Failed attempts are retried after 50–1600 ms, up to the attempt limit. \
         A `http_429` on reconnect is a closed stream whose limit slot was not yet free.\n"
    );
    let _ = writeln!(md, "| clients | target | connect: all open (s) | connect errors | reconnect: all open (s) | reconnect errors | other load % |");
    let _ = writeln!(md, "|---:|---|---:|---|---:|---|---:|");
    let mut sizes: Vec<u64> = r.storm.iter().map(|s| s.clients).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let cols = columns(r.storm.iter().map(|s| (s.target.as_str(), s.instances)));
    for n in sizes {
        let mut secs: Vec<(Col, f64, f64)> = Vec::new();
        for c in &cols {
            let Some(s) = r
                .storm
                .iter()
                .find(|s| s.clients == n && c.is(&s.target, s.instances))
            else {
                continue;
            };
            let _ = writeln!(
                md,
                "| {n} | {} | {:.2} ({}/{n}) | {} | {:.2} ({}/{n}) | {} | {:.0} |",
                c.label(),
                s.connect.secs,
                s.connect.opened,
                errors(&s.connect),
                s.reconnect.secs,
                s.reconnect.opened,
                errors(&s.reconnect),
                s.foreign_cpu_pct
            );
            secs.push((*c, s.connect.secs, s.reconnect.secs));
        }
        for p in pairs(&cols) {
            let get = |c: &Col| {
                secs.iter()
                    .find(|(x, _, _)| x == c)
                    .map(|(_, a, b)| (*a, *b))
            };
            let (a, b) = (get(&p.0), get(&p.1));
            let _ = writeln!(
                md,
                "| {n} | {} | {} | | {} | | |",
                pair_label(&p),
                ratio(a.map(|v| v.0), b.map(|v| v.0)),
                ratio(a.map(|v| v.1), b.map(|v| v.1))
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
        let md = markdown(&Document {
            runs: vec![Results {
                command: "loadtest compare".into(),
                section: DEFAULT_SECTION.into(),
                ..Results::default()
            }],
        });
        assert!(md.contains("`loadtest compare`"));
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn columns_and_pairs() {
        let cols = columns(
            [("nchan", 1), ("gateway", 3), ("gateway", 1), ("nestjs", 1)]
                .iter()
                .copied(),
        );
        let labels: Vec<String> = cols.iter().map(Col::label).collect();
        assert_eq!(labels, ["gateway", "gateway ×3", "nestjs", "nchan"]);
        let p: Vec<String> = pairs(&cols).iter().map(pair_label).collect();
        assert_eq!(p, ["gateway ×3/gateway", "gateway/nestjs", "gateway/nchan"]);
    }

    #[test]
    fn sections_replace_their_own() {
        let mut d = Document::default();
        for (section, cmd) in [("scale", "a"), ("compare", "b"), ("scale", "c")] {
            d.upsert(Results {
                section: section.into(),
                command: cmd.into(),
                ..Results::default()
            });
        }
        let got: Vec<(&str, &str)> = d
            .runs
            .iter()
            .map(|r| (r.section.as_str(), r.command.as_str()))
            .collect();
        assert_eq!(got, [("compare", "b"), ("scale", "c")]);
    }
}
