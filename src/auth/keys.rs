//! The public keys that identity-provider access tokens are verified with:
//! one PEM file (`--jwt-public-key`) or a JWKS document (`--jwks-file`,
//! `--jwks-url`). Each [`VerifyKey`] carries the one algorithm it verifies,
//! decided here from the key itself (RSA: RS256, P-256: ES256, P-384: ES384,
//! Ed25519: EdDSA, or a JWK's own `alg` when it fits the key's type). A
//! token's header only picks a key by `kid`; a header naming any other
//! algorithm is refused, so an HS256 token "signed" with a public key's text
//! never verifies. Symmetric (`oct`) JWKs are never taken: HS256 comes only
//! from `--jwt-secret`.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Largest JWKS document or PEM file read (real ones are a few KiB).
pub const MAX_DOCUMENT_BYTES: u64 = 1 << 20;

/// Most keys taken from one JWKS document.
const MAX_KEYS: usize = 64;

/// A public key and the one algorithm it verifies.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub decoding: DecodingKey,
}

/// The keys of one JWKS document, found by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

impl KeySet {
    pub fn find(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    /// The only key of the set, for a token without `kid`.
    pub fn sole(&self) -> Option<&VerifyKey> {
        match self.keys.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `kid:alg` of every key, for the log.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{}:{:?}", k.kid.as_deref().unwrap_or("-"), k.alg))
            .collect();
        names.join(", ")
    }
}

/// A JWKS document: its usable keys, plus one line per key left out (and
/// why). A document with no usable key is an error: it would lock every
/// user out, so the last good set is kept instead.
pub fn parse_jwks(doc: &[u8]) -> Result<(KeySet, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(doc).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        if set.keys.len() == MAX_KEYS {
            skipped.push(format!("keys after the first {MAX_KEYS} ignored"));
            break;
        }
        match serde_json::from_value::<Jwk>(value)
            .map_err(|e| e.to_string())
            .and_then(|jwk| from_jwk(&jwk))
        {
            Ok(key)
                if key.kid.is_some() && set.find(key.kid.as_deref().unwrap_or("")).is_some() =>
            {
                skipped.push(format!("key {i}: duplicate kid"));
            }
            Ok(key) => set.keys.push(key),
            Err(e) => skipped.push(format!("key {i}: {e}")),
        }
    }
    if set.is_empty() {
        let why = if skipped.is_empty() {
            "no keys".to_owned()
        } else {
            skipped.join("; ")
        };
        return Err(format!("no usable key ({why})"));
    }
    Ok((set, skipped))
}

/// One JWK as a verification key, with the algorithm its type allows.
fn from_jwk(jwk: &Jwk) -> Result<VerifyKey, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use: enc)".into());
    }
    let fits: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return Err(format!("curve {:?} not supported", p.curve)),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return Err(format!("curve {:?} not supported", p.curve)),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (oct) key: HS256 comes only from --jwt-secret".into())
        }
        _ => return Err("key type not supported".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => fits[0],
        Some(named) => Algorithm::try_from(named)
            .ok()
            .filter(|a| fits.contains(a))
            .ok_or_else(|| format!("alg {named} does not fit the key's type"))?,
    };
    let decoding = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg,
        decoding,
    })
}

/// A PEM public key (SPKI: `-----BEGIN PUBLIC KEY-----`, or PKCS#1
/// `BEGIN RSA PUBLIC KEY`) with the algorithm its type allows.
pub fn from_pem(pem: &[u8]) -> Result<VerifyKey, String> {
    let (alg, decoding) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        // The uncompressed point's length names the curve.
        let alg = match k.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => Algorithm::ES256,
            Ok(97) => Algorithm::ES384,
            _ => return Err("EC key on a curve other than P-256 or P-384".into()),
        };
        (alg, k)
    } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        (Algorithm::EdDSA, k)
    } else {
        return Err("not a PEM RSA, EC (P-256, P-384) or Ed25519 public key".into());
    };
    Ok(VerifyKey {
        kid: None,
        alg,
        decoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_types_decide_the_algorithm() {
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "r", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
            {"kty": "RSA", "kid": "rs512", "alg": "RS512", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
            {"kty": "EC", "kid": "e", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "OKP", "kid": "d", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "EC", "kid": "lie", "alg": "RS256", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "enc", "use": "enc", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "XYZ", "kid": "x"},
            {"kty": "OKP", "kid": "d", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]});
        let (set, skipped) = parse_jwks(doc.to_string().as_bytes()).unwrap();
        let alg = |kid: &str| set.find(kid).map(|k| k.alg);
        assert_eq!(alg("r"), Some(Algorithm::RS256));
        assert_eq!(alg("rs512"), Some(Algorithm::RS512));
        assert_eq!(alg("e"), Some(Algorithm::ES256));
        assert_eq!(alg("d"), Some(Algorithm::EdDSA));
        for refused in ["lie", "s", "enc", "x"] {
            assert_eq!(alg(refused), None, "{refused}");
        }
        assert_eq!(set.len(), 4);
        assert_eq!(skipped.len(), 5, "{skipped:?}");
        assert!(set.sole().is_none());
    }

    #[test]
    fn documents_without_a_usable_key_are_errors() {
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"keys": []}"#,
            br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
        ] {
            assert!(parse_jwks(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn pem_text_that_is_no_public_key_is_refused() {
        assert!(from_pem(b"").is_err());
        assert!(from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
    }
}
