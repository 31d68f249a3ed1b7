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
//! **Mesh identity** ([`MeshIdentity`]): a process's own certificate, a
//! SPIFFE ID in its URI SAN (`spiffe://<trust domain>/...`), and the
//! trust bundle of the mesh. Mesh hops are mutual TLS with it: a mesh
//! listener asks every client for a certificate that chains to the bundle
//! ([`MeshIdentity::server_config`]), and a client checks the server's
//! certificate the same way ([`MeshIdentity::client_tls`]). Mesh
//! certificates name workloads by URI, not by DNS names, so the check is
//! the chain and the trust domain, not a host name ([`SpiffeVerifier`]).
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
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Read at each handshake (a mesh listener's changes when its
    /// identity or trust bundle is renewed).
    pub config: Arc<ArcSwap<ServerConfig>>,
    /// A handshake not done in this time is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes by listener and result (`ok`, `failed`, `timeout`, and
    /// `plaintext` for a plaintext client a permissive listener took).
    pub handshakes: prometheus::IntCounterVec,
    /// Take plaintext clients too (a connection that does not start with
    /// a TLS handshake record is served as it is); read at each accept
    /// (a sidecar's inbound follows its service's `mtls`).
    pub plaintext_too: Arc<std::sync::atomic::AtomicBool>,
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
    /// The SPIFFE ID of the client's certificate (mesh listeners, which
    /// verified it).
    pub peer_identity: Option<SpiffeId>,
    /// A sidecar identity's service as a header value (`x-mesh-source`),
    /// made once per connection rather than per request.
    pub peer_service: Option<http::HeaderValue>,
    /// The identity as a header value (`x-mesh-caller`), likewise.
    pub peer_caller: Option<http::HeaderValue>,
}

impl TlsInfo {
    pub fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        let peer_identity = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| SpiffeId::of_cert(leaf));
        let peer_service = peer_identity
            .as_ref()
            .and_then(|id| id.service())
            .and_then(|svc| http::HeaderValue::from_str(svc).ok());
        let peer_caller = peer_identity
            .as_ref()
            .and_then(|id| http::HeaderValue::from_str(&id.uri).ok());
        TlsInfo {
            sni: conn.server_name().map(str::to_string),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            peer_identity,
            peer_service,
            peer_caller,
        }
    }
}

/// A workload's identity: `spiffe://<trust domain>/<path>`. Meshgate's
/// paths: `group/<g>/service/<svc>` for a sidecar, `gateway/<id>` for a
/// gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    pub uri: String,
    /// Where the path starts in `uri`.
    path_at: usize,
}

impl SpiffeId {
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (domain, _) = rest.split_once('/')?;
        if domain.is_empty() {
            return None;
        }
        Some(SpiffeId {
            uri: uri.to_string(),
            path_at: "spiffe://".len() + domain.len() + 1,
        })
    }

    /// The first SPIFFE URI SAN of a certificate.
    pub fn of_cert(der: &[u8]) -> Option<SpiffeId> {
        let info = meshgate_config::tls::describe(der).ok()?;
        let id = info.uris().find_map(SpiffeId::parse);
        id
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.path_at - 1]
    }

    pub fn path(&self) -> &str {
        &self.uri[self.path_at..]
    }

    /// The service of a sidecar identity (`group/<g>/service/<svc>`).
    pub fn service(&self) -> Option<&str> {
        let mut parts = self.path().split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("group"), Some(_), Some("service"), Some(svc), None) => Some(svc),
            _ => None,
        }
    }

    /// Whether this is a gateway's identity (`gateway/<id>`).
    pub fn is_gateway(&self) -> bool {
        self.path().starts_with("gateway/")
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

/// A process's mesh identity and the mesh's trust bundle.
pub struct MeshIdentity {
    key: Arc<CertifiedKey>,
    pub id: SpiffeId,
    roots: Arc<rustls::RootCertStore>,
    /// When the certificate expires (Unix seconds).
    pub not_after: i64,
    /// When it became valid (Unix seconds).
    pub not_before: i64,
}

impl std::fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("id", &self.id)
            .finish()
    }
}

impl MeshIdentity {
    /// From PEM texts: the process's chain and key, and the trust bundle
    /// (the roots of the mesh). The leaf must carry a SPIFFE ID.
    pub fn new(chain: &str, key: &str, bundle: &str) -> Result<MeshIdentity, String> {
        use meshgate_config::tls::{certified_key, describe, parse_chain, parse_key};
        let chain = parse_chain(chain).map_err(|e| format!("certificate: {e}"))?;
        let info = describe(&chain[0]).map_err(|e| format!("certificate: {e}"))?;
        let id = info
            .uris()
            .find_map(SpiffeId::parse)
            .ok_or("certificate: no spiffe:// URI SAN (the mesh identity)")?;
        let key = certified_key(chain, &parse_key(key).map_err(|e| format!("key: {e}"))?)
            .map_err(|e| format!("key: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in
            meshgate_config::tls::parse_chain(bundle).map_err(|e| format!("trust bundle: {e}"))?
        {
            roots.add(c).map_err(|e| format!("trust bundle: {e}"))?;
        }
        Ok(MeshIdentity {
            key: Arc::new(key),
            id,
            roots: Arc::new(roots),
            not_after: info.not_after_unix,
            not_before: info.not_before_unix,
        })
    }

    /// The certificate and key, for presenting this identity as a TLS
    /// client elsewhere (to the admin API, renewing it).
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.key.clone()
    }

    /// A mesh listener's config: this identity's certificate, every client
    /// asked for one that chains to the bundle (`optional`: a client may
    /// also come without, for `permissive` listeners), ALPN `h2` and
    /// `http/1.1`.
    pub fn server_config(&self, optional: bool) -> Result<Arc<ServerConfig>, String> {
        let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            meshgate_config::tls::provider(),
        );
        if optional {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier.build().map_err(|e| e.to_string())?;
        let mut cfg = ServerConfig::builder_with_provider(meshgate_config::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                (*self.key).clone(),
            )));
        cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// The client side of a mesh hop: this identity's certificate offered,
    /// the server's checked by [`SpiffeVerifier`] (chain to the bundle, a
    /// SPIFFE ID in the trust domain, of service `expect` when given),
    /// `alpn` offered.
    pub fn client_tls(&self, alpn: &[&[u8]], expect: Option<&str>) -> Result<ClientTls, String> {
        let config = self.client_config(alpn, expect)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ("mesh", &self.id.uri, alpn, expect).hash(&mut h);
        Ok(ClientTls {
            config: ArcSwap::from_pointee(config),
            // Mesh certificates carry no host names: the verifier ignores
            // the name, so any valid one does.
            server_name: Some(ServerName::try_from("mesh.invalid").expect("a valid name")),
            id: h.finish(),
        })
    }

    fn client_config(
        &self,
        alpn: &[&[u8]],
        expect: Option<&str>,
    ) -> Result<rustls::ClientConfig, String> {
        let mut verifier = SpiffeVerifier::new(self.roots.clone(), self.id.trust_domain())?;
        verifier.expect_service = expect.map(str::to_string);
        let mut config =
            rustls::ClientConfig::builder_with_provider(meshgate_config::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    (*self.key).clone(),
                )));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// A mesh identity that can be replaced while the process runs (a
/// renewed certificate, a rotated trust bundle): the mesh listener's
/// config and every mesh client config made from it follow. New
/// handshakes use the new identity; open and pooled connections keep the
/// one they were made with.
pub struct LiveIdentity {
    current: ArcSwap<MeshIdentity>,
    /// The mesh listener's config, and whether it also takes clients
    /// without a certificate (shared with its [`TlsListener`]).
    server: Option<(Arc<ArcSwap<ServerConfig>>, Arc<AtomicBool>)>,
    /// The client configs handed out, one per ALPN and expected service.
    clients: std::sync::Mutex<Vec<IssuedClient>>,
}

/// A client config [`LiveIdentity`] handed out, with the ALPN it offers
/// and the service it expects the server to be.
type IssuedClient = (Vec<Vec<u8>>, Option<String>, Arc<ClientTls>);

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("id", &self.current.load().id)
            .finish()
    }
}

impl LiveIdentity {
    /// `listener`: serve a mesh listener with it (`Some(permissive)`).
    pub fn new(id: MeshIdentity, listener: Option<bool>) -> Result<LiveIdentity, String> {
        let server = match listener {
            Some(permissive) => Some((
                Arc::new(ArcSwap::new(id.server_config(permissive)?)),
                Arc::new(AtomicBool::new(permissive)),
            )),
            None => None,
        };
        Ok(LiveIdentity {
            current: ArcSwap::from_pointee(id),
            server,
            clients: Default::default(),
        })
    }

    pub fn current(&self) -> Arc<MeshIdentity> {
        self.current.load_full()
    }

    /// The mesh listener's settings (when made with one): the config
    /// read at each handshake and whether plaintext clients are taken,
    /// both following [`LiveIdentity::replace`] and
    /// [`LiveIdentity::set_permissive`].
    pub fn listener(
        &self,
        handshake_timeout: Duration,
        handshakes: prometheus::IntCounterVec,
    ) -> Option<TlsListener> {
        let (config, permissive) = self.server.as_ref()?;
        Some(TlsListener {
            config: config.clone(),
            handshake_timeout,
            handshakes,
            plaintext_too: permissive.clone(),
        })
    }

    /// Switches the mesh listener between taking only clients with a
    /// mesh certificate and taking clients without one (or in plaintext)
    /// too, from the next connection on.
    pub fn set_permissive(&self, permissive: bool) -> Result<(), String> {
        let Some((config, flag)) = &self.server else {
            return Ok(());
        };
        if flag.load(Ordering::Acquire) == permissive {
            return Ok(());
        }
        config.store(self.current().server_config(permissive)?);
        flag.store(permissive, Ordering::Release);
        Ok(())
    }

    /// A client config offering `alpn` (and expecting a server of service
    /// `expect`, when given), kept current. One per distinct pair: asking
    /// again returns the same one, so pooled connections are shared.
    pub fn client_tls(
        &self,
        alpn: &[&[u8]],
        expect: Option<&str>,
    ) -> Result<Arc<ClientTls>, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let same = |(a, e, _): &&IssuedClient| {
            e.as_deref() == expect && a.iter().map(Vec::as_slice).eq(alpn.iter().copied())
        };
        if let Some((_, _, tls)) = clients.iter().find(same) {
            return Ok(tls.clone());
        }
        let tls = Arc::new(self.current().client_tls(alpn, expect)?);
        let alpn = alpn.iter().map(|p| p.to_vec()).collect();
        clients.push((alpn, expect.map(str::to_string), tls.clone()));
        Ok(tls)
    }

    /// Puts `id` in force: every config is made anew first, so a problem
    /// leaves the current identity whole. The new identity must be the
    /// same workload (the same SPIFFE ID).
    pub fn replace(&self, id: MeshIdentity) -> Result<(), String> {
        let old = self.current();
        if id.id != old.id {
            return Err(format!(
                "the new certificate names {}, not {}",
                id.id, old.id
            ));
        }
        let server = match &self.server {
            Some((_, permissive)) => Some(id.server_config(permissive.load(Ordering::Acquire))?),
            None => None,
        };
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut configs = Vec::with_capacity(clients.len());
        for (alpn, expect, _) in clients.iter() {
            let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
            configs.push(id.client_config(&alpn, expect.as_deref())?);
        }
        if let (Some((slot, _)), Some(cfg)) = (&self.server, server) {
            slot.store(cfg);
        }
        for ((_, _, tls), cfg) in clients.iter().zip(configs) {
            tls.config.store(Arc::new(cfg));
        }
        self.current.store(Arc::new(id));
        Ok(())
    }
}

/// The handshake-signature checks of a `ServerCertVerifier`: the crypto
/// provider's, for verifiers that differ only in how they judge the
/// certificate.
macro_rules! handshake_signatures {
    ($self:ident . $($provider:tt)+) => {
        fn verify_tls12_signature(
            &$self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &$self.$($provider)+.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &$self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &$self.$($provider)+.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&$self) -> Vec<rustls::SignatureScheme> {
            $self.$($provider)+.signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Checks a mesh server's certificate: it chains to the trust bundle (as
/// a client certificate would: no host name in mesh certificates) and
/// names a SPIFFE ID in the trust domain (of the expected service, when
/// one is: a gateway calling a service's instance checks that it is one).
#[derive(Debug)]
pub struct SpiffeVerifier {
    chain: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    trust_domain: String,
    /// The service the server must be (`group/<any>/service/<this>`).
    pub expect_service: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl SpiffeVerifier {
    pub fn new(
        roots: Arc<rustls::RootCertStore>,
        trust_domain: &str,
    ) -> Result<SpiffeVerifier, String> {
        let provider = meshgate_config::tls::provider();
        let chain =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        Ok(SpiffeVerifier {
            chain,
            trust_domain: trust_domain.to_string(),
            expect_service: None,
            provider,
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        match SpiffeId::of_cert(end_entity) {
            Some(id) if id.trust_domain() != self.trust_domain => {
                Err(rustls::Error::General(format!(
                    "peer identity {id} is outside the trust domain {}",
                    self.trust_domain
                )))
            }
            Some(id) => match &self.expect_service {
                Some(svc) if id.service() != Some(svc) => Err(rustls::Error::General(format!(
                    "peer identity {id} is not an instance of service {svc}"
                ))),
                _ => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            },
            None => Err(rustls::Error::General(
                "peer certificate carries no spiffe:// identity".into(),
            )),
        }
    }

    handshake_signatures!(self.provider);
}

/// How to reach a service's endpoints over TLS (its `tls` settings, ready
/// to connect with). Endpoints are kept apart by [`ClientTls::id`]: two
/// services that reach one address with different settings never share a
/// pooled connection.
pub struct ClientTls {
    /// Read at each connect (a mesh identity's is replaced when renewed;
    /// pooled connections keep the one they were made with).
    config: ArcSwap<rustls::ClientConfig>,
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
            config: ArcSwap::from_pointee(config),
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
        tokio_rustls::TlsConnector::from(self.config.load_full())
            .connect(name, tcp)
            .await
    }
}

/// The system's trust roots (read once; unreadable ones are logged).
pub(crate) fn system_roots() -> Arc<rustls::RootCertStore> {
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

    handshake_signatures!(self.0);
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
