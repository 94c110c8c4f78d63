//! `idle`: N streams that receive nothing but heartbeats. Measures the time to
//! open them all, the server's RSS per stream ((RSS after - RSS before) / N,
//! from VmRSS, summed over the server's processes) and its CPU while idle
//! (utime + stime over an interval, summed likewise), and Redis's CPU meanwhile.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{clients, open, open_limit, seed, wait_open, workers_for, Opened, Ramp, Target};
use crate::fleet::Fleet;
use crate::proc::{self, Foreign, Sampler};
use crate::protocol::StreamKind;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleResult {
    pub target: String,
    /// Gateway processes sharing the port (1 for the other targets).
    #[serde(default = "super::one")]
    pub instances: usize,
    pub streams: u64,
    pub open: Opened,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_stream_bytes: f64,
    pub idle_secs: f64,
    pub cpu_secs: f64,
    /// Server CPU while idle, percent of one core.
    pub cpu_pct: f64,
    pub heartbeats_per_sec: f64,
    /// CPU used during the idle window by processes outside this run, % of one core.
    pub foreign_cpu_pct: f64,
    /// Proportional set size summed over the server's processes (shared pages
    /// split between them), before and after opening.
    #[serde(default)]
    pub pss_before_kib: u64,
    #[serde(default)]
    pub pss_after_kib: u64,
    /// Open descriptors of each server process once the streams are open.
    #[serde(default)]
    pub fds_per_process: Vec<u64>,
    /// redis-server's CPU during the idle window, % of one core (None: no Redis used).
    #[serde(default)]
    pub redis_cpu_pct: Option<f64>,
}

pub fn run(
    target: &Target,
    run_id: &str,
    streams: u64,
    idle_secs: f64,
    ramp: Ramp,
) -> Result<IdleResult, String> {
    let all = clients(run_id, streams, 100, "d", StreamKind::Data);
    if let Some(redis) = target.redis {
        seed(redis, &all)?;
    }
    let mut fleet = Fleet::spawn(workers_for(streams, ramp.per_worker))?;
    // Let the fresh server settle before the baseline reading.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = proc::rss_sum(&target.pids);
    let pss_before = proc::pss_sum(&target.pids);
    let t0 = open(&mut fleet, target, &all, ramp)?;
    let label = format!("{} idle {streams}", target.label());
    let opened = wait_open(&mut fleet, &label, streams, t0, open_limit(streams))?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = proc::rss_sum(&target.pids);
    let pss_after = proc::pss_sum(&target.pids);
    let fds_per_process: Vec<u64> = target
        .pids
        .iter()
        .map(|&p| proc::fd_count(p).unwrap_or(0))
        .collect();
    fleet.reset()?;
    let sampler = Sampler::start_all(&target.pids);
    let redis = target.redis_pid.map(Sampler::start);
    let foreign = Foreign::start(&target.measured_pids());
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let (cpu, wall) = sampler.read();
    let redis_cpu_pct = redis.map(|r| {
        let (c, w) = r.read();
        c / w.max(1e-9) * 100.0
    });
    let foreign_cpu_pct = foreign.pct();
    let t = fleet.stats()?;
    let per_stream = if opened.opened > 0 {
        rss_after.saturating_sub(rss_before) as f64 * 1024.0 / opened.opened as f64
    } else {
        0.0
    };
    eprintln!(
        "  {label}: open in {:.2} s, {:.2} KiB RSS per stream, idle CPU {:.2}% (redis {}), descriptors per process {:?}",
        opened.secs,
        per_stream / 1024.0,
        cpu / wall.max(1e-9) * 100.0,
        redis_cpu_pct.map_or("–".into(), |r| format!("{r:.2}%")),
        fds_per_process
    );
    Ok(IdleResult {
        target: target.kind.name().into(),
        instances: target.instances,
        streams,
        open: opened,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_stream_bytes: per_stream,
        idle_secs: wall,
        cpu_secs: cpu,
        cpu_pct: cpu / wall.max(1e-9) * 100.0,
        heartbeats_per_sec: t.stats.heartbeats as f64 / wall.max(1e-9),
        foreign_cpu_pct,
        pss_before_kib: pss_before,
        pss_after_kib: pss_after,
        fds_per_process,
        redis_cpu_pct,
    })
}
