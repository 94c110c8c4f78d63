//! Named races of the connection state machine, each replayed the same way
//! every time: page reload, pipelining, partial writes, slow consumers,
//! drain, a client gone during its lookup, lookups that never come back, a
//! mailbox that overflowed, frames held to coalesce a busy stream's writes.

use std::time::Duration;

use super::{stream_request, Client, Lab, T};

/// Opens one data stream of `u1` on device M1.
pub(super) fn busy_stream(lab: &mut Lab) -> Client {
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut s = Client::connect(lab);
    s.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| s.pump().statuses() == [200]));
    s
}

/// Publishes event `n` of M1, its data padded with `pad` bytes.
pub(super) fn publish_n(lab: &Lab, n: usize, pad: usize) {
    let pad = "x".repeat(pad);
    let msg = format!(r#"{{"deviceId":"M1","data":{{"n":{n},"pad":"{pad}"}}}}"#);
    lab.gw
        .hub
        .publish("mqtt:realtime:processed", msg.as_bytes())
        .expect("published");
}

/// A page reload: the old page's stream is open and the new page asks for
/// its slot. The old page's socket closes in the same instant, so the
/// reactor sees the request before the close; with `late`, the close comes
/// only after the probe of the old stream found it open (the close was
/// still on its way: another CPU's backlog, a proxy that closes upstream
/// late), and the second look must wait for the retry timer, not refuse.
fn a_reload_opens(late: bool) {
    let mut lab = Lab::new(&[]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut first = Client::connect(&mut lab);
    first.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| first.pump().statuses() == [200]));
    lab.check_slots();
    let mut second = Client::connect(&mut lab);
    second.send(&stream_request(&ticket, "M1"));
    if late {
        let probed = |lab: &mut Lab| {
            lab.reactor.conns.iter().any(
                |(_, c)| matches!(&c.phase, crate::reactor::conn::Phase::Retrying(r) if r.probes == 0),
            )
        };
        assert!(lab.until(T, probed), "the probe found the old stream open");
    }
    drop(first);
    assert!(lab.until(T, |_| !second.pump().statuses().is_empty()));
    assert_eq!(second.statuses(), [200], "{}", second.text());
    lab.check_slots();
    drop(second);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

#[test]
fn a_page_reload_never_meets_429() {
    a_reload_opens(false);
}

#[test]
fn a_reload_whose_close_comes_after_the_probe_still_opens() {
    a_reload_opens(true);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut lab = Lab::new(&[]);
    let mut c = Client::connect(&mut lab);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\nDELETE /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(lab.until(T, |_| c.pump().closed));
    assert_eq!(c.statuses(), [200, 404, 405]);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

#[test]
fn a_large_response_completes_through_partial_writes() {
    let mut lab = Lab::new(&[]);
    let mut c = Client::connect_with(&mut lab, Some(2048));
    c.send(b"GET /sse/client.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let want = include_bytes!("../../../web/sse-client.js").len();
    // Read a little at a time: the reactor meets a full socket buffer over
    // and over, and must resume exactly where it stopped.
    assert!(lab.until(Duration::from_secs(5), |lab| {
        lab.turn();
        c.read_some(700).closed
    }));
    let text = c.text();
    let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
    assert_eq!(body.len(), want);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

#[test]
fn a_slow_consumer_is_closed_and_a_fast_one_keeps_up() {
    let mut lab = Lab::new(&["--max-backlog-bytes", "20000", "--max-data-per-user", "5"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut slow = Client::connect_with(&mut lab, Some(2048));
    slow.send(&stream_request(&ticket, "M1"));
    let mut fast = Client::connect(&mut lab);
    fast.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| fast.pump().statuses() == [200]));
    assert!(lab.until(T, |lab| lab.gw.registry.total() == 2));
    // 6 MB: more than every socket buffer between the slow client and us.
    for n in 0..600 {
        publish_n(&lab, n, 10_000);
        lab.turn();
        fast.pump();
    }
    assert!(lab.until(T, |lab| lab.gw.registry.total() == 1));
    assert!(lab.until(T, |_| fast.pump().text().contains("\"n\":599")));
    assert_eq!(
        lab.gw
            .metrics
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_drain_says_shutdown_to_streams_and_closes_everything() {
    let mut lab = Lab::new(&["--drain-secs", "1"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut s = Client::connect(&mut lab);
    s.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |_| s.pump().statuses() == [200]));
    let _idle = Client::connect(&mut lab);
    lab.gw.hub.drain();
    let mut drained = false;
    assert!(lab.until(T, |lab| {
        drained = lab
            .reactor
            .turn(&mut lab.events, Some(Duration::from_millis(5)))
            .expect("turn");
        drained
    }));
    s.pump();
    assert!(s.text().contains("{\"kind\":\"shutdown\"}"), "{}", s.text());
    assert_eq!(lab.reactor.connections(), 0);
    assert_eq!(lab.gw.registry.total(), 0);
    assert_eq!(lab.gw.peers.addresses(), 0);
}

#[test]
fn a_client_that_leaves_during_its_lookup_holds_nothing() {
    let mut lab = Lab::new(&[]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    lab.memory().hold();
    let mut c = Client::connect(&mut lab);
    c.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |lab| lab.phases() == ["waiting"]));
    drop(c);
    lab.turns_for(Duration::from_millis(20));
    lab.release(&[]);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
    // And the user's slot is free for the next page.
    let mut again = Client::connect(&mut lab);
    again.send(&stream_request(&ticket, "M1"));
    lab.turns_for(Duration::from_millis(20));
    lab.release(&[]);
    assert!(lab.until(T, |_| again.pump().statuses() == [200]));
}

#[test]
fn a_lookup_that_never_comes_back_is_answered_503() {
    let mut lab = Lab::new(&[]);
    lab.memory().hold();
    let mut c = Client::connect(&mut lab);
    let body = format!(
        "POST /sse/stream-ticket HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        lab.token("u1")
    );
    c.send(body.as_bytes());
    assert!(lab.until(Duration::from_secs(4), |_| !c.pump().statuses().is_empty()));
    assert_eq!(c.statuses(), [503]);
    assert!(c.text().contains("Retry-After: 1"));
    // Its late answer finds the connection moved on.
    lab.release(&[]);
    lab.turns_for(Duration::from_millis(20));
    assert_eq!(lab.phases(), ["reading"]);
}

/// Frames of the stream's device, in order: `n` values, and `replay-gap`s.
fn values(c: &Client) -> Vec<String> {
    c.text()
        .split("\n\n")
        .filter_map(|block| {
            if block.contains("\"kind\":\"replay-gap\"") {
                return Some("gap".to_owned());
            }
            let at = block.find("\"n\":")? + 4;
            let end = at + block[at..].find(|ch: char| !ch.is_ascii_digit())?;
            Some(block[at..end].to_owned())
        })
        .collect()
}

/// A stream on M1, then 50 events of M1 published while the reactor does
/// not turn.
fn burst_on_one_stream(lab: &mut Lab) -> Client {
    let s = busy_stream(lab);
    for n in 0..50 {
        publish_n(lab, n, 0);
    }
    s
}

#[test]
fn a_reactor_whose_mailbox_overflowed_recovers_the_frames_from_the_replay_window() {
    let mut lab = Lab::new(&["--mailbox-frames", "4"]);
    // 50 events while the reactor does not turn: 46 find its mailbox full.
    let mut s = burst_on_one_stream(&mut lab);
    let want: Vec<String> = (0..50).map(|n| n.to_string()).collect();
    assert!(lab.until(T, |_| values(s.pump()).len() >= 50));
    assert_eq!(values(&s), want, "every frame once, in order");
    let overflowed = lab
        .gw
        .metrics
        .mailbox_overflows
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(overflowed, 46);
}

#[test]
fn frames_the_replay_window_no_longer_holds_become_a_replay_gap() {
    let mut lab = Lab::new(&["--mailbox-frames", "4", "--replay-events", "8"]);
    let mut s = burst_on_one_stream(&mut lab);
    // The first four arrive; the window (8 events) no longer holds the
    // hole: a gap at that point, then what it holds, never a silent loss.
    assert!(lab.until(T, |_| values(s.pump()).last().map(String::as_str)
        == Some("49")));
    let mut want: Vec<String> = ["0", "1", "2", "3", "gap"].map(String::from).to_vec();
    want.extend((42..50).map(|n| n.to_string()));
    assert_eq!(values(&s), want);
}

#[test]
fn a_resume_from_an_id_this_reactor_has_not_routed_yet_waits_for_it() {
    let mut lab = Lab::new(&["--max-data-per-user", "5"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    // Event 1 is in the hub's window but this reactor has not routed it (as
    // when another reactor, or another instance's log reader, was ahead);
    // the client got it there and resumes from it here.
    let first = crate::stream::frame::EventId {
        ms: crate::time::epoch_ms(),
        seq: lab.gw.hub.last_pos() + 1,
    };
    let data = br#"{"deviceId":"M1","data":{"n":1}}"#;
    let event = crate::stream::frame::Event::RealtimeUpdate;
    lab.gw.hub.preload(first, event, "M1", data);
    let mut c = Client::connect(&mut lab);
    c.send(
        format!(
            "GET /sse/stream?ticket={ticket}&deviceId=M1 HTTP/1.1\r\nHost: t\r\nLast-Event-ID: {first}\r\n\r\n"
        )
        .as_bytes(),
    );
    assert!(lab.until(T, |_| c.pump().statuses() == [200]));
    // Event 2 shows the reactor the hole; it routes 1 from the window, and
    // the waiting stream takes what follows 1 only.
    lab.gw
        .hub
        .publish(
            "mqtt:realtime:processed",
            br#"{"deviceId":"M1","data":{"n":2}}"#,
        )
        .expect("published");
    assert!(lab.until(T, |_| c.pump().text().contains(r#""n":2"#)));
    let text = c.text();
    assert!(!text.contains(r#""n":1"#), "event 1 twice: {text}");
    assert!(!text.contains("replay-gap"), "{text}");
}

#[test]
fn frames_for_a_stream_written_a_moment_ago_wait_out_the_window_and_leave_together() {
    let mut lab = Lab::new(&["--coalesce-ms", "1000"]);
    let mut s = busy_stream(&mut lab);
    // The head went out a moment ago: these frames are held.
    for n in 0..3 {
        publish_n(&lab, n, 0);
    }
    lab.turn();
    assert!(!s.pump().text().contains("\"n\":0"), "{}", s.text());
    assert!(lab.until(Duration::from_secs(3), |_| s
        .pump()
        .text()
        .contains("\"n\":0")));
    assert!(
        s.text().contains("\"n\":2"),
        "written together: {}",
        s.text()
    );
}

#[test]
fn without_coalescing_a_frame_leaves_in_the_turn_it_arrives() {
    let mut lab = Lab::new(&["--coalesce-ms", "0"]);
    let mut s = busy_stream(&mut lab);
    for n in 0..3 {
        publish_n(&lab, n, 0);
        lab.turn();
        assert!(s.pump().text().contains(&format!("\"n\":{n}")));
    }
}

#[test]
fn a_stream_not_written_for_a_window_is_written_at_once() {
    let mut lab = Lab::new(&["--coalesce-ms", "50"]);
    let mut s = busy_stream(&mut lab);
    // Let the window since the head pass (time itself is what is tested).
    let quiet = std::time::Instant::now() + Duration::from_millis(60);
    assert!(lab.until(T, |_| std::time::Instant::now() >= quiet));
    publish_n(&lab, 0, 0);
    lab.turn();
    assert!(s.pump().text().contains("\"n\":0"), "{}", s.text());
}

#[test]
fn a_held_stream_with_a_write_worth_queued_is_written_at_once() {
    let mut lab = Lab::new(&["--coalesce-ms", "1000"]);
    let mut s = busy_stream(&mut lab);
    // 20 KB: past what a held stream may gather.
    publish_n(&lab, 0, 20_000);
    lab.turn();
    assert!(lab.until(Duration::from_millis(500), |_| s
        .pump()
        .text()
        .contains("\"n\":0")));
}

#[test]
fn a_stream_keeps_its_outbox_room_only_while_it_is_written_often() {
    let mut lab = Lab::new(&["--coalesce-ms", "0"]);
    lab.memory().grant("u1", "M1");
    // The ticket and then the stream on one keep-alive connection: the
    // ticket's response a moment before must not make the new stream look
    // busy (it would keep its room for nothing).
    let mut c = Client::connect(&mut lab);
    let post = format!(
        "POST /sse/stream-ticket HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        lab.token("u1")
    );
    c.send(post.as_bytes());
    assert!(lab.until(T, |lab| {
        lab.release(&[]);
        c.pump().statuses() == [200]
    }));
    let text = c.text();
    let at = text.find("\"ticket\":\"").expect("a ticket") + 10;
    let ticket = text[at..at + text[at..].find('"').expect("end")].to_owned();
    c.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |lab| {
        lab.release(&[]);
        c.pump().statuses() == [200, 200]
    }));
    let room = |lab: &Lab| {
        let (_, conn) = lab
            .reactor
            .conns
            .iter()
            .find(|(_, c)| c.stream().is_some())
            .expect("the stream");
        conn.outbox.room()
    };
    assert_eq!(room(&lab), 0, "an idle stream holds no room");
    // Written a moment ago (its head): a frame now keeps the room.
    publish_n(&lab, 0, 0);
    lab.turn();
    assert!(c.pump().text().contains("\"n\":0"));
    assert!(room(&lab) > 0, "a stream written often keeps its room");
}
