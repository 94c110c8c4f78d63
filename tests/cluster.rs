//! Several gateways on one Redis (issue: scale out): every instance delivers
//! every event to its own streams exactly once, per-user limits hold across
//! instances through leases that outlive no instance by more than about two
//! heartbeat periods, and a resume replays exactly on any instance (more in
//! `cluster_log.rs`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn cluster(n: usize, args: &[&str]) -> (Redis, Vec<Gateway>) {
    let redis = Redis::start();
    let gws = (0..n)
        .map(|_| Gateway::builder().redis(&redis).args(args).start())
        .collect();
    (redis, gws)
}

fn publish_n(redis: &Redis, device: &str, from: u64, to: u64) {
    for n in from..to {
        redis.publish(
            "mqtt:realtime:processed",
            &json!({"deviceId": device, "data": {"n": n}}).to_string(),
        );
    }
}

#[test]
fn every_instance_delivers_every_event_to_its_streams_exactly_once() {
    let (redis, gws) = cluster(3, &[]);
    let mut streams: Vec<SseStream> = gws
        .iter()
        .enumerate()
        .map(|(i, gw)| data_stream(&redis, gw, &format!("u{i}"), &["D1"]))
        .collect();
    publish_n(&redis, "D1", 0, 20);
    for (i, s) in streams.iter_mut().enumerate() {
        for n in 0..20 {
            let f = s.expect_event("realtime-update", T);
            assert_eq!(f.json()["data"]["n"], n, "instance {i}");
        }
    }
    // A sentinel published after every stream saw all 20 comes next on each:
    // no instance sent any of them twice.
    publish_n(&redis, "D1", 20, 21);
    for s in streams.iter_mut() {
        s.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 20);
    }
}

#[test]
fn a_users_second_data_stream_on_another_instance_gets_429() {
    let (redis, gws) = cluster(2, &[]);
    let first = data_stream(&redis, &gws[0], "alice", &["D1"]);
    let (ticket, _) = gws[1].ticket_for("alice", r#"{"purpose":"data"}"#);
    let refused = SseStream::open(gws[1].addr(), &data_path(&ticket, &["D1"]), &[])
        .err()
        .expect("a second data stream on another instance is refused");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(
        refused.json()["currentConnections"]["data"],
        1,
        "{}",
        refused.text()
    );
    // Alerts are a separate limit, on any instance.
    let (alerts, _) = gws[1].ticket_for("alice", r#"{"purpose":"alerts"}"#);
    SseStream::must_open(gws[1].addr(), &alerts_path(&alerts), &[]);
    // A clean close releases the lease: the other instance opens at once.
    drop(first);
    assert!(
        wait_until(T, || SseStream::open(
            gws[1].addr(),
            &data_path(&ticket, &["D1"]),
            &[]
        )
        .is_ok()),
        "the lease was released:\n{}",
        gws[0].log()
    );
}

#[test]
fn a_killed_instance_frees_its_users_slots_within_the_lease_time() {
    // Heartbeat 0.5 s: leases live 1 s (two periods).
    let (redis, mut gws) = cluster(2, &["--heartbeat-secs", "0.5"]);
    let _held = data_stream(&redis, &gws[0], "bob", &["D1"]);
    let (ticket, _) = gws[1].ticket_for("bob", r#"{"purpose":"data"}"#);
    let path = data_path(&ticket, &["D1"]);
    // Renewals keep the lease alive well past its lifetime while the holder lives.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let r = SseStream::open(gws[1].addr(), &path, &[])
            .err()
            .expect("still held");
        assert_eq!(r.status, 429);
    }
    let killed = gws.remove(0); // SIGKILL: no cleanup
    drop(killed);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || SseStream::open(
            gws[0].addr(),
            &path,
            &[]
        )
        .is_ok()),
        "the dead instance's lease expired"
    );
    let freed_after = started.elapsed();
    assert!(
        freed_after < Duration::from_millis(2500),
        "freed after {freed_after:?}"
    );
}

#[test]
fn resuming_replays_exactly_on_the_same_instance_and_on_another() {
    let (redis, gws) = cluster(2, &[]);
    redis.grant("carol", &["D1"]);
    let (ticket_a, _) = gws[0].ticket_for("carol", r#"{"purpose":"data"}"#);
    let path_a = data_path(&ticket_a, &["D1"]);
    let mut s = SseStream::must_open(gws[0].addr(), &path_a, &[]);
    publish_n(&redis, "D1", 0, 3);
    let mut last_id = String::new();
    for n in 0..3 {
        let f = s.expect_event("realtime-update", T);
        assert_eq!(f.json()["data"]["n"], n);
        last_id = f.id.clone().expect("bus events carry ids");
    }
    drop(s);
    assert!(wait_until(T, || get(gws[0].addr(), "/health", &[]).json()
        ["connections"]
        == 0));
    publish_n(&redis, "D1", 3, 5);

    // Same instance: exactly the two missed events, then live ones.
    let mut again = SseStream::must_open(gws[0].addr(), &path_a, &[("Last-Event-ID", &last_id)]);
    for n in 3..5 {
        assert_eq!(
            again.expect_event("realtime-update", T).json()["data"]["n"],
            n
        );
    }
    publish_n(&redis, "D1", 5, 6);
    assert_eq!(
        again.expect_event("realtime-update", T).json()["data"]["n"],
        5
    );
    drop(again);
    assert!(wait_until(T, || get(gws[0].addr(), "/health", &[]).json()
        ["connections"]
        == 0));

    // Another instance: the ids are the cluster log's, so the same id
    // resumes exactly there too, then live events.
    let (ticket_b, _) = gws[1].ticket_for("carol", r#"{"purpose":"data"}"#);
    let path_b = format!(
        "{}&lastEventId={}",
        data_path(&ticket_b, &["D1"]),
        enc(&last_id)
    );
    let mut other = SseStream::must_open(gws[1].addr(), &path_b, &[]);
    for n in 3..6 {
        let f = other.next_event(T).expect("a replayed event");
        assert_eq!(f.event.as_deref(), Some("realtime-update"), "{}", f.raw);
        assert_eq!(f.json()["data"]["n"], n);
    }
    publish_n(&redis, "D1", 6, 7);
    assert_eq!(
        other.expect_event("realtime-update", T).json()["data"]["n"],
        6
    );
}

#[test]
fn instances_can_share_one_port() {
    let redis = Redis::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gws: Vec<Gateway> = (0..2)
        .map(|_| {
            Gateway::builder()
                .redis(&redis)
                .args(&["--listen", &listen, "--max-conns-per-ip", "100"])
                .start()
        })
        .collect();
    // Streams opened on the shared port land on either process; each gets events.
    let mut streams: Vec<SseStream> = (0..8)
        .map(|i| data_stream(&redis, &gws[0], &format!("p{i}"), &["D1"]))
        .collect();
    publish_n(&redis, "D1", 0, 1);
    for s in streams.iter_mut() {
        s.expect_event("realtime-update", T);
    }
    // The port is shared, so ask each process's own log who holds what (a
    // log line reaches the test a moment after the stream's first bytes).
    let opened = || -> usize {
        gws.iter()
            .map(|g| g.log().matches("stream open").count())
            .sum()
    };
    assert!(wait_until(T, || opened() == 8), "{} opened", opened());
}

#[test]
fn max_rate_per_device_sends_the_newest_value_and_nothing_stale() {
    let (redis, gws) = cluster(1, &["--max-rate-per-device", "2"]);
    let mut s = data_stream(&redis, &gws[0], "dave", &["D1", "D2"]);
    // A burst of 10 on D1: the first goes at once, the rest conflate into the
    // newest, sent when D1's next slot opens (500 ms later).
    publish_n(&redis, "D1", 0, 10);
    // Other event kinds and other devices are not held back.
    redis.publish(
        "mqtt:spc:processed",
        r#"{"deviceId":"D1","data":{"spc":1}}"#,
    );
    redis.publish(
        "mqtt:realtime:processed",
        r#"{"deviceId":"D2","data":{"n":100}}"#,
    );
    let mut realtime = Vec::new();
    let mut spc = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && realtime.len() < 3 {
        let Some(f) = s.next_event(Duration::from_millis(200)) else {
            continue;
        };
        match f.event.as_deref() {
            Some("realtime-update") => realtime.push(f.json()["data"]["n"].as_u64().unwrap()),
            Some("spc-update") => spc += 1,
            _ => {}
        }
    }
    assert_eq!(spc, 1);
    assert_eq!(
        realtime,
        vec![0, 100, 9],
        "first at once, other device at once, then the newest"
    );
    // A sentinel on D1 comes next, at D1's next slot: nothing stale was
    // left to send after the newest value.
    publish_n(&redis, "D1", 1000, 1001);
    s.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 1000);
    let conflated = metric_sum(
        &gws[0].metrics(),
        |n| n == "sse_events_conflated_total",
        &[],
    );
    assert_eq!(
        conflated, 8.0,
        "values 1..=8 were replaced before they were sent"
    );
}

#[test]
fn an_instance_that_exits_right_after_its_streams_close_releases_their_leases() {
    // Default heartbeat: leases would otherwise outlive the process by 50 s.
    let (redis, mut gws) = cluster(2, &["--max-conns-per-ip", "1000"]);
    let streams: Vec<SseStream> = (0..50)
        .map(|i| data_stream(&redis, &gws[0], &format!("e{i}"), &["D1"]))
        .collect();
    // Redis stalls for half a second, so the releases are still queued in the
    // gateway when it is told to exit.
    let url = redis.url();
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(500)
        .arg("ALL")
        .query::<()>(&mut con)
        .unwrap();
    drop(streams);
    assert!(wait_until(T, || gws[0]
        .log()
        .matches("stream closed")
        .count()
        == 50));
    gws[0].sigterm();
    assert_eq!(
        gws[0]
            .wait_exit(Duration::from_secs(6))
            .and_then(|s| s.code()),
        Some(0)
    );
    // It left the set of live instances too: nobody ever takes it for dead.
    let instances: u64 = redis::cmd("ZCARD")
        .arg("sse:instances")
        .query(&mut con)
        .unwrap();
    assert_eq!(instances, 1, "only the instance still running beats");
    for i in 0..50 {
        let (ticket, _) = gws[1].ticket_for(&format!("e{i}"), r#"{"purpose":"data"}"#);
        if let Err(r) = SseStream::open(gws[1].addr(), &data_path(&ticket, &["D1"]), &[]) {
            panic!(
                "user e{i} still held by the exited instance: {} {}",
                r.status,
                r.text()
            );
        }
    }
}
