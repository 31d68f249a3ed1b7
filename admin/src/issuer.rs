//! The online mesh CA: join tokens, and workload certificates signed with
//! the issuer's key for the nodes that ask (`meshctl ca init` lays out the
//! CA directory; the root's key is never read here).
//!
//! - `POST /api/v1/join-tokens` (admin role) makes a token for one
//!   identity (`gateway/<id>` or `group/<g>/service/<svc>`) and returns it
//!   once; the store keeps `join_tokens/<name>` with the token's SHA-256
//!   only. `GET` lists them, `DELETE /api/v1/join-tokens/<name>` revokes.
//! - `POST /api/v1/identity` (no bearer token: the node's credential is
//!   its join token, or its current certificate): the node's CSR (proof
//!   that it holds the key, which never leaves it) is signed for the
//!   identity the token names, or, for a renewal over mutual TLS, for the
//!   identity of the certificate the node presented. A token is good for
//!   joining until it expires; renewals go on while the identity has a
//!   token record, so deleting an identity's tokens stops its renewals and
//!   its certificates lapse within their lifetime.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use meshgate_config::model::now_ms;
use meshgate_config::store::{Cond, Op, TxnOutcome};
use meshgate_config::tokens::{digest, hex, parse_digest, same_digest};
use meshgate_config::{Key, Kind};
use rcgen::{CertificateSigningRequestParams, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::{decode_body, AdminState};
use crate::error::{ApiError, Body, Path as UrlPath};

/// The certificates a node presented on its TLS connection to the admin
/// API (verified against the trust bundle), as a request extension.
#[derive(Debug, Clone)]
pub struct PeerChain(pub Vec<rustls::pki_types::CertificateDer<'static>>);

/// The issuer's certificate and key, the trust bundle and the lifetime of
/// what it signs.
pub struct MeshIssuer {
    pub trust_domain: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    issuer_pem: String,
    bundle_file: std::path::PathBuf,
    pub lifetime: Duration,
}

impl std::fmt::Debug for MeshIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIssuer")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// A join token's record in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    /// `gateway/<id>` or `group/<g>/service/<svc>`.
    identity: String,
    /// Hex SHA-256 of the token's secret.
    sha256: String,
    /// Joining with it is refused after this (renewals are not).
    expires_at_ms: u64,
    created_at_ms: u64,
    created_by: String,
}

impl MeshIssuer {
    /// From a CA directory (`trust-domain`, `issuer.crt`, `issuer.key`,
    /// `bundle.pem`). Errors name the file.
    pub fn load(dir: &Path, lifetime: Duration) -> anyhow::Result<MeshIssuer> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("ca.dir: {}: {e}", p.display()))
        };
        let trust_domain = read("trust-domain")?.trim().to_string();
        let issuer_pem = read("issuer.crt")?;
        let key = rcgen::KeyPair::from_pem(&read("issuer.key")?)
            .map_err(|e| anyhow::anyhow!("ca.dir: issuer.key: {e}"))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, key)
            .map_err(|e| anyhow::anyhow!("ca.dir: issuer.crt: {e}"))?;
        let bundle_file = dir.join("bundle.pem");
        meshgate_config::tls::parse_chain(&read("bundle.pem")?)
            .map_err(|e| anyhow::anyhow!("ca.dir: bundle.pem: {e}"))?;
        Ok(MeshIssuer {
            trust_domain,
            issuer,
            issuer_pem,
            bundle_file,
            lifetime,
        })
    }

    /// The trust bundle (read at each use: a rotation reaches the nodes
    /// with their next certificate).
    pub fn bundle(&self) -> Result<String, String> {
        std::fs::read_to_string(&self.bundle_file)
            .map_err(|e| format!("{}: {e}", self.bundle_file.display()))
    }

    /// The roots that verify the nodes' certificates on the admin API.
    pub fn roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        let bundle = self.bundle().map_err(|e| anyhow::anyhow!("ca.dir: {e}"))?;
        for c in meshgate_config::tls::parse_chain(&bundle)
            .map_err(|e| anyhow::anyhow!("ca.dir: bundle.pem: {e}"))?
        {
            roots.add(c)?;
        }
        Ok(roots)
    }

    /// Signs `csr` (PEM) for `path`: the CSR's key, this identity as the
    /// only SAN, client and server use, valid for the lifetime. A CSR that
    /// names another identity is refused.
    fn sign(&self, csr: &str, path: &str) -> Result<(String, i64), String> {
        let spiffe = format!("spiffe://{}/{path}", self.trust_domain);
        let mut req = CertificateSigningRequestParams::from_pem(csr)
            .map_err(|e| format!("csr: not a valid signed request: {e}"))?;
        for san in &req.params.subject_alt_names {
            match san {
                SanType::URI(u) if u.as_str() == spiffe => {}
                other => return Err(format!("csr: asks for {other:?}, not {spiffe}")),
            }
        }
        let p = &mut req.params;
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(spiffe.as_str()).map_err(|e| e.to_string())?,
        )];
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            path.rsplit('/').next().unwrap_or(path),
        );
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::try_from(self.lifetime).unwrap_or(time::Duration::DAY);
        let not_after = p.not_after.unix_timestamp();
        let leaf = req.signed_by(&self.issuer).map_err(|e| e.to_string())?;
        Ok((format!("{}{}", leaf.pem(), self.issuer_pem), not_after))
    }
}

/// Whether `path` is an identity the CA issues: `gateway/<id>` or
/// `group/<g>/service/<svc>`, each a valid name.
pub fn valid_identity(path: &str) -> bool {
    let ok = meshgate_config::key::valid_name;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["gateway", id] => ok(id),
        ["group", g, "service", s] => ok(g) && ok(s),
        _ => false,
    }
}

fn issuer(st: &AdminState) -> Result<&Arc<MeshIssuer>, ApiError> {
    st.issuer.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_ca",
            "this admin has no mesh CA (configure `ca` in its config)",
        )
    })
}

/// `POST /api/v1/join-tokens` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// `gateway/<id>` or `group/<g>/service/<svc>`.
    pub identity: String,
    /// How long the token may be used to join, seconds (default 3600).
    #[serde(default = "default_token_ttl")]
    pub ttl_s: u64,
}

fn default_token_ttl() -> u64 {
    3600
}

/// Creates a join token; the answer holds the only copy of its secret.
pub async fn create_token(
    State(st): State<AdminState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    issuer(&st)?;
    let req: NewToken = decode_body(&body)?;
    if !valid_identity(&req.identity) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "must be gateway/<id> or group/<group>/service/<service>",
        )
        .field("identity"));
    }
    if !(60..=30 * 86_400).contains(&req.ttl_s) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "must be from 60 to 2592000 (30 days)",
        )
        .field("ttl_s"));
    }
    let name = hex(&rand::random::<[u8; 6]>());
    let secret = hex(&rand::random::<[u8; 32]>());
    let record = TokenRecord {
        identity: req.identity.clone(),
        sha256: hex(&digest(&secret)),
        expires_at_ms: now_ms() + req.ttl_s * 1000,
        created_at_ms: now_ms(),
        created_by: caller.map_or("anonymous".into(), |c| c.0.name),
    };
    let key = Key::new(Kind::JoinTokens, &name);
    let value = serde_json::to_vec(&record).expect("a token record encodes");
    let put = Op::Put {
        key: key.clone(),
        value,
        lease: None,
    };
    match st
        .store
        .txn(vec![Cond::Version { key, version: 0 }], vec![put])
        .await?
    {
        TxnOutcome::Committed { .. } => {}
        TxnOutcome::ConditionFailed => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "token name collision; try again",
            ))
        }
    }
    tracing::info!(token = %name, identity = %req.identity, "join token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": name,
            "token": format!("{name}.{secret}"),
            "identity": req.identity,
            "expires_at_ms": record.expires_at_ms,
        })),
    ))
}

/// Lists the join tokens (never their secrets or hashes).
pub async fn list_tokens(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    issuer(&st)?;
    let r = st.store.range(&Kind::JoinTokens.prefix()).await?;
    let items: Vec<Value> = r
        .entries
        .iter()
        .filter_map(|e| {
            let t: TokenRecord = serde_json::from_slice(&e.value).ok()?;
            Some(json!({
                "name": e.key.name,
                "identity": t.identity,
                "expires_at_ms": t.expires_at_ms,
                "created_at_ms": t.created_at_ms,
                "created_by": t.created_by,
            }))
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Revokes a join token (and, with the identity's last token, its
/// renewals).
pub async fn delete_token(
    State(st): State<AdminState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    issuer(&st)?;
    let key = Key::new(Kind::JoinTokens, &name);
    let del = Op::Delete { key: key.clone() };
    match st.store.txn(vec![Cond::Exists(key)], vec![del]).await? {
        TxnOutcome::Committed { .. } => {
            tracing::info!(token = %name, "join token deleted");
            Ok(Json(json!({ "deleted": name })))
        }
        TxnOutcome::ConditionFailed => Err(ApiError::not_found(format!("join token {name}"))),
    }
}

/// `POST /api/v1/identity` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// PEM certificate signing request, signed with the node's new key.
    pub csr: String,
}

fn refused(msg: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg.to_string())
}

/// Signs a node's CSR, for the identity its join token (`authorization:
/// JoinToken <token>`) names, or, with no token, for the identity of the
/// mesh certificate it presented on this TLS connection (a renewal).
pub async fn sign(
    State(st): State<AdminState>,
    headers: HeaderMap,
    peer: Option<axum::Extension<PeerChain>>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let ca = issuer(&st)?.clone();
    let req: SignRequest = decode_body(&body)?;
    let tokens = st.store.range(&Kind::JoinTokens.prefix()).await?;
    let records = tokens.entries.iter().filter_map(|e| {
        let t: TokenRecord = serde_json::from_slice(&e.value).ok()?;
        Some((e.key.name.as_str(), t))
    });
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("jointoken"))
        .map(|(_, t)| t.trim());
    let (path, how) = match (presented, peer) {
        (Some(token), _) => {
            let (name, secret) = token
                .split_once('.')
                .ok_or_else(|| refused("malformed join token"))?;
            let want = digest(secret);
            let found = records
                .filter(|(n, _)| *n == name)
                .find(|(_, t)| parse_digest(&t.sha256).is_some_and(|s| same_digest(&s, &want)))
                .map(|(_, t)| t)
                .ok_or_else(|| refused("unknown or revoked join token"))?;
            if found.expires_at_ms < now_ms() {
                return Err(refused("the join token has expired"));
            }
            (found.identity, format!("join token {name}"))
        }
        (None, Some(chain)) => {
            let leaf = chain.0 .0.first().ok_or_else(|| refused("no client certificate"))?;
            let info = meshgate_config::tls::describe(leaf)
                .map_err(|e| refused(&format!("client certificate: {e}")))?;
            let prefix = format!("spiffe://{}/", ca.trust_domain);
            let path = info
                .uris()
                .find_map(|u| u.strip_prefix(&prefix))
                .filter(|p| valid_identity(p))
                .ok_or_else(|| refused("the client certificate names no mesh identity"))?
                .to_string();
            // Renewals go on while the identity has a token record.
            let mut records = records;
            if !records.any(|(_, t)| t.identity == path) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("{path} has no join token any more: renewal refused"),
                ));
            }
            (path, "its certificate".to_string())
        }
        (None, None) => {
            return Err(refused(
                "send a join token (authorization: JoinToken <token>) or present the current mesh certificate",
            ))
        }
    };
    let (chain, not_after) = ca
        .sign(&req.csr, &path)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e).field("csr"))?;
    let bundle = ca.bundle().map_err(|e| {
        tracing::error!(error = %e, "mesh CA: the trust bundle cannot be read");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the trust bundle cannot be read; see the admin log",
        )
    })?;
    tracing::info!(identity = %path, by = %how, "mesh identity issued");
    Ok(Json(json!({
        "identity": format!("spiffe://{}/{path}", ca.trust_domain),
        "certificate": chain,
        "bundle": bundle,
        "not_after": meshgate_config::tls::rfc3339(not_after),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_the_ca_issues() {
        for (p, ok) in [
            ("gateway/gw-1", true),
            ("group/shop/service/orders", true),
            ("gateway/", false),
            ("gateway/a/b", false),
            ("group/shop/service/*", false),
            ("group/shop", false),
            ("service/orders", false),
        ] {
            assert_eq!(valid_identity(p), ok, "{p}");
        }
    }

    #[test]
    fn a_csr_is_signed_for_the_identity_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        crate::ca::init(
            &ca_dir,
            "mesh.test",
            Duration::from_secs(86_400),
            Duration::from_secs(86_400),
        )
        .unwrap();
        let ca = MeshIssuer::load(&ca_dir, Duration::from_secs(600)).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let (chain, not_after) = ca.sign(&csr, "group/shop/service/orders").unwrap();
        let certs = meshgate_config::tls::parse_chain(&chain).unwrap();
        assert_eq!(certs.len(), 2, "leaf and issuer");
        let info = meshgate_config::tls::describe(&certs[0]).unwrap();
        assert_eq!(
            info.uris().collect::<Vec<_>>(),
            ["spiffe://mesh.test/group/shop/service/orders"]
        );
        assert_eq!(info.not_after_unix, not_after);
        let now = meshgate_config::tls::now_unix();
        assert!((now + 500..=now + 700).contains(&not_after), "{not_after}");
        // The node's key, not another: the certificate and key pair up.
        let pem_key = meshgate_config::tls::parse_key(&key.serialize_pem()).unwrap();
        meshgate_config::tls::certified_key(certs, &pem_key).unwrap();
        // A CSR asking for another identity is refused, and garbage too.
        let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        other.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://mesh.test/gateway/gw-1").unwrap(),
        )];
        let csr = other.serialize_request(&key).unwrap().pem().unwrap();
        let e = ca.sign(&csr, "group/shop/service/orders").unwrap_err();
        assert!(
            e.contains("not spiffe://mesh.test/group/shop/service/orders"),
            "{e}"
        );
        assert!(ca.sign("garbage", "gateway/gw-1").is_err());
    }
}
