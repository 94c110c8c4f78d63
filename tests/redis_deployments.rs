//! The Redis deployments operators run (contract 7.5), each with real
//! servers started here on loopback and stopped by PID: TLS with a CA made
//! by `openssl` (and a wrong CA refused), mutual TLS, an ACL user with a
//! password (and a wrong one refused), a master with a replica and three
//! Sentinels whose master is killed under an open stream, and a Redis Cluster
//! of three masters, one of its slots moved while streams are open.
//!
//! A refused connection (wrong CA, missing client certificate, wrong
//! password) does not stop the gateway: it runs with Redis `down`, as in any
//! outage (`/health` 503, requests 503), says why once in its log, and keeps
//! retrying, so fixing Redis's side needs no restart.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

// ----- servers ---------------------------------------------------------------

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sse-redis-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` (or Sentinel) of this test, SIGKILLed by PID on drop.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    /// Starts `redis-server` on `port` with `args` and waits (at most 5 s)
    /// until `url` answers PING.
    fn start(port: u16, args: &[String], url: &str) -> Server {
        let child = Command::new("/usr/bin/redis-server")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut server = Server {
            port,
            child: Some(child),
        };
        let up = wait_until(T, || {
            let exited = server.child.as_mut().map(|c| c.try_wait());
            matches!(exited, Some(Ok(Some(_)))) || ping(url)
        });
        assert!(up && ping(url), "redis-server {args:?} did not answer");
        server
    }

    /// A plain server on a free port with `extra` settings.
    fn plain(extra: &[&str]) -> Server {
        let port = free_port();
        let mut args = base_args(port);
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::start(port, &args, &format!("redis://127.0.0.1:{port}/"))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn con(&self) -> redis::Connection {
        connect(&self.url())
    }

    /// `kill -9` (by PID).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Loopback, nothing saved; files a server must write (a replica's copy of
/// the master's data) go to the temp dir, never the working directory.
fn base_args(port: u16) -> Vec<String> {
    let dir = std::env::temp_dir().to_string_lossy().into_owned();
    let port = port.to_string();
    let args = ["--port", &port, "--bind", "127.0.0.1", "--save", ""];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["--appendonly", "no", "--dir", &dir].map(String::from));
    args
}

fn connect(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).expect("redis url");
    let con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    con.set_read_timeout(Some(T)).unwrap();
    con.set_write_timeout(Some(T)).unwrap();
    con
}

fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    let _ = con.set_read_timeout(Some(Duration::from_millis(500)));
    redis::cmd("PING")
        .query::<String>(&mut con)
        .is_ok_and(|p| p == "PONG")
}

/// Runs a short command to completion (at most `limit`), killing it by PID
/// when it takes longer; panics unless it succeeds.
fn run(program: &str, args: &[&str], limit: Duration) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} took over {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

// ----- certificates ----------------------------------------------------------

/// `openssl req` making a fresh P-256 key in `key`, with `args`.
fn openssl_req(key: &str, args: &[&str]) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
    ];
    all.extend(["-nodes", "-keyout", key]);
    all.extend(args);
    run("openssl", &all, T);
}

/// A CA (`<name>-ca.pem`, `<name>-ca.key`) made with openssl in `dir`.
fn make_ca(dir: &Scratch, name: &str) {
    let (key, pem) = (
        dir.path(&format!("{name}-ca.key")),
        dir.path(&format!("{name}-ca.pem")),
    );
    let subject = format!("/CN={name} test CA");
    let mut args = vec!["-x509", "-out", &pem, "-days", "2", "-subj", &subject];
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl_req(&key, &args);
}

/// A certificate `<name>.pem`/`<name>.key` for 127.0.0.1 signed by `ca`,
/// for `usage` (serverAuth or clientAuth).
fn make_cert(dir: &Scratch, ca: &str, name: &str, usage: &str) {
    let (key, csr, pem) = (
        dir.path(&format!("{name}.key")),
        dir.path(&format!("{name}.csr")),
        dir.path(&format!("{name}.pem")),
    );
    let ext = dir.path(&format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    openssl_req(&key, &["-out", &csr, "-subj", "/CN=127.0.0.1"]);
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &dir.path(&format!("{ca}-ca.pem")),
            "-CAkey",
            &dir.path(&format!("{ca}-ca.key")),
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
        T,
    );
}

/// A server with a plain port (for the test) and a TLS port (for the
/// gateway), clients authenticated by certificate when `auth_clients`.
fn tls_server(dir: &Scratch, auth_clients: bool) -> (Server, u16) {
    let (port, tls_port) = (free_port(), free_port());
    let mut args = base_args(port);
    for (k, v) in [
        ("--tls-port", tls_port.to_string()),
        ("--tls-cert-file", dir.path("server.pem")),
        ("--tls-key-file", dir.path("server.key")),
        ("--tls-ca-cert-file", dir.path("good-ca.pem")),
        (
            "--tls-auth-clients",
            if auth_clients { "yes" } else { "no" }.into(),
        ),
    ] {
        args.extend([k.to_owned(), v]);
    }
    let server = Server::start(port, &args, &format!("redis://127.0.0.1:{port}/"));
    (server, tls_port)
}

// ----- gateway helpers -------------------------------------------------------

fn grant(con: &mut dyn redis::ConnectionLike, user: &str, devices: &[&str]) {
    redis::cmd("SADD")
        .arg(format!("user:{user}:devices"))
        .arg(devices)
        .query::<()>(con)
        .expect("SADD");
}

fn publish(con: &mut redis::Connection, device: &str, n: u64) -> u64 {
    redis::cmd("PUBLISH")
        .arg("mqtt:realtime:processed")
        .arg(json!({"deviceId": device, "data": {"n": n}}).to_string())
        .query(con)
        .expect("PUBLISH")
}

/// Reads `s` until the realtime-update numbered `n` arrives (skipping
/// earlier ones and `degraded`/`recovered`/`replay-gap`: what the failover
/// lost is said, not hidden); panics after `limit` or on any other event.
fn expect_n(s: &mut SseStream, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = s
            .next_event(left)
            .unwrap_or_else(|| panic!("event {n} not within {limit:?}"));
        if f.is_system("degraded") || f.is_system("recovered") || f.is_system("replay-gap") {
            continue;
        }
        assert_eq!(f.event.as_deref(), Some("realtime-update"), "{:?}", f.raw);
        if f.json()["data"]["n"] == json!(n) {
            return;
        }
    }
}

/// A data stream of `user` on `devices` (granted already).
fn stream(gw: &Gateway, user: &str, devices: &[&str]) -> SseStream {
    let (ticket, _) = gw.ticket_for(user, r#"{"purpose":"data"}"#);
    SseStream::must_open(gw.addr(), &data_path(&ticket, devices), &[])
}

/// A gateway that cannot reach Redis: it logs why (one of `reason`),
/// `/health` is 503 with Redis down, and a ticket request is answered 503.
fn assert_refused(gw: &Gateway, reason: &[&str]) {
    let logged = wait_until(T, || {
        gw.log().contains("redis subscriber cannot reach Redis")
    });
    assert!(logged, "no refusal in the log:\n{}", gw.log());
    let log = gw.log().to_lowercase();
    assert!(
        reason.iter().any(|r| log.contains(&r.to_lowercase())),
        "log names none of {reason:?}:\n{log}"
    );
    let health = get(gw.addr(), "/health", &[]);
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.json()["redis"], "down");
    let (status, _) = gw.ticket(&gw.token("u1", None), r#"{"purpose":"data"}"#);
    assert_eq!(status, 503);
}

// ----- TLS and ACL -----------------------------------------------------------

#[test]
fn tls_with_a_ca_file_streams_and_a_wrong_ca_is_refused() {
    let dir = Scratch::new("tls");
    make_ca(&dir, "good");
    make_ca(&dir, "wrong");
    make_cert(&dir, "good", "server", "serverAuth");
    let (server, tls_port) = tls_server(&dir, false);
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let ca = dir.path("good-ca.pem");
    let gw = Gateway::builder()
        .args(&["--redis-url", &url])
        .env("REDIS_CA_FILE", &ca)
        .start();
    let mut admin = server.con();
    grant(&mut admin, "u1", &["D1"]);
    let mut s = stream(&gw, "u1", &["D1"]);
    assert_eq!(
        publish(&mut admin, "D1", 1),
        1,
        "the gateway subscribes over TLS"
    );
    expect_n(&mut s, 1, T);

    let wrong = Gateway::builder()
        .args(&[
            "--redis-url",
            &url,
            "--redis-ca-file",
            &dir.path("wrong-ca.pem"),
        ])
        .any_health()
        .start();
    assert_refused(&wrong, &["invalid peer certificate: UnknownIssuer"]);
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let dir = Scratch::new("mtls");
    make_ca(&dir, "good");
    make_cert(&dir, "good", "server", "serverAuth");
    make_cert(&dir, "good", "client", "clientAuth");
    let (server, tls_port) = tls_server(&dir, true);
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let ca = dir.path("good-ca.pem");
    let gw = Gateway::builder()
        .args(&["--redis-url", &url, "--redis-ca-file", &ca])
        .args(&["--redis-cert-file", &dir.path("client.pem")])
        .args(&["--redis-key-file", &dir.path("client.key")])
        .start();
    let mut admin = server.con();
    grant(&mut admin, "u1", &["D1"]);
    let mut s = stream(&gw, "u1", &["D1"]);
    publish(&mut admin, "D1", 7);
    expect_n(&mut s, 7, T);

    let anonymous = Gateway::builder()
        .args(&["--redis-url", &url, "--redis-ca-file", &ca])
        .any_health()
        .start();
    assert_refused(
        &anonymous,
        &["certificate", "connection reset", "tls", "alert"],
    );

    // A certificate without its key is a start-up error naming the flag.
    let (code, _, err) = run_cli(
        &[
            "--jwt-secret",
            SECRET,
            "--redis-url",
            &url,
            "--redis-cert-file",
            &dir.path("client.pem"),
        ],
        &[],
        T,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--redis-cert-file"), "{err}");
}

#[test]
fn acl_user_and_password_in_the_url_and_a_wrong_password_refused() {
    let server = Server::plain(&[]);
    let mut con = server.con();
    for rule in [
        vec![
            "SETUSER",
            "gateway",
            "on",
            ">s3cret-pass",
            "~*",
            "&*",
            "+@all",
        ],
        // The default user goes: only the named user can be what works.
        vec!["SETUSER", "default", "off"],
    ] {
        redis::cmd("ACL")
            .arg(rule)
            .query::<()>(&mut con)
            .expect("ACL");
    }
    let as_gateway = |pass: &str| format!("redis://gateway:{pass}@127.0.0.1:{}/", server.port);
    let mut admin = connect(&as_gateway("s3cret-pass"));
    let gw = Gateway::builder()
        .args(&["--redis-url", &as_gateway("s3cret-pass")])
        .start();
    grant(&mut admin, "u1", &["D1"]);
    let mut s = stream(&gw, "u1", &["D1"]);
    publish(&mut admin, "D1", 3);
    expect_n(&mut s, 3, T);

    let wrong = Gateway::builder()
        .args(&["--redis-url", &as_gateway("not-the-pass")])
        .any_health()
        .start();
    assert_refused(&wrong, &["AuthenticationFailed"]);
    assert!(
        !wrong.log().contains("not-the-pass"),
        "the password is logged"
    );
}

// ----- Sentinel --------------------------------------------------------------

/// Asks a Sentinel which port serves `mymaster` now.
fn master_port(sentinel: &Server) -> Option<u16> {
    let mut con = redis::Client::open(sentinel.url())
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(300))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("mymaster")
        .query(&mut con)
        .ok()?;
    addr.and_then(|(_, port)| port.parse().ok())
}

/// `SENTINEL master mymaster` field `name` as a number.
fn sentinel_field(sentinel: &Server, name: &str) -> i64 {
    let mut con = sentinel.con();
    let fields: Vec<String> = redis::cmd("SENTINEL")
        .arg("master")
        .arg("mymaster")
        .query(&mut con)
        .unwrap_or_default();
    fields
        .chunks(2)
        .find(|kv| kv[0] == name)
        .and_then(|kv| kv[1].parse().ok())
        .unwrap_or(-1)
}

/// A master, its replica and three Sentinels watching it (a failover 1 s
/// after the master stops answering), ready for a failover.
struct SentinelSet {
    master: Server,
    replica: Server,
    sentinels: Vec<Server>,
    /// The Sentinels as `--redis-sentinels` lists them.
    list: String,
    _dir: Scratch,
}

impl SentinelSet {
    fn start(name: &str) -> SentinelSet {
        let dir = Scratch::new(name);
        let master = Server::plain(&[]);
        let replica = Server::plain(&[
            "--replicaof",
            "127.0.0.1",
            &master.port.to_string(),
            "--dir",
            &dir.path(""),
        ]);
        let sentinels: Vec<Server> = (0..3)
            .map(|n| {
                let port = free_port();
                let conf = dir.path(&format!("sentinel-{n}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel monitor mymaster 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds mymaster 1000\n\
                         sentinel failover-timeout mymaster 3000\n",
                        dir.0.display(),
                        master.port
                    ),
                )
                .unwrap();
                let args = [conf, "--sentinel".to_owned()];
                Server::start(port, &args, &format!("redis://127.0.0.1:{port}/"))
            })
            .collect();
        // Failover needs every Sentinel to know the replica and the others.
        let ready = wait_until(Duration::from_secs(15), || {
            sentinels.iter().all(|s| {
                sentinel_field(s, "num-slaves") == 1
                    && sentinel_field(s, "num-other-sentinels") == 2
            })
        });
        assert!(
            ready,
            "sentinels did not discover each other and the replica"
        );
        let list = sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",");
        SentinelSet {
            master,
            replica,
            sentinels,
            list,
            _dir: dir,
        }
    }

    fn gateway(&self) -> Gateway {
        Gateway::builder()
            .args(&[
                "--redis-sentinels",
                &self.list,
                "--redis-master-name",
                "mymaster",
            ])
            .start()
    }
}

/// Waits until what was written on `master` reached its one replica.
fn wait_replicated(master: &mut redis::Connection) {
    let synced: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(master).unwrap();
    assert_eq!(synced, 1, "the replica did not catch up");
}

/// Waits (up to `promote_within`) for the Sentinels to name the replica
/// master, then publishes events numbered from 101 on it, one every 50 ms,
/// until the gateway's subscriber hears one (within `T`). Returns a
/// connection to the new master, the number heard, and when the promotion
/// was seen.
fn follow_promotion(
    set: &SentinelSet,
    gw: &Gateway,
    promote_within: Duration,
) -> (redis::Connection, u64, Instant) {
    let promoted = wait_until(promote_within, || {
        master_port(&set.sentinels[0]) == Some(set.replica.port)
    });
    assert!(promoted, "the replica was not promoted");
    let since = Instant::now();
    let mut con = set.replica.con();
    for n in 101.. {
        if publish(&mut con, "D1", n) > 0 {
            return (con, n, since);
        }
        assert!(
            since.elapsed() <= T,
            "the gateway did not move to the new master:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!("u64 numbers ran out")
}

#[test]
fn sentinel_failover_keeps_the_open_stream_delivering() {
    let mut set = SentinelSet::start("sentinel");
    let gw = set.gateway();
    let mut admin = set.master.con();
    grant(&mut admin, "u1", &["D1"]);
    // The grant reaches the replica before the master goes.
    wait_replicated(&mut admin);
    let mut s = stream(&gw, "u1", &["D1"]);
    publish(&mut admin, "D1", 1);
    expect_n(&mut s, 1, T);

    set.master.kill();
    // The same open stream gets events published on the promoted master
    // within 5 s of the promotion.
    let (mut con, n, since) = follow_promotion(&set, &gw, Duration::from_secs(20));
    expect_n(&mut s, n, T.saturating_sub(since.elapsed()));
    // Requests reach the new master too: a ticket, a second stream.
    grant(&mut con, "u2", &["D2"]);
    let mut s2 = stream(&gw, "u2", &["D2"]);
    publish(&mut con, "D2", 5);
    expect_n(&mut s2, 5, T);
    assert!(since.elapsed() < Duration::from_secs(10));
}

/// What a stream received, in order: realtime-update numbers and the
/// `replay-gap` markers between them.
#[derive(Debug, PartialEq)]
enum Got {
    N(u64),
    Gap,
}

/// Reads `s` until the realtime-update numbered `last` (at most `limit`),
/// adding to `got`; `degraded` and `recovered` are skipped.
fn read_until(s: &mut SseStream, got: &mut Vec<Got>, last: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !got.contains(&Got::N(last)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = s.next_event(left) else {
            panic!("event {last} not within {limit:?}; got {got:?}");
        };
        if f.is_system("replay-gap") {
            got.push(Got::Gap);
        } else if f.event.as_deref() == Some("realtime-update") {
            got.push(Got::N(f.json()["data"]["n"].as_u64().expect("n")));
        }
    }
}

/// The no-silent-loss rule: numbers strictly increase (nothing twice,
/// nothing out of order), and where one is skipped a `replay-gap` says so.
fn assert_no_silent_loss(got: &[Got]) {
    let mut last: Option<u64> = None;
    let mut gap = false;
    for g in got {
        match g {
            Got::Gap => gap = true,
            Got::N(n) => {
                if let Some(l) = last {
                    assert!(*n > l, "{n} after {l}: {got:?}");
                    assert!(*n == l + 1 || gap, "{l}..{n} silently: {got:?}");
                }
                last = Some(*n);
                gap = false;
            }
        }
    }
}

#[test]
fn a_graceful_sentinel_failover_is_followed_by_every_link_within_seconds() {
    let set = SentinelSet::start("sentinel-graceful");
    let gw = set.gateway();
    let mut admin = set.master.con();
    grant(&mut admin, "u1", &["D1"]);
    grant(&mut admin, "u2", &["D2"]);
    wait_replicated(&mut admin);
    let mut s = stream(&gw, "u1", &["D1"]);
    let mut got = Vec::new();
    publish(&mut admin, "D1", 1);
    read_until(&mut s, &mut got, 1, T);

    // `SENTINEL FAILOVER` promotes the replica at once, but the old master
    // stays up, and a master, for some ten seconds: only a gateway that
    // follows the Sentinels (not its connections' fate) moves in time.
    redis::cmd("SENTINEL")
        .arg(&["FAILOVER", "mymaster"][..])
        .query::<()>(&mut set.sentinels[0].con())
        .expect("SENTINEL FAILOVER");
    let (mut con, n, since) = follow_promotion(&set, &gw, Duration::from_secs(10));
    for m in n + 1..=n + 5 {
        publish(&mut con, "D1", m);
    }
    read_until(&mut s, &mut got, n + 5, T.saturating_sub(since.elapsed()));
    assert_no_silent_loss(&got);
    assert!(got.contains(&Got::N(n)), "{got:?}");

    // A ticket minted now is written to the new master (on the old one it
    // would vanish when the old master turns replica) and opens a stream.
    let (ticket, id) = gw.ticket_for("u2", r#"{"purpose":"data"}"#);
    let key = format!("sse:ticket:{id}");
    let exists = |server: &Server| -> i64 {
        redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut server.con())
            .unwrap()
    };
    assert_eq!(
        exists(&set.replica),
        1,
        "the ticket is not on the new master"
    );
    assert_eq!(exists(&set.master), 0, "the ticket went to the old master");
    let mut s2 = SseStream::must_open(gw.addr(), &data_path(&ticket, &["D2"]), &[]);
    publish(&mut con, "D2", 7);
    expect_n(&mut s2, 7, T);
    assert!(
        since.elapsed() < Duration::from_secs(8),
        "{:?}",
        since.elapsed()
    );
}

// ----- Cluster ---------------------------------------------------------------

/// Node `i` of a cluster: its port and id.
fn node_id(node: &Server) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut node.con())
        .unwrap()
}

/// Which node serves `key` (the one that answers without MOVED).
fn owner(nodes: &[Server], key: &str) -> usize {
    nodes
        .iter()
        .position(|n| {
            redis::cmd("EXISTS")
                .arg(key)
                .query::<i64>(&mut n.con())
                .is_ok()
        })
        .expect("some node serves the key")
}

/// Moves the slot of `key` from node `from` to node `to`, keys and all, as
/// `redis-cli --cluster reshard` does, one slot only.
fn move_slot(nodes: &[Server], key: &str, from: usize, to: usize) {
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut nodes[0].con())
        .unwrap();
    let (src, dst) = (node_id(&nodes[from]), node_id(&nodes[to]));
    let cluster = |n: usize, args: &[&str]| {
        redis::cmd("CLUSTER")
            .arg(args)
            .query::<()>(&mut nodes[n].con())
            .unwrap()
    };
    let slot_s = slot.to_string();
    cluster(to, &["SETSLOT", &slot_s, "IMPORTING", &src]);
    cluster(from, &["SETSLOT", &slot_s, "MIGRATING", &dst]);
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg(&["GETKEYSINSLOT", &slot_s, "100"][..])
            .query(&mut nodes[from].con())
            .unwrap();
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg(
                &[
                    "127.0.0.1",
                    &nodes[to].port.to_string(),
                    "",
                    "0",
                    "5000",
                    "KEYS",
                ][..],
            )
            .arg(keys)
            .query::<()>(&mut nodes[from].con())
            .unwrap();
    }
    for n in 0..nodes.len() {
        cluster(n, &["SETSLOT", &slot_s, "NODE", &dst]);
    }
}

/// A Redis Cluster of `count` nodes in `dir`, `replicas` per master (the
/// masters come first), up and every replica in sync.
fn start_cluster(dir: &Scratch, count: usize, replicas: usize) -> (Vec<Server>, Vec<String>) {
    let nodes: Vec<Server> = (0..count)
        .map(|n| {
            let port = free_port();
            let mut args = base_args(port);
            for (k, v) in [
                ("--cluster-enabled", "yes".to_owned()),
                ("--cluster-port", free_port().to_string()),
                (
                    "--cluster-config-file",
                    dir.path(&format!("nodes-{n}.conf")),
                ),
                ("--cluster-node-timeout", "2000".to_owned()),
                ("--dir", dir.path("")),
            ] {
                args.extend([k.to_owned(), v]);
            }
            Server::start(port, &args, &format!("redis://127.0.0.1:{port}/"))
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let replicas = replicas.to_string();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
    run("redis-cli", &create, Duration::from_secs(20));
    let ok = wait_until(Duration::from_secs(15), || {
        nodes.iter().all(|n| {
            let mut con = n.con();
            let info = redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut con);
            let replication = redis::cmd("INFO")
                .arg("replication")
                .query::<String>(&mut con);
            // A replica that never synced cannot take over (Redis refuses
            // a failover to it): wait for every one.
            info.is_ok_and(|i| i.contains("cluster_state:ok"))
                && replication
                    .is_ok_and(|r| r.contains("role:master") || r.contains("master_link_status:up"))
        })
    });
    assert!(ok, "the cluster did not come up");
    (nodes, addrs)
}

#[test]
fn cluster_of_three_masters_tickets_leases_streams_a_moved_slot_and_a_lost_node() {
    let dir = Scratch::new("cluster");
    let (mut nodes, addrs) = start_cluster(&dir, 3, 0);
    // A dead first seed: the gateway moves on to the next ones.
    let seeds = format!("127.0.0.1:{},{}", free_port(), addrs.join(","));
    let args = [
        "--redis-cluster",
        seeds.as_str(),
        "--heartbeat-secs",
        "0.5",
        "--max-conns-per-ip",
        "50",
    ];
    let gw = Gateway::builder().args(&args).start();
    let other = Gateway::builder().args(&args).start();
    let mut data =
        redis::cluster::ClusterClient::new(nodes.iter().map(|n| n.url()).collect::<Vec<_>>())
            .unwrap()
            .get_connection()
            .unwrap();

    // Users and devices whose keys live on different nodes.
    let users: Vec<String> = (0..6).map(|n| format!("user-{n}")).collect();
    let devices: Vec<String> = (0..6).map(|n| format!("M{n}")).collect();
    let spread = |keys: Vec<String>| {
        keys.iter()
            .map(|k| owner(&nodes, k))
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert!(spread(users.iter().map(|u| format!("user:{u}:devices")).collect()) > 1);
    assert!(
        spread(
            devices
                .iter()
                .map(|d| format!("machine:{d}:status"))
                .collect()
        ) > 1
    );
    for d in &devices {
        redis::cmd("SET")
            .arg(format!("machine:{d}:status"))
            .arg(json!({"state": d}).to_string())
            .query::<()>(&mut data)
            .unwrap();
    }
    let all: Vec<&str> = devices.iter().map(String::as_str).collect();
    let mut streams: Vec<SseStream> = users
        .iter()
        .map(|u| {
            grant(&mut data, u, &all);
            let mut s = stream(&gw, u, &all);
            // Statuses from every node, fetched one key per command.
            for _ in &all {
                s.expect_event("machine-status", T);
            }
            s
        })
        .collect();
    // Leases live in the cluster: the other gateway counts them.
    let opened = Instant::now();
    let refused_elsewhere = |user: &str| {
        let (ticket, _) = other.ticket_for(user, r#"{"purpose":"data"}"#);
        let refused = SseStream::open(other.addr(), &data_path(&ticket, &all[..1]), &[]);
        refused.err().map(|r| r.status) == Some(429)
    };
    assert!(refused_elsewhere(&users[0]));

    // Published through every node, received once by every stream.
    for (i, node) in nodes.iter().enumerate() {
        publish(&mut node.con(), &devices[i], i as u64);
        for s in &mut streams {
            expect_n(s, i as u64, T);
        }
    }

    // An access change before the move: the subscriber's side link for
    // set reads learns the slot map as it is now.
    take_away(&mut data, &nodes[0], &users[5], all[0], &mut streams[5]);

    // The slot of user-0's devices moves to another node; the gateway
    // follows the redirection for a new stream and an access change.
    let key = format!("user:{}:devices", users[0]);
    let from = owner(&nodes, &key);
    move_slot(&nodes, &key, from, (from + 1) % 3);
    assert_eq!(owner(&nodes, &key), (from + 1) % 3);
    // An alerts stream reads the moved set (SMEMBERS) when it opens.
    let (ticket, _) = gw.ticket_for(&users[0], r#"{"purpose":"alerts"}"#);
    let alerts = SseStream::open(gw.addr(), &alerts_path(&ticket), &[]);
    assert!(alerts.is_ok(), "alerts stream refused after the slot move");
    take_away(&mut data, &nodes[2], &users[0], all[0], &mut streams[0]);
    // The others keep receiving.
    publish(&mut nodes[1].con(), &devices[1], 42);
    expect_n(&mut streams[1], 42, T);

    // Leases are renewed through the cluster (in pipelines per node): past
    // their 1 s lifetime they still count. No event marks an expiry that
    // did not happen, so this waits out the lifetime.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(opened.elapsed()));
    assert!(refused_elsewhere(&users[1]), "a lease expired unrenewed");
    assert!(!gw.log().contains("lease renewal failed"), "{}", gw.log());

    // The node the subscribers listen through (the first live seed) dies:
    // they move to the next seed, and the same streams deliver again.
    let listening = |node: &Server| -> i64 {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg(&["NUMSUB", "mqtt:realtime:processed"][..])
            .query(&mut node.con())
            .unwrap_or_default();
        counts.first().map_or(0, |c| c.1)
    };
    assert_eq!(
        listening(&nodes[0]),
        2,
        "both gateways listen on the first live seed"
    );
    let since = Instant::now();
    nodes[0].kill();
    assert!(
        wait_until(T, || listening(&nodes[1]) == 2),
        "no resubscription"
    );
    publish(&mut nodes[2].con(), &devices[2], 43);
    for s in &mut streams[1..5] {
        expect_n(s, 43, T);
    }
    assert!(since.elapsed() < T, "{:?}", since.elapsed());
}

#[test]
fn a_cluster_given_one_seed_outlives_that_seed() {
    let dir = Scratch::new("cluster-one-seed");
    let (mut nodes, addrs) = start_cluster(&dir, 6, 1);
    // The one seed is a master (the first three are), with a replica.
    let gw = Gateway::builder()
        .args(&["--redis-cluster", &addrs[0], "--heartbeat-secs", "0.5"])
        .start();
    let mut data =
        redis::cluster::ClusterClient::new(nodes[1..].iter().map(|n| n.url()).collect::<Vec<_>>())
            .unwrap()
            .get_connection()
            .unwrap();
    grant(&mut data, "u1", &["D1"]);
    grant(&mut data, "u2", &["D2"]);
    let mut s = stream(&gw, "u1", &["D1"]);
    let mut got = Vec::new();
    publish(&mut nodes[1].con(), "D1", 1);
    read_until(&mut s, &mut got, 1, T);

    // The seed dies; its replica takes its slots over. The gateway goes on
    // through the nodes the cluster named, never the seed again.
    nodes[0].kill();
    let seed_port = format!(":{}@", nodes[0].port);
    let healed = wait_until(Duration::from_secs(15), || {
        let view: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut nodes[1].con())
            .unwrap_or_default();
        // Slot 0, the seed's, served by another master.
        view.lines().any(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            f.len() > 8
                && !f[1].contains(&seed_port)
                && f[2].contains("master")
                && !f[2].contains("fail")
                && f[8..].iter().any(|r| r.starts_with("0-"))
        })
    });
    assert!(healed, "the seed's replica did not take over");
    let since = Instant::now();
    let mut con = nodes[1].con();
    let mut n = 100;
    while !got.iter().any(|g| matches!(g, Got::N(m) if *m > 100)) {
        n += 1;
        assert!(
            since.elapsed() < T,
            "no delivery within {T:?} of the takeover; got {got:?}:\n{}",
            gw.log()
        );
        publish(&mut con, "D1", n);
        if let Some(f) = s.next_event(Duration::from_millis(100)) {
            if f.is_system("replay-gap") {
                got.push(Got::Gap);
            } else if f.event.as_deref() == Some("realtime-update") {
                got.push(Got::N(f.json()["data"]["n"].as_u64().expect("n")));
            }
        }
    }
    for m in n + 1..=n + 5 {
        publish(&mut con, "D1", m);
    }
    read_until(&mut s, &mut got, n + 5, T);
    assert_no_silent_loss(&got);
    // Tickets and new streams work again too (each worker's link to the
    // dead node fails once: 503, then 200).
    let token = gw.token("u2", None);
    let mut s2 = None;
    let opened = wait_until(T, || {
        let (status, v) = gw.ticket(&token, r#"{"purpose":"data"}"#);
        let ticket = v["ticket"].as_str().unwrap_or_default();
        s2 = (status == 200)
            .then(|| SseStream::open(gw.addr(), &data_path(ticket, &["D2"]), &[]).ok())
            .flatten();
        s2.is_some()
    });
    assert!(opened, "no new stream within {T:?}:\n{}", gw.log());
    let mut s2 = s2.expect("opened");
    publish(&mut con, "D2", 7);
    expect_n(&mut s2, 7, T);
    let health = get(gw.addr(), "/health", &[]);
    assert_eq!(health.status, 200, "{}", health.text());
}

/// Takes `device` away from `user` and announces it through `node`: the
/// user's stream `s` (which names it) is revoked.
fn take_away(
    data: &mut redis::cluster::ClusterConnection,
    node: &Server,
    user: &str,
    device: &str,
    s: &mut SseStream,
) {
    redis::cmd("SREM")
        .arg(format!("user:{user}:devices"))
        .arg(device)
        .query::<()>(data)
        .unwrap();
    redis::cmd("PUBLISH")
        .arg("sse:access-changed")
        .arg(user)
        .query::<()>(&mut node.con())
        .unwrap();
    assert!(s.next_event(T).is_some_and(|f| f.is_system("revoked")));
}
