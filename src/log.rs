//! Logging that never blocks a reactor: one line per event, formatted on the
//! calling thread, handed to a bounded channel, and written to stderr by a
//! logger thread. When stderr is slow (a full pipe, a stalled journald) lines
//! are dropped and counted instead of stalling the event loop; the count is
//! reported as a log line once the writer catches up.
//!
//! Level from `RUST_LOG`: a bare level (`debug`) or `sse_gateway=<level>`;
//! default `info`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

struct ChannelLogger {
    level: LevelFilter,
    tx: SyncSender<String>,
    queued: AtomicUsize,
    dropped: AtomicU64,
}

static LOGGER: OnceLock<ChannelLogger> = OnceLock::new();

/// The level `RUST_LOG` asks for.
pub fn level_from(spec: Option<&str>) -> LevelFilter {
    let Some(spec) = spec else {
        return LevelFilter::Info;
    };
    let mut level = None;
    for part in spec.split(',').map(str::trim) {
        let value = match part.split_once('=') {
            Some(("sse_gateway", value)) => value,
            Some(_) => continue,
            None => part,
        };
        if let Ok(l) = value.parse::<LevelFilter>() {
            level = Some(l);
        }
    }
    level.unwrap_or(LevelFilter::Info)
}

/// Installs the logger and starts its writer thread.
pub fn init() {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let logger = ChannelLogger {
        level: level_from(std::env::var("RUST_LOG").ok().as_deref()),
        tx,
        queued: AtomicUsize::new(0),
        dropped: AtomicU64::new(0),
    };
    let level = logger.level;
    if LOGGER.set(logger).is_err() {
        return;
    }
    if let Some(logger) = LOGGER.get() {
        if log::set_logger(logger).is_ok() {
            log::set_max_level(level);
        }
        let _ = thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(logger, rx));
    }
}

fn write_lines(logger: &ChannelLogger, rx: Receiver<String>) {
    let mut stderr = std::io::stderr();
    let mut batch = String::new();
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.push_str(&first);
        let mut n = 1;
        while let Ok(more) = rx.try_recv() {
            batch.push_str(&more);
            n += 1;
            if batch.len() > 64 * 1024 {
                break;
            }
        }
        let dropped = logger.dropped.swap(0, Relaxed);
        if dropped > 0 {
            batch.push_str(&line(
                log::Level::Warn,
                &format!("{dropped} log lines dropped: stderr too slow"),
            ));
        }
        let _ = stderr.write_all(batch.as_bytes());
        logger.queued.fetch_sub(n, Relaxed);
    }
}

fn line(level: log::Level, message: &str) -> String {
    let mut out = String::with_capacity(40 + message.len());
    crate::time::write_iso8601(&mut out, crate::time::epoch_ms());
    out.push(' ');
    out.push_str(&format!("{level:<5} {message}\n"));
    out
}

impl Log for ChannelLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = line(record.level(), &record.args().to_string());
        self.queued.fetch_add(1, Relaxed);
        match self.tx.try_send(text) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Relaxed);
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Waits (at most a second) until every queued line is written.
    fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.queued.load(Relaxed) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_levels() {
        let table = [
            (None, LevelFilter::Info),
            (Some("debug"), LevelFilter::Debug),
            (Some("warn"), LevelFilter::Warn),
            (Some("sse_gateway=trace"), LevelFilter::Trace),
            (Some("mio=debug,sse_gateway=error"), LevelFilter::Error),
            (Some("other=debug"), LevelFilter::Info),
            (Some("nonsense"), LevelFilter::Info),
        ];
        for (spec, want) in table {
            assert_eq!(level_from(spec), want, "{spec:?}");
        }
    }
}
