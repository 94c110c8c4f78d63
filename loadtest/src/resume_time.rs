//! `loadtest resume-time`: how long a stream takes to catch up on what it
//! missed. Against one gateway on a private redis-server, for each count N:
//! a stream takes one event and closes; N more events are published on its
//! device (a witness stream on the same device sees them all arrive); then
//! the stream reopens with the `Last-Event-ID` it had, and the time from
//! sending that request to parsing the last missed event is measured, with
//! the replayed events checked for order, duplicates and `replay-gap`.
//! The blocking one-stream reader here is only for this measurement; the
//! many-stream client is [`crate::client`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use sse_testkit::{access_token, build_request, parse_head, try_request, FrameReader};

use crate::lab::Lab;
use crate::protocol::{StreamKind, TargetKind};
use crate::publisher::{Publish, RedisPublisher};
use crate::scenario::{clients, seed};
use crate::wire::{json_u64, Dechunker};

#[derive(Args, Debug, Clone)]
pub struct ResumeTimeOpts {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/sse-gateway")]
    pub gateway: PathBuf,
    /// Events the stream misses, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    pub missed: Vec<u64>,
    /// Events/s while the missed events are published.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// More flags for the gateway (e.g. `--max-backlog-bytes=16777216`).
    #[arg(long, allow_hyphen_values = true)]
    pub gateway_arg: Vec<String>,
}

/// What a resuming stream got.
#[derive(Default)]
struct Caught {
    head_ms: f64,
    last_ms: f64,
    events: u64,
    out_of_order: u64,
    gaps: u64,
    /// Why it stopped before the last event, if it did.
    stopped: Option<String>,
}

pub fn run(opts: &ResumeTimeOpts) -> i32 {
    match measure(opts) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("resume-time: {e}");
            1
        }
    }
}

fn measure(opts: &ResumeTimeOpts) -> Result<bool, String> {
    let most = opts.missed.iter().copied().max().unwrap_or(1000);
    let mut lab = Lab::new(opts.gateway.clone(), PathBuf::new(), 5.0, 1)?;
    lab.gateway_args = vec![
        "--replay-events".into(),
        (most + 1000).to_string(),
        "--max-data-per-user".into(),
        "16".into(),
    ];
    lab.gateway_args.extend(opts.gateway_arg.iter().cloned());
    let running = lab.start(TargetKind::Gateway, 1)?;
    let addr = lab.target(&running).addr;
    println!("| events missed | resuming stream's head (ms) | last missed event parsed (ms) | events/s replayed | received | out of order or twice | replay-gap |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut all_ok = true;
    for (k, &n) in opts.missed.iter().enumerate() {
        let c = one_run(&lab, addr, k, n, opts.rate)?;
        let ok = c.stopped.is_none() && c.events == n && c.out_of_order == 0 && c.gaps == 0;
        all_ok &= ok;
        println!(
            "| {n} | {:.1} | {:.1} | {:.0} | {} | {} | {} |{}",
            c.head_ms,
            c.last_ms,
            c.events as f64 / (c.last_ms / 1e3).max(1e-9),
            c.events,
            c.out_of_order,
            c.gaps,
            c.stopped
                .map(|s| format!(" stopped: {s}"))
                .unwrap_or_default()
        );
    }
    Ok(all_ok)
}

fn one_run(lab: &Lab, addr: SocketAddr, k: usize, n: u64, rate: u64) -> Result<Caught, String> {
    let who = clients(
        &format!("resume{k}"),
        1,
        1,
        &format!("r{k}-"),
        StreamKind::Data,
    );
    seed(lab.redis_addr(), &who)?;
    let (user, device) = (who.user(0), who.device(0));
    let ticket = ticket(addr, &lab.secret, &user)?;
    let path = format!("/sse/stream?deviceId={device}&ticket={ticket}");
    let mut publisher = RedisPublisher::connect(
        lab.redis_addr(),
        "mqtt:realtime:processed",
        "data",
        vec![device.clone()],
    )?;

    // The witness reads everything on the device, on its own thread.
    let witness = Stream::open(addr, &path, None)?;
    let seen = Arc::new(AtomicU64::new(0));
    let seen_w = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut w = witness;
        let _ = w.read_until(n + 1, Duration::from_secs(300), |seq, _| {
            seen_w.fetch_max(seq, Relaxed);
        });
    });

    let mut first = Stream::open(addr, &path, None)?;
    publisher.step(1000, 0.001)?;
    let mut last_id = None;
    first.read_until(1, Duration::from_secs(10), |_, id| last_id = id)?;
    let last_id = last_id.ok_or("the first event came without an id")?;
    drop(first);

    publisher.step(rate, n as f64 / rate as f64)?;
    publisher.settle()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.load(Relaxed) < n + 1 {
        if Instant::now() > deadline {
            return Err(format!(
                "the witness saw {} of {}",
                seen.load(Relaxed),
                n + 1
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = reader.join();

    let t0 = Instant::now();
    let mut again = Stream::open(addr, &path, Some(&last_id))?;
    let mut c = Caught {
        head_ms: t0.elapsed().as_secs_f64() * 1e3,
        ..Caught::default()
    };
    let mut prev = 1;
    let end = again.read_until(n + 1, Duration::from_secs(300), |seq, _| {
        c.events += 1;
        if seq != prev + 1 {
            c.out_of_order += 1;
        }
        prev = prev.max(seq);
    });
    c.last_ms = t0.elapsed().as_secs_f64() * 1e3;
    c.gaps = again.gaps;
    c.stopped = end.err();
    Ok(c)
}

/// A data-stream ticket for `user`, through the gateway's ticket endpoint.
fn ticket(addr: SocketAddr, secret: &str, user: &str) -> Result<String, String> {
    let token = access_token(secret, user, None, 7200);
    let auth = format!("Bearer {token}");
    let body = r#"{"purpose":"data","ttlSeconds":3600}"#;
    let req = build_request(
        "POST",
        "/sse/stream-ticket",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body,
    );
    let r = try_request(addr, &req, Duration::from_secs(5)).map_err(|e| format!("ticket: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| format!("ticket {}: {e}", r.status))?;
    v.get("ticket")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("ticket {}: {}", r.status, r.text()))
}

/// One blocking stream, read until a given `seq`.
struct Stream {
    sock: TcpStream,
    pending: Vec<u8>,
    chunked: Option<Dechunker>,
    sse: FrameReader,
    gaps: u64,
}

impl Stream {
    fn open(addr: SocketAddr, path: &str, last_id: Option<&str>) -> Result<Stream, String> {
        let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        let _ = sock.set_nodelay(true);
        let resume = last_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        );
        sock.write_all(req.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let mut input = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some((head, start)) = parse_head(&input).map_err(|e| format!("head: {e}"))? {
                if head.status != 200 {
                    return Err(format!("stream answered {}", head.status));
                }
                return Ok(Stream {
                    sock,
                    pending: input.split_off(start),
                    chunked: head.is_chunked().then(Dechunker::default),
                    sse: FrameReader::default(),
                    gaps: 0,
                });
            }
            if Instant::now() > deadline || input.len() > 64 * 1024 {
                return Err("no stream head within 10 s".into());
            }
            match read_some(&mut sock, &mut buf)? {
                Some(0) => return Err("closed before its head".into()),
                Some(got) => input.extend_from_slice(&buf[..got]),
                None => {}
            }
        }
    }

    /// Hands each data event's `seq` and id to `on_event` until one has
    /// `seq >= until`; Err when the stream ends or `limit` passes first.
    fn read_until(
        &mut self,
        until: u64,
        limit: Duration,
        mut on_event: impl FnMut(u64, Option<String>),
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut bytes = std::mem::take(&mut self.pending);
        let mut buf = vec![0u8; 64 * 1024];
        let mut plain = Vec::new();
        let mut highest = 0;
        loop {
            let data: &[u8] = match self.chunked.as_mut() {
                Some(d) => {
                    plain.clear();
                    if d.feed(&bytes, &mut plain).map_err(|_| "bad chunk")? {
                        return Err("stream ended".into());
                    }
                    &plain
                }
                None => &bytes,
            };
            let gaps = &mut self.gaps;
            self.sse
                .feed(data, |b| match (b.event, b.data.as_deref()) {
                    (Some(b"realtime-update"), Some(d)) => {
                        if let Some(seq) = json_u64(d, b"\"seq\":") {
                            highest = highest.max(seq);
                            let id = b.id.map(|i| String::from_utf8_lossy(i).into_owned());
                            on_event(seq, id);
                        }
                    }
                    (Some(b"system"), Some(d)) if sse_testkit::find(d, b"replay-gap").is_some() => {
                        *gaps += 1;
                    }
                    _ => {}
                })
                .map_err(|_| "event too large")?;
            if highest >= until {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("seq {highest} of {until} within {limit:?}"));
            }
            bytes.clear();
            match read_some(&mut self.sock, &mut buf)? {
                Some(0) => return Err(format!("closed at seq {highest} of {until}")),
                Some(got) => bytes.extend_from_slice(&buf[..got]),
                None => {}
            }
        }
    }
}

/// One read: `Some(0)` at the end of the stream, None when nothing came
/// within the socket's read timeout.
fn read_some(sock: &mut TcpStream, buf: &mut [u8]) -> Result<Option<usize>, String> {
    match sock.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("read: {e}")),
    }
}
