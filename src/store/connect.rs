//! How the gateway reaches Redis, in one place: the [`Deployment`] (one
//! server, plain or TLS; a master found through Sentinels; a Redis Cluster)
//! built once from the flags at start, and what it hands out: a [`Link`] for
//! commands and a Pub/Sub connection for the subscriber, both with timeouts.
//! The store's workers, the lease renewer and the subscriber take a
//! deployment and never build a `redis::Client` of their own, so a new kind
//! of deployment is added here and nowhere else.
//!
//! - One server: `REDIS_URL`, `rediss://` for TLS (`--redis-ca-file`, else
//!   the system roots; `--redis-cert-file`/`--redis-key-file` for mutual TLS),
//!   ACL user and password in the URL.
//! - Sentinel ([`sentinel`]): connections go to the master the Sentinels
//!   name, and a link whose master they no longer name fails its next
//!   command, so every link follows a failover within a second or two.
//! - Cluster ([`cluster`]): commands go through redis-rs's cluster
//!   connection; Pub/Sub through one node. The seeds are where it starts;
//!   the nodes the cluster names are remembered and tried too.
//!
//! In Sentinel and Cluster modes `REDIS_URL` is optional: its scheme, user,
//! password and db apply to every node; its host and port are not used.

use redis::cluster::ClusterConnection;
use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionLike, ErrorKind, IntoConnectionInfo, RedisResult,
    ServerErrorKind, TlsCertificates, Value,
};

use super::address::{addresses, client, connection, IO_TIMEOUT};
use super::cluster::Cluster;
use super::sentinel::{Sentinels, Tenure};
use crate::config::Config;

/// Where Redis is and how to talk to it.
pub enum Deployment {
    /// One server, plain or TLS. Boxed, as the cluster is: the enum stays
    /// the size of a Sentinel handle.
    Single(Box<redis::Client>),
    /// A master named by Sentinels.
    Sentinel(Sentinels),
    /// A Redis Cluster.
    Cluster(Box<Cluster>),
}

/// A blocking connection for commands.
pub struct Link {
    kind: Kind,
    /// A batch failed the way a dead connection fails: the caller makes a
    /// fresh link even when it took the failure as an answer (a lookup's
    /// second stage, which must not run twice).
    spoiled: bool,
}

enum Kind {
    Node(NodeLink),
    /// Boxed: a cluster connection is several times a node connection's size.
    Cluster(Box<ClusterConnection>),
}

impl Deployment {
    /// The deployment the flags describe: None in embedded mode, or the one
    /// line (naming the flag) that makes the gateway exit 2.
    pub fn from_config(config: &Config) -> Result<Option<Deployment>, String> {
        check_combinations(config)?;
        let sentinels = !config.redis_sentinels.is_empty();
        let cluster = !config.redis_cluster.is_empty();
        let Some(url) = config
            .redis_url
            .clone()
            .or_else(|| (sentinels || cluster).then(|| "redis://127.0.0.1/".to_owned()))
        else {
            return Ok(None);
        };
        let template = url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("--redis-url (REDIS_URL): {e}"))?;
        let tls = matches!(template.addr(), ConnectionAddr::TcpTls { .. });
        let certs = certificates(config, tls)?;
        if sentinels {
            let master_name = config.redis_master_name.clone().unwrap_or_default();
            let nodes = addresses(
                "--redis-sentinels (REDIS_SENTINELS)",
                &config.redis_sentinels,
            )?;
            return Sentinels::new(&template, nodes, &master_name, certs)
                .map(|s| Some(Deployment::Sentinel(s)))
                .map_err(|e| format!("--redis-sentinels (REDIS_SENTINELS): {e}"));
        }
        if cluster {
            let flag = "--redis-cluster (REDIS_CLUSTER)";
            let nodes = addresses(flag, &config.redis_cluster)?;
            let db = template.redis_settings().db();
            if db != 0 {
                return Err(format!(
                    "{flag}: a Redis Cluster has only db 0; --redis-url (REDIS_URL) names db {db}"
                ));
            }
            return Cluster::new(&template, nodes, certs)
                .map(|c| Some(Deployment::Cluster(Box::new(c))))
                .map_err(|e| format!("{flag}: {e}"));
        }
        client(template, &certs)
            .map(|c| Some(Deployment::Single(Box::new(c))))
            .map_err(|e| format!("--redis-url (REDIS_URL): {e}"))
    }

    /// A fresh connection for commands, with [`IO_TIMEOUT`] on every answer.
    pub fn link(&self) -> RedisResult<Link> {
        match self {
            Deployment::Cluster(c) => Ok(Link::of(Kind::Cluster(Box::new(c.link()?)))),
            other => {
                let (con, tenure) = other.node()?;
                Ok(Link::of(Kind::Node(NodeLink { con, tenure })))
            }
        }
    }

    /// A fresh connection to subscribe on (the caller sets its own read
    /// timeout): the server, the current master, or one cluster node; with
    /// its tenure, which the subscriber checks when it wakes up.
    pub fn pubsub(&self) -> RedisResult<(redis::Connection, Tenure)> {
        match self {
            Deployment::Cluster(c) => Ok((c.pubsub()?, Tenure::default())),
            other => other.node(),
        }
    }

    /// After the subscriber lost its node: start with the next one.
    pub fn pubsub_failed(&self) {
        if let Deployment::Cluster(c) = self {
            c.pubsub_failed();
        }
    }

    /// What the log says of where Redis is.
    pub fn describe(&self) -> String {
        match self {
            Deployment::Single(c) => format!("redis at {}", c.get_connection_info().addr()),
            Deployment::Sentinel(s) => format!("redis master {:?} via sentinels", s.name()),
            Deployment::Cluster(c) => format!("redis cluster ({} seeds)", c.seed_count()),
        }
    }

    /// A connection to the one server or the Sentinels' master.
    fn node(&self) -> RedisResult<(redis::Connection, Tenure)> {
        match self {
            Deployment::Single(c) => Ok((connection(c, IO_TIMEOUT)?, Tenure::default())),
            Deployment::Sentinel(s) => s.master(IO_TIMEOUT),
            Deployment::Cluster(_) => Err((ErrorKind::Client, "a cluster has no one node").into()),
        }
    }
}

/// A connection to one server, and whether that server is still the
/// master (Sentinel mode): once it is not, every command fails as a lost
/// connection would, so the caller makes a fresh link (to the new master).
pub struct NodeLink {
    con: redis::Connection,
    tenure: Tenure,
}

impl NodeLink {
    fn current(&self) -> RedisResult<()> {
        if self.tenure.over() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the Sentinels name another master now",
            )
            .into());
        }
        Ok(())
    }
}

impl ConnectionLike for NodeLink {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.current()?;
        self.con.req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.current()?;
        self.con.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.con.get_db()
    }

    fn check_connection(&mut self) -> bool {
        !self.tenure.over() && self.con.check_connection()
    }

    fn is_open(&self) -> bool {
        !self.tenure.over() && self.con.is_open()
    }
}

impl From<redis::Connection> for Link {
    /// A link on a connection made elsewhere (to one server, always current).
    fn from(con: redis::Connection) -> Link {
        Link::of(Kind::Node(NodeLink {
            con,
            tenure: Tenure::default(),
        }))
    }
}

impl Link {
    fn of(kind: Kind) -> Link {
        Link {
            kind,
            spoiled: false,
        }
    }

    /// A batch on it failed as on a dead connection: make a fresh one.
    pub fn spoiled(&self) -> bool {
        self.spoiled
    }

    /// The connection for one command or script.
    pub fn con(&mut self) -> &mut dyn ConnectionLike {
        match &mut self.kind {
            Kind::Node(c) => c,
            Kind::Cluster(c) => c.as_mut(),
        }
    }

    /// `cmds` in one round trip per node (one pipeline on a single server;
    /// in a Cluster, one per node owning the keys): their replies in order.
    pub fn batch(&mut self, cmds: Vec<redis::Cmd>) -> RedisResult<Vec<Value>> {
        let pipe = self.pipe(cmds);
        self.run(&pipe)
    }

    /// [`Link::batch`], and when Redis answers `NOSCRIPT` (it lost its
    /// script cache: a restart, a failover), `reload` loads the scripts and
    /// the same pipeline runs once more: it is built once, and nothing is
    /// copied in case a retry is needed.
    pub fn batch_reloading(
        &mut self,
        cmds: Vec<redis::Cmd>,
        reload: impl FnOnce(&mut Link) -> RedisResult<()>,
    ) -> RedisResult<Vec<Value>> {
        let pipe = self.pipe(cmds);
        match self.run(&pipe) {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                reload(self)?;
                self.run(&pipe)
            }
            other => other,
        }
    }

    fn pipe(&self, cmds: Vec<redis::Cmd>) -> Pipe {
        match self.kind {
            Kind::Node(_) => {
                let mut pipe = redis::Pipeline::with_capacity(cmds.len());
                cmds.into_iter().for_each(|cmd| {
                    pipe.add_command(cmd);
                });
                Pipe::Node(pipe)
            }
            Kind::Cluster(_) => {
                let mut pipe = redis::cluster::cluster_pipe();
                cmds.into_iter().for_each(|cmd| {
                    pipe.add_command(cmd);
                });
                Pipe::Cluster(pipe)
            }
        }
    }

    fn run(&mut self, pipe: &Pipe) -> RedisResult<Vec<Value>> {
        let result = match (&mut self.kind, pipe) {
            (Kind::Node(c), Pipe::Node(p)) => p.query(c),
            (Kind::Cluster(c), Pipe::Cluster(p)) => p.query(c.as_mut()),
            // `pipe` made them alike; a mismatch is a bug, answered as an error.
            _ => Err((
                redis::ErrorKind::Client,
                "a pipeline for another kind of link",
            )
                .into()),
        };
        self.note(result)
    }

    fn note<T>(&mut self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            self.spoiled |= worth_a_fresh_link(e);
        }
        result
    }

    /// `cmds` all or nothing (MULTI/EXEC) on a single server. In a Cluster,
    /// where one transaction cannot span nodes, they run in order one by one.
    pub fn transaction(&mut self, cmds: Vec<redis::Cmd>) -> RedisResult<Vec<Value>> {
        let result = match &mut self.kind {
            Kind::Node(c) => {
                let mut pipe = redis::pipe();
                pipe.atomic();
                cmds.into_iter().for_each(|cmd| {
                    pipe.add_command(cmd);
                });
                pipe.query(c)
            }
            Kind::Cluster(c) => cmds.iter().map(|cmd| cmd.query(c.as_mut())).collect(),
        };
        self.note(result)
    }
}

/// Room for a script's SHA-1 in hex, or for a number written as text.
pub const SHA_LEN: usize = 40;
pub const NUMBER_LEN: usize = 20;

/// A command with room for `args` arguments (its name included) and
/// `bytes` of their text, reserved once. `redis::cmd` grows both by
/// doubling: five or six reallocations for a lease script call, each under
/// the malloc arena lock that the reactors and workers share
/// (`crate::heap`), where an open storm met it contended. Too little room
/// only means the doubling comes back.
pub fn command(name: &str, args: usize, bytes: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(args, name.len() + bytes);
    cmd.arg(name);
    cmd
}

/// A pipeline built for one kind of link.
enum Pipe {
    Node(redis::Pipeline),
    Cluster(redis::cluster::ClusterPipeline),
}

/// Whether a command that failed this way may succeed on a fresh link: the
/// connection died (Redis restarted, a proxy dropped it, a failover killed
/// the master), the server became a replica under it (`READONLY` after a
/// Sentinel failover), or the cluster moved slots faster than redis-rs's own
/// redirections followed.
pub fn worth_a_fresh_link(e: &redis::RedisError) -> bool {
    if e.is_timeout() {
        return false;
    }
    e.is_connection_dropped()
        || e.is_io_error()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
                | ErrorKind::ClusterConnectionNotFound
        )
}

/// Flags that make no sense together or alone.
fn check_combinations(config: &Config) -> Result<(), String> {
    let sentinels = !config.redis_sentinels.is_empty();
    let cluster = !config.redis_cluster.is_empty();
    let any = config.redis_url.is_some() || sentinels || cluster;
    if config.demo && any {
        return Err("--demo runs embedded: leave --redis-url (REDIS_URL), --redis-sentinels (REDIS_SENTINELS) and --redis-cluster (REDIS_CLUSTER) unset".into());
    }
    if sentinels && cluster {
        return Err("--redis-sentinels (REDIS_SENTINELS) and --redis-cluster (REDIS_CLUSTER) exclude each other".into());
    }
    if config
        .redis_master_name
        .as_deref()
        .is_some_and(|name| name.trim().is_empty())
    {
        return Err("--redis-master-name (REDIS_MASTER_NAME) is empty".into());
    }
    if sentinels != config.redis_master_name.is_some() {
        return Err(if sentinels {
            "--redis-sentinels (REDIS_SENTINELS) needs --redis-master-name (REDIS_MASTER_NAME)"
        } else {
            "--redis-master-name (REDIS_MASTER_NAME) needs --redis-sentinels (REDIS_SENTINELS)"
        }
        .into());
    }
    let tls_files = [
        (&config.redis_ca_file, "--redis-ca-file (REDIS_CA_FILE)"),
        (
            &config.redis_cert_file,
            "--redis-cert-file (REDIS_CERT_FILE)",
        ),
        (&config.redis_key_file, "--redis-key-file (REDIS_KEY_FILE)"),
    ];
    let tls = config
        .redis_url
        .as_deref()
        .is_some_and(|u| u.starts_with("rediss://"));
    if let Some((_, flag)) = tls_files.iter().find(|(f, _)| f.is_some() && !tls) {
        return Err(format!("{flag} needs a rediss:// --redis-url (REDIS_URL)"));
    }
    match (&config.redis_cert_file, &config.redis_key_file) {
        (Some(_), None) => Err(
            "--redis-cert-file (REDIS_CERT_FILE) needs --redis-key-file (REDIS_KEY_FILE)".into(),
        ),
        (None, Some(_)) => Err(
            "--redis-key-file (REDIS_KEY_FILE) needs --redis-cert-file (REDIS_CERT_FILE)".into(),
        ),
        _ => Ok(()),
    }
}

/// The CA and client certificate files, read and checked now (a bad file
/// is a start-up error naming its flag, not a Redis outage later). None:
/// no TLS, or TLS with the system roots and no client certificate.
fn certificates(config: &Config, tls: bool) -> Result<Option<TlsCertificates>, String> {
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).map_err(|e| format!("{flag}: {}: {e}", path.display()))
    };
    let root_cert = match &config.redis_ca_file {
        Some(p) => {
            let flag = "--redis-ca-file (REDIS_CA_FILE)";
            let pem = read(p, flag)?;
            // An empty trust store would refuse every server, silently.
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(format!("{flag}: {}: no PEM certificate", p.display()));
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&config.redis_cert_file, &config.redis_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read(cert, "--redis-cert-file (REDIS_CERT_FILE)")?,
            client_key: read(key, "--redis-key-file (REDIS_KEY_FILE)")?,
        }),
        _ => None,
    };
    if !tls || (root_cert.is_none() && client_tls.is_none()) {
        return Ok(None);
    }
    let certs = TlsCertificates {
        client_tls,
        root_cert,
    };
    // Parses the PEM now, on a throwaway client, to name the bad file.
    redis::Client::build_with_tls("rediss://127.0.0.1/", certs.clone())
        .map_err(|e| format!("--redis-ca-file/--redis-cert-file/--redis-key-file: {e}"))?;
    if let Some(pair) = &certs.client_tls {
        key_matches(pair)?;
    }
    Ok(Some(certs))
}

/// The client key is the certificate's: redis-rs would only find out when
/// it connects, and then keep Redis `down` with no flag named.
fn key_matches(pair: &ClientTlsConfig) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_flag = "--redis-cert-file (REDIS_CERT_FILE)";
    let key_flag = "--redis-key-file (REDIS_KEY_FILE)";
    let chain = CertificateDer::pem_slice_iter(&pair.client_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_flag}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_flag}: no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&pair.client_key)
        .map_err(|e| format!("{key_flag}: no PEM private key ({e})"))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map(drop)
        .map_err(|e| format!("{key_flag}: not the key of the --redis-cert-file certificate ({e})"))
}

#[cfg(test)]
impl Deployment {
    /// The deployment of the one Redis server at `url`, for tests.
    pub fn at(url: &str) -> std::sync::Arc<Deployment> {
        let config = <Config as clap::Parser>::try_parse_from(["sse-gateway", "--redis-url", url])
            .expect("config");
        let deployment = Deployment::from_config(&config).expect("deployment");
        std::sync::Arc::new(deployment.expect("redis mode"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn deployment(args: &[&str]) -> Result<Option<Deployment>, String> {
        let mut all = vec!["sse-gateway"];
        all.extend_from_slice(args);
        Deployment::from_config(&Config::try_parse_from(all).map_err(|e| e.to_string())?)
    }

    fn refused(args: &[&str], flag: &str) {
        match deployment(args) {
            Err(line) => assert!(line.starts_with(flag), "{args:?}: {line}"),
            Ok(_) => panic!("{args:?} accepted"),
        }
    }

    #[test]
    fn bad_combinations_name_their_flag() {
        refused(
            &["--redis-sentinels", "127.0.0.1:26379"],
            "--redis-sentinels",
        );
        refused(&["--redis-master-name", "m"], "--redis-master-name");
        refused(
            &[
                "--redis-sentinels",
                "127.0.0.1:1",
                "--redis-master-name",
                "m",
                "--redis-cluster",
                "127.0.0.1:2",
            ],
            "--redis-sentinels",
        );
        refused(
            &["--redis-url", "redis://127.0.0.1/", "--redis-ca-file", "/x"],
            "--redis-ca-file",
        );
        refused(
            &[
                "--redis-url",
                "rediss://127.0.0.1/",
                "--redis-cert-file",
                "/x",
            ],
            "--redis-cert-file",
        );
        refused(
            &[
                "--redis-url",
                "rediss://127.0.0.1/",
                "--redis-ca-file",
                "/nonexistent",
            ],
            "--redis-ca-file",
        );
        refused(&["--redis-cluster", "127.0.0.1"], "--redis-cluster");
        refused(&["--redis-cluster", "127.0.0.1:0"], "--redis-cluster");
        refused(
            &[
                "--redis-url",
                "redis://127.0.0.1/3",
                "--redis-cluster",
                "127.0.0.1:7000",
            ],
            "--redis-cluster",
        );
        refused(&["--demo", "--redis-cluster", "127.0.0.1:7000"], "--demo");
    }

    #[test]
    fn an_empty_master_name_is_refused() {
        refused(
            &[
                "--redis-sentinels",
                "127.0.0.1:26379",
                "--redis-master-name",
                "",
            ],
            "--redis-master-name",
        );
    }

    #[test]
    fn a_client_key_that_is_not_the_certificates_is_refused() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/");
        let (cert, key, other) = (
            format!("{dir}client.pem"),
            format!("{dir}client.key"),
            format!("{dir}other.key"),
        );
        let tls = |key: &str| {
            deployment(&[
                "--redis-url",
                "rediss://127.0.0.1:6390/",
                "--redis-cert-file",
                &cert,
                "--redis-key-file",
                key,
            ])
        };
        assert!(matches!(tls(&key), Ok(Some(Deployment::Single(_)))));
        refused(
            &[
                "--redis-url",
                "rediss://127.0.0.1:6390/",
                "--redis-cert-file",
                &cert,
                "--redis-key-file",
                &other,
            ],
            "--redis-key-file",
        );
        let line = tls(&other).err().unwrap_or_default();
        assert!(line.contains("not the key"), "{line}");
    }

    #[test]
    fn good_flags_make_their_deployment() {
        assert!(deployment(&[]).unwrap().is_none());
        let single = deployment(&["--redis-url", "redis://u:p@127.0.0.1:6390/2"]).unwrap();
        assert!(matches!(single, Some(Deployment::Single(_))));
        let cluster = deployment(&["--redis-cluster", "127.0.0.1:7000,[::1]:7001"]).unwrap();
        assert!(matches!(cluster, Some(Deployment::Cluster(ref c)) if c.seed_count() == 2));
        let sentinel = deployment(&[
            "--redis-sentinels",
            "127.0.0.1:26379,127.0.0.1:26380",
            "--redis-master-name",
            "mymaster",
        ])
        .unwrap();
        assert!(matches!(sentinel, Some(Deployment::Sentinel(_))));
    }

    #[test]
    fn only_connection_trouble_is_worth_a_fresh_link() {
        let readonly =
            redis::RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "READONLY"));
        assert!(worth_a_fresh_link(&readonly));
        let io: redis::RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert!(worth_a_fresh_link(&io));
        let timeout: redis::RedisError = std::io::Error::from(std::io::ErrorKind::TimedOut).into();
        assert!(!worth_a_fresh_link(&timeout));
        let wrong = redis::RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!worth_a_fresh_link(&wrong));
    }
}
