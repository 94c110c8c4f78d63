//! The bench a run works on: a work directory, one private redis-server, a
//! JWT secret, and how to start a fresh server of each kind for a scenario
//! (the gateway as one or several processes on one port) and hand it to the
//! scenario as a [`Target`] with its [`Publish`]er.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::client::now_ns;
use crate::floor::FloorPublisher;
use crate::post_publisher::{PostPublisher, PostRoute};
use crate::protocol::TargetKind;
use crate::publisher::{Publish, RedisPublisher};
use crate::scenario::Target;
use crate::services::{self, ServerConfig, Service};

pub struct Lab {
    pub dir: PathBuf,
    pub redis: Service,
    pub secret: String,
    pub heartbeat_secs: f64,
    pub gateway_bin: PathBuf,
    pub nestjs_dir: PathBuf,
    pub devices: u64,
    /// The nginx.conf template of the nchan peer.
    pub nchan_template: PathBuf,
    /// Keep-alive connections the nchan publisher POSTs over.
    pub nchan_publishers: usize,
    /// More flags for every gateway process.
    pub gateway_args: Vec<String>,
}

/// A started server, ready for one scenario.
pub struct Running {
    /// One per process started (several for a multi-instance gateway).
    pub services: Vec<Service>,
    floor: Option<FloorPublisher>,
    pub kind: TargetKind,
    pub instances: usize,
}

impl Lab {
    pub fn new(
        gateway_bin: PathBuf,
        nestjs_dir: PathBuf,
        heartbeat_secs: f64,
        devices: u64,
    ) -> Result<Lab, String> {
        crate::proc::fd_limit();
        let dir = std::env::temp_dir().join(format!("sse-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let redis = services::redis(&dir)?;
        // Run a private copy: a build in the shared target directory during
        // the run must not change the gateway between scenarios.
        let gateway_bin = if gateway_bin.exists() {
            let copy = dir.join("sse-gateway");
            std::fs::copy(&gateway_bin, &copy)
                .map_err(|e| format!("copy {}: {e}", gateway_bin.display()))?;
            copy
        } else {
            gateway_bin
        };
        Ok(Lab {
            dir,
            redis,
            secret: format!("loadtest-{}-{}", std::process::id(), now_ns()),
            heartbeat_secs,
            gateway_bin,
            nestjs_dir,
            devices,
            nchan_template: PathBuf::from("loadtest/peers/nchan.conf"),
            nchan_publishers: 2,
            gateway_args: Vec::new(),
        })
    }

    pub fn redis_addr(&self) -> SocketAddr {
        self.redis.addr
    }

    /// A fresh server of `kind`; `instances` gateway processes share one port
    /// (ignored for the other kinds, which are always one server).
    pub fn start(&self, kind: TargetKind, instances: usize) -> Result<Running, String> {
        let cfg = self.server_config();
        let instances = if kind == TargetKind::Gateway {
            instances.max(1)
        } else {
            1
        };
        let (services, floor) = match kind {
            TargetKind::Gateway => (
                services::gateways(&self.gateway_bin, &cfg, instances)?,
                None,
            ),
            TargetKind::Nestjs => (vec![services::nestjs(&self.nestjs_dir, &cfg)?], None),
            TargetKind::Floor => {
                let (s, f) = services::floor(&self.dir, self.devices as usize)?;
                (vec![s], Some(f))
            }
            TargetKind::Url => return Err("a url target is started by its owner".into()),
            TargetKind::Nchan => {
                let c = services::NchanConfig {
                    template: &self.nchan_template,
                    dir: &self.dir,
                    heartbeat_secs: self.heartbeat_secs,
                    workers: crate::proc::machine().nproc,
                };
                (vec![services::nchan(&c)?], None)
            }
        };
        Ok(Running {
            services,
            floor,
            kind,
            instances,
        })
    }

    /// What every contract server of this bench is started with.
    pub fn server_config(&self) -> ServerConfig<'_> {
        ServerConfig {
            redis: self.redis.addr,
            jwt_secret: &self.secret,
            heartbeat_secs: self.heartbeat_secs,
            dir: &self.dir,
            gateway_args: &self.gateway_args,
        }
    }

    pub fn target<'a>(&'a self, r: &Running) -> Target<'a> {
        Target {
            kind: r.kind,
            addr: r.services[0].addr,
            pids: r.pids(),
            instances: r.instances,
            jwt_secret: &self.secret,
            redis: r.kind.uses_redis().then_some(self.redis.addr),
            redis_pid: r.kind.uses_redis().then_some(self.redis.pid),
            route: None,
        }
    }

    /// The realtime-update publisher for this server.
    pub fn publisher<'a>(&self, r: &'a mut Running) -> Result<Box<dyn Publish + 'a>, String> {
        let devices: Vec<String> = (0..self.devices).map(|d| format!("d{d}")).collect();
        if r.kind == TargetKind::Nchan {
            return Ok(Box::new(PostPublisher::connect(
                r.services[0].addr,
                None,
                None,
                PostRoute::nchan(),
                devices,
                self.nchan_publishers,
            )?));
        }
        match r.floor.as_mut() {
            Some(f) => Ok(Box::new(FloorRef(f))),
            None => Ok(Box::new(RedisPublisher::connect(
                self.redis.addr,
                "mqtt:realtime:processed",
                "data",
                devices,
            )?)),
        }
    }
}

impl Running {
    /// Every process of the server: the gateway instances, nginx's master
    /// and workers.
    pub fn pids(&self) -> Vec<u32> {
        self.services.iter().flat_map(Service::pids).collect()
    }

    /// The processes that exited, with the last line of each one's log.
    pub fn exits(&mut self) -> Vec<String> {
        self.services
            .iter_mut()
            .filter_map(|s| {
                (!s.running()).then(|| {
                    let tail = s.log_tail(1);
                    format!("{}: {}", s.name, tail.trim())
                })
            })
            .collect()
    }

    /// Warnings and errors the server logged, with a count, per process.
    pub fn log_findings(&self) -> Vec<String> {
        self.services
            .iter()
            .filter_map(|s| {
                let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                let bad: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        let u = l.to_ascii_uppercase();
                        [
                            " WARN", " ERROR", "PANIC", "[WARN]", "[ERROR]", "[CRIT]", "[ALERT]",
                            "[EMERG]",
                        ]
                        .iter()
                        .any(|k| u.contains(k))
                    })
                    .collect();
                let first = bad.first()?;
                Some(format!(
                    "{} logged {} warning/error lines, first: `{}`",
                    s.name,
                    bad.len(),
                    first.trim()
                ))
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The services stop on their own drop; the logs go with the directory
        // unless asked to keep them.
        if std::env::var_os("LOADTEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Borrows the floor's control pipes as a publisher.
struct FloorRef<'a>(&'a mut FloorPublisher);

impl Publish for FloorRef<'_> {
    fn step(&mut self, rate: u64, secs: f64) -> Result<crate::publisher::Step, String> {
        self.0.step(rate, secs)
    }
    fn settle(&mut self) -> Result<(), String> {
        self.0.settle()
    }
    fn published(&self) -> std::collections::BTreeMap<String, u64> {
        self.0.published()
    }
}

#[cfg(test)]
mod tests {
    use crate::services::{NchanConfig, NCHAN_MODULE};

    /// The committed template renders to a config nginx accepts (`nginx -t`),
    /// when nginx and the module are installed.
    #[test]
    fn nchan_template_passes_nginx_t() {
        let Ok((nginx, _)) = crate::services::nchan_installed() else {
            eprintln!("skipped: {NCHAN_MODULE} or nginx missing");
            return;
        };
        let dir = std::env::temp_dir().join(format!("lt-nchan-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/nchan.conf");
        let c = NchanConfig {
            template: &template,
            dir: &dir,
            heartbeat_secs: 5.0,
            workers: 2,
        };
        let conf = crate::services::render_nchan_file(&c, 18080).unwrap();
        let out = std::process::Command::new(nginx)
            .arg("-t")
            .arg("-p")
            .arg(format!("{}/", conf.parent().unwrap().display()))
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
