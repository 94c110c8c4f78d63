//! `loadtest compare`: one command for the whole comparison. Starts Redis,
//! then for every scenario and size a fresh gateway, a fresh NestJS baseline
//! and (for idle and fanout) a fresh floor server in turn, and writes
//! `RESULTS.md` and `results.json`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::floor::iso8601;
use crate::lab::Lab;
use crate::protocol::TargetKind;
use crate::report::{self, Results};
use crate::scenario::{broadcast, fanout, idle, storm, Ramp};

#[derive(Args, Debug, Clone)]
pub struct CompareOpts {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    /// The NestJS baseline project (built with npm when dist/ is missing).
    #[arg(long, default_value = "loadtest/nestjs-baseline")]
    pub nestjs: PathBuf,
    /// Targets to compare: gateway, nestjs, floor (the floor only runs idle and fanout).
    #[arg(long, value_delimiter = ',', default_value = "gateway,nestjs,floor")]
    pub targets: Vec<String>,
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
        default_value = "200,1000,5000,10000,20000,40000"
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

fn kinds(opts: &CompareOpts, with_floor: bool) -> Vec<TargetKind> {
    let mut out = Vec::new();
    for t in &opts.targets {
        match t.as_str() {
            "gateway" => out.push(TargetKind::Gateway),
            "nestjs" => out.push(TargetKind::Nestjs),
            "floor" if with_floor => out.push(TargetKind::Floor),
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
    let before = background("before the run");
    let started = Instant::now();
    let started_utc = iso8601(crate::client::now_ns() / 1_000_000);
    let lab = Lab::new(
        opts.gateway.clone(),
        opts.nestjs.clone(),
        opts.heartbeat_secs,
        opts.devices,
    )?;
    let ramp = Ramp {
        per_worker: opts.per_worker,
        concurrency: opts.concurrency,
        attempts: opts.attempts,
    };
    let mut r = Results {
        command,
        machine: Some(crate::proc::machine()),
        started_utc,
        heartbeat_secs: opts.heartbeat_secs,
        idle_secs: opts.idle_secs,
        step_secs: opts.step_secs,
        ..Results::default()
    };
    r.notes.push(before);
    r.notes.push(gateway_version(&opts.gateway));

    for &n in opts.idle.iter().filter(|n| **n > 0) {
        for kind in kinds(opts, true) {
            eprintln!("== idle {n} against {}", kind.name());
            let out = with_target(&lab, kind, &mut r.notes, |lab, running| {
                idle::run(
                    &lab.target(running),
                    &format!("idle{n}"),
                    n,
                    opts.idle_secs,
                    ramp,
                )
            });
            r.idle.extend(out);
        }
    }
    for &n in opts.fanout.iter().filter(|n| **n > 0) {
        for kind in kinds(opts, true) {
            eprintln!("== fanout {n} against {}", kind.name());
            let plan = fanout::Plan {
                streams: n,
                devices: opts.devices,
                rates: &opts.rates,
                step_secs: opts.step_secs,
            };
            let out = with_target(&lab, kind, &mut r.notes, |lab, running| {
                let target = lab.target(running);
                let (kind, addr, pid) = (target.kind, target.addr, target.pid);
                let mut publisher = lab.publisher(running)?;
                let target = crate::scenario::Target {
                    kind,
                    addr,
                    pid,
                    jwt_secret: &lab.secret,
                    redis: (kind != TargetKind::Floor).then_some(lab.redis_addr()),
                };
                fanout::run(
                    &target,
                    publisher.as_mut(),
                    &format!("fanout{n}"),
                    &plan,
                    ramp,
                )
            });
            r.fanout.extend(out);
        }
    }
    for &n in opts.broadcast.iter().filter(|n| **n > 0) {
        for kind in kinds(opts, false) {
            eprintln!("== broadcast {n} against {}", kind.name());
            let out = with_target(&lab, kind, &mut r.notes, |lab, running| {
                broadcast::run(
                    &lab.target(running),
                    &format!("bcast{n}"),
                    n,
                    opts.broadcast_rounds,
                    ramp,
                )
            });
            r.broadcast.extend(out);
        }
    }
    for &n in opts.storm.iter().filter(|n| **n > 0) {
        for kind in kinds(opts, false) {
            eprintln!("== storm {n} against {}", kind.name());
            let out = with_target(&lab, kind, &mut r.notes, |lab, running| {
                storm::run(&lab.target(running), &format!("storm{n}"), n, ramp)
            });
            r.storm.extend(out);
        }
    }

    r.notes.push(background("after the run"));
    r.duration_secs = started.elapsed().as_secs_f64();
    let dir = opts
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    attach_charts(&mut r, dir);
    let md = report::markdown(&r);
    std::fs::write(&opts.out, &md).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let json = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
    std::fs::write(&opts.json, json).map_err(|e| format!("{}: {e}", opts.json.display()))?;
    println!("{md}");
    eprintln!(
        "wrote {} and {} in {:.0} s",
        opts.out.display(),
        opts.json.display(),
        r.duration_secs
    );
    Ok(())
}

/// Renders the charts next to the report; a chart failure becomes a note.
pub fn attach_charts(r: &mut Results, dir: &std::path::Path) {
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
    let text = std::fs::read_to_string(json).map_err(|e| format!("{}: {e}", json.display()))?;
    let mut r: Results =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    r.notes.retain(|n| !n.starts_with("charts skipped"));
    attach_charts(&mut r, dir);
    std::fs::write(out, report::markdown(&r)).map_err(|e| format!("{}: {e}", out.display()))?;
    let pretty = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
    std::fs::write(json, pretty).map_err(|e| format!("{}: {e}", json.display()))
}

/// Starts a fresh server of `kind`, runs `f` on it, stops it; failures become
/// notes so one broken target does not lose the others' numbers.
fn with_target<T>(
    lab: &Lab,
    kind: TargetKind,
    notes: &mut Vec<String>,
    f: impl FnOnce(&Lab, &mut crate::lab::Running) -> Result<T, String>,
) -> Option<T> {
    let mut running = match lab.start(kind) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("  {}: {e}", kind.name());
            notes.push(format!("{} did not start: {}", kind.name(), first_line(&e)));
            return None;
        }
    };
    let out = f(lab, &mut running);
    if !running.service.running() {
        notes.push(format!(
            "{} exited during the scenario: {}",
            kind.name(),
            first_line(&running.service.log_tail(5))
        ));
    }
    if let Some(f) = running.log_findings() {
        notes.push(f);
    }
    match out {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("  {}: {e}", kind.name());
            notes.push(format!("{} failed: {}", kind.name(), first_line(&e)));
            None
        }
    }
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
