//! Test harness for the black-box tests of `sse-gateway`.
//!
//! Everything here talks to real processes over loopback and is bounded in
//! time: no helper can block for longer than the timeout it is given (or a
//! documented default), so no test can hang.
//!
//! - [`Redis`]: a private `redis-server` on a free port, killed on drop.
//! - [`Gateway`] / [`GatewayBuilder`]: the gateway binary on a free port,
//!   its stderr collected (printed when the test panics), SIGKILLed on drop.
//! - [`request`], [`get`], [`post`], [`delete`], [`send_raw`]: a tiny raw
//!   HTTP/1.1 client, one connection per request.
//! - [`SseStream`] / [`Frame`]: an incremental `text/event-stream` reader.
//! - [`wait_until`], [`free_port`], [`metric_sum`], [`is_iso_ms`],
//!   [`iso_to_ms`], [`now_ms`]: small utilities.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/sse/stream` for `devices` with `ticket`.
pub fn data_path(ticket: &str, devices: &[&str]) -> String {
    let list: Vec<String> = devices.iter().map(|d| enc(d)).collect();
    format!("/sse/stream?ticket={ticket}&deviceIds={}", list.join(","))
}

/// `/sse/alerts` with `ticket`.
pub fn alerts_path(ticket: &str) -> String {
    format!("/sse/alerts?ticket={ticket}")
}

/// A data stream of `user` (granted `devices` in Redis) on `devices`.
pub fn data_stream(redis: &Redis, gw: &Gateway, user: &str, devices: &[&str]) -> SseStream {
    redis.grant(user, devices);
    let (ticket, _) = gw.ticket_for(user, r#"{"purpose":"data"}"#);
    SseStream::must_open(gw.addr(), &data_path(&ticket, devices), &[])
}

/// What /proc says of a process: open descriptors, resident memory (KiB)
/// and CPU time used (clock ticks, utime + stime).
pub fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub fn proc_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Default bound of one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The access-token secret every [`Gateway`] gets unless told otherwise.
pub const SECRET: &str = "test-jwt-secret";

// ----- utilities -------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port that was free a moment ago (bind :0, read, drop). Never
/// hands out the same port twice in one test process.
pub fn free_port() -> u16 {
    static USED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let used = USED.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if used.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free port found");
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whether `s` is `YYYY-MM-DDTHH:MM:SS.mmmZ` (ISO 8601, UTC, milliseconds).
pub fn is_iso_ms(s: &str) -> bool {
    iso_to_ms(s).is_some()
}

/// Parses `YYYY-MM-DDTHH:MM:SS.mmmZ` into epoch milliseconds.
pub fn iso_to_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 24 {
        return None;
    }
    let shape = b"dddd-dd-ddTdd:dd:dd.dddZ";
    for (c, want) in b.iter().zip(shape) {
        let ok = if *want == b'd' {
            c.is_ascii_digit()
        } else {
            c == want
        };
        if !ok {
            return None;
        }
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, sec, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let total = ((days * 24 + h) * 60 + mi) * 60 + sec;
    u64::try_from(total * 1000 + ms).ok()
}

/// Sum of the Prometheus samples whose metric name satisfies `name` and whose
/// label set contains every one of `labels` (each written `key="value"`).
/// Matching by predicate keeps tests independent of exact metric names,
/// which the contract does not fix.
pub fn metric_sum(text: &str, name: impl Fn(&str) -> bool, labels: &[&str]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if !name(metric) || !labels.iter().all(|l| label_text.contains(l)) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            sum += v;
        }
    }
    sum
}

// ----- Redis -----------------------------------------------------------------

/// A private `redis-server` on a free loopback port; SIGKILLed (by its own
/// PID) on drop.
pub struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server and waits (at most 5 s) until it answers PING.
    pub fn start() -> Redis {
        for _ in 0..3 {
            let mut r = Redis {
                port: free_port(),
                child: None,
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn /usr/bin/redis-server");
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(5), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return true; // exited: stop waiting, reported below
            }
            self.ping()
        });
        if up && self.ping() {
            return true;
        }
        self.kill();
        false
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut con)
            .is_ok_and(|p| p == "PONG")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A fresh connection with 5 s I/O timeouts.
    pub fn con(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("redis url");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connect to test redis");
        con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        con.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        con
    }

    /// Kills the server (an outage); [`Redis::restart`] brings it back.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Freezes the server (SIGSTOP): it holds connections but answers
    /// nothing until [`Redis::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("redis is running").id();
        // SAFETY: kill(2) on the PID of our own child process.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Starts the server again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        let ok = self.spawn();
        assert!(ok, "redis-server did not restart on port {}", self.port);
    }

    /// `PUBLISH channel payload`; returns the number of receivers.
    pub fn publish(&self, channel: &str, payload: &str) -> u64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.con())
            .expect("PUBLISH")
    }

    /// `SADD user:<user>:devices <devices...>`.
    pub fn grant(&self, user: &str, devices: &[&str]) {
        redis::cmd("SADD")
            .arg(format!("user:{user}:devices"))
            .arg(devices)
            .query::<()>(&mut self.con())
            .expect("SADD");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ----- Gateway ---------------------------------------------------------------

/// How to start a [`Gateway`]. Defaults: `--listen 127.0.0.1:<free port>`,
/// `--jwt-secret` [`SECRET`], `--workers 2`, embedded mode, an empty
/// environment (nothing leaks in from the caller's `SSE_*` variables).
pub struct GatewayBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    secret: String,
    wait_healthy: bool,
    max_open_files: Option<u64>,
    jwt_secret: bool,
}

impl GatewayBuilder {
    /// No `--jwt-secret` (access tokens from public keys, a secret file, or
    /// `--demo`'s own).
    pub fn no_jwt_secret(mut self) -> Self {
        self.jwt_secret = false;
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_owned());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Redis mode on `redis`.
    pub fn redis(self, redis: &Redis) -> Self {
        let url = redis.url();
        self.args(&["--redis-url", &url])
    }

    /// The access-token secret (also passed as `--jwt-secret`).
    pub fn secret(mut self, s: &str) -> Self {
        self.secret = s.to_owned();
        self
    }

    /// Starts the gateway with RLIMIT_NOFILE = `n` (descriptor exhaustion).
    pub fn max_open_files(mut self, n: u64) -> Self {
        self.max_open_files = Some(n);
        self
    }

    /// Ready as soon as `/health` answers at all, not only with 200 (for a
    /// gateway started while Redis is down).
    pub fn any_health(mut self) -> Self {
        self.wait_healthy = false;
        self
    }

    /// Spawns the gateway and waits (at most 10 s) until `GET /health`
    /// answers 200 (in Redis mode that means the subscriber is subscribed).
    pub fn start(self) -> Gateway {
        let has = |flag: &str| self.args.iter().any(|a| a == flag);
        // An explicit --listen (a shared port) is where the gateway answers.
        let given = self
            .args
            .iter()
            .position(|a| a == "--listen")
            .and_then(|i| self.args.get(i + 1));
        let addr: SocketAddr = match given {
            Some(a) => a.parse().expect("--listen takes an address"),
            None => format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        cmd.env_clear().env("RUST_BACKTRACE", "1");
        if !has("--listen") {
            cmd.args(["--listen", &addr.to_string()]);
        }
        if self.jwt_secret && !has("--jwt-secret") {
            cmd.args(["--jwt-secret", &self.secret]);
        }
        if !has("--workers") {
            cmd.args(["--workers", "2"]);
        }
        cmd.args(&self.args);
        if let Some(n) = self.max_open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sse-gateway");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut gw = Gateway {
            addr,
            secret: self.secret,
            child,
            log,
        };
        let want_ok = self.wait_healthy;
        let ready = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(_)) = gw.child.try_wait() {
                return true;
            }
            try_request(
                addr,
                b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                Duration::from_secs(1),
            )
            .is_ok_and(|r| !want_ok || r.status == 200)
        });
        if let Ok(Some(status)) = gw.child.try_wait() {
            panic!("gateway exited at start ({status}):\n{}", gw.log());
        }
        assert!(ready, "gateway not healthy within 10 s:\n{}", gw.log());
        gw
    }
}

/// A running `sse-gateway`; SIGKILLed by PID on drop. When the test is
/// panicking, its log is printed on drop.
pub struct Gateway {
    addr: SocketAddr,
    secret: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            args: Vec::new(),
            env: Vec::new(),
            secret: SECRET.to_owned(),
            wait_healthy: true,
            max_open_files: None,
            jwt_secret: true,
        }
    }

    /// `builder().args(args)` with `env`, started.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut b = Gateway::builder().args(args);
        for (k, v) in env {
            b = b.env(k, v);
        }
        b.start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the gateway wrote on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// An access token (HS256 with this gateway's jwt secret), valid 1 h.
    pub fn token(&self, sub: &str, role: Option<&str>) -> String {
        sse_gateway::auth::token::TokenKey::new(self.secret.as_bytes()).mint(sub, role, 3600)
    }

    /// `POST /sse/stream-ticket` with `Authorization: Bearer <token>` and
    /// `body` (empty: no body): the status and the JSON body (Null if none).
    pub fn ticket(&self, token: &str, body: &str) -> (u16, Value) {
        let auth = format!("Bearer {token}");
        let r = post(
            self.addr,
            "/sse/stream-ticket",
            &[("Authorization", &auth)],
            body,
        );
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// A ticket for `sub` (role none) with `body`; panics unless 200. Returns
    /// (ticket, ticketId).
    pub fn ticket_for(&self, sub: &str, body: &str) -> (String, String) {
        self.ticket_with(&self.token(sub, None), body)
    }

    /// A ticket for `token`; panics unless 200. Returns (ticket, ticketId).
    pub fn ticket_with(&self, token: &str, body: &str) -> (String, String) {
        let (status, v) = self.ticket(token, body);
        assert_eq!(status, 200, "ticket refused: {v}\n{}", self.log());
        (
            v["ticket"].as_str().unwrap().to_owned(),
            v["ticketId"].as_str().unwrap().to_owned(),
        )
    }

    /// `GET /metrics` body.
    pub fn metrics(&self) -> String {
        let r = get(self.addr, "/metrics", &[]);
        assert_eq!(r.status, 200);
        r.text()
    }

    /// Sends SIGTERM (by PID).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {} failed", self.child.id());
    }

    /// The exit status, if the process exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            // Give the reader thread a moment to collect the last lines.
            thread::sleep(Duration::from_millis(50));
            eprintln!("----- gateway log ({}) -----\n{}", self.addr, self.log());
        }
    }
}

/// Runs the gateway binary to completion with `args` and an empty
/// environment plus `env`; kills it after `timeout`. Returns (exit status or
/// None when killed, stdout, stderr).
pub fn run_cli(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sse-gateway");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    (code, t_out.join().unwrap(), t_err.join().unwrap())
}

// ----- HTTP client -----------------------------------------------------------

/// A parsed HTTP response. Header names are lowercased.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The whole status line, without CRLF.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Reads one response head from `stream` into `buf` (which may already hold
/// bytes); returns the parsed head and the offset where the body starts.
fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<(Response, usize)> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default().to_owned();
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad status line {status_line:?}"),
                    )
                })?;
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let r = Response {
                status,
                status_line,
                headers,
                body: Vec::new(),
            };
            return Ok((r, end + 4));
        }
        if read_some(stream, buf, deadline)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a complete head: {:?}",
                    String::from_utf8_lossy(buf)
                ),
            ));
        }
    }
}

/// One read bounded by `deadline`; Ok(0) at end of stream, TimedOut after it.
fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"))
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(read_some(stream, buf, deadline)?),
        Err(e) => Err(e),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `raw` on a new connection and reads one response: the body by
/// Content-Length, none for 204/304/HEAD-less cases, else until close.
pub fn try_request(addr: SocketAddr, raw: &[u8], timeout: Duration) -> io::Result<Response> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(addr, timeout)?;
    s.write_all(raw)?;
    let mut buf = Vec::new();
    let (mut r, start) = read_head(&mut s, &mut buf, deadline)?;
    let head_request = raw.starts_with(b"HEAD ");
    match r.header("content-length").map(|v| v.parse::<usize>()) {
        Some(Ok(n)) if !head_request => {
            while buf.len() < start + n {
                if read_some(&mut s, &mut buf, deadline)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
            }
            r.body = buf[start..start + n].to_vec();
        }
        Some(Err(_)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad Content-Length",
            ))
        }
        _ if head_request
            || r.status == 204
            || r.status == 304
            || (100..200).contains(&r.status) => {}
        _ => {
            while read_some(&mut s, &mut buf, deadline)? > 0 {}
            r.body = buf[start..].to_vec();
        }
    }
    Ok(r)
}

/// [`try_request`] with [`HTTP_TIMEOUT`]; panics on I/O errors.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    try_request(addr, raw, HTTP_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "request to {addr} failed: {e}\nrequest: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        )
    })
}

/// The bytes of a request: `Host` and `Connection: close` added, and
/// `Content-Length` (plus `Content-Type: application/json` unless given)
/// when `body` is not empty.
pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, &build_request("GET", path, headers, ""))
}

pub fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    request(addr, &build_request("POST", path, headers, body))
}

pub fn delete(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, &build_request("DELETE", path, headers, ""))
}

/// What a raw exchange produced.
#[derive(Debug)]
pub struct Raw {
    /// Everything read.
    pub bytes: Vec<u8>,
    /// Whether the server closed (EOF or reset) within the timeout.
    pub closed: bool,
}

impl Raw {
    /// The first response in `bytes`, if its head is complete.
    pub fn response(&self) -> Option<Response> {
        let end = find(&self.bytes, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?.to_owned();
        let status = status_line.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = &self.bytes[end + 4..];
        let n = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(rest.len())
            .min(rest.len());
        Some(Response {
            status,
            status_line,
            headers,
            body: rest[..n].to_vec(),
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Hostile input: writes `bytes` (write errors, such as a reset by a server
/// that already answered, are ignored), then reads until the server closes or
/// `timeout` passes.
pub fn send_raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Raw {
    let deadline = Instant::now() + timeout;
    let mut s = connect(addr, timeout).expect("connect");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let closed = loop {
        match read_some(&mut s, &mut out, deadline) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break false,
            Err(_) => break true,
        }
    };
    Raw { bytes: out, closed }
}

// ----- SSE -------------------------------------------------------------------

/// One `text/event-stream` block, up to and including its blank line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    /// The `data` lines joined with `\n` (empty when there were none).
    pub data: String,
    pub retry: Option<u64>,
    /// Whether the block held a comment line (`:`...).
    pub comment: bool,
    /// The exact bytes of the block, blank line included.
    pub raw: String,
}

impl Frame {
    /// `data` as JSON; panics (showing the frame) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("frame data is not JSON ({e}): {:?}", self.raw))
    }

    /// Whether this is an `event: system` with `"kind": kind`.
    pub fn is_system(&self, kind: &str) -> bool {
        self.event.as_deref() == Some("system")
            && serde_json::from_str::<Value>(&self.data)
                .is_ok_and(|v| v["kind"].as_str() == Some(kind))
    }

    pub fn is_heartbeat(&self) -> bool {
        self.is_system("heartbeat")
    }

    /// A block that dispatches nothing: no event and no data (preamble,
    /// comments, retry-only).
    pub fn is_control(&self) -> bool {
        self.event.is_none() && self.data.is_empty()
    }
}

/// Parses the first complete block of `buf`; returns it and its length.
/// Lines end with CRLF, LF or CR; a CR at the very end of `buf` waits for
/// more bytes unless `eof`.
pub fn parse_frame(buf: &[u8], eof: bool) -> Option<(Frame, usize)> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let nl = rest.iter().position(|b| *b == b'\n' || *b == b'\r')?;
        let mut next = pos + nl + 1;
        if rest[nl] == b'\r' {
            match buf.get(next) {
                Some(b'\n') => next += 1,
                None if !eof => return None,
                _ => {}
            }
        }
        let line = &rest[..nl];
        pos = next;
        if line.is_empty() {
            if lines.is_empty() {
                // A stray blank line dispatches nothing; keep it in the block
                // that follows so raw bytes are never lost.
                continue;
            }
            break;
        }
        lines.push(line);
    }
    let mut f = Frame {
        id: None,
        event: None,
        data: String::new(),
        retry: None,
        comment: false,
        raw: String::from_utf8_lossy(&buf[..pos]).into_owned(),
    };
    let mut data_lines: Vec<String> = Vec::new();
    for line in lines {
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            f.comment = true;
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((k, v)) => (k.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
            None => (line.into_owned(), String::new()),
        };
        match field.as_str() {
            "data" => data_lines.push(value),
            "event" => f.event = Some(value),
            "id" if !value.contains('\0') => f.id = Some(value),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                f.retry = value.parse().ok()
            }
            _ => {}
        }
    }
    f.data = data_lines.join("\n");
    Some((f, pos))
}

/// An open event stream over a raw socket.
pub struct SseStream {
    stream: TcpStream,
    head: Response,
    /// Every body byte received so far.
    raw: Vec<u8>,
    /// Offset in `raw` of the first byte not yet returned as a frame.
    pos: usize,
    closed: bool,
}

impl SseStream {
    /// `GET path_and_query` with `Accept: text/event-stream` and
    /// `extra_headers`. Ok when the answer is 200; else Err with the complete
    /// (refusal) response. Panics on I/O errors or when no head arrives
    /// within [`HTTP_TIMEOUT`].
    pub fn open(
        addr: SocketAddr,
        path_and_query: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<SseStream, Response> {
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
        );
        for (n, v) in extra_headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let deadline = Instant::now() + HTTP_TIMEOUT;
        let mut stream = connect(addr, HTTP_TIMEOUT).expect("connect");
        stream
            .write_all(req.as_bytes())
            .expect("send stream request");
        let mut buf = Vec::new();
        let (mut head, start) = read_head(&mut stream, &mut buf, deadline)
            .unwrap_or_else(|e| panic!("no response head for {path_and_query}: {e}"));
        if head.status != 200 {
            if let Some(Ok(n)) = head.header("content-length").map(|v| v.parse::<usize>()) {
                while buf.len() < start + n {
                    match read_some(&mut stream, &mut buf, deadline) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                head.body = buf[start..(start + n).min(buf.len())].to_vec();
            }
            return Err(head);
        }
        Ok(SseStream {
            stream,
            head,
            raw: buf[start..].to_vec(),
            pos: 0,
            closed: false,
        })
    }

    /// [`SseStream::open`], panicking (with the refusal) unless 200.
    pub fn must_open(
        addr: SocketAddr,
        path_and_query: &str,
        extra_headers: &[(&str, &str)],
    ) -> SseStream {
        match SseStream::open(addr, path_and_query, extra_headers) {
            Ok(s) => s,
            Err(r) => panic!("stream {path_and_query} refused: {} {}", r.status, r.text()),
        }
    }

    /// The response head (status line and lowercased headers).
    pub fn head(&self) -> &Response {
        &self.head
    }

    /// Every body byte received so far.
    pub fn raw_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Whether the server closed the stream (as far as has been read).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// One read into the buffer, bounded by `deadline`; false when nothing
    /// more can arrive before it (timeout or close).
    fn fill(&mut self, deadline: Instant) -> bool {
        if self.closed {
            return false;
        }
        match read_some(&mut self.stream, &mut self.raw, deadline) {
            Ok(0) => {
                self.closed = true;
                false
            }
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => false,
            Err(_) => {
                self.closed = true;
                false
            }
        }
    }

    /// The next block (any kind), or None when none completes within
    /// `timeout` or the stream closed.
    pub fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((f, n)) = parse_frame(&self.raw[self.pos..], self.closed) {
                self.pos += n;
                return Some(f);
            }
            if !self.fill(deadline) {
                // One last look: the close may complete a CR-ended block.
                if let Some((f, n)) = parse_frame(&self.raw[self.pos..], self.closed) {
                    self.pos += n;
                    return Some(f);
                }
                return None;
            }
        }
    }

    /// The next frame that is an event, skipping control blocks (preamble,
    /// comments) and heartbeats; None on timeout or close.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.next_frame(left)?;
            if !f.is_control() && !f.is_heartbeat() {
                return Some(f);
            }
        }
    }

    /// The next event (see [`SseStream::next_event`]), which must be called
    /// `name`; panics otherwise, showing what arrived.
    pub fn expect_event(&mut self, name: &str, timeout: Duration) -> Frame {
        match self.next_event(timeout) {
            Some(f) if f.event.as_deref() == Some(name) => f,
            Some(f) => panic!("expected event {name:?}, got {:?}", f.raw),
            None => panic!(
                "no {name:?} event within {timeout:?} (closed: {}); unparsed: {:?}",
                self.closed,
                String::from_utf8_lossy(&self.raw[self.pos..])
            ),
        }
    }

    /// Panics if an event (other than heartbeats) arrives within `timeout`.
    pub fn expect_no_event(&mut self, timeout: Duration) {
        if let Some(f) = self.next_event(timeout) {
            panic!("expected no event, got {:?}", f.raw);
        }
    }

    /// Whether the server closes the stream within `timeout` (reading and
    /// keeping whatever arrives meanwhile).
    pub fn is_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.closed && Instant::now() < deadline {
            self.fill(deadline);
        }
        self.closed
    }
}
