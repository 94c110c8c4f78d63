//! `loadtest`: the load-test harness of sse-gateway.
//!
//! - `loadtest compare`: every scenario against the gateway, the NestJS
//!   baseline and the floor; writes `loadtest/RESULTS.md` and `results.json`.
//! - `loadtest smoke --gateway PATH`: the CI check (exactly-once delivery).
//! - `loadtest run --url http[s]://HOST[:PORT]`: drives a server that is already
//!   running and writes the same report; `loadtest serve <server>` starts
//!   one to point it at.
//! - `loadtest rolling`: a rolling restart under load (CI runs a small one).
//! - `loadtest resume-time`: how fast a stream catches up on missed events.
//! - `loadtest redis-cost`: Redis CPU per ingest event.
//! - `loadtest worker <i>` and `loadtest floor-server <port> <devices>`: the
//!   processes the harness starts itself.
//!
//! The servers and Redis it starts itself are on loopback addresses; `run`
//! contacts the server and Redis its URLs name (the repository's tests name
//! loopback ones). Every loop is bounded, and the processes it starts are
//! ended by PID.

mod charts;
mod client;
mod compare;
mod fleet;
mod floor;
mod hist;
mod lab;
mod post_publisher;
mod proc;
mod progress;
mod protocol;
mod publisher;
mod redis_cost;
mod report;
mod resp;
mod resume_time;
mod rolling;
mod run;
mod scenario;
mod serve;
mod services;
mod smoke;
mod tab;
mod tls;
mod wire;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadtest", about = "Load-test harness of sse-gateway")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario against the gateway, the NestJS baseline and the floor.
    Compare(Box<compare::CompareOpts>),
    /// Rewrites RESULTS.md and the charts from a results.json (no measuring).
    Report {
        #[arg(long, default_value = "loadtest/results.json")]
        json: std::path::PathBuf,
        #[arg(long, default_value = "loadtest/RESULTS.md")]
        out: std::path::PathBuf,
    },
    /// Drives an already-running server (any SSE endpoint) and reports.
    Run(Box<run::RunOpts>),
    /// Starts the gateway, the NestJS baseline or nchan and says where, for `run`.
    Serve(serve::ServeOpts),
    /// Exactly-once check against the gateway only, for CI.
    Smoke(smoke::SmokeOpts),
    /// A rolling restart of N gateway processes under load: nothing lost.
    Rolling(rolling::RollingOpts),
    /// Time for a stream to catch up on 1,000 or 100,000 missed events.
    ResumeTime(resume_time::ResumeTimeOpts),
    /// Redis CPU per ingest event, for 1 and 3 gateway processes.
    RedisCost(redis_cost::RedisCostOpts),
    /// (internal) a client worker process.
    #[command(hide = true)]
    Worker { index: u32 },
    /// (internal) the floor server.
    #[command(hide = true)]
    FloorServer {
        port: u16,
        #[arg(default_value_t = 100)]
        devices: usize,
    },
}

/// `a` as a POSIX shell word, so the recorded command can be pasted back.
fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,=:@%+".contains(c));
    if plain {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// This process's command line, quoted and with its secrets taken out,
/// for the report.
fn command_line() -> String {
    recorded(std::env::args())
}

/// Options whose value is a secret: never written into a report.
const SECRET_OPTIONS: [&str; 3] = ["--jwt-secret", "--bearer", "--publish-bearer"];

/// `args` as the report records them: quoted, each secret option's value
/// and each URL's password replaced by `<secret>`.
fn recorded(args: impl Iterator<Item = String>) -> String {
    let mut secret_next = false;
    let mut out = Vec::new();
    for a in args {
        let shown = if secret_next {
            "<secret>".to_owned()
        } else if let Some((flag, _)) = a
            .split_once('=')
            .filter(|(f, _)| SECRET_OPTIONS.contains(f))
        {
            format!("{flag}=<secret>")
        } else {
            resp::without_password(&a)
        };
        secret_next = SECRET_OPTIONS.contains(&a.as_str());
        out.push(shell_quote(&shown));
    }
    out.join(" ")
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Worker { index } => worker::run(index),
        Cmd::FloorServer { port, devices } => floor::run(port, devices, "d"),
        Cmd::Smoke(opts) => smoke::run(&opts),
        Cmd::Rolling(opts) => rolling::run(&opts),
        Cmd::ResumeTime(opts) => resume_time::run(&opts),
        Cmd::RedisCost(opts) => redis_cost::run(&opts),
        Cmd::Report { json, out } => match compare::rerender(&json, &out) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("report: {e}");
                1
            }
        },
        Cmd::Serve(opts) => serve::run(&opts),
        Cmd::Run(opts) => run::main(&opts, command_line()),
        Cmd::Compare(opts) => match compare::run(&opts, command_line()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("compare: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_command_keeps_no_secret() {
        let args = [
            "loadtest",
            "run",
            "--jwt-secret",
            "s3cr3t-1",
            "--bearer=tok-2",
            "--publish-bearer",
            "tok-3",
            "--grant-redis",
            "redis://app:pw-4@127.0.0.1:6379/2",
            "--publish-redis",
            "redis://:pw-5@127.0.0.1:6379",
            "--url",
            "http://127.0.0.1:8080",
        ];
        let line = recorded(args.iter().map(|a| a.to_string()));
        for secret in ["s3cr3t-1", "tok-2", "tok-3", "pw-4", "pw-5"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
        assert!(
            line.contains("--grant-redis 'redis://app:<secret>@127.0.0.1:6379/2'"),
            "{line}"
        );
        assert!(
            line.contains("--jwt-secret '<secret>' '--bearer=<secret>'"),
            "{line}"
        );
        assert!(line.ends_with("--url http://127.0.0.1:8080"), "{line}");
    }
}
