//! Logging that never blocks a reactor: one line per event, formatted on the
//! calling thread, handed to a bounded channel, and written to stderr by a
//! logger thread. When stderr is slow (a full pipe, a stalled journald) lines
//! are dropped and counted instead of stalling the event loop; the count is
//! reported as a log line once the writer catches up.
//!
//! Call sites put what they are about in structured fields (the `log` crate's
//! key-values): `info!(user = u.as_str(), purpose = "data"; "stream open")`.
//! Two formats (`--log-format`, contract 7.6):
//! - `text`: `<ts> <LEVEL> <msg> key=value ...`; a value with a space, a quote,
//!   `=` or a control character is quoted and escaped, and control characters
//!   in the message are escaped, so a user id with a forged newline never
//!   splits or forges a line;
//! - `json`: one object per line, `{"ts", "level", "msg", <fields>}`.
//!
//! Level from `RUST_LOG`: a bare level (`debug`) or `sse_gateway=<level>`;
//! default `info`.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use log::kv::{self, Key, Source, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// How each line is written (`--log-format`, `SSE_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `<ts> <LEVEL> <msg> key=value ...`, one line per event.
    #[default]
    Text,
    /// One JSON object per line: `ts`, `level`, `msg` and the event's fields.
    Json,
}

/// Set once from the flags, before the gateway starts; read per line.
static JSON: AtomicBool = AtomicBool::new(false);

/// Chooses the line format for every line logged from now on.
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Relaxed);
}

fn format() -> LogFormat {
    if JSON.load(Relaxed) {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

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
            .name("stderr-writer".into())
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
            let fields = [("dropped", dropped)];
            let msg = format_args!("log lines dropped: stderr too slow");
            batch.push_str(&line(format(), Level::Warn, msg, &fields));
        }
        let _ = stderr.write_all(batch.as_bytes());
        logger.queued.fetch_sub(n, Relaxed);
    }
}

/// One complete line, newline included, in `format`.
pub fn line(
    format: LogFormat,
    level: Level,
    msg: std::fmt::Arguments,
    fields: &dyn Source,
) -> String {
    let mut out = String::with_capacity(128);
    match format {
        LogFormat::Text => {
            crate::time::write_iso8601(&mut out, crate::time::epoch_ms());
            let _ = write!(out, " {level:<5} ");
            let mut text = Escaped {
                out: &mut out,
                quote: false,
            };
            let _ = text.write_fmt(msg);
            let _ = fields.visit(&mut TextFields(&mut out));
        }
        LogFormat::Json => {
            out.push_str(r#"{"ts":""#);
            crate::time::write_iso8601(&mut out, crate::time::epoch_ms());
            let level = match level {
                Level::Error => "error",
                Level::Warn => "warn",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            let _ = write!(out, r#"","level":"{level}","msg":"#);
            json_string(&mut out, &msg.to_string());
            let _ = fields.visit(&mut JsonFields(&mut out));
            out.push('}');
        }
    }
    out.push('\n');
    out
}

/// Appends `key=value` pairs to a text line.
struct TextFields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for TextFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let out = &mut *self.0;
        out.push(' ');
        out.push_str(key.as_str());
        out.push('=');
        // Written in place; only a value that must be quoted is taken out
        // again to be escaped (most are ids, numbers and words).
        let start = out.len();
        let _ = write!(out, "{value}");
        if out.len() == start || out[start..].chars().any(needs_quotes) {
            let text = out.split_off(start);
            out.push('"');
            let _ = Escaped { out, quote: true }.write_str(&text);
            out.push('"');
        }
        Ok(())
    }
}

/// Appends `,"key":value` members to a JSON line; numbers and booleans stay
/// JSON numbers and booleans, everything else is a string.
struct JsonFields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let out = &mut *self.0;
        out.push(',');
        json_string(out, key.as_str());
        out.push(':');
        if let Some(n) = value.to_u64() {
            let _ = write!(out, "{n}");
        } else if let Some(n) = value.to_i64() {
            let _ = write!(out, "{n}");
        } else if let Some(b) = value.to_bool() {
            let _ = write!(out, "{b}");
        } else if let Some(f) = value.to_f64().filter(|f| f.is_finite()) {
            let _ = write!(out, "{f}");
        } else {
            json_string(out, &value.to_string());
        }
        Ok(())
    }
}

fn json_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// Characters that would end a line or be mistaken for one.
fn breaks_line(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Characters that make a text value need quotes.
fn needs_quotes(c: char) -> bool {
    breaks_line(c) || c == ' ' || c == '"' || c == '=' || c == '\\'
}

/// Writes text with control characters escaped (`\n`, `\u{1b}`); inside a
/// quoted value, quotes and backslashes too.
struct Escaped<'a> {
    out: &'a mut String,
    quote: bool,
}

impl std::fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            match c {
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '"' | '\\' if self.quote => {
                    self.out.push('\\');
                    self.out.push(c);
                }
                c if breaks_line(c) => {
                    let _ = write!(self.out, "\\u{{{:x}}}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        Ok(())
    }
}

impl Log for ChannelLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = line(
            format(),
            record.level(),
            *record.args(),
            record.key_values(),
        );
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

    const FORGED: &str = "eve\n2026-01-01T00:00:00.000Z INFO  stream open user=\"admin\"";

    fn fields() -> [(&'static str, Value<'static>); 4] {
        [
            ("user", Value::from(FORGED)),
            ("plain", Value::from("D1")),
            ("n", Value::from(42u64)),
            ("empty", Value::from("")),
        ]
    }

    #[test]
    fn text_lines_escape_values_and_messages() {
        let msg = format_args!("stream\nopen");
        let l = line(LogFormat::Text, Level::Info, msg, &fields());
        assert_eq!(l.matches('\n').count(), 1, "{l:?}");
        assert!(l.ends_with('\n'));
        let tail = l.split_once("INFO  ").map(|(_, t)| t).unwrap_or_default();
        assert_eq!(
            tail,
            "stream\\nopen user=\"eve\\n2026-01-01T00:00:00.000Z INFO  stream open user=\\\"admin\\\"\" \
             plain=D1 n=42 empty=\"\"\n"
        );
        let escapes = [
            ("a\u{1b}[31m", "\"a\\u{1b}[31m\""),
            ("x\u{2028}", "\"x\\u{2028}\""),
        ];
        for (raw, want) in escapes {
            let l = line(
                LogFormat::Text,
                Level::Warn,
                format_args!("m"),
                &[("v", raw)],
            );
            assert!(l.ends_with(&format!(" v={want}\n")), "{l:?}");
        }
    }

    #[test]
    fn json_lines_parse_with_their_fields() {
        let msg = format_args!("stream \"open\"");
        let l = line(LogFormat::Json, Level::Info, msg, &fields());
        assert_eq!(l.matches('\n').count(), 1, "{l:?}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(v["level"], "info");
        assert_eq!(v["msg"], "stream \"open\"");
        assert_eq!(v["user"], FORGED);
        assert_eq!(v["plain"], "D1");
        assert_eq!(v["n"], 42);
        assert_eq!(v["empty"], "");
        assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
    }
}
