//! The log's reader: one thread per instance that follows the log with
//! `XREAD BLOCK` from the last entry it read and hands every entry to the
//! hub. After a lost connection (a Redis restart, `CLIENT KILL`, a
//! failover) it reads on from the same entry: what it missed meanwhile is
//! still in the log. A jump in the ids' count (`<ms>-<n>`) is a hole it can no
//! longer fill (trimmed before it read it, or a Redis that lost the log):
//! its streams get `replay-gap` there. The rules that keep ids rising and
//! every entry single are the [`Cursor`]'s.
//!
//! At start, [`preload`] reads the newest entries into the replay window,
//! so a client resuming on this instance with an id another instance gave
//! it is served from memory, exactly.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;

use log::warn;
use redis::Value;

use super::cursor::{Cursor, Delivered, Step};
use super::{event_named, EVENTS_KEY, LAST_KEY};
use crate::ingress::subscriber::backoff;
use crate::ingress::Hub;
use crate::store::connect::{Deployment, Link};
use crate::stream::frame::{Event, EventId, REPLAY_GAP};

/// How long one `XREAD` waits for new entries (within the links' read
/// timeout).
const BLOCK_MS: u64 = 1000;
/// Entries read per `XREAD` at most.
const COUNT: usize = 1024;

/// One entry of the log: its id and its field/value pairs.
pub type RawEntry = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// Reads the newest `count` entries of the log into the replay window, and
/// where reading goes on from. None when Redis cannot be reached now (the
/// reader then starts at the log's end).
pub fn preload(
    redis: &Deployment,
    hub: &Hub,
    count: usize,
    delivered: &Delivered,
) -> Option<Cursor> {
    let mut link = redis.link().ok()?;
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(EVENTS_KEY)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count.max(1))
        .query(link.con())
        .ok()?;
    let mut newest = EventId::default();
    let mut hashes = Vec::new();
    let mut newest_first = entries(reply);
    newest_first.reverse();
    for raw in &newest_first {
        let Some(entry) = parse(hub, raw) else {
            continue;
        };
        if let Some((event, device, data)) = entry.event {
            hub.preload(entry.id, event, device, data);
        }
        newest = entry.id;
        hashes.push(entry.hash);
    }
    delivered.record(newest, &hashes);
    Some(Cursor::at(newest))
}

/// Starts the reader thread from `cursor` (from the log's end when None).
pub fn start(
    redis: Arc<Deployment>,
    hub: Arc<Hub>,
    cursor: Option<Cursor>,
    delivered: Arc<Delivered>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("log-reader".into())
        .spawn(move || read(&redis, &hub, cursor, &delivered))
}

fn read(redis: &Deployment, hub: &Hub, mut cursor: Option<Cursor>, delivered: &Delivered) {
    let mut failures = 0u32;
    loop {
        let result = redis
            .link()
            .and_then(|mut link| follow(&mut link, hub, &mut cursor, delivered, &mut failures));
        if let Err(e) = result {
            if failures == 0 {
                warn!("cluster log reader: redis: {e}");
            }
            failures = failures.saturating_add(1);
            thread::sleep(backoff(failures.min(3)));
        }
    }
}

/// Reads on one connection until it fails.
fn follow(
    link: &mut Link,
    hub: &Hub,
    cursor: &mut Option<Cursor>,
    delivered: &Delivered,
    failures: &mut u32,
) -> redis::RedisResult<()> {
    let at = match cursor {
        Some(c) => c,
        None => {
            // Nothing preloaded: start at the log's newest entry.
            let reply: Value = redis::cmd("XREVRANGE")
                .arg(EVENTS_KEY)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query(link.con())?;
            let newest = entries(reply)
                .first()
                .and_then(|(id, _)| parse_id(id))
                .unwrap_or_default();
            cursor.insert(Cursor::at(newest))
        }
    };
    let mut quiet = true;
    let mut hashes = Vec::with_capacity(COUNT);
    loop {
        if quiet {
            started_over(link, hub, at)?;
        }
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(EVENTS_KEY)
            .arg(at.id.to_string())
            .query(link.con())?;
        *failures = 0;
        // [[key, [entries...]]], or nil when nothing came.
        let Value::Array(streams) = reply else {
            quiet = true;
            continue;
        };
        quiet = false;
        hashes.clear();
        for stream in streams {
            let Value::Array(mut pair) = stream else {
                continue;
            };
            let Some(list) = pair.pop() else { continue };
            for raw in entries(list) {
                hashes.push(deliver(hub, &raw, at));
            }
        }
        delivered.record(at.delivered, &hashes);
    }
}

/// After a reconnect, and whenever the log is quiet: a log whose newest id
/// is below this reader's position lost entries it read (a Redis that lost
/// it, a failover to a replica that lagged). Reading goes on from the
/// log's newest entry; its streams are told the hole once, and never get an
/// id again that is not above everything they had.
fn started_over(link: &mut Link, hub: &Hub, at: &mut Cursor) -> redis::RedisResult<()> {
    let last: Option<String> = redis::cmd("GET").arg(LAST_KEY).query(link.con())?;
    if let Some(last) = last.as_deref().and_then(EventId::parse) {
        let before = at.id;
        if at.log_newest(last) {
            warn!("cluster log: the log started over (its newest id {last} is below {before}); streams get replay-gap");
            hub.broken();
        }
    }
    Ok(())
}

/// One entry, parsed: its id, the hash of what was heard, and the event
/// (None for an entry that is not one).
struct Parsed<'a> {
    id: EventId,
    hash: u64,
    event: Option<(Event, &'a str, &'a [u8])>,
}

fn parse<'a>(hub: &Hub, (id, fields): &'a RawEntry) -> Option<Parsed<'a>> {
    let Some(id) = parse_id(id) else {
        warn!("cluster log: skipped an entry whose id is not <ms>-<n>");
        return None;
    };
    let hash = field(fields, b"h")
        .and_then(|h| std::str::from_utf8(h).ok()?.parse().ok())
        .unwrap_or(0);
    let event = field(fields, b"e").and_then(event_named);
    let device = field(fields, b"d").and_then(|d| std::str::from_utf8(d).ok());
    let data = field(fields, b"p");
    let event = match (event, device, data) {
        (Some(event), Some(device), Some(data))
            if data.len() <= hub.max_event_bytes().saturating_add(64)
                && device.len() <= 1024
                && !data.contains(&b'\n') =>
        {
            Some((event, device, data))
        }
        _ => {
            hub.metrics().dropped_not_json.fetch_add(1, Relaxed);
            warn!("cluster log: skipped entry {id}, which is not an event");
            None
        }
    };
    Some(Parsed { id, hash, event })
}

/// Hands one entry read live to the hub, by the cursor's rules; the hash
/// of what was heard (0 for none).
fn deliver(hub: &Hub, raw: &RawEntry, at: &mut Cursor) -> u64 {
    let Some(entry) = parse(hub, raw) else {
        return 0;
    };
    let marker =
        matches!(entry.event, Some((Event::System, _, data)) if data == REPLAY_GAP.as_bytes());
    let before = at.id;
    match at.entry(entry.id, marker) {
        Step::Deliver { gap_first } => {
            if gap_first {
                // Entries trimmed before this instance read them, or the log
                // started over (a Redis that lost it): a hole.
                warn!(
                    "cluster log: entries {}..{} were never read here; streams get replay-gap",
                    before.seq.wrapping_add(1),
                    entry.id.seq
                );
                hub.broken();
            }
            if let Some((event, device, data)) = entry.event {
                hub.logged(entry.id, event, device, data);
            }
        }
        Step::Skip { gap } => {
            if gap {
                warn!(
                    "cluster log: entry {} is not above {}, which streams had; streams get replay-gap",
                    entry.id, at.delivered
                );
                hub.broken();
            }
        }
    }
    entry.hash
}

fn parse_id(raw: &[u8]) -> Option<EventId> {
    EventId::parse(std::str::from_utf8(raw).ok()?)
}

/// The value of field `name` of an entry.
pub fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &[u8]) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k.as_slice() == name)
        .map(|(_, v)| v.as_slice())
}

/// The entries of an `XRANGE`/`XREVRANGE` reply (or of one stream of an
/// `XREAD` reply); anything malformed is left out.
pub fn entries(reply: Value) -> Vec<RawEntry> {
    let Value::Array(list) = reply else {
        return Vec::new();
    };
    list.into_iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let mut parts = parts.into_iter();
            let id = bytes(parts.next()?)?;
            let Value::Array(flat) = parts.next()? else {
                return None;
            };
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                fields.push((bytes(k)?, bytes(v)?));
            }
            Some((id, fields))
        })
        .collect()
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn malformed_entries_are_left_out() {
        let good = Value::Array(vec![
            bulk("5-1"),
            Value::Array(vec![bulk("d"), bulk("M3"), bulk("e"), bulk("spc-update")]),
        ]);
        let reply = Value::Array(vec![good, Value::Int(4), Value::Array(vec![bulk("6-0")])]);
        let got = entries(reply);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, b"5-1");
        assert_eq!(field(&got[0].1, b"e"), Some(&b"spc-update"[..]));
        assert_eq!(field(&got[0].1, b"d"), Some(&b"M3"[..]));
        assert!(entries(Value::Nil).is_empty());
    }
}
