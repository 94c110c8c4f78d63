//! Command-line flags and their environment twins, exactly as contract §1
//! lists them. clap gives `--help`, the env fallback (a flag beats its
//! variable) and exit code 2 for an unknown or malformed flag.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use crate::log::LogFormat;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "sse-gateway",
    version,
    about = "Server-Sent Events gateway: Redis Pub/Sub in, EventSource streams out.",
    after_help = "Every flag has an environment twin (shown in brackets); a flag beats its variable.",
    // `--heartbeat-secs -1` reaches the flag's parser, which names the flag.
    allow_negative_numbers = true
)]
pub struct Config {
    /// Address to serve.
    #[arg(long, env = "SSE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Redis URL (redis[s]://[user:pass@]host:port/db; rediss: TLS). With Sentinels or a Cluster: only its scheme, user, password and db are used [default: unset: embedded mode, in-process bus and stores].
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// PEM CA bundle that a rediss:// Redis's certificate must chain to [default: the system roots].
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate for mutual TLS with Redis (with --redis-key-file).
    #[arg(long, env = "REDIS_CERT_FILE")]
    pub redis_cert_file: Option<PathBuf>,

    /// PEM private key of --redis-cert-file.
    #[arg(long, env = "REDIS_KEY_FILE")]
    pub redis_key_file: Option<PathBuf>,

    /// Sentinels (comma-separated host:port) that name the Redis master; failovers are followed. Needs --redis-master-name.
    #[arg(long, env = "REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,

    /// The master name the Sentinels monitor.
    #[arg(long, env = "REDIS_MASTER_NAME")]
    pub redis_master_name: Option<String>,

    /// Seed nodes (comma-separated host:port) of a Redis Cluster.
    #[arg(long, env = "REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,

    /// HS256 key of the access tokens the main app issues [default: none; required unless --demo (then random), --jwt-public-key or a JWKS].
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// HS256 key of stream tickets [default: the jwt secret].
    #[arg(long, env = "SSE_TICKET_SECRET", hide_env_values = true)]
    pub ticket_secret: Option<String>,

    /// File holding the jwt secret (its content, one trailing newline removed); instead of --jwt-secret.
    #[arg(long, env = "JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// File holding the ticket secret (its content, one trailing newline removed); instead of --ticket-secret.
    #[arg(long, env = "SSE_TICKET_SECRET_FILE")]
    pub ticket_secret_file: Option<PathBuf>,

    /// PEM file of one public key verifying access tokens; the key decides the algorithm (RSA: RS256, P-256: ES256, Ed25519: EdDSA).
    #[arg(long, env = "JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// JWKS document on disk verifying access tokens (key chosen by kid); re-read when it changes.
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// JWKS over http(s) verifying access tokens (key chosen by kid); refreshed every --jwks-refresh-secs and at once (at most every 10 s) on an unknown kid.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Seconds between two fetches of --jwks-url.
    #[arg(long, env = "JWKS_REFRESH_SECS", default_value = "300", value_parser = secs)]
    pub jwks_refresh_secs: Duration,

    /// When set, an access token's `iss` must equal it.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, an access token's `aud` must contain it.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The secret flags given on the command line itself, not through the
    /// environment: `--demo` refuses those and ignores the variables.
    #[arg(skip)]
    pub secrets_on_command_line: Vec<&'static str>,

    /// Heartbeat period in seconds; fractions allowed (0.2).
    #[arg(long, env = "SSE_HEARTBEAT_SECS", default_value = "25", value_parser = secs)]
    pub heartbeat_secs: Duration,

    /// Open streams per client IP.
    #[arg(long, env = "SSE_MAX_CONNS_PER_IP", default_value_t = 5)]
    pub max_conns_per_ip: u32,

    /// Open alert streams per user.
    #[arg(long, env = "SSE_MAX_ALERTS_PER_USER", default_value_t = 1)]
    pub max_alerts_per_user: u32,

    /// Open data streams per user.
    #[arg(long, env = "SSE_MAX_DATA_PER_USER", default_value_t = 1)]
    pub max_data_per_user: u32,

    /// Devices on one data stream.
    #[arg(long, env = "SSE_MAX_DEVICES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_devices: u32,

    /// CIDRs whose X-Forwarded-For names the client IP (comma-separated) [default: empty: none].
    #[arg(long, env = "SSE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = Cidr::from_str)]
    pub trusted_proxies: Vec<Cidr>,

    /// Allowed browser origins, credentials allowed (comma-separated) [default: empty: none].
    #[arg(long, env = "SSE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Reactor threads [default: CPU count].
    #[arg(long, env = "SSE_WORKERS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: Option<u32>,

    /// Unsent bytes after which a stream is closed as a slow consumer.
    #[arg(long, env = "SSE_MAX_BACKLOG_BYTES", default_value_t = 1_048_576)]
    pub max_backlog_bytes: usize,

    /// Events kept for Last-Event-ID replay.
    #[arg(long, env = "SSE_REPLAY_EVENTS", default_value_t = 1024)]
    pub replay_events: usize,

    /// Age in seconds after which an event leaves the replay window.
    #[arg(long, env = "SSE_REPLAY_SECS", default_value = "300", value_parser = secs)]
    pub replay_secs: Duration,

    /// realtime-update events per second per device; above it the newest value wins [0: off].
    #[arg(long, env = "SSE_MAX_RATE_PER_DEVICE", default_value_t = 0.0, value_parser = rate)]
    pub max_rate_per_device: f64,

    /// Longest a SIGTERM drain may take, in seconds.
    #[arg(long, env = "SSE_DRAIN_SECS", default_value = "5", value_parser = secs)]
    pub drain_secs: Duration,

    /// Seconds a stream's client may take none of its unsent bytes before it is closed as a slow consumer.
    #[arg(long, env = "SSE_WRITE_STALL_SECS", default_value = "60", value_parser = secs)]
    pub write_stall_secs: Duration,

    /// Milliseconds a stream written less than this long ago keeps its next frames before they leave together, so a busy stream takes fewer, larger writes; a stream written longer ago is written in the turn its frame arrives. 0 writes every frame at once.
    #[arg(long, env = "SSE_COALESCE_MS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub coalesce_ms: u32,

    /// Bus frames a reactor's mailbox holds; past it frames are recovered from the replay window.
    #[arg(long, env = "SSE_MAILBOX_FRAMES", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub mailbox_frames: u32,

    /// Seconds a request head may take to arrive, from the connection or its first byte.
    #[arg(long, env = "SSE_HEAD_TIMEOUT_SECS", default_value = "10", value_parser = secs)]
    pub head_timeout_secs: Duration,

    /// Seconds a connection that is not a stream has to finish a request and its response.
    #[arg(long, env = "SSE_REQUEST_TIMEOUT_SECS", default_value = "30", value_parser = secs)]
    pub request_timeout_secs: Duration,

    /// Seconds a keep-alive connection may idle between requests.
    #[arg(long, env = "SSE_KEEPALIVE_IDLE_SECS", default_value = "60", value_parser = secs)]
    pub keepalive_idle_secs: Duration,

    /// Connections per client IP that are not streams (reading, waiting, responding, idle).
    #[arg(long, env = "SSE_MAX_REQUESTS_PER_IP", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_per_ip: u32,

    /// Bytes of one bus message; a larger one is dropped and counted.
    #[arg(long, env = "SSE_MAX_EVENT_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub max_event_bytes: u64,

    /// Stream tickets one user may mint per minute, across every instance on one Redis.
    #[arg(long, env = "SSE_MAX_TICKETS_PER_MINUTE", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tickets_per_minute: u32,

    /// Embedded mode plus simulated machines `Machine 1`..`Machine 6` owned by user `demo`, and the demo page at `/` [default: off]. `--demo=false` turns off an `SSE_DEMO` set in the environment.
    #[arg(long, env = "SSE_DEMO", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", hide_default_value = true)]
    pub demo: bool,

    /// Log line format: `text` (fields as key=value, escaped) or `json` (one object per line).
    #[arg(long, env = "SSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The flags that carry a secret, by clap id and as written.
const SECRET_FLAGS: [(&str, &str); 4] = [
    ("jwt_secret", "--jwt-secret"),
    ("jwt_secret_file", "--jwt-secret-file"),
    ("ticket_secret", "--ticket-secret"),
    ("ticket_secret_file", "--ticket-secret-file"),
];

impl Config {
    /// Parses `args` (the program name first) and the environment, noting
    /// which secret flags came from the command line itself.
    pub fn from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Config::command().try_get_matches_from(args)?;
        let mut config = Config::from_arg_matches(&matches)?;
        config.secrets_on_command_line = SECRET_FLAGS
            .iter()
            .filter(|(id, _)| {
                matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|(_, flag)| *flag)
            .collect();
        Ok(config)
    }

    pub fn workers(&self) -> usize {
        self.workers.map(|w| w as usize).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// The CORS grant for `origin`: its own name when it is listed (with
    /// credentials), or `*` when only the wildcard admits it. A wildcard never
    /// echoes the caller's origin next to `Allow-Credentials: true`, which
    /// would let any site read a user's streams with the user's cookies.
    pub fn allowed_origin(&self, origin: Option<&str>) -> Option<String> {
        let origin = origin?;
        if self
            .cors_origins
            .iter()
            .any(|o| o != "*" && o.trim_end_matches('/') == origin)
        {
            return Some(origin.to_owned());
        }
        self.cors_origins
            .iter()
            .any(|o| o == "*")
            .then(|| "*".to_owned())
    }
}

/// Seconds as a positive decimal (`25`, `0.2`).
fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        return Err(format!("`{s}` must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Events per second: 0 (off) or a positive number.
fn rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e6).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` must be 0 (off) or a positive number of events per second"
        )),
    }
}

/// An IP network, `10.0.0.0/8` or a bare address (a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The address a per-IP limit counts: IPv4 as it is, IPv6 by its /64 (one
/// host usually holds a whole /64, and could otherwise take a limit's worth
/// of streams per address).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(net))
        }
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:443`.
pub fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok());
        return port_ok.then(|| inside.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))?;
    }
    let (host, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) as the IPv4 they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = canonical(
            addr.parse::<IpAddr>()
                .map_err(|_| format!("`{s}` is not an IP network"))?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_what_they_cover() {
        let table = [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("::1", "::1", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("127.0.0.0/8", "::ffff:127.0.0.9", true),
            ("10.0.0.0/8", "::1", false),
        ];
        for (net, ip, want) in table {
            let c: Cidr = net.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{net} {ip}");
        }
        for bad in ["", "10.0.0.0/33", "x/8", "10.0.0.0/-1", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_entries_with_ports_and_brackets_are_understood() {
        let table = [
            ("1.2.3.4", Some("1.2.3.4")),
            (" 1.2.3.4:5678 ", Some("1.2.3.4")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("[2001:db8::1]:", None),
            ("[2001:db8::1]:x", None),
            ("[1.2.3.4]", None),
            ("1.2.3.4:99999", None),
            ("unknown", None),
            ("", None),
        ];
        for (entry, want) in table {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(forwarded_ip(entry), want, "{entry:?}");
        }
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let key = |s: &str| limit_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("10.1.2.3"), "10.1.2.3");
        assert_eq!(key("::ffff:10.1.2.3"), "10.1.2.3");
    }

    #[test]
    fn seconds_accept_fractions_and_refuse_nonsense() {
        assert_eq!(secs("0.2").unwrap(), Duration::from_millis(200));
        assert_eq!(secs("25").unwrap(), Duration::from_secs(25));
        for bad in ["0", "-1", "abc", "NaN", "inf"] {
            assert!(secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::try_parse_from(["sse-gateway"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.heartbeat_secs, Duration::from_secs(25));
        assert_eq!(
            (
                c.max_conns_per_ip,
                c.max_alerts_per_user,
                c.max_data_per_user,
                c.max_devices
            ),
            (5, 1, 1, 10)
        );
        assert_eq!(c.max_backlog_bytes, 1_048_576);
        assert_eq!(c.replay_events, 1024);
        assert_eq!(c.replay_secs, Duration::from_secs(300));
        assert_eq!(c.drain_secs, Duration::from_secs(5));
        assert_eq!(c.jwks_refresh_secs, Duration::from_secs(300));
        assert!(!c.demo && c.redis_url.is_none());
        assert_eq!(c.log_format, LogFormat::Text);
        let c = Config::try_parse_from([
            "sse-gateway",
            "--demo",
            "--cors-origins",
            "http://a,http://b",
        ])
        .unwrap();
        assert!(c.demo);
        assert_eq!(
            c.allowed_origin(Some("http://b")).as_deref(),
            Some("http://b")
        );
        assert_eq!(c.allowed_origin(Some("http://c")), None);
        let c = Config::try_parse_from(["sse-gateway", "--cors-origins", "*,http://a"]).unwrap();
        assert_eq!(
            c.allowed_origin(Some("http://a")).as_deref(),
            Some("http://a")
        );
        assert_eq!(c.allowed_origin(Some("http://evil")).as_deref(), Some("*"));
        assert_eq!(c.allowed_origin(None), None);
        assert!(Config::try_parse_from(["sse-gateway", "--no-such-flag"]).is_err());
    }
}
