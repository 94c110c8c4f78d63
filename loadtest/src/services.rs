//! The servers a run starts and stops: a private `redis-server`, the gateway
//! (one process, or several sharing one port with SO_REUSEPORT), the NestJS
//! baseline, the floor server and nginx + nchan, each on a free loopback port,
//! logging to files in the run's work directory, and ended by PID when its
//! handle drops.

use std::fs::File;
use std::net::SocketAddr;
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
    /// A master that forks workers (nginx): its children are part of it.
    forks: bool,
}

impl Service {
    /// This process and, for a master that forks workers, its live children:
    /// the processes whose CPU and memory are the server's.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid];
        if self.forks {
            v.extend(proc::children(self.pid));
        }
        v
    }

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
        // nginx's workers are not our children: note them before the master
        // goes, and end any that outlive it, by PID.
        let children = if self.forks {
            proc::children(self.pid)
        } else {
            Vec::new()
        };
        if matches!(self.child.try_wait(), Ok(None)) {
            proc::stop(self.pid, Duration::from_secs(8));
        }
        let _ = self.child.wait();
        for pid in children {
            if proc::alive(pid) {
                proc::stop(pid, Duration::from_secs(2));
            }
        }
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
        forks: false,
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
    cmd.args(sse_testkit::redis_server_args(port, dir)).args([
        "--maxclients",
        "1000",
        "--daemonize",
        "no",
    ]);
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
    /// More flags for every gateway process (after the harness's own).
    pub gateway_args: &'a [String],
}

/// `instances` gateway processes on one port: each binds its listeners with
/// SO_REUSEPORT and the kernel spreads connections over all of them. Each is
/// started after the previous one logged that it listens; then the shared
/// port must answer `/health`.
pub fn gateways(bin: &Path, c: &ServerConfig, instances: usize) -> Result<Vec<Service>, String> {
    let port = proc::free_port()?;
    let mut out: Vec<Service> = Vec::new();
    for i in 0..instances.max(1) {
        let (name, log) = if instances <= 1 {
            ("gateway".to_string(), c.dir.join("gateway.log"))
        } else {
            (
                format!("gateway-{i}"),
                c.dir.join(format!("gateway-{i}.log")),
            )
        };
        out.push(gateway_at(bin, c, port, &name, log)?);
    }
    wait_ready(&mut out[0], Duration::from_secs(20), health_up)?;
    Ok(out)
}

/// One gateway process on `port` (which others may share), once it logged
/// that it listens: its replay window is loaded by then.
pub fn gateway_at(
    bin: &Path,
    c: &ServerConfig,
    port: u16,
    name: &str,
    log: PathBuf,
) -> Result<Service, String> {
    let mut svc = gateway_on(bin, c, port, name, log.clone())?;
    wait_ready(&mut svc, Duration::from_secs(20), |_| {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on"))
    })?;
    Ok(svc)
}

fn gateway_on(
    bin: &Path,
    c: &ServerConfig,
    port: u16,
    name: &str,
    log: PathBuf,
) -> Result<Service, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--redis-url")
        .arg(format!("redis://{}", c.redis))
        .arg("--jwt-secret")
        .arg(c.jwt_secret)
        .arg("--max-conns-per-ip")
        .arg("1000000")
        .arg("--max-requests-per-ip")
        .arg("1000000")
        .arg("--heartbeat-secs")
        .arg(c.heartbeat_secs.to_string())
        .args(c.gateway_args);
    spawn(name, cmd, log, port)
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
        forks: false,
    };
    let control = FloorPublisher::new(stdin, stdout)?;
    Ok((svc, control))
}

/// Where Debian's `libnginx-mod-nchan` puts the module.
pub const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// The nginx binary and the nchan module, or why nchan cannot run here.
pub fn nchan_installed() -> Result<(PathBuf, PathBuf), String> {
    let module = PathBuf::from(NCHAN_MODULE);
    if !module.exists() {
        return Err(format!(
            "{NCHAN_MODULE} missing: apt-get install -y libnginx-mod-nchan"
        ));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let nginx = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .ok_or(
            "nginx not found (on PATH or in /usr/sbin): apt-get install -y libnginx-mod-nchan",
        )?;
    Ok((nginx, module))
}

/// What the nchan template is filled with.
pub struct NchanConfig<'a> {
    pub template: &'a Path,
    pub dir: &'a Path,
    pub heartbeat_secs: f64,
    /// nginx worker processes (one per core, as the gateway has reactors).
    pub workers: usize,
}

/// nginx with the nchan module, from the template `loadtest/peers/nchan.conf`:
/// a non-daemon master (and its workers) on a free loopback port, with its
/// pid file, error and access logs and temp dirs under a fresh prefix in the
/// run's work directory.
pub fn nchan(c: &NchanConfig) -> Result<Service, String> {
    let (nginx, _) = nchan_installed()?;
    let port = proc::free_port()?;
    let conf = render_nchan_file(c, port)?;
    let prefix = conf.parent().unwrap_or(c.dir).to_path_buf();
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(format!("{}/", prefix.display()))
        .arg("-c")
        .arg(&conf);
    let mut svc = spawn("nchan", cmd, prefix.join("stderr.log"), port)?;
    svc.forks = true;
    wait_ready(&mut svc, Duration::from_secs(20), |a| {
        http_get(a, "/health").is_ok_and(|(status, _)| status == 200)
    })?;
    // From here on, what nginx has to say goes to its error log.
    svc.log = prefix.join("error.log");
    Ok(svc)
}

/// Fills the template into `<dir>/nchan-<port>/nginx.conf`; returns its path.
pub fn render_nchan_file(c: &NchanConfig, port: u16) -> Result<PathBuf, String> {
    let (_, module) = nchan_installed()?;
    let template = std::fs::read_to_string(c.template)
        .map_err(|e| format!("{}: {e}", c.template.display()))?;
    let prefix = c.dir.join(format!("nchan-{port}"));
    std::fs::create_dir_all(&prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
    let conf = render_nchan(&template, &prefix, &module, port, c);
    if let Some(line) = conf
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.contains("{{"))
    {
        return Err(format!(
            "{}: unknown placeholder in `{}`",
            c.template.display(),
            line.trim()
        ));
    }
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn render_nchan(
    template: &str,
    prefix: &Path,
    module: &Path,
    port: u16,
    c: &NchanConfig,
) -> String {
    let heartbeat = c.heartbeat_secs.round().max(1.0) as u64;
    let nofile = proc::fd_limit().clamp(1024, 1 << 20);
    [
        ("{{prefix}}", prefix.display().to_string()),
        ("{{module}}", module.display().to_string()),
        ("{{port}}", port.to_string()),
        ("{{workers}}", c.workers.max(1).to_string()),
        ("{{nofile}}", nofile.to_string()),
        (
            "{{worker_connections}}",
            nofile.saturating_sub(100).to_string(),
        ),
        ("{{shm}}", "256M".to_string()),
        ("{{heartbeat_secs}}", heartbeat.to_string()),
    ]
    .iter()
    .fold(template.to_owned(), |t, (k, v)| t.replace(k, v))
}

fn health_up(addr: SocketAddr) -> bool {
    http_get(addr, "/health").is_ok_and(|(status, body)| status == 200 && body.contains("\"up\""))
}

/// A one-shot `GET` (Connection: close), bounded to 5 s, through the kit's
/// client: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    if !addr.ip().is_loopback() {
        return Err("not loopback".into());
    }
    let request = sse_testkit::build_request("GET", path, &[], "");
    let r = sse_testkit::try_request(addr, &request, Duration::from_secs(5))
        .map_err(|e| format!("GET {path}: {e}"))?;
    Ok((r.status, r.text()))
}
