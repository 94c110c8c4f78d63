//! Stream tickets: short-lived JWTs (HS256, ticket secret) that an
//! `EventSource` URL can carry, since browsers cannot set headers on it.
//! Claims `sub`, `jti` (the ticket id, a UUID), `purpose`, `iat`, `exp`,
//! `aud: "sse"`, plus `role` so an admin's ticket streams every device. The
//! JWT proves who; the store key `sse:ticket:<jti>` proves not revoked.

use jsonwebtoken::{DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::{user_from_sub, Identity, UserId};
use crate::stream::frame::Purpose;

/// A verified ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub id: String,
    pub user: UserId,
    pub admin: bool,
    /// None: valid on both stream endpoints.
    pub purpose: Option<Purpose>,
    pub exp: u64,
}

impl Ticket {
    pub fn identity(&self) -> Identity {
        Identity {
            user: self.user.clone(),
            admin: self.admin,
        }
    }

    /// Whether this ticket may open a stream of `purpose`.
    pub fn allows(&self, purpose: Purpose) -> bool {
        self.purpose.is_none_or(|p| p == purpose)
    }

    pub fn purpose_name(&self) -> &'static str {
        self.purpose.map_or("any", Purpose::as_str)
    }
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: serde_json::Value,
    jti: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purpose: Option<String>,
    iat: u64,
    exp: u64,
    aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
}

pub struct TicketKey {
    decoding: DecodingKey,
    encoding: EncodingKey,
    /// Built once: building one per ticket took five allocations.
    validation: jsonwebtoken::Validation,
}

/// A freshly minted ticket.
pub struct Minted {
    pub token: String,
    pub id: String,
    /// Its `exp` (Unix seconds): its Redis key lives until then.
    pub exp: u64,
}

impl TicketKey {
    pub fn new(secret: &[u8]) -> TicketKey {
        let mut validation = super::validation(jsonwebtoken::Algorithm::HS256, 0);
        validation.set_audience(&[super::TICKET_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        TicketKey {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn mint(
        &self,
        who: &Identity,
        purpose: Option<Purpose>,
        ttl_secs: u64,
        now_secs: u64,
    ) -> Minted {
        let id = super::random_uuid().to_string();
        let exp = now_secs + ttl_secs;
        let claims = Claims {
            sub: who.user.to_json(),
            jti: id.clone(),
            purpose: purpose.map(|p| p.as_str().to_owned()),
            iat: now_secs,
            exp,
            aud: super::TICKET_AUDIENCE.into(),
            role: who.admin.then(|| "admin".into()),
        };
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &self.encoding).unwrap_or_default();
        Minted { token, id, exp }
    }

    /// The ticket, or None when malformed, badly signed, expired, for another
    /// audience, or of an unknown purpose.
    pub fn verify(&self, token: &str) -> Option<Ticket> {
        let c = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()?
            .claims;
        let purpose = match c.purpose.as_deref() {
            None => None,
            Some(p) => Some(Purpose::parse(p)?),
        };
        if c.jti.is_empty() || c.jti.len() > 64 {
            return None;
        }
        // Expired from its `exp` on (RFC 7519 §4.1.4), as its Redis key is;
        // the decoder's own check still takes the `exp` second itself.
        if c.exp.saturating_mul(1000) <= crate::time::epoch_ms() {
            return None;
        }
        Some(Ticket {
            id: c.jti,
            user: user_from_sub(&c.sub)?,
            admin: c.role.as_deref() == Some("admin"),
            purpose,
            exp: c.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_and_user() -> (TicketKey, Identity) {
        let who = Identity {
            user: UserId::named("u1"),
            admin: false,
        };
        (TicketKey::new(b"t"), who)
    }

    #[test]
    fn tickets_round_trip_and_refuse_tampering() {
        let (key, who) = key_and_user();
        let now = crate::time::epoch_ms() / 1000;
        let m = key.mint(&who, Some(Purpose::Data), 60, now);
        let t = key.verify(&m.token).unwrap();
        assert_eq!(t.id, m.id);
        assert_eq!(uuid::Uuid::parse_str(&t.id).unwrap().get_version_num(), 4);
        assert_eq!(
            (&*t.user.key, t.purpose, t.exp),
            ("u1", Some(Purpose::Data), now + 60)
        );
        assert!(t.allows(Purpose::Data) && !t.allows(Purpose::Alerts));

        let any = key.verify(&key.mint(&who, None, 60, now).token).unwrap();
        assert!(any.allows(Purpose::Data) && any.allows(Purpose::Alerts));
        assert_eq!(any.purpose_name(), "any");

        assert!(TicketKey::new(b"other").verify(&m.token).is_none());
        assert!(
            key.verify(&key.mint(&who, None, 60, now - 120).token)
                .is_none(),
            "expired"
        );
        // From its `exp` second on, a ticket is expired (before, the decoder
        // took `exp == now`).
        assert!(key.verify(&key.mint(&who, None, 0, now).token).is_none());
        let mut tampered = m.token.clone();
        tampered.insert(tampered.len() / 2, 'x');
        assert!(key.verify(&tampered).is_none());
        // An access token (no aud) is not a ticket.
        let access = crate::auth::token::TokenKey::new(b"t").mint("u1", None, 60);
        assert!(key.verify(&access).is_none());
    }

    #[test]
    fn ticket_ids_are_random_version_4_uuids_never_repeated() {
        let (key, who) = key_and_user();
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| key.mint(&who, None, 60, 0).id)
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 4);
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        }
    }
}
