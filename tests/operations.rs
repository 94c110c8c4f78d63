//! What operators install and watch (issue 14, contract 7.6): structured
//! logs in both formats, the metrics that the Grafana dashboard and the
//! Prometheus alert rules name, the rules themselves (`promtool`), and the
//! packaged environment file and systemd unit, and where SIGTERM lands. The
//! `.deb` itself is built and checked by `tests/package/run.sh` (it needs the
//! release build).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

/// A user id that tries to forge a second log line and break out of quotes.
const FORGED_SUB: &str = "eve\" role=admin\n2030-01-01T00:00:00.000Z INFO  stream open user=root";

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Opens and closes an alert stream for [`FORGED_SUB`], and has two streams
/// refused: a garbage ticket (401, logged with its redacted query) and a
/// device the user does not own (403, logged with the user). Returns once the
/// close is logged.
fn open_refuse_close(gw: &Gateway) {
    let (alerts, _) = gw.ticket_for(FORGED_SUB, r#"{"purpose":"alerts"}"#);
    let stream = SseStream::must_open(gw.addr(), &alerts_path(&alerts), &[]);
    let refused = SseStream::open(gw.addr(), &data_path("garbage", &["D1"]), &[]).err();
    assert_eq!(refused.map(|r| r.status), Some(401));
    let (data, _) = gw.ticket_for(FORGED_SUB, r#"{"purpose":"data"}"#);
    let refused = SseStream::open(gw.addr(), &data_path(&data, &["D9"]), &[]).err();
    assert_eq!(refused.map(|r| r.status), Some(403));
    drop(stream);
    assert!(
        wait_until(T, || gw.log().contains("stream closed")),
        "{}",
        gw.log()
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_the_events_fields() {
    let gw = Gateway::builder().args(&["--log-format", "json"]).start();
    open_refuse_close(&gw);
    let log = gw.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    for v in &lines {
        assert!(
            v["ts"].as_str().is_some_and(is_iso_ms),
            "ts is ISO 8601: {v}"
        );
        assert!(v["level"].is_string() && v["msg"].is_string(), "{v}");
    }
    let find = |msg: &str, extra: &dyn Fn(&Value) -> bool| {
        lines
            .iter()
            .find(|v| v["msg"] == msg && extra(v))
            .cloned()
            .unwrap_or_else(|| panic!("no {msg:?} line:\n{log}"))
    };
    let open = find("stream open", &|_| true);
    assert_eq!(open["user"], FORGED_SUB);
    assert_eq!(open["purpose"], "alerts");
    assert_eq!(open["level"], "info");
    assert_eq!(open["client"], "127.0.0.1");
    let unauthorized = find("stream refused", &|v| v["status"] == 401);
    assert_eq!(unauthorized["path"], "/sse/stream");
    let query = unauthorized["query"].as_str().unwrap_or_default();
    assert!(
        query.contains("ticket=***") && !query.contains("garbage"),
        "{query}"
    );
    let forbidden = find("stream refused", &|v| v["status"] == 403);
    assert_eq!(forbidden["user"], FORGED_SUB);
    let closed = find("stream closed", &|_| true);
    assert_eq!(closed["user"], FORGED_SUB);
    assert_eq!(closed["cause"], "ClientClosed");
    assert!(closed["secs"].is_number(), "{closed}");
}

#[test]
fn text_logs_keep_a_forged_newline_inside_its_line() {
    let gw = Gateway::start(&[], &[]);
    open_refuse_close(&gw);
    let log = gw.log();
    for line in log.lines() {
        let ts = line.split(' ').next().unwrap_or_default();
        assert!(
            is_iso_ms(ts),
            "every line starts with its timestamp: {line:?}"
        );
    }
    let escaped =
        r#"user="eve\" role=admin\n2030-01-01T00:00:00.000Z INFO  stream open user=root""#;
    for msg in ["stream open", "stream refused status=403", "stream closed"] {
        let line = log
            .lines()
            .find(|l| l.contains(msg))
            .unwrap_or_else(|| panic!("no {msg:?} line:\n{log}"));
        assert!(line.contains(escaped), "{line}");
    }
    for line in log.lines().filter(|l| l.contains("user=root")) {
        assert!(
            line.contains(escaped),
            "the forged text appears only escaped: {line}"
        );
    }
}

#[test]
fn an_unknown_log_format_exits_2_naming_the_flag() {
    let (code, _, err) = run_cli(&["--log-format", "yaml"], &[], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--log-format"), "{err}");
    let (code, _, err) = run_cli(&[], &[("SSE_LOG_FORMAT", "xml")], T);
    assert_eq!(code, Some(2), "{err}");
}

/// Sample and family names a `/metrics` body exports.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        names.extend(name.filter(|n| !n.is_empty()).map(str::to_owned));
    }
    names
}

/// Every `sse_...` identifier in `text`.
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while let Some(at) = text[i..].find("sse_").map(|a| a + i) {
        let mut end = at;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if at == 0 || !word(bytes[at - 1]) {
            names.insert(text[at..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let gw = Gateway::start(&[], &[]);
    // One delivered event, so the lag histogram has an observation.
    let root = gw.token("root", Some("admin"));
    let (alerts, _) = gw.ticket_with(&root, r#"{"purpose":"alerts"}"#);
    let admin = format!("Bearer {root}");
    let mut stream = SseStream::must_open(gw.addr(), &alerts_path(&alerts), &[]);
    let body = json!({"channel": "machine:alerts", "message": {"deviceId": "D1", "alert": {}}});
    let r = post(
        gw.addr(),
        "/sse/publish",
        &[("Authorization", &admin)],
        &body.to_string(),
    );
    assert!(r.status < 300, "publish: {} {}", r.status, r.text());
    let _ = stream.expect_event("machine-alert", T);
    let lag_count =
        |text: &str| metric_sum(text, |n| n == "sse_publish_write_lag_seconds_count", &[]);
    assert!(
        wait_until(T, || lag_count(&gw.metrics()) >= 1.0),
        "{}",
        gw.metrics()
    );
    let text = gw.metrics();
    assert!(text.contains("sse_mailbox_depth{reactor=\"1\"} "), "{text}");
    assert!(text.contains("sse_cluster_leader 0\n"), "{text}");
    let exported = exported_names(&text);

    let dashboard_text = repo_file("deploy/grafana/sse-gateway.json");
    let rules_text = repo_file("deploy/prometheus/alerts.yml");
    let dashboard: Value = serde_json::from_str(&dashboard_text).unwrap_or_default();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "the dashboard has a Prometheus datasource variable"
    );
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    let mut exprs = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().into_iter().flatten() {
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{t}");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{t}");
            exprs += 1;
        }
    }
    assert!(exprs >= 20, "{exprs} queries");

    let mut named = named_metrics(&dashboard_text);
    let in_rules = named_metrics(&rules_text);
    for wanted in [
        "sse_redis_up",
        "sse_slow_consumer_disconnects_total",
        "sse_rejections_total",
        "sse_cluster_leader",
    ] {
        assert!(in_rules.contains(wanted), "the alert rules use {wanted}");
    }
    named.extend(in_rules);
    let missing: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named by the dashboard or alerts but not exported: {missing:?}\n{text}"
    );
}

fn promtool(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool ({e}): install Debian's `prometheus` package (./scripts/test does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_fire_when_they_should() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("5 rules found"), "{checked}");
    promtool(&["test", "rules", "alerts.test.yml"]);
    let rules = repo_file("deploy/prometheus/alerts.yml");
    let readme = repo_file("README.md");
    for (alert, anchor) in [
        ("SseGatewayDown", "sse-gateway-down"),
        ("SseRedisDown", "redis-down"),
        ("SseSlowConsumersRising", "slow-consumers-rising"),
        ("SseRejectionsSpiking", "rejections-spiking"),
        ("SseNoClusterLeader", "no-cluster-leader"),
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert}");
        assert!(rules.contains(&format!("README.md#{anchor}\"")), "{alert}");
        let heading = format!("### {}", anchor.replace('-', " "));
        assert!(
            readme.to_lowercase().contains(&heading),
            "README runbook has {heading:?}"
        );
    }
}

#[test]
fn the_environment_file_lists_every_flag_and_the_unit_is_hardened() {
    let (code, help, _) = run_cli(&["--help"], &[], T);
    assert_eq!(code, Some(0));
    let defaults = repo_file("deploy/default/sse-gateway");
    let mut vars = 0;
    for part in help.split("[env: ").skip(1) {
        let var: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let listed = defaults
            .lines()
            .any(|l| l.trim_start_matches('#').starts_with(&format!("{var}=")));
        assert!(
            listed,
            "{var} (from --help) is not in deploy/default/sse-gateway"
        );
        vars += 1;
    }
    assert!(vars >= 19, "{vars} variables in --help:\n{help}");
    assert!(defaults.lines().any(|l| l == "SSE_LISTEN=127.0.0.1:8080"));

    let unit = repo_file("deploy/systemd/sse-gateway.service");
    let has = |line: &str| unit.lines().any(|l| l.trim() == line);
    for line in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "EnvironmentFile=-/etc/default/sse-gateway",
        "ExecStart=/usr/bin/sse-gateway",
    ] {
        assert!(has(line), "the unit says {line}");
    }
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(value("LimitNOFILE") >= 65_536);
    // The drain's default (5 s) and a generous operator setting fit.
    assert!(value("TimeoutStopSec") > 5 + 10);
}

/// Each thread's name and whether it blocks both SIGTERM and SIGINT
/// (`SigBlk` in `/proc/<pid>/task/<tid>/status`: bits 14 and 1).
fn drain_signals_blocked(pid: u32) -> Vec<(String, bool)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let Some(mask) = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        else {
            continue;
        };
        let both = (1 << (15 - 1)) | (1 << (2 - 1));
        out.push((name.trim().to_owned(), mask & both == both));
    }
    out
}

#[test]
fn sigterm_and_sigint_reach_only_the_thread_that_waits_for_them() {
    let redis = Redis::start();
    let mut gw = Gateway::builder().redis(&redis).start();
    // Every thread is up once the signal thread is (it starts last) and has
    // unblocked the two signals for itself.
    let deadline = std::time::Instant::now() + T;
    let threads = loop {
        let threads = drain_signals_blocked(gw.pid());
        let ready = threads
            .iter()
            .any(|(n, blocked)| n == "signals" && !blocked);
        if ready || std::time::Instant::now() > deadline {
            break threads;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "signals",
        "reactor-0",
        "redis-subscribe",
        "log-reader",
        "log-writer",
    ] {
        assert!(names.contains(&wanted), "no {wanted} thread: {names:?}");
    }
    for (name, blocked) in &threads {
        assert_eq!(*blocked, name != "signals", "{name}: {threads:?}");
    }
    // The signal still drains the gateway.
    gw.sigterm();
    let status = gw.wait_exit(T).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}
