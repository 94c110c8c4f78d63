//! Who is asking. Access tokens are issued by the main app and only verified
//! here ([`token`]); stream tickets are minted and verified here ([`ticket`]).
//! Tickets are HS256; access tokens HS256 or, from an identity provider,
//! RS256/ES256/EdDSA ([`keys`], [`jwks`]); [`credentials`] turns the flags
//! into both keys at start. Verification is pure CPU (a few microseconds) and runs
//! on the reactor; whether a ticket was revoked is a store lookup (Redis key
//! `sse:ticket:<id>`) that never does.

pub mod credentials;
pub mod jwks;
pub mod keys;
pub mod ticket;
pub mod token;

use std::fmt;

/// A fresh version-4 UUID (ticket ids, stream ids) from the thread's CSPRNG
/// (rand's ChaCha, reseeded from the OS): unguessable as `Uuid::new_v4`'s,
/// without its `getrandom` system call per id, two per open.
pub fn random_uuid() -> uuid::Uuid {
    let random: [u8; 16] = rand::Rng::random(&mut rand::rng());
    uuid::Builder::from_random_bytes(random).into_uuid()
}

/// A user id as the token's `sub` carried it: a string, or a number that
/// `/sse/status` gives back as a number. Shared, not copied: a stream, its
/// registry row and its store lookups hold one allocation of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserId {
    pub key: std::sync::Arc<str>,
    pub numeric: bool,
}

impl UserId {
    pub fn named(key: &str) -> UserId {
        UserId {
            key: key.into(),
            numeric: false,
        }
    }

    /// The id as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        if self.numeric {
            if let Ok(n) = serde_json::from_str::<serde_json::Number>(&self.key) {
                return serde_json::Value::Number(n);
            }
        }
        serde_json::Value::String(self.key.to_string())
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub admin: bool,
}

/// The longest user id (`sub`) accepted.
pub const MAX_USER_ID_BYTES: usize = 256;

/// `sub` as a string or number; anything else refuses the token.
pub fn user_from_sub(sub: &serde_json::Value) -> Option<UserId> {
    match sub {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_USER_ID_BYTES => {
            Some(UserId::named(s))
        }
        serde_json::Value::Number(n) => Some(UserId {
            key: n.to_string().into(),
            numeric: true,
        }),
        _ => None,
    }
}

/// The `aud` of every stream ticket.
pub const TICKET_AUDIENCE: &str = "sse";

/// Exactly `alg`, with `exp` required and `nbf` honoured.
fn validation(alg: jsonwebtoken::Algorithm, leeway: u64) -> jsonwebtoken::Validation {
    let mut v = jsonwebtoken::Validation::new(alg);
    v.leeway = leeway;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp"]);
    v
}
