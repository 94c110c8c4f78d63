//! The bench a run works on: a work directory, one private redis-server, a
//! JWT secret, and how to start a fresh server of each kind for a scenario
//! and hand it to the scenario as a [`Target`] with its [`Publish`]er.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::client::now_ns;
use crate::floor::FloorPublisher;
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
}

/// A started server, ready for one scenario.
pub struct Running {
    pub service: Service,
    floor: Option<FloorPublisher>,
    pub kind: TargetKind,
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
        })
    }

    pub fn redis_addr(&self) -> SocketAddr {
        self.redis.addr
    }

    pub fn start(&self, kind: TargetKind) -> Result<Running, String> {
        let cfg = ServerConfig {
            redis: self.redis.addr,
            jwt_secret: &self.secret,
            heartbeat_secs: self.heartbeat_secs,
            dir: &self.dir,
        };
        let (service, floor) = match kind {
            TargetKind::Gateway => (services::gateway(&self.gateway_bin, &cfg)?, None),
            TargetKind::Nestjs => (services::nestjs(&self.nestjs_dir, &cfg)?, None),
            TargetKind::Floor => {
                let (s, f) = services::floor(&self.dir, self.devices as usize)?;
                (s, Some(f))
            }
        };
        Ok(Running {
            service,
            floor,
            kind,
        })
    }

    pub fn target<'a>(&'a self, r: &Running) -> Target<'a> {
        Target {
            kind: r.kind,
            addr: r.service.addr,
            pid: r.service.pid,
            jwt_secret: &self.secret,
            redis: (r.kind != TargetKind::Floor).then_some(self.redis.addr),
        }
    }

    /// The realtime-update publisher for this server.
    pub fn publisher<'a>(&self, r: &'a mut Running) -> Result<Box<dyn Publish + 'a>, String> {
        match r.floor.as_mut() {
            Some(f) => Ok(Box::new(FloorRef(f))),
            None => {
                let devices = (0..self.devices).map(|d| format!("d{d}")).collect();
                Ok(Box::new(RedisPublisher::connect(
                    self.redis.addr,
                    "mqtt:realtime:processed",
                    "data",
                    devices,
                )?))
            }
        }
    }
}

impl Running {
    /// Warnings and errors the server logged, with a count.
    pub fn log_findings(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.service.log).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| {
                let u = l.to_ascii_uppercase();
                u.contains(" WARN") || u.contains(" ERROR") || u.contains("PANIC")
            })
            .collect();
        let first = bad.first()?;
        Some(format!(
            "{} logged {} warning/error lines, first: `{}`",
            self.service.name,
            bad.len(),
            first.trim()
        ))
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
    fn published(&self) -> std::collections::BTreeMap<String, u64> {
        self.0.published()
    }
}
