//! `lite-sidecar`: the thin local sidecar. Apps call it on 127.0.0.1; it
//! forwards to the group's egress gateways, failing over to another member
//! and then to the central tier, and to the central tier directly when its
//! local policy is unavailable.

#![forbid(unsafe_code)]

mod config;
mod forward;
mod instance;
mod policy;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// mimalloc, see [`meshgate_gateway::alloc`].
#[global_allocator]
static GLOBAL: meshgate_gateway::alloc::MeshAlloc = meshgate_gateway::alloc::MeshAlloc;
use http::HeaderValue;
use meshgate_config::model::{now_ms, Node, NodeKind, Rejection};
use meshgate_config::node;
use meshgate_config::registration::Registration;
use meshgate_config::sync::{self, SyncOptions};
use meshgate_gateway::http::body::RequestBody;
use meshgate_gateway::http::h2::Clients;
use meshgate_gateway::http::headers;
use meshgate_gateway::metrics::Metrics;
use meshgate_gateway::node::ops::OpsState;
use meshgate_gateway::node::{bind, rejected, status_json, Process};
use meshgate_gateway::observe::Observer;
use meshgate_gateway::proxy::{ListenerKind, Proxy, ProxyOptions};
use meshgate_gateway::server::serve_tcp;
use meshgate_gateway::snapshot::{Compiler, Defaults, SharedSnapshot, Snapshot};
use meshgate_gateway::tls::ClientTls;
use meshgate_gateway::upstream::endpoint::EndpointRegistry;
use meshgate_gateway::upstream::health::HealthChecks;
use std::sync::atomic::AtomicBool;
use tokio::sync::watch;

use crate::config::{PortProtocol, SidecarConfig};
use crate::forward::{Forwarder, Freshness};
use crate::policy::{InboundFeed, PolicyCompiler};

/// Meshgate lite sidecar.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Sidecar node config file (YAML). See docs/configuration.md.
    #[arg(short, long)]
    config: PathBuf,
    /// Start by taking over the listening sockets of the sidecar serving
    /// this upgrade socket (a hot upgrade); it drains and exits once this
    /// one serves.
    #[arg(long)]
    takeover: Option<PathBuf>,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "MESHGATE_LOG", default_value = "info")]
    log: String,
}

/// `meshgate-sidecar upgrade`: starts the new binary in place of the
/// running sidecar, which hands it its listening sockets and drains.
#[derive(Parser, Debug)]
#[command(name = "meshgate-sidecar upgrade")]
struct UpgradeArgs {
    /// The running sidecar's node config (its `upgrade_socket`).
    #[arg(short, long, required_unless_present = "socket")]
    config: Option<PathBuf>,
    /// The upgrade socket itself.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
}

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "upgrade") {
        let args = UpgradeArgs::parse_from(std::env::args_os().skip(1));
        let socket = match (args.socket, &args.config) {
            (Some(s), _) => Ok(s),
            (None, Some(c)) => {
                node::load_checked(c, SidecarConfig::problems).and_then(|sc: SidecarConfig| {
                    sc.upgrade_socket.ok_or_else(|| {
                        anyhow::anyhow!("{}: upgrade_socket is not set", c.display())
                    })
                })
            }
            (None, None) => unreachable!("clap requires one"),
        };
        meshgate_gateway::node::upgrade::command("meshgate-sidecar", socket);
    }
    let args = Args::parse();
    node::init_logging(&args.log);
    meshgate_gateway::alloc::no_huge_pages();
    meshgate_gateway::alloc::purge_at_once();
    let cfg = node::exit_on_error(
        "lite-sidecar",
        2,
        node::load_checked(&args.config, SidecarConfig::problems),
    );
    let rt = node::exit_on_error(
        "lite-sidecar",
        1,
        node::runtime(cfg.workers).map_err(Into::into),
    );
    node::exit_on_error("lite-sidecar", 1, rt.block_on(run(cfg, args.takeover)));
}

async fn run(cfg: SidecarConfig, takeover: Option<PathBuf>) -> anyhow::Result<()> {
    // A hot upgrade takes the running process's sockets before binding.
    let upgrades = meshgate_gateway::node::upgrade::Upgrades {
        socket: cfg.upgrade_socket.clone(),
        takeover: match &takeover {
            Some(p) => Some(meshgate_gateway::node::upgrade::Takeover::start(p).await?),
            None => None,
        },
    };
    upgrades.check("upgrade_socket")?;
    let listener = bind(cfg.listen, "listen").await?;
    let ops_listener = bind(cfg.admin_listen, "admin_listen").await?;
    let inbound_listener = match &cfg.inbound {
        Some(i) => Some(bind(i.listen, "inbound.listen").await?),
        None => None,
    };
    let store = cfg.store.open().await?;
    let metrics = Arc::new(Metrics::new("sidecar"));

    let registry = Arc::new(EndpointRegistry::default());
    let _sweeper = registry.spawn_sweeper();
    // Mutual TLS to the gateway tiers (and on the inbound listener), with
    // the sidecar's identity, renewed as its files change. The inbound
    // starts strict; the service's `mtls` sets it once known.
    let identity = match &cfg.mesh_tls {
        Some(t) => {
            let mut t = t.clone();
            t.mode = meshgate_gateway::node::MtlsMode::Strict;
            let me = format!("group/{}/service/{}", cfg.group, cfg.service);
            let expiry = metrics.identity_expiry.clone();
            Some(t.start(&me, cfg.inbound.is_some(), expiry).await?)
        }
        None => None,
    };
    let mesh_tls = |alpn: &[&[u8]]| -> anyhow::Result<Option<Arc<ClientTls>>> {
        identity
            .as_ref()
            .map(|live| live.client_tls(alpn, None))
            .transpose()
            .map_err(|e| anyhow::anyhow!("mesh_tls: {e}"))
    };
    if let Some(live) = &identity {
        tracing::info!(identity = %live.current().id, "mutual TLS to the gateways");
    }
    let member_checks = (cfg.proxy.member_check_interval_ms > 0).then(|| {
        let interval = cfg.proxy.member_check_interval_ms;
        let spec = meshgate_config::model::HealthCheck {
            http: None,
            tcp: true,
            interval_ms: interval,
            timeout_ms: cfg.proxy.connect_timeout_ms.min(interval),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        };
        let checks = HealthChecks::new(Some(metrics.health_checks.clone()));
        (Arc::new(checks), spec)
    });
    // The direct tier: the gateway's compiler and data plane, fed only the
    // destinations the service calls in `direct` mode.
    let connect = Duration::from_millis(cfg.proxy.connect_timeout_ms);
    let direct_snapshot: SharedSnapshot = Default::default();
    let direct_compiler = Compiler::new(
        direct_snapshot.clone(),
        Defaults {
            connect_timeout: connect,
            request_timeout: Duration::from_millis(cfg.proxy.request_timeout_ms),
            zone: cfg.app.as_ref().and_then(|a| a.zone.clone()),
        },
        Arc::new(Clients::default()),
        registry.clone(),
        Arc::new(HealthChecks::new(Some(metrics.health_checks.clone()))),
        Box::new(|_: &Snapshot| {}),
    )
    .with_mesh_identity(identity.clone());
    // The inbound's data plane: the gateway's again, over the local app.
    let inbound_snapshot: SharedSnapshot = Default::default();
    let inbound_feed = match (&cfg.inbound, &cfg.app, &identity) {
        (Some(_), Some(app), Some(live)) => Some(InboundFeed::new(
            Compiler::new(
                inbound_snapshot.clone(),
                Defaults {
                    connect_timeout: connect,
                    request_timeout: Duration::from_millis(cfg.proxy.request_timeout_ms),
                    zone: None,
                },
                Arc::new(Clients::default()),
                registry.clone(),
                Arc::new(HealthChecks::new(None)),
                Box::new(|_: &Snapshot| {}),
            ),
            app.address.clone(),
            live.clone(),
        )),
        _ => None,
    };
    let (compiler, policy, scope) = PolicyCompiler::new(
        cfg.group.clone(),
        cfg.service.clone(),
        cfg.central.clone(),
        registry,
        member_checks,
        direct_compiler,
        mesh_tls(&[b"http/1.1"])?,
    );
    let compiler = compiler.with_inbound(inbound_feed);
    let dump = compiler.dump_handle();
    let refused = compiler.rejections();
    let mut opts = SyncOptions::new(scope.borrow().clone());
    opts.rescope = Some(scope);
    if let Some(p) = &cfg.snapshot_file {
        opts.snapshot = Some((
            p.clone(),
            format!("sidecar:{}:{}:{}", cfg.id, cfg.service, cfg.group),
        ));
    }
    let status = sync::spawn(store.clone(), opts, compiler);

    let observer = Observer::start(
        &cfg.access_log,
        cfg.tracing.as_ref(),
        &format!("lite-sidecar/{}", cfg.service),
        &metrics,
        // No gRPC export: the sidecar exports over HTTP/protobuf, and
        // links no gRPC client (its binary's pages are most of its memory).
        None,
    )?;
    let fwd = Arc::new(Forwarder {
        service: HeaderValue::from_str(&cfg.service)?,
        policy: policy.clone(),
        status: status.clone(),
        default_staleness: Duration::from_secs(cfg.max_policy_staleness_s),
        connect_timeout: connect,
        h2: Clients::default().get(connect, mesh_tls(&[b"h2"])?),
        metrics: metrics.clone(),
        max_hops: cfg.proxy.max_hops,
        replay_buffer_bytes: cfg.proxy.replay_buffer_bytes,
        request_timeout: Duration::from_millis(cfg.proxy.request_timeout_ms),
        direct: Proxy::new(
            direct_snapshot,
            Arc::new(AtomicBool::new(true)),
            metrics.clone(),
            ProxyOptions {
                max_hops: cfg.proxy.max_hops,
                replay_buffer_bytes: cfg.proxy.replay_buffer_bytes,
                ..ProxyOptions::default()
            },
        ),
        obs: observer.clone(),
    });

    let mut node = Process::new(
        Duration::from_millis(cfg.shutdown_grace_ms),
        cfg.client.limits(),
    )
    .with_drain_delay(Duration::from_millis(cfg.drain_delay_ms))
    .with_upgrades(upgrades);
    let serving = node.serving();
    let draining = Arc::new(AtomicBool::new(false));
    let dr = draining.clone();
    let f = fwd.clone();
    let st = status.clone();
    let pol = policy.clone();
    let refused_now = refused.clone();
    let identity_now = identity.clone();
    let ops_state = OpsState {
        metrics: metrics.clone(),
        readiness: Arc::new(move || {
            let s = st.borrow().clone();
            let fresh = f.freshness();
            let p = pol.load();
            // Serving is possible with a policy, or with a central tier to fall back to.
            let draining = dr.load(std::sync::atomic::Ordering::Relaxed);
            let ready = !draining
                && (fresh != Freshness::Unavailable || !p.central_tier.members.is_empty());
            let mut v = status_json(&s, draining, &rejected(&refused_now, &s));
            v["ready"] = ready.into();
            v["policy"] = fresh.as_str().into();
            if let Some(live) = &identity_now {
                v["identity"] = meshgate_gateway::node::identity_json(live);
            }
            if fresh != Freshness::Fresh && s.last_sync_ms > 0 {
                v["stale_since_ms"] = s.last_sync_ms.into();
            }
            (ready, v)
        }),
        config_dump: Arc::new({
            let status = status.clone();
            let refused = refused.clone();
            move || {
                let mut v = dump.lock().unwrap_or_else(|e| e.into_inner()).clone();
                v["rejected"] = serde_json::json!(rejected(&refused, &status.borrow()));
                v
            }
        }),
        status: status.clone(),
        explain: None,
        purge: None,
        extra: None,
        tokens: Arc::new(match &cfg.ops_token_file {
            Some(p) => meshgate_config::tokens::Tokens::load(p)?,
            None => Default::default(),
        }),
    };
    node.serve_ops(ops_listener, ops_state);
    let f = fwd.clone();
    node.serve("app", listener, move |_peer, req| {
        let f = f.clone();
        async move { f.handle(req).await }
    });
    if let (Some(l), Some(live)) = (inbound_listener, &identity) {
        tracing::info!(listen = %l.local_addr()?, service = %cfg.service, "inbound listener: mutual TLS");
        let tls = live
            .listener(
                meshgate_gateway::tls::DEFAULT_HANDSHAKE_TIMEOUT,
                metrics.tls_handshakes.clone(),
            )
            .ok_or_else(|| anyhow::anyhow!("inbound: the identity was not made to serve"))?;
        let inbound = Arc::new(
            Proxy::new(
                inbound_snapshot,
                Arc::new(AtomicBool::new(true)),
                metrics.clone(),
                ProxyOptions {
                    max_hops: cfg.proxy.max_hops,
                    replay_buffer_bytes: cfg.proxy.replay_buffer_bytes,
                    ..ProxyOptions::default()
                },
            )
            .inbound(&cfg.service)
            .with_observer(observer.clone()),
        );
        node.serve_mesh("inbound", l, Some(tls), move |peer, req| {
            let p = inbound.clone();
            async move { p.handle(ListenerKind::Inbound, peer, req).await }
        });
    }
    for lp in &cfg.local_ports {
        let l = bind(lp.listen, &format!("local_ports ({})", lp.service)).await?;
        tracing::info!(listen = %lp.listen, service = %lp.service, protocol = ?lp.protocol, "local port");
        let f = fwd.clone();
        match lp.protocol {
            PortProtocol::Http => {
                let dest = HeaderValue::from_str(&lp.service)?;
                node.serve(
                    "app",
                    l,
                    move |_peer, mut req: http::Request<RequestBody>| {
                        let f = f.clone();
                        req.headers_mut()
                            .insert(headers::X_MESH_SERVICE, dest.clone());
                        async move { f.handle(req).await }
                    },
                );
            }
            PortProtocol::Tcp => {
                let port = tcp_port(l, lp.service.clone(), f, metrics.clone(), node.shutdown());
                node.spawn(port);
            }
        }
    }
    tracing::info!(id = %cfg.id, service = %cfg.service, group = %cfg.group, listen = %cfg.listen, "sidecar started");

    let record = {
        let cfg = cfg.clone();
        let identity = identity.clone();
        move |revision: i64, fresh: Freshness, rejected: Vec<Rejection>| -> Vec<u8> {
            let n = Node {
                identity: identity
                    .as_ref()
                    .map(|l| meshgate_gateway::node::node_identity(l)),
                kind: NodeKind::Sidecar,
                roles: vec![],
                groups: vec![cfg.group.clone()],
                address: Some(cfg.listen.to_string()),
                admin_address: Some(cfg.admin_listen.to_string()),
                service: Some(cfg.service.clone()),
                version: env!("CARGO_PKG_VERSION").to_string(),
                applied_revision: revision,
                updated_at_ms: now_ms(),
                policy: Some(fresh.as_str().to_string()),
                rejected,
            };
            serde_json::to_vec(&n).expect("node encodes")
        }
    };
    let registration = Registration::spawn(
        store.clone(),
        meshgate_config::key::node_key(NodeKind::Sidecar, &cfg.id),
        record(0, Freshness::Unavailable, Vec::new()),
        Duration::from_secs(cfg.lease_ttl_s),
    );
    // The app as an instance of its service, registered while healthy.
    let (app_stop, app_stop_rx) = watch::channel(false);
    let app_task = cfg.app.clone().map(|app| {
        tokio::spawn(instance::run(
            store.clone(),
            cfg.clone(),
            app,
            policy.clone(),
            app_stop_rx,
        ))
    });
    // Policy freshness on /metrics: one of fresh/stale/unavailable is 1,
    // and when the policy last was in sync with the store.
    let policy_state = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "policy_state",
            "Local policy freshness: 1 for the current state",
        ),
        &["state"],
    )?;
    let policy_synced = prometheus::IntGauge::new(
        "policy_last_sync_timestamp_seconds",
        "Unix time the local policy was last known in sync with the store (0: never)",
    )?;
    metrics.register(Box::new(policy_state.clone()));
    metrics.register(Box::new(policy_synced.clone()));
    let follow = async {
        let mut status = status.clone();
        let mut last = None;
        // Staleness grows with time alone: look again every second.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let s = status.borrow_and_update().clone();
            metrics.store_connected.set(i64::from(s.connected));
            metrics.config_revision.set(s.revision);
            policy_synced.set((s.last_sync_ms / 1000) as i64);
            let refusals = rejected(&refused, &s);
            metrics.config_rejected.set(refusals.len() as i64);
            let fresh = fwd.freshness();
            if fresh != Freshness::Unavailable || !policy.load().central_tier.members.is_empty() {
                serving.now();
            }
            for f in [Freshness::Fresh, Freshness::Stale, Freshness::Unavailable] {
                policy_state
                    .with_label_values(&[f.as_str()])
                    .set(i64::from(f == fresh));
            }
            let expiry = identity.as_ref().map(|l| l.current().not_after);
            let now = (s.revision, fresh, refusals, expiry);
            if last.as_ref() != Some(&now) {
                registration.update(record(now.0, now.1, now.2.clone()));
                last = Some(now);
            }
            tokio::select! {
                r = status.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    };
    let stopping = async {
        tracing::info!("shutdown: deregistering, then draining");
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
        // The instance first, so gateways stop sending before the drain.
        let _ = app_stop.send(true);
        if let Some(t) = app_task {
            let _ = t.await;
        }
        registration.deregister().await;
    };
    node.run(follow, stopping).await;
    if let Some(obs) = &observer {
        obs.flush(Duration::from_secs(2));
    }
    Ok(())
}

/// Accepts on a plain-TCP local port until shutdown; every connection is
/// tunnelled to `service` (open tunnels carry on after the listener stops).
async fn tcp_port(
    listener: meshgate_gateway::server::listeners::Listener,
    service: String,
    fwd: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let name = format!("local port ({service})");
    let conn = move |stream, _peer| {
        let (fwd, metrics, service) = (fwd.clone(), metrics.clone(), service.clone());
        async move {
            let (tier, result) = match fwd.tcp(&service, stream).await {
                Ok(tier) => (tier, "ok"),
                Err(e) => {
                    tracing::debug!(%service, error = %e, "tcp connection ended");
                    ("", "failed")
                }
            };
            metrics
                .sidecar_tcp
                .with_label_values(&[fwd.destination_label(&service), tier, result])
                .inc();
        }
    };
    serve_tcp(&name, listener, conn, shutdown).await
}
