//! `sse-gateway`: parse the flags (exit 2 with one line naming the flag when
//! they are wrong), then run until SIGTERM/SIGINT has drained every stream.

use clap::error::ErrorKind;

fn main() {
    // Before any thread starts (see the module `heap`).
    sse_gateway::heap::share_one_arena();
    // Only the thread that waits for SIGTERM/SIGINT takes them; every other
    // thread, the logger's first, is started with them blocked.
    if let Err(e) = sse_gateway::startup::block_drain_signals() {
        eprintln!("error: cannot block SIGTERM/SIGINT: {e}");
        std::process::exit(1);
    }
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
