//! Logging that never blocks a reactor and costs no wake-up per line: one
//! line per event, formatted on the calling thread into a scratch string of
//! its own, appended to one shared buffer under a lock held for a copy, and
//! written to stderr by a writer thread that takes the whole buffer at once.
//! After each write the writer lets lines gather for `GATHER` (10 ms) before it
//! looks again, so a burst of opens (two lines each) costs the reactors no
//! futex call and no allocation per line; only the first line after a quiet
//! spell wakes the writer. When stderr is slow (a full pipe, a stalled
//! journald) the buffer stops at `QUEUE_BYTES` (4 MiB): further lines are dropped
//! and counted instead of stalling the event loop, and the count is reported
//! as a log line once the writer catches up.
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

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::kv::{self, Key, Source, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Bytes of lines that may wait for the writer before new ones are dropped.
const QUEUE_BYTES: usize = 4 << 20;
/// How long the writer lets lines gather after writing some. Measured in a
/// storm of 10,000 opens: the writer had been woken for almost every line
/// (0.9 wake-ups per open), each a futex call on the reactor and a context
/// switch.
const GATHER: Duration = Duration::from_millis(10);
/// A scratch string kept by a thread between lines, at most.
const SCRATCH_KEEP: usize = 4 << 10;

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

/// Lines written by the loggers and not yet taken by the writer.
#[derive(Default)]
struct Pending {
    text: String,
    /// The writer is between taking a batch and having written it.
    writing: bool,
    /// The writer waits on `wake` for the first line.
    idle: bool,
}

struct BufferLogger {
    level: LevelFilter,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Times a line woke the writer (once per quiet spell, not per line).
    wakes: AtomicU64,
    dropped: AtomicU64,
}

static LOGGER: OnceLock<BufferLogger> = OnceLock::new();

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
    let logger = BufferLogger {
        level: level_from(std::env::var("RUST_LOG").ok().as_deref()),
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        wakes: AtomicU64::new(0),
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
            .spawn(move || write_lines(logger, &mut std::io::stderr()));
    }
}

/// The writer thread: takes every pending line at once, writes them with
/// one call, then lets more gather.
fn write_lines(logger: &BufferLogger, out: &mut dyn Write) {
    let mut batch = String::new();
    loop {
        {
            let Ok(mut pending) = logger.pending.lock() else {
                return;
            };
            while pending.text.is_empty() {
                pending.idle = true;
                pending = match logger.wake.wait(pending) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            pending.idle = false;
            pending.writing = true;
            std::mem::swap(&mut pending.text, &mut batch);
        }
        let dropped = logger.dropped.swap(0, Relaxed);
        if dropped > 0 {
            let fields = [("dropped", dropped)];
            let msg = format_args!("log lines dropped: stderr too slow");
            write_line(&mut batch, format(), Level::Warn, msg, &fields);
        }
        let _ = out.write_all(batch.as_bytes());
        batch.clear();
        if batch.capacity() > QUEUE_BYTES / 4 {
            batch.shrink_to(QUEUE_BYTES / 4);
        }
        if let Ok(mut pending) = logger.pending.lock() {
            pending.writing = false;
        }
        thread::sleep(GATHER);
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
    write_line(&mut out, format, level, msg, fields);
    out
}

/// Appends one complete line, newline included, in `format`, to `out`.
fn write_line(
    out: &mut String,
    format: LogFormat,
    level: Level,
    msg: std::fmt::Arguments,
    fields: &dyn Source,
) {
    match format {
        LogFormat::Text => {
            crate::time::write_iso8601(out, crate::time::epoch_ms());
            let _ = write!(out, " {level:<5} ");
            let mut text = Escaped { out, quote: false };
            let _ = text.write_fmt(msg);
            let _ = fields.visit(&mut TextFields(out));
        }
        LogFormat::Json => {
            out.push_str(r#"{"ts":""#);
            crate::time::write_iso8601(out, crate::time::epoch_ms());
            let level = match level {
                Level::Error => "error",
                Level::Warn => "warn",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            let _ = write!(out, r#"","level":"{level}","msg":"#);
            json_string(out, &msg.to_string());
            let _ = fields.visit(&mut JsonFields(out));
            out.push('}');
        }
    }
    out.push('\n');
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

/// `s` as a JSON string. serde_json escapes only what JSON requires (below
/// U+0020); U+0085, U+2028 and U+2029 are escaped too, since line readers
/// (Python's `splitlines`, JavaScript's older parsers) break lines there.
fn json_string(out: &mut String, s: &str) {
    let Ok(quoted) = serde_json::to_string(s) else {
        out.push_str("\"\"");
        return;
    };
    if !quoted.chars().any(breaks_line) {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if breaks_line(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
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

thread_local! {
    /// Where this thread formats a line before copying it into the buffer.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

impl BufferLogger {
    /// Appends one formatted line (or counts it dropped when the buffer is
    /// full), waking the writer only if it waits for a first line.
    fn append(&self, line: &str) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        if pending.text.len() + line.len() > QUEUE_BYTES {
            drop(pending);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        pending.text.push_str(line);
        if pending.idle {
            pending.idle = false;
            self.wakes.fetch_add(1, Relaxed);
            self.wake.notify_one();
        }
    }
}

impl Log for BufferLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let (level, args, fields) = (record.level(), *record.args(), record.key_values());
        // A line logged while this thread formats one (a field's Display
        // that logs) gets a string of its own.
        let formatted = SCRATCH.try_with(|scratch| {
            let Ok(mut out) = scratch.try_borrow_mut() else {
                return false;
            };
            out.clear();
            write_line(&mut out, format(), level, args, fields);
            self.append(&out);
            if out.capacity() > SCRATCH_KEEP {
                *out = String::new();
            }
            true
        });
        if formatted != Ok(true) {
            self.append(&line(format(), level, args, fields));
        }
    }

    /// Waits (at most a second) until every pending line is written.
    fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match self.pending.lock() {
                Ok(p) if !p.text.is_empty() || p.writing => {}
                _ => return,
            }
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

    fn logger() -> BufferLogger {
        BufferLogger {
            level: LevelFilter::Info,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            wakes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    #[test]
    fn a_burst_of_lines_wakes_a_waiting_writer_once() {
        let logger = logger();
        if let Ok(mut p) = logger.pending.lock() {
            p.idle = true;
        }
        for n in 0..1000 {
            logger.append(&format!("line {n}\n"));
        }
        assert_eq!(logger.wakes.load(Relaxed), 1);
        let text = logger
            .pending
            .lock()
            .map(|p| p.text.clone())
            .unwrap_or_default();
        assert_eq!(text.lines().count(), 1000);
        assert!(text.ends_with("line 999\n"));
    }

    /// A writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Kept(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_writer_writes_every_line_and_counts_what_a_full_buffer_dropped() {
        let logger: &'static BufferLogger = Box::leak(Box::new(logger()));
        let first = "x".repeat(1000) + "\n";
        let mut appended = 0;
        while logger.dropped.load(Relaxed) == 0 {
            logger.append(&first);
            appended += 1;
        }
        assert_eq!(appended, QUEUE_BYTES / first.len() + 1);
        // Room for one short line is left: it goes into the same batch.
        logger.append("after\n");
        let kept = Kept::default();
        let mut out = kept.clone();
        thread::spawn(move || write_lines(logger, &mut out));
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = kept.0.lock().map(|v| v.clone()).unwrap_or_default();
            let text = String::from_utf8_lossy(&text).into_owned();
            if text.contains("after\n") || Instant::now() > deadline {
                break text;
            }
            thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(text.matches(first.as_str()).count(), appended - 1);
        // The count follows the lines the writer took with it.
        let tail = text.rsplit_once(&first).map(|(_, t)| t).unwrap_or_default();
        assert!(tail.starts_with("after\n"), "{tail}");
        assert!(
            tail.ends_with(" WARN  log lines dropped: stderr too slow dropped=1\n"),
            "{tail}"
        );
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
        // Characters that some line readers break at stay escaped.
        let odd = "a\u{2028}b\u{2029}c\u{85}d\u{7f}";
        let none: [(&str, Value); 0] = [];
        let l = line(LogFormat::Json, Level::Info, format_args!("{odd}"), &none);
        assert_eq!(l.trim_end().lines().count(), 1);
        assert!(!l.trim_end().chars().any(breaks_line), "{l:?}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(v["msg"], odd);
    }
}
