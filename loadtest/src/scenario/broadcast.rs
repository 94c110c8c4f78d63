//! `broadcast`: N alert streams whose users all own one device; one
//! `machine:alerts` event is published and the clock runs until the last
//! client has parsed it. A few rounds, a second apart.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{clients, open, open_limit, seed, wait_open, workers_for, Opened, Ramp, Target};
use crate::fleet::Fleet;
use crate::proc::Foreign;
use crate::protocol::StreamKind;
use crate::publisher::{Publish, RedisPublisher};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Round {
    pub received: u64,
    /// Publish to the last client having it.
    pub last_ms: f64,
    pub p50_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BroadcastResult {
    pub target: String,
    /// Gateway processes sharing the port (1 for the other targets).
    #[serde(default = "super::one")]
    pub instances: usize,
    pub streams: u64,
    pub open: Opened,
    pub rounds: Vec<Round>,
    pub all_received: bool,
    /// CPU used during the scenario by processes outside this run, % of one core.
    pub foreign_cpu_pct: f64,
}

pub const DEVICE: &str = "alert-dev";

pub fn run(
    target: &Target,
    run_id: &str,
    streams: u64,
    rounds: u32,
    ramp: Ramp,
) -> Result<BroadcastResult, String> {
    let redis = target.redis.ok_or("broadcast needs Redis")?;
    let all = clients(run_id, streams, 1, DEVICE, StreamKind::Alerts);
    seed(redis, &all)?;
    let mut fleet = Fleet::spawn(workers_for(streams, ramp.per_worker))?;
    let foreign = Foreign::start(&target.measured_pids());
    let t0 = open(&mut fleet, target, &all, ramp)?;
    let label = format!("{} broadcast {streams}", target.label());
    let opened = wait_open(&mut fleet, &label, streams, t0, open_limit(streams))?;
    let mut publisher =
        RedisPublisher::connect(redis, "machine:alerts", "alert", vec![all.device(0)])?;
    let mut out = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_secs(1));
        fleet.reset()?;
        publisher.step(1, 1.0)?;
        publisher.settle()?;
        let start = Instant::now();
        let mut received = 0;
        while start.elapsed() < Duration::from_secs(15) {
            received = fleet.stats()?.stats.events;
            if received >= opened.opened {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let t = fleet.stats()?;
        let round = Round {
            received,
            last_ms: t.hist.max_ns() as f64 / 1e6,
            p50_ms: t.hist.quantile_ms(0.5),
        };
        eprintln!(
            "  {label}: {}/{} received, last after {:.1} ms, median {:.1} ms",
            round.received, opened.opened, round.last_ms, round.p50_ms
        );
        out.push(round);
    }
    let all_received = out.iter().all(|r| r.received >= opened.opened) && opened.opened == streams;
    Ok(BroadcastResult {
        target: target.kind.name().into(),
        instances: target.instances,
        streams,
        open: opened,
        rounds: out,
        all_received,
        foreign_cpu_pct: foreign.pct(),
    })
}
