//! Black-box tests of the second release's security rules (contract 7.1,
//! 7.2, 7.4 and the last bullet of 7.3), one or more per finding of the
//! security review: a ticket is never a credential, every connection makes
//! progress or goes, revocation reaches open streams on every instance,
//! minting is rate limited, and nothing a client or Redis sends grows
//! without bound. Real redis-server, real binary, raw sockets; slow
//! deadlines are tested with their flags turned down.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

fn redis_gw(args: &[&str]) -> (Redis, Gateway) {
    let redis = Redis::start();
    let gw = Gateway::builder().redis(&redis).args(args).start();
    (redis, gw)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn metric(gw: &Gateway, name: &str, labels: &[&str]) -> f64 {
    metric_sum(&gw.metrics(), |m| m == name, labels)
}

/// Publishes a `realtime-update` for `device` whose data is `n`.
fn publish_value(redis: &Redis, device: &str, n: u64) {
    let msg = json!({"deviceId": device, "data": {"n": n}}).to_string();
    redis.publish("mqtt:realtime:processed", &msg);
}

/// The next `realtime-update` must carry value `n`.
fn expect_value(s: &mut SseStream, n: u64) {
    let f = s.expect_event("realtime-update", T);
    assert_eq!(f.json()["data"]["n"], json!(n), "{}", f.raw);
}

/// Reads until the server closes the connection or `timeout` passes;
/// true when it closed.
fn closed_within(sock: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true, // reset
        }
    }
    false
}

/// A client whose receive buffer is 4 KiB: the server's writes to it stall.
fn small_buffer_client(gw: &Gateway) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&gw.addr().into(), T).unwrap();
    sock.into()
}

/// Each stream gets `system {"kind":"revoked"}` and is closed, all within a
/// second of `started` (contract 7.2).
fn revoked_within_a_second<const N: usize>(streams: [&mut SseStream; N], started: Instant) {
    for s in streams {
        let f = s.next_event(T).expect("a revoked frame");
        assert!(f.is_system("revoked"), "{}", f.raw);
        assert!(s.is_closed(T), "revoked stream left open");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
}

// ----- 1. a stream ticket is never a credential ------------------------------

#[test]
fn a_ticket_is_refused_wherever_an_access_token_is_expected() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("root", &["M1"]);
    let admin = gw.token("root", Some("admin"));
    let (ticket, id) = gw.ticket_with(&admin, r#"{"ttlSeconds": 3600}"#);
    let auth = bearer(&ticket);
    let h = [("Authorization", auth.as_str())];
    // Minting, publishing, deleting and access changes all refuse it, even
    // though both secrets are the same (the default) and it is an admin's.
    let r = post(gw.addr(), "/sse/stream-ticket", &h, "");
    assert_eq!(r.status, 401, "mint with a ticket: {}", r.text());
    let msg = r#"{"channel":"machine:alarms","message":{"deviceId":"M1","alarm":"fake"}}"#;
    let r = post(gw.addr(), "/sse/publish", &h, msg);
    assert_eq!(r.status, 401, "publish with a ticket: {}", r.text());
    let r = delete(gw.addr(), &format!("/sse/stream-ticket/{id}"), &h);
    assert_eq!(r.status, 401, "delete with a ticket: {}", r.text());
    let r = post(gw.addr(), "/sse/access-changed", &h, r#"{"userId":"root"}"#);
    assert_eq!(r.status, 401);
    // The real access token still works for all of them.
    let auth = bearer(&admin);
    let r = post(gw.addr(), "/sse/publish", &[("Authorization", &auth)], msg);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn access_tokens_honour_nbf() {
    let gw = Gateway::builder().start();
    let now = now_ms() / 1000;
    let sign = |claims: Value| sign_hs256(SECRET.as_bytes(), &claims);
    let early = sign(json!({"sub": "u", "exp": now + 600, "nbf": now + 120}));
    assert_eq!(gw.ticket(&early, "").0, 401);
    let ok = sign(json!({"sub": "u", "exp": now + 600, "nbf": now - 1}));
    assert_eq!(gw.ticket(&ok, "").0, 200);
}

// ----- 2. every connection makes progress or goes ----------------------------

/// Finding 2 as reported: pipelined requests whose responses fill the
/// socket buffers of a client that never reads.
#[test]
fn a_client_that_never_reads_its_responses_is_cut_off() {
    let gw = Gateway::builder()
        .args(&["--request-timeout-secs", "1"])
        .start();
    let mut sock = small_buffer_client(&gw);
    let one = b"GET /sse/client.js HTTP/1.1\r\nHost: x\r\n\r\n";
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 600).collect();
    sock.set_write_timeout(Some(T)).unwrap();
    // Some of it may not be taken (the server stops reading while a response
    // is stuck): that is fine, it is the point.
    let _ = sock.write_all(&many);
    let cut = wait_until(Duration::from_secs(8), || {
        metric(&gw, "sse_request_timeouts_total", &[]) >= 1.0
    });
    assert!(cut, "the stuck exchange was not cut off:\n{}", gw.metrics());
    assert!(
        closed_within(&mut sock, T),
        "the connection must be closed before every response was read"
    );
}

#[test]
fn keep_alive_connections_idle_out() {
    let gw = Gateway::builder()
        .args(&["--keepalive-idle-secs", "0.5"])
        .start();
    let mut sock = TcpStream::connect(gw.addr()).unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut sock, T), "idle keep-alive left open");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "closed too early: {took:?}"
    );
}

#[test]
fn a_stream_whose_client_takes_nothing_is_closed_after_the_write_stall() {
    // A backlog bound far away: only the stall deadline can close it.
    let (redis, gw) = redis_gw(&[
        "--write-stall-secs",
        "1",
        "--max-backlog-bytes",
        "200000000",
        "--heartbeat-secs",
        "0.2",
    ]);
    redis.grant("u1", &["M1"]);
    let (ticket, _) = gw.ticket_for("u1", "");
    let mut sock = small_buffer_client(&gw);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
        data_path(&ticket, &["M1"])
    );
    sock.write_all(req.as_bytes()).unwrap();
    assert!(wait_until(T, || metric(&gw, "sse_streams_open", &[]) == 1.0));
    // Enough to fill every socket buffer between us: 16 MB.
    let big = "x".repeat(60_000);
    let mut con = redis.con();
    for _ in 0..270 {
        let msg = json!({"deviceId": "M1", "data": big}).to_string();
        redis::cmd("PUBLISH")
            .arg("mqtt:realtime:processed")
            .arg(msg)
            .query::<()>(&mut con)
            .unwrap();
    }
    let closed = wait_until(Duration::from_secs(10), || {
        metric(
            &gw,
            "sse_slow_consumer_disconnects_total",
            &["reason=\"write_stall\""],
        ) == 1.0
    });
    assert!(closed, "no write-stall close:\n{}", gw.metrics());
    assert_eq!(metric(&gw, "sse_streams_open", &[]), 0.0);
    let backlog = ["reason=\"backlog\""];
    assert_eq!(
        metric(&gw, "sse_slow_consumer_disconnects_total", &backlog),
        0.0
    );
}

#[test]
fn a_request_that_waits_on_redis_over_two_seconds_gets_503_with_retry_after() {
    let (redis, gw) = redis_gw(&[]);
    let token = gw.token("u1", None);
    assert_eq!(gw.ticket(&token, "").0, 200);
    redis.pause();
    let started = Instant::now();
    let auth = bearer(&token);
    let r = post(
        gw.addr(),
        "/sse/stream-ticket",
        &[("Authorization", &auth)],
        "",
    );
    let took = started.elapsed();
    redis.resume();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["statusCode"], 503);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(4000),
        "answered after {took:?}"
    );
}

/// Also with a Content-Length beside it (the smuggling shape: the coding
/// overrides the length), which got 400.
#[test]
fn a_chunked_body_is_refused_with_411_and_never_read() {
    let gw = Gateway::builder().start();
    let cases: [&[u8]; 3] = [
        b"POST /sse/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /sse/stream-ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /sse/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ];
    for bytes in cases {
        let raw = send_raw(gw.addr(), bytes, T);
        let r = raw.response().expect("a response");
        assert_eq!(r.status, 411, "{}", r.text());
        assert_eq!(r.json()["error"], "Length Required");
        assert!(raw.closed, "the connection must close after 411");
    }
}

// ----- 3. revocation reaches open streams ------------------------------------

#[test]
fn deleting_a_ticket_closes_its_streams_on_every_instance_within_a_second() {
    let redis = Redis::start();
    let limits = ["--max-data-per-user", "5"];
    let a = Gateway::builder().redis(&redis).args(&limits).start();
    let b = Gateway::builder().redis(&redis).args(&limits).start();
    redis.grant("u1", &["M1"]);
    let token = a.token("u1", None);
    let (ticket, id) = a.ticket_with(&token, "");
    let (other, _) = a.ticket_with(&token, "");
    let mut on_a = SseStream::must_open(a.addr(), &data_path(&ticket, &["M1"]), &[]);
    let mut on_b = SseStream::must_open(b.addr(), &alerts_path(&ticket), &[]);
    let mut untouched = SseStream::must_open(b.addr(), &data_path(&other, &["M1"]), &[]);
    let auth = bearer(&token);
    let started = Instant::now();
    let r = delete(
        a.addr(),
        &format!("/sse/stream-ticket/{id}"),
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 204);
    revoked_within_a_second([&mut on_a, &mut on_b], started);
    // A stream of another ticket keeps flowing.
    publish_value(&redis, "M1", 7);
    expect_value(&mut untouched, 7);
    assert_eq!(metric(&b, "sse_streams_revoked_total", &[]), 1.0);
}

#[test]
fn deleting_the_key_and_publishing_on_sse_revoke_closes_the_streams() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("u1", &["M1"]);
    let (ticket, id) = gw.ticket_for("u1", "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&ticket, &["M1"]), &[]);
    redis::cmd("DEL")
        .arg(format!("sse:ticket:{id}"))
        .query::<()>(&mut redis.con())
        .unwrap();
    redis.publish("sse:revoke", &id);
    let f = s.next_event(T).expect("a revoked frame");
    assert!(f.is_system("revoked"), "{}", f.raw);
    assert!(s.is_closed(T));
    // And the ticket no longer opens anything.
    let r = SseStream::open(gw.addr(), &data_path(&ticket, &["M1"]), &[]).err();
    assert_eq!(r.map(|r| r.status), Some(401));
}

#[test]
fn an_access_change_closes_streams_on_withdrawn_devices_and_narrows_alerts() {
    let redis = Redis::start();
    let limits = ["--max-data-per-user", "5"];
    let a = Gateway::builder().redis(&redis).args(&limits).start();
    // One reactor: once its data stream is revoked, the same turn has
    // narrowed its alert stream.
    let b = Gateway::builder()
        .redis(&redis)
        .args(&limits)
        .args(&["--workers", "1"])
        .start();
    redis.grant("u1", &["M1", "M2"]);
    let token = a.token("u1", None);
    let (t1, _) = a.ticket_with(&token, "");
    let mut on_a = SseStream::must_open(a.addr(), &data_path(&t1, &["M1"]), &[]);
    let mut on_b = SseStream::must_open(b.addr(), &data_path(&t1, &["M1", "M2"]), &[]);
    let mut keeps = SseStream::must_open(b.addr(), &data_path(&t1, &["M2"]), &[]);
    let mut alerts = SseStream::must_open(b.addr(), &alerts_path(&t1), &[]);
    redis::cmd("SREM")
        .arg("user:u1:devices")
        .arg("M1")
        .query::<()>(&mut redis.con())
        .unwrap();
    let started = Instant::now();
    redis.publish("sse:access-changed", "u1");
    revoked_within_a_second([&mut on_a, &mut on_b], started);
    // The M2 stream stays; the alerts stream stays without M1's alerts.
    publish_value(&redis, "M2", 5);
    expect_value(&mut keeps, 5);
    let alert = |d: &str, n: u64| json!({"deviceId": d, "alert": {"n": n}}).to_string();
    redis.publish("machine:alerts", &alert("M1", 1));
    redis.publish("machine:alerts", &alert("M2", 2));
    let f = alerts.expect_event("machine-alert", T);
    assert_eq!(f.json()["deviceId"], "M2", "{}", f.raw);
    // A new data stream on M1 is refused now.
    let (t3, _) = a.ticket_with(&token, "");
    let r = SseStream::open(a.addr(), &data_path(&t3, &["M1"]), &[]).err();
    assert_eq!(r.map(|r| r.status), Some(403));
}

#[test]
fn embedded_access_changes_come_through_the_admin_endpoint() {
    let gw = Gateway::builder().start();
    let admin = bearer(&gw.token("root", Some("admin")));
    let h = [("Authorization", admin.as_str())];
    let body = r#"{"userId":"u1","devices":["M1","M2"]}"#;
    let r = post(gw.addr(), "/sse/access-changed", &h, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (ticket, _) = gw.ticket_for("u1", "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&ticket, &["M1"]), &[]);
    let user = bearer(&gw.token("u1", None));
    let r = post(
        gw.addr(),
        "/sse/access-changed",
        &[("Authorization", user.as_str())],
        r#"{"userId":"u1"}"#,
    );
    assert_eq!(r.status, 403, "not an admin");
    let r = post(
        gw.addr(),
        "/sse/access-changed",
        &h,
        r#"{"userId":"u1","devices":["M2"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let f = s.next_event(T).expect("a revoked frame");
    assert!(f.is_system("revoked"), "{}", f.raw);
    assert!(s.is_closed(T));
    let r = post(gw.addr(), "/sse/access-changed", &h, r#"{"user":"u1"}"#);
    assert_eq!(r.status, 400);
}

// ----- 4. the first request after a Redis restart succeeds -------------------

#[test]
fn the_first_requests_after_a_redis_restart_succeed() {
    let (mut redis, gw) = redis_gw(&[]);
    let token = gw.token("u1", None);
    // Give every store worker a connection to lose.
    for _ in 0..16 {
        assert_eq!(gw.ticket(&token, "").0, 200);
    }
    redis.restart();
    let up = wait_until(Duration::from_secs(15), || {
        get(gw.addr(), "/health", &[]).json()["redis"] == "up"
    });
    assert!(up, "never up again:\n{}", gw.log());
    for i in 0..16 {
        let (status, body) = gw.ticket(&token, "");
        assert_eq!(status, 200, "request {i} after the restart: {body}");
    }
}

// ----- 6. minting is rate limited, cluster-wide ------------------------------

#[test]
fn ticket_minting_is_limited_per_user_across_instances() {
    let redis = Redis::start();
    let args = ["--max-tickets-per-minute", "3"];
    let a = Gateway::builder().redis(&redis).args(&args).start();
    let b = Gateway::builder().redis(&redis).args(&args).start();
    let token = a.token("u1", None);
    assert_eq!(a.ticket(&token, "").0, 200);
    assert_eq!(b.ticket(&token, "").0, 200);
    assert_eq!(a.ticket(&token, "").0, 200);
    let auth = bearer(&token);
    let r = post(
        b.addr(),
        "/sse/stream-ticket",
        &[("Authorization", &auth)],
        "",
    );
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let body = r.json();
    assert_eq!(body["statusCode"], 429);
    assert_eq!(body["error"], "Too Many Requests");
    // Another user is not held back.
    assert_eq!(a.ticket(&a.token("u2", None), "").0, 200);
}

#[test]
fn embedded_minting_is_limited_too() {
    let gw = Gateway::builder()
        .args(&["--max-tickets-per-minute", "2"])
        .start();
    let token = gw.token("u1", None);
    assert_eq!(gw.ticket(&token, "").0, 200);
    assert_eq!(gw.ticket(&token, "").0, 200);
    assert_eq!(gw.ticket(&token, "").0, 429);
}

// ----- 7. nothing grows without bound ----------------------------------------

#[test]
fn a_bus_message_over_max_event_bytes_is_dropped_and_counted() {
    let (redis, gw) = redis_gw(&["--max-event-bytes", "1024"]);
    let mut s = data_stream(&redis, &gw, "u1", &["M1"]);
    let big = json!({"deviceId": "M1", "data": "x".repeat(2000)}).to_string();
    redis.publish("mqtt:realtime:processed", &big);
    publish_value(&redis, "M1", 1);
    expect_value(&mut s, 1);
    assert_eq!(
        metric(&gw, "sse_events_dropped_total", &["reason=\"too_large\""]),
        1.0
    );
    assert_eq!(get(gw.addr(), "/health", &[]).json()["redis"], "up");
}

#[test]
fn an_event_larger_than_the_backlog_bound_does_not_close_a_fast_stream() {
    let (redis, gw) = redis_gw(&["--max-backlog-bytes", "4096"]);
    let mut s = data_stream(&redis, &gw, "u1", &["M1"]);
    let big = json!({"deviceId": "M1", "data": {"n": 1, "pad": "x".repeat(20_000)}}).to_string();
    redis.publish("mqtt:realtime:processed", &big);
    expect_value(&mut s, 1);
    publish_value(&redis, "M1", 2);
    expect_value(&mut s, 2);
    assert_eq!(metric(&gw, "sse_slow_consumer_disconnects_total", &[]), 0.0);
}

#[test]
fn connections_that_are_not_streams_are_capped_per_ip() {
    let gw = Gateway::builder()
        .args(&["--max-requests-per-ip", "4"])
        .start();
    // Read from another address: this one's connections are capped.
    let open = || metric_sum_from(&gw, "127.0.0.2", "sse_connections_open");
    // The start-up probe's connection (from this address) must be gone
    // first: while the gateway still counted it, the fourth held one was
    // refused, and the count below never came.
    assert!(wait_until(T, || open() == 1.0), "only the reading one open");
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(gw.addr()).unwrap())
        .collect();
    // The reading connection is the fifth connection open.
    assert!(wait_until(T, || open() >= 5.0));
    let mut fifth = TcpStream::connect(gw.addr()).unwrap();
    assert!(closed_within(&mut fifth, T), "the fifth was kept");
    assert!(metric_sum_from(&gw, "127.0.0.2", "sse_peer_refusals_total") >= 1.0);
    drop(held);
    // Until the gateway has seen the held ones close, a new connection from
    // this address is still refused (reset): that is "not yet", not a failure.
    let health = build_request("GET", "/health", &[], "");
    assert!(wait_until(T, || try_request(gw.addr(), &health, T)
        .is_ok_and(|r| r.status == 200)));
}

/// A metric read over a connection from another loopback address (the
/// first one's connections are capped).
fn metric_sum_from(gw: &Gateway, source: &str, name: &str) -> f64 {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    sock.connect_timeout(&gw.addr().into(), T).unwrap();
    let mut sock: TcpStream = sock.into();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = sock.read_to_string(&mut text);
    metric_sum(&text, |m| m == name, &[])
}

#[test]
fn a_long_list_of_repeated_devices_is_one_device_and_too_many_is_400() {
    let (redis, gw) = redis_gw(&["--max-devices", "3"]);
    redis.grant("u1", &["M1", "M2", "M3", "M4"]);
    let (ticket, _) = gw.ticket_for("u1", "");
    let many = vec!["M1"; 1500].join(",");
    let path = format!("/sse/stream?ticket={ticket}&deviceIds={many}");
    let s = SseStream::must_open(gw.addr(), &path, &[]);
    drop(s);
    let (ticket, _) = gw.ticket_for("u1", "");
    let path = data_path(&ticket, &["M1", "M2", "M1", "M3", "M4"]);
    let r = SseStream::open(gw.addr(), &path, &[])
        .err()
        .expect("refused");
    assert_eq!(r.status, 400);
}

// ----- 8. the smaller ones ---------------------------------------------------

#[test]
fn a_wildcard_cors_origin_is_never_granted_with_credentials() {
    let gw = Gateway::builder()
        .args(&["--cors-origins", "*,http://app.example"])
        .start();
    let r = get(gw.addr(), "/health", &[("Origin", "http://evil.example")]);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    let r = get(gw.addr(), "/health", &[("Origin", "http://app.example")]);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
}

#[test]
fn a_lease_taken_for_a_request_that_gave_up_is_released() {
    // Heartbeat 25 s: a lease left behind would live 50 s.
    let (redis, gw) = redis_gw(&[]);
    let users = ["u1", "u2", "u3", "u4"];
    let mut tickets = Vec::new();
    for user in users {
        redis.grant(user, &["M1"]);
        let token = gw.token(user, None);
        for _ in 0..3 {
            assert_eq!(gw.ticket(&token, "").0, 200);
        }
        tickets.push(gw.ticket_with(&token, "").0);
    }
    redis.pause();
    // One stream request per store worker: those whose connection is live
    // write their lookup to the paused Redis and wait for its answer.
    let addr = gw.addr();
    let asks: Vec<_> = tickets
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || {
                SseStream::open(addr, &data_path(&t, &["M1"]), &[])
                    .err()
                    .map(|r| r.status)
            })
        })
        .collect();
    for ask in asks {
        assert_eq!(ask.join().unwrap(), Some(503), "timed out while Redis hung");
    }
    redis.resume();
    // The lookups run once Redis wakes and take leases; their late
    // outcomes give them back.
    let late = wait_until(T, || {
        gw.log()
            .contains("lease of a stream request that gave up released")
    });
    assert!(late, "no late outcome:\n{}", gw.log());
    let leases = || -> u64 {
        let mut con = redis.con();
        users
            .iter()
            .map(|u| {
                // The lease key (a hash of the holding instances) goes with
                // the last lease on it.
                redis::cmd("EXISTS")
                    .arg(format!("sse:leases:{{{u}:data}}"))
                    .query::<u64>(&mut con)
                    .unwrap()
            })
            .sum()
    };
    assert!(
        wait_until(T, || leases() == 0),
        "leases still held: {}",
        leases()
    );
    // Another instance is not locked out.
    let b = Gateway::builder().redis(&redis).start();
    let (ticket, _) = b.ticket_for("u1", "");
    SseStream::must_open(b.addr(), &data_path(&ticket, &["M1"]), &[]);
}

#[test]
fn values_that_are_not_utf8_in_redis_never_break_a_device() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("u1", &["M1"]);
    let mut con = redis.con();
    redis::cmd("SET")
        .arg("machine:M1:status")
        .arg(&b"{\"s\":\"\xff\xfe\"}"[..])
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SADD")
        .arg("user:u1:devices")
        .arg(&b"\xff\xfe"[..])
        .query::<()>(&mut con)
        .unwrap();
    let (ticket, _) = gw.ticket_for("u1", "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&ticket, &["M1"]), &[]);
    s.expect_event("machine-status", T);
    let (ticket, _) = gw.ticket_for("u1", r#"{"purpose":"alerts"}"#);
    let mut alerts = SseStream::must_open(gw.addr(), &alerts_path(&ticket), &[]);
    redis.publish("machine:alerts", r#"{"deviceId":"M1","alert":1}"#);
    alerts.expect_event("machine-alert", T);
}

// ----- per-IP limits hold cluster-wide (contract 7.3) ------------------------

#[test]
fn the_per_ip_limit_holds_across_instances() {
    let redis = Redis::start();
    let args = ["--max-conns-per-ip", "2"];
    let a = Gateway::builder().redis(&redis).args(&args).start();
    let b = Gateway::builder().redis(&redis).args(&args).start();
    for user in ["u1", "u2", "u3"] {
        redis.grant(user, &["M1"]);
    }
    let open = |gw: &Gateway, user: &str| {
        let (ticket, _) = gw.ticket_for(user, "");
        SseStream::open(gw.addr(), &data_path(&ticket, &["M1"]), &[])
    };
    let _one = open(&a, "u1").expect("first from this address");
    let _two = open(&b, "u2").expect("second, on the other instance");
    let refused = open(&a, "u3").err().expect("third refused");
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.json()["message"],
        "Too many connections from this IP"
    );
    // The slot comes back on the other instance when a stream closes.
    drop(_two);
    assert!(wait_until(T, || open(&a, "u3").is_ok()));
}

#[test]
fn forwarded_addresses_with_ports_and_brackets_count_ipv6_per_64() {
    let gw = Gateway::builder()
        .args(&["--trusted-proxies", "127.0.0.1", "--max-conns-per-ip", "1"])
        .args(&["--max-data-per-user", "9"])
        .start();
    let open = |xff: &str| {
        let (ticket, _) = gw.ticket_for("u1", "");
        let path = data_path(&ticket, &["Machine 1"]);
        SseStream::open(gw.addr(), &path, &[("X-Forwarded-For", xff)])
    };
    let admin = bearer(&gw.token("root", Some("admin")));
    let grant = r#"{"userId":"u1","devices":["Machine 1"]}"#;
    let r = post(
        gw.addr(),
        "/sse/access-changed",
        &[("Authorization", &admin)],
        grant,
    );
    assert_eq!(r.status, 200);
    let _first = open("[2001:db8::1]:443").expect("first of its /64");
    let same64 = open("2001:db8::2").err().expect("same /64 refused");
    assert_eq!(same64.status, 429);
    let _other = open("10.0.0.9, [2001:db8:0:1::1]:80").expect("another /64");
    let v4 = open("192.0.2.7:5678").expect("an IPv4 with a port");
    drop(v4);
}

// ----- no silent loss across a lost subscriber connection (contract 7.3) -----

#[test]
fn a_lost_subscriber_connection_is_a_replay_gap_never_a_silent_hole() {
    let (redis, gw) = redis_gw(&[]);
    let mut s = data_stream(&redis, &gw, "u1", &["M1"]);
    publish_value(&redis, "M1", 1);
    let before = s.expect_event("realtime-update", T);
    let before_id = before.id.clone().expect("an id");
    // Redis drops the subscriber: whatever is published until it is back
    // is lost, and every stream is told where.
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query::<()>(&mut redis.con())
        .unwrap();
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "replay-gap") {
        let f = s
            .next_event(Duration::from_secs(10))
            .expect("system frames");
        assert_eq!(f.event.as_deref(), Some("system"), "{}", f.raw);
        kinds.push(f.json()["kind"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(kinds, ["degraded", "recovered", "replay-gap"]);
    publish_value(&redis, "M1", 2);
    expect_value(&mut s, 2);
    // A client resuming from before the hole hears of it too, in place.
    let (ticket, _) = gw.ticket_for("u1", "");
    drop(s);
    let path = format!("{}&lastEventId={before_id}", data_path(&ticket, &["M1"]));
    let mut resumed = SseStream::must_open(gw.addr(), &path, &[]);
    let gap = resumed.next_event(T).expect("the gap marker");
    assert!(gap.is_system("replay-gap"), "{}", gap.raw);
    expect_value(&mut resumed, 2);
}
