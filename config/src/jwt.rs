//! JWT verification keys: a consumer's `jwt.keys` and `jwt.jwks` parsed
//! into the keys that check signatures (`jsonwebtoken`, on `ring`). One
//! place for both sides: the validator refuses a key that does not parse,
//! with its field path, and the gateway builds its verifiers from the same
//! function, so a key accepted on write is a key the gateway can use.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::model::{ConsumerJwt, JwtAlgorithm, JwtKey};

/// An HS256 secret's least length: the hash's size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// A key ready to verify: its `kid`, its algorithm, the key.
pub struct VerifyKey {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl From<JwtAlgorithm> for Algorithm {
    fn from(a: JwtAlgorithm) -> Algorithm {
        match a {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
            JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// The key of one `jwt.keys` entry, or the field at fault and why.
pub fn decoding_key(k: &JwtKey) -> Result<DecodingKey, (&'static str, String)> {
    match (k.algorithm, &k.secret, &k.public_key) {
        (JwtAlgorithm::HS256, Some(s), None) => {
            if s.len() < MIN_SECRET_BYTES {
                return Err((
                    "secret",
                    format!("must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
            Ok(DecodingKey::from_secret(s.as_bytes()))
        }
        (JwtAlgorithm::HS256, _, _) => Err((
            "secret",
            "HS256 takes a `secret` (and no `public_key`)".into(),
        )),
        (alg, None, Some(pem)) => {
            let parsed = match alg {
                JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(pem.as_bytes()),
                JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
                _ => DecodingKey::from_ed_pem(pem.as_bytes()),
            };
            parsed.map_err(|e| {
                (
                    "public_key",
                    format!("not a PEM public key for {alg:?}: {e}"),
                )
            })
        }
        (alg, _, _) => Err((
            "public_key",
            format!("{alg:?} takes a PEM `public_key` (and no `secret`)"),
        )),
    }
}

/// The algorithm a JWK is used with: its `alg`, else the one its key type
/// implies; only the four the mesh takes.
fn jwk_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        _ => return Err("key type or curve not taken (RSA, EC P-256, OKP Ed25519, oct)".into()),
    };
    match jwk.common.key_algorithm {
        None => Ok(implied),
        Some(a) => {
            let named = match a {
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                KeyAlgorithm::HS256 => Algorithm::HS256,
                other => {
                    return Err(format!(
                        "alg {other:?} not taken (HS256, RS256, ES256, EdDSA)"
                    ))
                }
            };
            match named == implied {
                true => Ok(named),
                false => Err(format!("alg {named:?} does not fit the key type")),
            }
        }
    }
}

/// The problems of a JWKS document, each with its path under `jwks`.
pub fn check_jwks(doc: &serde_json::Value) -> Vec<(String, String)> {
    match jwks_keys(doc) {
        Ok(_) => Vec::new(),
        Err(e) => vec![e],
    }
}

fn jwks_keys(doc: &serde_json::Value) -> Result<Vec<VerifyKey>, (String, String)> {
    let set: JwkSet = serde_json::from_value(doc.clone())
        .map_err(|e| (String::new(), format!("not a JWKS document: {e}")))?;
    if set.keys.is_empty() {
        return Err((".keys".into(), "holds no key".into()));
    }
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let at = |e: String| (format!(".keys[{i}]"), e);
            let algorithm = jwk_algorithm(jwk).map_err(at)?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| at(e.to_string()))?;
            Ok(VerifyKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            })
        })
        .collect()
}

/// Every verification key of a consumer (`keys`, then the JWKS's). A key
/// that does not parse is left out (validation refuses it on write).
pub fn verify_keys(j: &ConsumerJwt) -> Vec<VerifyKey> {
    let mut out: Vec<VerifyKey> = j
        .keys
        .iter()
        .filter_map(|k| {
            Some(VerifyKey {
                kid: k.kid.clone(),
                algorithm: k.algorithm.into(),
                key: decoding_key(k).ok()?,
            })
        })
        .collect();
    if let Some(doc) = &j.jwks {
        out.extend(jwks_keys(doc).unwrap_or_default());
    }
    out
}
