//! `loadtest compare`: one command for the whole comparison. Starts Redis,
//! then for every scenario and size a fresh gateway (for each `--instances`
//! count: that many processes on one port), a fresh NestJS baseline and (for
//! idle and fanout) a fresh floor server and a fresh nginx + nchan in turn,
//! and writes `RESULTS.md` and `results.json`.
//!
//! A run is stored under its `--section` name: `results.json` keeps one run
//! per section (a rerun replaces its own section, the others stay), and
//! `RESULTS.md` shows them all, each with the command that produced it.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::floor::iso8601;
use crate::lab::Lab;
use crate::protocol::TargetKind;
use crate::report::{self, Document, Results};
use crate::scenario::{broadcast, fanout, idle, label, storm, Ramp};

#[derive(Args, Debug, Clone)]
pub struct CompareOpts {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    /// The NestJS baseline project (built with npm when dist/ is missing).
    #[arg(long, default_value = "loadtest/nestjs-baseline")]
    pub nestjs: PathBuf,
    /// Targets to compare: gateway, nestjs, floor, nchan (the floor and nchan
    /// only run idle and fanout; nchan is skipped with a note when
    /// libnginx-mod-nchan is not installed).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gateway,nestjs,floor,nchan"
    )]
    pub targets: Vec<String>,
    /// Gateway processes sharing the port (SO_REUSEPORT); several counts run
    /// the gateway once for each, e.g. `1,3`. RSS and CPU are summed over them.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub instances: Vec<usize>,
    /// The name this run is stored under in results.json (a rerun of the same
    /// section replaces it; other sections are kept).
    #[arg(long, default_value = "compare")]
    pub section: String,
    /// A heading for the section in RESULTS.md (default: from the section name).
    #[arg(long)]
    pub title: Option<String>,
    /// The nginx.conf template of the nchan peer.
    #[arg(long, default_value = "loadtest/peers/nchan.conf")]
    pub nchan_conf: PathBuf,
    /// Keep-alive connections the harness POSTs nchan's events over.
    #[arg(long, default_value_t = 2)]
    pub nchan_publishers: usize,
    /// idle: stream counts (empty to skip).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub idle: Vec<u64>,
    /// idle: seconds of idle CPU measurement.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
    /// Heartbeat period given to both servers.
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_secs: f64,
    /// fanout: stream counts (0 to skip).
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub fanout: Vec<u64>,
    /// fanout: devices the streams are spread over.
    #[arg(long, default_value_t = 100)]
    pub devices: u64,
    /// fanout: publish rates in events/s, stepped in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "200,1000,2000,3000,5000,10000,20000,40000"
    )]
    pub rates: Vec<u64>,
    /// fanout: seconds per step.
    #[arg(long, default_value_t = 3.0)]
    pub step_secs: f64,
    /// broadcast: alert stream counts (0 to skip).
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub broadcast: Vec<u64>,
    #[arg(long, default_value_t = 3)]
    pub broadcast_rounds: u32,
    /// storm: client counts (0 to skip).
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub storm: Vec<u64>,
    /// Streams per worker process at most (each process may hold 20,000 descriptors).
    #[arg(long, default_value_t = 4000)]
    pub per_worker: usize,
    /// Handshakes in flight during a normal ramp (storms use all at once).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Tries per client before it gives up.
    #[arg(long, default_value_t = 5)]
    pub attempts: u32,
    /// Where the Markdown report goes.
    #[arg(long, default_value = "loadtest/RESULTS.md")]
    pub out: PathBuf,
    /// Where the JSON goes.
    #[arg(long, default_value = "loadtest/results.json")]
    pub json: PathBuf,
}

/// The servers to start for one scenario, in order: (kind, instances).
/// `peers`: the floor and nchan too (idle and fanout only).
fn kinds(opts: &CompareOpts, peers: bool, nchan_ok: bool) -> Vec<(TargetKind, usize)> {
    let mut out = Vec::new();
    for t in &opts.targets {
        match t.as_str() {
            "gateway" => {
                let mut counts = opts.instances.clone();
                counts.retain(|n| *n > 0);
                if counts.is_empty() {
                    counts.push(1);
                }
                out.extend(counts.into_iter().map(|n| (TargetKind::Gateway, n)));
            }
            "nestjs" => out.push((TargetKind::Nestjs, 1)),
            "floor" if peers => out.push((TargetKind::Floor, 1)),
            "nchan" if peers && nchan_ok => out.push((TargetKind::Nchan, 1)),
            _ => {}
        }
    }
    out
}

pub fn run(opts: &CompareOpts, command: String) -> Result<(), String> {
    if !opts.gateway.exists() && opts.targets.iter().any(|t| t == "gateway") {
        return Err(format!(
            "{} not found: cargo build --release -p sse-gateway (or pass --gateway)",
            opts.gateway.display()
        ));
    }
    if let Some(t) = opts
        .targets
        .iter()
        .find(|t| !["gateway", "nestjs", "floor", "nchan"].contains(&t.as_str()))
    {
        return Err(format!(
            "unknown target {t} (gateway, nestjs, floor, nchan)"
        ));
    }
    let before = background("before the run");
    let started = Instant::now();
    let started_utc = iso8601(crate::client::now_ns() / 1_000_000);
    let mut lab = Lab::new(
        opts.gateway.clone(),
        opts.nestjs.clone(),
        opts.heartbeat_secs,
        opts.devices,
    )?;
    lab.nchan_template = opts.nchan_conf.clone();
    lab.nchan_publishers = opts.nchan_publishers;
    let ramp = Ramp {
        per_worker: opts.per_worker,
        concurrency: opts.concurrency,
        attempts: opts.attempts,
        open_rate: None,
    };
    let mut r = Results {
        command,
        section: opts.section.clone(),
        title: opts.title.clone().unwrap_or_default(),
        machine: Some(crate::proc::machine()),
        started_utc,
        heartbeat_secs: opts.heartbeat_secs,
        idle_secs: opts.idle_secs,
        step_secs: opts.step_secs,
        ..Results::default()
    };
    r.notes.push(before);
    r.notes.push(gateway_version(&opts.gateway));
    let wants_nchan = opts.targets.iter().any(|t| t == "nchan");
    let nchan_ok = wants_nchan
        && match crate::services::nchan_installed() {
            Ok((nginx, module)) => {
                r.notes.push(nchan_version(&nginx, &module, opts));
                true
            }
            Err(e) => {
                eprintln!("nchan skipped: {e}");
                r.notes.push(format!("nchan skipped: {e}"));
                false
            }
        };

    for &n in opts.idle.iter().filter(|n| **n > 0) {
        for (kind, instances) in kinds(opts, true, nchan_ok) {
            let name = label(kind.name(), instances);
            eprintln!("== idle {n} against {name}");
            let out = with_target(&lab, kind, instances, &mut r.notes, |lab, running| {
                idle::run(
                    &lab.target(running),
                    &format!("{}{instances}-idle{n}", kind.name()),
                    n,
                    opts.idle_secs,
                    ramp,
                )
            });
            r.idle.extend(out);
        }
    }
    for &n in opts.fanout.iter().filter(|n| **n > 0) {
        for (kind, instances) in kinds(opts, true, nchan_ok) {
            let name = label(kind.name(), instances);
            eprintln!("== fanout {n} against {name}");
            let plan = fanout::Plan {
                streams: n,
                devices: opts.devices,
                rates: &opts.rates,
                step_secs: opts.step_secs,
            };
            let out = with_target(&lab, kind, instances, &mut r.notes, |lab, running| {
                let t = lab.target(running);
                let target = crate::scenario::Target {
                    kind: t.kind,
                    addr: t.addr,
                    pids: t.pids.clone(),
                    instances: t.instances,
                    jwt_secret: t.jwt_secret,
                    redis: t.redis,
                    redis_pid: t.redis_pid,
                    route: None,
                };
                let mut publisher = lab.publisher(running)?;
                fanout::run(
                    &target,
                    publisher.as_mut(),
                    &format!("{}{instances}-fanout{n}", kind.name()),
                    &plan,
                    ramp,
                )
            });
            r.fanout.extend(out);
        }
    }
    for &n in opts.broadcast.iter().filter(|n| **n > 0) {
        for (kind, instances) in kinds(opts, false, nchan_ok) {
            let name = label(kind.name(), instances);
            eprintln!("== broadcast {n} against {name}");
            let out = with_target(&lab, kind, instances, &mut r.notes, |lab, running| {
                broadcast::run(
                    &lab.target(running),
                    &format!("{}{instances}-bcast{n}", kind.name()),
                    n,
                    opts.broadcast_rounds,
                    ramp,
                )
            });
            r.broadcast.extend(out);
        }
    }
    for &n in opts.storm.iter().filter(|n| **n > 0) {
        for (kind, instances) in kinds(opts, false, nchan_ok) {
            let name = label(kind.name(), instances);
            eprintln!("== storm {n} against {name}");
            let out = with_target(&lab, kind, instances, &mut r.notes, |lab, running| {
                storm::run(
                    &lab.target(running),
                    &format!("{}{instances}-storm{n}", kind.name()),
                    n,
                    ramp,
                )
            });
            r.storm.extend(out);
        }
    }

    r.notes.push(background("after the run"));
    r.duration_secs = started.elapsed().as_secs_f64();
    save(r, &opts.out, &opts.json)
}

/// Writes a run into its section of the report at `out` (Markdown, charts
/// beside it) and `json`, keeping the other sections; prints the section.
pub fn save(mut r: Results, out: &std::path::Path, json: &std::path::Path) -> Result<(), String> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some(d) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    attach_charts(&mut r, dir);
    // Other sections of an earlier results.json stay; this one replaces its own.
    let mut doc = match Document::load(json) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}: starting a new results file");
            Document::default()
        }
    };
    let section = r.section.clone();
    let duration = r.duration_secs;
    doc.upsert(r);
    let md = report::markdown(&doc);
    std::fs::write(out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(json, text).map_err(|e| format!("{}: {e}", json.display()))?;
    if let Some(run) = doc.runs.iter().find(|x| x.section == section) {
        println!("{}", report::section_markdown(run));
    }
    eprintln!(
        "wrote section `{section}` to {} and {} in {duration:.0} s",
        out.display(),
        json.display(),
    );
    Ok(())
}

/// Renders the charts next to the report; a chart failure becomes a note.
pub fn attach_charts(r: &mut Results, dir: &std::path::Path) {
    r.notes.retain(|n| !n.starts_with("charts skipped"));
    match crate::charts::render(r, dir) {
        Ok(files) => {
            r.charts = files
                .iter()
                .filter_map(|f| f.file_name()?.to_str().map(str::to_owned))
                .collect()
        }
        Err(e) => r.notes.push(format!("charts skipped: {e}")),
    }
}

/// Re-renders RESULTS.md and the charts from a results.json.
pub fn rerender(json: &std::path::Path, out: &std::path::Path) -> Result<(), String> {
    if !json.exists() {
        return Err(format!("{}: no such file", json.display()));
    }
    let mut doc = Document::load(json)?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    for r in &mut doc.runs {
        attach_charts(r, dir);
    }
    std::fs::write(out, report::markdown(&doc)).map_err(|e| format!("{}: {e}", out.display()))?;
    let pretty = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(json, pretty).map_err(|e| format!("{}: {e}", json.display()))
}

/// Starts a fresh server of `kind` (`instances` processes for the gateway),
/// runs `f` on it, stops it; failures become notes so one broken target does
/// not lose the others' numbers.
fn with_target<T>(
    lab: &Lab,
    kind: TargetKind,
    instances: usize,
    notes: &mut Vec<String>,
    f: impl FnOnce(&Lab, &mut crate::lab::Running) -> Result<T, String>,
) -> Option<T> {
    let name = label(kind.name(), instances);
    let mut running = match lab.start(kind, instances) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("  {name}: {e}");
            notes.push(format!("{name} did not start: {}", first_line(&e)));
            return None;
        }
    };
    let out = f(lab, &mut running);
    for exit in running.exits() {
        notes.push(format!(
            "{name} exited during the scenario: {}",
            first_line(&exit)
        ));
    }
    notes.extend(running.log_findings());
    match out {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("  {name}: {e}");
            notes.push(format!("{name} failed: {}", first_line(&e)));
            None
        }
    }
}

/// Which nginx and nchan were measured, and how they were driven.
fn nchan_version(nginx: &std::path::Path, module: &std::path::Path, opts: &CompareOpts) -> String {
    let nginx_v = std::process::Command::new(nginx)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|| "nginx (version unknown)".into());
    let nchan_v = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libnginx-mod-nchan"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    format!(
        "nchan: {nginx_v} with `{}` (libnginx-mod-nchan {nchan_v}), config `{}`; driven through its own \
         locations: subscribers `GET /sub?deviceId=<device>` (EventSource), events `POST /pub?id=<device>` \
         pipelined on {} keep-alive connection(s); no tickets, no Redis.",
        module.display(),
        opts.nchan_conf.display(),
        opts.nchan_publishers
    )
}

/// Which gateway was measured: the commit of the work tree it sits in and the
/// binary's modification time.
fn gateway_version(bin: &std::path::Path) -> String {
    let dir = bin
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("."));
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(&dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| iso8601(d.as_millis() as u64))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "Gateway binary `{}` built {built} UTC; work tree at `{commit}` when the run started.",
        bin.display()
    )
}

/// What else kept this machine busy, for the report.
fn background(when: &str) -> String {
    let busy = crate::proc::busy_processes(std::time::Duration::from_secs(2), 5.0);
    let list = if busy.is_empty() {
        "none above 5% of a core".to_string()
    } else {
        busy.iter()
            .map(|(n, p)| format!("{n} {p:.0}%"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "Other processes on the machine {when} (2 s sample): {list}; load average {:.2}.",
        crate::proc::loadavg()
    )
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}
