//! `loadtest run --url http[s]://HOST[:PORT]`: drives a server that is
//! already running (this gateway, or any SSE endpoint, here or on another
//! machine, over TLS when the URL says https) instead of starting one. N
//! streams over D devices opened from a path template, with or without
//! tickets, spread over worker processes; events published through a Redis
//! URL or an HTTP endpoint at a rate for a duration, with a live progress
//! line; then the same report as `compare` (Markdown, JSON, PNG charts).
//! Server resources are measured only for the PIDs given with `--pid`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use sse_testkit::access_token;

use crate::floor::iso8601;
use crate::post_publisher::{PostPublisher, PostRoute};
use crate::progress::Progress;
use crate::protocol::{Clients, Route, StreamKind, TargetKind};
use crate::publisher::{Publish, RedisPublisher};
use crate::report::Results;
use crate::resp::RedisAt;
use crate::scenario::fanout::{Bench, FanoutResult};
use crate::scenario::{open_all, seed, Ramp, Target};
use crate::tls::TlsSetup;

#[derive(Args, Debug, Clone)]
pub struct RunOpts {
    /// The running server, `http[s]://HOST[:PORT]`: any host (`HOST[:PORT]`
    /// is the `Host` header and, over https, the name the certificate must
    /// carry).
    #[arg(long)]
    pub url: String,
    /// The stream's path and query; `{ticket}`, `{device}` and `{user}` are
    /// filled in per stream.
    #[arg(long, default_value = "/sse/stream?deviceId={device}&ticket={ticket}")]
    pub stream_path: String,
    /// Where tickets come from (POST, on the same server), a path or a URL;
    /// without it no tickets are asked for.
    #[arg(long)]
    pub ticket_url: Option<String>,
    /// The ticket request's JSON body.
    #[arg(long, default_value = r#"{"purpose":"data","ttlSeconds":3600}"#)]
    pub ticket_body: String,
    /// One access token for every stream (and the HTTP publisher).
    #[arg(long)]
    pub bearer: Option<String>,
    /// Mint an HS256 access token per stream with this secret (user
    /// `<user-prefix><i>`), and an admin one for the HTTP publisher.
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// The `role` claim of the minted stream tokens (`admin` streams every
    /// device without ownership sets).
    #[arg(long)]
    pub role: Option<String>,
    /// Before opening, `SADD user:<user>:devices <device>` for every stream in
    /// this Redis (`redis://[[user]:password@]HOST:PORT[/db]`), so the
    /// gateway lets each user stream its device.
    #[arg(long)]
    pub grant_redis: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub streams: u64,
    /// Devices the streams are spread over (stream i streams device i mod D).
    #[arg(long, default_value_t = 10)]
    pub devices: u64,
    #[arg(long, default_value = "d")]
    pub device_prefix: String,
    /// Default: `lt-run-<pid>-<time>-`, new for each run so per-user limits
    /// of earlier runs never bind.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Publish with `PUBLISH <channel>` on this Redis
    /// (`redis://[[user]:password@]HOST:PORT[/db]`).
    #[arg(long, conflicts_with = "publish_url")]
    pub publish_redis: Option<String>,
    /// Publish with HTTP POSTs to this path or URL on the server; `{device}`
    /// is filled in. With `{device}` the body is the event itself (nchan's
    /// `/pub?id={device}`); without, `{"channel":..,"message":event}` (the
    /// gateway's `/sse/publish`).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Bearer of the HTTP publisher (default: an admin token minted with
    /// `--jwt-secret`, else `--bearer`).
    #[arg(long)]
    pub publish_bearer: Option<String>,
    /// The Redis channel (or `channel` of the HTTP body) events go to.
    #[arg(long, default_value = "mqtt:realtime:processed")]
    pub channel: String,
    /// Keep-alive connections of the HTTP publisher.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Events/s.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Server PIDs whose RSS and CPU are measured (comma-separated); none:
    /// the server may be elsewhere, and no server resources are reported.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// The server's name in the report (default: HOST:PORT).
    #[arg(long)]
    pub name: Option<String>,
    /// Streams per worker process at most (each may hold 20,000 descriptors).
    #[arg(long, default_value_t = 4000)]
    pub per_worker: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Tries per stream before it gives up.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// Stream opens started per second, over all workers (an arrival rate,
    /// as dashboards coming online); default: as fast as `--concurrency`
    /// allows.
    #[arg(long, value_parser = positive_rate)]
    pub open_rate: Option<f64>,
    #[arg(long, default_value = "run")]
    pub section: String,
    #[arg(long)]
    pub title: Option<String>,
    #[arg(long, default_value = "loadtest-run/RESULTS.md")]
    pub out: PathBuf,
    #[arg(long, default_value = "loadtest-run/results.json")]
    pub json: PathBuf,
    /// Exit 1 unless every stream opened and every event reached every
    /// stream exactly once with no error.
    #[arg(long)]
    pub strict: bool,
    /// https: trust the CA certificates of this PEM file too (besides
    /// Mozilla's roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// https: take any certificate (a staging server's self-signed one).
    #[arg(long, conflicts_with = "ca_file")]
    pub insecure: bool,
    /// Local addresses to connect from, in turn (comma-separated; this
    /// machine's): one address reaches one server port about 28,000 times
    /// at once. Default: the kernel's choice (for a 127.0.0.0/8 server, an
    /// address of its own per stream).
    #[arg(long, value_delimiter = ',')]
    pub source: Vec<std::net::IpAddr>,
}

/// Runs and reports; exit code 0, or 1 on failure (or a `--strict` miss).
pub fn main(opts: &RunOpts, command: String) -> i32 {
    match run(opts, command) {
        Ok(true) => 0,
        Ok(false) => {
            eprintln!("run: not every event reached every stream exactly once (--strict)");
            1
        }
        Err(e) => {
            eprintln!("run: {e}");
            1
        }
    }
}

/// `Ok(false)`: it ran, but `--strict` was not satisfied.
fn run(opts: &RunOpts, command: String) -> Result<bool, String> {
    let server = http_at(&opts.url)?;
    let addr = server.addr;
    let name = opts.name.clone().unwrap_or_else(|| server.host.clone());
    let started = Instant::now();
    let route = Route {
        stream_path: opts.stream_path.clone(),
        ticket_path: opts
            .ticket_url
            .as_deref()
            .map(|u| same_server(u, addr))
            .transpose()?,
        ticket_body: opts.ticket_body.clone(),
        bearer: opts.bearer.clone(),
        role: opts.role.clone(),
        host: Some(server.host.clone()),
        tls: tls_setup(opts, &server)?,
        sources: opts.source.clone(),
    };
    if let Some(ip) = opts.source.iter().find(|ip| ip.is_ipv4() != addr.is_ipv4()) {
        return Err(format!("--source {ip}: not of the family of {addr}"));
    }
    if route.stream_path.contains("{ticket}") && route.ticket_path.is_none() {
        return Err("--stream-path names {ticket}: give --ticket-url".into());
    }
    let all = Clients {
        first: 0,
        count: opts.streams,
        user_prefix: opts.user_prefix.clone().unwrap_or_else(|| {
            let secs = crate::client::now_ns() / 1_000_000_000;
            format!("lt-run-{}-{secs}-", std::process::id())
        }),
        device_prefix: opts.device_prefix.clone(),
        devices: opts.devices.max(1),
        kind: StreamKind::Data,
        resume: false,
    };
    let devices: Vec<String> = (0..all.devices).map(|i| all.device(i)).collect();
    let mut publisher = publisher(opts, &server, route.tls.as_ref(), devices)?;
    if let Some(url) = &opts.grant_redis {
        seed(RedisAt::parse(url)?, &all)?;
    }
    let secret = opts.jwt_secret.clone().unwrap_or_default();
    let target = Target {
        kind: TargetKind::Url,
        addr,
        pids: opts.pid.clone(),
        instances: 1,
        jwt_secret: &secret,
        redis: None,
        redis_pid: None,
        route: Some(route),
    };
    let ramp = Ramp {
        per_worker: opts.per_worker,
        concurrency: opts.concurrency,
        attempts: opts.attempts,
        open_rate: opts.open_rate,
    };
    let started_utc = iso8601(crate::client::now_ns() / 1_000_000);
    let label = format!("{name} open {}", opts.streams);
    let (mut fleet, opened) = open_all(&target, &all, ramp, &label)?;
    let mut progress = Progress::stderr();
    let step = {
        let mut bench = Bench::new(
            &target,
            &mut fleet,
            publisher.as_mut(),
            &opened,
            all.devices,
            name.clone(),
        )?;
        bench.step(opts.rate, opts.secs, Some(&mut progress))?
    };
    eprintln!(
        "  {name}: {} events -> {} of {} deliveries, lost {}, dup {}, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        step.sent, step.delivered, step.expected, step.lost, step.dups, step.p50_ms, step.p99_ms, step.p999_ms
    );
    let exact = opened.opened == opts.streams
        && step.lost == 0
        && step.dups == 0
        && step.delivered == step.expected
        && step.closed_by_server == 0
        && step.publish_errors.is_empty()
        && step.sent > 0;
    let mut notes = vec![describe(opts, &name)];
    if opts.pid.is_empty() {
        notes.push("No `--pid`: the server's RSS and CPU were not measured.".into());
    }
    let r = Results {
        command,
        section: opts.section.clone(),
        title: opts.title.clone().unwrap_or_default(),
        machine: Some(crate::proc::machine()),
        started_utc,
        duration_secs: started.elapsed().as_secs_f64(),
        step_secs: opts.secs,
        url: Some(opts.url.clone()),
        fanout: vec![FanoutResult {
            target: name,
            instances: 1,
            streams: opts.streams,
            devices: all.devices,
            open: opened,
            max_clean_rate: if step.clean { opts.rate } else { 0 },
            steps: vec![step],
        }],
        notes,
        ..Results::default()
    };
    crate::compare::save(r, &opts.out, &opts.json)?;
    Ok(exact || !opts.strict)
}

/// A rate of opens: a number above 0.
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{text}: a number of opens per second above 0")),
    }
}

/// The TLS the streams speak: for an `https://` server only.
fn tls_setup(opts: &RunOpts, server: &HttpAt) -> Result<Option<TlsSetup>, String> {
    if !server.tls {
        if opts.ca_file.is_some() || opts.insecure {
            return Err("--ca-file and --insecure are for an https:// --url".into());
        }
        return Ok(None);
    }
    let ca_pem = match &opts.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--ca-file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let setup = TlsSetup {
        ca_pem,
        insecure: opts.insecure,
    };
    // Refused here, once, rather than by every worker.
    setup.client_config()?;
    Ok(Some(setup))
}

/// The event source: PUBLISH on a Redis, or POSTs to the server.
fn publisher(
    opts: &RunOpts,
    server: &HttpAt,
    tls: Option<&TlsSetup>,
    devices: Vec<String>,
) -> Result<Box<dyn Publish>, String> {
    if let Some(url) = &opts.publish_redis {
        return Ok(Box::new(RedisPublisher::connect(
            RedisAt::parse(url)?,
            &opts.channel,
            "data",
            devices,
        )?));
    }
    let Some(url) = &opts.publish_url else {
        return Err("give --publish-redis or --publish-url".into());
    };
    let path = same_server(url, server.addr)?;
    let bearer = opts
        .publish_bearer
        .clone()
        .or_else(|| match &opts.jwt_secret {
            Some(secret) => Some(access_token(
                secret,
                "loadtest-publisher",
                Some("admin"),
                7200,
            )),
            None => opts.bearer.clone(),
        });
    let route = PostRoute {
        channel: (!path.contains("{device}")).then(|| opts.channel.clone()),
        path,
        bearer,
    };
    let tls = tls.map(TlsSetup::client_config).transpose()?;
    Ok(Box::new(PostPublisher::connect(
        server.addr,
        Some(&server.host),
        tls.as_ref(),
        route,
        devices,
        opts.publishers,
    )?))
}

/// What the run did, for the report's notes.
fn describe(opts: &RunOpts, name: &str) -> String {
    let tickets = match &opts.ticket_url {
        Some(t) => format!("tickets from `POST {t}`"),
        None => "no tickets".into(),
    };
    let publish = match (&opts.publish_redis, &opts.publish_url) {
        (Some(r), _) => format!(
            "`PUBLISH {}` on {}",
            opts.channel,
            crate::resp::without_password(r)
        ),
        (_, Some(u)) => format!("`POST {u}` on {} keep-alive connection(s)", opts.publishers),
        _ => "nothing".into(),
    };
    let tls = match (
        opts.url.starts_with("https://"),
        &opts.ca_file,
        opts.insecure,
    ) {
        (false, _, _) => "",
        (true, _, true) => " over TLS, the certificate not checked (`--insecure`)",
        (true, Some(_), _) => {
            " over TLS, the certificate checked against `--ca-file` and Mozilla's roots"
        }
        (true, None, _) => " over TLS, the certificate checked against Mozilla's roots",
    };
    let paced = match opts.open_rate {
        Some(r) => format!(", opened at {r} a second"),
        None => String::new(),
    };
    let sources = match opts.source.len() {
        0 => String::new(),
        n => format!(", from {n} source address(es) in turn"),
    };
    format!(
        "Server `{name}` at {} was already running (not started by the harness): {} streams `GET {}` over {} devices{tls}{sources}{paced}, {tickets}; {} events/s for {} s published with {publish}.",
        opts.url, opts.streams, opts.stream_path, opts.devices, opts.rate, opts.secs
    )
}

/// A server named by an `http://` or `https://` URL.
#[derive(Debug)]
pub struct HttpAt {
    /// The first address `HOST` resolves to.
    pub addr: SocketAddr,
    /// `HOST[:PORT]` as written: the `Host` header (and the TLS name).
    pub host: String,
    pub path: String,
    pub tls: bool,
}

/// `http[s]://HOST[:PORT][/path]`, any host (the tests keep to loopback);
/// the port is 80 or 443 when not given.
pub fn http_at(url: &str) -> Result<HttpAt, String> {
    let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err(format!("{url}: only http:// and https:// URLs")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    if authority.contains('@') {
        return Err(format!("{url}: no login in the URL; give --bearer"));
    }
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let with_port = match (has_port, tls) {
        (true, _) => authority.to_owned(),
        (false, false) => format!("{authority}:80"),
        (false, true) => format!("{authority}:443"),
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    Ok(HttpAt {
        addr,
        host: authority.to_owned(),
        path,
        tls,
    })
}

/// A path, or a URL of the same server as the streams: its path.
fn same_server(url: &str, server: SocketAddr) -> Result<String, String> {
    if url.starts_with('/') {
        return Ok(url.to_owned());
    }
    let at = http_at(url)?;
    if at.addr != server {
        return Err(format!("{url}: not on the server of --url ({server})"));
    }
    Ok(at.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_an_address_a_host_header_and_a_path() {
        let at = http_at("http://127.0.0.1:8080/sse/publish").unwrap();
        assert_eq!(
            (
                at.addr.to_string().as_str(),
                at.host.as_str(),
                at.path.as_str()
            ),
            ("127.0.0.1:8080", "127.0.0.1:8080", "/sse/publish")
        );
        // A name stays the Host header; the address is what it resolves to.
        let at = http_at("http://localhost:9").unwrap();
        assert_eq!((at.host.as_str(), at.path.as_str()), ("localhost:9", "/"));
        assert!(at.addr.ip().is_loopback());
        // Any server, not only loopback ones (resolved here, not contacted).
        assert_eq!(http_at("http://192.0.2.1:80/x").unwrap().addr.port(), 80);
        assert_eq!(http_at("http://[::1]:81").unwrap().host, "[::1]:81");
        let at = http_at("https://localhost/x").unwrap();
        assert!(at.tls && at.addr.port() == 443 && at.host == "localhost");
        assert_eq!(http_at("http://127.0.0.1").unwrap().addr.port(), 80);
        assert_eq!(http_at("http://[::1]").unwrap().addr.port(), 80);
        assert!(http_at("ftp://127.0.0.1:1").is_err());
        assert!(http_at("http://u:p@127.0.0.1:1").is_err());
        let a = http_at("http://127.0.0.1:8080").unwrap().addr;
        assert_eq!(same_server("/t", a).unwrap(), "/t");
        assert!(same_server("http://127.0.0.1:8081/t", a).is_err());
    }
}
