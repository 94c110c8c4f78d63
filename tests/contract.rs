//! The external contract (`/work/shared/CONTRACT.md`), sections 2 to 5, plus
//! the command line of section 1, checked from outside: a real gateway
//! process per test, a private redis-server per test in Redis mode, and only
//! loopback sockets. One focused test per promise.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// How long an event may take to arrive.
const T: Duration = Duration::from_secs(5);

// ----- helpers -----------------------------------------------------------------

fn redis_gw(args: &[&str]) -> (Redis, Gateway) {
    let redis = Redis::start();
    let gw = Gateway::builder().redis(&redis).args(args).start();
    (redis, gw)
}

fn embedded_gw(args: &[&str]) -> Gateway {
    Gateway::builder().args(args).start()
}

fn reason(status: u16) -> &'static [&'static str] {
    match status {
        400 => &["Bad Request"],
        401 => &["Unauthorized"],
        403 => &["Forbidden"],
        404 => &["Not Found"],
        405 => &["Method Not Allowed"],
        413 => &["Payload Too Large", "Content Too Large"],
        429 => &["Too Many Requests"],
        431 => &["Request Header Fields Too Large"],
        503 => &["Service Unavailable"],
        _ => &[],
    }
}

/// `r` is `status` with the contract's JSON error body; returns the body.
#[track_caller]
fn assert_error(r: &Response, status: u16) -> Value {
    assert_eq!(r.status, status, "status; body {:?}", r.text());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v = r.json();
    assert_eq!(v["statusCode"], json!(status), "body {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {v}"
    );
    let error = v["error"].as_str().unwrap_or_default();
    assert!(reason(status).contains(&error), "error {error:?} in {v}");
    v
}

/// Opening `path` is refused with `status` and the JSON error shape.
#[track_caller]
fn assert_refused(gw: &Gateway, path: &str, headers: &[(&str, &str)], status: u16) -> Value {
    match SseStream::open(gw.addr(), path, headers) {
        Ok(s) => panic!(
            "{path}: expected {status}, got a stream ({:?})",
            s.head().status_line
        ),
        Err(r) => assert_error(&r, status),
    }
}

fn sign(secret: &str, claims: Value) -> String {
    sign_hs256(secret.as_bytes(), &claims)
}

fn now_s() -> u64 {
    now_ms() / 1000
}

/// The verified claims of a ticket signed with `secret`.
fn ticket_claims(secret: &str, ticket: &str) -> Option<Value> {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["sse"]);
    jsonwebtoken::decode::<Value>(
        ticket,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &v,
    )
    .ok()
    .map(|d| d.claims)
}

fn redis_ttl(redis: &Redis, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query(&mut redis.con()).unwrap()
}

fn redis_set(redis: &Redis, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query::<()>(&mut redis.con())
        .unwrap();
}

/// Parses `<ms>-<seq>`.
fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("bad id {id:?}"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    assert!(digits(ms) && digits(seq), "bad id {id:?}");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// `f` is exactly `id: <ms>-<seq>\nevent: <name>\ndata: <json>\n\n`, its
/// id's ms is about now and its data is one line of JSON; returns the data.
#[track_caller]
fn assert_event_frame(f: &Frame, name: &str) -> Value {
    let id = f.id.clone().unwrap_or_else(|| panic!("no id: {:?}", f.raw));
    let (ms, _) = parse_id(&id);
    assert!(
        ms.abs_diff(now_ms()) < 60_000,
        "id ms {ms} is not about now"
    );
    assert!(!f.data.contains('\n'), "data on one line: {:?}", f.raw);
    assert_eq!(
        f.raw,
        format!("id: {id}\nevent: {name}\ndata: {}\n\n", f.data),
        "exact frame bytes"
    );
    f.json()
}

/// Waits until the gateway counts no open stream, so a test about something
/// else never races a stream's close (the reload race has its own test).
#[track_caller]
fn wait_released(gw: &Gateway) {
    assert!(
        wait_until(T, || get(gw.addr(), "/health", &[]).json()["connections"]
            == 0),
        "streams still counted: {}",
        get(gw.addr(), "/health", &[]).text()
    );
}

fn metrics_value(gw: &Gateway, name: &str, labels: &[&str]) -> f64 {
    metric_sum(&gw.metrics(), |n| n.contains(name), labels)
}

// ----- 2/3. tickets -------------------------------------------------------------

#[test]
fn ticket_default_shape_and_redis_key() {
    let (redis, gw) = redis_gw(&[]);
    let (status, v) = gw.ticket(&gw.token("alice", None), "");
    assert_eq!(status, 200, "{v}");
    assert!(v["ticket"]
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));
    assert_eq!(v["expiresInSeconds"], json!(300));
    let id = v["ticketId"].as_str().unwrap();
    uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("ticketId {id:?} not a UUID: {e}"));
    let ttl = redis_ttl(&redis, &format!("sse:ticket:{id}"));
    assert!(
        (295..=300).contains(&ttl),
        "TTL of sse:ticket:{id} is {ttl}"
    );

    // An empty JSON object is the same as no body.
    let (status, v) = gw.ticket(&gw.token("alice", None), "{}");
    assert_eq!((status, v["expiresInSeconds"].clone()), (200, json!(300)));
}

#[test]
fn ticket_claims_follow_the_contract() {
    let redis = Redis::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .args(&["--ticket-secret", "other-ticket-secret"])
        .start();
    let token = gw.token("alice", None);
    for (body, purpose) in [
        ("", None),
        (r#"{"purpose":"alerts"}"#, Some("alerts")),
        (r#"{"purpose":"data","ttlSeconds":120}"#, Some("data")),
    ] {
        let (status, v) = gw.ticket(&token, body);
        assert_eq!(status, 200, "{body}: {v}");
        let ticket = v["ticket"].as_str().unwrap();
        assert!(
            ticket_claims(SECRET, ticket).is_none(),
            "ticket must be signed with --ticket-secret, not the jwt secret"
        );
        let c = ticket_claims("other-ticket-secret", ticket).expect("ticket verifies");
        assert_eq!(c["sub"], json!("alice"));
        assert_eq!(c["jti"], v["ticketId"]);
        assert_eq!(c["aud"], json!("sse"));
        assert_eq!(c.get("purpose").and_then(Value::as_str), purpose, "{c}");
        let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
        assert_eq!(exp - iat, v["expiresInSeconds"].as_u64().unwrap());
        assert!(iat.abs_diff(now_s()) <= 5);
    }
}

#[test]
fn ticket_ttl_bounds_are_inclusive() {
    let (redis, gw) = redis_gw(&[]);
    let token = gw.token("alice", None);
    for ttl in [60, 3600] {
        let (status, v) = gw.ticket(&token, &format!(r#"{{"ttlSeconds":{ttl}}}"#));
        assert_eq!(status, 200, "ttl {ttl}: {v}");
        assert_eq!(v["expiresInSeconds"], json!(ttl));
        let key = format!("sse:ticket:{}", v["ticketId"].as_str().unwrap());
        let left = redis_ttl(&redis, &key);
        assert!(left <= ttl && left >= ttl - 5, "TTL {left} for ttl {ttl}");
    }
}

#[test]
fn ticket_refuses_bad_access_tokens_with_401() {
    let (_redis, gw) = redis_gw(&[]);
    let exp = now_s() + 600;
    let good = gw.token("alice", None);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("not a jwt", Some("Bearer not.a.jwt".into())),
        ("garbage", Some("Bearer garbage".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("no scheme", Some(good.clone())),
        ("basic scheme", Some(format!("Basic {good}"))),
        (
            "badly signed",
            Some(format!(
                "Bearer {}",
                sign("wrong-secret", json!({"sub": "alice", "exp": exp}))
            )),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                sign(SECRET, json!({"sub": "alice", "exp": now_s() - 60}))
            )),
        ),
        (
            "no sub",
            Some(format!("Bearer {}", sign(SECRET, json!({"exp": exp})))),
        ),
    ];
    for (what, auth) in cases {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = post(gw.addr(), "/sse/stream-ticket", &headers, "");
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_error(&r, 401);
    }
}

#[test]
fn ticket_refuses_bad_bodies_with_400() {
    let (_redis, gw) = redis_gw(&[]);
    let auth = format!("Bearer {}", gw.token("alice", None));
    for body in [
        "not json",
        "{\"ttlSeconds\":",
        r#"{"ttlSeconds":59}"#,
        r#"{"ttlSeconds":3601}"#,
        r#"{"ttlSeconds":0}"#,
        r#"{"ttlSeconds":-300}"#,
        r#"{"purpose":"everything"}"#,
        r#"{"purpose":"ALERTS"}"#,
        r#"{"purpose":5}"#,
    ] {
        let r = post(
            gw.addr(),
            "/sse/stream-ticket",
            &[("Authorization", &auth)],
            body,
        );
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_error(&r, 400);
    }
}

#[test]
fn ticket_delete_revokes_at_once_and_only_for_its_owner() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let alice = format!("Bearer {}", gw.token("alice", None));
    let bob = format!("Bearer {}", gw.token("bob", None));
    let (ticket, id) = gw.ticket_for("alice", "");
    let path = data_path(&ticket, &["D1"]);
    let url = format!("/sse/stream-ticket/{id}");

    // Someone else cannot delete it (to them it is unknown: 404, as §3
    // lists), and it keeps working.
    let r = delete(gw.addr(), &url, &[("Authorization", &bob)]);
    assert_error(&r, 404);
    let r = delete(gw.addr(), &url, &[]);
    assert_error(&r, 401);
    drop(SseStream::must_open(gw.addr(), &path, &[]));

    // Its owner can, once.
    let r = delete(gw.addr(), &url, &[("Authorization", &alice)]);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("sse:ticket:{id}"))
        .query(&mut redis.con())
        .unwrap();
    assert_eq!(exists, 0, "Redis key survived the DELETE");
    assert_refused(&gw, &path, &[], 401);
    let r = delete(gw.addr(), &url, &[("Authorization", &alice)]);
    assert_error(&r, 404);
    let r = delete(
        gw.addr(),
        "/sse/stream-ticket/00000000-0000-4000-8000-000000000000",
        &[("Authorization", &alice)],
    );
    assert_error(&r, 404);
}

// ----- 3. stream refusals ---------------------------------------------------------

#[test]
fn stream_401_for_missing_garbage_badly_signed_or_expired_tickets() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let jti = uuid::Uuid::new_v4().to_string();
    redis_set(&redis, &format!("sse:ticket:{jti}"), "alice");
    let claims = |exp: u64| json!({"sub": "alice", "jti": jti, "iat": now_s() - 100, "exp": exp, "aud": "sse"});
    let expired = sign(SECRET, claims(now_s() - 30));
    let badly_signed = sign("wrong-secret", claims(now_s() + 300));
    let wrong_aud = sign(
        SECRET,
        json!({"sub": "alice", "jti": jti, "iat": now_s(), "exp": now_s() + 300, "aud": "api"}),
    );
    let access_token = gw.token("alice", None);
    for (what, path) in [
        ("missing", "/sse/stream?deviceId=D1".to_owned()),
        ("empty", "/sse/stream?ticket=&deviceId=D1".to_owned()),
        (
            "garbage",
            "/sse/stream?ticket=garbage&deviceId=D1".to_owned(),
        ),
        ("badly signed", data_path(&badly_signed, &["D1"])),
        ("expired", data_path(&expired, &["D1"])),
        ("wrong audience", data_path(&wrong_aud, &["D1"])),
        ("access token", data_path(&access_token, &["D1"])),
        ("alerts missing", "/sse/alerts".to_owned()),
        ("alerts garbage", alerts_path("x.y.z")),
        ("alerts expired", alerts_path(&expired)),
    ] {
        let r = SseStream::open(gw.addr(), &path, &[]).err();
        let r = r.unwrap_or_else(|| panic!("{what}: a stream opened"));
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_error(&r, 401);
    }
    // The same claims, unexpired and well signed, do open: the 401s above
    // were for the reasons named.
    let fine = sign(SECRET, claims(now_s() + 300));
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&fine, &["D1"]),
        &[],
    ));
}

#[test]
fn stream_401_for_a_ticket_whose_redis_key_is_gone() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, id) = gw.ticket_for("alice", "");
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&ticket, &["D1"]),
        &[],
    ));
    let _: i64 = redis::cmd("DEL")
        .arg(format!("sse:ticket:{id}"))
        .query(&mut redis.con())
        .unwrap();
    assert_refused(&gw, &data_path(&ticket, &["D1"]), &[], 401);
    assert_refused(&gw, &alerts_path(&ticket), &[], 401);

    // Well signed, never issued (no key): 401 too.
    let never = sign(
        SECRET,
        json!({"sub": "alice", "jti": uuid::Uuid::new_v4().to_string(), "iat": now_s(), "exp": now_s() + 300, "aud": "sse"}),
    );
    assert_refused(&gw, &data_path(&never, &["D1"]), &[], 401);
}

#[test]
fn stream_403_when_the_purpose_does_not_match() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (alerts, _) = gw.ticket_for("alice", r#"{"purpose":"alerts"}"#);
    let (data, _) = gw.ticket_for("alice", r#"{"purpose":"data"}"#);
    assert_refused(&gw, &data_path(&alerts, &["D1"]), &[], 403);
    assert_refused(&gw, &alerts_path(&data), &[], 403);
    // And each works where it belongs.
    let a = SseStream::must_open(gw.addr(), &alerts_path(&alerts), &[]);
    let d = SseStream::must_open(gw.addr(), &data_path(&data, &["D1"]), &[]);
    drop((a, d));
}

#[test]
fn purposeless_ticket_works_on_both_endpoints() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", r#"{"ttlSeconds":300}"#);
    let mut a = SseStream::must_open(gw.addr(), &alerts_path(&ticket), &[]);
    let mut d = SseStream::must_open(gw.addr(), &data_path(&ticket, &["D1"]), &[]);
    redis.publish("machine:alerts", r#"{"deviceId":"D1","alert":{"code":1}}"#);
    redis.publish(
        "mqtt:realtime:processed",
        r#"{"deviceId":"D1","data":{"v":1}}"#,
    );
    a.expect_event("machine-alert", T);
    d.expect_event("realtime-update", T);
}

#[test]
fn stream_403_for_a_device_the_user_does_not_own() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1", "D2"]);
    redis.grant("bob", &["D3"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    for devices in [&["D3"][..], &["D1", "D3"], &["D9"], &["D2", "D1", "D4"]] {
        let v = assert_refused(&gw, &data_path(&ticket, devices), &[], 403);
        assert!(v["message"].is_string());
    }
    // A user with no devices at all.
    let (carol, _) = gw.ticket_for("carol", "");
    assert_refused(&gw, &data_path(&carol, &["D1"]), &[], 403);
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&ticket, &["D1", "D2"]),
        &[],
    ));
}

#[test]
fn admin_streams_any_device_without_ownership() {
    let (redis, gw) = redis_gw(&[]);
    let (ticket, _) = gw.ticket_with(&gw.token("root", Some("admin")), "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&ticket, &["X1", "X2"]), &[]);
    redis.publish("mqtt:spc:processed", r#"{"deviceId":"X2","data":{}}"#);
    assert_eq!(s.expect_event("spc-update", T).json()["deviceId"], "X2");
}

#[test]
fn stream_400_for_bad_device_lists() {
    let (redis, gw) = redis_gw(&[]);
    let long128 = "d".repeat(128);
    let long129 = "d".repeat(129);
    let eleven: Vec<String> = (1..=11).map(|n| format!("D{n}")).collect();
    let mut owned: Vec<&str> = eleven.iter().map(String::as_str).collect();
    owned.push(&long128);
    owned.push(&long129);
    redis.grant("alice", &owned);
    let (ticket, _) = gw.ticket_for("alice", "");
    let base = format!("/sse/stream?ticket={ticket}");
    for (what, query) in [
        ("no device", String::new()),
        ("empty deviceId", "&deviceId=".to_owned()),
        ("empty deviceIds", "&deviceIds=".to_owned()),
        ("empty entry", "&deviceIds=D1,,D2".to_owned()),
        ("trailing comma", "&deviceIds=D1,".to_owned()),
        ("11 devices", format!("&deviceIds={}", eleven.join(","))),
        ("129-byte id", format!("&deviceId={long129}")),
        ("129-byte id in a list", format!("&deviceIds=D1,{long129}")),
    ] {
        let r = SseStream::open(gw.addr(), &format!("{base}{query}"), &[]).err();
        let r = r.unwrap_or_else(|| panic!("{what}: a stream opened"));
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_error(&r, 400);
    }
    // The boundaries themselves are fine: 10 devices, a 128-byte id.
    let ten = &eleven[..10];
    drop(SseStream::must_open(
        gw.addr(),
        &format!("{base}&deviceIds={}", ten.join(",")),
        &[],
    ));
    wait_released(&gw);
    drop(SseStream::must_open(
        gw.addr(),
        &format!("{base}&deviceId={long128}"),
        &[],
    ));
}

#[test]
fn max_devices_flag_bounds_a_data_stream() {
    let (redis, gw) = redis_gw(&["--max-devices", "3"]);
    redis.grant("alice", &["A", "B", "C", "D"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    assert_refused(&gw, &data_path(&ticket, &["A", "B", "C", "D"]), &[], 400);
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&ticket, &["A", "B", "C"]),
        &[],
    ));
}

// ----- 3. stream success ------------------------------------------------------------

#[test]
fn stream_head_and_preamble_are_exact() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    for path in [data_path(&ticket, &["D1"]), alerts_path(&ticket)] {
        let mut s = SseStream::must_open(gw.addr(), &path, &[]);
        let head = s.head().clone();
        assert_eq!(head.status_line, "HTTP/1.1 200 OK");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert_eq!(head.header("cache-control"), Some("no-cache, no-transform"));
        assert_eq!(head.header("x-accel-buffering"), Some("no"));
        assert_eq!(
            head.header("content-length"),
            None,
            "a stream has no length"
        );
        // At once, with nothing published: retry then a comment.
        let first = s
            .next_frame(Duration::from_secs(2))
            .expect("preamble within 2 s");
        assert!(
            s.raw_bytes().starts_with(b"retry: 3000\n:"),
            "first bytes {:?}",
            String::from_utf8_lossy(s.raw_bytes())
        );
        assert_eq!(first.retry, Some(3000));
        assert!(first.comment, "a comment line in {:?}", first.raw);
        assert!(first.event.is_none() && first.data.is_empty());
    }
}

#[test]
fn machine_status_once_per_device_from_redis() {
    let (redis, gw) = redis_gw(&[]);
    redis_set(
        &redis,
        "machine:A:status",
        r#"{"state":"running","rpm":1200}"#,
    );
    redis_set(&redis, "machine:C:status", r#"{"state":"idle"}"#);
    let mut s = data_stream(&redis, &gw, "alice", &["A", "B", "C"]);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let f = s.expect_event("machine-status", T);
        let v = f.json();
        assert!(!f.data.contains('\n'));
        seen.push((
            v["deviceId"].as_str().unwrap().to_owned(),
            v["data"].clone(),
        ));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("A".to_owned(), json!({"state":"running","rpm":1200})),
            ("C".to_owned(), json!({"state":"idle"})),
        ]
    );
    // B has no status: the next event is the live one, no third snapshot.
    redis.publish(
        "mqtt:realtime:processed",
        r#"{"deviceId":"B","data":{"n":1}}"#,
    );
    let f = s.expect_event("realtime-update", T);
    assert_eq!(f.json()["deviceId"], "B");
}

#[test]
fn include_status_false_sends_no_snapshot() {
    let (redis, gw) = redis_gw(&[]);
    redis_set(&redis, "machine:A:status", r#"{"state":"running"}"#);
    redis.grant("alice", &["A"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    // Any case of `false`, as a query string written by hand may have it.
    for (n, value) in ["false", "False", "0"].into_iter().enumerate() {
        let path = format!("{}&includeStatus={value}", data_path(&ticket, &["A"]));
        let mut s = SseStream::must_open(gw.addr(), &path, &[]);
        redis.publish(
            "mqtt:realtime:processed",
            &format!(r#"{{"deviceId":"A","data":{{"n":{n}}}}}"#),
        );
        let f = s.expect_event("realtime-update", T);
        assert_eq!(f.json()["data"]["n"], n, "includeStatus={value}");
    }
}

// ----- 4. events --------------------------------------------------------------------

#[test]
fn data_channels_become_their_events_with_exact_frames() {
    let (redis, gw) = redis_gw(&[]);
    let mut s = data_stream(&redis, &gw, "alice", &["D1"]);
    for (channel, event) in [
        ("mqtt:realtime:processed", "realtime-update"),
        ("mqtt:spc:processed", "spc-update"),
        ("mqtt:spc-series:processed", "spc-series-update"),
    ] {
        let msg = json!({"deviceId": "D1", "data": {"devId": "D1", "Data": {"T1": 220.5, "ch": channel}}, "timestamp": "2026-01-27T12:34:56.789Z"});
        assert_eq!(
            redis.publish(channel, &msg.to_string()),
            1,
            "one subscriber"
        );
        let f = s.expect_event(event, T);
        assert_eq!(assert_event_frame(&f, event), msg, "data is the message");
    }
}

#[test]
fn alert_channels_become_their_events_with_exact_frames() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", r#"{"purpose":"alerts"}"#);
    let mut s = SseStream::must_open(gw.addr(), &alerts_path(&ticket), &[]);
    let alert = json!({"deviceId": "D1", "alert": {"level": "high", "text": "über\ttemp"}, "timestamp": "2026-01-01T00:00:00.000Z"});
    redis.publish("machine:alerts", &alert.to_string());
    let f = s.expect_event("machine-alert", T);
    assert_eq!(assert_event_frame(&f, "machine-alert"), alert);
    let alarm = json!({"deviceId": "D1", "alarm": {"code": 17, "active": true}, "timestamp": "x"});
    redis.publish("machine:alarms", &alarm.to_string());
    let f = s.expect_event("alarm-update", T);
    assert_eq!(assert_event_frame(&f, "alarm-update"), alarm);
}

#[test]
fn missing_timestamp_is_set_to_the_receive_time() {
    let (redis, gw) = redis_gw(&[]);
    let mut s = data_stream(&redis, &gw, "alice", &["D1"]);
    let before = now_ms();
    // Pretty-printed on purpose: the frame must still be one data line.
    let msg = "{\n  \"deviceId\": \"D1\",\n  \"data\": {\"v\": [1, 2]}\n}";
    redis.publish("mqtt:spc-series:processed", msg);
    let f = s.expect_event("spc-series-update", T);
    let v = assert_event_frame(&f, "spc-series-update");
    let after = now_ms();
    assert_eq!(v["deviceId"], "D1");
    assert_eq!(v["data"], json!({"v": [1, 2]}));
    let ts = v["timestamp"].as_str().expect("timestamp added");
    let at = iso_to_ms(ts).unwrap_or_else(|| panic!("timestamp {ts:?} is not ISO-8601 UTC ms"));
    assert!(
        at + 1000 >= before && at <= after + 1000,
        "timestamp {ts} not the receive time"
    );
}

#[test]
fn event_ids_strictly_increase_over_many_events() {
    let (redis, gw) = redis_gw(&[]);
    let mut s = data_stream(&redis, &gw, "alice", &["D1", "D2"]);
    let channels = [
        "mqtt:realtime:processed",
        "mqtt:spc:processed",
        "mqtt:spc-series:processed",
    ];
    let n = 300;
    let mut con = redis.con();
    let mut pipe = redis::pipe();
    for i in 0..n {
        let msg = json!({"deviceId": if i % 2 == 0 { "D1" } else { "D2" }, "data": {"i": i}});
        pipe.cmd("PUBLISH")
            .arg(channels[i % 3])
            .arg(msg.to_string())
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    let mut last: Option<(u64, u64)> = None;
    for i in 0..n {
        let f = s
            .next_event(T)
            .unwrap_or_else(|| panic!("event {i} of {n} missing"));
        assert_eq!(f.json()["data"]["i"], json!(i), "order");
        let id = parse_id(f.id.as_deref().expect("id"));
        if let Some(prev) = last {
            assert!(id.1 > prev.1, "seq {id:?} after {prev:?}");
            assert!(id.0 >= prev.0, "ms {id:?} after {prev:?}");
        }
        last = Some(id);
    }
}

#[test]
fn data_streams_see_only_their_devices() {
    let (redis, gw) = redis_gw(&[]);
    let mut a = data_stream(&redis, &gw, "ua", &["A"]);
    let mut b = data_stream(&redis, &gw, "ub", &["B"]);
    let mut ab = data_stream(&redis, &gw, "uab", &["A", "B"]);
    let pub_ = |d: &str, n: u32| {
        redis.publish(
            "mqtt:realtime:processed",
            &json!({"deviceId": d, "data": {"n": n}}).to_string(),
        )
    };
    pub_("B", 1);
    pub_("A", 2);
    pub_("B", 3);
    pub_("A", 4);
    let take = |s: &mut SseStream, k: usize| -> Vec<(String, u64)> {
        (0..k)
            .map(|_| {
                let v = s.expect_event("realtime-update", T).json();
                (
                    v["deviceId"].as_str().unwrap().to_owned(),
                    v["data"]["n"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let want = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(d, n)| (d.to_string(), *n)).collect()
    };
    assert_eq!(take(&mut a, 2), want(&[("A", 2), ("A", 4)]));
    assert_eq!(take(&mut b, 2), want(&[("B", 1), ("B", 3)]));
    assert_eq!(
        take(&mut ab, 4),
        want(&[("B", 1), ("A", 2), ("B", 3), ("A", 4)])
    );
    // Device ids are matched exactly, not by prefix or case.
    pub_("AA", 5);
    pub_("a", 6);
    pub_("A", 7);
    a.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 7);
}

#[test]
fn alerts_reach_owners_and_admins_only() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["A1", "A2"]);
    redis.grant("bob", &["B1"]);
    let open = |token: &str| {
        let (t, _) = gw.ticket_with(token, r#"{"purpose":"alerts"}"#);
        SseStream::must_open(gw.addr(), &alerts_path(&t), &[])
    };
    let mut alice = open(&gw.token("alice", None));
    let mut bob = open(&gw.token("bob", None));
    let mut admin = open(&gw.token("root", Some("admin")));
    redis.publish("machine:alerts", r#"{"deviceId":"B1","alert":{"n":1}}"#);
    redis.publish("machine:alarms", r#"{"deviceId":"Z9","alarm":{"n":2}}"#);
    redis.publish("machine:alarms", r#"{"deviceId":"A2","alarm":{"n":3}}"#);
    redis.publish("machine:alerts", r#"{"deviceId":"A1","alert":{"n":4}}"#);

    let f = alice.expect_event("alarm-update", T);
    assert_eq!(f.json()["deviceId"], "A2", "alice sees no B1/Z9");
    assert_eq!(
        alice.expect_event("machine-alert", T).json()["deviceId"],
        "A1"
    );
    assert_eq!(
        bob.expect_event("machine-alert", T).json()["deviceId"],
        "B1"
    );
    // Bob's sentinel comes next: none of the other devices' events reached him.
    redis.publish("machine:alerts", r#"{"deviceId":"B1","alert":{"n":5}}"#);
    bob.expect_sentinel("machine-alert", T, |f| f.json()["alert"]["n"] == 5);
    let got: Vec<String> = (0..4)
        .map(|_| {
            let f = admin.next_event(T).expect("admin event");
            format!(
                "{}:{}",
                f.event.as_deref().unwrap(),
                f.json()["deviceId"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "machine-alert:B1",
            "alarm-update:Z9",
            "alarm-update:A2",
            "machine-alert:A1"
        ]
    );
}

#[test]
fn data_and_alert_events_stay_on_their_own_streams() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let mut alerts = SseStream::must_open(gw.addr(), &alerts_path(&ticket), &[]);
    let mut data = SseStream::must_open(gw.addr(), &data_path(&ticket, &["D1"]), &[]);
    redis.publish("mqtt:realtime:processed", r#"{"deviceId":"D1","data":{}}"#);
    redis.publish("machine:alerts", r#"{"deviceId":"D1","alert":{}}"#);
    redis.publish("mqtt:spc:processed", r#"{"deviceId":"D1","data":{}}"#);
    redis.publish("machine:alarms", r#"{"deviceId":"D1","alarm":{}}"#);
    data.expect_event("realtime-update", T);
    data.expect_event("spc-update", T);
    alerts.expect_event("machine-alert", T);
    alerts.expect_event("alarm-update", T);
    // One sentinel per stream, published after everything else: each comes
    // next, so no event of the other kind reached either stream.
    for (channel, kind) in [
        ("mqtt:realtime:processed", "data"),
        ("machine:alerts", "alert"),
    ] {
        redis.publish(
            channel,
            &json!({"deviceId": "D1", kind: {"sentinel": true}}).to_string(),
        );
    }
    data.expect_sentinel("realtime-update", T, |f| {
        f.json()["data"]["sentinel"] == true
    });
    alerts.expect_sentinel("machine-alert", T, |f| {
        f.json()["alert"]["sentinel"] == true
    });
}

#[test]
fn bad_redis_messages_are_dropped_and_counted() {
    let (redis, gw) = redis_gw(&[]);
    let mut s = data_stream(&redis, &gw, "alice", &["D1"]);
    let drop_metric = |gw: &Gateway| metrics_value(gw, "drop", &[]);
    let before = drop_metric(&gw);
    for bad in [
        "not json",
        "",
        "[1,2,3]",
        r#"{"data":{"v":1}}"#,
        r#"{"deviceId":5,"data":{}}"#,
        r#"{"deviceId":null}"#,
        r#"{"deviceId":"D1","data":"#,
    ] {
        redis.publish("mqtt:realtime:processed", bad);
    }
    redis.publish(
        "mqtt:realtime:processed",
        r#"{"deviceId":"D1","data":{"ok":true}}"#,
    );
    let f = s.expect_event("realtime-update", T);
    assert_eq!(f.json()["data"], json!({"ok": true}));
    // Counted (the good message came after, so all seven were handled).
    assert_eq!(drop_metric(&gw) - before, 7.0, "seven drops counted");
    let r = get(gw.addr(), "/health", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    redis.publish(
        "mqtt:realtime:processed",
        r#"{"deviceId":"D1","data":{"n":2}}"#,
    );
    s.expect_event("realtime-update", T);
}

#[test]
fn heartbeats_arrive_at_the_configured_period() {
    let (redis, gw) = redis_gw(&["--heartbeat-secs", "0.2"]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    // Both streams beat at once; their arrival is judged by the gateway's
    // own `ts` (the second stream is read after the first, from the buffer).
    let opened = now_ms();
    let start = Instant::now();
    let mut streams = [
        SseStream::must_open(gw.addr(), &data_path(&ticket, &["D1"]), &[]),
        SseStream::must_open(gw.addr(), &alerts_path(&ticket), &[]),
    ];
    for (i, s) in streams.iter_mut().enumerate() {
        let mut stamps = Vec::new();
        while stamps.len() < 5 {
            let f = s
                .next_frame(Duration::from_secs(2))
                .unwrap_or_else(|| panic!("heartbeat {} missing", stamps.len()));
            if f.is_control() {
                continue;
            }
            assert_eq!(f.event.as_deref(), Some("system"), "{:?}", f.raw);
            assert!(f.id.is_none(), "heartbeats carry no id: {:?}", f.raw);
            let v = f.json();
            assert_eq!(v["kind"], "heartbeat");
            assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
            let ts = v["ts"].as_str().unwrap();
            let at = iso_to_ms(ts).unwrap_or_else(|| panic!("ts {ts:?}"));
            assert!(at.abs_diff(now_ms()) < 3000, "ts {ts} is not now");
            assert_eq!(
                f.raw,
                format!("event: system\ndata: {{\"kind\":\"heartbeat\",\"ts\":\"{ts}\"}}\n\n")
            );
            stamps.push(at);
        }
        if i == 0 {
            // Read live: 5 periods of 0.2 s.
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(800) && took <= Duration::from_secs(3),
                "5 heartbeats took {took:?}"
            );
        }
        let span = stamps[4].saturating_sub(opened);
        assert!(
            (800..=3000).contains(&span),
            "stream {i}: 5th beat {span} ms after open"
        );
        for w in stamps.windows(2) {
            let gap = w[1].saturating_sub(w[0]);
            assert!(
                (100..=1000).contains(&gap),
                "stream {i}: beats {gap} ms apart: {stamps:?}"
            );
        }
    }
}

// ----- 3. status, health, metrics, routing ----------------------------------------

#[test]
fn status_describes_the_open_streams() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1", "D2"]);
    let (data_ticket, _) = gw.ticket_for("alice", r#"{"purpose":"data"}"#);
    let before = now_ms();
    let _s = SseStream::must_open(gw.addr(), &data_path(&data_ticket, &["D1", "D2"]), &[]);
    let r = get(gw.addr(), &format!("/sse/status?ticket={data_ticket}"), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["userId"], "alice");
    assert_eq!(v["ticketPurpose"], "data");
    assert_eq!(
        v["connections"],
        json!({"alerts": 0, "data": 1, "total": 1})
    );
    assert_eq!(v["limits"], json!({"alerts": 1, "data": 1}));
    let active = v["activeConnections"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{v}");
    let c = &active[0];
    assert!(c["id"].as_str().is_some_and(|i| !i.is_empty()));
    assert_eq!(c["purpose"], "data");
    assert_eq!(c["deviceCount"], 2);
    assert_eq!(c["devices"], json!(["D1", "D2"]));
    let at = iso_to_ms(c["connectedAt"].as_str().unwrap()).expect("connectedAt ISO");
    assert!(
        at + 1000 >= before && at <= now_ms() + 1000,
        "connectedAt {at}"
    );
    assert!(
        c["uptime"].as_u64().is_some_and(|u| u < 5),
        "uptime {}",
        c["uptime"]
    );

    // A purpose-less ticket of the same user sees the same streams.
    let (any, _) = gw.ticket_for("alice", "");
    let v = get(gw.addr(), &format!("/sse/status?ticket={any}"), &[]).json();
    assert_eq!(v["ticketPurpose"], "any");
    assert_eq!(v["connections"]["total"], 1);
}

#[test]
fn status_reports_numeric_user_ids_as_numbers() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("42", &["D1"]);
    let token = sign(SECRET, json!({"sub": 42, "exp": now_s() + 600}));
    let (ticket, _) = gw.ticket_with(&token, "");
    let _s = SseStream::must_open(gw.addr(), &data_path(&ticket, &["D1"]), &[]);
    let v = get(gw.addr(), &format!("/sse/status?ticket={ticket}"), &[]).json();
    assert_eq!(v["userId"], json!(42), "{v}");
    assert_eq!(v["connections"]["data"], 1);
}

#[test]
fn status_401_without_a_live_ticket() {
    let (_redis, gw) = redis_gw(&[]);
    assert_error(&get(gw.addr(), "/sse/status", &[]), 401);
    assert_error(&get(gw.addr(), "/sse/status?ticket=garbage", &[]), 401);
    let (ticket, id) = gw.ticket_for("alice", "");
    let auth = format!("Bearer {}", gw.token("alice", None));
    assert_eq!(
        delete(
            gw.addr(),
            &format!("/sse/stream-ticket/{id}"),
            &[("Authorization", &auth)]
        )
        .status,
        204
    );
    assert_error(
        &get(gw.addr(), &format!("/sse/status?ticket={ticket}"), &[]),
        401,
    );
}

#[test]
fn health_reports_redis_up() {
    let (_redis, gw) = redis_gw(&[]);
    let r = get(gw.addr(), "/health", &[]);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["redis"], "up");
    assert_eq!(v["connections"], 0);
    assert!(v["uptimeSeconds"].is_u64(), "{v}");
}

#[test]
fn health_counts_open_streams() {
    let (redis, gw) = redis_gw(&[]);
    let s = data_stream(&redis, &gw, "alice", &["D1"]);
    assert_eq!(get(gw.addr(), "/health", &[]).json()["connections"], 1);
    drop(s);
    assert!(
        wait_until(T, || get(gw.addr(), "/health", &[]).json()["connections"]
            == 0),
        "a closed stream is no longer counted"
    );
}

#[test]
fn redis_outage_degrades_health_and_streams_then_recovers() {
    let (mut redis, gw) = redis_gw(&[]);
    let (ticket, _) = gw.ticket_with(&gw.token("root", Some("admin")), "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&ticket, &["D1"]), &[]);
    redis.stop();
    let f = s.expect_event("system", T);
    assert!(f.is_system("degraded"), "{:?}", f.raw);
    assert!(
        wait_until(T, || {
            let r = get(gw.addr(), "/health", &[]);
            r.status == 503 && r.json()["status"] == "degraded" && r.json()["redis"] == "down"
        }),
        "/health: {}",
        get(gw.addr(), "/health", &[]).text()
    );
    redis.restart();
    let f = s.expect_event("system", Duration::from_secs(12));
    assert!(f.is_system("recovered"), "{:?}", f.raw);
    // What was published during the outage is lost: said at this point.
    let f = s.expect_event("system", T);
    assert!(f.is_system("replay-gap"), "{:?}", f.raw);
    assert!(wait_until(T, || get(gw.addr(), "/health", &[]).status == 200));
    redis.publish("mqtt:realtime:processed", r#"{"deviceId":"D1","data":{}}"#);
    s.expect_event("realtime-update", T);
}

#[test]
fn metrics_are_prometheus_text_and_counters_move() {
    let (redis, gw) = redis_gw(&["--heartbeat-secs", "0.2"]);
    let r = get(gw.addr(), "/metrics", &[]);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    assert!(text.contains("# TYPE "), "{text}");
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "sample line {line:?}");
    }
    let rt = r#"event="realtime-update""#;
    let received0 = metric_sum(&text, |n| n.contains("received"), &[rt]);
    let delivered0 = metric_sum(&text, |n| n.contains("delivered"), &[rt]);
    let rej = |gw: &Gateway, s: &str| metrics_value(gw, "reject", &[&format!("status=\"{s}\"")]);
    let (r401, r404) = (rej(&gw, "401"), rej(&gw, "404"));

    let mut a = data_stream(&redis, &gw, "ua", &["D1"]);
    let mut b = data_stream(&redis, &gw, "ub", &["D1"]);
    let open = metrics_value(&gw, "open", &[r#"purpose="data""#]);
    assert_eq!(open, 2.0, "open data streams");
    for n in 0..3 {
        redis.publish(
            "mqtt:realtime:processed",
            &json!({"deviceId": "D1", "data": {"n": n}}).to_string(),
        );
    }
    for s in [&mut a, &mut b] {
        for _ in 0..3 {
            s.expect_event("realtime-update", T);
        }
    }
    assert!(
        wait_until(T, || {
            let text = gw.metrics();
            metric_sum(&text, |n| n.contains("received"), &[rt]) == received0 + 3.0
                && metric_sum(&text, |n| n.contains("delivered"), &[rt]) == delivered0 + 6.0
        }),
        "received +3 and delivered +6:\n{}",
        gw.metrics()
    );
    a.expect_heartbeat(T);
    assert!(wait_until(T, || metrics_value(&gw, "heartbeat", &[]) >= 1.0));

    assert_error(&get(gw.addr(), "/sse/status?ticket=x", &[]), 401);
    assert_error(&get(gw.addr(), "/nowhere", &[]), 404);
    assert!(wait_until(T, || rej(&gw, "401") == r401 + 1.0
        && rej(&gw, "404") == r404 + 1.0));
}

#[test]
fn unknown_paths_are_404() {
    let (_redis, gw) = redis_gw(&[]);
    for path in [
        "/",
        "/nope",
        "/sse",
        "/sse/streams",
        "/sse/stream/x",
        "/health/x",
    ] {
        let r = get(gw.addr(), path, &[]);
        assert_eq!(r.status, 404, "{path}");
        assert_error(&r, 404);
    }
}

#[test]
fn wrong_methods_are_405_with_allow() {
    let (_redis, gw) = redis_gw(&[]);
    for (method, path, allowed) in [
        ("GET", "/sse/stream-ticket", "POST"),
        ("PUT", "/sse/stream-ticket", "POST"),
        ("POST", "/health", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("POST", "/sse/stream", "GET"),
        ("POST", "/sse/alerts", "GET"),
        ("PATCH", "/sse/status", "GET"),
        ("GET", "/sse/publish", "POST"),
        ("GET", "/sse/stream-ticket/abc", "DELETE"),
    ] {
        let r = request(gw.addr(), &build_request(method, path, &[], ""));
        assert_error(&r, 405);
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow"));
        let list: Vec<&str> = allow.split(',').map(str::trim).collect();
        assert!(list.contains(&allowed), "{method} {path}: Allow {allow:?}");
        assert!(!list.contains(&method), "{method} {path}: Allow {allow:?}");
    }
}

#[test]
fn cors_preflight_and_headers_for_allowed_origins() {
    let (redis, gw) = redis_gw(&["--cors-origins", "http://app.example,https://b.example"]);
    let preflight = |origin: &str| {
        request(
            gw.addr(),
            &build_request(
                "OPTIONS",
                "/sse/stream-ticket",
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", "POST"),
                    (
                        "Access-Control-Request-Headers",
                        "authorization, content-type",
                    ),
                ],
                "",
            ),
        )
    };
    for origin in ["http://app.example", "https://b.example"] {
        let r = preflight(origin);
        assert_eq!(r.status, 204, "{origin}: {}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        let methods = r.header("access-control-allow-methods").unwrap_or_default();
        assert!(methods.contains("POST"), "methods {methods:?}");
        let headers = r
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            headers.contains("authorization") && headers.contains("content-type"),
            "headers {headers:?}"
        );
    }
    let r = preflight("http://evil.example");
    assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
    assert_eq!(r.header("access-control-allow-credentials"), None);

    // Actual responses carry the origin too, streams included.
    let r = get(gw.addr(), "/health", &[("Origin", "http://app.example")]);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    let r = get(gw.addr(), "/health", &[("Origin", "http://evil.example")]);
    assert_eq!(r.header("access-control-allow-origin"), None);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let s = SseStream::must_open(
        gw.addr(),
        &data_path(&ticket, &["D1"]),
        &[("Origin", "http://app.example")],
    );
    assert_eq!(
        s.head().header("access-control-allow-origin"),
        Some("http://app.example")
    );
    assert_eq!(
        s.head().header("access-control-allow-credentials"),
        Some("true")
    );
}

// ----- 3. publish ---------------------------------------------------------------------

#[test]
fn publish_requires_an_admin_bearer() {
    let (_redis, gw) = redis_gw(&[]);
    let body = r#"{"channel":"mqtt:realtime:processed","message":{"deviceId":"D1","data":{}}}"#;
    assert_error(&post(gw.addr(), "/sse/publish", &[], body), 401);
    let bad = "Bearer garbage";
    assert_error(
        &post(gw.addr(), "/sse/publish", &[("Authorization", bad)], body),
        401,
    );
    let user = format!("Bearer {}", gw.token("alice", None));
    assert_error(
        &post(gw.addr(), "/sse/publish", &[("Authorization", &user)], body),
        403,
    );
}

#[test]
fn publish_delivers_like_a_redis_publish() {
    let (redis, gw) = redis_gw(&[]);
    let admin = format!("Bearer {}", gw.token("root", Some("admin")));
    let mut s = data_stream(&redis, &gw, "alice", &["D1"]);
    redis.grant("alice", &["D1"]);
    let (at, _) = gw.ticket_for("alice", r#"{"purpose":"alerts"}"#);
    let mut alerts = SseStream::must_open(gw.addr(), &alerts_path(&at), &[]);
    for (channel, event, msg, stream) in [
        (
            "mqtt:spc:processed",
            "spc-update",
            json!({"deviceId": "D1", "data": {"CYCN": 8810}, "timestamp": "t1"}),
            &mut s,
        ),
        (
            "machine:alarms",
            "alarm-update",
            json!({"deviceId": "D1", "alarm": {"on": true}, "timestamp": "t2"}),
            &mut alerts,
        ),
    ] {
        let body = json!({"channel": channel, "message": msg}).to_string();
        let r = post(
            gw.addr(),
            "/sse/publish",
            &[("Authorization", &admin)],
            &body,
        );
        assert!(r.status == 200 || r.status == 202, "{}", r.text());
        let f = stream.expect_event(event, T);
        assert_eq!(assert_event_frame(&f, event), msg);
    }
    // Unknown channel.
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &admin)],
        r#"{"channel":"machine:other","message":{"deviceId":"D1"}}"#,
    );
    assert_error(&r, 400);
    // What the bus drops is refused here too: two deviceIds.
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &admin)],
        r#"{"channel":"mqtt:realtime:processed","message":{"deviceId":"D1","deviceId":"D2"}}"#,
    );
    assert_error(&r, 400);
    // A valid publish after the refused ones comes next: nothing of them
    // reached the stream. The message arrives as written (key order kept),
    // as the same bytes published on Redis would.
    let sentinel = r#"{"channel":"mqtt:realtime:processed","message":{"data":{"sentinel":true},"deviceId":"D1"}}"#;
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &admin)],
        sentinel,
    );
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    let f = s.expect_sentinel("realtime-update", T, |f| {
        f.json()["data"]["sentinel"] == true
    });
    assert!(
        f.data
            .starts_with(r#"{"data":{"sentinel":true},"deviceId":"D1","timestamp":""#),
        "{}",
        f.data
    );
}

// ----- 4. Last-Event-ID ----------------------------------------------------------------

fn publish_n(redis: &Redis, device: &str, n: u64) {
    redis.publish(
        "mqtt:realtime:processed",
        &json!({"deviceId": device, "data": {"n": n}}).to_string(),
    );
}

fn received_realtime(gw: &Gateway) -> f64 {
    metrics_value(gw, "received", &[r#"event="realtime-update""#])
}

/// How a resuming client names its last event.
#[derive(Clone, Copy)]
enum Named {
    Header,
    Query,
    /// An empty `Last-Event-ID:` header (no header) and the query parameter.
    EmptyHeaderAndQuery,
}

fn replay_case(named: Named) {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let path = data_path(&ticket, &["D1"]);
    let mut s = SseStream::must_open(gw.addr(), &path, &[]);
    for n in 1..=3 {
        publish_n(&redis, "D1", n);
    }
    let mut last = String::new();
    for n in 1..=3 {
        let f = s.expect_event("realtime-update", T);
        assert_eq!(f.json()["data"]["n"], n);
        last = f.id.unwrap();
    }
    drop(s);
    publish_n(&redis, "D1", 4);
    publish_n(&redis, "OTHER", 99);
    publish_n(&redis, "D1", 5);
    // The gateway has them (they are in its window) before the reconnect.
    assert!(wait_until(T, || received_realtime(&gw) >= 6.0));
    wait_released(&gw);

    let query = format!("{path}&lastEventId={last}");
    let mut s = match named {
        Named::Header => SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", &last)]),
        Named::Query => SseStream::must_open(gw.addr(), &query, &[]),
        Named::EmptyHeaderAndQuery => {
            SseStream::must_open(gw.addr(), &query, &[("Last-Event-ID", "")])
        }
    };
    let mut prev = parse_id(&last);
    for n in [4, 5] {
        let f = s.expect_event("realtime-update", T);
        assert_eq!(f.json()["data"]["n"], n, "missed events, in order");
        assert_eq!(f.json()["deviceId"], "D1");
        let id = parse_id(f.id.as_deref().unwrap());
        assert!(id.1 > prev.1, "{id:?} after {prev:?}");
        prev = id;
    }
    publish_n(&redis, "D1", 6);
    let f = s.expect_event("realtime-update", T);
    assert_eq!(f.json()["data"]["n"], 6, "no duplicate, then live");
    publish_n(&redis, "D1", 7);
    s.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 7);
}

#[test]
fn last_event_id_header_replays_missed_events() {
    replay_case(Named::Header);
}

#[test]
fn last_event_id_query_parameter_replays_missed_events() {
    replay_case(Named::Query);
}

#[test]
fn an_empty_last_event_id_header_does_not_hide_the_query_parameter() {
    replay_case(Named::EmptyHeaderAndQuery);
}

#[test]
fn unknown_last_event_id_gives_a_replay_gap() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    publish_n(&redis, "D1", 1);
    assert!(wait_until(T, || received_realtime(&gw) >= 1.0));
    let (ticket, _) = gw.ticket_for("alice", "");
    let path = data_path(&ticket, &["D1"]);
    for id in ["not-an-id", "1-999999999", "garbage"] {
        let mut s = SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", id)]);
        let f = s.expect_event("system", T);
        assert!(f.is_system("replay-gap"), "{id}: {:?}", f.raw);
        assert!(f.id.is_none(), "{:?}", f.raw);
        drop(s);
        wait_released(&gw);
    }
}

/// A gateway in either mode and how to publish `{"deviceId":d,"data":{"n":n}}`
/// to it; the publish returns once the gateway has the event.
fn either_mode(redis_mode: bool, args: &[&str]) -> (Option<Redis>, Gateway) {
    if redis_mode {
        let (redis, gw) = redis_gw(args);
        redis.grant("alice", &["D1", "D2"]);
        (Some(redis), gw)
    } else {
        (None, embedded_gw(args))
    }
}

fn publish_to(redis: Option<&Redis>, gw: &Gateway, device: &str, n: u64) {
    match redis {
        Some(redis) => {
            let before = received_realtime(gw);
            publish_n(redis, device, n);
            assert!(wait_until(T, || received_realtime(gw) > before));
        }
        None => {
            let admin = gw.token("root", Some("admin"));
            let body = json!({"channel": "mqtt:realtime:processed",
                "message": {"deviceId": device, "data": {"n": n}}});
            let auth = format!("Bearer {admin}");
            let r = post(
                gw.addr(),
                "/sse/publish",
                &[("Authorization", &auth)],
                &body.to_string(),
            );
            assert!(r.status == 200 || r.status == 202, "{}", r.text());
        }
    }
}

fn too_old_id_case(redis_mode: bool) {
    let (redis, gw) = either_mode(redis_mode, &["--replay-events", "3"]);
    let redis = redis.as_ref();
    let (ticket, _) = match redis {
        Some(_) => gw.ticket_for("alice", ""),
        None => gw.ticket_with(&gw.token("root", Some("admin")), ""),
    };
    let path = data_path(&ticket, &["D1"]);
    let mut s = SseStream::must_open(gw.addr(), &path, &[]);
    publish_to(redis, &gw, "D1", 0);
    let first = s.expect_event("realtime-update", T).id.unwrap();
    drop(s);
    wait_released(&gw);
    // The window of 3 keeps 5, D2's 99 and 6; 0 to 4 are gone.
    for n in 1..=5 {
        publish_to(redis, &gw, "D1", n);
    }
    publish_to(redis, &gw, "D2", 99);
    publish_to(redis, &gw, "D1", 6);
    // Each round's live event joins the window for the next: 5, 99, 6 then
    // 99, 6, 7.
    let rounds: [(&str, &str, [u64; 2], u64); 2] = [
        ("header", first.as_str(), [5, 6], 7),
        ("query", "0-0", [6, 7], 8),
    ];
    for (how, last, held, live) in rounds {
        let mut s = match how {
            "header" => SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", last)]),
            _ => SseStream::must_open(gw.addr(), &format!("{path}&lastEventId={last}"), &[]),
        };
        let gap = s.expect_event("system", T);
        assert!(gap.is_system("replay-gap"), "{how}: {:?}", gap.raw);
        publish_to(redis, &gw, "D1", live);
        // After the gap: the window's events, then the live one, in order.
        // `publish_to` waits for the event to be heard, not to reach this
        // stream's reactor, so the window may still hold one older event
        // (the newest not yet routed comes live instead): the held ones
        // must all come, nothing older than one before them.
        let mut got = Vec::new();
        while got.last() != Some(&live) {
            let f = s.expect_event("realtime-update", T);
            got.push(f.json()["data"]["n"].as_u64().unwrap_or(u64::MAX));
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{how}: {got:?}");
        assert!(
            got[0] + 1 >= held[0],
            "{how}: older than the window: {got:?}"
        );
        assert!(
            held.iter().all(|n| got.contains(n)),
            "{how}: the window's events after the gap: {got:?}"
        );
        drop(s);
        wait_released(&gw);
    }
}

#[test]
fn a_too_old_last_event_id_gets_replay_gap_then_the_windows_events_redis() {
    too_old_id_case(true);
}

#[test]
fn a_too_old_last_event_id_gets_replay_gap_then_the_windows_events_embedded() {
    too_old_id_case(false);
}

#[test]
fn a_last_event_id_far_ahead_of_the_log_is_a_replay_gap_at_once_in_both_modes() {
    for redis_mode in [true, false] {
        let (redis, gw) = either_mode(redis_mode, &[]);
        let redis = redis.as_ref();
        let (ticket, _) = match redis {
            Some(_) => gw.ticket_for("alice", ""),
            None => gw.ticket_with(&gw.token("root", Some("admin")), ""),
        };
        let path = data_path(&ticket, &["D1"]);
        publish_to(redis, &gw, "D1", 0);
        let soon = format!("{}-0", now_ms() + 4_000);
        let ids = [
            "99999999999999-0",
            "18446744073709551615-18446744073709551615",
            &soon,
        ];
        for (n, id) in (1..).zip(ids) {
            let mut s = SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", id)]);
            // Published right away, below the client's id: it must not be
            // swallowed by a wait for an id that never comes.
            publish_to(redis, &gw, "D1", n);
            let gap = s.expect_event("system", T);
            assert!(gap.is_system("replay-gap"), "{id}: {:?}", gap.raw);
            // An event published before the open can still reach the
            // reactors after the stream joined (`publish_to` waits for the
            // leader to hear it, not for delivery): it comes as a live one,
            // before `n`. `n` itself must come.
            loop {
                let f = s.expect_event("realtime-update", T);
                let got = f.json()["data"]["n"].as_u64();
                if got == Some(n) {
                    break;
                }
                assert!(
                    got.is_some_and(|g| g < n),
                    "{id}: live after the gap: {:?}",
                    f.raw
                );
            }
            drop(s);
            wait_released(&gw);
        }
    }
}

#[test]
fn a_wait_for_a_last_event_id_just_ahead_of_the_log_ends_in_replay_gap() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let path = data_path(&ticket, &["D1"]);
    publish_n(&redis, "D1", 0);
    assert!(wait_until(T, || received_realtime(&gw) >= 1.0));
    // Close enough ahead to be waited for (another instance's reader may
    // be that far ahead), but no entry ever has it or passes it.
    let ahead = format!("{}-0", now_ms() + 900);
    let opened = Instant::now();
    let mut s = SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", &ahead)]);
    publish_n(&redis, "D1", 1);
    let gap = s.expect_event("system", T);
    assert!(gap.is_system("replay-gap"), "{:?}", gap.raw);
    let waited = opened.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "the wait is bounded (about 2 s): {waited:?}"
    );
    publish_n(&redis, "D1", 2);
    s.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 2);
}

// ----- 5. limits ------------------------------------------------------------------------

#[test]
fn second_stream_of_a_user_gets_429_with_counts() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let _data = SseStream::must_open(gw.addr(), &data_path(&ticket, &["D1"]), &[]);
    let (other, _) = gw.ticket_for("alice", r#"{"purpose":"data"}"#);
    let v = assert_refused(&gw, &data_path(&other, &["D1"]), &[], 429);
    assert_eq!(
        v["currentConnections"],
        json!({"alerts": 0, "data": 1, "total": 1})
    );
    assert_eq!(v["limits"], json!({"alerts": 1, "data": 1}));

    // Data and alerts have separate limits.
    let _alerts = SseStream::must_open(gw.addr(), &alerts_path(&ticket), &[]);
    let v = assert_refused(&gw, &alerts_path(&ticket), &[], 429);
    assert_eq!(
        v["currentConnections"],
        json!({"alerts": 1, "data": 1, "total": 2})
    );
    assert_eq!(v["limits"], json!({"alerts": 1, "data": 1}));
    // Other users are not affected.
    let _bob = data_stream(&redis, &gw, "bob", &["D1"]);
}

#[test]
fn per_user_limits_follow_the_flags() {
    let (redis, gw) = redis_gw(&["--max-data-per-user", "2", "--max-alerts-per-user", "2"]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let _keep: Vec<SseStream> = [
        data_path(&ticket, &["D1"]),
        data_path(&ticket, &["D1"]),
        alerts_path(&ticket),
        alerts_path(&ticket),
    ]
    .iter()
    .map(|p| SseStream::must_open(gw.addr(), p, &[]))
    .collect();
    let v = assert_refused(&gw, &data_path(&ticket, &["D1"]), &[], 429);
    assert_eq!(v["limits"], json!({"alerts": 2, "data": 2}));
    assert_refused(&gw, &alerts_path(&ticket), &[], 429);
}

#[test]
fn per_ip_limit_gives_429() {
    let (redis, gw) = redis_gw(&["--max-conns-per-ip", "2"]);
    let _a = data_stream(&redis, &gw, "u1", &["D1"]);
    let _b = data_stream(&redis, &gw, "u2", &["D1"]);
    redis.grant("u3", &["D1"]);
    let (ticket, _) = gw.ticket_for("u3", "");
    let v = assert_refused(&gw, &data_path(&ticket, &["D1"]), &[], 429);
    assert!(v.get("currentConnections").is_some(), "{v}");
    assert!(v.get("limits").is_some(), "{v}");
    assert_refused(&gw, &alerts_path(&ticket), &[], 429);
    // Plain requests are not streams: still served.
    assert_eq!(get(gw.addr(), "/health", &[]).status, 200);
}

#[test]
fn page_reload_never_sees_429() {
    let (redis, gw) = redis_gw(&[]);
    redis.grant("alice", &["D1"]);
    let (ticket, _) = gw.ticket_for("alice", "");
    let (at, _) = gw.ticket_for("alice", r#"{"purpose":"alerts"}"#);
    for path in [data_path(&ticket, &["D1"]), alerts_path(&at)] {
        let mut s = SseStream::must_open(gw.addr(), &path, &[]);
        s.next_frame(T).expect("preamble");
        for i in 0..20 {
            drop(s);
            s = match SseStream::open(gw.addr(), &path, &[]) {
                Ok(s) => s,
                Err(r) => panic!("reload {i}: {} {}", r.status, r.text()),
            };
            s.next_frame(T).expect("preamble");
        }
    }
}

#[test]
fn trusted_proxy_forwarded_for_names_the_client() {
    let (redis, gw) = redis_gw(&[
        "--trusted-proxies",
        "127.0.0.1/32",
        "--max-conns-per-ip",
        "1",
    ]);
    redis.grant("u1", &["D1"]);
    redis.grant("u2", &["D1"]);
    redis.grant("u3", &["D1"]);
    redis.grant("u4", &["D1"]);
    redis.grant("u5", &["D1"]);
    let t = |u: &str| data_path(&gw.ticket_for(u, "").0, &["D1"]);
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    let _a = SseStream::must_open(gw.addr(), &t("u1"), &xff("10.0.0.1"));
    let _b = SseStream::must_open(gw.addr(), &t("u2"), &xff("10.0.0.2"));
    // Same forwarded client: same limit.
    assert_refused(&gw, &t("u3"), &xff("10.0.0.1"), 429);
    // The right-most untrusted entry is the client.
    assert_refused(&gw, &t("u3"), &xff("192.168.7.7, 10.0.0.2"), 429);
    let _c = SseStream::must_open(gw.addr(), &t("u3"), &xff("10.0.0.2, 10.0.0.3"));
    // A trusted hop at the right is skipped.
    assert_refused(&gw, &t("u4"), &xff("10.0.0.1, 127.0.0.1"), 429);
    // No header: the proxy itself is the client.
    let _d = SseStream::must_open(gw.addr(), &t("u4"), &[]);
    assert_refused(&gw, &t("u5"), &[], 429);
}

#[test]
fn forwarded_for_is_ignored_without_trusted_proxies() {
    let (redis, gw) = redis_gw(&["--max-conns-per-ip", "1"]);
    redis.grant("u1", &["D1"]);
    redis.grant("u2", &["D1"]);
    let t = |u: &str| data_path(&gw.ticket_for(u, "").0, &["D1"]);
    let _a = SseStream::must_open(gw.addr(), &t("u1"), &[("X-Forwarded-For", "10.0.0.1")]);
    assert_refused(&gw, &t("u2"), &[("X-Forwarded-For", "10.0.0.2")], 429);
}

#[test]
fn slow_consumer_is_closed_and_others_keep_up() {
    let (redis, gw) = redis_gw(&["--max-backlog-bytes", "262144"]);
    let slow = data_stream(&redis, &gw, "slow", &["D1"]);
    let mut fast = data_stream(&redis, &gw, "fast", &["D1"]);
    let pad = "x".repeat(8 * 1024);
    let n = 2000; // ~16 MiB: more than any socket buffer holds
    let mut con = redis.con();
    let start = Instant::now();
    // Bursts of 80 KiB, well under the bound, so a reader that keeps up
    // never holds a backlog near it.
    let burst = 10;
    for chunk in 0..(n / burst) {
        let mut pipe = redis::pipe();
        for i in 0..burst {
            let msg = json!({"deviceId": "D1", "data": {"i": chunk * burst + i, "pad": pad}});
            pipe.cmd("PUBLISH")
                .arg("mqtt:realtime:processed")
                .arg(msg.to_string())
                .ignore();
        }
        pipe.query::<()>(&mut con).unwrap();
        // The fast reader keeps reading as events are published.
        for i in 0..burst {
            let f = fast.expect_event("realtime-update", T);
            assert_eq!(f.json()["data"]["i"], json!(chunk * burst + i));
        }
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "fast stream slowed: {took:?}"
    );
    assert!(
        wait_until(T, || metrics_value(&gw, "slow", &[]) >= 1.0),
        "slow consumer counted:\n{}",
        gw.metrics()
    );
    let mut slow = slow;
    assert!(
        slow.is_closed(Duration::from_secs(10)),
        "slow stream closed"
    );
    // The fast one is still open and live.
    publish_n(&redis, "D1", 7);
    assert_eq!(
        fast.expect_event("realtime-update", T).json()["data"]["n"],
        7
    );
}

// ----- 5. hostile input -------------------------------------------------------------------

#[test]
fn oversized_head_is_431() {
    let (_redis, gw) = redis_gw(&[]);
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let raw = send_raw(gw.addr(), big.as_bytes(), T);
    let r = raw
        .response()
        .unwrap_or_else(|| panic!("no response: {:?}", raw.text()));
    assert_error(&r, 431);
    assert!(raw.closed, "connection closed after 431");
    // A large but legal head is fine.
    let ok = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(7000)
    );
    assert_eq!(request(gw.addr(), ok.as_bytes()).status, 200);
}

#[test]
fn oversized_body_is_413() {
    let (_redis, gw) = redis_gw(&[]);
    let auth = format!("Bearer {}", gw.token("alice", None));
    let body = " ".repeat(20_000);
    let raw_req = format!(
        "POST /sse/stream-ticket HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = send_raw(gw.addr(), raw_req.as_bytes(), T);
    let r = raw
        .response()
        .unwrap_or_else(|| panic!("no response: {:?}", raw.text()));
    assert_error(&r, 413);
    // 16 KiB exactly is within the limit.
    let body = format!("{{}}{}", " ".repeat(16 * 1024 - 2));
    let r = post(
        gw.addr(),
        "/sse/stream-ticket",
        &[("Authorization", &auth)],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn malformed_requests_get_400_and_close() {
    let (_redis, gw) = redis_gw(&[]);
    for bad in [
        &b"NOT A REQUEST\r\n\r\n"[..],
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\nHost: x\n\n",
        b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"POST /sse/publish HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let raw = send_raw(gw.addr(), bad, T);
        let r = raw.response().unwrap_or_else(|| {
            panic!(
                "{:?}: no response {:?}",
                String::from_utf8_lossy(bad),
                raw.text()
            )
        });
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(bad));
        assert_error(&r, 400);
        assert!(
            raw.closed,
            "{:?}: connection left open",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(get(gw.addr(), "/health", &[]).status, 200);
}

#[test]
fn incomplete_head_is_closed_after_10_seconds() {
    let gw = embedded_gw(&[]);
    let start = Instant::now();
    let raw = send_raw(
        gw.addr(),
        b"GET /health HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(14),
    );
    let took = start.elapsed();
    assert!(raw.closed, "still open after {took:?}");
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(13),
        "closed after {took:?}"
    );
    let r = raw.response();
    assert!(
        r.as_ref().is_none_or(|r| r.status >= 400),
        "unexpected answer {:?}",
        raw.text()
    );
}

// ----- 1. command line -----------------------------------------------------------------

const CLI: Duration = Duration::from_secs(10);

#[test]
fn help_lists_every_flag_with_its_env_twin() {
    let (code, out, _) = run_cli(&["--help"], &[], CLI);
    assert_eq!(code, Some(0));
    for (flag, env) in [
        ("--listen", "SSE_LISTEN"),
        ("--redis-url", "REDIS_URL"),
        ("--jwt-secret", "JWT_SECRET"),
        ("--ticket-secret", "SSE_TICKET_SECRET"),
        // Contract 7.1: identity providers and secret files.
        ("--jwt-secret-file", "JWT_SECRET_FILE"),
        ("--ticket-secret-file", "SSE_TICKET_SECRET_FILE"),
        ("--jwt-public-key", "JWT_PUBLIC_KEY"),
        ("--jwks-file", "JWKS_FILE"),
        ("--jwks-url", "JWKS_URL"),
        ("--jwks-refresh-secs", "JWKS_REFRESH_SECS"),
        ("--jwt-issuer", "JWT_ISSUER"),
        ("--jwt-audience", "JWT_AUDIENCE"),
        ("--heartbeat-secs", "SSE_HEARTBEAT_SECS"),
        ("--max-conns-per-ip", "SSE_MAX_CONNS_PER_IP"),
        ("--max-alerts-per-user", "SSE_MAX_ALERTS_PER_USER"),
        ("--max-data-per-user", "SSE_MAX_DATA_PER_USER"),
        ("--max-devices", "SSE_MAX_DEVICES"),
        ("--trusted-proxies", "SSE_TRUSTED_PROXIES"),
        ("--cors-origins", "SSE_CORS_ORIGINS"),
        ("--workers", "SSE_WORKERS"),
        ("--max-backlog-bytes", "SSE_MAX_BACKLOG_BYTES"),
        ("--replay-events", "SSE_REPLAY_EVENTS"),
        ("--replay-secs", "SSE_REPLAY_SECS"),
        ("--max-rate-per-device", "SSE_MAX_RATE_PER_DEVICE"),
        ("--drain-secs", "SSE_DRAIN_SECS"),
        ("--demo", "SSE_DEMO"),
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
        assert!(out.contains(env), "--help lacks {env}:\n{out}");
    }
    for default in ["127.0.0.1:8080", "25", "1048576", "1024", "300"] {
        assert!(out.contains(default), "--help lacks default {default}");
    }
}

#[test]
fn unknown_flag_exits_2() {
    for args in [
        &["--no-such-flag"][..],
        &["--jwt-secret", "x", "--bogus", "1"],
    ] {
        let (code, _, err) = run_cli(args, &[], CLI);
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
}

#[test]
fn bad_values_exit_2_with_one_line_naming_the_flag() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    for (flag, value) in [
        ("--heartbeat-secs", "abc"),
        ("--heartbeat-secs", "0"),
        ("--max-conns-per-ip=-1", "-1"),
        ("--max-devices", "many"),
        ("--trusted-proxies", "10.0.0.0/33"),
        ("--listen", "nowhere"),
        ("--workers", "0"),
        ("--max-backlog-bytes", "1MB"),
        ("--replay-secs=-5", "-5"),
        ("--drain-secs", "soon"),
        // Negative values written apart from their flag reach its parser.
        ("--heartbeat-secs", "-1"),
        ("--max-devices", "-3"),
        ("--drain-secs", "-5"),
        // An address that is not this machine's cannot be served.
        ("--listen", "192.0.2.1:8080"),
    ] {
        // `--flag=value` for values that start with a dash.
        let (flag, joined) = match flag.split_once('=') {
            Some((f, _)) => (f, true),
            None => (flag, false),
        };
        let eq = format!("{flag}={value}");
        let mut args = vec!["--jwt-secret", "x"];
        if joined {
            args.push(&eq);
        } else {
            args.extend([flag, value]);
        }
        if flag != "--listen" {
            args.extend(["--listen", &listen]);
        }
        let (code, _, err) = run_cli(&args, &[], CLI);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{flag} {value}: stderr {err:?}");
        assert!(lines[0].contains(flag), "{flag} {value}: {err:?}");
    }
    // A bad environment twin too.
    let (code, _, err) = run_cli(
        &["--jwt-secret", "x", "--listen", &listen],
        &[("SSE_HEARTBEAT_SECS", "abc")],
        CLI,
    );
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
    assert!(
        err.contains("--heartbeat-secs") || err.contains("SSE_HEARTBEAT_SECS"),
        "{err:?}"
    );
}

#[test]
fn missing_jwt_secret_exits_2_naming_the_flag() {
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = run_cli(&["--listen", &listen], &[], CLI);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
    assert!(err.contains("--jwt-secret"), "{err:?}");
}

#[test]
fn env_twins_configure_and_flags_beat_them() {
    let gw = Gateway::start(&[], &[("SSE_MAX_DEVICES", "2")]);
    let (t, _) = gw.ticket_with(&gw.token("root", Some("admin")), "");
    assert_refused(&gw, &data_path(&t, &["A", "B", "C"]), &[], 400);
    let gw = Gateway::start(&["--max-devices", "3"], &[("SSE_MAX_DEVICES", "2")]);
    let (t, _) = gw.ticket_with(&gw.token("root", Some("admin")), "");
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&t, &["A", "B", "C"]),
        &[],
    ));
}

// ----- 6. drain (the harness's sigterm/wait_exit) --------------------------------------

#[test]
fn sigterm_drains_streams_and_exits_0() {
    let (redis, mut gw) = redis_gw(&["--drain-secs", "2"]);
    let mut s = data_stream(&redis, &gw, "alice", &["D1"]);
    s.next_frame(T).expect("preamble");
    gw.sigterm();
    let f = s.expect_event("system", T);
    assert!(f.is_system("shutdown"), "{:?}", f.raw);
    let retry = f.retry.expect("a retry with the shutdown");
    assert!((1000..=5000).contains(&retry), "retry {retry}");
    assert!(s.is_closed(T), "stream closed after the drain");
    let status = gw.wait_exit(Duration::from_secs(6)).expect("exited");
    assert_eq!(status.code(), Some(0), "{status}");
}

// ----- embedded mode ------------------------------------------------------------------------

#[test]
fn embedded_health_tickets_and_publish_round_trip() {
    let gw = embedded_gw(&[]);
    let v = get(gw.addr(), "/health", &[]).json();
    assert_eq!(
        (v["status"].clone(), v["redis"].clone()),
        (json!("ok"), json!("embedded"))
    );
    let (status, v) = gw.ticket(&gw.token("alice", None), r#"{"ttlSeconds":60}"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["expiresInSeconds"], 60);
    uuid::Uuid::parse_str(v["ticketId"].as_str().unwrap()).unwrap();

    let admin = gw.token("root", Some("admin"));
    let (t, _) = gw.ticket_with(&admin, "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&t, &["E1"]), &[]);
    assert_eq!(s.head().header("content-type"), Some("text/event-stream"));
    assert!(s.next_frame(T).unwrap().raw.starts_with("retry: 3000\n:"));
    let auth = format!("Bearer {admin}");
    let msg = json!({"deviceId": "E1", "data": {"T1": 1}, "timestamp": "t"});
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &auth)],
        &json!({"channel": "mqtt:realtime:processed", "message": msg}).to_string(),
    );
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    let f = s.expect_event("realtime-update", T);
    assert_eq!(assert_event_frame(&f, "realtime-update"), msg);
    // Without a timestamp one is added, as in Redis mode.
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &auth)],
        r#"{"channel":"mqtt:spc:processed","message":{"deviceId":"E1","data":{}}}"#,
    );
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    let v = assert_event_frame(&s.expect_event("spc-update", T), "spc-update");
    assert!(is_iso_ms(v["timestamp"].as_str().unwrap()), "{v}");
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &auth)],
        r#"{"channel":"nope","message":{"deviceId":"E1"}}"#,
    );
    assert_error(&r, 400);
    let user = format!("Bearer {}", gw.token("alice", None));
    assert_error(
        &post(
            gw.addr(),
            "/sse/publish",
            &[("Authorization", &user)],
            r#"{"channel":"mqtt:spc:processed","message":{"deviceId":"E1"}}"#,
        ),
        403,
    );
}

#[test]
fn embedded_refusals_match_redis_mode() {
    let gw = embedded_gw(&[]);
    assert_refused(&gw, "/sse/stream?ticket=garbage&deviceId=E1", &[], 401);
    assert_refused(&gw, "/sse/alerts", &[], 401);
    let (alerts, _) = gw.ticket_for("alice", r#"{"purpose":"alerts"}"#);
    assert_refused(&gw, &data_path(&alerts, &["E1"]), &[], 403);
    // Nobody owns E1 in an empty embedded store.
    let (any, id) = gw.ticket_for("alice", "");
    assert_refused(&gw, &data_path(&any, &["E1"]), &[], 403);
    assert_refused(&gw, &format!("/sse/stream?ticket={any}"), &[], 400);
    // Revocation.
    let admin = gw.token("root", Some("admin"));
    let (t, tid) = gw.ticket_with(&admin, "");
    drop(SseStream::must_open(
        gw.addr(),
        &data_path(&t, &["E1"]),
        &[],
    ));
    let auth = format!("Bearer {admin}");
    let url = format!("/sse/stream-ticket/{tid}");
    let bob = format!("Bearer {}", gw.token("bob", None));
    assert_ne!(
        delete(gw.addr(), &url, &[("Authorization", &bob)]).status,
        204
    );
    assert_eq!(
        delete(gw.addr(), &url, &[("Authorization", &auth)]).status,
        204
    );
    assert_error(&delete(gw.addr(), &url, &[("Authorization", &auth)]), 404);
    assert_refused(&gw, &data_path(&t, &["E1"]), &[], 401);
    let _ = id;
    assert_error(&get(gw.addr(), "/nope", &[]), 404);
    assert_error(&post(gw.addr(), "/health", &[], ""), 405);
    assert_error(&post(gw.addr(), "/sse/stream-ticket", &[], ""), 401);
}

#[test]
fn embedded_limits_and_status_match_redis_mode() {
    let gw = embedded_gw(&[]);
    let admin = gw.token("root", Some("admin"));
    let (t, _) = gw.ticket_with(&admin, r#"{"purpose":"data"}"#);
    let path = data_path(&t, &["E1", "E2"]);
    let mut s = SseStream::must_open(gw.addr(), &path, &[]);
    let v = assert_refused(&gw, &path, &[], 429);
    assert_eq!(
        v["currentConnections"],
        json!({"alerts": 0, "data": 1, "total": 1})
    );
    let v = get(gw.addr(), &format!("/sse/status?ticket={t}"), &[]).json();
    assert_eq!(v["userId"], "root");
    assert_eq!(v["ticketPurpose"], "data");
    assert_eq!(v["activeConnections"][0]["devices"], json!(["E1", "E2"]));
    s.next_frame(T).expect("preamble");
    for i in 0..20 {
        drop(s);
        s = SseStream::open(gw.addr(), &path, &[])
            .unwrap_or_else(|r| panic!("reload {i}: {} {}", r.status, r.text()));
        s.next_frame(T).expect("preamble");
    }
}

#[test]
fn embedded_last_event_id_replay() {
    let gw = embedded_gw(&[]);
    let admin = gw.token("root", Some("admin"));
    let (t, _) = gw.ticket_with(&admin, "");
    let path = data_path(&t, &["E1"]);
    let publish = |n: u64| publish_to(None, &gw, "E1", n);
    let mut s = SseStream::must_open(gw.addr(), &path, &[]);
    publish(1);
    let last = s.expect_event("realtime-update", T).id.unwrap();
    drop(s);
    wait_released(&gw);
    publish(2);
    publish(3);
    let mut s = SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", &last)]);
    for n in [2, 3] {
        assert_eq!(s.expect_event("realtime-update", T).json()["data"]["n"], n);
    }
    publish(4);
    s.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 4);
    drop(s);
    wait_released(&gw);
    let mut s = SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", "nope")]);
    assert!(s.expect_event("system", T).is_system("replay-gap"));
}

#[test]
fn demo_mode_owns_its_machines() {
    // --demo signs with its own random secret: no --jwt-secret (contract 7.1).
    let gw = Gateway::builder()
        .no_jwt_secret()
        .args(&["--demo", "--log-format", "json"])
        .start();
    let token = get(gw.addr(), "/demo/token", &[]).json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (t, _) = gw.ticket_with(&token, "");
    let mut s = SseStream::must_open(gw.addr(), &data_path(&t, &["Machine 1"]), &[]);
    let f = s.expect_event("machine-status", T);
    assert_eq!(f.json()["deviceId"], "Machine 1");
    assert_refused(&gw, &data_path(&t, &["Machine 7"]), &[], 403);
    // Stderr is the log alone, one JSON object per line: the demo's how-to
    // (printed before the first request was served) went to stdout.
    assert!(wait_until(T, || gw.log().contains("stream refused")));
    let log = gw.log();
    assert!(log.contains("listening on"), "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        assert!(v["msg"].is_string(), "not a JSON log line: {line:?}");
    }
}
