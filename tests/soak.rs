//! A bounded soak: about 2,000 streams for ~40 s, half of them staying, half
//! churning (closed and reopened all the time), while events flow steadily
//! on 100 devices. Asserts what a long-running gateway must keep true:
//! readers that stayed connected lost nothing and saw nothing twice, no
//! descriptor leaked, and memory did not grow with the churn.
//!
//! The client is one mio poll loop over every socket, so the test itself
//! stays small on a 2-core machine.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use common::*;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const STAYERS: usize = 1000;
const CHURNERS: usize = 1000;
const DEVICES: usize = 100;
const RUN: Duration = Duration::from_secs(40);
/// Events per second over all devices.
const RATE: u64 = 400;
/// Churning streams closed and reopened per 100 ms tick.
const CHURN_PER_TICK: usize = 25;

struct Client {
    sock: TcpStream,
    request: Vec<u8>,
    sent: bool,
    buf: Vec<u8>,
    head_done: bool,
    /// Which user (and path) this stream is.
    idx: usize,
    device: usize,
    stayer: bool,
    /// Next `n` expected on this stream's device (stayers only).
    expect: Option<u64>,
    events: u64,
}

fn connect(gw: &Gateway, poll: &Poll, token: usize, path: &str, idx: usize) -> Client {
    let mut sock = TcpStream::connect(gw.addr()).expect("connect");
    poll.registry()
        .register(
            &mut sock,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        )
        .expect("register");
    Client {
        sock,
        request: format!("GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n").into_bytes(),
        sent: false,
        buf: Vec::new(),
        head_done: false,
        idx,
        device: idx % DEVICES,
        stayer: idx < STAYERS,
        expect: None,
        events: 0,
    }
}

/// Reads what is there and checks every event; Err on a broken promise.
fn pump(c: &mut Client, last_published: &[Option<u64>]) -> Result<bool, String> {
    if !c.sent {
        match c.sock.write(&c.request) {
            Ok(n) if n == c.request.len() => c.sent = true,
            Ok(_) => return Err("short request write".into()),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    let mut chunk = [0u8; 16 * 1024];
    let mut open = true;
    loop {
        match c.sock.read(&mut chunk) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if !c.head_done {
        let Some((head, start)) = parse_head(&c.buf).map_err(|e| e.to_string())? else {
            return Ok(open);
        };
        if head.status != 200 {
            return Err(format!("refused: {}", String::from_utf8_lossy(&c.buf)));
        }
        c.buf.drain(..start);
        c.head_done = true;
    }
    while let Some((frame, used)) = parse_frame(&c.buf, false) {
        c.buf.drain(..used);
        if frame.event.as_deref() != Some("realtime-update") {
            continue;
        }
        c.events += 1;
        let v = frame.json();
        let n = v["data"]["n"].as_u64().ok_or("no n")?;
        let d = v["data"]["d"].as_u64().ok_or("no d")? as usize;
        if d != c.device {
            return Err(format!("device {d} on a stream for {}", c.device));
        }
        if c.stayer {
            match c.expect {
                // The first event seen: anything published after the open.
                None => {}
                Some(want) if want == n => {}
                Some(want) => return Err(format!("device {d}: expected n={want}, got {n}")),
            }
            c.expect = Some(n + 1);
        }
        let _ = last_published;
    }
    Ok(open)
}

#[test]
fn two_thousand_churning_streams_lose_nothing_and_leak_nothing() {
    let redis = Redis::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .args(&["--max-conns-per-ip", "100000", "--heartbeat-secs", "1"])
        .args(&["--max-requests-per-ip", "100000"])
        .start();
    let mut con = redis.con();
    // One user per stream, each owning its one device.
    let mut pipe = redis::pipe();
    for i in 0..STAYERS + CHURNERS {
        pipe.cmd("SADD")
            .arg(format!("user:u{i}:devices"))
            .arg(format!("dev{}", i % DEVICES))
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    let paths: Vec<String> = (0..STAYERS + CHURNERS)
        .map(|i| {
            let (ticket, _) =
                gw.ticket_for(&format!("u{i}"), r#"{"purpose":"data","ttlSeconds":3600}"#);
            data_path(&ticket, &[&format!("dev{}", i % DEVICES)])
        })
        .collect();
    let fds_before = proc_fds(gw.pid());

    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(4096);
    let mut clients: HashMap<usize, Client> = HashMap::new();
    let mut next_token = 0usize;
    for (i, path) in paths.iter().enumerate() {
        clients.insert(next_token, connect(&gw, &poll, next_token, path, i));
        next_token += 1;
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
            for ev in events.iter() {
                if let Some(c) = clients.get_mut(&ev.token().0) {
                    pump(c, &[]).unwrap();
                }
            }
            get(gw.addr(), "/health", &[]).json()["connections"] == (STAYERS + CHURNERS) as u64
        }),
        "all streams open"
    );
    let rss_open = proc_rss_kib(gw.pid());

    let mut published: Vec<Option<u64>> = vec![None; DEVICES];
    let mut seq = vec![0u64; DEVICES];
    let started = Instant::now();
    let mut last_tick = Instant::now();
    let mut sent_total = 0u64;
    let mut churned = 0usize;
    let mut churn_cursor = STAYERS;
    while started.elapsed() < RUN {
        // Publish at RATE, round-robin over devices.
        let due = (started.elapsed().as_secs_f64() * RATE as f64) as u64;
        if sent_total < due {
            let mut pipe = redis::pipe();
            while sent_total < due {
                let d = (sent_total % DEVICES as u64) as usize;
                let payload = format!(
                    r#"{{"deviceId":"dev{d}","data":{{"d":{d},"n":{}}}}}"#,
                    seq[d]
                );
                pipe.cmd("PUBLISH")
                    .arg("mqtt:realtime:processed")
                    .arg(payload)
                    .ignore();
                published[d] = Some(seq[d]);
                seq[d] += 1;
                sent_total += 1;
            }
            pipe.query::<()>(&mut con).unwrap();
        }
        // Churn: close some churners, reopen them as new connections.
        if last_tick.elapsed() >= Duration::from_millis(100) {
            last_tick = Instant::now();
            for _ in 0..CHURN_PER_TICK {
                let victim = clients
                    .iter()
                    .filter(|(_, c)| !c.stayer && c.head_done)
                    .map(|(t, _)| *t)
                    .nth(churn_cursor % 7);
                churn_cursor += 1;
                let Some(t) = victim else { break };
                // A page reload: the same user closes and reopens at once.
                let i = clients.remove(&t).unwrap().idx;
                clients.insert(next_token, connect(&gw, &poll, next_token, &paths[i], i));
                next_token += 1;
                churned += 1;
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        for ev in events.iter() {
            if let Some(c) = clients.get_mut(&ev.token().0) {
                match pump(c, &published) {
                    Ok(true) => {}
                    Ok(false) if !c.stayer => {}
                    Ok(false) => panic!("a staying stream was closed:\n{}", gw.log()),
                    Err(e) => panic!("{e}\n{}", gw.log()),
                }
            }
        }
    }
    // Every stayer catches up to the last event of its device.
    let caught_up = wait_until(Duration::from_secs(15), || {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        for ev in events.iter() {
            if let Some(c) = clients.get_mut(&ev.token().0) {
                pump(c, &published).unwrap();
            }
        }
        clients
            .values()
            .filter(|c| c.stayer)
            .all(|c| c.expect == published[c.device].map(|n| n + 1))
    });
    let behind = clients
        .values()
        .filter(|c| c.stayer && c.expect != published[c.device].map(|n| n + 1))
        .count();
    assert!(caught_up, "{behind} staying streams missed events");
    assert!(churned > 2_000, "churned only {churned}");
    let rss_end = proc_rss_kib(gw.pid());

    drop(clients);
    assert!(
        wait_until(Duration::from_secs(10), || get(gw.addr(), "/health", &[])
            .json()["connections"]
            == 0),
        "every stream closed"
    );
    assert!(
        wait_until(Duration::from_secs(10), || proc_fds(gw.pid())
            <= fds_before + 2),
        "descriptors leaked: {} before, {} after",
        fds_before,
        proc_fds(gw.pid())
    );
    let grown = rss_end.saturating_sub(rss_open);
    assert!(
        grown < 32 * 1024,
        "RSS grew {grown} KiB over the churn (from {rss_open} KiB)"
    );
    eprintln!(
        "soak: {} events published, {churned} reconnects, RSS {rss_open} -> {rss_end} KiB",
        sent_total
    );
}
