//! Access tokens as the main app would issue them: HS256 JWTs with `sub` and
//! `exp`, signed with the target's JWT secret.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

pub struct Minter {
    key: EncodingKey,
}

impl Minter {
    pub fn new(secret: &str) -> Minter {
        Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// A token for `user`, valid for two hours.
    pub fn token(&self, user: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        jsonwebtoken::encode(
            &Header::default(),
            &Claims {
                sub: user,
                exp: now + 7200,
            },
            &self.key,
        )
        .map_err(|e| format!("jwt: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_three_part_hs256() {
        let t = Minter::new("s").token("u1").unwrap();
        assert_eq!(t.split('.').count(), 3);
        assert!(t.starts_with("eyJ"));
    }
}
