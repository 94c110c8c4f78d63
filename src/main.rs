//! `sse-gateway`: parse the flags (exit 2 with one line naming the flag when
//! they are wrong), then run until SIGTERM/SIGINT has drained every stream.

use clap::error::ErrorKind;

fn main() {
    sse_gateway::log::init();
    let config = match sse_gateway::config::Config::from_args(std::env::args_os()) {
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
    sse_gateway::log::set_format(config.log_format);
    let result = sse_gateway::startup::run(config);
    log::logger().flush();
    match result {
        Ok(()) => std::process::exit(0),
        Err(sse_gateway::startup::Fatal::Config(msg)) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
        Err(sse_gateway::startup::Fatal::Io(msg)) => {
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
