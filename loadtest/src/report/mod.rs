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
use crate::scenario::fanout::FanoutResult;
use crate::scenario::idle::IdleResult;
use crate::scenario::label;
use crate::scenario::storm::StormResult;
use crate::scenario::Opened;

mod bursts;
mod fanout;
mod idle;

use bursts::{broadcast_table, storm_table};
use fanout::{cpu_with_redis, fanout_tables};
use idle::idle_tables;

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
    /// `loadtest run`: the URL of the already-running server it drove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
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
    if !doc.runs.is_empty() && doc.runs.iter().all(|r| r.url.is_some()) {
        let _ = writeln!(
            md,
            "Produced by `loadtest run` (loadtest/README.md) against servers that were already running; each \
             section below is one run, with the command that produced it (secrets written `<secret>`). Latency \
             is publish (wall-clock ns in the payload) → parsed by the client, so publisher and client share one \
             clock.\n"
        );
        for r in &doc.runs {
            md.push_str(&section_markdown(r));
        }
        return md;
    }
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
    match &r.url {
        Some(url) => {
            let _ = writeln!(
                md,
                "- started {} UTC, took {:.0} s; server {url}, already running; {} s of publishing\n",
                r.started_utc, r.duration_secs, r.step_secs
            );
        }
        None => {
            let _ = writeln!(
                md,
                "- started {} UTC, took {:.0} s; heartbeat period {} s on every server; idle window {} s; fanout steps {} s each\n",
                r.started_utc, r.duration_secs, r.heartbeat_secs, r.idle_secs, r.step_secs
            );
        }
    }
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
