//! Hostile clients, exhausted descriptors, Redis outages and shutdown
//! (contract §5 and §6): each test names the failure it provokes and what a
//! client and an operator must see instead of a panic, a hang or a leak.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn redis_gw(args: &[&str]) -> (Redis, Gateway) {
    let redis = Redis::start();
    let gw = Gateway::builder().redis(&redis).args(args).start();
    (redis, gw)
}

/// Asserts the contract's JSON error shape with `status`.
fn assert_json_error(r: &Response, status: u16) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["statusCode"], status, "{v}");
    assert!(v["message"].is_string() && v["error"].is_string(), "{v}");
}

#[test]
fn smuggling_shapes_and_bad_bytes_get_400_and_a_closed_socket() {
    let gw = Gateway::builder().start();
    let cases: &[(&str, &[u8])] = &[
        (
            "two content-lengths",
            b"POST /sse/stream-ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        ),
        (
            "obsolete line folding",
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n",
        ),
        ("space in a header name", b"GET /health HTTP/1.1\r\nHo st: x\r\n\r\n"),
        ("NUL in a header value", b"GET /health HTTP/1.1\r\nHost: x\0y\r\n\r\n"),
        ("negative content-length", b"POST /sse/publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    ];
    for (name, bytes) in cases {
        let raw = send_raw(gw.addr(), bytes, T);
        let r = raw
            .response()
            .unwrap_or_else(|| panic!("{name}: no response: {:?}", raw.text()));
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert!(raw.closed, "{name}: the socket must be closed after a 400");
    }
    assert_eq!(get(gw.addr(), "/health", &[]).status, 200, "still serving");
}

#[test]
fn random_bytes_never_take_the_gateway_down() {
    let gw = Gateway::builder().start();
    let base = b"GET /sse/stream?ticket=abc&deviceIds=A,B HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-2\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let started = Instant::now();
    for i in 0..300 {
        let mut bytes = base.to_vec();
        match i % 3 {
            // Flip some bytes of a valid request.
            0 => {
                for _ in 0..(1 + next() % 8) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            // Truncate and append noise.
            1 => {
                bytes.truncate((next() as usize) % bytes.len());
                bytes.extend((0..next() % 64).map(|_| next() as u8));
                bytes.extend_from_slice(b"\r\n\r\n");
            }
            // Pure noise.
            _ => bytes = (0..(next() % 512)).map(|_| next() as u8).collect(),
        }
        // Any answer or a close is fine; the gateway must stay up and quick.
        let _ = send_raw(gw.addr(), &bytes, Duration::from_millis(300));
    }
    assert!(started.elapsed() < Duration::from_secs(120));
    let r = get(gw.addr(), "/health", &[]);
    assert_eq!(r.status, 200, "{}", gw.log());
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let gw = Gateway::builder().start();
    let mut s = TcpStream::connect(gw.addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200"], "{text}");
}

#[test]
fn a_head_sent_one_byte_at_a_time_still_parses() {
    let gw = Gateway::builder().start();
    let mut s = TcpStream::connect(gw.addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" {
        s.write_all(&[*b]).unwrap();
    }
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    assert!(
        all.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&all)
    );
}

#[test]
fn descriptor_exhaustion_backs_off_and_open_streams_keep_flowing() {
    let redis = Redis::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .args(&["--workers", "1", "--max-conns-per-ip", "1000"])
        .max_open_files(64)
        .start();
    let mut stream = data_stream(&redis, &gw, "alice", &["D1"]);
    // Far more idle connections than descriptors: the accept loop runs out.
    let mut idle = Vec::new();
    for _ in 0..120 {
        if let Ok(s) = TcpStream::connect(gw.addr()) {
            idle.push(s);
        }
    }
    // The reactor must not spin on EMFILE: measure its CPU over a second.
    let ticks_before = proc_cpu_ticks(gw.pid());
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(1)); // a measurement window, not a synchronisation
    let used = proc_cpu_ticks(gw.pid()) - ticks_before;
    let hz = 100.0; // USER_HZ on Linux
    let cpu_share = used as f64 / hz / wall.elapsed().as_secs_f64();
    assert!(
        cpu_share < 0.3,
        "reactor spins at EMFILE: {cpu_share:.2} of a core"
    );
    // The stream opened before the exhaustion still gets events.
    redis.publish(
        "mqtt:realtime:processed",
        &json!({"deviceId": "D1", "data": {"n": 1}}).to_string(),
    );
    let f = stream.expect_event("realtime-update", T);
    assert_eq!(f.json()["data"]["n"], 1);
    // Once descriptors free up, the gateway accepts again.
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(10), || {
            try_request(
                gw.addr(),
                b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
                T,
            )
            .is_ok_and(|r| {
                r.status == 200 && metric_sum(&r.text(), |n| n.contains("accept_errors"), &[]) > 0.0
            })
        }),
        "accepting resumes and the errors are counted:\n{}",
        gw.log()
    );
}

#[test]
fn redis_down_answers_503_at_once_and_streams_stay_open() {
    let (mut redis, gw) = redis_gw(&[]);
    let token = gw.token("alice", None);
    let mut stream = data_stream(&redis, &gw, "alice", &["D1"]);
    let (ticket, _) = gw.ticket_with(&token, "");
    redis.stop();
    assert!(stream.expect_event("system", T).is_system("degraded"));
    let cases = [
        ("POST", "/sse/stream-ticket".to_owned()),
        ("GET", data_path(&ticket, &["D1"])),
        ("GET", alerts_path(&ticket)),
        ("GET", format!("/sse/status?ticket={ticket}")),
    ];
    for (method, path) in cases {
        let started = Instant::now();
        let req = build_request(
            method,
            &path,
            &[("Authorization", &format!("Bearer {token}"))],
            "",
        );
        let r = request(gw.addr(), &req);
        assert_json_error(&r, 503);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    let health = get(gw.addr(), "/health", &[]);
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (503, json!("degraded"))
    );
    // The stream itself never closed: heartbeats and, after recovery, events.
    redis.restart();
    assert!(stream
        .expect_event("system", Duration::from_secs(12))
        .is_system("recovered"));
    assert!(stream.expect_event("system", T).is_system("replay-gap"));
    redis.publish("mqtt:spc:processed", r#"{"deviceId":"D1","data":{}}"#);
    stream.expect_event("spc-update", T);
}

#[test]
fn a_gateway_started_without_redis_serves_and_recovers() {
    let mut redis = Redis::start();
    redis.stop();
    let gw = Gateway::builder().redis(&redis).any_health().start();
    let h = get(gw.addr(), "/health", &[]);
    assert_eq!((h.status, h.json()["redis"].clone()), (503, json!("down")));
    redis.restart();
    assert!(wait_until(Duration::from_secs(12), || get(
        gw.addr(),
        "/health",
        &[]
    )
    .status
        == 200));
    let mut s = data_stream(&redis, &gw, "bob", &["D9"]);
    redis.publish("machine:alerts", r#"{"deviceId":"D9","alert":{}}"#);
    redis.publish("mqtt:realtime:processed", r#"{"deviceId":"D9","data":{}}"#);
    s.expect_event("realtime-update", T);
}

#[test]
fn sigint_drains_many_streams_with_randomised_retry_and_exits_0() {
    let (redis, mut gw) = redis_gw(&["--drain-secs", "3", "--max-conns-per-ip", "1000"]);
    let mut streams: Vec<SseStream> = (0..40)
        .map(|i| data_stream(&redis, &gw, &format!("u{i}"), &["D1"]))
        .collect();
    let started = Instant::now();
    // SAFETY: kill(2) on the child's own pid.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, libc::SIGINT) }, 0);
    let mut retries = std::collections::HashSet::new();
    for s in streams.iter_mut() {
        let f = s.expect_event("system", T);
        assert!(f.is_system("shutdown"), "{:?}", f.raw);
        let retry = f.retry.expect("retry with the shutdown");
        assert!((1000..=5000).contains(&retry), "{retry}");
        retries.insert(retry);
        assert!(s.is_closed(T));
    }
    assert!(retries.len() > 1, "retry hints are randomised: {retries:?}");
    let status = gw.wait_exit(Duration::from_secs(6)).expect("exited");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn drain_closes_a_client_that_never_reads_by_the_deadline() {
    let (redis, mut gw) = redis_gw(&["--drain-secs", "1", "--max-backlog-bytes", "100000000"]);
    redis.grant("slow", &["D1"]);
    let (ticket, _) = gw.ticket_for("slow", "");
    // A raw socket that reads nothing: the drain cannot flush it.
    let mut s = TcpStream::connect(gw.addr()).unwrap();
    let path = data_path(&ticket, &["D1"]);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    assert!(wait_until(T, || get(gw.addr(), "/health", &[]).json()
        ["connections"]
        == 1));
    let payload = json!({"deviceId": "D1", "data": {"pad": "x".repeat(60_000)}}).to_string();
    for _ in 0..100 {
        redis.publish("mqtt:realtime:processed", &payload);
    }
    gw.sigterm();
    let status = gw
        .wait_exit(Duration::from_secs(4))
        .expect("the drain deadline ends a stuck stream");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn slow_consumer_backlog_is_bounded_and_counted() {
    let (redis, gw) = redis_gw(&[
        "--max-backlog-bytes",
        "1000000",
        "--max-conns-per-ip",
        "100",
    ]);
    redis.grant("slow", &["D1"]);
    let (ticket, _) = gw.ticket_for("slow", "");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&gw.addr().into()).unwrap();
    let mut slow: TcpStream = sock.into();
    let path = data_path(&ticket, &["D1"]);
    slow.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut reader = data_stream(&redis, &gw, "fast", &["D1"]);
    assert!(wait_until(T, || get(gw.addr(), "/health", &[]).json()
        ["connections"]
        == 2));
    let rss_before = proc_rss_kib(gw.pid());
    let payload = json!({"deviceId": "D1", "data": {"pad": "y".repeat(20_000)}}).to_string();
    for n in 0..300 {
        redis.publish(
            "mqtt:realtime:processed",
            &payload.replace("\"pad\"", &format!("\"n\":{n},\"pad\"")),
        );
        let f = reader.expect_event("realtime-update", T);
        assert_eq!(f.json()["data"]["n"], n, "the reader keeps up, in order");
    }
    assert!(
        wait_until(T, || metric_sum(
            &gw.metrics(),
            |n| n.contains("slow_consumer"),
            &[]
        ) == 1.0),
        "{}",
        gw.metrics()
    );
    assert!(wait_until(T, || get(gw.addr(), "/health", &[]).json()
        ["connections"]
        == 1));
    // 6 MB went to a socket that took almost none of it; the gateway held
    // at most about one backlog bound of it.
    let grown = proc_rss_kib(gw.pid()).saturating_sub(rss_before);
    assert!(grown < 8 * 1024, "RSS grew {grown} KiB");
}

#[test]
fn closing_and_reopening_at_once_never_meets_429() {
    // The old stream's close may reach its (busy) reactor after the new
    // request reaches another one; the limit must still see the slot as free.
    let (redis, gw) = redis_gw(&["--workers", "4", "--max-conns-per-ip", "1000"]);
    redis.grant("reloader", &["D1"]);
    // Keep the reactors busy: 200 streams on a device that gets a flood.
    let busy: Vec<SseStream> = (0..200)
        .map(|i| data_stream(&redis, &gw, &format!("b{i}"), &["HOT"]))
        .collect();
    let flood_redis = redis.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood_stop = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut con = redis::Client::open(flood_redis)
            .unwrap()
            .get_connection()
            .unwrap();
        let payload = json!({"deviceId": "HOT", "data": {"pad": "z".repeat(2000)}}).to_string();
        while !flood_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut pipe = redis::pipe();
            for _ in 0..20 {
                pipe.cmd("PUBLISH")
                    .arg("mqtt:realtime:processed")
                    .arg(&payload)
                    .ignore();
            }
            let _ = pipe.query::<()>(&mut con);
        }
    });
    let (ticket, _) = gw.ticket_for("reloader", r#"{"purpose":"data"}"#);
    let path = data_path(&ticket, &["D1"]);
    let mut stream = SseStream::must_open(gw.addr(), &path, &[]);
    let mut refused = None;
    for i in 0..200 {
        drop(stream);
        stream = match SseStream::open(gw.addr(), &path, &[]) {
            Ok(s) => s,
            Err(r) => {
                refused = Some(format!("reload {i}: {} {}", r.status, r.text()));
                break;
            }
        };
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = flood.join();
    drop(busy);
    assert!(refused.is_none(), "{}", refused.unwrap_or_default());
}

#[test]
fn logs_name_every_refusal_but_never_a_ticket_or_token() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("lou", &["D1"]);
    let token = gw.token("lou", None);
    let (alerts_ticket, _) = gw.ticket_with(&token, r#"{"purpose":"alerts"}"#);
    let refused = SseStream::open(gw.addr(), &data_path(&alerts_ticket, &["D1"]), &[])
        .err()
        .expect("403");
    assert_eq!(refused.status, 403);
    let garbage = "garbage-ticket-7f3a";
    let refused = SseStream::open(gw.addr(), &data_path(garbage, &["D1"]), &[])
        .err()
        .expect("401");
    assert_eq!(refused.status, 401);
    let (ticket, _) = gw.ticket_with(&token, "");
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&ticket, &["D1"]),
        &[],
    ));
    assert!(wait_until(T, || gw.log().contains("stream closed")));
    let log = gw.log();
    assert!(
        log.contains("stream refused status=403 path=/sse/stream query="),
        "{log}"
    );
    assert!(
        log.contains("stream refused status=401 path=/sse/stream query="),
        "{log}"
    );
    assert!(log.contains("ticket=***"), "{log}");
    assert!(
        log.contains("stream open") && log.contains("cause=ClientClosed"),
        "{log}"
    );
    for secret in [
        alerts_ticket.as_str(),
        ticket.as_str(),
        token.as_str(),
        garbage,
    ] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}
