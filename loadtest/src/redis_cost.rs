//! `loadtest redis-cost`: what one ingest event costs Redis. For each
//! instance count, a fresh set of gateway processes on a private
//! redis-server with no stream open (so no lease renewals), a steady publish
//! for a few seconds, and redis-server's utime+stime over it divided by the
//! events. Idle Redis CPU over as long a window before is subtracted, so what
//! remains is the events' own cost (PUBLISH to every subscriber, and for the
//! cluster log the leader's append and every instance's read).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::lab::Lab;
use crate::proc::Sampler;
use crate::protocol::TargetKind;
use crate::publisher::{Publish, RedisPublisher};

#[derive(Args, Debug, Clone)]
pub struct RedisCostOpts {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    /// Gateway processes, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    pub instances: Vec<usize>,
    /// Events/s published.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Seconds of publishing (and of the idle window before).
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    #[arg(long, default_value_t = 100)]
    pub devices: u64,
}

pub fn run(opts: &RedisCostOpts) -> i32 {
    match measure(opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("redis-cost: {e}");
            1
        }
    }
}

fn measure(opts: &RedisCostOpts) -> Result<(), String> {
    println!("| gateway processes | events | Redis CPU idle (s) | Redis CPU publishing (s) | Redis CPU per event (µs) | gateways' CPU per event (µs) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &n in &opts.instances {
        // A fresh Redis and gateways per count: nothing left over.
        let lab = Lab::new(opts.gateway.clone(), PathBuf::new(), 5.0, opts.devices)?;
        let running = lab.start(TargetKind::Gateway, n)?;
        let pids = running.pids();
        let redis = lab.redis.pid;
        std::thread::sleep(Duration::from_secs(1));
        let idle = Sampler::start(redis);
        std::thread::sleep(Duration::from_secs_f64(opts.secs));
        let (idle_cpu, idle_wall) = idle.read();
        let devices: Vec<String> = (0..opts.devices).map(|d| format!("d{d}")).collect();
        let mut publisher =
            RedisPublisher::connect(lab.redis_addr(), "mqtt:realtime:processed", "data", devices)?;
        let busy = Sampler::start(redis);
        let gateways = Sampler::start_all(&pids);
        let step = publisher.step(opts.rate, opts.secs)?;
        publisher.settle()?;
        // What the gateways still read from the log after the last PUBLISH.
        std::thread::sleep(Duration::from_millis(500));
        let (busy_cpu, busy_wall) = busy.read();
        let (gw_cpu, _) = gateways.read();
        let own = busy_cpu - idle_cpu * busy_wall / idle_wall.max(1e-9);
        println!(
            "| {n} | {} | {idle_cpu:.2} | {busy_cpu:.2} | {:.1} | {:.1} |",
            step.sent,
            own / step.sent.max(1) as f64 * 1e6,
            gw_cpu / step.sent.max(1) as f64 * 1e6,
        );
    }
    Ok(())
}
