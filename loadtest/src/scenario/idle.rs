//! `idle`: N streams that receive nothing but heartbeats. Measures the time to
//! open them all, the server's RSS per stream ((RSS after - RSS before) / N,
//! from VmRSS) and its CPU while idle (utime + stime over an interval).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{clients, open, open_limit, seed, wait_open, workers_for, Opened, Ramp, Target};
use crate::fleet::Fleet;
use crate::proc::{self, Foreign, Sampler};
use crate::protocol::StreamKind;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleResult {
    pub target: String,
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
    let rss_before = proc::rss_kib(target.pid).unwrap_or(0);
    let t0 = open(&mut fleet, target, &all, ramp)?;
    let label = format!("{} idle {streams}", target.kind.name());
    let opened = wait_open(&mut fleet, &label, streams, t0, open_limit(streams))?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = proc::rss_kib(target.pid).unwrap_or(0);
    fleet.reset()?;
    let sampler = Sampler::start(target.pid);
    let foreign = Foreign::start();
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let (cpu, wall) = sampler.read();
    let foreign_cpu_pct = foreign.pct();
    let t = fleet.stats()?;
    let per_stream = if opened.opened > 0 {
        rss_after.saturating_sub(rss_before) as f64 * 1024.0 / opened.opened as f64
    } else {
        0.0
    };
    Ok(IdleResult {
        target: target.kind.name().into(),
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
    })
}
