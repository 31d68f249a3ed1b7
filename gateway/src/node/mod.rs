//! A Meshgate process: what the gateway and the sidecar share at their
//! edges, and the gateway process itself.
//!
//! - [`Process`]: the skeleton both run on: listeners bound first (a port
//!   conflict fails start-up naming the config field), every listener and
//!   the ops port served from when the process serves (its config
//!   applied) until shutdown, then the ordered stop: the process's own
//!   steps (readiness down, deregistration) alongside the drain delay
//!   (listeners still accepting), then every listener stops accepting
//!   and drains within the grace time; or, when a successor took over,
//!   the drain at once
//! - [`gateway`]: the gateway process (node config, store, sync, data
//!   plane, registration)
//! - [`ops`]: the ops port (`/healthz`, `/readyz`, `/metrics`, `/config`,
//!   `/explain`)
//! - [`explain`]: which route a request would match, and why not the others
//! - [`identity`]: identities issued by the admin's mesh CA (obtained
//!   with a join token, renewed at half-life, kept in the `mesh_tls`
//!   files)
//! - `peers`: the live gateways that share a `cluster` rate limit
//! - [`upgrade`]: hot upgrade (a new binary takes over the listening
//!   sockets over the upgrade socket)

pub mod explain;
pub mod gateway;
pub mod identity;
pub mod ops;
pub(crate) mod peers;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::server::listeners::Listener;
use http::{Request, Response};
use meshgate_config::model::Rejection;
use meshgate_config::sync::{Source, SyncStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::body::{ProxyBody, RequestBody};
use crate::server::{self, Peer};
use crate::snapshot::Rejections;

/// Binds `addr` for the node-config field `field` (or takes the socket
/// inherited from the predecessor of a hot upgrade).
pub async fn bind(addr: SocketAddr, field: &str) -> anyhow::Result<Listener> {
    server::listeners::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{field}: cannot bind {addr}: {e}"))
}

/// The limits of client connections in a gateway's or sidecar's node
/// config (`client:`), for every listener of the process.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSettings {
    /// Largest request head, bytes (431 beyond).
    pub max_request_head_bytes: usize,
    /// A client that takes no byte of an answer for this long is cut off.
    pub write_timeout_ms: u64,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            max_request_head_bytes: server::DEFAULT_MAX_HEAD,
            write_timeout_ms: server::DEFAULT_WRITE_TIMEOUT.as_millis() as u64,
        }
    }
}

impl ClientSettings {
    /// Largest `max_request_head_bytes` accepted.
    pub const MAX_HEAD_CEILING: usize = 1024 * 1024;

    /// The problems of these settings, with their field paths.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let head = server::MIN_MAX_HEAD..=Self::MAX_HEAD_CEILING;
        if !head.contains(&self.max_request_head_bytes) {
            p.push((
                "client.max_request_head_bytes".into(),
                format!("must be from {} to {}", head.start(), head.end()),
            ));
        }
        if self.write_timeout_ms == 0 {
            p.push((
                "client.write_timeout_ms".into(),
                "must be at least 1".into(),
            ));
        }
        p
    }

    pub fn limits(&self) -> server::Limits {
        server::Limits {
            max_head: self.max_request_head_bytes,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            ..server::Limits::default()
        }
    }
}

/// A process's mesh identity in its node config (`mesh_tls:`): mutual
/// TLS on the mesh's hops.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshTlsSettings {
    /// PEM chain whose leaf names the process by a `spiffe://` URI SAN.
    pub cert_file: std::path::PathBuf,
    /// Its private key (PEM; keep it mode 0600).
    pub key_file: std::path::PathBuf,
    /// The mesh's trust bundle: PEM roots every peer must chain to.
    pub ca_file: std::path::PathBuf,
    /// A gateway's mesh listener: `strict` (every client presents a mesh
    /// certificate) or `permissive` (plaintext clients too, counted; for a
    /// migration). Default `strict`.
    #[serde(default)]
    pub mode: MtlsMode,
    /// How often the files are checked for a renewed certificate or trust
    /// bundle, ms (default 1000).
    #[serde(default = "default_reload_interval")]
    pub reload_interval_ms: u64,
    /// Obtain and renew the identity from the admin's mesh CA, keeping it
    /// in the three files above (put them beside the snapshot file);
    /// without, the files are managed by the operator.
    #[serde(default)]
    pub issuer: Option<identity::IssuerSettings>,
}

fn default_reload_interval() -> u64 {
    1000
}

/// Whether a mesh listener also takes plaintext clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
}

impl MeshTlsSettings {
    /// Reads the files; each error names its field.
    pub fn load(&self) -> anyhow::Result<crate::tls::MeshIdentity> {
        let read = |p: &std::path::Path, field: &str| {
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("mesh_tls.{field}: {}: {e}", p.display()))
        };
        let cert = read(&self.cert_file, "cert_file")?;
        let key = read(&self.key_file, "key_file")?;
        let bundle = read(&self.ca_file, "ca_file")?;
        crate::tls::MeshIdentity::new(&cert, &key, &bundle).map_err(|e| {
            let field = match e.split_once(':').map(|(f, _)| f) {
                Some("key") => "key_file",
                Some("trust bundle") => "ca_file",
                _ => "cert_file",
            };
            anyhow::anyhow!("mesh_tls.{field}: {e}")
        })
    }

    /// The identity of the node `expect` (`gateway/<id>` or
    /// `group/<g>/service/<svc>`), ready to be replaced as its files
    /// change, with the config of a mesh listener when `serve`; obtained
    /// from the admin first when `issuer` says so and the files hold none
    /// (and renewed from then on).
    pub async fn start(
        &self,
        expect: &str,
        serve: bool,
        expiry: prometheus::IntGauge,
    ) -> anyhow::Result<Arc<crate::tls::LiveIdentity>> {
        identity::ensure(self, expect).await?;
        let live = self.live(serve)?;
        expiry.set(live.current().not_after);
        tokio::spawn(self.clone().follow(live.clone(), expiry));
        if self.issuer.is_some() {
            tokio::spawn(identity::keep_renewed(self.clone(), live.clone()));
        }
        Ok(live)
    }

    /// The identity, ready to be replaced as its files change; with the
    /// config of a mesh listener when `serve`.
    pub fn live(&self, serve: bool) -> anyhow::Result<Arc<crate::tls::LiveIdentity>> {
        let listener = serve.then_some(self.mode == MtlsMode::Permissive);
        crate::tls::LiveIdentity::new(self.load()?, listener)
            .map(Arc::new)
            .map_err(|e| anyhow::anyhow!("mesh_tls: {e}"))
    }

    /// The listener side: a TLS listener asking clients for mesh
    /// certificates (optional and with plaintext taken too when
    /// `permissive`), following the identity's renewals.
    pub fn listener(
        &self,
        live: &crate::tls::LiveIdentity,
        handshakes: prometheus::IntCounterVec,
    ) -> anyhow::Result<crate::tls::TlsListener> {
        live.listener(crate::tls::DEFAULT_HANDSHAKE_TIMEOUT, handshakes)
            .ok_or_else(|| anyhow::anyhow!("mesh_tls: the identity was not made to serve"))
    }

    /// Follows the files: when one changes (a renewed certificate, a
    /// rotated trust bundle), the identity is read again and put in force
    /// for the next handshakes; a file that does not load is logged and
    /// the current identity stays. Runs until the runtime ends.
    pub async fn follow(self, live: Arc<crate::tls::LiveIdentity>, expiry: prometheus::IntGauge) {
        let stamp = |s: &MeshTlsSettings| {
            [&s.cert_file, &s.key_file, &s.ca_file].map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().ok(), m.len()))
            })
        };
        let mut seen = stamp(&self);
        let every = Duration::from_millis(self.reload_interval_ms.max(50));
        loop {
            tokio::time::sleep(every).await;
            let now = stamp(&self);
            if now == seen {
                continue;
            }
            seen = now;
            match self.load().map(|id| (id.not_after, live.replace(id))) {
                Ok((not_after, Ok(()))) => {
                    expiry.set(not_after);
                    tracing::info!(
                        identity = %live.current().id,
                        not_after = %meshgate_config::tls::rfc3339(not_after),
                        "mesh identity renewed"
                    );
                }
                Ok((_, Err(e))) => {
                    tracing::warn!(error = %e, "renewed mesh identity refused; the current one stays")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mesh identity files do not load; the current identity stays")
                }
            }
        }
    }

    /// Checks the settings; `(field, message)` for each problem.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.reload_interval_ms == 0 {
            p.push((
                "mesh_tls.reload_interval_ms".into(),
                "must be greater than 0".into(),
            ));
        }
        p.extend(self.issuer.iter().flat_map(|i| i.problems()));
        p
    }
}

/// The identity part of a node record.
pub fn node_identity(live: &crate::tls::LiveIdentity) -> meshgate_config::model::NodeIdentity {
    let id = live.current();
    meshgate_config::model::NodeIdentity {
        id: id.id.to_string(),
        expires_at_ms: u64::try_from(id.not_after).unwrap_or(0) * 1000,
    }
}

/// The `identity` part of `/readyz`: who the process is to the mesh and
/// when its certificate expires.
pub fn identity_json(live: &crate::tls::LiveIdentity) -> serde_json::Value {
    let id = live.current();
    serde_json::json!({
        "id": id.id.to_string(),
        "not_after": meshgate_config::tls::rfc3339(id.not_after),
        "expires_in_s": id.not_after - meshgate_config::tls::now_unix(),
    })
}

/// What the mesh's hops may add to a request head (`x-mesh-*`,
/// `x-forwarded-for`, `x-request-id`, `traceparent`), beyond the client
/// limit, on the mesh listener.
pub const HOP_HEADROOM: usize = 4 * 1024;

/// The serving tasks of a process and its shutdown signal.
#[derive(Debug)]
pub struct Process {
    shutdown: watch::Sender<bool>,
    /// Turns true when the process serves (its config applied): its
    /// listeners accept from then on.
    serving: Arc<watch::Sender<bool>>,
    grace: Duration,
    drain_delay: Duration,
    limits: server::Limits,
    upgrades: upgrade::Upgrades,
    tasks: Vec<JoinHandle<()>>,
}

impl Process {
    /// A node whose listeners hold clients to `limits` and drain for at
    /// most `grace` on shutdown.
    pub fn new(grace: Duration, limits: server::Limits) -> Process {
        Process {
            shutdown: watch::channel(false).0,
            serving: Arc::new(watch::channel(false).0),
            grace,
            drain_delay: Duration::ZERO,
            limits,
            upgrades: upgrade::Upgrades::default(),
            tasks: Vec::new(),
        }
    }

    /// After SIGTERM, with readiness already down, the listeners keep
    /// accepting for `delay` (load balancers take that long to stop
    /// sending), then close.
    pub fn with_drain_delay(mut self, delay: Duration) -> Process {
        self.drain_delay = delay;
        self
    }

    /// Hot upgrades: the upgrade socket to answer successors on, and the
    /// takeover this process started with (its listeners wait to accept
    /// until it serves, while the predecessor accepts on the same sockets).
    pub fn with_upgrades(mut self, upgrades: upgrade::Upgrades) -> Process {
        self.upgrades = upgrades;
        self
    }

    /// The switch the process turns once it serves (its config applied):
    /// the service manager is told, a predecessor it took over from stops
    /// (and this process's listeners start accepting), and the upgrade
    /// socket answers.
    pub fn serving(&self) -> Serving {
        Serving(self.serving.clone())
    }

    /// Turns true when the node stops.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Serves HTTP on `listener` with `handler` until the node stops, then
    /// drains it.
    pub fn serve<H, F>(&mut self, name: &'static str, listener: Listener, handler: H)
    where
        H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        self.serve_with(name, listener, self.limits, None, handler);
    }

    /// [`Process::serve`] over TLS: each connection's handshake first.
    pub fn serve_tls<H, F>(
        &mut self,
        name: &'static str,
        listener: Listener,
        tls: crate::tls::TlsListener,
        handler: H,
    ) where
        H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        self.serve_with(name, listener, self.limits, Some(tls), handler);
    }

    /// [`Process::serve`] for the mesh listener, whose clients are other
    /// mesh processes: a request's head may exceed the limit by what the
    /// hops before added ([`HOP_HEADROOM`]), since the edge that took it
    /// from a client held it to the limit. Over mutual TLS when `tls` is
    /// given.
    pub fn serve_mesh<H, F>(
        &mut self,
        name: &'static str,
        listener: Listener,
        tls: Option<crate::tls::TlsListener>,
        handler: H,
    ) where
        H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let mut limits = self.limits;
        limits.max_head += HOP_HEADROOM;
        self.serve_with(name, listener, limits, tls, handler);
    }

    fn serve_with<H, F>(
        &mut self,
        name: &'static str,
        listener: Listener,
        limits: server::Limits,
        tls: Option<crate::tls::TlsListener>,
        handler: H,
    ) where
        H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let mut shutdown = self.shutdown();
        let mut serving = self.serving.subscribe();
        let wait = self.upgrades.takeover.is_some();
        let grace = self.grace;
        self.tasks.push(tokio::spawn(async move {
            // A successor accepts once it serves, while the predecessor
            // accepts on the same sockets; otherwise at once (the ops
            // port answers probes before the config is in).
            if wait {
                tokio::select! {
                    _ = server::wait_true(&mut serving) => {}
                    _ = server::wait_true(&mut shutdown) => return,
                }
            }
            server::serve(name, listener, handler, shutdown, grace, limits, tls).await
        }));
    }

    /// Serves the ops port.
    pub fn serve_ops(&mut self, listener: Listener, state: ops::OpsState) {
        let state = std::sync::Arc::new(state);
        self.serve("ops", listener, move |peer, req| {
            let state = state.clone();
            async move { ops::handle(&state, &peer, req).await }
        });
    }

    /// Runs `task` until it ends; the node waits for it when it stops
    /// (the task watches [`Process::shutdown`] itself).
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Runs `follow` (the process following its config sync) until
    /// SIGTERM/SIGINT, or until it ends; then `stopping` (the process's own
    /// steps: readiness down, deregistration) alongside the drain delay,
    /// then stops every listener and waits for them to drain. When a
    /// successor takes over (a hot upgrade) the process skips `stopping`
    /// and the delay (the successor accepts on the same sockets and keeps
    /// the registrations) and drains at once.
    pub async fn run(self, follow: impl Future<Output = ()>, stopping: impl Future<Output = ()>) {
        let (taken_tx, mut taken) = watch::channel(None);
        let mut serving = self.serving.subscribe();
        let upgrades = self.upgrades;
        let mut shutdown = self.shutdown.subscribe();
        let starting = tokio::spawn(async move {
            tokio::select! {
                _ = server::wait_true(&mut serving) => upgrades.serving(taken_tx).await,
                _ = server::wait_true(&mut shutdown) => {}
            }
        });
        let handed_over = tokio::select! {
            _ = follow => false,
            _ = meshgate_config::node::shutdown_signal() => false,
            // (A process without an upgrade socket drops the sender.)
            Ok(_) = taken.wait_for(Option::is_some) => true,
        };
        if !handed_over {
            meshgate_config::node::notify(meshgate_config::node::Notify::Stopping);
            if !self.drain_delay.is_zero() {
                tracing::info!(
                    "draining: readiness is down; listeners accept for {} ms more",
                    self.drain_delay.as_millis()
                );
            }
            tokio::join!(stopping, tokio::time::sleep(self.drain_delay));
        }
        let _ = self.shutdown.send(true);
        starting.abort();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Turns a [`Process`] to serving; see [`Process::serving`].
#[derive(Debug, Clone)]
pub struct Serving(Arc<watch::Sender<bool>>);

impl Serving {
    /// The process serves (idempotent).
    pub fn now(&self) {
        self.0.send_if_modified(|s| !std::mem::replace(s, true));
    }
}

/// Everything a process refuses of the config it follows: the objects
/// its compilers refused, then what the store refused of its own source
/// (the standalone file). What `/config`, `/readyz`, the
/// `config_rejected_objects` metric and the node record show.
pub fn rejected(objects: &Rejections, s: &SyncStatus) -> Vec<Rejection> {
    let mut all = objects.list();
    all.extend(s.source_errors.iter().cloned());
    all
}

/// The sync status as JSON for `/readyz`. `last_error` is the store's
/// error while disconnected, else the first refusal of its source.
pub fn status_json(s: &SyncStatus, draining: bool, rejected: &[Rejection]) -> serde_json::Value {
    let last_error = s
        .last_error
        .clone()
        .or_else(|| s.source_errors.first().map(|r| r.error.clone()));
    serde_json::json!({
        "ready": s.ready() && !draining,
        "draining": draining,
        "source": match s.source { Source::None => "none", Source::SnapshotFile => "snapshot_file", Source::Store => "store" },
        "store_connected": s.connected,
        "revision": s.revision,
        "last_sync_ms": s.last_sync_ms,
        "last_error": last_error,
        "rejected": rejected,
        "store_reset": s.store_reset.map(|r| serde_json::json!({
            "from_revision": r.from, "to_revision": r.to, "at_ms": r.at_ms,
        })),
    })
}
