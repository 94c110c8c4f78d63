//! A worker process (`loadtest worker <index>`): reads [`Command`]s from
//! stdin on a helper thread, runs the [`Client`] loop, and answers each
//! command with one [`Reply`] line on stdout. It exits when told to, when
//! stdin closes (its coordinator is gone), or after a hard time limit.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};

use crate::client::Client;
use crate::protocol::{Command, Reply};
use crate::tab::Target;

const WAKER: Token = Token(usize::MAX);
/// No worker outlives this, whatever its coordinator does.
const MAX_LIFETIME: Duration = Duration::from_secs(3 * 3600);

pub fn run(index: u32) -> i32 {
    match serve(index) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("worker {index}: {e}");
            1
        }
    }
}

fn serve(index: u32) -> std::io::Result<()> {
    let mut poll = Poll::new()?;
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel::<Option<Command>>();
    let reader_waker = waker.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let cmd = serde_json::from_str::<Command>(&line).ok();
                if tx.send(cmd).is_err() {
                    return;
                }
                let _ = reader_waker.wake();
            }
            let _ = tx.send(Some(Command::Quit));
            let _ = reader_waker.wake();
        })?;

    let mut client = Client::new(index);
    let mut events = Events::with_capacity(4096);
    let born = Instant::now();
    let mut last_expire = Instant::now();
    let stdout = std::io::stdout();
    loop {
        let timeout = if client.has_queued() {
            Duration::ZERO
        } else {
            Duration::from_millis(20)
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            client.on_event(&poll, ev.token().0, readable, ev.is_writable());
        }
        client.read_more(&poll);
        while let Ok(cmd) = rx.try_recv() {
            let (reply, quit) = match cmd {
                None => (
                    Reply::Error {
                        message: "unreadable command".into(),
                    },
                    false,
                ),
                Some(cmd) => handle(&mut client, &mut poll, cmd),
            };
            let mut out = stdout.lock();
            let line = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
            writeln!(out, "{line}")?;
            out.flush()?;
            if quit {
                client.drop_all(&poll);
                return Ok(());
            }
        }
        client.tick(&poll);
        if last_expire.elapsed() >= Duration::from_millis(250) {
            last_expire = Instant::now();
            client.expire(&poll);
        }
        if born.elapsed() > MAX_LIFETIME {
            return Ok(());
        }
    }
}

fn handle(client: &mut Client, poll: &mut Poll, cmd: Command) -> (Reply, bool) {
    let reply = match cmd {
        Command::Open {
            target,
            addr,
            jwt_secret,
            clients,
            concurrency,
            attempts,
            route,
            open_rate,
        } => match Target::new(target, &addr, &jwt_secret, route.map(|r| *r))
            .and_then(|t| client.open(t, clients, concurrency, attempts, open_rate))
        {
            Ok(()) => Reply::Ok,
            Err(message) => Reply::Error { message },
        },
        Command::Drop => {
            client.drop_all(poll);
            Reply::Ok
        }
        Command::Reconnect {
            concurrency,
            attempts,
        } => {
            client.reconnect(concurrency, attempts);
            Reply::Ok
        }
        Command::Stats => Reply::Stats(client.stats()),
        Command::Reset => {
            client.reset();
            Reply::Ok
        }
        Command::Check { published } => Reply::Check(client.check(&published)),
        Command::Quit => return (Reply::Ok, true),
    };
    (reply, false)
}
