//! `loadtest smoke`: the CI check. Its own redis-server and gateway, a few
//! hundred data streams through the real flow, a few seconds of publishing,
//! and one alert broadcast; fails unless every published event reached every
//! stream that wanted it exactly once.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::lab::Lab;
use crate::protocol::TargetKind;
use crate::scenario::{broadcast, fanout, Ramp};

#[derive(Args, Debug, Clone)]
pub struct SmokeOpts {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    #[arg(long, default_value_t = 300)]
    pub streams: u64,
    /// Events/s during the publishing step.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
}

/// Exit code: 0 when every check passed.
pub fn run(opts: &SmokeOpts) -> i32 {
    let started = Instant::now();
    let mut checks: Vec<(String, Result<(), String>)> = Vec::new();
    match run_checks(opts, &mut checks) {
        Ok(()) => {}
        Err(e) => checks.push(("setup".into(), Err(e))),
    }
    let failed = checks.iter().filter(|(_, r)| r.is_err()).count();
    for (name, r) in &checks {
        match r {
            Ok(()) => eprintln!("ok   {name}"),
            Err(e) => eprintln!("FAIL {name}: {e}"),
        }
    }
    println!(
        "smoke: {} passed, {failed} failed ({:.1} s)",
        checks.len() - failed,
        started.elapsed().as_secs_f64()
    );
    i32::from(failed > 0)
}

fn run_checks(
    opts: &SmokeOpts,
    checks: &mut Vec<(String, Result<(), String>)>,
) -> Result<(), String> {
    if !opts.gateway.exists() {
        return Err(format!(
            "{} not found: cargo build --release -p sse-gateway",
            opts.gateway.display()
        ));
    }
    let lab = Lab::new(opts.gateway.clone(), PathBuf::new(), 1.0, 100)?;
    let ramp = Ramp {
        per_worker: 4000,
        concurrency: 128,
        attempts: 1,
        open_rate: None,
    };

    let mut running = lab.start(TargetKind::Gateway, 1)?;
    let target = lab.target(&running);
    let (addr, pids) = (target.addr, target.pids.clone());
    let rates = [opts.rate];
    let plan = fanout::Plan {
        streams: opts.streams,
        devices: 100,
        rates: &rates,
        step_secs: opts.secs,
    };
    let result = {
        let mut publisher = lab.publisher(&mut running)?;
        let target = crate::scenario::Target {
            kind: TargetKind::Gateway,
            addr,
            pids,
            instances: 1,
            jwt_secret: &lab.secret,
            redis: Some(lab.redis_addr()),
            redis_pid: Some(lab.redis.pid),
            route: None,
        };
        fanout::run(&target, publisher.as_mut(), "smoke", &plan, ramp)
    };
    let check = match result {
        Err(e) => Err(e),
        Ok(f) => {
            let s = f.steps.first();
            if f.open.opened != opts.streams {
                Err(format!(
                    "{}/{} streams opened: {:?}",
                    f.open.opened, opts.streams, f.open.errors
                ))
            } else if let Some(s) =
                s.filter(|s| s.lost > 0 || s.dups > 0 || s.delivered != s.expected || s.sent == 0)
            {
                Err(format!(
                    "published {} events, expected {} deliveries, got {} (lost {}, duplicated {})",
                    s.sent, s.expected, s.delivered, s.lost, s.dups
                ))
            } else if let Some(s) = s {
                eprintln!(
                    "  {} events -> {} deliveries, p50 {:.2} ms, p99 {:.2} ms",
                    s.sent, s.delivered, s.p50_ms, s.p99_ms
                );
                Ok(())
            } else {
                Err("no step ran".into())
            }
        }
    };
    checks.push((
        format!(
            "{} data streams, {} events/s for {} s: every event exactly once",
            opts.streams, opts.rate, opts.secs
        ),
        check,
    ));

    let n = (opts.streams / 2).max(1);
    let check = broadcast::run(&lab.target(&running), "smokebc", n, 1, ramp).and_then(|b| {
        if b.all_received {
            Ok(())
        } else {
            Err(format!("{:?}", b.rounds))
        }
    });
    checks.push((
        format!("{n} alert streams: one broadcast alert reaches all"),
        check,
    ));
    let exits = running.exits();
    checks.push((
        "gateway still running".into(),
        if exits.is_empty() {
            Ok(())
        } else {
            Err(exits.join("; "))
        },
    ));
    Ok(())
}
