//! `fanout`: S streams, each on one of D devices, while the publisher steps
//! its rate up. Per step: deliveries/s, events lost or duplicated (per-device
//! sequence numbers), latency from publish to parsed at the client, and the
//! server's CPU-seconds per million deliveries. Stepping stops at the first
//! step the server could not keep up with.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{clients, open_all, seed, Opened, Ramp, Target};
use crate::fleet::{Fleet, Totals};
use crate::proc::{self, Foreign, Sampler};
use crate::progress::{live_line, Progress};
use crate::protocol::StreamKind;
use crate::publisher::Publish;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// Events/s asked of the publisher.
    pub rate: u64,
    pub sent: u64,
    pub publish_secs: f64,
    pub expected: u64,
    pub delivered: u64,
    /// Deliveries counted during the publishing window, per second.
    pub deliveries_per_sec: f64,
    /// Deliveries counted by the end of the publishing window.
    #[serde(default)]
    pub delivered_in_window: u64,
    pub lost: u64,
    pub dups: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub server_cpu_secs: f64,
    pub cpu_secs_per_m: f64,
    pub server_rss_kib: u64,
    /// Streams the server closed during the step.
    pub closed_by_server: u64,
    /// CPU used meanwhile by processes outside this run, % of one core.
    pub foreign_cpu_pct: f64,
    /// Server and load-client (all workers) CPU over the step, % of one core:
    /// near 200 together, the machine was the limit, not the server alone.
    #[serde(default)]
    pub server_cpu_pct: f64,
    #[serde(default)]
    pub client_cpu_pct: f64,
    /// redis-server over the step, % of one core (0: no Redis used).
    #[serde(default)]
    pub redis_cpu_pct: f64,
    #[serde(default)]
    pub redis_cpu_secs: f64,
    /// Publishes the server refused during the step, by kind (nchan's HTTP
    /// status when not 201/202).
    #[serde(default)]
    pub publish_errors: std::collections::BTreeMap<String, u64>,
    /// Kept up: nothing lost, rate reached, p99 under a second.
    pub clean: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FanoutResult {
    pub target: String,
    /// Gateway processes sharing the port (1 for the other targets).
    #[serde(default = "super::one")]
    pub instances: usize,
    pub streams: u64,
    pub devices: u64,
    pub open: Opened,
    pub steps: Vec<Step>,
    /// Highest rate whose step was clean.
    pub max_clean_rate: u64,
}

/// After a step, how long deliveries may stop before the rest counts as lost...
const SETTLE_QUIET: Duration = Duration::from_secs(2);
/// ...and the longest the harness waits for stragglers at all.
const SETTLE_MAX: Duration = Duration::from_secs(15);

pub struct Plan<'a> {
    pub streams: u64,
    pub devices: u64,
    pub rates: &'a [u64],
    pub step_secs: f64,
}

pub fn run(
    target: &Target,
    publisher: &mut dyn Publish,
    run_id: &str,
    plan: &Plan,
    ramp: Ramp,
) -> Result<FanoutResult, String> {
    let all = clients(run_id, plan.streams, plan.devices, "d", StreamKind::Data);
    if let Some(redis) = target.redis {
        seed(redis, &all)?;
    }
    let label = format!("{} fanout {}", target.label(), plan.streams);
    let (mut fleet, opened) = open_all(target, &all, ramp, &label)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut bench = Bench::new(
        target,
        &mut fleet,
        publisher,
        &opened,
        plan.devices,
        label.clone(),
    )?;
    let mut steps = Vec::new();
    let mut max_clean = 0;
    for &rate in plan.rates {
        let step = bench.step(rate, plan.step_secs, None)?;
        let clean = step.clean;
        eprintln!(
            "  {label}: {rate} ev/s -> {:.0} deliveries/s ({:.1}% delivered), lost {}, dup {}, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {:.2} cpu-s/M, server {:.0}% redis {:.0}% client {:.0}% other {:.0}% of a core{}{}",
            step.deliveries_per_sec,
            step.delivered as f64 / step.expected.max(1) as f64 * 100.0,
            step.lost,
            step.dups,
            step.p50_ms,
            step.p99_ms,
            step.max_ms,
            step.cpu_secs_per_m,
            step.server_cpu_pct,
            step.redis_cpu_pct,
            step.client_cpu_pct,
            step.foreign_cpu_pct,
            if step.publish_errors.is_empty() {
                String::new()
            } else {
                format!(", publish errors {:?}", step.publish_errors)
            },
            if step.clean { "" } else { "  (not clean: stepping stops)" }
        );
        steps.push(step);
        if !clean {
            break;
        }
        max_clean = rate;
    }
    Ok(FanoutResult {
        target: target.kind.name().into(),
        instances: target.instances,
        streams: plan.streams,
        devices: plan.devices,
        open: opened,
        steps,
        max_clean_rate: max_clean,
    })
}

/// One server with its streams open and its publisher, measured a step at a
/// time: [`run`]'s rates, or `loadtest run`'s one step with live progress.
pub struct Bench<'a, 'f> {
    target: &'a Target<'a>,
    fleet: &'f mut Fleet,
    publisher: &'f mut dyn Publish,
    opened: &'a Opened,
    devices: u64,
    label: String,
    /// Losses counted before the current step (a step reports its own).
    prev_lost: u64,
    started: Instant,
}

/// Live progress is redrawn after each slice of this much publishing.
const LIVE_SLICE: f64 = 0.5;

impl<'a, 'f> Bench<'a, 'f> {
    pub fn new(
        target: &'a Target<'a>,
        fleet: &'f mut Fleet,
        publisher: &'f mut dyn Publish,
        opened: &'a Opened,
        devices: u64,
        label: String,
    ) -> Result<Self, String> {
        let prev_lost = fleet.check(&publisher.published())?.lost;
        Ok(Bench {
            label,
            target,
            fleet,
            publisher,
            opened,
            devices,
            prev_lost,
            started: Instant::now(),
        })
    }

    /// Publishes `rate` events/s for `secs`, lets the streams settle, and
    /// measures; with `live`, shows progress while it runs.
    pub fn step(
        &mut self,
        rate: u64,
        secs: f64,
        mut live: Option<&mut Progress>,
    ) -> Result<Step, String> {
        self.fleet.reset()?;
        let sampler = Sampler::start_all(&self.target.pids);
        let redis = self.target.redis_pid.map(Sampler::start);
        let errors_before = self.publisher.errors();
        let clients: Vec<Sampler> = self.fleet.pids().into_iter().map(Sampler::start).collect();
        let foreign = Foreign::start(&self.target.measured_pids());
        let published = self.publish(rate, secs, live.as_deref_mut())?;
        // Deliveries while the events were being published: what the server
        // kept pace with (nchan answers its POSTs late when it falls behind).
        let during = self.fleet.stats()?.stats.events;
        self.publisher.settle()?;
        // Let what is in flight arrive: until every stream has every event,
        // or nothing new came for SETTLE_QUIET, or SETTLE_MAX passed.
        let mut last = during;
        let mut quiet_since = Instant::now();
        let settle_start = Instant::now();
        while settle_start.elapsed() < SETTLE_MAX && quiet_since.elapsed() < SETTLE_QUIET {
            if self.fleet.check(&self.publisher.published())?.lost <= self.prev_lost {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            let t = self.fleet.stats()?;
            if let Some(p) = live.as_deref_mut() {
                self.show(p, &t, published.sent, false);
            }
            let now = t.stats.events;
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
        let (cpu, wall) = sampler.read();
        let client_cpu: f64 = clients.iter().map(|c| c.read().0).sum();
        let redis_cpu = redis.map_or(0.0, |r| r.read().0);
        let publish_errors: std::collections::BTreeMap<String, u64> = self
            .publisher
            .errors()
            .into_iter()
            .filter_map(|(k, v)| {
                let d = v.saturating_sub(errors_before.get(&k).copied().unwrap_or(0));
                (d > 0).then_some((k, d))
            })
            .collect();
        let foreign_pct = foreign.pct();
        let t = self.fleet.stats()?;
        let check = self.fleet.check(&self.publisher.published())?;
        let lost = check.lost.saturating_sub(self.prev_lost);
        self.prev_lost = check.lost;
        let subscribers = self.opened.opened as f64 / self.devices as f64;
        let expected = (published.sent as f64 * subscribers).round() as u64;
        let delivered = t.stats.events;
        let dps = during as f64 / published.secs.max(1e-9);
        let p99 = t.hist.quantile_ms(0.99);
        let clean = lost == 0
            && t.stats.dups == 0
            && t.stats.closed_by_server == 0
            && publish_errors.is_empty()
            && published.sent as f64 >= 0.9 * rate as f64 * secs
            && published.secs <= secs * 1.2
            && p99 < 1000.0;
        let step = Step {
            rate,
            sent: published.sent,
            publish_secs: published.secs,
            expected,
            delivered,
            deliveries_per_sec: dps,
            delivered_in_window: during,
            lost,
            dups: t.stats.dups,
            p50_ms: t.hist.quantile_ms(0.5),
            p99_ms: p99,
            p999_ms: t.hist.quantile_ms(0.999),
            max_ms: t.hist.max_ns() as f64 / 1e6,
            server_cpu_secs: cpu,
            cpu_secs_per_m: if delivered > 0 {
                cpu / delivered as f64 * 1e6
            } else {
                0.0
            },
            server_rss_kib: proc::rss_sum(&self.target.pids),
            closed_by_server: t.stats.closed_by_server,
            foreign_cpu_pct: foreign_pct,
            server_cpu_pct: cpu / wall.max(1e-9) * 100.0,
            client_cpu_pct: client_cpu / wall.max(1e-9) * 100.0,
            redis_cpu_pct: redis_cpu / wall.max(1e-9) * 100.0,
            redis_cpu_secs: redis_cpu,
            publish_errors,
            clean,
        };
        if let Some(p) = live {
            let t = self.fleet.stats()?;
            self.show(p, &t, step.sent, true);
            p.finish();
        }
        Ok(step)
    }

    /// The live line: what is open, sent, received, failed, and the p99.
    fn show(&self, p: &mut Progress, t: &Totals, sent: u64, force: bool) {
        let secs = self.started.elapsed().as_secs_f64();
        p.show(
            &live_line(&self.label, t, self.opened.clients, sent, secs),
            force,
        );
    }

    /// The publishing of a step: at once, or in slices with progress between.
    fn publish(
        &mut self,
        rate: u64,
        secs: f64,
        live: Option<&mut Progress>,
    ) -> Result<crate::publisher::Step, String> {
        let Some(p) = live else {
            return self.publisher.step(rate, secs);
        };
        let start = Instant::now();
        let (mut sent, mut done) = (0, 0.0);
        while done < secs - 1e-9 {
            let slice = LIVE_SLICE.min(secs - done);
            sent += self.publisher.step(rate, slice)?.sent;
            done += slice;
            let t = self.fleet.stats()?;
            self.show(p, &t, sent, false);
        }
        Ok(crate::publisher::Step {
            sent,
            secs: start.elapsed().as_secs_f64(),
        })
    }
}
