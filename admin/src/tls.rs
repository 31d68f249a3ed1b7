//! The admin API over TLS: the server's certificate from PEM files, the
//! accept loop that runs each handshake (bounded by a timeout, in the
//! connection's own task) before hyper serves the router, and the client
//! side for `meshctl` (`--cacert`, else the system's roots).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tower::ServiceExt;

/// A handshake not done in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server config of `cert_file` (PEM chain) and `key_file`: TLS 1.3
/// and 1.2, ALPN `h2` and `http/1.1`. With `client_roots` (the mesh's
/// trust bundle, when the admin is the mesh CA), a client may present a
/// certificate chaining to them (a node renewing its identity); others
/// connect without one. Errors name the file.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_roots: Option<rustls::RootCertStore>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use meshgate_config::tls::{certified_key, parse_chain, parse_key};
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("tls: {}: {e}", p.display()))
    };
    let chain = parse_chain(&read(cert_file)?)
        .map_err(|e| anyhow::anyhow!("tls.cert_file: {}: {e}", cert_file.display()))?;
    let key = parse_key(&read(key_file)?)
        .map_err(|e| anyhow::anyhow!("tls.key_file: {}: {e}", key_file.display()))?;
    let certified = certified_key(chain, &key)
        .map_err(|e| anyhow::anyhow!("tls.key_file: {}: {e}", key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(meshgate_config::tls::provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                meshgate_config::tls::provider(),
            )
            .allow_unauthenticated()
            .build()?,
        ),
    };
    let mut cfg =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then
/// lets the requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cfg: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            // A verified client certificate goes with each request.
            let peer = tls.get_ref().1.peer_certificates().map(|c| {
                crate::issuer::PeerChain(c.iter().map(|d| d.clone().into_owned()).collect())
            });
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                app.clone().oneshot(req)
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%remote, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline reached; closing remaining connections");
    }
    Ok(())
}

/// The client config `meshctl` calls the admin API with: the roots of
/// `ca_file` (PEM), else the system's.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let pem =
                std::fs::read_to_string(p).map_err(|e| format!("--cacert {}: {e}", p.display()))?;
            for c in meshgate_config::tls::parse_chain(&pem)
                .map_err(|e| format!("--cacert {}: {e}", p.display()))?
            {
                roots
                    .add(c)
                    .map_err(|e| format!("--cacert {}: {e}", p.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(meshgate_config::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
