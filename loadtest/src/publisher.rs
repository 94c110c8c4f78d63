//! The event source of a scenario. Against the gateway and the baseline it is
//! a paced stream of pipelined `PUBLISH` commands on the contract's Redis
//! channels, each payload carrying the device's next sequence number and the
//! wall-clock publish time in ns:
//! `{"deviceId":"d17","data":{"seq":N,"t_pub_ns":T}}`. Against the floor the
//! floor process generates the same events itself ([`crate::floor`]).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::now_ns;
use crate::resp::{self, RedisAt, Value};

/// What one publishing step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Step {
    pub sent: u64,
    /// Wall time the publishing took.
    pub secs: f64,
}

pub trait Publish {
    /// Publishes `rate` events/s for `secs`, round-robin over the devices;
    /// returns when the last event has been handed over.
    fn step(&mut self, rate: u64, secs: f64) -> Result<Step, String>;
    /// Waits (bounded) until the server has acknowledged every event handed
    /// over; fails when it refused any it must not (Redis errors).
    fn settle(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Events published so far, by device.
    fn published(&self) -> BTreeMap<String, u64>;
    /// Publishes the server refused so far, by kind (their events count as
    /// published, so they show up as lost).
    fn errors(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}

/// Writes more than this many commands in one go only when far behind.
const MAX_BATCH: u64 = 2_000;

pub struct RedisPublisher {
    writer: TcpStream,
    replies: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    channel: String,
    /// `"data"` for realtime updates, `"alert"` for machine alerts.
    field: &'static str,
    devices: Rotation,
    sent: u64,
}

impl RedisPublisher {
    pub fn connect(
        redis: impl Into<RedisAt>,
        channel: &str,
        field: &'static str,
        devices: Vec<String>,
    ) -> Result<RedisPublisher, String> {
        if devices.is_empty() {
            return Err("the publisher needs at least one device".into());
        }
        let writer = redis.into().connect()?;
        let reader = writer.try_clone().map_err(|e| e.to_string())?;
        let replies = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (r, e) = (replies.clone(), errors.clone());
        std::thread::Builder::new()
            .name("publish-replies".into())
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                while let Ok(v) = resp::read_value(&mut reader) {
                    if matches!(v, Value::Error(_)) {
                        e.fetch_add(1, Relaxed);
                    }
                    r.fetch_add(1, Relaxed);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(RedisPublisher {
            writer,
            replies,
            errors,
            channel: channel.to_owned(),
            field,
            devices: Rotation::new(devices),
            sent: 0,
        })
    }

    fn push_event(&mut self, out: &mut Vec<u8>) {
        let (_, device, seq) = self.devices.next();
        let payload = event_payload(device, self.field, seq);
        resp::encode(
            out,
            &[b"PUBLISH", self.channel.as_bytes(), payload.as_bytes()],
        );
        self.sent += 1;
    }

    /// Waits (bounded) until Redis has answered every PUBLISH sent.
    fn wait_replies(&self, limit: Duration) -> Result<(), String> {
        await_replies(
            &self.replies,
            self.sent,
            limit,
            "redis answered {} of {} PUBLISH",
        )?;
        match self.errors.load(Relaxed) {
            0 => Ok(()),
            n => Err(format!("redis refused {n} PUBLISH")),
        }
    }
}

/// The devices a publisher takes in turn, each with its count of events so
/// far (the next event's sequence number is one more).
pub struct Rotation {
    devices: Vec<String>,
    seq: Vec<u64>,
    next: usize,
}

impl Rotation {
    /// At least one device (the publishers check).
    pub fn new(devices: Vec<String>) -> Rotation {
        Rotation {
            seq: vec![0; devices.len()],
            devices,
            next: 0,
        }
    }

    /// The next device in turn (its index and name) and its event's
    /// sequence number.
    pub fn next(&mut self) -> (usize, &str, u64) {
        let d = self.next;
        self.next = (d + 1) % self.devices.len();
        self.seq[d] += 1;
        (d, &self.devices[d], self.seq[d])
    }

    /// Events published so far per device.
    pub fn published(&self) -> BTreeMap<String, u64> {
        self.devices
            .iter()
            .cloned()
            .zip(self.seq.iter().copied())
            .collect()
    }
}

/// One event of a device: `{"deviceId":"d17","<field>":{"seq":N,"t_pub_ns":T}}`
/// with the wall-clock publish time in ns.
pub fn event_payload(device: &str, field: &str, seq: u64) -> String {
    format!(
        r#"{{"deviceId":"{device}","{field}":{{"seq":{seq},"t_pub_ns":{}}}}}"#,
        now_ns()
    )
}

/// Waits (bounded by `limit`) until a reply-reading thread has counted
/// `sent` replies; `what` names the shortfall (`"... {} of {} ..."`).
pub fn await_replies(
    replies: &AtomicU64,
    sent: u64,
    limit: Duration,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while replies.load(Relaxed) < sent {
        if Instant::now() > deadline {
            let got = replies.load(Relaxed);
            let msg = what
                .replacen("{}", &got.to_string(), 1)
                .replacen("{}", &sent.to_string(), 1);
            return Err(format!("{msg} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Paces one step: `rate` events/s for `secs`, handing `batch` the number of
/// events now due (at most [`MAX_BATCH`] at once). Bounded to 3x the step's
/// length plus 5 s: a sink that cannot take the rate ends the step short.
pub fn pace(
    rate: u64,
    secs: f64,
    mut batch: impl FnMut(u64) -> Result<(), String>,
) -> Result<Step, String> {
    let total = (rate as f64 * secs).round() as u64;
    let start = Instant::now();
    let limit = secs * 3.0 + 5.0;
    let mut done = 0u64;
    while done < total {
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed > limit {
            break;
        }
        let due = ((elapsed * rate as f64) as u64).min(total);
        if due <= done {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let n = (due - done).min(MAX_BATCH);
        batch(n)?;
        done += n;
    }
    Ok(Step {
        sent: done,
        secs: start.elapsed().as_secs_f64(),
    })
}

impl Publish for RedisPublisher {
    fn step(&mut self, rate: u64, secs: f64) -> Result<Step, String> {
        let mut buf = Vec::with_capacity(256 * 1024);
        let step = pace(rate, secs, |n| {
            buf.clear();
            for _ in 0..n {
                self.push_event(&mut buf);
            }
            self.writer
                .write_all(&buf)
                .map_err(|e| format!("publish: {e}"))
        })?;
        Ok(step)
    }

    fn settle(&mut self) -> Result<(), String> {
        self.wait_replies(Duration::from_secs(10))
    }

    fn published(&self) -> BTreeMap<String, u64> {
        self.devices.published()
    }
}

impl Drop for RedisPublisher {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_taken_in_turn_each_counting_its_own_events() {
        let mut r = Rotation::new(vec!["a".into(), "b".into()]);
        let got: Vec<(usize, String, u64)> = (0..5)
            .map(|_| {
                let (i, d, n) = r.next();
                (i, d.to_owned(), n)
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, "a".into(), 1),
                (1, "b".into(), 1),
                (0, "a".into(), 2),
                (1, "b".into(), 2),
                (0, "a".into(), 3)
            ]
        );
        let published = r.published();
        assert_eq!((published["a"], published["b"]), (3, 2));
    }
}
