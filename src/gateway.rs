//! Startup and shutdown: builds the shared [`Gateway`] state, binds the
//! listeners, starts the reactors, the bus threads and the signal thread,
//! and waits for the drain to finish.

use std::net::IpAddr;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use log::{info, warn};
use mio::{Poll, Waker};

use crate::auth::ticket::TicketKey;
use crate::auth::token::TokenKey;
use crate::auth::UserId;
use crate::bus::lease::{self, Leases};
use crate::bus::memory::Memory;
use crate::bus::redis::RedisPool;
use crate::bus::store::Job;
use crate::bus::store::Store;
use crate::bus::{demo, Hub, RedisState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reactor::mailbox::{self, Mailbox, Mailboxes};
use crate::reactor::peers::PeerCounts;
use crate::reactor::{listener, Reactor, WAKER};
use crate::stream::frame::Purpose;
use crate::stream::registry::{Limits, Registry, StreamId};
use crate::stream::replay::ReplayWindow;
use crate::time::epoch_ms;

impl Gateway {
    /// A stream ended (or never started after taking its slot): free its
    /// limit slot here and its lease in Redis.
    pub fn stream_closed(&self, user: &UserId, ip: IpAddr, purpose: Purpose, stream_id: StreamId) {
        self.registry.close(user, ip, stream_id);
        self.release_lease(user, purpose, stream_id);
    }

    /// Gives back a stream's cluster-wide lease (Redis mode).
    pub fn release_lease(&self, user: &UserId, purpose: Purpose, stream_id: StreamId) {
        if let Some(leases) = &self.leases {
            self.store.fire(Job::ReleaseLease {
                key: lease::key(&user.key, purpose),
                member: leases.member(stream_id),
            });
        }
    }
}

/// What every reactor shares.
pub struct Gateway {
    pub config: Config,
    pub tokens: TokenKey,
    pub tickets: TicketKey,
    pub hub: Arc<Hub>,
    pub store: Store,
    pub registry: Arc<Registry>,
    /// Redis mode: cluster-wide per-user limits.
    pub leases: Option<Arc<Leases>>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// `--demo`: an access token for user `demo`, served at `/demo/token`.
    pub demo_token: Option<String>,
    /// Connections per client IP that are not streams.
    pub peers: PeerCounts,
}

#[derive(Debug)]
pub enum Fatal {
    /// Bad configuration: exit 2.
    Config(String),
    /// Could not start (bind failed and the like): exit 1.
    Io(String),
}

pub fn run(config: Config) -> Result<(), Fatal> {
    if config.demo && config.redis_url.is_some() {
        return Err(Fatal::Config(
            "--demo runs embedded: leave --redis-url (REDIS_URL) unset".into(),
        ));
    }
    let credentials = crate::auth::credentials::load(&config).map_err(Fatal::Config)?;
    let redis_client = match &config.redis_url {
        Some(url) => Some(
            redis::Client::open(url.as_str())
                .map_err(|e| Fatal::Config(format!("--redis-url (REDIS_URL): {e}")))?,
        ),
        None => None,
    };

    let workers = config.workers();
    let listeners = listener::bind_all(config.listen, workers)
        .map_err(|e| Fatal::Io(format!("--listen {}: {e}", config.listen)))?;
    let local = listeners[0]
        .local_addr()
        .map_err(|e| Fatal::Io(e.to_string()))?;

    let mut polls = Vec::with_capacity(workers);
    let mut mailboxes = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let poll = Poll::new().map_err(|e| Fatal::Io(e.to_string()))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Fatal::Io(e.to_string()))?;
        let (mailbox, rx) = Mailbox::new(waker, mailbox::FRAME_BOUND);
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
        epoch_ms(),
        seq_base,
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
    let hub = Arc::new(hub);
    if let Some(conflator) = conflator {
        let hub = hub.clone();
        thread::Builder::new()
            .name("rate-limit".into())
            .spawn(move || hub.run_conflator(&conflator))
            .map_err(|e| Fatal::Io(e.to_string()))?;
    }
    if initial == RedisState::Embedded {
        metrics
            .redis_up
            .store(1, std::sync::atomic::Ordering::Relaxed);
    }
    let store = match &redis_client {
        Some(client) => Store::Redis(RedisPool::start(client.clone(), mailboxes.clone())),
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
    let leases = redis_client.as_ref().map(|client| {
        let leases = Arc::new(Leases::new(config.heartbeat_secs));
        (leases, client.clone())
    });
    if let Some((leases, client)) = &leases {
        leases
            .start_renewing(client.clone(), registry.clone())
            .map_err(|e| Fatal::Io(e.to_string()))?;
    }
    let leases = leases.map(|(l, _)| l);
    let gw = Arc::new(Gateway {
        tickets: credentials.tickets,
        tokens: credentials.tokens,
        registry: registry.clone(),
        leases: leases.clone(),
        hub: hub.clone(),
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
        let reactor = Reactor::new(index, gw.clone(), poll, listener, inbox)
            .map_err(|e| Fatal::Io(e.to_string()))?;
        let handle = thread::Builder::new()
            .name(format!("reactor-{index}"))
            .spawn(move || reactor.run())
            .map_err(|e| Fatal::Io(e.to_string()))?;
        reactors.push(handle);
    }
    if let Some(client) = redis_client {
        crate::bus::redis::subscribe(client, hub.clone()).map_err(|e| Fatal::Io(e.to_string()))?;
    }
    if gw.config.demo {
        demo::start(hub.clone()).map_err(|e| Fatal::Io(e.to_string()))?;
    }
    watch_signals(hub.clone())?;

    let mode = if gw.config.demo {
        "demo"
    } else if gw.config.redis_url.is_some() {
        "redis"
    } else {
        "embedded"
    };
    info!("listening on http://{local} ({mode} mode, {workers} reactors)");
    if let Some(token) = &gw.demo_token {
        print_demo_help(local, token);
    }

    for handle in reactors {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("reactor stopped: {e}"),
            Err(_) => warn!("reactor panicked"),
        }
    }
    if let Store::Redis(pool) = &gw.store {
        pool.finish(std::time::Duration::from_secs(2));
    }
    info!("drained, exiting");
    Ok(())
}

/// SIGTERM and SIGINT start the drain; a second one exits at once.
fn watch_signals(hub: Arc<Hub>) -> Result<(), Fatal> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| Fatal::Io(e.to_string()))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
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

fn print_demo_help(addr: std::net::SocketAddr, token: &str) {
    let base = format!("http://{addr}");
    eprintln!(
        "\n  Demo dashboard:  {base}/\n\n  Watch a live stream from a shell:\n\n    TOKEN={token}\n    T=$(curl -s -X POST -H \"Authorization: Bearer $TOKEN\" {base}/sse/stream-ticket | sed 's/.*\"ticket\":\"\\([^\"]*\\)\".*/\\1/'); curl -N \"{base}/sse/stream?deviceIds=Machine%201,Machine%202&ticket=$T\"\n"
    );
}
