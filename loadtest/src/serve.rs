//! `loadtest serve <gateway|nestjs|nchan>`: starts one of the servers the
//! harness knows how to start (with its private redis-server, as `compare`
//! does), prints one JSON line on stdout saying where it is (`url`, `redis`,
//! `jwt_secret`, `pids`), and keeps it up until stdin closes or `--secs`
//! pass. Something to point `loadtest run --url` at, and what its tests do.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use clap::Args;

use crate::lab::Lab;
use crate::protocol::TargetKind;

#[derive(Args, Debug, Clone)]
pub struct ServeOpts {
    /// gateway, nestjs or nchan.
    pub server: String,
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    #[arg(long, default_value = "loadtest/nestjs-baseline")]
    pub nestjs: PathBuf,
    #[arg(long, default_value = "loadtest/peers/nchan.conf")]
    pub nchan_conf: PathBuf,
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_secs: f64,
    /// Stops after this long even while stdin stays open.
    #[arg(long, default_value_t = 3600)]
    pub secs: u64,
}

pub fn run(opts: &ServeOpts) -> i32 {
    match serve(opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("serve: {e}");
            1
        }
    }
}

fn serve(opts: &ServeOpts) -> Result<(), String> {
    let kind = match opts.server.as_str() {
        "gateway" => TargetKind::Gateway,
        "nestjs" => TargetKind::Nestjs,
        "nchan" => TargetKind::Nchan,
        other => return Err(format!("unknown server {other} (gateway, nestjs, nchan)")),
    };
    let mut lab = Lab::new(
        opts.gateway.clone(),
        opts.nestjs.clone(),
        opts.heartbeat_secs,
        1,
    )?;
    lab.nchan_template = opts.nchan_conf.clone();
    let mut running = lab.start(kind, 1)?;
    let target = lab.target(&running);
    let line = serde_json::json!({
        "server": kind.name(),
        "url": format!("http://{}", target.addr),
        "redis": format!("redis://{}", lab.redis_addr()),
        "jwt_secret": lab.secret,
        "pids": target.pids,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    // Until stdin closes (the caller is done, or gone), bounded by --secs.
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
            }
            let _ = tx.send(());
        })
        .map_err(|e| e.to_string())?;
    let _ = rx.recv_timeout(Duration::from_secs(opts.secs));
    for exit in running.exits() {
        eprintln!("serve: {exit}");
    }
    Ok(())
}
