//! Process-wide counters, rendered as Prometheus text at `/metrics`.
//!
//! Plain relaxed atomics: one add per event per reactor (not per subscriber),
//! one per connection change. Labels come only from bounded sets (event type,
//! purpose, HTTP status), never from devices or users.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::stream::frame::{Event, Purpose};

/// HTTP statuses the gateway answers with an error; a rejection counter each.
pub const REJECT_STATUSES: [u16; 12] = [400, 401, 403, 404, 405, 408, 411, 413, 429, 431, 500, 503];

#[derive(Default)]
pub struct Metrics {
    pub streams_alerts: AtomicU64,
    pub streams_data: AtomicU64,
    pub streams_opened: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub accept_errors: AtomicU64,
    pub requests: AtomicU64,
    received: [AtomicU64; Event::ALL.len()],
    delivered: [AtomicU64; Event::ALL.len()],
    pub dropped_not_json: AtomicU64,
    pub dropped_no_device: AtomicU64,
    pub heartbeats: AtomicU64,
    rejections: [AtomicU64; REJECT_STATUSES.len()],
    pub slow_consumers: AtomicU64,
    pub conflated: AtomicU64,
    pub redis_up: AtomicU64,
    pub redis_reconnects: AtomicU64,
    pub replay_events: AtomicU64,
    pub replay_bytes: AtomicU64,
    pub replays_served: AtomicU64,
    pub replay_gaps: AtomicU64,
    // ----- second release: security and progress --------------------------
    /// Bus messages over `--max-event-bytes`, dropped.
    pub dropped_too_large: AtomicU64,
    /// Frames a reactor's full mailbox refused (recovered from the replay
    /// window, or told to its streams as `replay-gap`).
    pub mailbox_overflows: AtomicU64,
    /// Streams closed because their client took none of their bytes for
    /// `--write-stall-secs`.
    pub write_stalls: AtomicU64,
    /// Streams closed by a revoked ticket or a withdrawn device.
    pub revoked: AtomicU64,
    /// Connections closed for not finishing an exchange in time, or idling.
    pub request_timeouts: AtomicU64,
    /// Connections refused at accept: too many non-stream connections from one IP.
    pub peer_refusals: AtomicU64,
}

impl Metrics {
    pub fn received(&self, e: Event) {
        self.received[e.index()].fetch_add(1, Relaxed);
    }

    pub fn delivered(&self, e: Event, n: u64) {
        if n > 0 {
            self.delivered[e.index()].fetch_add(n, Relaxed);
        }
    }

    pub fn rejected(&self, status: u16) {
        if let Some(i) = REJECT_STATUSES.iter().position(|s| *s == status) {
            self.rejections[i].fetch_add(1, Relaxed);
        }
    }

    pub fn rejections(&self, status: u16) -> u64 {
        REJECT_STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.rejections[i].load(Relaxed))
    }

    pub fn stream_gauge(&self, p: Purpose) -> &AtomicU64 {
        match p {
            Purpose::Alerts => &self.streams_alerts,
            Purpose::Data => &self.streams_data,
        }
    }

    /// Prometheus text exposition format 0.0.4. `redis` is "up", "down" or "embedded".
    pub fn render(&self, redis: &str) -> String {
        let mut o = String::with_capacity(4096);
        let g = |v: &AtomicU64| v.load(Relaxed);
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut o,
            "sse_streams_open",
            "gauge",
            "Open SSE streams by purpose.",
        );
        for p in [Purpose::Alerts, Purpose::Data] {
            let _ = writeln!(
                o,
                "sse_streams_open{{purpose=\"{}\"}} {}",
                p.as_str(),
                g(self.stream_gauge(p))
            );
        }
        let single: [(&str, &str, &str, &AtomicU64); 11] = [
            (
                "sse_streams_opened_total",
                "counter",
                "Streams opened since start.",
                &self.streams_opened,
            ),
            (
                "sse_connections_open",
                "gauge",
                "Open TCP connections (streams and plain requests).",
                &self.connections_open,
            ),
            (
                "sse_connections_accepted_total",
                "counter",
                "Accepted TCP connections.",
                &self.connections_accepted,
            ),
            (
                "sse_accept_errors_total",
                "counter",
                "Failed accepts (EMFILE and the like); the listener backs off.",
                &self.accept_errors,
            ),
            (
                "sse_requests_total",
                "counter",
                "HTTP requests parsed.",
                &self.requests,
            ),
            (
                "sse_heartbeats_total",
                "counter",
                "Heartbeat frames queued to streams.",
                &self.heartbeats,
            ),
            (
                "sse_slow_consumer_disconnects_total",
                "counter",
                "Streams closed because their unsent backlog passed --max-backlog-bytes.",
                &self.slow_consumers,
            ),
            (
                "sse_redis_reconnects_total",
                "counter",
                "Times the Redis subscriber reconnected after losing Redis.",
                &self.redis_reconnects,
            ),
            (
                "sse_replay_window_events",
                "gauge",
                "Events held for Last-Event-ID replay.",
                &self.replay_events,
            ),
            (
                "sse_replay_window_bytes",
                "gauge",
                "Bytes of frames held for Last-Event-ID replay.",
                &self.replay_bytes,
            ),
            (
                "sse_replays_total",
                "counter",
                "Streams opened with a Last-Event-ID that the window could serve.",
                &self.replays_served,
            ),
        ];
        for (name, kind, help, v) in single {
            family(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {}", g(v));
        }
        family(
            &mut o,
            "sse_replay_gaps_total",
            "counter",
            "Streams told replay-gap: their Last-Event-ID was unknown or older than the window.",
        );
        let _ = writeln!(o, "sse_replay_gaps_total {}", g(&self.replay_gaps));
        family(
            &mut o,
            "sse_events_conflated_total",
            "counter",
            "realtime-update events replaced by a newer value under --max-rate-per-device.",
        );
        let _ = writeln!(o, "sse_events_conflated_total {}", g(&self.conflated));
        family(
            &mut o,
            "sse_events_received_total",
            "counter",
            "Bus messages turned into frames, by event.",
        );
        for e in Event::ALL {
            let _ = writeln!(
                o,
                "sse_events_received_total{{event=\"{}\"}} {}",
                e.name(),
                g(&self.received[e.index()])
            );
        }
        family(
            &mut o,
            "sse_events_delivered_total",
            "counter",
            "Frames queued to streams (one per stream), by event.",
        );
        for e in Event::ALL {
            let _ = writeln!(
                o,
                "sse_events_delivered_total{{event=\"{}\"}} {}",
                e.name(),
                g(&self.delivered[e.index()])
            );
        }
        family(
            &mut o,
            "sse_events_dropped_total",
            "counter",
            "Bus messages dropped, by reason.",
        );
        let _ = writeln!(
            o,
            "sse_events_dropped_total{{reason=\"not_json\"}} {}",
            g(&self.dropped_not_json)
        );
        let _ = writeln!(
            o,
            "sse_events_dropped_total{{reason=\"no_device_id\"}} {}",
            g(&self.dropped_no_device)
        );
        let _ = writeln!(
            o,
            "sse_events_dropped_total{{reason=\"too_large\"}} {}",
            g(&self.dropped_too_large)
        );
        family(
            &mut o,
            "sse_rejections_total",
            "counter",
            "Requests answered with an error, by status.",
        );
        for (i, s) in REJECT_STATUSES.iter().enumerate() {
            let _ = writeln!(
                o,
                "sse_rejections_total{{status=\"{s}\"}} {}",
                g(&self.rejections[i])
            );
        }
        family(
            &mut o,
            "sse_redis_up",
            "gauge",
            "1 while the Redis subscriber is connected (embedded mode: 1).",
        );
        let _ = writeln!(
            o,
            "sse_redis_up{{mode=\"{}\"}} {}",
            if redis == "embedded" {
                "embedded"
            } else {
                "redis"
            },
            u64::from(redis != "down")
        );
        for (name, help, v) in [
            (
                "sse_mailbox_overflows_total",
                "Frames a lagging reactor's full mailbox refused (recovered from the replay window or sent as replay-gap).",
                &self.mailbox_overflows,
            ),
            (
                "sse_write_stall_disconnects_total",
                "Streams closed because their client took none of their bytes for --write-stall-secs.",
                &self.write_stalls,
            ),
            (
                "sse_streams_revoked_total",
                "Streams closed by a revoked ticket or a withdrawn device.",
                &self.revoked,
            ),
            (
                "sse_request_timeouts_total",
                "Connections closed for not finishing a request and its response in time, or idling in keep-alive.",
                &self.request_timeouts,
            ),
            (
                "sse_peer_refusals_total",
                "Connections refused at accept: too many non-stream connections from one IP.",
                &self.peer_refusals,
            ),
        ] {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", g(v));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_counts() {
        let m = Metrics::default();
        m.received(Event::SpcUpdate);
        m.delivered(Event::SpcUpdate, 3);
        m.rejected(429);
        m.rejected(429);
        m.rejected(999); // not a tracked status: ignored, not a panic
        let text = m.render("down");
        assert!(text.contains("sse_events_received_total{event=\"spc-update\"} 1\n"));
        assert!(text.contains("sse_events_delivered_total{event=\"spc-update\"} 3\n"));
        assert!(text.contains("sse_rejections_total{status=\"429\"} 2\n"));
        assert!(text.contains("sse_redis_up{mode=\"redis\"} 0\n"));
        assert!(text.contains("sse_streams_open{purpose=\"data\"} 0\n"));
        assert_eq!(m.rejections(429), 2);
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }
}
