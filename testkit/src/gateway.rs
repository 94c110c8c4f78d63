//! The gateway binary as a test drives it: [`GatewayBuilder`] starts it on a
//! free loopback port with an empty environment and waits until it is
//! healthy; [`Gateway`] collects its stderr (printed when the test panics),
//! mints access tokens and tickets the way a client would, and SIGKILLs the
//! process (by its PID) on drop. [`run_cli`] runs it to completion.
//!
//! The binary is found at run time ([`gateway_binary`]), since only the
//! gateway's own integration tests see Cargo's `CARGO_BIN_EXE_*` variables.

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::{get, post, try_request};
use crate::probe::{free_port, wait_until};
use crate::redis_server::Redis;
use crate::tokens::access_token;

/// The access-token secret every [`Gateway`] gets unless told otherwise.
pub const SECRET: &str = "test-jwt-secret";

/// The `sse-gateway` binary: `$SSE_GATEWAY_BIN` when set, else the one
/// Cargo built next to the running test (`target/<profile>/sse-gateway`,
/// the test itself being `target/<profile>/deps/<name>-<hash>`).
pub fn gateway_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SSE_GATEWAY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let mut dir = exe.parent().expect("the test's folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("sse-gateway");
    assert!(
        bin.exists(),
        "{} is missing: build it (cargo build -p sse-gateway) or set SSE_GATEWAY_BIN",
        bin.display()
    );
    bin
}

/// Starts `cmd` with no stdin, `stdout`, and stderr piped to the caller.
fn spawn(cmd: &mut Command, stdout: Stdio) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sse-gateway")
}

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
        let mut cmd = Command::new(gateway_binary());
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
        let mut child = spawn(&mut cmd, Stdio::null());
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = thread::spawn(move || {
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
            reader: Some(reader),
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
    /// The thread that copies stderr into `log`; it ends when the process
    /// does (the process holds the pipe's only write end).
    reader: Option<thread::JoinHandle<()>>,
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
        access_token(&self.secret, sub, role, 3600)
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
            // The process is gone: its last lines are in once the reader ends.
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
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
    let mut cmd = Command::new(gateway_binary());
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = spawn(&mut cmd, Stdio::piped());
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
