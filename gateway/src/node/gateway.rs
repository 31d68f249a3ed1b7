//! The gateway process: node config, wiring of store, sync, data plane,
//! listeners, ops port and registration, and graceful shutdown.
//!
//! Start-up order: bind every port first (so a port conflict fails fast),
//! start the sync (store, or the snapshot file when the store is down),
//! serve on the node skeleton ([`super::Process`]); register in `nodes/` and
//! keep the record's applied revision current. On SIGTERM: mark not
//! ready, deregister, stop accepting, drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_config::model::{now_ms, Node, NodeKind, Rejection, Role};
use meshgate_config::node::StoreConfig;
use meshgate_config::registration::Registration;
use meshgate_config::store::ConfigStore;
use meshgate_config::sync::{self, Source, SyncOptions};
use meshgate_config::tokens::Tokens;
use meshgate_config::Kind;
use serde::Deserialize;

use crate::http::h2::Clients;
use crate::metrics::Metrics;
use crate::node::ops::{OpsExtra, OpsState};
use crate::node::{bind, rejected, status_json, ClientSettings, Process};
use crate::observe::{AccessLogSettings, Observer, TracingSettings};
use crate::proxy::{
    ListenerKind, Proxy, ProxyOptions, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT,
};
use crate::snapshot::{Compiler, Defaults, SharedSnapshot, Snapshot};
use crate::upstream::endpoint::EndpointRegistry;
use crate::upstream::health::HealthChecks;

/// The gateway's node config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Unique node id (its key in `nodes/`).
    pub id: String,
    /// `ingress`, `egress`, `central` (one or more).
    pub roles: Vec<Role>,
    /// Groups served by the egress role.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Mesh listener (egress and central roles).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Ingress listener (ingress role).
    #[serde(default)]
    pub ingress_listen: Option<SocketAddr>,
    /// The TLS ingress listener (ingress role): the same routes as
    /// `ingress_listen`, over TLS with the `certs/` objects.
    #[serde(default)]
    pub ingress_tls: Option<IngressTls>,
    /// Ops port: /healthz, /readyz, /metrics, /config (+ admin API if embedded).
    pub admin_listen: SocketAddr,
    /// Mesh address registered for sidecars (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    pub store: StoreConfig,
    /// Last-known-good snapshot file.
    #[serde(default)]
    pub snapshot_file: Option<PathBuf>,
    #[serde(default)]
    pub proxy: ProxySettings,
    /// Lease TTL of the node registration, seconds.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u64,
    /// How long to drain in-flight requests on shutdown, ms.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// After SIGTERM, how long the listeners keep accepting once readiness
    /// went false (for load balancers to stop sending), ms; default 0.
    #[serde(default)]
    pub drain_delay_ms: u64,
    /// The Unix socket a new binary takes the listening sockets over from
    /// (`--takeover`, `meshgate-gateway upgrade`); hot upgrades are off
    /// without it.
    #[serde(default)]
    pub upgrade_socket: Option<PathBuf>,
    /// Embed the admin API on the ops port.
    #[serde(default)]
    pub admin_api: Option<EmbeddedAdmin>,
    /// Bearer tokens (the admin API's token file format) that may read the
    /// ops port's config endpoints; default: the embedded admin API's
    /// token file, if any. Without tokens only loopback clients may.
    #[serde(default)]
    pub ops_token_file: Option<PathBuf>,
    /// Limits of client connections on every listener.
    #[serde(default)]
    pub client: ClientSettings,
    /// The gateway's mesh identity: mutual TLS on the mesh listener.
    #[serde(default)]
    pub mesh_tls: Option<crate::node::MeshTlsSettings>,
    /// Worker threads of the data plane (0 = one per CPU; 1 = a
    /// single-threaded runtime).
    #[serde(default)]
    pub workers: usize,
    /// The zone this gateway runs in: within a priority level, endpoints in
    /// the same zone are used first, others when none of those is healthy.
    #[serde(default)]
    pub zone: Option<String>,
    /// The access log (off unless set).
    #[serde(default)]
    pub access_log: AccessLogSettings,
    /// Spans exported over OTLP (off unless set).
    #[serde(default)]
    pub tracing: Option<TracingSettings>,
}

/// The TLS ingress listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressTls {
    pub listen: SocketAddr,
    /// The `certs/` object served to a client whose SNI (or lack of one)
    /// matches no certificate; without it such a handshake fails.
    #[serde(default)]
    pub default_cert: Option<String>,
    /// A handshake not done in this time is dropped, ms (default 10 s).
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
}

fn default_handshake_timeout() -> u64 {
    crate::tls::DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as u64
}

/// Proxy tunables in the node config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    pub max_hops: u32,
    pub replay_buffer_bytes: usize,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

impl Default for ProxySettings {
    fn default() -> Self {
        let d = ProxyOptions::default();
        ProxySettings {
            max_hops: d.max_hops,
            replay_buffer_bytes: d.replay_buffer_bytes,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT.as_millis() as u64,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT.as_millis() as u64,
        }
    }
}

/// The embedded admin API.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedAdmin {
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn default_lease_ttl() -> u64 {
    10
}

fn default_grace() -> u64 {
    15_000
}

impl GatewayConfig {
    /// Semantic checks; `(field, message)` for each problem.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = self.store.problems();
        let mut push = |f: &str, m: &str| p.push((f.to_string(), m.to_string()));
        if !meshgate_config::key::valid_name(&self.id) {
            push("id", "must be 1-128 characters of a-z, 0-9, '-', '_', '.'");
        }
        if self.roles.is_empty() {
            push("roles", "give at least one of ingress, egress, central");
        }
        let mesh = self
            .roles
            .iter()
            .any(|r| matches!(r, Role::Egress | Role::Central));
        if mesh && self.listen.is_none() {
            push("listen", "required for the egress and central roles");
        }
        let ingress = self.roles.contains(&Role::Ingress);
        if ingress && self.ingress_listen.is_none() && self.ingress_tls.is_none() {
            push(
                "ingress_listen",
                "the ingress role needs ingress_listen, ingress_tls or both",
            );
        }
        if let Some(t) = &self.ingress_tls {
            if !ingress {
                push(
                    "ingress_tls",
                    "only the ingress role has an ingress listener",
                );
            }
            if t.default_cert
                .as_deref()
                .is_some_and(|c| !meshgate_config::key::valid_name(c))
            {
                push(
                    "ingress_tls.default_cert",
                    "must be the name of a certs/ object",
                );
            }
            if t.handshake_timeout_ms == 0 {
                push("ingress_tls.handshake_timeout_ms", "must be greater than 0");
            }
            if Some(t.listen) == self.ingress_listen || Some(t.listen) == self.listen {
                push("ingress_tls.listen", "must differ from the other listeners");
            }
        }
        if self.roles.contains(&Role::Egress) && self.groups.is_empty() {
            push("groups", "the egress role needs the groups it serves");
        }
        for (i, g) in self.groups.iter().enumerate() {
            if !meshgate_config::key::valid_name(g) {
                p.push((format!("groups[{i}]"), "invalid group name".into()));
            }
        }
        if self.proxy.max_hops == 0 {
            p.push(("proxy.max_hops".into(), "must be at least 1".into()));
        }
        if self.proxy.connect_timeout_ms == 0 || self.proxy.request_timeout_ms == 0 {
            p.push(("proxy".into(), "timeouts must be greater than 0".into()));
        }
        if self.lease_ttl_s < 2 {
            p.push(("lease_ttl_s".into(), "must be at least 2".into()));
        }
        p.extend(self.client.problems());
        p.extend(self.mesh_tls.iter().flat_map(|t| t.problems()));
        p.extend(self.access_log.problems());
        p.extend(self.tracing.iter().flat_map(|t| t.problems()));
        p
    }
}

/// What the gateway binary may mount on the ops port (the embedded admin
/// API): it gets the store and the applied snapshot.
#[derive(Clone)]
pub struct EmbedContext {
    pub store: Arc<dyn ConfigStore>,
    pub snapshot: SharedSnapshot,
    pub ops_addr: SocketAddr,
}

/// Builds the extra ops routes from the running gateway's parts.
pub type Embed = Box<dyn FnOnce(EmbedContext) -> anyhow::Result<OpsExtra> + Send>;

/// Runs the gateway until SIGTERM/SIGINT. `embed` mounts extra routes on
/// the ops port (the binary's embedded admin API).
pub async fn run(
    cfg: GatewayConfig,
    embed: Option<Embed>,
    takeover: Option<PathBuf>,
) -> anyhow::Result<()> {
    // A hot upgrade takes the running process's sockets before binding.
    let upgrades = crate::node::upgrade::Upgrades {
        socket: cfg.upgrade_socket.clone(),
        takeover: match &takeover {
            Some(p) => Some(crate::node::upgrade::Takeover::start(p).await?),
            None => None,
        },
    };
    upgrades.check("upgrade_socket")?;
    let mesh_listener = match cfg.listen {
        Some(a) => Some(bind(a, "listen").await?),
        None => None,
    };
    let ingress_listener = match cfg.ingress_listen {
        Some(a) => Some(bind(a, "ingress_listen").await?),
        None => None,
    };
    let tls_listener = match &cfg.ingress_tls {
        Some(t) => Some(bind(t.listen, "ingress_tls.listen").await?),
        None => None,
    };
    let ops_listener = bind(cfg.admin_listen, "admin_listen").await?;
    let ops_token_file = cfg
        .ops_token_file
        .as_ref()
        .or(cfg.admin_api.as_ref().and_then(|a| a.token_file.as_ref()));
    let ops_tokens = match ops_token_file {
        Some(p) => Tokens::load(p)?,
        None => Tokens::default(),
    };
    let mesh_addr = mesh_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let ops_addr = ops_listener.local_addr()?;

    let store = cfg.store.open().await?;
    let metrics = Arc::new(Metrics::new("gateway"));
    let shared: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));

    // Mutual TLS on the mesh listener (and to the instances of services
    // with `mtls` on), with this gateway's identity, renewed as its files
    // change.
    let identity = match &cfg.mesh_tls {
        Some(t) => {
            let me = format!("gateway/{}", cfg.id);
            let live = t.start(&me, true, metrics.identity_expiry.clone()).await?;
            tracing::info!(identity = %live.current().id, mode = ?t.mode, "mesh listener: mutual TLS");
            Some(live)
        }
        None => None,
    };
    let m = metrics.clone();
    // The live gateways that share `cluster` rate limits.
    let peers = Arc::new(crate::policy::limit::Peers::default());
    let _peers_task = crate::node::peers::spawn(
        store.clone(),
        cfg.id.clone(),
        crate::node::peers::Member {
            roles: cfg.roles.clone(),
            groups: cfg.groups.clone(),
        },
        peers.clone(),
        metrics.cluster_gateways.clone(),
    );
    let endpoints = Arc::new(EndpointRegistry::default());
    let _sweeper = endpoints.spawn_sweeper();
    let _purger = crate::alloc::spawn_purger();
    let compiler = Compiler::new(
        shared.clone(),
        Defaults {
            connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
            request_timeout: Duration::from_millis(cfg.proxy.request_timeout_ms),
            zone: cfg.zone.clone(),
        },
        Arc::new(Clients::default()),
        endpoints,
        Arc::new(HealthChecks::new(Some(metrics.health_checks.clone()))),
        Box::new(move |snap: &Snapshot| {
            m.config_revision.set(snap.revision);
            m.cert_expiry.reset();
            for c in snap.certs.iter() {
                m.cert_expiry
                    .with_label_values(&[&c.name])
                    .set(c.info.not_after_unix);
            }
        }),
    )
    .with_mesh_identity(identity.clone())
    .with_metrics(metrics.clone())
    .with_edge_policies(crate::policy::compiler(peers.clone()));
    let dump = compiler.dump_handle();
    let certs = compiler.certs_handle();
    let refused = compiler.rejections();
    // Config, and the instances registered by sidecars (they join their
    // service's endpoints).
    let prefixes = Kind::CONFIG
        .iter()
        .chain([&Kind::Instances])
        .map(|k| k.prefix())
        .collect();
    let mut opts = SyncOptions::new(prefixes);
    if let Some(p) = &cfg.snapshot_file {
        opts.snapshot = Some((p.clone(), format!("gateway:{}", cfg.id)));
    }
    let status = sync::spawn(store.clone(), opts, compiler);

    let observer = Observer::start(
        &cfg.access_log,
        cfg.tracing.as_ref(),
        &format!("meshgate-gateway/{}", cfg.id),
        &metrics,
        Some(crate::observe::trace::grpc_exporter),
    )?;
    let proxy = Arc::new(
        Proxy::new(
            shared.clone(),
            ready.clone(),
            metrics.clone(),
            ProxyOptions {
                max_hops: cfg.proxy.max_hops,
                replay_buffer_bytes: cfg.proxy.replay_buffer_bytes,
                ..ProxyOptions::default()
            },
        )
        .with_observer(observer.clone()),
    );

    // Ops port (+ what the binary embeds).
    let extra = match embed {
        Some(embed) => Some(embed(EmbedContext {
            store: store.clone(),
            snapshot: shared.clone(),
            ops_addr,
        })?),
        None => None,
    };
    let mut mesh_listener_tls = match (&cfg.mesh_tls, &identity) {
        (Some(t), Some(live)) => Some(t.listener(live, metrics.tls_handshakes.clone())?),
        _ => None,
    };
    let st = status.clone();
    let dr = draining.clone();
    let serving = ready.clone();
    let refused_now = refused.clone();
    let identity_now = identity.clone();
    let ops_state = OpsState {
        metrics: metrics.clone(),
        readiness: Arc::new(move || {
            let s = st.borrow().clone();
            let draining = dr.load(Ordering::Relaxed);
            // Ready once the data plane serves the loaded config (the
            // follow loop below flips it), not merely once it is loaded.
            let ready = s.ready() && serving.load(Ordering::Acquire) && !draining;
            let mut v = status_json(&s, draining, &rejected(&refused_now, &s));
            v["ready"] = ready.into();
            if let Some(live) = &identity_now {
                v["identity"] = crate::node::identity_json(live);
            }
            (ready, v)
        }),
        config_dump: Arc::new({
            let status = status.clone();
            let refused = refused.clone();
            move || dump.render(&rejected(&refused, &status.borrow()))
        }),
        status: status.clone(),
        explain: Some({
            let shared = shared.clone();
            Arc::new(move |req: &meshgate_config::model::ExplainRequest| {
                crate::node::explain::explain(&shared.load(), req)
            })
        }),
        purge: Some({
            let shared = shared.clone();
            Arc::new(move |route: &str, key: Option<&str>| shared.load().purge_cache(route, key))
        }),
        extra,
        tokens: Arc::new(ops_tokens),
    };

    let mut node = Process::new(
        Duration::from_millis(cfg.shutdown_grace_ms),
        cfg.client.limits(),
    )
    .with_drain_delay(Duration::from_millis(cfg.drain_delay_ms))
    .with_upgrades(upgrades);
    let serving = node.serving();
    node.serve_ops(ops_listener, ops_state);
    for (listener, kind) in [
        (mesh_listener, ListenerKind::Mesh),
        (ingress_listener, ListenerKind::Ingress),
    ] {
        let Some(listener) = listener else { continue };
        tracing::info!(listener = kind.as_str(), addr = %listener.local_addr()?, "listening");
        let p = proxy.clone();
        let handler = move |peer, req| {
            let p: Arc<Proxy> = p.clone();
            async move { p.handle(kind, peer, req).await }
        };
        match kind {
            ListenerKind::Mesh => {
                node.serve_mesh(kind.as_str(), listener, mesh_listener_tls.take(), handler)
            }
            _ => node.serve(kind.as_str(), listener, handler),
        }
    }
    if let (Some(listener), Some(t)) = (tls_listener, &cfg.ingress_tls) {
        tracing::info!(listener = "ingress_tls", addr = %listener.local_addr()?, "listening");
        let resolver = crate::tls::CertResolver {
            certs: certs.clone(),
            default: t.default_cert.clone(),
        };
        let tls = crate::tls::TlsListener {
            config: Arc::new(ArcSwap::new(crate::tls::server_config(Arc::new(resolver)))),
            handshake_timeout: Duration::from_millis(t.handshake_timeout_ms),
            handshakes: metrics.tls_handshakes.clone(),
            plaintext_too: Default::default(),
        };
        let p = proxy.clone();
        let handler = move |peer, req| {
            let p: Arc<Proxy> = p.clone();
            async move { p.handle(ListenerKind::Ingress, peer, req).await }
        };
        node.serve_tls("ingress_tls", listener, tls, handler);
    }
    // TCP routes listen on the ingress address.
    if let Some(a) = cfg
        .ingress_listen
        .or(cfg.ingress_tls.as_ref().map(|t| t.listen))
    {
        let listeners = crate::proxy::tcp::run_listeners(
            a.ip(),
            shared.clone(),
            metrics.clone(),
            status.clone(),
            node.shutdown(),
        );
        node.spawn(listeners);
    }
    tracing::info!(id = %cfg.id, ops = %ops_addr, store = %store.describe(), "gateway started");

    // Readiness, metrics and the node record follow the sync status.
    let node_key = meshgate_config::key::node_key(NodeKind::Gateway, &cfg.id);
    let advertise = cfg.advertise.clone().or(mesh_addr.map(|a| a.to_string()));
    let record = {
        let cfg = cfg.clone();
        let identity = identity.clone();
        move |revision: i64, rejected: Vec<Rejection>| -> Vec<u8> {
            let n = Node {
                identity: identity.as_ref().map(|l| crate::node::node_identity(l)),
                kind: NodeKind::Gateway,
                roles: cfg.roles.clone(),
                groups: cfg.groups.clone(),
                address: advertise.clone(),
                admin_address: Some(ops_addr.to_string()),
                service: None,
                version: env!("CARGO_PKG_VERSION").to_string(),
                applied_revision: revision,
                updated_at_ms: now_ms(),
                policy: None,
                rejected,
            };
            serde_json::to_vec(&n).expect("node encodes")
        }
    };
    let registration = Registration::spawn(
        store.clone(),
        node_key,
        record(0, Vec::new()),
        Duration::from_secs(cfg.lease_ttl_s),
    );
    let follow = async {
        let mut status = status.clone();
        let mut registered = None;
        // A renewed identity changes the record too: look every second.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let s = status.borrow_and_update().clone();
            metrics.store_connected.set(i64::from(s.connected));
            let refusals = rejected(&refused, &s);
            metrics.config_rejected.set(refusals.len() as i64);
            if s.source != Source::None {
                ready.store(true, Ordering::Release);
                serving.now();
                // Rewrite the node record only when the revision, the
                // refusals or the identity's expiry change.
                let expiry = identity.as_ref().map(|l| l.current().not_after);
                let now = (s.revision, refusals, expiry);
                if registered.as_ref() != Some(&now) {
                    registration.update(record(now.0, now.1.clone()));
                    registered = Some(now);
                }
            }
            tokio::select! {
                r = status.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    };
    let stopping = async {
        tracing::info!(
            "shutdown: deregistering, then draining for up to {} ms",
            cfg.shutdown_grace_ms
        );
        draining.store(true, Ordering::Relaxed);
        registration.deregister().await;
    };
    node.run(follow, stopping).await;
    if let Some(obs) = &observer {
        obs.flush(Duration::from_secs(2));
    }
    tracing::info!("gateway stopped");
    Ok(())
}
