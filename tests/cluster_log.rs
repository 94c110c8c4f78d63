//! One cluster, exact everywhere (contract 7.3): real gateway processes on
//! one real redis-server. Every instance gives an event the same id; a
//! client resumes exactly on any instance; and across `kill -9` of any
//! instance, lost Redis connections and a Redis restart, every stream gets
//! every event once and in order, or `replay-gap` at the hole.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn cluster(n: usize) -> (Redis, Vec<Gateway>) {
    let redis = Redis::start();
    let gws = (0..n).map(|_| start_one(&redis)).collect();
    (redis, gws)
}

fn start_one(redis: &Redis) -> Gateway {
    Gateway::builder()
        .redis(redis)
        .args(&[
            "--max-tickets-per-minute",
            "100000",
            "--max-data-per-user",
            "20",
            "--max-conns-per-ip",
            "50",
        ])
        .start()
}

fn publish(redis: &Redis, device: &str, n: u64) {
    redis.publish(
        "mqtt:realtime:processed",
        &json!({"deviceId": device, "data": {"n": n}}).to_string(),
    );
}

/// One instance, a stream of `user` on D1, and event 0 through it.
fn one_instance_flowing(user: &str) -> (Redis, Vec<Gateway>, SseStream) {
    let (redis, gws) = cluster(1);
    let mut s = data_stream(&redis, &gws[0], user, &["D1"]);
    publish(&redis, "D1", 0);
    assert_eq!(next_value(&mut s).0, 0);
    (redis, gws, s)
}

/// The next `realtime-update`'s `n` and id (system frames are skipped).
fn next_value(s: &mut SseStream) -> (u64, String) {
    let f = s.expect_event("realtime-update", T);
    let n = f.json()["data"]["n"].as_u64().expect("n");
    (n, f.id.expect("bus events carry ids"))
}

#[test]
fn three_instances_give_the_same_event_the_same_id() {
    let (redis, gws) = cluster(3);
    let mut streams: Vec<SseStream> = gws
        .iter()
        .enumerate()
        .map(|(i, gw)| data_stream(&redis, gw, &format!("u{i}"), &["D1"]))
        .collect();
    for n in 0..20 {
        publish(&redis, "D1", n);
    }
    let ids: Vec<Vec<String>> = streams
        .iter_mut()
        .map(|s| {
            (0..20)
                .map(|n| {
                    let (got, id) = next_value(s);
                    assert_eq!(got, n);
                    id
                })
                .collect()
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
    let parsed: Vec<(u64, u64)> = ids[0]
        .iter()
        .map(|id| {
            let (ms, seq) = id.split_once('-').expect("<ms>-<seq>");
            (ms.parse().expect("ms"), seq.parse().expect("seq"))
        })
        .collect();
    assert!(parsed.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let now = now_ms();
    assert!(
        parsed[0].0 + 60_000 > now && parsed[0].0 <= now,
        "epoch ms: {parsed:?}"
    );
}

#[test]
fn a_client_resumes_exactly_on_another_instance_by_header_and_by_query() {
    let (redis, gws) = cluster(3);
    redis.grant("carol", &["D1"]);
    let (ticket, _) = gws[0].ticket_for("carol", r#"{"purpose":"data"}"#);
    let path = data_path(&ticket, &["D1"]);
    let mut s = SseStream::must_open(gws[0].addr(), &path, &[]);
    for n in 0..3 {
        publish(&redis, "D1", n);
    }
    let mut last_id = String::new();
    for n in 0..3 {
        let (got, id) = next_value(&mut s);
        assert_eq!(got, n);
        last_id = id;
    }
    drop(s);
    assert!(wait_until(T, || get(gws[0].addr(), "/health", &[]).json()
        ["connections"]
        == 0));
    for n in 3..6 {
        publish(&redis, "D1", n);
    }
    // Header form on instance 1, query form on instance 2: exactly the three
    // missed events, no replay-gap, then live ones.
    let query = format!("{path}&lastEventId={}", enc(&last_id));
    let mut resumed = [
        SseStream::must_open(gws[1].addr(), &path, &[("Last-Event-ID", &last_id)]),
        SseStream::must_open(gws[2].addr(), &query, &[]),
    ];
    for r in resumed.iter_mut() {
        for n in 3..6 {
            let f = r.next_event(T).expect("a replayed event");
            assert_eq!(f.event.as_deref(), Some("realtime-update"), "{}", f.raw);
            assert_eq!(f.json()["data"]["n"], n);
        }
    }
    publish(&redis, "D1", 6);
    for r in resumed.iter_mut() {
        r.expect_sentinel("realtime-update", T, |f| f.json()["data"]["n"] == 6);
    }
}

#[test]
fn an_id_the_cluster_never_issued_or_no_longer_holds_is_a_replay_gap() {
    let redis = Redis::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .args(&["--replay-events", "2", "--max-data-per-user", "5"])
        .start();
    redis.grant("dave", &["D1"]);
    let (ticket, _) = gw.ticket_for("dave", r#"{"purpose":"data"}"#);
    let path = data_path(&ticket, &["D1"]);
    let mut s = SseStream::must_open(gw.addr(), &path, &[]);
    publish(&redis, "D1", 0);
    let (_, first) = next_value(&mut s);
    for n in 1..5 {
        publish(&redis, "D1", n);
    }
    while next_value(&mut s).0 < 4 {}
    drop(s);
    // Evicted from a window of two; an embedded-mode id from long ago.
    for stale in [first.as_str(), "1700000000000-5"] {
        let mut r = SseStream::must_open(gw.addr(), &path, &[("Last-Event-ID", stale)]);
        let f = r.next_event(T).expect("the gap marker");
        assert!(f.is_system("replay-gap"), "{stale}: {}", f.raw);
        // Then what the window still holds, then live events.
        assert_eq!(next_value(&mut r).0, 3, "{stale}");
        assert_eq!(next_value(&mut r).0, 4, "{stale}");
    }
}

#[test]
fn a_resume_from_before_a_redis_restart_gets_the_hole_then_what_follows_it() {
    let (mut redis, gws) = cluster(1);
    let mut s = data_stream(&redis, &gws[0], "gil", &["D1"]);
    for n in 0..3 {
        publish(&redis, "D1", n);
    }
    let old = (0..3).map(|_| next_value(&mut s).1).last().expect("an id");
    drop(s);
    redis.restart();
    // Events after the restart, as far as a fresh stream sees them (those
    // published before the gateway subscribed again are lost, not logged).
    let gw = &gws[0];
    let try_open = || {
        redis.grant("gil", &["D1"]);
        let (status, v) = gw.ticket(&gw.token("gil", None), r#"{"purpose":"data"}"#);
        let ticket = v["ticket"].as_str().filter(|_| status == 200)?;
        SseStream::open(gw.addr(), &data_path(ticket, &["D1"]), &[]).ok()
    };
    let mut after = Vec::new();
    let mut fresh = None;
    assert!(wait_until(Duration::from_secs(15), || {
        // Until the gateway has Redis back, the stream is refused (503).
        if fresh.is_none() {
            fresh = try_open();
        }
        let Some(s) = fresh.as_mut() else {
            return false;
        };
        publish(&redis, "D1", 100);
        match s.next_event(Duration::from_millis(300)) {
            Some(f) if f.event.as_deref() == Some("realtime-update") => {
                after.push(f.json()["data"]["n"].as_u64().expect("n"));
                true
            }
            _ => false,
        }
    }));
    let mut fresh = fresh.expect("a stream");
    for n in [101, 102] {
        publish(&redis, "D1", n);
        after.push(next_value(&mut fresh).0);
    }
    drop(fresh);
    let (ticket, _) = gws[0].ticket_for("gil", r#"{"purpose":"data"}"#);
    let path = data_path(&ticket, &["D1"]);
    let mut r = SseStream::must_open(gws[0].addr(), &path, &[("Last-Event-ID", &old)]);
    let gap = r.next_event(T).expect("the hole");
    assert!(gap.is_system("replay-gap"), "{}", gap.raw);
    let mut got = Vec::new();
    while got.len() < after.len() {
        let f = r.next_event(T).expect("the events after the hole");
        if !f.is_system("replay-gap") {
            got.push(f.json()["data"]["n"].as_u64().expect("n"));
        }
    }
    assert_eq!(
        got, after,
        "after the hole, what the window holds, in order"
    );
}

/// Publishes `{"deviceId":"D1","data":{"n":k}}` every 5 ms from its own
/// connection until stopped; a publish that fails (Redis away) is skipped
/// and the connection made again.
struct Steady {
    stop: Arc<AtomicBool>,
    next: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Steady {
    fn start(url: String) -> Steady {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let (s, nx) = (stop.clone(), next.clone());
        let thread = thread::spawn(move || {
            let client = redis::Client::open(url).expect("url");
            let mut con = None;
            let until = Instant::now() + Duration::from_secs(60);
            while !s.load(SeqCst) && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
                if con.is_none() {
                    con = client
                        .get_connection_with_timeout(Duration::from_millis(200))
                        .ok();
                }
                let Some(c) = con.as_mut() else { continue };
                let n = nx.load(SeqCst);
                let payload = json!({"deviceId": "D1", "data": {"n": n}}).to_string();
                match redis::cmd("PUBLISH")
                    .arg("mqtt:realtime:processed")
                    .arg(payload)
                    .query::<u64>(c)
                {
                    Ok(_) => {
                        nx.fetch_add(1, SeqCst);
                    }
                    Err(_) => con = None,
                }
            }
        });
        Steady {
            stop,
            next,
            thread: Some(thread),
        }
    }

    /// Stops publishing; the number of events published.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("publisher");
        }
        self.next.load(SeqCst)
    }

    fn published(&self) -> u64 {
        self.next.load(SeqCst)
    }
}

/// An id's `<ms>-<seq>`, ordered as ids are.
fn id_pair(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("<ms>-<seq>");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

/// What one stream received, checked against the contract as it is read.
#[derive(Default)]
struct Tally {
    last: Option<u64>,
    /// The newest id received (events and `replay-gap`s that carry one).
    last_id: Option<(u64, u64)>,
    gaps: usize,
    after_gap: bool,
    longest_wait: Duration,
    at: Option<Instant>,
}

impl Tally {
    /// Reads until the event numbered `upto` - 1 arrived.
    fn read_until(&mut self, s: &mut SseStream, upto: u64, what: &str) {
        while self.last.is_none_or(|l| l + 1 < upto) {
            let f = s
                .next_event(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{what}: stalled after {:?}", self.last));
            if let Some(id) = f.id.as_deref().map(id_pair) {
                assert!(
                    self.last_id.is_none_or(|last| id > last),
                    "{what}: id {id:?} after {:?}: ids must rise ({})",
                    self.last_id,
                    f.raw
                );
                self.last_id = Some(id);
            }
            if f.is_system("replay-gap") {
                self.gaps += 1;
                self.after_gap = true;
                continue;
            }
            if f.event.as_deref() != Some("realtime-update") {
                continue;
            }
            let n = f.json()["data"]["n"].as_u64().expect("n");
            if let Some(last) = self.last {
                assert!(
                    n > last,
                    "{what}: {n} after {last}: duplicated or out of order"
                );
                assert!(
                    n == last + 1 || self.after_gap,
                    "{what}: {} to {} missing with no replay-gap",
                    last + 1,
                    n - 1
                );
            }
            let now = Instant::now();
            if let Some(at) = self.at {
                self.longest_wait = self.longest_wait.max(now - at);
            }
            self.at = Some(now);
            self.after_gap = false;
            self.last = Some(n);
        }
    }
}

/// Several streams on every instance but `except`, read up to `upto`.
fn read_all(streams: &mut [(usize, SseStream, Tally)], except: Option<usize>, upto: u64) {
    for (at, s, tally) in streams.iter_mut() {
        if Some(*at) != except {
            tally.read_until(s, upto, &format!("stream on instance {at}"));
        }
    }
}

fn open_streams(redis: &Redis, gws: &[Gateway], at: &[usize]) -> Vec<(usize, SseStream, Tally)> {
    redis.grant("watcher", &["D1"]);
    at.iter()
        .map(|&i| {
            let (ticket, _) = gws[i].ticket_for("watcher", r#"{"purpose":"data"}"#);
            let s = SseStream::must_open(gws[i].addr(), &data_path(&ticket, &["D1"]), &[]);
            (i, s, Tally::default())
        })
        .collect()
}

/// What a watched stream received: `n` (None for a `replay-gap`) and when.
type Seen = Vec<(Option<u64>, Instant)>;

/// A stream read continuously on its own thread: what arrived, and when.
struct Watched {
    at: usize,
    stop: Arc<AtomicBool>,
    /// Events received so far (`n` + 1 of the newest), for waiting on.
    got: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<Seen>>,
}

impl Watched {
    /// Starts reading; None in a record is a `replay-gap`.
    fn start(at: usize, mut s: SseStream) -> Watched {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), got.clone());
        let thread = thread::spawn(move || {
            let mut seen = Vec::new();
            let until = Instant::now() + Duration::from_secs(60);
            while !flag.load(SeqCst) && Instant::now() < until && !s.closed() {
                let Some(f) = s.next_event(Duration::from_millis(100)) else {
                    continue;
                };
                if f.is_system("replay-gap") {
                    seen.push((None, Instant::now()));
                } else if f.event.as_deref() == Some("realtime-update") {
                    let n = f.json()["data"]["n"].as_u64();
                    if let Some(n) = n {
                        count.fetch_max(n + 1, SeqCst);
                    }
                    seen.push((n, Instant::now()));
                }
            }
            seen
        });
        Watched {
            at,
            stop,
            got,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("reader"))
            .unwrap_or_default()
    }
}

#[test]
fn kill_9_of_each_instance_in_turn_loses_nothing_silently() {
    let (redis, mut gws) = cluster(3);
    let mut steady = Steady::start(redis.url());
    for victim in 0..3 {
        let watched: Vec<Watched> = open_streams(&redis, &gws, &[0, 1, 2, 0, 1, 2])
            .into_iter()
            .map(|(at, s, _)| Watched::start(at, s))
            .collect();
        // Delivery flows everywhere before the kill.
        let before = steady.published() + 100;
        assert!(wait_until(T, || steady.published() >= before));
        let replacement = start_one(&redis);
        let killed = Instant::now();
        drop(std::mem::replace(&mut gws[victim], replacement)); // SIGKILL
        let after = steady.published() + 600; // about three seconds on
        assert!(wait_until(Duration::from_secs(15), || steady.published() >= after));
        // The survivors' streams catch up with what was published.
        let survivors: Vec<&Watched> = watched.iter().filter(|w| w.at != victim).collect();
        assert!(
            wait_until(T, || survivors.iter().all(|w| w.got.load(SeqCst) >= after)),
            "survivors stalled after the kill of {victim}"
        );
        let (mut gaps, mut longest) = (0, Duration::ZERO);
        for w in watched {
            let at = w.at;
            let seen = w.finish();
            if at == victim {
                continue;
            }
            let what = format!("a stream on instance {at}, kill -9 of {victim}");
            let mut last: Option<u64> = None;
            let mut after_gap = false;
            let mut prev_at: Option<Instant> = None;
            for (n, when) in &seen {
                let Some(n) = *n else {
                    gaps += 1;
                    after_gap = true;
                    continue;
                };
                if let Some(l) = last {
                    assert!(n > l, "{what}: {n} after {l}: duplicated or out of order");
                    assert!(
                        n == l + 1 || after_gap,
                        "{what}: {} to {} missing, no replay-gap",
                        l + 1,
                        n - 1
                    );
                }
                if let Some(p) =
                    prev_at.filter(|p| *when > killed && *p > killed - Duration::from_secs(1))
                {
                    longest = longest.max(*when - p);
                }
                prev_at = Some(*when);
                last = Some(n);
                after_gap = false;
            }
            assert!(
                last.is_some_and(|l| l + 1 >= after),
                "{what}: stopped at {last:?}, {after} published"
            );
        }
        eprintln!(
            "kill -9 of instance {victim}: survivors' longest wait between two events {longest:?}, replay-gaps {gaps}"
        );
        assert!(
            longest < Duration::from_secs(2),
            "survivors resumed after {longest:?}"
        );
    }
    steady.stop();
}

#[test]
fn lost_redis_connections_and_a_redis_restart_leave_no_silent_hole() {
    let (mut redis, gws) = cluster(2);
    let mut streams = open_streams(&redis, &gws, &[0, 1]);
    let mut steady = Steady::start(redis.url());
    for kind in ["normal", "pubsub"] {
        let before = steady.published() + 50;
        assert!(wait_until(T, || steady.published() >= before));
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query::<()>(&mut redis.con())
            .expect("CLIENT KILL");
        let after = steady.published() + 200;
        assert!(wait_until(T, || steady.published() >= after));
        read_all(&mut streams, None, after);
        let gaps: usize = streams.iter().map(|(_, _, t)| t.gaps).sum();
        eprintln!("CLIENT KILL TYPE {kind}: replay-gaps so far {gaps}");
        if kind == "normal" {
            // The log's readers and writer reconnect and read on from where
            // they were: nothing was missed, so nothing is a gap.
            assert_eq!(gaps, 0, "CLIENT KILL TYPE normal");
        }
    }
    redis.restart();
    let after = steady.published() + 200;
    assert!(wait_until(Duration::from_secs(15), || steady.published() >= after));
    read_all(&mut streams, None, after);
    let total = steady.stop();
    eprintln!("published {total}");
}

#[test]
fn a_redis_restart_while_publishing_hands_out_every_event_once_under_rising_ids() {
    // Whichever instance takes the lease after the restart, it must not
    // write again what it heard and the old log held (contract 7.3, §4).
    // Outages of a moment and of a second: after the longer ones the
    // leader is back before the subscribers, which back off; three
    // restarts, so either instance is likely to lead after one.
    let (mut redis, gws) = cluster(2);
    let mut streams = open_streams(&redis, &gws, &[0, 1, 0, 1]);
    let mut steady = Steady::start(redis.url());
    for (restart, outage_ms) in [0, 700, 1200].into_iter().enumerate() {
        let before = steady.published() + 100;
        assert!(wait_until(T, || steady.published() >= before));
        read_all(&mut streams, None, before);
        let gaps: Vec<usize> = streams.iter().map(|(_, _, t)| t.gaps).collect();
        redis.stop();
        // The outage's length is the scenario, not a wait for an event.
        thread::sleep(Duration::from_millis(outage_ms));
        redis.restart();
        let after = steady.published() + 300;
        assert!(wait_until(Duration::from_secs(15), || steady.published() >= after));
        read_all(&mut streams, None, after);
        // Usually one replay-gap per restart; in one CI run (a debug build
        // on a loaded box) a stream got two, so the count is reported, not
        // bounded. What is asserted is the contract's: nothing twice, ids
        // rising, every hole told (the tally, as it reads).
        for ((at, _, tally), before) in streams.iter().zip(gaps) {
            let told = tally.gaps - before;
            eprintln!("restart {restart}: a stream on instance {at} got {told} replay-gap(s)");
        }
    }
    // For certain the other instance leads after a restart: the leader dies
    // with Redis. The survivor heard every event of the last seconds and
    // finds an empty log; what its reader read was written already.
    let leader = gws
        .iter()
        .position(|gw| gw.metrics().contains("sse_cluster_leader 1\n"))
        .expect("a leader");
    redis.stop();
    let mut gws = gws;
    drop(gws.remove(leader)); // SIGKILL
    thread::sleep(Duration::from_millis(1200));
    redis.restart();
    let after = steady.published() + 300;
    assert!(wait_until(Duration::from_secs(15), || steady.published() >= after));
    read_all(&mut streams, Some(leader), after);
    steady.stop();
}

#[test]
fn a_log_that_starts_over_below_a_readers_position_is_a_replay_gap_and_never_an_older_id() {
    let (redis, gws) = cluster(1);
    let mut s = data_stream(&redis, &gws[0], "erin", &["D1"]);
    publish(&redis, "D1", 0);
    let (_, first) = next_value(&mut s);
    // As a Redis that lost the log would, under a clock that is behind:
    // the log counts again from ids below what the reader has read.
    let mut con = redis.con();
    redis::cmd("DEL")
        .arg("sse:{log}:events")
        .arg("sse:{log}:last")
        .query::<()>(&mut con)
        .expect("DEL");
    let data = json!({"deviceId": "D1", "data": {"n": 1}}).to_string();
    redis::cmd("XADD")
        .arg("sse:{log}:events")
        .arg("5-1")
        .arg(&["e", "realtime-update", "d", "D1", "p", &data, "h", "0"])
        .query::<String>(&mut con)
        .expect("XADD");
    redis::cmd("SET")
        .arg("sse:{log}:last")
        .arg("5-1")
        .query::<()>(&mut con)
        .expect("SET");
    let gap = s.next_event(T).expect("the hole is told");
    assert!(gap.is_system("replay-gap"), "{}", gap.raw);
    // 5-1 lies below what the stream had: it never goes out. What is
    // written next does, once, with no second gap before it.
    publish(&redis, "D1", 2);
    let f = s.next_event(T).expect("the next event");
    assert_eq!(f.event.as_deref(), Some("realtime-update"), "{}", f.raw);
    assert_eq!(f.json()["data"]["n"].as_u64(), Some(2), "{}", f.raw);
    let id = f.id.expect("an id");
    assert!(id.ends_with("-2"), "the count goes on from the log's: {id}");
    assert!(id_pair(&id) > id_pair(&first), "{id} after {first}");
}

#[test]
fn replay_secs_bounds_the_window_on_every_instance() {
    let redis = Redis::start();
    let gws: Vec<Gateway> = (0..2)
        .map(|_| {
            Gateway::builder()
                .redis(&redis)
                .args(&[
                    "--replay-secs",
                    "2",
                    "--max-data-per-user",
                    "1000",
                    "--max-conns-per-ip",
                    "1000",
                ])
                .start()
        })
        .collect();
    let mut s = data_stream(&redis, &gws[0], "fay", &["D1"]);
    publish(&redis, "D1", 0);
    let (_, first) = next_value(&mut s);
    publish(&redis, "D1", 1);
    assert_eq!(next_value(&mut s).0, 1);
    drop(s);
    let (ticket, _) = gws[1].ticket_for("fay", r#"{"purpose":"data"}"#);
    let path = data_path(&ticket, &["D1"]);
    let resume = || {
        let mut r = SseStream::must_open(gws[1].addr(), &path, &[("Last-Event-ID", &first)]);
        r.next_event(T).expect("a replayed event or the gap marker")
    };
    // Within two seconds, the other instance replays event 1 exactly...
    let f = resume();
    assert_eq!(f.json()["data"]["n"], 1, "{}", f.raw);
    // ...and once it aged out, the same id is a replay-gap there.
    assert!(
        wait_until(T, || resume().is_system("replay-gap")),
        "event 1 never left the window"
    );
}

/// Script calls Redis has run so far (the log's appends are script calls).
fn script_calls(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.con())
        .expect("INFO");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn a_steady_flow_is_appended_in_batches_not_one_call_per_event() {
    let (redis, _gws, mut s) = one_instance_flowing("u1");
    // 100 events, one every 0.3 ms: each would get its own append if the
    // leader appended as soon as it heard one (an append takes ~0.1 ms).
    // Paced, it appends at most once a millisecond: at most one call per
    // millisecond the flow lasted, and a few more for the tail and the
    // liveness beat. A flow that lasted 90 ms or more (a loaded machine
    // stretched the sleeps) cannot tell the two apart: it runs again, and
    // the last round holds the paced bound whatever it lasted (a bound
    // tighter than the flow's milliseconds would fail a correct leader on
    // a loaded machine, as `.min(60)` once did at 62 calls over 113 ms).
    for round in 0..5u64 {
        let before = script_calls(&redis);
        let started = Instant::now();
        for n in 1..=100 {
            publish(&redis, "D1", round * 100 + n);
            thread::sleep(Duration::from_micros(300));
        }
        let lasted_ms = started.elapsed().as_millis() as u64;
        for n in 1..=100 {
            assert_eq!(next_value(&mut s).0, round * 100 + n);
        }
        let calls = script_calls(&redis) - before;
        if lasted_ms >= 90 && round < 4 {
            continue;
        }
        assert!(
            calls <= lasted_ms + 10,
            "{calls} script calls for 100 events over {lasted_ms} ms"
        );
        return;
    }
}
