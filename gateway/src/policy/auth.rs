//! Consumers and how a route authenticates them: API keys (compared by
//! their SHA-256, the only form stored) and bearer JWTs (HS256, RS256,
//! ES256, EdDSA; `alg: none` never verifies), checked against the keys of
//! the applied consumers.
//!
//! A verified token is cached (moka, bounded in entries and time, keyed by
//! a hash of the route's identity and the token), so a hot token costs one
//! hash and one lookup, not a signature check; `exp` and `nbf` are checked
//! again on every hit. The cache belongs to one consumers table: a change
//! of any consumer starts a fresh one, so a revoked key stops working at
//! once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, Validation};
use meshgate_config::jwt::{verify_keys, VerifyKey};
use meshgate_config::model::{Consumer, RouteAuth};
use meshgate_config::tokens::{bearer, digest, parse_digest};
use sha2::{Digest, Sha256};

use super::limit::Limiter;

/// Tokens longer than this are refused unread (431).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Verified tokens remembered per consumers table.
const CACHE_ENTRIES: u64 = 10_000;
/// How long a verified token is remembered (never past its `exp`).
const CACHE_TTL: Duration = Duration::from_secs(300);

/// A consumer, compiled.
#[derive(Debug)]
pub struct ConsumerRt {
    pub name: Arc<str>,
    /// Its own limit, over every route (`rate_limit`).
    pub limit: Option<Arc<Limiter>>,
}

/// Every applied consumer, indexed by credential.
#[derive(Default)]
pub struct Consumers {
    by_key: HashMap<[u8; 32], Arc<ConsumerRt>>,
    /// JWT keys with a `kid`, by kid.
    by_kid: HashMap<String, (Arc<ConsumerRt>, VerifyKey)>,
    /// JWT keys without one: tried in turn (those of the token's `alg`).
    unnamed: Vec<(Arc<ConsumerRt>, VerifyKey)>,
    verified: Option<moka::sync::Cache<[u8; 32], Verified>>,
}

impl std::fmt::Debug for Consumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumers")
            .field("api_keys", &self.by_key.len())
            .field("jwt_keys", &(self.by_kid.len() + self.unnamed.len()))
            .finish()
    }
}

#[derive(Debug, Clone)]
struct Verified {
    consumer: Arc<ConsumerRt>,
    exp: u64,
    nbf: u64,
}

impl Consumers {
    /// The table of `consumers` (name, spec, its limiter).
    pub fn new<'a>(
        consumers: impl IntoIterator<Item = (&'a str, &'a Consumer, Option<Arc<Limiter>>)>,
    ) -> Consumers {
        let mut t = Consumers::default();
        for (name, c, limit) in consumers {
            let rt = Arc::new(ConsumerRt {
                name: name.into(),
                limit,
            });
            for k in &c.api_keys {
                let hash = match (&k.key, &k.sha256) {
                    (Some(plain), _) => Some(digest(plain)),
                    (None, Some(h)) => parse_digest(h),
                    _ => None,
                };
                if let Some(h) = hash {
                    t.by_key.insert(h, rt.clone());
                }
            }
            for key in c.jwt.iter().flat_map(verify_keys) {
                match key.kid.clone() {
                    Some(kid) => {
                        t.by_kid.insert(kid, (rt.clone(), key));
                    }
                    None => t.unnamed.push((rt.clone(), key)),
                }
            }
        }
        if !t.by_kid.is_empty() || !t.unnamed.is_empty() {
            t.verified = Some(
                moka::sync::Cache::builder()
                    .max_capacity(CACHE_ENTRIES)
                    .time_to_live(CACHE_TTL)
                    .build(),
            );
        }
        t
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one that does not verify (401).
    Unauthenticated {
        message: String,
        challenge: HeaderValue,
    },
    /// A credential of a consumer the route does not take (403).
    NotAllowed(String),
    /// A token over [`MAX_TOKEN_BYTES`] (431).
    TooLarge,
}

/// A route's authentication, compiled.
#[derive(Debug)]
pub struct AuthRule {
    /// The route's identity in the token cache (name and version).
    id: [u8; 32],
    api_key_header: Option<HeaderName>,
    api_key_query: Option<String>,
    jwt: Option<JwtRule>,
    consumers: Vec<String>,
}

struct JwtRule {
    /// One validation per algorithm taken.
    validations: Vec<(Algorithm, Validation)>,
    required: Vec<String>,
}

impl std::fmt::Debug for JwtRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtRule")
            .field("required", &self.required)
            .finish()
    }
}

impl AuthRule {
    pub fn new(route: &str, version: i64, a: &RouteAuth) -> AuthRule {
        let mut id = Sha256::new();
        id.update(route.as_bytes());
        id.update(version.to_be_bytes());
        let api_key_header = a
            .api_key
            .as_ref()
            .and_then(|k| match (&k.header, &k.query) {
                (Some(h), _) => HeaderName::from_bytes(h.as_bytes()).ok(),
                (None, None) => Some(HeaderName::from_static("x-api-key")),
                (None, Some(_)) => None,
            });
        let jwt = a.jwt.as_ref().map(|j| {
            let validations = [
                Algorithm::HS256,
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::EdDSA,
            ]
            .into_iter()
            .map(|alg| {
                let mut v = Validation::new(alg);
                v.leeway = j.clock_skew_s;
                v.validate_nbf = true;
                let mut spec = vec!["exp"];
                if let Some(iss) = &j.issuer {
                    v.set_issuer(&[iss]);
                    spec.push("iss");
                }
                if j.audiences.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&j.audiences);
                    spec.push("aud");
                }
                v.set_required_spec_claims(&spec);
                (alg, v)
            })
            .collect();
            JwtRule {
                validations,
                required: j.required_claims.clone(),
            }
        });
        AuthRule {
            id: id.finalize().into(),
            api_key_header,
            api_key_query: a.api_key.as_ref().and_then(|k| k.query.clone()),
            jwt,
            consumers: a.consumers.clone(),
        }
    }

    /// The consumer a request authenticates as; the first credential it
    /// presents decides (an API key, then a bearer token).
    pub fn authenticate(
        &self,
        consumers: &Consumers,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Arc<ConsumerRt>, Refusal> {
        let found = match self.api_key(headers, query) {
            Some(key) => self.by_api_key(consumers, key)?,
            None => match (&self.jwt, headers.get(http::header::AUTHORIZATION)) {
                (Some(rule), Some(v)) => self.by_jwt(consumers, rule, v)?,
                _ => return Err(self.missing()),
            },
        };
        if !self.consumers.is_empty() && !self.consumers.iter().any(|c| **c == *found.name) {
            return Err(Refusal::NotAllowed(format!(
                "consumer {} may not use this route",
                found.name
            )));
        }
        Ok(found)
    }

    fn api_key<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a [u8]> {
        if let Some(v) = self.api_key_header.as_ref().and_then(|h| headers.get(h)) {
            return Some(v.as_bytes());
        }
        let (name, query) = (self.api_key_query.as_deref()?, query?);
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then_some(v.as_bytes())
        })
    }

    fn by_api_key(&self, consumers: &Consumers, key: &[u8]) -> Result<Arc<ConsumerRt>, Refusal> {
        if key.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TooLarge);
        }
        let hash: [u8; 32] = Sha256::digest(key).into();
        consumers
            .by_key
            .get(&hash)
            .cloned()
            .ok_or_else(|| self.bad("unknown API key"))
    }

    fn by_jwt(
        &self,
        consumers: &Consumers,
        rule: &JwtRule,
        authorization: &HeaderValue,
    ) -> Result<Arc<ConsumerRt>, Refusal> {
        if authorization.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TooLarge);
        }
        let token = authorization
            .to_str()
            .ok()
            .and_then(bearer)
            .ok_or_else(|| self.bad("the Authorization header is not `Bearer <token>`"))?;
        let now = jsonwebtoken::get_current_timestamp();
        let mut h = Sha256::new();
        h.update(self.id);
        h.update(token.as_bytes());
        let cache_key: [u8; 32] = h.finalize().into();
        let leeway = rule.validations.first().map_or(0, |(_, v)| v.leeway);
        if let Some(v) = consumers.verified.as_ref().and_then(|c| c.get(&cache_key)) {
            if now <= v.exp.saturating_add(leeway) && now.saturating_add(leeway) >= v.nbf {
                return Ok(v.consumer);
            }
            return Err(self.bad("the token has expired"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| self.bad(&format!("malformed token: {e}")))?;
        let candidates: Vec<&(Arc<ConsumerRt>, VerifyKey)> = match &header.kid {
            Some(kid) => consumers.by_kid.get(kid).into_iter().collect(),
            None => consumers.unnamed.iter().collect(),
        };
        let Some((_, validation)) = rule.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(self.bad(&format!("algorithm {:?} is not taken", header.alg)));
        };
        let mut last = "no key of a consumer verifies the token".to_string();
        for (consumer, key) in candidates
            .into_iter()
            .filter(|(_, k)| k.algorithm == header.alg)
        {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token, &key.key, validation,
            ) {
                Ok(data) => {
                    let claims = data.claims;
                    if let Some(c) = rule.required.iter().find(|c| !claims.contains_key(*c)) {
                        return Err(self.bad(&format!("the token has no `{c}` claim")));
                    }
                    let num = |c: &str| claims.get(c).and_then(|v| v.as_u64());
                    let v = Verified {
                        consumer: consumer.clone(),
                        exp: num("exp").unwrap_or(0),
                        nbf: num("nbf").unwrap_or(0),
                    };
                    if let Some(c) = &consumers.verified {
                        c.insert(cache_key, v);
                    }
                    return Ok(consumer.clone());
                }
                Err(e) => {
                    last = format!("invalid token: {e}");
                    use jsonwebtoken::errors::ErrorKind as K;
                    // Anything but a signature mismatch is final: the
                    // claims are not a matter of which key.
                    if !matches!(e.kind(), K::InvalidSignature) {
                        return Err(self.bad(&last));
                    }
                }
            }
        }
        Err(self.bad(&last))
    }

    fn challenge(&self) -> HeaderValue {
        HeaderValue::from_static(match (&self.jwt, &self.api_key_header) {
            (Some(_), _) => "Bearer realm=\"meshgate\"",
            _ => "ApiKey realm=\"meshgate\"",
        })
    }

    fn missing(&self) -> Refusal {
        Refusal::Unauthenticated {
            message: "no credentials".into(),
            challenge: self.challenge(),
        }
    }

    fn bad(&self, why: &str) -> Refusal {
        let challenge = match &self.jwt {
            Some(_) => {
                HeaderValue::from_static("Bearer realm=\"meshgate\", error=\"invalid_token\"")
            }
            None => self.challenge(),
        };
        Refusal::Unauthenticated {
            message: why.to_string(),
            challenge,
        }
    }

    /// The API key's query parameter, to remove before the request goes
    /// upstream.
    pub fn query_param(&self) -> Option<&str> {
        self.api_key_query.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use meshgate_config::model::{ApiKey, ApiKeyAuth, ConsumerJwt, JwtAlgorithm, JwtAuth, JwtKey};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn table() -> Consumers {
        let alice = Consumer {
            api_keys: vec![ApiKey {
                key: Some("alice-key-0123456789".into()),
                ..Default::default()
            }],
            jwt: Some(ConsumerJwt {
                keys: vec![JwtKey {
                    kid: Some("a1".into()),
                    algorithm: JwtAlgorithm::HS256,
                    secret: Some(SECRET.into()),
                    public_key: None,
                }],
                jwks: None,
            }),
            ..Default::default()
        };
        let bob = Consumer {
            api_keys: vec![ApiKey {
                sha256: Some(meshgate_config::tokens::hex(&digest(
                    "bob-key-0123456789ab",
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        Consumers::new([("alice", &alice, None), ("bob", &bob, None)])
    }

    fn rule(consumers: &[&str]) -> AuthRule {
        AuthRule::new(
            "r",
            1,
            &RouteAuth {
                api_key: Some(ApiKeyAuth::default()),
                jwt: Some(JwtAuth {
                    issuer: Some("idp".into()),
                    audiences: vec!["shop".into()],
                    clock_skew_s: 0,
                    required_claims: vec![],
                }),
                consumers: consumers.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    fn token(exp_in: i64, aud: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = serde_json::json!({"iss": "idp", "aud": aud, "exp": now + exp_in});
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("a1".into());
        encode(&h, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn with(name: &'static str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn api_keys_find_their_consumer_by_hash() {
        let t = table();
        let r = rule(&[]);
        let c = r
            .authenticate(&t, &with("x-api-key", "alice-key-0123456789"), None)
            .unwrap();
        assert_eq!(&*c.name, "alice");
        let c = r
            .authenticate(&t, &with("x-api-key", "bob-key-0123456789ab"), None)
            .unwrap();
        assert_eq!(&*c.name, "bob");
        assert!(matches!(
            r.authenticate(&t, &with("x-api-key", "nope"), None),
            Err(Refusal::Unauthenticated { .. })
        ));
        assert!(matches!(
            r.authenticate(&t, &HeaderMap::new(), None),
            Err(Refusal::Unauthenticated { .. })
        ));
    }

    #[test]
    fn tokens_verify_then_hit_the_cache_and_expire() {
        let t = table();
        let r = rule(&[]);
        let good = format!("Bearer {}", token(60, "shop"));
        for _ in 0..2 {
            let c = r
                .authenticate(&t, &with("authorization", &good), None)
                .unwrap();
            assert_eq!(&*c.name, "alice");
        }
        let expired = format!("Bearer {}", token(-60, "shop"));
        assert!(r
            .authenticate(&t, &with("authorization", &expired), None)
            .is_err());
        let wrong_aud = format!("Bearer {}", token(60, "other"));
        assert!(r
            .authenticate(&t, &with("authorization", &wrong_aud), None)
            .is_err());
    }

    #[test]
    fn a_consumer_not_listed_is_refused_with_403() {
        let t = table();
        let r = rule(&["bob"]);
        let got = r.authenticate(&t, &with("x-api-key", "alice-key-0123456789"), None);
        assert!(matches!(got, Err(Refusal::NotAllowed(_))));
    }
}
