//! `loadtest rolling`: a rolling restart under load (issue 11). One
//! redis-server and N gateway processes sharing one port (SO_REUSEPORT), a
//! few thousand data streams spread over the worker processes, a steady
//! publish rate with a sequence number per device; then each instance in turn
//! gets SIGTERM (it drains: its streams get `event: system` `shutdown` with a
//! `retry:` and close) and a replacement starts on the same port, ready
//! before the next one goes. The streams reopen as EventSource does, after
//! the `retry:`, with the `Last-Event-ID` of the last event they got; the
//! process that closed them is gone, so each resumes on another one. Fails
//! unless nothing was lost, nothing duplicated, and no `replay-gap` came.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;

use crate::fleet::{Fleet, Totals};
use crate::lab::{Lab, Running};
use crate::proc;
use crate::protocol::{StreamKind, TargetKind};
use crate::publisher::{Publish, RedisPublisher};
use crate::scenario::{clients, open, open_limit, seed, wait_open, workers_for, Ramp};
use crate::services;

#[derive(Args, Debug, Clone)]
pub struct RollingOpts {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    /// Gateway processes sharing the port; each is restarted once.
    #[arg(long, default_value_t = 3)]
    pub instances: usize,
    #[arg(long, default_value_t = 3000)]
    pub streams: u64,
    /// Devices the streams are spread over.
    #[arg(long, default_value_t = 100)]
    pub devices: u64,
    /// Events/s published during the whole restart.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Seconds of publishing before the first restart and after the last.
    #[arg(long, default_value_t = 2.0)]
    pub calm_secs: f64,
    /// Streams per worker process at most.
    #[arg(long, default_value_t = 4000)]
    pub per_worker: usize,
    /// Handshakes in flight during the first ramp.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// `--replay-events` of the gateways: the window must hold what a
    /// stream misses while it waits out its `retry:` (up to 5 s).
    #[arg(long, default_value_t = 100_000)]
    pub replay_events: usize,
}

/// The publishing thread: the publisher and the events it sent.
type Publishing = JoinHandle<Result<(RedisPublisher, u64), String>>;

/// How one instance's restart went.
struct Restart {
    instance: usize,
    /// SIGTERM to the process gone.
    drain_secs: f64,
    /// Then until the replacement listened (its replay window loaded).
    start_secs: f64,
    /// SIGTERM until every stream was open again.
    all_open_secs: f64,
}

/// Exit code: 0 when every check passed.
pub fn run(opts: &RollingOpts) -> i32 {
    let started = Instant::now();
    let result = rolling(opts);
    let code = match &result {
        Ok(failures) if failures.is_empty() => 0,
        Ok(failures) => {
            for f in failures {
                eprintln!("FAIL {f}");
            }
            1
        }
        Err(e) => {
            eprintln!("FAIL setup: {e}");
            1
        }
    };
    println!(
        "rolling: {} ({:.1} s)",
        if code == 0 { "passed" } else { "failed" },
        started.elapsed().as_secs_f64()
    );
    code
}

/// Runs the restart; the failed checks (empty: all passed).
fn rolling(opts: &RollingOpts) -> Result<Vec<String>, String> {
    if !opts.gateway.exists() {
        return Err(format!(
            "{} not found: cargo build --release -p sse-gateway",
            opts.gateway.display()
        ));
    }
    let mut lab = Lab::new(opts.gateway.clone(), PathBuf::new(), 5.0, opts.devices)?;
    lab.gateway_args = [
        "--max-data-per-user",
        "16",
        "--replay-events",
        &opts.replay_events.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let instances = opts.instances.max(2);
    let mut running = lab.start(TargetKind::Gateway, instances)?;
    let target = lab.target(&running);
    let mut all = clients("roll", opts.streams, opts.devices, "d", StreamKind::Data);
    all.resume = true;
    seed(lab.redis_addr(), &all)?;
    let ramp = Ramp {
        per_worker: opts.per_worker,
        concurrency: opts.concurrency,
        attempts: 20,
        open_rate: None,
    };
    let mut fleet = Fleet::spawn(workers_for(opts.streams, ramp.per_worker))?;
    let t0 = open(&mut fleet, &target, &all, ramp)?;
    let label = format!("rolling ×{instances}");
    let opened = wait_open(
        &mut fleet,
        &label,
        opts.streams,
        t0,
        open_limit(opts.streams),
    )?;
    if opened.opened != opts.streams {
        return Err(format!(
            "{}/{} streams opened: {:?}",
            opened.opened, opts.streams, opened.errors
        ));
    }
    fleet.reset()?;

    let devices: Vec<String> = (0..opts.devices).map(|d| format!("d{d}")).collect();
    let publisher =
        RedisPublisher::connect(lab.redis_addr(), "mqtt:realtime:processed", "data", devices)?;
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publish_until(publisher, opts.rate, stop.clone())?;
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(opts.calm_secs));
    let restarts = restart_each(&lab, &mut running, &mut fleet, opts.streams);
    std::thread::sleep(Duration::from_secs_f64(opts.calm_secs));
    stop.store(true, Relaxed);
    let (publisher, sent) = publishing
        .join()
        .map_err(|_| "publisher thread panicked".to_string())??;
    let publish_secs = began.elapsed().as_secs_f64();
    let restarts = restarts?;
    settle(&mut fleet, &publisher)?;
    let totals = fleet.stats()?;
    let check = fleet.check(&publisher.published())?;

    let s = &totals.stats;
    let mut failures = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    expect(
        check.lost == 0,
        format!("{} of {} deliveries lost", check.lost, check.expected),
    );
    expect(
        check.dups == 0,
        format!("{} deliveries duplicated", check.dups),
    );
    expect(
        s.replay_gaps == 0,
        format!("{} replay-gap markers", s.replay_gaps),
    );
    expect(
        s.resumed >= s.closed_by_server && s.resumed > 0,
        format!(
            "{} streams closed by the servers, {} resumed",
            s.closed_by_server, s.resumed
        ),
    );
    expect(
        s.open_now == opts.streams,
        format!("{}/{} streams open at the end", s.open_now, opts.streams),
    );
    expect(
        sent as f64 >= 0.9 * opts.rate as f64 * publish_secs,
        format!("published {sent} events in {publish_secs:.1} s"),
    );
    let exits = running.exits();
    expect(exits.is_empty(), format!("gateways exited: {exits:?}"));
    print_summary(
        opts,
        instances,
        &restarts,
        sent,
        publish_secs,
        &check,
        &totals,
    );
    Ok(failures)
}

/// Publishes `rate` events/s in half-second steps until `stop`; hands back
/// the publisher (settled) and the events sent.
fn publish_until(
    mut publisher: RedisPublisher,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> Result<Publishing, String> {
    std::thread::Builder::new()
        .name("publish".into())
        .spawn(move || {
            let mut sent = 0;
            // Bounded: an hour at most, whatever the main thread does.
            let limit = Instant::now() + Duration::from_secs(3600);
            while !stop.load(Relaxed) && Instant::now() < limit {
                sent += publisher.step(rate, 0.5)?.sent;
            }
            publisher.settle()?;
            Ok((publisher, sent))
        })
        .map_err(|e| format!("publisher thread: {e}"))
}

/// SIGTERM to each instance in turn, a replacement on the same port, and
/// every stream open again before the next.
fn restart_each(
    lab: &Lab,
    running: &mut Running,
    fleet: &mut Fleet,
    streams: u64,
) -> Result<Vec<Restart>, String> {
    let cfg = lab.server_config();
    let mut out = Vec::new();
    for i in 0..running.services.len() {
        let (pid, addr) = (running.services[i].pid, running.services[i].addr);
        eprintln!("  restarting gateway {i} (pid {pid})");
        let t = Instant::now();
        // Drain is at most --drain-secs (5 s); SIGKILL only past 15 s.
        proc::stop(pid, Duration::from_secs(15));
        let drain_secs = t.elapsed().as_secs_f64();
        let old = &running.services[i];
        if !old.log_tail(5).contains("drained, exiting") {
            return Err(format!("gateway {i} did not drain:\n{}", old.log_tail(10)));
        }
        let name = format!("gateway-{i}-new");
        let log = lab.dir.join(format!("{name}.log"));
        let t_start = Instant::now();
        running.services[i] =
            services::gateway_at(&lab.gateway_bin, &cfg, addr.port(), &name, log)?;
        let start_secs = t_start.elapsed().as_secs_f64();
        let (status, _) = services::http_get(addr, "/health")?;
        if status != 200 {
            return Err(format!("/health answered {status} after restarting {i}"));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = fleet.stats()?.stats;
            if s.open_now == streams && s.pending == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "after restarting {i}: {}/{streams} open, {} pending, errors {:?}",
                    s.open_now, s.pending, s.errors
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let all_open_secs = t.elapsed().as_secs_f64();
        eprintln!(
            "  gateway {i}: drained in {drain_secs:.2} s, replacement listening {start_secs:.2} s later, every stream open again {all_open_secs:.2} s after SIGTERM"
        );
        out.push(Restart {
            instance: i,
            drain_secs,
            start_secs,
            all_open_secs,
        });
    }
    Ok(out)
}

/// Until every stream has every event, or nothing new came for 2 s (at most
/// 15 s).
fn settle(fleet: &mut Fleet, publisher: &RedisPublisher) -> Result<(), String> {
    let (mut last, mut quiet) = (fleet.stats()?.stats.events, Instant::now());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) && quiet.elapsed() < Duration::from_secs(2) {
        if fleet.check(&publisher.published())?.lost == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = fleet.stats()?.stats.events;
        if now != last {
            (last, quiet) = (now, Instant::now());
        }
    }
    Ok(())
}

fn print_summary(
    opts: &RollingOpts,
    instances: usize,
    restarts: &[Restart],
    sent: u64,
    secs: f64,
    check: &crate::protocol::Check,
    t: &Totals,
) {
    let s = &t.stats;
    println!(
        "{} data streams on {instances} gateway processes (one port), {} devices; {sent} events in {secs:.1} s ({:.0}/s) while each process was restarted in turn",
        opts.streams,
        opts.devices,
        sent as f64 / secs.max(1e-9)
    );
    println!("| instance | drain (SIGTERM → exit) s | replacement listening after s | every stream open again after SIGTERM s |");
    println!("|---:|---:|---:|---:|");
    for r in restarts {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.instance, r.drain_secs, r.start_secs, r.all_open_secs
        );
    }
    println!(
        "deliveries expected {}, received once {}, lost {}, duplicated {}; replay-gap markers {}; shutdown notices {}; streams closed by a server {}, resumed with Last-Event-ID {}",
        check.expected, check.unique, check.lost, check.dups, s.replay_gaps, s.shutdowns, s.closed_by_server, s.resumed
    );
    println!(
        "close → resumed stream's head: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (includes the retry: the server asks, 1-5 s); publish → client p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        t.resume.quantile_ms(0.5),
        t.resume.quantile_ms(0.99),
        t.resume.max_ns() as f64 / 1e6,
        t.hist.quantile_ms(0.5),
        t.hist.quantile_ms(0.99),
        t.hist.max_ns() as f64 / 1e6
    );
    if !s.errors.is_empty() {
        println!("handshake errors on the way (retried): {:?}", s.errors);
    }
}
