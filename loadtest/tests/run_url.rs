//! `loadtest run --url` against servers it did not start: the release
//! gateway on its own redis-server (tickets, events by Redis `PUBLISH` and by
//! `POST /sse/publish`), and nginx + nchan started by `loadtest serve nchan`
//! (no tickets, events POSTed to nchan's publisher). Each run must deliver
//! every event to every stream exactly once, and write the report.
//!
//! Ignored by default: they need `cargo build --release -p sse-gateway
//! -p sse-loadtest`, redis-server and libnginx-mod-nchan; `scripts/test`
//! installs those and runs them with
//! `cargo test --release -p sse-loadtest --test run_url -- --ignored`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sse_testkit::{Gateway, Redis, SECRET};

fn loadtest() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadtest"));
    cmd.current_dir(repo_root());
    cmd
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lt-run-url-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `loadtest run` with `args` (bounded), then returns the step of
/// `section` from the JSON report, with its run's opening.
fn run(args: &[&str], json: &Path, section: &str) -> (Value, Value) {
    let mut child = loadtest()
        .arg("run")
        .args(args)
        .arg("--section")
        .arg(section)
        .arg("--json")
        .arg(json)
        .arg("--out")
        .arg(json.with_file_name("RESULTS.md"))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn loadtest run");
    let status = wait(&mut child, Duration::from_secs(180)).expect("loadtest run within 180 s");
    assert!(status.success(), "loadtest run {args:?} failed: {status}");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("results.json")).expect("json");
    let runs = doc["runs"].as_array().expect("runs");
    let r = runs
        .iter()
        .find(|r| r["section"] == section)
        .unwrap_or_else(|| panic!("section {section} in {doc}"));
    let fanout = &r["fanout"][0];
    (fanout["steps"][0].clone(), fanout["open"].clone())
}

/// Waits for `child` at most `limit`; kills it (by its PID) after that.
fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every run's size: 200 streams over 20 devices, 200 events/s for 2 s.
const LOAD: [&str; 8] = [
    "--streams",
    "200",
    "--devices",
    "20",
    "--rate",
    "200",
    "--secs",
    "2",
];

/// The smaller runs' size: 100 streams over 10 devices, 100 events/s for 1 s.
const SMALL: [&str; 8] = [
    "--streams",
    "100",
    "--devices",
    "10",
    "--rate",
    "100",
    "--secs",
    "1",
];

/// The arguments of a run that gets tickets from the gateway at `url`.
fn with_tickets(url: &str) -> Vec<&str> {
    vec![
        "--url",
        url,
        "--ticket-url",
        "/sse/stream-ticket",
        "--jwt-secret",
        SECRET,
    ]
}

/// Runs `loadtest run` with `args` (bounded), which must fail; its stderr.
fn run_failing(args: &[&str], dir: &Path) -> String {
    let err = dir.join("failing.err");
    let mut child = loadtest()
        .arg("run")
        .args(args)
        .arg("--json")
        .arg(dir.join("failing.json"))
        .arg("--out")
        .arg(dir.join("FAILING.md"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn loadtest run");
    let status = wait(&mut child, Duration::from_secs(120)).expect("loadtest run within 120 s");
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        !status.success(),
        "loadtest run {args:?} succeeded:\n{stderr}"
    );
    stderr
}

fn assert_exactly_once(step: &Value, open: &Value, streams: u64) {
    assert_eq!(open["opened"], streams, "opened: {open}");
    assert_eq!(step["lost"], 0, "lost: {step}");
    assert_eq!(step["dups"], 0, "duplicated: {step}");
    assert!(
        step["sent"].as_u64().unwrap_or(0) > 0,
        "nothing sent: {step}"
    );
    assert_eq!(step["delivered"], step["expected"], "{step}");
    assert_eq!(step["closed_by_server"], 0, "{step}");
}

#[test]
#[ignore = "needs target/release/sse-gateway and redis-server"]
fn run_url_against_a_running_gateway_delivers_every_event_once() {
    let redis = Redis::start();
    let gateway = Gateway::builder()
        .redis(&redis)
        .args(&["--max-conns-per-ip", "1000000", "--heartbeat-secs", "1"])
        .start();
    let url = format!("http://{}", gateway.addr());
    let pid = gateway.pid().to_string();
    let dir = scratch("gateway");
    let json = dir.join("results.json");
    let mut common = with_tickets(&url);
    common.extend(["--pid", &pid, "--strict"]);
    // Users who own their device (ownership sets seeded), events by PUBLISH.
    let redis_url = redis.url();
    let mut args = [&common[..], &LOAD[..]].concat();
    args.extend(["--grant-redis", &redis_url, "--publish-redis", &redis_url]);
    let (step, open) = run(&args, &json, "redis");
    assert_exactly_once(&step, &open, 200);
    assert!(
        step["server_rss_kib"].as_u64().unwrap_or(0) > 0,
        "--pid measured: {step}"
    );
    // Admin users, events by POST /sse/publish (an admin bearer minted too).
    let mut args = [&common[..], &LOAD[..]].concat();
    args.extend(["--role", "admin", "--publish-url", "/sse/publish"]);
    let (step, open) = run(&args, &json, "http");
    assert_exactly_once(&step, &open, 200);
    let md = std::fs::read_to_string(dir.join("RESULTS.md")).expect("RESULTS.md");
    assert!(md.contains("## redis") && md.contains("## http"), "{md}");
    assert!(md.contains("opens/s"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `loadtest serve nchan`, read its one JSON line; ended by closing stdin.
struct Served {
    child: Child,
    info: Value,
}

impl Served {
    fn start(server: &str) -> Served {
        let conf = repo_root().join("loadtest/peers/nchan.conf");
        let mut child = loadtest()
            .args(["serve", server, "--secs", "600", "--nchan-conf"])
            .arg(conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn loadtest serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Ok(info) = serde_json::from_str::<Value>(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadtest serve {server} said {line:?} (libnginx-mod-nchan installed?)");
        };
        Served { child, info }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if wait(&mut self.child, Duration::from_secs(20)).is_none() {
            eprintln!("loadtest serve did not stop on EOF; killed");
        }
    }
}

#[test]
#[ignore = "needs the release loadtest, redis-server and libnginx-mod-nchan"]
fn run_url_against_nchan_delivers_every_event_once() {
    let served = Served::start("nchan");
    let url = served.info["url"].as_str().expect("url").to_owned();
    let pids: Vec<String> = served.info["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .map(|p| p.to_string())
        .collect();
    let pids = pids.join(",");
    let dir = scratch("nchan");
    let json = dir.join("results.json");
    let args = [
        "--url",
        &url,
        "--stream-path",
        "/sub?deviceId={device}",
        "--publish-url",
        "/pub?id={device}",
        "--pid",
        &pids,
        "--strict",
    ];
    let (step, open) = run(&[&args[..], &LOAD[..]].concat(), &json, "nchan");
    assert_exactly_once(&step, &open, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs target/release/sse-gateway and redis-server"]
fn run_url_logs_in_to_a_redis_database_and_reaches_a_server_over_ipv6() {
    // A Redis with a password, the gateway on its database 2, and the
    // gateway on [::1] (not 127.0.0.0/8: no source address of the
    // harness's own can be bound for it).
    let redis = Redis::start();
    redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "lt-pw"])
        .query::<()>(&mut redis.con())
        .expect("requirepass");
    let redis_url = format!("redis://:lt-pw@127.0.0.1:{}/2", redis.port());
    // A machine without IPv6 loopback still checks the login, on 127.0.0.1.
    let host = match std::net::TcpListener::bind("[::1]:0") {
        Ok(_) => "[::1]",
        Err(e) => {
            eprintln!("no IPv6 loopback ({e}): the server stays on 127.0.0.1");
            "127.0.0.1"
        }
    };
    let listen = format!("{host}:{}", sse_testkit::free_port());
    let gateway = Gateway::builder()
        .args(&["--redis-url", &redis_url, "--listen", &listen])
        .args(&["--max-conns-per-ip", "1000000", "--heartbeat-secs", "1"])
        .start();
    let url = format!("http://{listen}");
    let dir = scratch("login");
    let json = dir.join("results.json");
    // Ownership granted in database 2 (the gateway's), events published
    // after AUTH: every stream opens and gets every event.
    let mut args = [&with_tickets(&url)[..], &SMALL[..]].concat();
    args.extend(["--grant-redis", &redis_url, "--publish-redis", &redis_url]);
    args.push("--strict");
    let (step, open) = run(&args, &json, "login");
    assert_exactly_once(&step, &open, 100);
    // Without the password the harness stops before opening, naming Redis's refusal.
    let no_login = format!("redis://127.0.0.1:{}/2", redis.port());
    let mut args = [&with_tickets(&url)[..], &SMALL[..]].concat();
    args.extend(["--grant-redis", &no_login, "--publish-redis", &no_login]);
    let stderr = run_failing(&args, &dir);
    assert!(stderr.contains("NOAUTH"), "{stderr}");
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `openssl` with `args` in `dir` (bounded to 30 s); it must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let mut child = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn openssl");
    let status = wait(&mut child, Duration::from_secs(30)).expect("openssl within 30 s");
    assert!(status.success(), "openssl {args:?}: {status}");
}

/// nginx terminating TLS in front of `upstream` on a free loopback port,
/// with a certificate for `localhost` from a fresh CA of its own (both made
/// by openssl, in `dir`); one process, SIGKILLed by its PID on drop.
struct TlsProxy {
    child: Child,
    port: u16,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
}

impl TlsProxy {
    fn start(upstream: std::net::SocketAddr, dir: &Path) -> TlsProxy {
        let p256 = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let ca = [
            &["req", "-x509", "-days", "1", "-subj", "/CN=loadtest CA"][..],
            &p256,
        ]
        .concat();
        openssl(
            dir,
            &[&ca[..], &["-keyout", "ca.key", "-out", "ca.pem"]].concat(),
        );
        let csr = [&["req", "-subj", "/CN=localhost"][..], &p256].concat();
        openssl(
            dir,
            &[&csr[..], &["-keyout", "key.pem", "-out", "cert.csr"]].concat(),
        );
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("san.ext");
        let sign = [
            "x509", "-req", "-in", "cert.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        ];
        let rest = [
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "cert.pem",
        ];
        openssl(dir, &[&sign[..], &rest[..]].concat());
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let port = sse_testkit::free_port();
        let d = dir.display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{
      proxy_pass http://{upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
      proxy_read_timeout 1h;
    }}
  }}
}}
",
            cert = cert.display(),
            key = key.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|n| Path::new(n).exists())
            .unwrap_or("nginx");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx (apt-get install nginx)");
        let up = sse_testkit::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let proxy = TlsProxy {
            child,
            port,
            ca: dir.join("ca.pem"),
        };
        assert!(
            up,
            "nginx did not listen on {port}: {:?}",
            std::fs::read_to_string(dir.join("error.log"))
        );
        proxy
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs target/release/sse-gateway, redis-server, nginx and openssl"]
fn run_url_over_https_checks_the_certificate_and_delivers_every_event_once() {
    let redis = Redis::start();
    let gateway = Gateway::builder()
        .redis(&redis)
        .args(&["--max-conns-per-ip", "1000000", "--heartbeat-secs", "1"])
        .start();
    let dir = scratch("https");
    let proxy = TlsProxy::start(gateway.addr(), &dir);
    let url = format!("https://localhost:{}", proxy.port);
    let redis_url = redis.url();
    let json = dir.join("results.json");
    let mut common = with_tickets(&url);
    common.extend(["--grant-redis", &redis_url, "--publish-redis", &redis_url]);
    common.push("--strict");
    // The server's CA given: every stream opens over TLS and gets every event.
    let ca = proxy.ca.display().to_string();
    let mut args = [&common[..], &SMALL[..]].concat();
    args.extend(["--ca-file", &ca]);
    let (step, open) = run(&args, &json, "https");
    assert_exactly_once(&step, &open, 100);
    // Taken on trust with --insecure: the same.
    let mut args = [&common[..], &SMALL[..]].concat();
    args.push("--insecure");
    let (step, open) = run(&args, &json, "https-insecure");
    assert_exactly_once(&step, &open, 100);
    // Admin streams, events POSTed to /sse/publish over TLS as well.
    let mut args = [&with_tickets(&url)[..], &SMALL[..]].concat();
    args.extend(["--role", "admin", "--publish-url", "/sse/publish"]);
    args.extend(["--ca-file", &ca, "--strict"]);
    let (step, open) = run(&args, &json, "https-post");
    assert_exactly_once(&step, &open, 100);
    // Neither: the certificate is refused and no stream opens.
    let stderr = run_failing(&[&common[..], &SMALL[..]].concat(), &dir);
    assert!(stderr.contains("tls (invalid peer certificate"), "{stderr}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs target/release/sse-gateway and redis-server"]
fn run_url_connects_from_the_given_source_addresses_in_turn() {
    let redis = Redis::start();
    // 60 streams per address: 100 streams fit on two addresses, not on one.
    let gateway = Gateway::builder()
        .redis(&redis)
        .args(&["--max-conns-per-ip", "60", "--max-requests-per-ip", "1000"])
        .start();
    let url = format!("http://{}", gateway.addr());
    let redis_url = redis.url();
    let dir = scratch("sources");
    let json = dir.join("results.json");
    let mut common = with_tickets(&url);
    common.extend(["--grant-redis", &redis_url, "--publish-redis", &redis_url]);
    common.extend(["--attempts", "1"]);
    let mut args = [&common[..], &SMALL[..]].concat();
    args.extend(["--source", "127.0.0.2,127.0.0.3", "--strict"]);
    let (step, open) = run(&args, &json, "two-sources");
    assert_exactly_once(&step, &open, 100);
    // One address: the gateway's per-address limit refuses the rest.
    let mut args = [&common[..], &SMALL[..]].concat();
    args.extend(["--source", "127.0.0.4"]);
    let (_, open) = run(&args, &json, "one-source");
    assert_eq!(open["opened"], 60, "{open}");
    assert!(open.to_string().contains("429"), "{open}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs target/release/sse-gateway and redis-server"]
fn run_url_opens_at_the_rate_asked() {
    let redis = Redis::start();
    let gateway = Gateway::builder()
        .redis(&redis)
        .args(&["--max-conns-per-ip", "1000000"])
        .start();
    let url = format!("http://{}", gateway.addr());
    let redis_url = redis.url();
    let dir = scratch("rate");
    let json = dir.join("results.json");
    // 60 opens at 30 a second: the last may start 59 / 30 s after the first.
    let mut args = with_tickets(&url);
    args.extend(["--grant-redis", &redis_url, "--publish-redis", &redis_url]);
    args.extend([
        "--streams",
        "60",
        "--devices",
        "6",
        "--rate",
        "60",
        "--secs",
        "1",
    ]);
    args.extend(["--open-rate", "30", "--strict"]);
    let (step, open) = run(&args, &json, "paced");
    assert_exactly_once(&step, &open, 60);
    let secs = open["secs"].as_f64().unwrap_or(0.0);
    assert!(secs >= 1.9, "60 opens at 30/s took {secs} s: {open}");
    let _ = std::fs::remove_dir_all(&dir);
}
