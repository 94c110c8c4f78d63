//! The gateway's hot paths, one benchmark each: parsing a request head,
//! turning a bus message into an encoded frame, fanning one frame out to
//! 10,000 outboxes, the timer wheel at 100,000 timers, verifying a ticket, and
//! the cluster log's structures: finding a resume id in a 100,000-event replay
//! window, and a new leader finding the log's tail in 100,000 heard messages;
//! the registry taking and giving back 10,000 streams' slots; formatting a
//! stream's log line (two per open), as text and as JSON.
//!
//! `cargo bench --bench hot_paths`; results go to `target/criterion/`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sse_gateway::auth::ticket::TicketKey;
use sse_gateway::auth::{Identity, UserId};
use sse_gateway::http::head;
use sse_gateway::ingress::clusterlog::{
    self,
    heard::{Heard, Mark},
};
use sse_gateway::reactor::outbox::Outbox;
use sse_gateway::reactor::timer::TimerWheel;
use sse_gateway::stream::frame::{self, EventId, Frame, Purpose};
use sse_gateway::stream::registry::{Elsewhere, Limits, Registry, Slot};
use sse_gateway::stream::replay::ReplayWindow;
use sse_gateway::stream::subscriptions::{Filter, Subscriptions};

const REQUEST: &[u8] = b"GET /sse/stream?ticket=eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.sig&deviceIds=Machine%201,Machine%202 HTTP/1.1\r\nHost: gateway.example\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nLast-Event-ID: 1795307831033-7\r\nOrigin: https://dashboard.example\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n";

const MESSAGE: &[u8] = br#"{"deviceId":"Machine 1","data":{"devId":"Machine 1","Data":{"T1":204.3,"OT":55.0,"RPM":1249,"OPM":4}}}"#;

fn head_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("head");
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("parse_stream_request", |b| {
        b.iter(|| match head::parse(black_box(REQUEST)) {
            head::Parse::Complete(h) => h.head_len,
            _ => 0,
        })
    });
    g.finish();
}

fn frame_encode(c: &mut Criterion) {
    c.bench_function("frame/message_to_encoded_frame", |b| {
        b.iter(|| {
            let m = frame::message(
                "mqtt:realtime:processed",
                black_box(MESSAGE),
                1_795_307_831_033,
            )
            .ok()?;
            let id = EventId {
                ms: 1_795_307_831_033,
                seq: 7,
            };
            Some(Frame::encode(Some(id), m.event, &m.device, &m.data).len())
        })
    });
}

fn fanout(c: &mut Criterion) {
    let m = frame::message("mqtt:realtime:processed", MESSAGE, 1).ok();
    let f = m.map(|m| Arc::new(Frame::encode(None, m.event, &m.device, &m.data)));
    let Some(f) = f else { return };
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("one_frame_to_10k_outboxes", |b| {
        b.iter_batched_ref(
            || (0..10_000).map(|_| Outbox::default()).collect::<Vec<_>>(),
            |outboxes| {
                for o in outboxes.iter_mut() {
                    o.push_frame(&f);
                }
            },
            BatchSize::LargeInput,
        )
    });
    // A frame queued and written on 10,000 streams, as at low load (one
    // frame a turn): the ring kept between flushes (what a stream with
    // traffic does) against given back after every flush (what every
    // stream did before, an allocation and a free per frame).
    for (name, trim) in [
        ("push_flush_10k_keeping_room", false),
        ("push_flush_10k_trimming", true),
    ] {
        let mut outboxes: Vec<Outbox> = (0..10_000).map(|_| Outbox::default()).collect();
        g.bench_function(name, |b| {
            b.iter(|| {
                for o in outboxes.iter_mut() {
                    o.push_frame(&f);
                    let _ = o.flush(&mut std::io::sink());
                    if trim {
                        o.trim();
                    }
                }
            })
        });
    }
    g.finish();
}

/// The reactor's device index: route a frame of a hot device to its 10,000
/// subscribers, and a reconnect storm on it (every subscriber leaves).
fn subscriptions(c: &mut Criterion) {
    let devices: Filter = Filter::Devices(vec![Box::<str>::from("M1")].into());
    let full = || {
        let mut s = Subscriptions::default();
        for key in 0..10_000 {
            s.add(key, Purpose::Data, &devices);
        }
        s
    };
    let f = Frame::encode(None, frame::Event::RealtimeUpdate, "M1", b"{}");
    let mut g = c.benchmark_group("subscriptions");
    g.throughput(Throughput::Elements(10_000));
    let routed = full();
    g.bench_function("route_one_frame_to_10k", |b| {
        b.iter(|| {
            let mut n = 0usize;
            routed.each(&f, |k| n += k);
            n
        })
    });
    g.bench_function("10k_leave_one_device", |b| {
        b.iter_batched_ref(
            full,
            |s| {
                for key in 0..10_000 {
                    s.remove(key, Purpose::Data, &devices);
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn timers(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("insert_100k", |b| {
        b.iter_batched_ref(
            || TimerWheel::new(0),
            |w| {
                for i in 0..100_000u64 {
                    w.insert(25_000 + (i * 7919) % 25_000, i as u32);
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("expire_100k", |b| {
        b.iter_batched_ref(
            || {
                let mut w = TimerWheel::new(0);
                for i in 0..100_000u64 {
                    w.insert(25_000 + (i * 7919) % 25_000, i as u32);
                }
                (w, Vec::with_capacity(100_000))
            },
            |(w, out)| {
                // Advance the way the reactor does: to each next deadline.
                while let Some(at) = w.next_deadline() {
                    w.poll(at, out);
                }
                out.len()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn tickets(c: &mut Criterion) {
    let key = TicketKey::new(b"bench-ticket-secret");
    let who = Identity {
        user: UserId::named("u1"),
        admin: false,
    };
    let now = sse_gateway::time::epoch_ms() / 1000;
    let minted = key.mint(&who, Some(Purpose::Data), 3600, now);
    c.bench_function("ticket/verify", |b| {
        b.iter(|| key.verify(black_box(&minted.token)).is_some())
    });
}

/// A resume: the client's id looked up among 100,000 held frames (binary
/// search), then the frames after it collected.
fn replay(c: &mut Criterion) {
    let mut window = ReplayWindow::new(100_000, u64::MAX, 0, true);
    for pos in 1..=100_000u64 {
        let id = EventId {
            ms: 1_700_000_000_000 + pos / 4,
            seq: pos,
        };
        let mut f = Frame::encode(Some(id), frame::Event::SpcUpdate, "M1", b"{}");
        f.pos = pos;
        window.push(Arc::new(f), 0);
    }
    let near_end = EventId {
        ms: 1_700_000_000_000 + 99_000 / 4,
        seq: 99_000,
    };
    c.bench_function("replay/resume_1000_of_100k", |b| {
        b.iter(|| window.after_id(black_box(near_end), 100_000, 0))
    });
}

/// A new leader's sync: the log's 16 newest hashes found among 100,000
/// heard messages (the tail sits 100 messages from the end).
fn heard(c: &mut Criterion) {
    let mut heard = Heard::default();
    let now = std::time::Instant::now();
    let mut hashes = Vec::new();
    for n in 0..100_000u32 {
        let payload = format!(r#"{{"deviceId":"M{}","n":{n}}}"#, n % 100).into_bytes();
        let hash = clusterlog::heard::hash(0, &payload);
        hashes.push(hash);
        heard.push(
            now,
            Mark::Message {
                channel: 0,
                payload: Some(payload.into()),
                hash,
            },
        );
    }
    let tail: Vec<u64> = hashes[..99_900].iter().rev().take(16).copied().collect();
    c.bench_function("heard/align_tail_in_100k", |b| {
        b.iter(|| heard.align(black_box(&tail), |_| false))
    });
}

/// The registry of open streams: 10,000 streams take their slots and give
/// them back (a reconnect storm's opens and closes), one stream per user
/// and four per user from one address, and one stream per user from an
/// address of its own (clients on the internet).
fn registry(c: &mut Criterion) {
    let one: std::net::IpAddr = "127.0.0.1".parse().expect("an address");
    let limits = Limits {
        alerts: 8,
        data: 8,
        per_ip: u32::MAX,
    };
    let slot = |i: u32| Slot {
        id: uuid::Uuid::from_u128(u128::from(i) + 1),
        purpose: Purpose::Data,
        devices: Vec::<Box<str>>::new().into(),
        connected_at_ms: 0,
        owner: (0, i),
    };
    let mut g = c.benchmark_group("registry");
    g.throughput(Throughput::Elements(10_000));
    for (per_user, addresses) in [(1u32, false), (4, false), (1, true)] {
        let users: Vec<UserId> = (0..10_000 / per_user)
            .map(|u| UserId::named(&format!("user-{u}")))
            .collect();
        // 10.0.0.0 onwards: one address per stream.
        let ip = |i: u32| match addresses {
            true => std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            false => one,
        };
        let name = match addresses {
            true => "open_close_10k_streams_1_per_user_and_address".to_string(),
            false => format!("open_close_10k_streams_{per_user}_per_user"),
        };
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || Registry::new(limits, Arc::default()),
                |r| {
                    for i in 0..10_000 {
                        let user = &users[(i / per_user) as usize];
                        let _ = r.open(user, ip(i), slot(i), Elsewhere::default());
                    }
                    for i in 0..10_000 {
                        let user = &users[(i / per_user) as usize];
                        r.close(&user.key, ip(i), uuid::Uuid::from_u128(u128::from(i) + 1));
                    }
                    r.total()
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// The line a closing stream logs, with its fields, in both formats.
fn log_line(c: &mut Criterion) {
    use sse_gateway::log::{line, LogFormat};
    let fields: [(&str, &str); 4] = [
        ("id", "0b9f4c2e-7c1d-4f6e-9a51-3d2b8e6f0a17"),
        ("user", "operator-17"),
        ("purpose", "data"),
        ("cause", "ClientClosed"),
    ];
    let mut g = c.benchmark_group("log");
    for (name, format) in [("text", LogFormat::Text), ("json", LogFormat::Json)] {
        g.bench_function(format!("stream_closed_line_{name}"), |b| {
            b.iter(|| {
                line(
                    format,
                    log::Level::Info,
                    format_args!("stream closed"),
                    black_box(&fields),
                )
                .len()
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    head_parse,
    frame_encode,
    fanout,
    subscriptions,
    timers,
    tickets,
    replay,
    heard,
    registry,
    log_line
);
criterion_main!(benches);
