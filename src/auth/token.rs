//! Access tokens: `Authorization: Bearer <jwt>`, HS256 with the jwt secret,
//! claims `sub`, `exp` and optional `role` (`"admin"` may stream every device).

use jsonwebtoken::{DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::{hs256, user_from_sub, Identity};

/// Clock skew allowed between the main app and the gateway on `exp`/`nbf`
/// (the contract allows at most 5 s).
pub const LEEWAY_SECS: u64 = 5;

#[derive(Deserialize)]
struct Claims {
    sub: serde_json::Value,
    #[serde(default)]
    role: Option<serde_json::Value>,
    #[serde(default)]
    aud: Option<serde_json::Value>,
}

/// Whether `aud` (a string or an array of strings) names the stream-ticket
/// audience: such a token is a ticket, and a ticket is never a credential,
/// even when both are signed with the same secret (the default).
pub fn names_ticket_audience(aud: Option<&serde_json::Value>) -> bool {
    match aud {
        Some(serde_json::Value::String(a)) => a == super::TICKET_AUDIENCE,
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .any(|a| a.as_str() == Some(super::TICKET_AUDIENCE)),
        _ => false,
    }
}

/// Verifies access tokens; holds the key so it is derived once.
pub struct TokenKey {
    decoding: DecodingKey,
    encoding: EncodingKey,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        TokenKey {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
        }
    }

    /// The caller named by an `Authorization` header value, or None when it is
    /// missing, not a bearer token, badly signed, malformed or expired.
    pub fn verify_bearer(&self, authorization: Option<&str>) -> Option<Identity> {
        let value = authorization?.trim();
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.verify(token.trim())
    }

    pub fn verify(&self, token: &str) -> Option<Identity> {
        let mut validation = hs256(LEEWAY_SECS);
        // The main app may set an audience of its own; it is not ours to
        // check. Ours (the ticket's) is refused below.
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        if names_ticket_audience(data.claims.aud.as_ref()) {
            return None;
        }
        Some(Identity {
            user: user_from_sub(&data.claims.sub)?,
            admin: data.claims.role.as_ref().and_then(|r| r.as_str()) == Some("admin"),
        })
    }

    /// Mints an access token, as the main app would: for `--demo` and tests.
    pub fn mint(&self, sub: &str, role: Option<&str>, ttl_secs: u64) -> String {
        #[derive(Serialize)]
        struct Mint<'a> {
            sub: &'a str,
            exp: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            role: Option<&'a str>,
        }
        let exp = crate::time::epoch_ms() / 1000 + ttl_secs;
        jsonwebtoken::encode(&Header::default(), &Mint { sub, exp, role }, &self.encoding)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn bearer_tokens_are_verified() {
        let key = TokenKey::new(b"s3cret");
        let exp = crate::time::epoch_ms() / 1000 + 60;
        let good = sign(b"s3cret", serde_json::json!({"sub": "u1", "exp": exp}));
        let id = key.verify_bearer(Some(&format!("Bearer {good}"))).unwrap();
        assert_eq!((&*id.user.key, id.admin), ("u1", false));
        let admin = sign(
            b"s3cret",
            serde_json::json!({"sub": 42, "exp": exp, "role": "admin"}),
        );
        let id = key.verify_bearer(Some(&format!("bearer {admin}"))).unwrap();
        assert_eq!(
            (&*id.user.key, id.user.numeric, id.admin),
            ("42", true, true)
        );
        assert_eq!(id.user.to_json(), serde_json::json!(42));

        let cases = [
            None,
            Some(good.clone()),            // no scheme
            Some(format!("Basic {good}")), // wrong scheme
            Some(format!(
                "Bearer {}",
                sign(b"other", serde_json::json!({"sub": "u1", "exp": exp}))
            )),
            Some(format!(
                "Bearer {}",
                sign(
                    b"s3cret",
                    serde_json::json!({"sub": "u1", "exp": exp - 120})
                )
            )),
            Some(format!(
                "Bearer {}",
                sign(b"s3cret", serde_json::json!({"exp": exp}))
            )),
            Some(format!(
                "Bearer {}",
                sign(b"s3cret", serde_json::json!({"sub": {"a": 1}, "exp": exp}))
            )),
            Some("Bearer not.a.jwt".into()),
            Some("Bearer ".into()),
        ];
        for (i, case) in cases.iter().enumerate() {
            assert!(key.verify_bearer(case.as_deref()).is_none(), "case {i}");
        }
    }

    #[test]
    fn a_ticket_is_never_an_access_token() {
        // Same secret for both (the default), admin ticket: still refused.
        let key = TokenKey::new(b"same");
        let tickets = crate::auth::ticket::TicketKey::new(b"same");
        let admin = Identity {
            user: crate::auth::UserId::named("root"),
            admin: true,
        };
        let now = crate::time::epoch_ms() / 1000;
        let ticket = tickets.mint(&admin, None, 3600, now).token;
        assert!(key
            .verify_bearer(Some(&format!("Bearer {ticket}")))
            .is_none());
        let exp = now + 60;
        for aud in [serde_json::json!("sse"), serde_json::json!(["app", "sse"])] {
            let t = sign(
                b"same",
                serde_json::json!({"sub": "u", "exp": exp, "aud": aud}),
            );
            assert!(key.verify(&t).is_none(), "aud {aud}");
        }
        // Another audience of the main app's own is fine.
        let t = sign(
            b"same",
            serde_json::json!({"sub": "u", "exp": exp, "aud": ["app", "sse-admin"]}),
        );
        assert!(key.verify(&t).is_some());
    }

    #[test]
    fn not_before_is_honoured_with_at_most_five_seconds_leeway() {
        let key = TokenKey::new(b"k");
        let now = crate::time::epoch_ms() / 1000;
        let early = sign(
            b"k",
            serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now + 60}),
        );
        assert!(key.verify(&early).is_none());
        let skewed = sign(
            b"k",
            serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now + 2}),
        );
        assert!(key.verify(&skewed).is_some());
        let stale = sign(b"k", serde_json::json!({"sub": "u", "exp": now - 10}));
        assert!(key.verify(&stale).is_none());
    }

    #[test]
    fn minted_tokens_verify() {
        let key = TokenKey::new(b"k");
        let t = key.mint("demo", None, 60);
        assert_eq!(&*key.verify(&t).unwrap().user.key, "demo");
    }
}
