//! A Redis Cluster, reached from its seeds and from the nodes it names.
//!
//! The seeds (`--redis-cluster`) are only where the gateway starts. Every
//! new command link and Pub/Sub connection asks the cluster for its nodes
//! (`CLUSTER SLOTS`: every master and replica) and remembers them; a new
//! connection tries the seeds first and the remembered nodes after. So a
//! single seed that dies (its replica taking over its slots) leaves the
//! gateway connected through the nodes it learned.
//!
//! Commands go through redis-rs's cluster connection (routing by slot,
//! following `MOVED`/`ASK`, refreshing the slot map). Pub/Sub goes through
//! one node, since a `PUBLISH` on any node reaches the subscribers of every
//! node, and moves on to the next node when that one fails.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisResult, TlsCertificates, Value};

use super::address::{at, client, connection, Node, CONNECT_TIMEOUT, IO_TIMEOUT};

pub struct Cluster {
    /// Scheme and login of every node.
    template: ConnectionInfo,
    certs: Option<TlsCertificates>,
    seeds: Vec<Node>,
    known: Mutex<Known>,
    /// Where in [`Cluster::nodes`] the subscriber tries first; moves on
    /// when that node fails.
    next_pubsub: AtomicUsize,
}

/// What the cluster said of itself.
struct Known {
    /// Nodes the cluster named that are not seeds.
    learned: Vec<Node>,
    /// A client whose start-up nodes are the seeds, then `learned`.
    client: ClusterClient,
}

impl Cluster {
    pub fn new(
        template: &ConnectionInfo,
        seeds: Vec<Node>,
        certs: Option<TlsCertificates>,
    ) -> RedisResult<Cluster> {
        let client = cluster_client(template, &certs, &seeds)?;
        Ok(Cluster {
            template: template.clone(),
            certs,
            seeds,
            known: Mutex::new(Known {
                learned: Vec::new(),
                client,
            }),
            next_pubsub: AtomicUsize::new(0),
        })
    }

    pub fn seed_count(&self) -> usize {
        self.seeds.len()
    }

    /// A fresh cluster connection for commands; what it learns of the
    /// cluster's nodes is kept.
    pub fn link(&self) -> RedisResult<ClusterConnection> {
        let client = self.lock().client.clone();
        let mut con = client.get_connection()?;
        // Learning is a bonus: a link that cannot tell its nodes still works.
        if let Ok(slots) = redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(&mut con) {
            self.learn(nodes_of(&slots));
        }
        Ok(con)
    }

    /// A connection to one node to subscribe on: the seeds and the
    /// learned nodes in turn, from the one that worked last.
    pub fn pubsub(&self) -> RedisResult<redis::Connection> {
        let nodes = self.nodes();
        let first = self.next_pubsub.load(Relaxed);
        let mut failure = None;
        for n in 0..nodes.len() {
            let at_n = (first + n) % nodes.len();
            let made = client(at(&self.template, nodes[at_n].clone()), &self.certs)
                .and_then(|c| connection(&c, IO_TIMEOUT));
            match made {
                Ok(mut con) => {
                    self.next_pubsub.store(at_n, Relaxed);
                    if let Ok(slots) = redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(&mut con) {
                        self.learn(nodes_of(&slots));
                    }
                    return Ok(con);
                }
                Err(e) => failure = Some(e),
            }
        }
        Err(failure.unwrap_or_else(|| (ErrorKind::Client, "no cluster node").into()))
    }

    /// After the subscriber lost its node: start with the next one.
    pub fn pubsub_failed(&self) {
        self.next_pubsub.fetch_add(1, Relaxed);
    }

    /// The seeds, then the nodes learned.
    pub fn nodes(&self) -> Vec<Node> {
        let mut nodes = self.seeds.clone();
        nodes.extend(self.lock().learned.iter().cloned());
        nodes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps the nodes `named` that are not seeds; a changed list makes a
    /// new client (nothing connects until a link asks).
    fn learn(&self, named: Vec<Node>) {
        let mut learned: Vec<Node> = Vec::new();
        for node in named {
            if !self.seeds.contains(&node) && !learned.contains(&node) {
                learned.push(node);
            }
        }
        if learned.is_empty() {
            return;
        }
        let mut known = self.lock();
        if known.learned == learned {
            return;
        }
        let mut all = self.seeds.clone();
        all.extend(learned.iter().cloned());
        if let Ok(client) = cluster_client(&self.template, &self.certs, &all) {
            known.client = client;
            known.learned = learned;
        }
    }
}

/// A cluster client starting from `nodes`, with the gateway's timeouts.
fn cluster_client(
    template: &ConnectionInfo,
    certs: &Option<TlsCertificates>,
    nodes: &[Node],
) -> RedisResult<ClusterClient> {
    let infos: Vec<ConnectionInfo> = nodes.iter().map(|n| at(template, n.clone())).collect();
    let mut builder = ClusterClient::builder(infos)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(IO_TIMEOUT);
    if matches!(template.addr(), ConnectionAddr::TcpTls { .. }) {
        builder = builder.tls(redis::TlsMode::Secure);
        if let Some(certs) = certs {
            builder = builder.certs(certs.clone());
        }
    }
    builder.build()
}

/// Every node a `CLUSTER SLOTS` answer names, masters and replicas, in
/// order: `[[start, end, [host, port, id, ...], [host, port, ...]...]...]`.
/// A node whose address it does not know (`?`, empty) is left out.
pub fn nodes_of(slots: &Value) -> Vec<Node> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut nodes = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            continue;
        };
        for part in parts.iter().skip(2) {
            let Value::Array(node) = part else {
                continue;
            };
            let host = match node.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let port = match node.get(1) {
                Some(Value::Int(p)) => u16::try_from(*p).ok().filter(|p| *p > 0),
                _ => None,
            };
            if let Some(port) = port.filter(|_| !host.is_empty() && host != "?") {
                if !nodes.contains(&(host.clone(), port)) {
                    nodes.push((host, port));
                }
            }
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_slots_name_masters_and_replicas_once() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7001),
                node("?", 7004),
                node("127.0.0.1", 7000),
            ]),
        ]);
        let want: Vec<Node> = [7000, 7003, 7001]
            .into_iter()
            .map(|p| ("127.0.0.1".to_owned(), p))
            .collect();
        assert_eq!(nodes_of(&slots), want);
        assert!(nodes_of(&Value::Nil).is_empty());
    }
}
