//! `sse-gateway`: parse the flags (exit 2 with one line naming the flag when
//! they are wrong), then run until SIGTERM/SIGINT has drained every stream.

use std::io::Write;

use clap::error::ErrorKind;
use clap::Parser;

fn main() {
    init_logging();
    let config = match sse_gateway::config::Config::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("error: bad configuration");
            eprintln!("{first}");
            std::process::exit(2);
        }
    };
    match sse_gateway::gateway::run(config) {
        Ok(()) => std::process::exit(0),
        Err(sse_gateway::gateway::Fatal::Config(msg)) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
        Err(sse_gateway::gateway::Fatal::Io(msg)) => {
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}

/// One line per event on stderr: `<iso time> <LEVEL> <message>`; level from
/// `RUST_LOG` (default info).
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let ts = sse_gateway::time::iso8601(sse_gateway::time::epoch_ms());
            writeln!(buf, "{ts} {:<5} {}", record.level(), record.args())
        })
        .init();
}
