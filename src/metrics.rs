//! Process-wide counters, rendered as Prometheus text at `/metrics`.
//!
//! Plain relaxed atomics: one add per event per reactor (not per subscriber),
//! one per connection change. Labels come only from bounded sets (event type,
//! purpose, HTTP status, close reason, reactor number), never from devices
//! or users.
//!
//! What operators ask, and the family that answers (the Grafana dashboard in
//! `deploy/grafana/` and the alerts in `deploy/prometheus/` use exactly these):
//! streams open by purpose, opens and rejections by status, deliveries, the
//! publish→write lag ([`lag`]), slow-consumer closes by reason, revocations,
//! `replay-gap`s, Redis state and reconnects, reactor mailbox depth, and
//! the cluster log (`sse_cluster_leader` on its leader,
//! `sse_cluster_log_enabled` in Redis mode, holes found and gap markers
//! written).

pub mod lag;

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::stream::frame::{Event, Purpose};
use lag::LagHistogram;

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
    /// Slow-consumer closes because the unsent backlog passed its bound.
    pub slow_consumers: AtomicU64,
    /// Slow-consumer closes because the client took no byte for
    /// `--write-stall-secs`.
    pub write_stalls: AtomicU64,
    /// Streams closed with `{"kind":"revoked"}` (ticket revoked, access changed).
    pub revoked: AtomicU64,
    /// 1 while this instance leads the cluster log; 0 otherwise, and always 0
    /// while there is no cluster log.
    pub cluster_leader: AtomicU64,
    /// 1 when this instance takes part in a cluster log (the "no leader"
    /// alert only means something then).
    pub cluster_log: AtomicU64,
    /// Holes this instance found in the cluster log (entries it never read,
    /// a Redis that lost the log): each a `replay-gap` to every stream.
    pub log_breaks: AtomicU64,
    /// Gap markers this instance wrote into the cluster log as its leader
    /// (ingest it may not have heard).
    pub log_gaps_written: AtomicU64,
    /// Publish→write lag, observed once per frame per reactor.
    pub lag: LagHistogram,
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

    /// Prometheus text exposition format 0.0.4. `redis` is "up", "down" or
    /// "embedded"; `mailbox_depths` the messages waiting per reactor.
    pub fn render(&self, redis: &str, mailbox_depths: impl IntoIterator<Item = usize>) -> String {
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
        let single: [(&str, &str, &str, &AtomicU64); 15] = [
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
                "sse_streams_revoked_total",
                "counter",
                "Streams closed with kind revoked: ticket revoked or device access withdrawn.",
                &self.revoked,
            ),
            (
                "sse_cluster_leader",
                "gauge",
                "1 while this instance leads the cluster log; 0 otherwise and while there is none.",
                &self.cluster_leader,
            ),
            (
                "sse_cluster_log_enabled",
                "gauge",
                "1 when this instance takes part in a cluster log (Redis mode with the shared log).",
                &self.cluster_log,
            ),
            (
                "sse_cluster_log_breaks_total",
                "counter",
                "Holes this instance found in the cluster log; each is a replay-gap to every stream.",
                &self.log_breaks,
            ),
            (
                "sse_cluster_log_gaps_written_total",
                "counter",
                "Gap markers this instance wrote into the cluster log as leader (ingest it may not have heard).",
                &self.log_gaps_written,
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
            "sse_slow_consumer_disconnects_total",
            "counter",
            "Streams closed as slow consumers, by reason: backlog past --max-backlog-bytes, or no byte taken for --write-stall-secs.",
        );
        for (reason, v) in [
            ("backlog", &self.slow_consumers),
            ("write_stall", &self.write_stalls),
        ] {
            let _ = writeln!(
                o,
                "sse_slow_consumer_disconnects_total{{reason=\"{reason}\"}} {}",
                g(v)
            );
        }
        family(
            &mut o,
            "sse_mailbox_depth",
            "gauge",
            "Messages waiting in a reactor's mailbox (frames, lookups, probes), by reactor.",
        );
        for (i, depth) in mailbox_depths.into_iter().enumerate() {
            let _ = writeln!(o, "sse_mailbox_depth{{reactor=\"{i}\"}} {depth}");
        }
        self.lag.render(
            &mut o,
            "sse_publish_write_lag_seconds",
            "Time from an event's id (its publish time) to the reactor turn that flushed it, once per event per reactor.",
        );
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
        m.write_stalls.fetch_add(1, Relaxed);
        m.lag.observe(1_000, &[1_000, 990]);
        let text = m.render("down", [0, 7]);
        assert!(text.contains("sse_events_received_total{event=\"spc-update\"} 1\n"));
        assert!(text.contains("sse_events_delivered_total{event=\"spc-update\"} 3\n"));
        assert!(text.contains("sse_rejections_total{status=\"429\"} 2\n"));
        assert!(text.contains("sse_redis_up{mode=\"redis\"} 0\n"));
        assert!(text.contains("sse_streams_open{purpose=\"data\"} 0\n"));
        assert_eq!(m.rejections(429), 2);
        assert!(text.contains("sse_slow_consumer_disconnects_total{reason=\"backlog\"} 0\n"));
        assert!(text.contains("sse_slow_consumer_disconnects_total{reason=\"write_stall\"} 1\n"));
        assert!(text.contains("sse_mailbox_depth{reactor=\"1\"} 7\n"));
        assert!(text.contains("sse_cluster_leader 0\n"));
        assert!(text.contains("sse_publish_write_lag_seconds_count 2\n"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }
}
