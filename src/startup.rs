//! Start-up and shutdown, the top of the crate: builds the shared
//! [`Gateway`] context and one reactor per worker ([`assemble`]), then starts
//! the reactors, the ingress threads and the signal thread, and waits for
//! the drain to finish ([`run`]). Assembling without starting is what the
//! in-process tests of the reactor use.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use log::{info, warn};
use mio::{Poll, Waker};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

use crate::config::Config;
use crate::context::Gateway;
use crate::ingress::clusterlog::cursor::{Cursor, Delivered};
use crate::ingress::clusterlog::{self, Inlet, Outlet};
use crate::ingress::conflate::Conflator;
use crate::ingress::{demo, Hub, RedisState};
use crate::metrics::Metrics;
use crate::reactor::mailbox::{Inbox, Mailbox, Mailboxes};
use crate::reactor::peers::PeerCounts;
use crate::reactor::{listener, Reactor, WAKER};
use crate::store::connect::Deployment;
use crate::store::lease::Leases;
use crate::store::memory::Memory;
use crate::store::redis::RedisPool;
use crate::store::{Completions, Store};
use crate::stream::registry::{Limits, Registry};
use crate::stream::replay::ReplayWindow;

#[derive(Debug)]
pub enum Fatal {
    /// Bad configuration: exit 2.
    Config(String),
    /// Could not start (bind failed and the like): exit 1.
    Io(String),
}

/// Everything built, nothing started.
pub struct Assembly {
    pub gw: Arc<Gateway>,
    /// One per worker, each with its listener bound.
    pub reactors: Vec<Reactor>,
    /// Where the listeners are bound (the real port when `--listen` said 0).
    pub local: SocketAddr,
    redis: Option<Arc<Deployment>>,
    conflator: Option<Arc<Conflator>>,
    log_threads: Option<LogThreads>,
}

/// Redis mode: what the cluster log's threads start with.
struct LogThreads {
    heard: Inlet,
    inputs: Outlet,
    /// Where reading goes on after the preload (None: Redis was not there).
    cursor: Option<Cursor>,
    /// What the reader read last, which the writer goes by when the log
    /// lost entries.
    delivered: Arc<Delivered>,
}

/// Checks the configuration, binds the listeners and builds the shared
/// context and the reactors. No thread is started, except the Redis store's
/// workers and lease renewer (Redis mode).
pub fn assemble(config: Config) -> Result<Assembly, Fatal> {
    let redis_client = Deployment::from_config(&config)
        .map_err(Fatal::Config)?
        .map(Arc::new);
    let io = |e: std::io::Error| Fatal::Io(e.to_string());
    // Bound before anything is logged: an address that cannot be served
    // (in use, not this machine's) is bad configuration, one line, exit 2.
    let workers = config.workers();
    let listeners = listener::bind_all(config.listen, workers)
        .map_err(|e| Fatal::Config(format!("--listen {}: {e}", config.listen)))?;
    let local = listeners[0].local_addr().map_err(io)?;
    let credentials = crate::auth::credentials::load(&config).map_err(Fatal::Config)?;

    let mut polls = Vec::with_capacity(workers);
    let mut mailboxes = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let poll = Poll::new().map_err(io)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(io)?;
        let (mailbox, rx) = Mailbox::new(waker, config.mailbox_frames as usize);
        polls.push(poll);
        mailboxes.push(mailbox);
        inboxes.push(rx);
    }
    let mailboxes: Mailboxes = mailboxes.into();

    let metrics = Arc::new(Metrics::default());
    // Sequence numbers start at a random base, so an id issued by another
    // instance (or an earlier run) never lands inside this one's sequence:
    // resuming from it is a replay-gap, never a silent loss.
    let seq_base = rand::Rng::random_range(&mut rand::rng(), 1u64 << 32..1u64 << 44);
    let replay = ReplayWindow::new(
        config.replay_events,
        config.replay_secs.as_millis() as u64,
        seq_base,
        redis_client.is_some(),
    );
    let initial = if redis_client.is_some() {
        RedisState::Down
    } else {
        RedisState::Embedded
    };
    let mut hub = Hub::new(mailboxes.clone(), replay, initial, metrics.clone());
    hub.limit_event_bytes(config.max_event_bytes as usize);
    let conflator = (config.max_rate_per_device > 0.0)
        .then(|| Hub::limit_rate(&mut hub, config.max_rate_per_device));
    let channels = redis_client.as_ref().map(|_| {
        let (heard, inputs) = clusterlog::queue();
        hub.write_through(heard.clone());
        (heard, inputs)
    });
    let hub = Arc::new(hub);
    // Before any reactor exists: the window holds the log's recent entries,
    // and the reactors start routing after them.
    let log_threads = match (channels, &redis_client) {
        (Some((heard, inputs)), Some(redis)) => {
            let delivered = Arc::new(Delivered::default());
            Some(LogThreads {
                heard,
                inputs,
                cursor: clusterlog::reader::preload(redis, &hub, config.replay_events, &delivered),
                delivered,
            })
        }
        _ => None,
    };
    if initial == RedisState::Embedded {
        metrics
            .redis_up
            .store(1, std::sync::atomic::Ordering::Relaxed);
    }
    let store = match &redis_client {
        Some(redis) => Store::Redis(RedisPool::start(redis.clone(), completions(&mailboxes))),
        None => Store::Memory(Memory::default()),
    };
    if let (true, Some(memory)) = (config.demo, store.memory()) {
        demo::seed(memory);
    }
    let limits = Limits {
        alerts: config.max_alerts_per_user,
        data: config.max_data_per_user,
        per_ip: config.max_conns_per_ip,
    };
    let registry = Arc::new(Registry::new(limits, metrics.clone()));
    let leases = match &redis_client {
        Some(client) => {
            let leases = Arc::new(Leases::new(config.heartbeat_secs));
            leases
                .start_renewing(client.clone(), registry.clone())
                .map_err(io)?;
            Some(leases)
        }
        None => None,
    };
    let gw = Arc::new(Gateway {
        tickets: credentials.tickets,
        tokens: credentials.tokens,
        registry,
        leases,
        hub,
        store,
        metrics,
        started: Instant::now(),
        demo_token: credentials.demo_token,
        peers: PeerCounts::default(),
        config,
    });
    let mut reactors = Vec::with_capacity(workers);
    for (index, ((poll, listener), inbox)) in
        polls.into_iter().zip(listeners).zip(inboxes).enumerate()
    {
        reactors.push(Reactor::new(index, gw.clone(), poll, listener, inbox).map_err(io)?);
    }
    Ok(Assembly {
        gw,
        reactors,
        local,
        redis: redis_client,
        conflator,
        log_threads,
    })
}

/// The store's completions, posted to the asking reactor's mailbox.
fn completions(mailboxes: &Mailboxes) -> Completions {
    let mailboxes = mailboxes.clone();
    Arc::new(move |reply, outcome| {
        if let Some(mailbox) = mailboxes.get(reply.reactor) {
            mailbox.send(Inbox::Outcome {
                conn: reply.conn,
                serial: reply.serial,
                outcome,
            });
        }
    })
}

/// Runs the gateway until SIGTERM or SIGINT has drained every stream.
pub fn run(config: Config) -> Result<(), Fatal> {
    // Before any thread starts, so every thread inherits it (main blocks
    // them before the logger's thread too).
    block_drain_signals().map_err(|e| Fatal::Io(e.to_string()))?;
    let Assembly {
        gw,
        reactors,
        local,
        redis,
        conflator,
        log_threads,
    } = assemble(config)?;
    let io = |e: std::io::Error| Fatal::Io(e.to_string());
    let workers = reactors.len();
    let mut threads = Vec::with_capacity(workers);
    for (index, reactor) in reactors.into_iter().enumerate() {
        let handle = thread::Builder::new()
            .name(format!("reactor-{index}"))
            .spawn(move || reactor.run())
            .map_err(io)?;
        threads.push(handle);
    }
    if let Some(conflator) = conflator {
        let hub = gw.hub.clone();
        thread::Builder::new()
            .name("rate-limit".into())
            .spawn(move || hub.run_conflator(&conflator))
            .map_err(io)?;
    }
    if let (Some(redis), Some(log_threads)) = (redis, log_threads) {
        let bounds =
            clusterlog::log_bounds(gw.config.replay_events, gw.config.replay_secs.as_secs());
        let delivered = log_threads.delivered;
        clusterlog::writer::start(
            redis.clone(),
            gw.hub.clone(),
            log_threads.inputs,
            bounds,
            delivered.clone(),
        )
        .map_err(io)?;
        clusterlog::reader::start(redis.clone(), gw.hub.clone(), log_threads.cursor, delivered)
            .map_err(io)?;
        crate::ingress::subscriber::subscribe(redis, gw.hub.clone(), log_threads.heard)
            .map_err(io)?;
    }
    if gw.config.demo {
        demo::start(gw.hub.clone()).map_err(io)?;
    }
    watch_signals(gw.hub.clone())?;
    let metrics = gw.metrics.clone();
    crate::heap::start_trimming(move || metrics.connections_accepted.load(Relaxed)).map_err(io)?;

    let mode = if gw.config.demo {
        "demo"
    } else if matches!(gw.store, Store::Redis(_)) {
        "redis"
    } else {
        "embedded"
    };
    info!("listening on http://{local} ({mode} mode, {workers} reactors)");
    if let Some(token) = &gw.demo_token {
        print_demo_help(local, token);
    }

    for handle in threads {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("reactor stopped: {e}"),
            Err(_) => warn!("reactor panicked"),
        }
    }
    if let Store::Redis(pool) = &gw.store {
        gw.hub.wait_resigned(std::time::Duration::from_millis(500));
        pool.finish(std::time::Duration::from_secs(2));
    }
    if let Some(leases) = &gw.leases {
        leases.leave();
    }
    info!("drained, exiting");
    Ok(())
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it
/// starts from now on; [`run`]'s signal thread alone takes them.
pub fn block_drain_signals() -> nix::Result<()> {
    drain_signals(SigmaskHow::SIG_BLOCK)
}

/// Blocks or unblocks SIGTERM and SIGINT in the calling thread. They are
/// blocked in every thread but the one that waits for them: a signal handled
/// on a thread in a blocking Redis read that has a timeout fails that read
/// with EINTR, and the Pub/Sub or log connection it was on is dropped and
/// made again, at the very moment a drain starts.
fn drain_signals(how: SigmaskHow) -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    pthread_sigmask(how, Some(&set), None)
}

/// SIGTERM and SIGINT start the drain; a second one exits at once.
fn watch_signals(hub: Arc<Hub>) -> Result<(), Fatal> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| Fatal::Io(e.to_string()))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = drain_signals(SigmaskHow::SIG_UNBLOCK) {
                warn!("signals stay blocked ({e}): SIGTERM cannot drain");
            }
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    info!("signal {signal}: draining");
                    hub.drain();
                } else {
                    warn!("second signal: exiting now");
                    std::process::exit(1);
                }
            }
        })
        .map_err(|e| Fatal::Io(e.to_string()))?;
    Ok(())
}

/// The demo's how-to, for the person at the terminal: on stdout, so stderr
/// stays one log line per event (contract §1, §7.6), in either log format.
fn print_demo_help(addr: std::net::SocketAddr, token: &str) {
    let base = format!("http://{addr}");
    println!(
        "\n  Demo dashboard:  {base}/\n\n  Watch a live stream from a shell:\n\n    TOKEN={token}\n    T=$(curl -s -X POST -H \"Authorization: Bearer $TOKEN\" {base}/sse/stream-ticket | sed 's/.*\"ticket\":\"\\([^\"]*\\)\".*/\\1/'); curl -N \"{base}/sse/stream?deviceIds=Machine%201,Machine%202&ticket=$T\"\n"
    );
}
