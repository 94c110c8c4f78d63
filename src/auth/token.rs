//! Access tokens: `Authorization: Bearer <jwt>`, issued by the main app or
//! its identity provider, only verified here. Claims `sub`, `exp` (required),
//! `nbf` (honoured), optional `role` (`"admin"` may stream every device),
//! and `iss`/`aud` when `--jwt-issuer`/`--jwt-audience` ask for them.
//!
//! The key decides the algorithm: an `HS*` header is checked only against
//! `--jwt-secret` (HS256); any other header picks a public key by `kid`
//! (from `--jwks-file`/`--jwks-url`, else `--jwt-public-key`) and must name
//! exactly that key's algorithm. Verification only reads in-memory keys: an
//! unknown `kid` nudges the JWKS fetch thread and fails at once.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::jwks::JwksFeed;
use super::keys::VerifyKey;
use super::{user_from_sub, Identity};

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
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

/// Whether `aud` (a string or an array of strings) names `audience`.
fn aud_contains(aud: Option<&serde_json::Value>, audience: &str) -> bool {
    match aud {
        Some(serde_json::Value::String(a)) => a == audience,
        Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    }
}

/// Whether `aud` (a string or an array of strings) names the stream-ticket
/// audience: such a token is a ticket, and a ticket is never a credential,
/// even when both are signed with the same secret (the default).
pub fn names_ticket_audience(aud: Option<&serde_json::Value>) -> bool {
    aud_contains(aud, super::TICKET_AUDIENCE)
}

/// `--jwt-secret`: verifies HS256 tokens and mints them (demo, tests).
struct Secret {
    decoding: DecodingKey,
    encoding: EncodingKey,
    /// HS256's, built once (one per token took five allocations).
    validation: jsonwebtoken::Validation,
}

/// An access token's validation: `alg` = the key's, `exp` required, `nbf`
/// honoured. `aud` is checked by [`TokenKey::verify`]: the main app may set
/// audiences of its own, ours (the ticket's) is refused.
fn access_validation(alg: Algorithm) -> jsonwebtoken::Validation {
    let mut validation = super::validation(alg, LEEWAY_SECS);
    validation.validate_aud = false;
    validation
}

/// The claims of a token whose signature and times `validation` accepts.
fn decode(token: &str, key: &DecodingKey, validation: &jsonwebtoken::Validation) -> Option<Claims> {
    jsonwebtoken::decode::<Claims>(token, key, validation)
        .ok()
        .map(|d| d.claims)
}

/// What an access token must satisfy besides its signature.
#[derive(Clone, Debug, Default)]
pub struct Claimed {
    /// `--jwt-issuer`: `iss` must equal it.
    pub issuer: Option<String>,
    /// `--jwt-audience`: `aud` must contain it.
    pub audience: Option<String>,
}

/// Verifies access tokens; holds every key, derived once.
pub struct TokenKey {
    secret: Option<Secret>,
    /// `--jwt-public-key`.
    public: Option<VerifyKey>,
    /// `--jwks-file`, `--jwks-url`.
    feeds: Vec<Arc<JwksFeed>>,
    claimed: Claimed,
}

impl TokenKey {
    /// HS256 with `secret` only (the main app's shared secret).
    pub fn new(secret: &[u8]) -> TokenKey {
        TokenKey::with_keys(Some(secret), None, Vec::new(), Claimed::default())
    }

    pub fn with_keys(
        secret: Option<&[u8]>,
        public: Option<VerifyKey>,
        feeds: Vec<Arc<JwksFeed>>,
        claimed: Claimed,
    ) -> TokenKey {
        TokenKey {
            secret: secret.map(|s| Secret {
                decoding: DecodingKey::from_secret(s),
                encoding: EncodingKey::from_secret(s),
                validation: access_validation(Algorithm::HS256),
            }),
            public,
            feeds,
            claimed,
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
        let header = jsonwebtoken::decode_header(token).ok()?;
        let claims = if header.alg.family() == AlgorithmFamily::Hmac {
            let secret = self.secret.as_ref()?;
            decode(token, &secret.decoding, &secret.validation)?
        } else {
            let key = self.public_key(header.kid.as_deref())?;
            decode(token, &key.decoding, &access_validation(key.alg))?
        };
        if names_ticket_audience(claims.aud.as_ref()) {
            return None;
        }
        if let Some(issuer) = &self.claimed.issuer {
            if claims.iss.as_ref().and_then(|i| i.as_str()) != Some(issuer.as_str()) {
                return None;
            }
        }
        if let Some(audience) = &self.claimed.audience {
            if !aud_contains(claims.aud.as_ref(), audience) {
                return None;
            }
        }
        Some(Identity {
            user: user_from_sub(&claims.sub)?,
            admin: claims.role.as_ref().and_then(|r| r.as_str()) == Some("admin"),
        })
    }

    /// The public key a token's `kid` names: a JWKS key with that kid, else
    /// `--jwt-public-key`; a token without kid may also use the only key of
    /// the only JWKS. An unknown kid asks the URL feeds for a fresh set.
    fn public_key(&self, kid: Option<&str>) -> Option<VerifyKey> {
        match kid {
            Some(kid) => {
                let known = self.feeds.iter().find_map(|f| f.keys().find(kid).cloned());
                if known.is_some() {
                    return known;
                }
                self.feeds.iter().for_each(|f| f.unknown_kid());
            }
            None => {
                if let (None, [feed]) = (&self.public, self.feeds.as_slice()) {
                    return feed.keys().sole().cloned();
                }
            }
        }
        self.public.clone()
    }

    /// Mints an HS256 access token, as the main app would: for `--demo` and
    /// tests. Empty without `--jwt-secret`.
    pub fn mint(&self, sub: &str, role: Option<&str>, ttl_secs: u64) -> String {
        #[derive(Serialize)]
        struct Mint<'a> {
            sub: &'a str,
            exp: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            role: Option<&'a str>,
        }
        let Some(secret) = &self.secret else {
            return String::new();
        };
        let exp = crate::time::epoch_ms() / 1000 + ttl_secs;
        jsonwebtoken::encode(
            &Header::default(),
            &Mint { sub, exp, role },
            &secret.encoding,
        )
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

    /// A fixture key pair: (private PEM, public PEM).
    fn pair(name: &str) -> (Vec<u8>, Vec<u8>) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/idp/");
        let read = |ext: &str| std::fs::read(format!("{dir}{name}.{ext}")).unwrap();
        (read("key"), read("pub"))
    }

    fn encoding(alg: Algorithm, private: &[u8]) -> EncodingKey {
        match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private),
            Algorithm::ES256 => EncodingKey::from_ec_pem(private),
            _ => EncodingKey::from_ed_pem(private),
        }
        .unwrap()
    }

    fn sign_with(
        alg: Algorithm,
        kid: Option<&str>,
        private: &[u8],
        claims: serde_json::Value,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &encoding(alg, private)).unwrap()
    }

    fn public_only(public: &[u8], claimed: Claimed) -> TokenKey {
        let key = crate::auth::keys::from_pem(public).unwrap();
        TokenKey::with_keys(None, Some(key), Vec::new(), claimed)
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({"sub": "u1", "exp": crate::time::epoch_ms() / 1000 + 60});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    }

    const ALGS: [(&str, Algorithm); 3] = [
        ("rsa-a", Algorithm::RS256),
        ("ec-a", Algorithm::ES256),
        ("ed-a", Algorithm::EdDSA),
    ];

    #[test]
    fn public_key_tokens_verify_with_the_algorithm_of_their_key() {
        for (name, alg) in ALGS {
            let (private, public) = pair(name);
            let key = public_only(&public, Claimed::default());
            let good = sign_with(
                alg,
                Some("any"),
                &private,
                claims(serde_json::json!({"role": "admin"})),
            );
            let id = key
                .verify_bearer(Some(&format!("Bearer {good}")))
                .expect(name);
            assert_eq!((&*id.user.key, id.admin), ("u1", true), "{name}");
            // The other key types' tokens never verify with this key.
            for (other, other_alg) in ALGS.iter().filter(|(n, _)| *n != name) {
                let (other_private, _) = pair(other);
                let t = sign_with(
                    *other_alg,
                    None,
                    &other_private,
                    claims(serde_json::json!({})),
                );
                assert!(key.verify(&t).is_none(), "{other} token against {name} key");
            }
            // Same type, another key.
            let (stranger, _) = pair(&name.replace("-a", "-b"));
            let t = sign_with(alg, None, &stranger, claims(serde_json::json!({})));
            assert!(key.verify(&t).is_none(), "{name}: another key");
            // exp required, nbf honoured, aud "sse" refused.
            let no_exp = sign_with(alg, None, &private, serde_json::json!({"sub": "u1"}));
            let now = crate::time::epoch_ms() / 1000;
            let early = sign_with(
                alg,
                None,
                &private,
                claims(serde_json::json!({"nbf": now + 60})),
            );
            let ticket = sign_with(
                alg,
                None,
                &private,
                claims(serde_json::json!({"aud": ["app", "sse"]})),
            );
            for (what, t) in [("no exp", no_exp), ("nbf", early), ("aud sse", ticket)] {
                assert!(key.verify(&t).is_none(), "{name}: {what}");
            }
        }
    }

    #[test]
    fn the_header_never_chooses_the_algorithm() {
        let (_, public) = pair("rsa-a");
        // HS256 "signed" with the public key's PEM text as the HMAC secret:
        // refused with only the public key, and with a jwt secret beside it.
        let confused = sign(&public, claims(serde_json::json!({})));
        assert!(public_only(&public, Claimed::default())
            .verify(&confused)
            .is_none());
        let both = TokenKey::with_keys(
            Some(b"the-real-hs256-secret"),
            Some(crate::auth::keys::from_pem(&public).unwrap()),
            Vec::new(),
            Claimed::default(),
        );
        assert!(both.verify(&confused).is_none());
        // HS256 still works beside the public key, with the secret.
        let hs = sign(b"the-real-hs256-secret", claims(serde_json::json!({})));
        assert!(both.verify(&hs).is_some());
        // An RS256 token against an EC key, a token with alg "none".
        let (rsa_private, _) = pair("rsa-a");
        let (_, ec_public) = pair("ec-a");
        let rs = sign_with(
            Algorithm::RS256,
            None,
            &rsa_private,
            claims(serde_json::json!({})),
        );
        assert!(public_only(&ec_public, Claimed::default())
            .verify(&rs)
            .is_none());
        let body = rs.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        assert!(public_only(&public, Claimed::default())
            .verify(&none)
            .is_none());
    }

    #[test]
    fn issuer_must_equal_and_audience_must_contain() {
        let (private, public) = pair("ed-a");
        let key = public_only(
            &public,
            Claimed {
                issuer: Some("https://idp.example/realms/plant".into()),
                audience: Some("dashboards".into()),
            },
        );
        let iss = "https://idp.example/realms/plant";
        let cases = [
            (serde_json::json!({"iss": iss, "aud": "dashboards"}), true),
            (
                serde_json::json!({"iss": iss, "aud": ["account", "dashboards"]}),
                true,
            ),
            (serde_json::json!({"aud": "dashboards"}), false),
            (
                serde_json::json!({"iss": "https://evil.example", "aud": "dashboards"}),
                false,
            ),
            (
                serde_json::json!({"iss": [iss], "aud": "dashboards"}),
                false,
            ),
            (serde_json::json!({"iss": iss}), false),
            (serde_json::json!({"iss": iss, "aud": "account"}), false),
            (
                serde_json::json!({"iss": iss, "aud": ["dashboards", "sse"]}),
                false,
            ),
        ];
        for (extra, want) in cases {
            let t = sign_with(Algorithm::EdDSA, None, &private, claims(extra.clone()));
            assert_eq!(key.verify(&t).is_some(), want, "{extra}");
        }
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
        let (rsa, _) = pair("rsa-a");
        let (ed, _) = pair("ed-a");
        let jwk = |alg: Algorithm, private: &[u8], kid: &str| {
            let mut j =
                jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding(alg, private), alg).unwrap();
            j.common.key_id = Some(kid.into());
            j.common.key_algorithm = None;
            j
        };
        let doc = serde_json::json!({"keys": [jwk(Algorithm::RS256, &rsa, "r1"), jwk(Algorithm::EdDSA, &ed, "e1")]});
        let feed = crate::auth::jwks::JwksFeed::fixed(doc.to_string().as_bytes());
        let key = TokenKey::with_keys(None, None, vec![feed], Claimed::default());
        let ok = |t: &str| key.verify(t).is_some();
        let c = || claims(serde_json::json!({}));
        assert!(ok(&sign_with(Algorithm::RS256, Some("r1"), &rsa, c())));
        assert!(ok(&sign_with(Algorithm::EdDSA, Some("e1"), &ed, c())));
        // The kid of one key, the signature of another.
        assert!(!ok(&sign_with(Algorithm::EdDSA, Some("r1"), &ed, c())));
        assert!(!ok(&sign_with(Algorithm::RS256, Some("nope"), &rsa, c())));
        // No kid: ambiguous between two keys.
        assert!(!ok(&sign_with(Algorithm::RS256, None, &rsa, c())));
        // No jwt secret: every HS256 token is refused.
        assert!(!ok(&sign(b"", c())));
        assert!(key.mint("u", None, 60).is_empty());
    }

    #[test]
    fn minted_tokens_verify() {
        let key = TokenKey::new(b"k");
        let t = key.mint("demo", None, 60);
        assert_eq!(&*key.verify(&t).unwrap().user.key, "demo");
    }
}
