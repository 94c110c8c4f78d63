//! The servers a run starts and stops: a private `redis-server`, the gateway,
//! the NestJS baseline and the floor server, each on a free loopback port,
//! logging to a file in the run's work directory, and ended by PID when its
//! handle drops.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::floor::FloorPublisher;
use crate::proc;
use crate::resp::{Redis, Value};

pub struct Service {
    pub name: String,
    pub pid: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl Service {
    /// Whether the process is still up (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            proc::stop(self.pid, Duration::from_secs(8));
        }
        let _ = self.child.wait();
    }
}

fn spawn(name: &str, mut cmd: Command, log: PathBuf, port: u16) -> Result<Service, String> {
    let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    proc::die_with_parent(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("start {name}: {e}"))?;
    Ok(Service {
        name: name.to_owned(),
        pid: child.id(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
        child,
    })
}

/// Waits (bounded) until `ready` holds, failing early if the process exits.
fn wait_ready(
    svc: &mut Service,
    limit: Duration,
    ready: impl Fn(SocketAddr) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !svc.running() {
            return Err(format!(
                "{} exited at start:\n{}",
                svc.name,
                svc.log_tail(20)
            ));
        }
        if ready(svc.addr) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "{} not ready within {limit:?}:\n{}",
        svc.name,
        svc.log_tail(20)
    ))
}

pub fn redis(dir: &Path) -> Result<Service, String> {
    let port = proc::free_port()?;
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--maxclients", "1000", "--daemonize", "no", "--dir"])
    .arg(dir);
    let mut svc = spawn("redis-server", cmd, dir.join("redis.log"), port)?;
    wait_ready(&mut svc, Duration::from_secs(10), |a| {
        Redis::connect(a)
            .and_then(|mut r| r.cmd(&["PING"]))
            .is_ok_and(|v| v == Value::Ok("PONG".into()))
    })?;
    Ok(svc)
}

/// What both contract servers are started with.
pub struct ServerConfig<'a> {
    pub redis: SocketAddr,
    pub jwt_secret: &'a str,
    pub heartbeat_secs: f64,
    pub dir: &'a Path,
}

pub fn gateway(bin: &Path, c: &ServerConfig) -> Result<Service, String> {
    let port = proc::free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--redis-url")
        .arg(format!("redis://{}", c.redis))
        .arg("--jwt-secret")
        .arg(c.jwt_secret)
        .arg("--max-conns-per-ip")
        .arg("1000000")
        .arg("--heartbeat-secs")
        .arg(c.heartbeat_secs.to_string());
    let mut svc = spawn("gateway", cmd, c.dir.join("gateway.log"), port)?;
    wait_ready(&mut svc, Duration::from_secs(20), health_up)?;
    Ok(svc)
}

/// Builds the baseline when `dist/` is missing, then starts `node dist/main.js`.
pub fn nestjs(project: &Path, c: &ServerConfig) -> Result<Service, String> {
    if !project.join("dist/main.js").exists() {
        for args in [
            &["ci", "--no-audit", "--no-fund"][..],
            &["run", "build"][..],
        ] {
            eprintln!("  nestjs: npm {}", args.join(" "));
            let status = Command::new("npm")
                .args(args)
                .current_dir(project)
                .status()
                .map_err(|e| format!("npm: {e}"))?;
            if !status.success() {
                return Err(format!("npm {} failed", args.join(" ")));
            }
        }
    }
    let port = proc::free_port()?;
    let mut cmd = Command::new("node");
    cmd.arg("dist/main.js")
        .current_dir(project)
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .env("REDIS_URL", format!("redis://{}", c.redis))
        .env("JWT_SECRET", c.jwt_secret)
        .env("SSE_HEARTBEAT_SECS", c.heartbeat_secs.to_string())
        .env("SSE_MAX_CONNS_PER_IP", "1000000");
    let mut svc = spawn("nestjs", cmd, c.dir.join("nestjs.log"), port)?;
    wait_ready(&mut svc, Duration::from_secs(60), health_up)?;
    Ok(svc)
}

/// The floor server (this binary, `floor-server`), with its control pipes.
pub fn floor(dir: &Path, devices: usize) -> Result<(Service, FloorPublisher), String> {
    let exe = proc::self_exe();
    let port = proc::free_port()?;
    let log = dir.join("floor.log");
    let err = File::create(&log).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["floor-server", &port.to_string(), &devices.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err);
    proc::die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start floor-server: {e}"))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("floor-server pipes missing".into());
    };
    let svc = Service {
        name: "floor".into(),
        pid: child.id(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
        child,
    };
    let control = FloorPublisher::new(stdin, stdout)?;
    Ok((svc, control))
}

fn health_up(addr: SocketAddr) -> bool {
    http_get(addr, "/health").is_ok_and(|(status, body)| status == 200 && body.contains("\"up\""))
}

/// A one-shot `GET` (Connection: close), bounded to 5 s.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    if !addr.ip().is_loopback() {
        return Err("not loopback".into());
    }
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(4 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad response from {path}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
