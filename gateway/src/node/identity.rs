//! Identities issued by the admin's mesh CA (`mesh_tls.issuer`): the node
//! generates its key pair (the private key never leaves it), sends a CSR
//! with its join token the first time, and renews at half of the
//! certificate's lifetime authenticated by the certificate itself. What it
//! gets is written to `mesh_tls`'s files (key mode 0600), which
//! [`MeshTlsSettings::follow`] puts in force: those files, beside the
//! snapshot, are what a process restarted while etcd and the admin are
//! down comes back with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use super::MeshTlsSettings;
use crate::tls::{LiveIdentity, MeshIdentity};

/// Where a node obtains its identity (`mesh_tls.issuer`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// The admin API that issues identities, `https://host:port`.
    pub admin: String,
    /// PEM roots that verify the admin API's certificate (default: the
    /// system's roots).
    #[serde(default)]
    pub admin_ca_file: Option<PathBuf>,
    /// The join token (`meshctl token create`), for the first issuance and
    /// for a certificate that expired while the node was away.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl IssuerSettings {
    pub fn problems(&self) -> Vec<(String, String)> {
        match self.admin.parse::<Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Vec::new(),
            _ => vec![(
                "mesh_tls.issuer.admin".into(),
                "must be an https:// URL (tokens and certificates do not cross the network in plaintext)".into(),
            )],
        }
    }
}

/// A certificate the admin issued, with the key it was issued for.
struct Issued {
    key_pem: String,
    chain_pem: String,
    bundle_pem: String,
}

/// Makes sure the files of `settings` hold an identity for `expect`
/// (`gateway/<id>` or `group/<g>/service/<svc>`): those already there are
/// used as they are (a restart, perhaps during an outage); otherwise, or
/// when they expired, one is issued with the join token. A node with no
/// identity at all and no way to get one fails to start, saying why.
pub async fn ensure(settings: &MeshTlsSettings, expect: &str) -> anyhow::Result<()> {
    let Some(issuer) = &settings.issuer else {
        return Ok(());
    };
    let current = settings.load();
    if let Ok(id) = &current {
        if id.id.path() != expect {
            anyhow::bail!(
                "mesh_tls.cert_file: names {}, but this node is {expect}",
                id.id
            );
        }
        if id.not_after > meshgate_config::tls::now_unix() {
            return Ok(());
        }
    }
    match issue(settings, issuer, expect, None).await {
        Ok(not_after) => {
            tracing::info!(identity = %expect, not_after = %meshgate_config::tls::rfc3339(not_after), "mesh identity issued");
            Ok(())
        }
        // An expired identity still starts the node; renewal keeps trying.
        Err(e) if current.is_ok() => {
            tracing::warn!(error = %e, "mesh identity expired and could not be renewed yet");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("mesh_tls.issuer: {e}")),
    }
}

/// Renews the identity at half of its lifetime, for as long as the
/// process runs; a failed renewal is retried (every tenth of the time
/// left, between 1 and 30 seconds) while the current certificate serves.
pub async fn keep_renewed(settings: MeshTlsSettings, live: Arc<LiveIdentity>) {
    let Some(issuer) = settings.issuer.clone() else {
        return;
    };
    let expect = live.current().id.path().to_string();
    let mut due = renewal_due(&live.current());
    loop {
        let now = meshgate_config::tls::now_unix();
        if due > now {
            tokio::time::sleep(Duration::from_secs((due - now) as u64)).await;
        }
        let current = live.current();
        let usable = current.not_after > meshgate_config::tls::now_unix();
        match issue(&settings, &issuer, &expect, usable.then_some(&*current)).await {
            Ok(not_after) => {
                tracing::info!(identity = %current.id, not_after = %meshgate_config::tls::rfc3339(not_after), "mesh identity renewed by the admin");
                let now = meshgate_config::tls::now_unix();
                due = now + (not_after - now) / 2;
            }
            Err(e) => {
                let left = current.not_after - meshgate_config::tls::now_unix();
                let retry = (left / 10).clamp(1, 30);
                tracing::warn!(error = %e, retry_in_s = retry, expires_in_s = left, "mesh identity renewal failed");
                due = meshgate_config::tls::now_unix() + retry;
            }
        }
    }
}

/// When an identity is due for renewal: half-way through its lifetime.
fn renewal_due(id: &MeshIdentity) -> i64 {
    id.not_before + (id.not_after - id.not_before) / 2
}

/// Asks the admin for a certificate for a new key: authenticated by
/// `current` (a renewal) or else by the join token. Writes the files and
/// returns the new certificate's expiry.
async fn issue(
    settings: &MeshTlsSettings,
    issuer: &IssuerSettings,
    expect: &str,
    current: Option<&MeshIdentity>,
) -> Result<i64, String> {
    let token = match (current, &issuer.token_file) {
        (Some(_), _) => None,
        (None, Some(p)) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("token_file: {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => {
            return Err("no usable certificate and no token_file to obtain one".into());
        }
    };
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())?;
    let body = serde_json::json!({ "csr": csr }).to_string();
    let (status, answer) = post(issuer, current, token.as_deref(), body).await?;
    let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    if status != StatusCode::OK {
        let msg = v["message"].as_str().unwrap_or("no message");
        return Err(format!("the admin refused: {status}: {msg}"));
    }
    let field = |name: &str| {
        v[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("the admin's answer has no {name}"))
    };
    let issued = Issued {
        key_pem: key.serialize_pem(),
        chain_pem: field("certificate")?,
        bundle_pem: field("bundle")?,
    };
    // Check it all before anything is written: the identity is this
    // node's, and the files will load.
    let id = MeshIdentity::new(&issued.chain_pem, &issued.key_pem, &issued.bundle_pem)?;
    if id.id.path() != expect {
        return Err(format!(
            "the admin issued {}, but this node is {expect}",
            id.id
        ));
    }
    write(settings, &issued)?;
    Ok(id.not_after)
}

/// Writes the key (mode 0600), the chain and the bundle, each whole (a
/// temporary file renamed over the old one), the key first.
fn write(settings: &MeshTlsSettings, issued: &Issued) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let put = |path: &Path, text: &str, mode: u32| -> Result<(), String> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    };
    put(&settings.key_file, &issued.key_pem, 0o600)?;
    put(&settings.cert_file, &issued.chain_pem, 0o644)?;
    put(&settings.ca_file, &issued.bundle_pem, 0o644)
}

/// `POST /api/v1/identity` over TLS: the answer's status and body.
async fn post(
    issuer: &IssuerSettings,
    current: Option<&MeshIdentity>,
    token: Option<&str>,
    body: String,
) -> Result<(StatusCode, bytes::Bytes), String> {
    let base: Uri = issuer.admin.parse().map_err(|e| format!("admin: {e}"))?;
    let host = base.host().ok_or("admin: no host")?.to_string();
    let port = base.port_u16().unwrap_or(443);
    let roots = match &issuer.admin_ca_file {
        Some(p) => {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| format!("admin_ca_file: {}: {e}", p.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in meshgate_config::tls::parse_chain(&pem)
                .map_err(|e| format!("admin_ca_file: {e}"))?
            {
                roots.add(c).map_err(|e| format!("admin_ca_file: {e}"))?;
            }
            Arc::new(roots)
        }
        None => crate::tls::system_roots(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(meshgate_config::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match current {
        Some(id) => builder.with_client_cert_resolver(Arc::new(
            rustls::sign::SingleCertAndKey::from((*id.certified_key()).clone()),
        )),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", issuer.admin))?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .map_err(|e| format!("admin: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {}: {e}", issuer.admin))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/identity")
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("JoinToken {t}"));
        }
        let req = req
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{}: {e}", issuer.admin))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{}: no answer within 10 s", issuer.admin))?
}
