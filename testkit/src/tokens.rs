//! Access tokens for tests and the load harness. Valid ones come from the
//! gateway's own minter ([`TokenKey::mint`]), never a copy of it, so the kit
//! signs exactly what `--demo` and the gateway accept. [`sign_hs256`] signs
//! arbitrary claims, for tests that craft tokens the gateway must refuse
//! (expired, not yet valid, wrong audience, a numeric `sub`...).

use serde_json::Value;
use sse_gateway::auth::token::TokenKey;

/// An HS256 access token for `sub` (and `role`), valid `ttl_secs`, as the
/// main app issues them; signed by the gateway's [`TokenKey`].
pub fn access_token(secret: &str, sub: &str, role: Option<&str>, ttl_secs: u64) -> String {
    TokenKey::new(secret.as_bytes()).mint(sub, role, ttl_secs)
}

/// `claims` signed with HS256 and `secret`, whatever they say.
pub fn sign_hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of JSON claims")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_what_the_gateway_verifies() {
        let t = access_token("s", "u1", Some("admin"), 60);
        let who = TokenKey::new(b"s").verify(&t).expect("verified");
        assert!(who.admin);
        assert!(TokenKey::new(b"other").verify(&t).is_none());
        let crafted = sign_hs256(b"s", &serde_json::json!({"sub": "u2", "exp": 1}));
        assert!(TokenKey::new(b"s").verify(&crafted).is_none(), "expired");
    }
}
