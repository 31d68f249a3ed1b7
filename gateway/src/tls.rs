//! TLS for the engine's sockets (rustls with the `ring` provider): the
//! certificates a TLS listener serves and how one is chosen by SNI
//! ([`CertTable`], read at every handshake through [`CertResolver`], so a
//! certificate changed in the config is served by the next handshake and
//! connections already open keep theirs), the listener's server config
//! ([`server_config`]), what a handshake tells about the connection
//! ([`TlsInfo`]), and the client side of upstream TLS ([`ClientTls`]: a
//! service's `tls` settings made into a rustls client config, and the
//! handshake over a connected socket).
//!
//! **Choosing a certificate.** By the client's SNI: a leaf whose DNS names
//! include it exactly, else one with the wildcard of its parent domain
//! (`*.example.com` covers `a.example.com`, not `a.b.example.com`), else
//! the listener's configured default. When several certificates cover a
//! name, the one valid longest wins (so a renewed certificate put beside
//! the old one takes over at once, and the old can be deleted later).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_config::model::UpstreamTls;
use meshgate_config::tls::CertInfo;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;

/// One certificate a TLS listener may serve.
#[derive(Debug)]
pub struct ServedCert {
    /// The `certs/` object's name.
    pub name: String,
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl ServedCert {
    /// Parses and checks a `certs/` object's certificate and key (as the
    /// config's validation does).
    pub fn new(name: &str, certificate: &str, private_key: &str) -> Result<ServedCert, String> {
        use meshgate_config::tls::{certified_key, describe, parse_chain, parse_key};
        let chain = parse_chain(certificate)?;
        let info = describe(&chain[0])?;
        let key = certified_key(chain, &parse_key(private_key)?)?;
        Ok(ServedCert {
            name: name.to_string(),
            key: Arc::new(key),
            info,
        })
    }
}

/// The certificates of the applied config, indexed by the names they
/// cover. Immutable: a change builds a new table.
#[derive(Debug, Default, Clone)]
pub struct CertTable {
    by_name: HashMap<String, Arc<ServedCert>>,
    exact: HashMap<String, Arc<ServedCert>>,
    /// By the domain a wildcard covers the children of (`example.com` for
    /// `*.example.com`).
    wildcard: HashMap<String, Arc<ServedCert>>,
}

impl CertTable {
    /// This table with `name` replaced by `cert` (or removed).
    pub fn with(&self, name: &str, cert: Option<ServedCert>) -> CertTable {
        let mut by_name = self.by_name.clone();
        match cert {
            Some(c) => by_name.insert(name.to_string(), Arc::new(c)),
            None => by_name.remove(name),
        };
        let mut exact: HashMap<String, Arc<ServedCert>> = HashMap::new();
        let mut wildcard: HashMap<String, Arc<ServedCert>> = HashMap::new();
        for c in by_name.values() {
            for dns in c.info.dns_names() {
                let (index, host) = match dns.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, dns),
                };
                let slot = index.entry(host.to_string()).or_insert_with(|| c.clone());
                if prefer(c, slot) {
                    *slot = c.clone();
                }
            }
        }
        CertTable {
            by_name,
            exact,
            wildcard,
        }
    }

    /// The certificate for a client that sent `sni`: exact, then
    /// wildcard, then `default` (a name in the table).
    pub fn select(&self, sni: Option<&str>, default: Option<&str>) -> Option<&Arc<ServedCert>> {
        let by_sni = sni.and_then(|host| {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&host).or_else(|| {
                let (_, parent) = host.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        by_sni.or_else(|| self.by_name.get(default?))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ServedCert>> {
        self.by_name.get(name)
    }

    /// Every certificate, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedCert>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// `a` over `b` for a name both cover: valid longer, then the name first
/// in order (so the choice does not depend on map order).
fn prefer(a: &ServedCert, b: &ServedCert) -> bool {
    (a.info.not_after_unix, std::cmp::Reverse(&a.name))
        > (b.info.not_after_unix, std::cmp::Reverse(&b.name))
}

/// The applied certificates, swapped whole on every change.
pub type SharedCerts = Arc<ArcSwap<CertTable>>;

/// rustls's hook: picks each handshake's certificate from the current
/// table.
#[derive(Debug)]
pub struct CertResolver {
    pub certs: SharedCerts,
    /// The `certs/` object served when no SNI matches.
    pub default: Option<String>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.certs.load();
        let chosen = table.select(hello.server_name(), self.default.as_deref());
        if chosen.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for this name and no default");
        }
        chosen.map(|c| c.key.clone())
    }
}

/// The ALPN protocols a TLS listener offers, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A TLS listener's config: TLS 1.3 and 1.2, certificates from
/// `resolver`, ALPN `h2` and `http/1.1`, session resumption by tickets
/// and by a session cache.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(meshgate_config::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    match rustls::crypto::ring::Ticketer::new() {
        Ok(t) => cfg.ticketer = t,
        Err(e) => tracing::warn!(error = %e, "TLS session tickets unavailable"),
    }
    Arc::new(cfg)
}

/// A TLS listener's settings.
#[derive(Clone)]
pub struct TlsListener {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// A handshake not done in this time is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes by listener and result (`ok`, `failed`, `timeout`).
    pub handshakes: prometheus::IntCounterVec,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// Default [`TlsListener::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handshake of a client connection settled.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// The protocol agreed by ALPN.
    pub alpn: Option<Vec<u8>>,
}

impl TlsInfo {
    pub fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        TlsInfo {
            sni: conn.server_name().map(str::to_string),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        }
    }
}

/// How to reach a service's endpoints over TLS (its `tls` settings, ready
/// to connect with). Endpoints are kept apart by [`ClientTls::id`]: two
/// services that reach one address with different settings never share a
/// pooled connection.
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// The name to ask for and verify; `None`: the endpoint's host.
    server_name: Option<ServerName<'static>>,
    /// A digest of the settings and the ALPN offered.
    pub id: u64,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("id", &self.id)
            .finish()
    }
}

impl ClientTls {
    /// A client config for `spec` offering `alpn` (e.g. `h2`). The CA is
    /// parsed here (validation has checked it); the system's roots are
    /// read once per process.
    pub fn new(spec: &UpstreamTls, alpn: &[&[u8]]) -> Result<ClientTls, String> {
        let builder = rustls::ClientConfig::builder_with_provider(meshgate_config::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match (spec.verify, &spec.ca) {
            (false, _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(
                    meshgate_config::tls::provider(),
                ))),
            (true, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in meshgate_config::tls::parse_chain(ca)? {
                    roots.add(c).map_err(|e| format!("tls.ca: {e}"))?;
                }
                builder.with_root_certificates(roots)
            }
            (true, None) => builder.with_root_certificates(system_roots()),
        };
        let mut config = builder.with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let server_name = match &spec.sni {
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| format!("tls.sni: {e}"))?),
            None => None,
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (spec, alpn).hash(&mut h);
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
            id: h.finish(),
        })
    }

    /// The TLS handshake over `tcp`, connected to `address` (`host:port`,
    /// whose host is the name verified unless `sni` is set).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        address: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let host = address
                    .rsplit_once(':')
                    .map_or(address, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                ServerName::try_from(host.to_string()).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("TLS server name {host:?}: {e}"),
                    )
                })?
            }
        };
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

/// The system's trust roots (read once; unreadable ones are logged).
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's TLS roots");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system TLS roots loaded");
            Arc::new(roots)
        })
        .clone()
}

/// `verify: false`: any certificate is accepted (handshake signatures are
/// still checked, so the peer holds the key of what it sent).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `names` expiring at `not_after`, and
    /// its key, as PEM.
    pub(crate) fn pem(names: &[&str], not_after: i64) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn served(name: &str, names: &[&str], not_after: i64) -> ServedCert {
        let (c, k) = pem(names, not_after);
        ServedCert::new(name, &c, &k).unwrap()
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let later = meshgate_config::tls::now_unix() + 86_400;
        let t = CertTable::default()
            .with(
                "apex",
                Some(served("apex", &["example.com", "api.example.com"], later)),
            )
            .with("wild", Some(served("wild", &["*.example.com"], later)))
            .with(
                "fallback",
                Some(served("fallback", &["fallback.test"], later)),
            );
        let pick = |sni: Option<&str>, default: Option<&str>| {
            t.select(sni, default).map(|c| c.name.as_str())
        };
        assert_eq!(pick(Some("api.example.com"), None), Some("apex"));
        assert_eq!(
            pick(Some("API.Example.COM."), None),
            Some("apex"),
            "case and a trailing dot"
        );
        assert_eq!(pick(Some("www.example.com"), None), Some("wild"));
        assert_eq!(pick(Some("a.b.example.com"), None), None, "one label only");
        assert_eq!(pick(Some("other.test"), Some("fallback")), Some("fallback"));
        assert_eq!(pick(None, Some("fallback")), Some("fallback"));
        assert_eq!(pick(None, Some("missing")), None);
        let t = t.with("apex", None);
        assert_eq!(
            t.select(Some("api.example.com"), None)
                .map(|c| c.name.as_str()),
            Some("wild"),
            "a removed certificate leaves the indexes"
        );
    }

    #[test]
    fn the_certificate_valid_longest_wins_a_shared_name() {
        let now = meshgate_config::tls::now_unix();
        let t = CertTable::default()
            .with("old", Some(served("old", &["example.com"], now + 3600)))
            .with("new", Some(served("new", &["example.com"], now + 86_400)));
        assert_eq!(t.select(Some("example.com"), None).unwrap().name, "new");
        let t = t.with("new", None);
        assert_eq!(t.select(Some("example.com"), None).unwrap().name, "old");
    }
}
