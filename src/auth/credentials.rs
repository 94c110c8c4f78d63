//! Start-up: turns the credential flags into the keys the gateway verifies
//! access tokens with and signs stream tickets with (contract 7.1).
//!
//! - Secrets come from a flag or its variable, or from a file
//!   (`--jwt-secret-file`, `--ticket-secret-file`: the content, one trailing
//!   newline removed); one shorter than 32 bytes logs a warning (never the
//!   secret itself).
//! - Access tokens: HS256 with the jwt secret, and/or public keys from
//!   `--jwt-public-key`, `--jwks-file`, `--jwks-url`, with `--jwt-issuer` and
//!   `--jwt-audience`. With no jwt secret, `--ticket-secret` is required.
//! - `--demo` never signs with a configured key: it makes a random secret of
//!   its own, ignores the secret variables and refuses secret flags given on
//!   the command line. Public keys still verify (they cannot sign).
//!
//! Every error is one line naming the flag: the caller exits 2 with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};

use super::jwks::{self, JwksFeed};
use super::keys;
use super::ticket::TicketKey;
use super::token::{Claimed, TokenKey};
use crate::config::Config;

/// Below this many bytes a secret is guessable offline from one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// What start-up stores in the gateway.
pub struct Credentials {
    pub tokens: TokenKey,
    pub tickets: TicketKey,
    /// `--demo`: an access token for user `demo`, served at `/demo/token`.
    pub demo_token: Option<String>,
}

/// The flags of each secret: value, file.
const JWT_FLAGS: (&str, &str) = (
    "--jwt-secret (JWT_SECRET)",
    "--jwt-secret-file (JWT_SECRET_FILE)",
);
const TICKET_FLAGS: (&str, &str) = (
    "--ticket-secret (SSE_TICKET_SECRET)",
    "--ticket-secret-file (SSE_TICKET_SECRET_FILE)",
);

/// A secret and the flag it came from (for a warning that never shows it).
type Named = (Vec<u8>, &'static str);

/// The credentials `config` asks for, or the one-line reason it cannot.
pub fn load(config: &Config) -> Result<Credentials, String> {
    let (jwt_secret, ticket_secret) = if config.demo {
        demo_secrets(config)?
    } else {
        let jwt = secret(&config.jwt_secret, &config.jwt_secret_file, JWT_FLAGS)?;
        let ticket = secret(
            &config.ticket_secret,
            &config.ticket_secret_file,
            TICKET_FLAGS,
        )?;
        (jwt, ticket)
    };
    check_combination(config, jwt_secret.is_some(), ticket_secret.is_some())?;
    let public = match &config.jwt_public_key {
        Some(path) => Some(
            jwks::read_bounded(path)
                .and_then(|pem| keys::from_pem(&pem))
                .map_err(|e| format!("--jwt-public-key (JWT_PUBLIC_KEY): {e}"))?,
        ),
        None => None,
    };
    let feeds = feeds(config)?;
    if !config.demo {
        warn_if_short(jwt_secret.as_ref());
        warn_if_short(ticket_secret.as_ref());
    }
    log_sources(config, jwt_secret.is_some(), public.as_ref());
    let claimed = Claimed {
        issuer: config.jwt_issuer.clone().filter(|s| !s.is_empty()),
        audience: config.jwt_audience.clone().filter(|s| !s.is_empty()),
    };
    let ticket_secret = ticket_secret
        .or_else(|| jwt_secret.clone())
        .unwrap_or_default()
        .0;
    let jwt_secret = jwt_secret.map(|(s, _)| s);
    let tokens = TokenKey::with_keys(jwt_secret.as_deref(), public, feeds, claimed);
    let demo_token = config
        .demo
        .then(|| tokens.mint(crate::ingress::demo::USER, None, 30 * 24 * 3600));
    Ok(Credentials {
        tickets: TicketKey::new(&ticket_secret),
        tokens,
        demo_token,
    })
}

/// The rules between flags, checked before any key is loaded.
fn check_combination(config: &Config, jwt_secret: bool, ticket_secret: bool) -> Result<(), String> {
    let public = config.jwt_public_key.is_some()
        || config.jwks_file.is_some()
        || config.jwks_url.as_deref().is_some_and(|u| !u.is_empty());
    if !jwt_secret && !public {
        return Err("--jwt-secret (JWT_SECRET) is required, or --jwt-public-key, --jwks-file or --jwks-url with --ticket-secret (SSE_TICKET_SECRET), or --demo".into());
    }
    if !jwt_secret && !ticket_secret {
        return Err("--ticket-secret (SSE_TICKET_SECRET) is required when access tokens have no --jwt-secret".into());
    }
    if config.jwt_audience.as_deref() == Some(super::TICKET_AUDIENCE) {
        return Err(format!(
            "--jwt-audience (JWT_AUDIENCE): `{}` is the stream tickets' audience, and a ticket is never a credential",
            super::TICKET_AUDIENCE
        ));
    }
    Ok(())
}

/// `--demo`: one fresh random secret for access tokens and tickets.
fn demo_secrets(config: &Config) -> Result<(Option<Named>, Option<Named>), String> {
    if let Some(flag) = config.secrets_on_command_line.first() {
        return Err(format!(
            "{flag}: --demo signs with a random secret of its own, never a configured one; leave {flag} out"
        ));
    }
    let from_env = config.jwt_secret.is_some()
        || config.jwt_secret_file.is_some()
        || config.ticket_secret.is_some()
        || config.ticket_secret_file.is_some();
    if from_env {
        info!(
            "--demo: the secret variables are ignored; demo tokens and tickets use a random secret"
        );
    }
    let random = random_secret();
    Ok((Some((random.clone(), "--demo")), Some((random, "--demo"))))
}

fn random_secret() -> Vec<u8> {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes()
}

/// A secret from its flag (or variable) or from its file; `flags` names
/// both. Returns the secret and the flag it came from.
fn secret(
    value: &Option<String>,
    file: &Option<PathBuf>,
    flags: (&'static str, &'static str),
) -> Result<Option<Named>, String> {
    let (flag, file_flag) = flags;
    match (value.as_deref().filter(|v| !v.is_empty()), file) {
        (Some(_), Some(_)) => Err(format!("{flag} and {file_flag}: give one, not both")),
        (Some(v), None) => Ok(Some((v.as_bytes().to_vec(), flag))),
        (None, Some(path)) => read_secret_file(path)
            .map(|s| Some((s, file_flag)))
            .map_err(|e| format!("{file_flag}: {e}")),
        (None, None) => Ok(None),
    }
}

/// Warns (once the configuration is known good) of a guessable secret,
/// naming its flag, never showing it.
fn warn_if_short(secret: Option<&Named>) {
    if let Some((secret, flag)) = secret.filter(|(s, _)| s.len() < MIN_SECRET_BYTES) {
        warn!(
            "{flag}: the secret is {} bytes, shorter than {MIN_SECRET_BYTES}: use a long random one",
            secret.len()
        );
    }
}

/// A secret file's content with one trailing newline (`\n` or `\r\n`) removed.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut secret = jwks::read_bounded(path)?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret)
}

/// `--jwks-file` and `--jwks-url`, each with its refresh thread.
fn feeds(config: &Config) -> Result<Vec<Arc<JwksFeed>>, String> {
    let mut feeds = Vec::new();
    if let Some(path) = &config.jwks_file {
        let feed = jwks::watch_file(path, jwks::FILE_POLL)
            .map_err(|e| format!("--jwks-file (JWKS_FILE): {e}"))?;
        feeds.push(feed);
    }
    if let Some(url) = config.jwks_url.as_deref().filter(|u| !u.is_empty()) {
        let feed = jwks::follow_url(url, config.jwks_refresh_secs, jwks::NUDGE_EVERY)
            .map_err(|e| format!("--jwks-url (JWKS_URL): {e}"))?;
        feeds.push(feed);
    }
    Ok(feeds)
}

/// One line saying where access tokens are verified from.
fn log_sources(config: &Config, secret: bool, public: Option<&keys::VerifyKey>) {
    let mut sources = Vec::new();
    if secret {
        sources.push("HS256 (jwt secret)".to_owned());
    }
    if let Some(key) = public {
        sources.push(format!("{:?} (--jwt-public-key)", key.alg));
    }
    if config.jwks_file.is_some() {
        sources.push("--jwks-file".into());
    }
    if config.jwks_url.is_some() {
        sources.push("--jwks-url".into());
    }
    let mut rules = String::new();
    if let Some(iss) = &config.jwt_issuer {
        rules.push_str(&format!(", iss = {iss:?}"));
    }
    if let Some(aud) = &config.jwt_audience {
        rules.push_str(&format!(", aud contains {aud:?}"));
    }
    info!("access tokens: {}{rules}", sources.join(", "));
}
