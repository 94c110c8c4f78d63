//! Arbitrary interleavings of client actions, late lookups and bus events,
//! checked against a small model: every answer is one the model allows,
//! registry slots match open streams at every step, every connection ends or
//! progresses, and nothing leaks.

use std::time::Duration;

use proptest::prelude::*;

use super::{stream_request, Client, Lab};

// ----- the property test --------------------------------------------------------

/// What a client may do.
#[derive(Debug, Clone)]
enum Op {
    Connect {
        small_buffer: bool,
    },
    /// Send one request of a kind (index into `requests`).
    Send {
        client: usize,
        kind: usize,
    },
    /// Send part of a request head.
    SendPart {
        client: usize,
        kind: usize,
        cut: usize,
    },
    Read {
        client: usize,
        max: usize,
    },
    Close {
        client: usize,
    },
    /// Answer the held lookups in this order.
    Release {
        order: Vec<usize>,
    },
    Publish {
        device: usize,
        size: usize,
    },
    Turn,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<bool>().prop_map(|small_buffer| Op::Connect { small_buffer }),
        (0..6usize, 0..7usize).prop_map(|(client, kind)| Op::Send { client, kind }),
        (0..6usize, 0..7usize, 1..40usize).prop_map(|(client, kind, cut)| Op::SendPart {
            client,
            kind,
            cut
        }),
        (0..6usize, 1..4096usize).prop_map(|(client, max)| Op::Read { client, max }),
        (0..6usize).prop_map(|client| Op::Close { client }),
        prop::collection::vec(0..8usize, 0..4).prop_map(|order| Op::Release { order }),
        (0..2usize, 0..3000usize).prop_map(|(device, size)| Op::Publish { device, size }),
        Just(Op::Turn),
    ]
}

/// The requests a client sends: (bytes, the statuses the model allows).
fn requests(tickets: &[String]) -> Vec<(Vec<u8>, &'static [u16])> {
    vec![
        (b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), &[200]),
        (stream_request(&tickets[0], "M1"), &[200, 429, 503]),
        (stream_request(&tickets[1], "M2"), &[200, 429, 503]),
        (stream_request("nope", "M1"), &[401]),
        (
            b"GET /sse/client.js HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            &[200],
        ),
        (b"\x16\x03\x01 garbage\r\n\r\n".to_vec(), &[400]),
        (
            b"POST /sse/publish HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            &[411],
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Whatever the clients do, and in whatever order lookups finish:
    /// every answer is one the model allows, registry slots match open
    /// streams at every step, every connection that is not a stream ends by
    /// its deadlines, and once the clients are gone nothing is left.
    #[test]
    fn every_connection_ends_or_progresses_and_nothing_leaks(ops in prop::collection::vec(op(), 1..60)) {
        run_ops(ops)?;
    }
}

fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut lab = Lab::new(&[
        "--head-timeout-secs",
        "0.3",
        "--request-timeout-secs",
        "0.3",
        "--keepalive-idle-secs",
        "0.3",
        "--write-stall-secs",
        "0.3",
        "--heartbeat-secs",
        "0.1",
        "--max-backlog-bytes",
        "30000",
    ]);
    lab.memory().grant("u1", "M1");
    lab.memory().grant("u2", "M2");
    let tickets = [lab.ticket("u1"), lab.ticket("u2")];
    let requests = requests(&tickets);
    lab.memory().hold();
    let mut clients: Vec<Option<Client>> = Vec::new();
    for op in ops {
        match op {
            Op::Connect { small_buffer } if clients.len() < 6 => {
                let rcvbuf = small_buffer.then_some(2048);
                clients.push(Some(Client::connect_with(&mut lab, rcvbuf)));
            }
            Op::Connect { .. } => {}
            Op::Send { client, kind } => {
                if let Some(Some(c)) = clients.get_mut(client) {
                    c.send(&requests[kind].0);
                }
            }
            Op::SendPart { client, kind, cut } => {
                if let Some(Some(c)) = clients.get_mut(client) {
                    let bytes = &requests[kind].0;
                    c.send(&bytes[..cut.min(bytes.len())]);
                }
            }
            Op::Read { client, max } => {
                if let Some(Some(c)) = clients.get_mut(client) {
                    c.read_some(max);
                }
            }
            Op::Close { client } => {
                if let Some(slot) = clients.get_mut(client) {
                    slot.take();
                }
            }
            Op::Release { order } => lab.release(&order),
            Op::Publish { device, size } => {
                let msg = format!(
                    r#"{{"deviceId":"M{}","data":"{}"}}"#,
                    device + 1,
                    "x".repeat(size)
                );
                let _ = lab
                    .gw
                    .hub
                    .publish("mqtt:realtime:processed", msg.as_bytes());
            }
            Op::Turn => {}
        }
        lab.turn();
        lab.check_slots();
    }
    // Lookups finish late but finish; then deadlines end every
    // connection that is not a stream, even if its client never closes.
    lab.release(&[]);
    let ended = lab.until(Duration::from_secs(3), |lab| {
        lab.release(&[]);
        lab.phases().iter().all(|p| *p == "streaming")
    });
    prop_assert!(ended, "stuck: {:?}", lab.phases());
    lab.check_slots();
    // Every answer a client got is one the model allows.
    // A part of one request followed by another makes a request of its own
    // (`GETGET /health`): malformed (400), an unknown path (404) or method
    // (405) is then the right answer too.
    let spliced: &[u16] = &[400, 404, 405];
    for c in clients.iter_mut().flatten() {
        c.pump();
        for status in c.statuses() {
            let allowed =
                requests.iter().any(|(_, ok)| ok.contains(&status)) || spliced.contains(&status);
            prop_assert!(allowed, "unexpected status {status}: {}", c.text());
        }
    }
    // The clients leave: nothing is left behind.
    clients.clear();
    let empty = lab.until(Duration::from_secs(3), |lab| lab.reactor.connections() == 0);
    prop_assert!(empty, "left: {:?}", lab.phases());
    lab.check_empty();
    Ok(())
}
