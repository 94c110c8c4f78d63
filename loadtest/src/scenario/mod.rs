//! What every scenario shares: the target under test, seeding ownership sets,
//! spreading clients over worker processes, and opening them with a progress
//! line while the ramp runs.
//!
//! - [`idle`]: many quiet streams: open time, RSS and CPU per stream.
//! - [`fanout`]: a publish rate that steps up: throughput, loss, latency, CPU.
//! - [`broadcast`]: one alert to every alert stream at once.
//! - [`storm`]: everyone connects at once, drops, and reconnects at once.

pub mod broadcast;
pub mod fanout;
pub mod idle;
pub mod storm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::now_ns;
use crate::fleet::Fleet;
use crate::progress::Progress;
use crate::protocol::{Clients, Command, Route, StreamKind, TargetKind};
use crate::resp::{Redis, RedisAt, Value};

/// The server under test.
pub struct Target<'a> {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    /// Every process of the server: CPU and memory are summed over them.
    pub pids: Vec<u32>,
    /// Gateway processes sharing the port (1 for every other kind).
    pub instances: usize,
    pub jwt_secret: &'a str,
    /// None for the floor and nchan, which need no Redis.
    pub redis: Option<SocketAddr>,
    /// The redis-server, whose CPU is reported next to the server's.
    pub redis_pid: Option<u32>,
    /// The requests of a [`TargetKind::Url`] server (None: the contract's).
    pub route: Option<Route>,
}

impl Target<'_> {
    /// The name in tables: `gateway`, or `gateway ×N` for N instances.
    pub fn label(&self) -> String {
        label(self.kind.name(), self.instances)
    }

    /// The processes with columns of their own (the server's, Redis's):
    /// a server started by hand is not a descendant of this run, and
    /// would otherwise be counted again as foreign CPU.
    pub fn measured_pids(&self) -> Vec<u32> {
        self.pids.iter().copied().chain(self.redis_pid).collect()
    }
}

pub fn label(target: &str, instances: usize) -> String {
    if instances > 1 {
        format!("{target} ×{instances}")
    } else {
        target.to_owned()
    }
}

/// For `#[serde(default)]` of instance counts in older results.
pub fn one() -> usize {
    1
}

/// How clients are spread and opened.
#[derive(Clone, Copy, Debug)]
pub struct Ramp {
    /// Streams per worker process at most.
    pub per_worker: usize,
    /// Handshakes in flight over all workers.
    pub concurrency: usize,
    /// Tries per client.
    pub attempts: u32,
    /// Opens started per second over all workers (None: as fast as
    /// `concurrency` allows).
    pub open_rate: Option<f64>,
}

/// How an opening went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Opened {
    pub clients: u64,
    pub opened: u64,
    pub failed: u64,
    /// From the command to the last successful open.
    pub secs: f64,
    pub errors: BTreeMap<String, u64>,
}

pub fn workers_for(n: u64, per_worker: usize) -> usize {
    (n as usize).div_ceil(per_worker.max(1)).max(2)
}

/// `SADD user:<u>:devices <device>` for every client, pipelined.
pub fn seed(redis: impl Into<RedisAt>, clients: &Clients) -> Result<(), String> {
    let mut r = Redis::connect(redis)?;
    let ids: Vec<u64> = (clients.first..clients.first + clients.count).collect();
    for batch in ids.chunks(2000) {
        let cmds: Vec<Vec<Vec<u8>>> = batch
            .iter()
            .map(|&i| {
                vec![
                    b"SADD".to_vec(),
                    format!("user:{}:devices", clients.user(i)).into_bytes(),
                    clients.device(i).into_bytes(),
                ]
            })
            .collect();
        for v in r.pipeline(&cmds)? {
            if let Value::Error(e) = v {
                return Err(format!("SADD: {e}"));
            }
        }
    }
    Ok(())
}

/// Clients of one scenario run: user ids unique to the run so per-user limits
/// never bind across runs.
pub fn clients(
    run: &str,
    count: u64,
    devices: u64,
    device_prefix: &str,
    kind: StreamKind,
) -> Clients {
    Clients {
        first: 0,
        count,
        user_prefix: format!("lt-{run}-"),
        device_prefix: device_prefix.to_owned(),
        devices,
        kind,
        resume: false,
    }
}

/// Splits `all` over the fleet and sends each worker its share.
pub fn open(fleet: &mut Fleet, target: &Target, all: &Clients, ramp: Ramp) -> Result<u64, String> {
    let n = fleet.len() as u64;
    let per = all.count.div_ceil(n);
    let concurrency = ramp.concurrency.div_ceil(n as usize).max(1);
    let t0 = now_ns();
    fleet.each(Duration::from_secs(30), |i| {
        let first = all.first + i as u64 * per;
        let count = per.min((all.first + all.count).saturating_sub(first));
        Command::Open {
            target: target.kind,
            addr: target.addr.to_string(),
            jwt_secret: target.jwt_secret.to_owned(),
            clients: Clients {
                first,
                count,
                ..all.clone()
            },
            concurrency,
            attempts: ramp.attempts,
            route: target.route.clone().map(Box::new),
            // Each worker's share of the rate, as of the clients.
            open_rate: ramp
                .open_rate
                .map(|r| r * count as f64 / all.count.max(1) as f64),
        }
    })?;
    Ok(t0)
}

/// Starts the workers for `all`, opens every client and waits until each
/// is open or has given up; fails when none opened.
pub fn open_all(
    target: &Target,
    all: &Clients,
    ramp: Ramp,
    label: &str,
) -> Result<(Fleet, Opened), String> {
    let mut fleet = Fleet::spawn(workers_for(all.count, ramp.per_worker))?;
    let t0 = open(&mut fleet, target, all, ramp)?;
    let opened = wait_open(&mut fleet, label, all.count, t0, open_limit(all.count))?;
    if opened.opened == 0 {
        return Err(format!("{label}: no stream opened: {:?}", opened.errors));
    }
    Ok((fleet, opened))
}

/// Waits until every client is open or has given up (bounded by `limit`),
/// showing its progress (see [`Progress`]).
pub fn wait_open(
    fleet: &mut Fleet,
    label: &str,
    total: u64,
    t0_ns: u64,
    limit: Duration,
) -> Result<Opened, String> {
    let start = Instant::now();
    let mut progress = Progress::stderr();
    loop {
        let t = fleet.stats()?;
        let s = &t.stats;
        let done = s.pending == 0 && s.open_now + s.failed >= total;
        let over = done || start.elapsed() > limit;
        let errors: u64 = s.errors.values().sum();
        let line = format!(
            "  {label}: {}/{total} open, {} failed, {errors} errors, {:.1}s",
            s.open_now,
            s.failed,
            start.elapsed().as_secs_f64()
        );
        progress.show(&line, over);
        if over {
            return Ok(Opened {
                clients: total,
                opened: s.open_now,
                failed: s.failed + total.saturating_sub(s.open_now + s.failed),
                secs: s.last_open_ns.saturating_sub(t0_ns) as f64 / 1e9,
                errors: s.errors.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long an opening of `n` clients may take before it is given up.
pub fn open_limit(n: u64) -> Duration {
    Duration::from_secs(60 + n / 100)
}
