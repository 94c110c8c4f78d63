//! The deadlines a connection meets, with their flags turned down: the head's
//! (it bounds the head only), the request's (head, body, lookup and response,
//! from the request's first byte), and a stream's write stall (a client that
//! reads, however slowly, is not stalled).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::scenarios::publish_n;
use super::{stream_request, Client, Lab, T};

/// A POST whose head is complete and whose 2-byte body has 1 byte.
const HALF_A_BODY: &[u8] =
    b"POST /sse/stream-ticket HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{";

/// Turns the reactor until `d` has passed (the passing time is what is
/// tested).
fn wait_out(lab: &mut Lab, d: Duration) {
    let end = Instant::now() + d;
    assert!(lab.until(d + T, |_| Instant::now() >= end));
}

/// A head complete at once and a body that ends after the head's deadline,
/// well within the request's: it is answered (it was closed, unanswered,
/// at the head's deadline).
#[test]
fn a_body_that_ends_after_the_head_deadline_is_answered() {
    let mut lab = Lab::new(&["--head-timeout-secs", "0.3", "--request-timeout-secs", "5"]);
    let mut c = Client::connect(&mut lab);
    c.send(HALF_A_BODY);
    wait_out(&mut lab, Duration::from_millis(700));
    assert!(!c.pump().closed, "closed while its body was on its way");
    c.send(b"}");
    assert!(lab.until(T, |_| c.pump().closed));
    assert_eq!(c.statuses().len(), 1, "{}", c.text());
    assert_eq!(lab.gw.metrics.request_timeouts.load(Relaxed), 0);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

/// With the request deadline shorter than the head's, a request whose head
/// or body never ends is cut off at the request deadline, with no answer
/// (the body was given the head's 5 s; the head too).
#[test]
fn a_request_that_never_ends_is_cut_off_at_the_request_deadline() {
    let mut lab = Lab::new(&["--head-timeout-secs", "5", "--request-timeout-secs", "0.5"]);
    let started = Instant::now();
    let mut body = Client::connect(&mut lab);
    body.send(HALF_A_BODY);
    let mut head = Client::connect(&mut lab);
    head.send(b"GET /health HTTP/1.1\r\nHost: t\r\n");
    let closed = lab.until(Duration::from_secs(3), |_| {
        body.pump().closed && head.pump().closed
    });
    let took = started.elapsed();
    assert!(closed, "still open after {took:?}");
    assert!(took >= Duration::from_millis(450), "closed after {took:?}");
    assert!(body.got.is_empty() && head.got.is_empty());
    assert_eq!(lab.gw.metrics.request_timeouts.load(Relaxed), 2);
    assert!(lab.until(T, |lab| lab.reactor.connections() == 0));
    lab.check_empty();
}

/// A lookup still out when the request deadline passes: the connection
/// closes then, not at the lookup's 2 s with a 503.
#[test]
fn a_lookup_still_out_at_the_request_deadline_closes_the_connection() {
    let mut lab = Lab::new(&["--request-timeout-secs", "0.5"]);
    lab.memory().hold();
    let mut c = Client::connect(&mut lab);
    let post = format!(
        "POST /sse/stream-ticket HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        lab.token("u1")
    );
    let started = Instant::now();
    c.send(post.as_bytes());
    assert!(lab.until(T, |lab| lab.phases() == ["waiting"]));
    assert!(lab.until(Duration::from_millis(1500), |_| c.pump().closed));
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(c.statuses().is_empty(), "{}", c.text());
    assert_eq!(lab.gw.metrics.request_timeouts.load(Relaxed), 1);
    // Its late answer finds nothing to answer.
    lab.release(&[]);
    lab.turns_for(Duration::from_millis(20));
    lab.check_empty();
}

/// A client that reads its stream slowly (a small receive buffer, 1 KiB
/// every 10 ms) takes bytes all along, although the kernel reports the
/// gateway's socket writable again only once much of its send buffer has
/// drained: it is not closed as write-stalled (it was, at the stall
/// deadline, like a client that reads nothing). When it stops reading, it is.
#[test]
fn a_slow_reader_is_not_write_stalled_and_is_once_it_stops() {
    let mut lab = Lab::new(&["--write-stall-secs", "1", "--max-backlog-bytes", "50000000"]);
    lab.memory().grant("u1", "M1");
    let ticket = lab.ticket("u1");
    let mut slow = Client::connect_with(&mut lab, Some(4096));
    slow.send(&stream_request(&ticket, "M1"));
    assert!(lab.until(T, |lab| lab.gw.registry.total() == 1));
    let stalls = |lab: &Lab| lab.gw.metrics.write_stalls.load(Relaxed);
    let mut next_read = Instant::now();
    let mut read_slowly = move |c: &mut Client| {
        if Instant::now() >= next_read {
            c.read_some(1024);
            next_read += Duration::from_millis(10);
        }
    };
    // 6 MB: more than every socket buffer between the client and us.
    for n in 0..600 {
        publish_n(&lab, n, 10_000);
        lab.turn();
        read_slowly(&mut slow);
    }
    let reading = Instant::now() + Duration::from_secs(3);
    lab.until(Duration::from_secs(4), |lab| {
        read_slowly(&mut slow);
        Instant::now() >= reading || stalls(lab) > 0
    });
    assert_eq!(stalls(&lab), 0, "a reading client was cut off as stalled");
    assert!(
        !slow.closed && slow.got.len() > 100_000,
        "{}",
        slow.got.len()
    );
    assert_eq!(lab.gw.registry.total(), 1);
    // It stops reading: within two stall periods (the first look may still
    // see the bytes it took before it stopped), it is cut off.
    let stopped = Instant::now();
    assert!(lab.until(Duration::from_secs(4), |lab| stalls(lab) == 1));
    assert!(stopped.elapsed() >= Duration::from_millis(800));
    assert_eq!(lab.gw.registry.total(), 0);
}
