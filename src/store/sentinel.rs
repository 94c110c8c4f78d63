//! A master found through Sentinels, and followed.
//!
//! A watcher thread asks the Sentinels twice a second which node is the
//! master (`SENTINEL MASTER <name>`). When they disagree the answer with the
//! highest config epoch wins: a Sentinel that has not heard of a failover
//! yet names the old master under an older epoch. When the master changes,
//! the term goes up: every connection made under an older term is stale
//! ([`Tenure::over`]); a command link then fails its next command and is
//! replaced by one to the new master, and the Pub/Sub subscriber leaves the
//! old master at its next wake-up (at most a second).
//!
//! Asking the Sentinels, not `ROLE` on the master, is what catches a
//! graceful `SENTINEL FAILOVER`: the replica is promoted at once, but the old
//! master stays a master (and takes writes that are lost later) until the
//! Sentinels reconfigure it, some ten seconds after. `ROLE` is still checked
//! on every new connection: a Sentinel may name a master that is not one yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once, Weak};
use std::thread;
use std::time::Duration;

use log::{info, warn};
use redis::{
    ConnectionInfo, ErrorKind, RedisConnectionInfo, RedisResult, ServerErrorKind, TlsCertificates,
    Value,
};

use super::address::{at, client, connection, Node};

/// How often the watcher asks the Sentinels where the master is.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Longest wait for a Sentinel's answer: a Sentinel host that vanished
/// costs the watcher this, not a round of asking.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(1000);

/// The master of `name` as the Sentinels see it.
pub struct Sentinels {
    shared: Arc<Shared>,
    /// Starts the watcher with the first connection (a deployment that is
    /// never used, as in a config check, starts no thread).
    watcher: Once,
}

struct Shared {
    name: String,
    /// One client per Sentinel, in the order given.
    sentinels: Vec<redis::Client>,
    /// Scheme, login and db of the master; its address comes from the
    /// Sentinels.
    template: ConnectionInfo,
    certs: Option<TlsCertificates>,
    /// The master the Sentinels named last (None before the first answer).
    master: Mutex<Option<Node>>,
    /// Goes up each time the named master changes.
    term: Arc<AtomicU64>,
}

/// Whether a connection's master is still the one the Sentinels name.
/// Always current outside Sentinel mode.
#[derive(Clone, Default)]
pub struct Tenure(Option<(Arc<AtomicU64>, u64)>);

impl Tenure {
    /// The Sentinels have named another master since the connection was made.
    pub fn over(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|(term, made)| term.load(SeqCst) != *made)
    }
}

impl Sentinels {
    pub fn new(
        template: &ConnectionInfo,
        nodes: Vec<Node>,
        name: &str,
        certs: Option<TlsCertificates>,
    ) -> RedisResult<Sentinels> {
        // The URL's login and db are the master's; Sentinels get none.
        let bare = template
            .clone()
            .set_redis_settings(RedisConnectionInfo::default());
        let sentinels = nodes
            .into_iter()
            .map(|node| client(at(&bare, node), &certs))
            .collect::<RedisResult<Vec<_>>>()?;
        Ok(Sentinels {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                sentinels,
                template: template.clone(),
                certs,
                master: Mutex::new(None),
                term: Arc::new(AtomicU64::new(0)),
            }),
            watcher: Once::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A fresh connection to the master the Sentinels name now, with
    /// `io` on every read and write, and its tenure.
    pub fn master(&self, io: Duration) -> RedisResult<(redis::Connection, Tenure)> {
        self.watcher.call_once(|| {
            let shared = Arc::downgrade(&self.shared);
            let started = thread::Builder::new()
                .name("sentinel-watch".into())
                .spawn(move || watch(&shared));
            if let Err(e) = started {
                warn!("cannot start the sentinel watcher ({e}): failovers are followed only when the master's connections die");
            }
        });
        let shared = &self.shared;
        // The term first: a change after this makes the link stale at once.
        let term = shared.term.load(SeqCst);
        let known = shared.current();
        let node = match known {
            Some(node) => node,
            None => {
                let mut fresh: Vec<Option<redis::Connection>> =
                    shared.sentinels.iter().map(|_| None).collect();
                let node = shared.ask(&mut fresh)?;
                shared.learn(&node);
                node
            }
        };
        let mut con = connection(&client(at(&shared.template, node), &shared.certs)?, io)?;
        let role: Vec<Value> = redis::cmd("ROLE").query(&mut con)?;
        if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
            return Err((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "the node the Sentinels name is not a master (yet)",
            )
                .into());
        }
        Ok((con, Tenure(Some((shared.term.clone(), term)))))
    }
}

impl Shared {
    fn current(&self) -> Option<Node> {
        self.master
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Takes `node` as the master; a change ends every tenure.
    fn learn(&self, node: &Node) {
        let mut master = self
            .master
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if master.as_ref() == Some(node) {
            return;
        }
        if let Some((host, port)) = master.replace(node.clone()) {
            info!(
                "redis master {:?} moved from {host}:{port} to {}:{} (Sentinel failover): reconnecting",
                self.name, node.0, node.1
            );
            self.term.fetch_add(1, SeqCst);
        }
    }

    /// Asks every Sentinel (on the connections in `cache`, made when
    /// missing and dropped when they fail): the master of the highest
    /// config epoch.
    fn ask(&self, cache: &mut [Option<redis::Connection>]) -> RedisResult<Node> {
        let mut best: Option<(i64, Node)> = None;
        let mut failure = None;
        for (sentinel, con) in self.sentinels.iter().zip(cache.iter_mut()) {
            match self.ask_one(sentinel, con) {
                Ok((epoch, node)) => {
                    if best.as_ref().is_none_or(|(e, _)| epoch > *e) {
                        best = Some((epoch, node));
                    }
                }
                Err(e) => {
                    *con = None;
                    failure = Some(e);
                }
            }
        }
        best.map(|(_, node)| node).ok_or_else(|| {
            failure.unwrap_or_else(|| (ErrorKind::Client, "no sentinel names the master").into())
        })
    }

    fn ask_one(
        &self,
        sentinel: &redis::Client,
        con: &mut Option<redis::Connection>,
    ) -> RedisResult<(i64, Node)> {
        let con = match con {
            Some(con) => con,
            None => con.insert(connection(sentinel, SENTINEL_TIMEOUT)?),
        };
        let fields: HashMap<String, String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.name)
            .query(con)?;
        let port = fields.get("port").and_then(|p| p.parse::<u16>().ok());
        match (fields.get("ip"), port) {
            (Some(ip), Some(port)) if !ip.is_empty() => {
                let epoch = fields
                    .get("config-epoch")
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                Ok((epoch, (ip.clone(), port)))
            }
            _ => Err((ErrorKind::Parse, "a SENTINEL MASTER answer without ip:port").into()),
        }
    }
}

/// The watcher: asks the Sentinels every [`WATCH_EVERY`] until the
/// deployment is gone.
fn watch(shared: &Weak<Shared>) {
    let mut cache: Vec<Option<redis::Connection>> = Vec::new();
    loop {
        thread::sleep(WATCH_EVERY);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        cache.resize_with(shared.sentinels.len(), || None);
        // No answer keeps the last one: links to it fail on their own if
        // it is gone.
        if let Ok(node) = shared.ask(&mut cache) {
            shared.learn(&node);
        }
    }
}
