//! Black-box tests of contract 7.1's credentials against the real binary:
//! access tokens from an identity provider (RS256, ES256, EdDSA from a PEM
//! key, a JWKS file, a JWKS URL served here with key rotation and an
//! outage), issuer and audience rules, the algorithm-confusion token,
//! secrets from files, and demo mode never signing with a configured key.
//!
//! Keys are the fixed test keys in `tests/fixtures/idp/` (made with
//! `openssl genpkey`; test-only).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{run_cli, wait_until, Gateway};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The ticket secret of gateways that have no jwt secret.
const TICKET_SECRET: &str = "identity-test-ticket-secret-0123456789";
const CLI: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/idp")
        .join(name)
}

fn fixture_path(name: &str) -> String {
    fixture(name).to_string_lossy().into_owned()
}

/// A fixture private key (`rsa-a`, `ec-b`, `ed-a`...) and its algorithm.
fn signer(name: &str) -> (EncodingKey, Algorithm) {
    let pem = std::fs::read(fixture(&format!("{name}.key"))).unwrap();
    match &name[..2] {
        "rs" => (EncodingKey::from_rsa_pem(&pem).unwrap(), Algorithm::RS256),
        "ec" => (EncodingKey::from_ec_pem(&pem).unwrap(), Algorithm::ES256),
        _ => (EncodingKey::from_ed_pem(&pem).unwrap(), Algorithm::EdDSA),
    }
}

fn now() -> u64 {
    common::now_ms() / 1000
}

/// An access token signed by fixture key `name`, header `kid`, claims `sub`
/// and `exp` (1 h) plus `extra`.
fn token(name: &str, kid: Option<&str>, extra: Value) -> String {
    let (key, alg) = signer(name);
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let mut claims = json!({"sub": "operator-7", "exp": now() + 3600});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// An HS256 token with `secret`.
fn hs256(secret: &[u8], extra: Value) -> String {
    let mut claims = json!({"sub": "operator-7", "exp": now() + 3600});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    common::sign_hs256(secret, &claims)
}

/// The public JWK of fixture key `name`, with `kid` (and `alg`, as
/// Keycloak and Auth0 publish it).
fn jwk(name: &str, kid: &str) -> Value {
    let (key, alg) = signer(name);
    let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

fn jwks(keys: &[(&str, &str)]) -> String {
    let keys: Vec<Value> = keys.iter().map(|(name, kid)| jwk(name, kid)).collect();
    json!({ "keys": keys }).to_string()
}

/// The status of `POST /sse/stream-ticket` with `token`.
fn mint(gw: &Gateway, token: &str) -> u16 {
    gw.ticket(token, "").0
}

/// A gateway that verifies access tokens only with `args` (no jwt secret).
fn public_only(args: &[&str]) -> Gateway {
    Gateway::builder()
        .no_jwt_secret()
        .args(&["--ticket-secret", TICKET_SECRET])
        // These tests mint in polling loops: lift the per-user mint limit.
        .args(&["--max-tickets-per-minute", "100000"])
        .args(args)
        .start()
}

/// A JWKS endpoint on loopback: serves `body` to every GET, counts the
/// requests; [`JwksServer::stop`] closes the port.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, h, s) = (body.clone(), hits.clone(), stop.clone());
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return; // drops the listener: the port refuses from now on
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                h.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer {
            url: format!("http://{addr}/realms/plant/protocol/openid-connect/certs"),
            body,
            hits,
            stop,
            addr,
            thread: Some(thread),
        }
    }

    fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn rs256_es256_and_eddsa_tokens_mint_tickets_and_the_key_decides_the_algorithm() {
    for (name, other) in [("rsa-a", "ec-a"), ("ec-a", "ed-a"), ("ed-a", "rsa-a")] {
        // HS256 keeps working beside the public key.
        let gw = Gateway::builder()
            .args(&["--jwt-public-key", &fixture_path(&format!("{name}.pub"))])
            .start();
        let good = token(name, Some("kid-1"), json!({}));
        let (status, body) = gw.ticket(&good, r#"{"purpose":"alerts"}"#);
        assert_eq!(status, 200, "{name}: {body}\n{}", gw.log());
        let ticket = body["ticket"].as_str().unwrap();
        let r = common::get(gw.addr(), &format!("/sse/status?ticket={ticket}"), &[]);
        assert_eq!(r.json()["userId"], "operator-7", "{name}");
        assert_eq!(mint(&gw, &gw.token("hs-user", None)), 200, "{name}: HS256");
        // Another key type's token, and another key of the same type.
        assert_eq!(
            mint(&gw, &token(other, None, json!({}))),
            401,
            "{other} on {name}"
        );
        let stranger = name.replace("-a", "-b");
        assert_eq!(
            mint(&gw, &token(&stranger, None, json!({}))),
            401,
            "{stranger}"
        );
        // exp required, a ticket's audience refused.
        let (key, alg) = signer(name);
        let no_exp = jsonwebtoken::encode(&Header::new(alg), &json!({"sub": "x"}), &key).unwrap();
        assert_eq!(mint(&gw, &no_exp), 401, "{name}: no exp");
        assert_eq!(mint(&gw, &token(name, None, json!({"aud": "sse"}))), 401);
    }
}

#[test]
fn the_algorithm_confusion_token_is_refused() {
    // HS256 with the public key's PEM text as the HMAC secret.
    let pem = std::fs::read(fixture("rsa-a.pub")).unwrap();
    let confused = hs256(&pem, json!({"role": "admin"}));
    let key = fixture_path("rsa-a.pub");
    let gw = public_only(&["--jwt-public-key", &key]);
    assert_eq!(mint(&gw, &token("rsa-a", None, json!({}))), 200);
    assert_eq!(mint(&gw, &confused), 401);
    // Also with a jwt secret beside the key, and as the PEM text minus its
    // final newline.
    let gw = Gateway::builder().args(&["--jwt-public-key", &key]).start();
    assert_eq!(mint(&gw, &confused), 401);
    assert_eq!(mint(&gw, &hs256(pem.trim_ascii_end(), json!({}))), 401);
}

#[test]
fn issuer_and_audience_are_enforced() {
    let iss = "https://idp.example/realms/plant";
    let gw = public_only(&[
        "--jwt-public-key",
        &fixture_path("ec-a.pub"),
        "--jwt-issuer",
        iss,
        "--jwt-audience",
        "dashboards",
    ]);
    let cases = [
        (json!({"iss": iss, "aud": "dashboards"}), 200),
        (json!({"iss": iss, "aud": ["account", "dashboards"]}), 200),
        (
            json!({"iss": "https://idp.example/realms/other", "aud": "dashboards"}),
            401,
        ),
        (json!({"aud": "dashboards"}), 401),
        (json!({"iss": iss, "aud": "account"}), 401),
        (json!({"iss": iss}), 401),
        (json!({"iss": iss, "aud": ["dashboards", "sse"]}), 401),
    ];
    for (claims, want) in cases {
        assert_eq!(
            mint(&gw, &token("ec-a", None, claims.clone())),
            want,
            "{claims}"
        );
    }
    // `sse` is the tickets' audience: refused as a configuration.
    refused_at_start(
        &["--jwt-secret", "x", "--jwt-audience", "sse"],
        "--jwt-audience",
    );
}

#[test]
fn jwks_url_rotation_and_outage() {
    let mut idp = JwksServer::start(jwks(&[("rsa-a", "2024-a")]));
    let gw = public_only(&["--jwks-url", &idp.url, "--jwks-refresh-secs", "1"]);
    let a = token("rsa-a", Some("2024-a"), json!({}));
    let b = token("ed-a", Some("2025-b"), json!({}));
    assert_eq!(mint(&gw, &a), 200, "{}", gw.log());
    // A key added: taken up within a refresh.
    idp.serve(jwks(&[("rsa-a", "2024-a"), ("ed-a", "2025-b")]));
    assert!(
        wait_until(Duration::from_secs(5), || mint(&gw, &b) == 200),
        "added key not taken up\n{}",
        gw.log()
    );
    // A key removed: its tokens stop working.
    idp.serve(jwks(&[("ed-a", "2025-b")]));
    assert!(
        wait_until(Duration::from_secs(5), || mint(&gw, &a) == 401),
        "removed key still accepted\n{}",
        gw.log()
    );
    // The identity provider goes away: known keys keep working.
    idp.stop();
    let failed = |gw: &Gateway| gw.log().matches("keeping the last good set").count();
    assert!(
        wait_until(Duration::from_secs(5), || failed(&gw) >= 2),
        "no failed refresh logged\n{}",
        gw.log()
    );
    assert_eq!(mint(&gw, &b), 200);
    assert_eq!(mint(&gw, &a), 401);
}

#[test]
fn an_unknown_kid_fetches_the_jwks_at_once() {
    let idp = JwksServer::start(jwks(&[("ec-a", "k1")]));
    let gw = public_only(&["--jwks-url", &idp.url]); // refresh: 300 s
    assert_eq!(mint(&gw, &token("ec-a", Some("k1"), json!({}))), 200);
    assert_eq!(idp.hits(), 1, "fetched once at start");
    idp.serve(jwks(&[("ec-a", "k1"), ("ec-b", "k2")]));
    let fresh = token("ec-b", Some("k2"), json!({}));
    // This request only nudges the fetch thread: it fails at once.
    assert_eq!(mint(&gw, &fresh), 401);
    assert!(
        wait_until(Duration::from_secs(3), || mint(&gw, &fresh) == 200),
        "the new kid was not fetched\n{}",
        gw.log()
    );
    assert_eq!(idp.hits(), 2, "one fetch for the unknown kid");
    // A burst of random kids within 10 s fetches nothing more yet.
    for i in 0..20 {
        assert_eq!(
            mint(&gw, &token("ec-b", Some(&format!("random-{i}")), json!({}))),
            401
        );
    }
    assert_eq!(idp.hits(), 2, "unknown kids fetch at most every 10 s");
}

#[test]
fn a_rewritten_jwks_file_takes_effect() {
    let dir = tempdir("jwks-file");
    let file = dir.join("jwks.json");
    let write = |body: &str| {
        // As an operator's tool would: a new file renamed over the old one.
        let tmp = dir.join("jwks.json.tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(&jwks(&[("ed-a", "one")]));
    let gw = public_only(&["--jwks-file", &file.to_string_lossy()]);
    let one = token("ed-a", Some("one"), json!({}));
    let two = token("ed-b", Some("two"), json!({}));
    assert_eq!(mint(&gw, &one), 200);
    assert_eq!(mint(&gw, &two), 401);
    write(&jwks(&[("ed-b", "two")]));
    assert!(
        wait_until(Duration::from_secs(5), || mint(&gw, &two) == 200),
        "rewritten file not re-read\n{}",
        gw.log()
    );
    assert_eq!(mint(&gw, &one), 401);
    // A broken rewrite keeps the last good set; in-place writes count too.
    std::fs::write(&file, "{\"keys\": [").unwrap();
    assert!(wait_until(Duration::from_secs(5), || gw
        .log()
        .contains("keeping the last good set")));
    assert_eq!(mint(&gw, &two), 200);
    // An unreadable file at start: exit 2 naming the flag.
    let missing = dir.join("missing.json").to_string_lossy().into_owned();
    let args = ["--jwks-file", &missing, "--ticket-secret", TICKET_SECRET];
    refused_at_start(&args, "--jwks-file");
}

#[test]
fn secrets_come_from_files_without_their_trailing_newline() {
    let dir = tempdir("secrets");
    let jwt = "jwt-secret-from-a-file-0123456789abcdef";
    let tickets = "ticket-secret-from-a-file-0123456789abcd";
    std::fs::write(dir.join("jwt"), format!("{jwt}\n")).unwrap();
    std::fs::write(dir.join("ticket"), format!("{tickets}\n")).unwrap();
    let gw = Gateway::builder()
        .no_jwt_secret()
        .args(&["--jwt-secret-file", &dir.join("jwt").to_string_lossy()])
        .env(
            "SSE_TICKET_SECRET_FILE",
            &dir.join("ticket").to_string_lossy(),
        )
        .start();
    assert_eq!(mint(&gw, &hs256(jwt.as_bytes(), json!({}))), 200);
    assert_eq!(
        mint(&gw, &hs256(format!("{jwt}\n").as_bytes(), json!({}))),
        401
    );
    let (_, body) = gw.ticket(&hs256(jwt.as_bytes(), json!({})), "");
    let ticket = body["ticket"].as_str().unwrap();
    let mut rules = jsonwebtoken::Validation::new(Algorithm::HS256);
    rules.set_audience(&["sse"]);
    let verifies = |secret: &str| {
        jsonwebtoken::decode::<Value>(
            ticket,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &rules,
        )
        .is_ok()
    };
    assert!(
        verifies(tickets),
        "ticket not signed with the file's secret"
    );
    assert!(!verifies(jwt));
    assert!(!gw.log().contains("shorter than 32"), "{}", gw.log());

    // A short secret warns, without showing it.
    std::fs::write(dir.join("short"), "tiny-s3cret\n").unwrap();
    let gw = Gateway::builder()
        .no_jwt_secret()
        .args(&["--jwt-secret-file", &dir.join("short").to_string_lossy()])
        .start();
    assert_eq!(mint(&gw, &hs256(b"tiny-s3cret", json!({}))), 200);
    let log = gw.log();
    assert!(
        log.contains("--jwt-secret-file") && log.contains("shorter than 32"),
        "{log}"
    );
    assert!(!log.contains("tiny-s3cret"), "{log}");

    // Unreadable files: exit 2 naming the flag.
    let missing = dir.join("missing").to_string_lossy().into_owned();
    for (args, flag) in [
        (vec!["--jwt-secret-file", &missing], "--jwt-secret-file"),
        (
            vec!["--jwt-secret", "x", "--ticket-secret-file", &missing],
            "--ticket-secret-file",
        ),
    ] {
        refused_at_start(&args, flag);
    }
}

#[test]
fn without_a_jwt_secret_the_ticket_secret_is_required() {
    let key = fixture_path("ed-a.pub");
    refused_at_start(&["--jwt-public-key", &key], "--ticket-secret");
    // A private key is not a public key.
    let private = fixture_path("ed-a.key");
    let args = [
        "--jwt-public-key",
        &private,
        "--ticket-secret",
        TICKET_SECRET,
    ];
    refused_at_start(&args, "--jwt-public-key");
}

#[test]
fn demo_mode_never_signs_with_a_configured_key() {
    let gw = Gateway::builder()
        .no_jwt_secret()
        .arg("--demo")
        .env("JWT_SECRET", "x")
        .env("SSE_TICKET_SECRET", "y")
        .start();
    let r = common::get(gw.addr(), "/demo/token", &[]);
    let demo = r.json()["token"].as_str().unwrap().to_owned();
    let decodes = |secret: &[u8]| {
        jsonwebtoken::decode::<Value>(
            &demo,
            &jsonwebtoken::DecodingKey::from_secret(secret),
            &jsonwebtoken::Validation::new(Algorithm::HS256),
        )
        .is_ok()
    };
    assert!(!decodes(b"x"), "the demo token verifies with JWT_SECRET");
    assert!(!decodes(b"y"));
    let (status, body) = gw.ticket(&demo, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(mint(&gw, &hs256(b"x", json!({"role": "admin"}))), 401);

    let dir = tempdir("demo");
    let file = dir.join("secret");
    std::fs::write(&file, "a-configured-secret-of-some-length-0123\n").unwrap();
    let file = file.to_string_lossy().into_owned();
    for (args, flag) in [
        (vec!["--demo", "--jwt-secret", "x"], "--jwt-secret"),
        (
            vec!["--demo", "--jwt-secret-file", &file],
            "--jwt-secret-file",
        ),
        (vec!["--demo", "--ticket-secret", "y"], "--ticket-secret"),
    ] {
        refused_at_start(&args, flag);
    }
}

/// Starting with `args` exits 2 with one line naming `flag`, before it
/// listens (`--listen` is given anyway, so a regression cannot take a
/// fixed port).
fn refused_at_start(args: &[&str], flag: &str) {
    let mut all = args.to_vec();
    all.extend(["--listen", "127.0.0.1:0"]);
    let (code, _, err) = run_cli(&all, &[], CLI);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    assert!(
        err.contains(flag) && err.lines().count() == 1,
        "{args:?}: {err}"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(what: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "sse-identity-{what}-{}-{}",
        std::process::id(),
        common::now_ms()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
