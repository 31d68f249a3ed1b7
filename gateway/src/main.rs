//! `meshgate-gateway`: the gateway process.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// mimalloc, see [`meshgate_gateway::alloc`].
#[global_allocator]
static GLOBAL: meshgate_gateway::alloc::MeshAlloc = meshgate_gateway::alloc::MeshAlloc;
use meshgate_config::model::Role;
use meshgate_config::node::{exit_on_error, StoreConfig};
use meshgate_gateway::node::gateway::{EmbeddedAdmin, GatewayConfig, IngressTls};
use meshgate_gateway::observe::AccessLogSettings;

/// Meshgate gateway: ingress, per-group egress and central routing.
///
/// Cluster mode: `--config gateway.yaml` (config in etcd).
/// Standalone mode: `--standalone mesh.yaml` (config in that YAML file,
/// hot-reloaded; admin API embedded on the ops port; no etcd needed).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Node config file (YAML). See docs/configuration.md.
    #[arg(short, long, required_unless_present = "standalone")]
    config: Option<PathBuf>,
    /// Run standalone on this config-model YAML file, with the admin API embedded.
    #[arg(long, conflicts_with = "config")]
    standalone: Option<PathBuf>,
    /// Standalone: mesh listener.
    #[arg(long, default_value = "127.0.0.1:8080", requires = "standalone")]
    listen: SocketAddr,
    /// Standalone: ingress listener.
    #[arg(long, default_value = "127.0.0.1:8000", requires = "standalone")]
    ingress_listen: SocketAddr,
    /// Standalone: a TLS ingress listener (the same routes, over TLS with the
    /// file's `certs`). Off unless given.
    #[arg(long, requires = "standalone")]
    ingress_tls_listen: Option<SocketAddr>,
    /// Standalone: the certificate (a `certs` name) served when no SNI
    /// matches.
    #[arg(long, requires = "ingress_tls_listen")]
    default_cert: Option<String>,
    /// Standalone: ops port (/healthz, /readyz, /metrics, /config, /api/v1).
    #[arg(long, default_value = "127.0.0.1:9901", requires = "standalone")]
    admin_listen: SocketAddr,
    /// Standalone: bearer token file for the embedded admin API (required when
    /// --admin-listen is not a loopback address).
    #[arg(long, requires = "standalone")]
    token_file: Option<PathBuf>,
    /// Standalone: worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0, requires = "standalone")]
    workers: usize,
    /// Standalone: the zone this gateway runs in (endpoints in it are
    /// preferred within their priority).
    #[arg(long, requires = "standalone")]
    zone: Option<String>,
    /// Standalone: the access log: off, all, errors or sampled (a JSON
    /// line per request).
    #[arg(long, default_value = "off", requires = "standalone")]
    access_log: String,
    /// Standalone: the access log's file (default: standard output).
    #[arg(long, requires = "standalone")]
    access_log_path: Option<PathBuf>,
    /// Standalone: the upgrade socket (see `upgrade_socket` in the node
    /// config).
    #[arg(long, requires = "standalone")]
    upgrade_socket: Option<PathBuf>,
    /// Standalone: after SIGTERM, ms the listeners keep accepting once
    /// readiness went false.
    #[arg(long, default_value_t = 0, requires = "standalone")]
    drain_delay_ms: u64,
    /// Start by taking over the listening sockets of the process serving
    /// this upgrade socket (a hot upgrade); it drains and exits once this
    /// one serves.
    #[arg(long)]
    takeover: Option<PathBuf>,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `meshgate_gateway=debug`.
    #[arg(long, env = "MESHGATE_LOG", default_value = "info")]
    log: String,
}

/// `meshgate-gateway upgrade`: starts the new binary in place of the
/// running gateway, which hands it its listening sockets and drains.
#[derive(Parser, Debug)]
#[command(name = "meshgate-gateway upgrade")]
struct UpgradeArgs {
    /// The running gateway's node config (its `upgrade_socket`).
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
            (None, Some(c)) => meshgate_config::node::load_checked(c, GatewayConfig::problems)
                .and_then(|g: GatewayConfig| {
                    g.upgrade_socket.ok_or_else(|| {
                        anyhow::anyhow!("{}: upgrade_socket is not set", c.display())
                    })
                }),
            (None, None) => unreachable!("clap requires one"),
        };
        meshgate_gateway::node::upgrade::command("meshgate-gateway", socket);
    }
    let args = Args::parse();
    meshgate_config::node::init_logging(&args.log);
    meshgate_gateway::alloc::no_huge_pages();
    let cfg = exit_on_error("meshgate-gateway", 2, load(&args));
    let rt = exit_on_error(
        "meshgate-gateway",
        1,
        meshgate_config::node::runtime(cfg.workers).map_err(Into::into),
    );
    exit_on_error(
        "meshgate-gateway",
        1,
        rt.block_on(async {
            let embed = cfg.admin_api.clone().map(admin::embed);
            meshgate_gateway::node::gateway::run(cfg, embed, args.takeover.clone()).await
        }),
    );
}

fn load(args: &Args) -> anyhow::Result<GatewayConfig> {
    if let Some(file) = &args.standalone {
        // Fail early, with the file's own error, if the model file is bad.
        if !file.exists() {
            anyhow::bail!("{}: no such file", file.display());
        }
        return Ok(GatewayConfig {
            id: "standalone".into(),
            roles: vec![Role::Ingress, Role::Central],
            groups: vec![],
            listen: Some(args.listen),
            ingress_listen: Some(args.ingress_listen),
            ingress_tls: args.ingress_tls_listen.map(|listen| IngressTls {
                listen,
                default_cert: args.default_cert.clone(),
                handshake_timeout_ms: meshgate_gateway::tls::DEFAULT_HANDSHAKE_TIMEOUT.as_millis()
                    as u64,
            }),
            admin_listen: args.admin_listen,
            advertise: None,
            store: StoreConfig {
                etcd: None,
                file: Some(file.to_string_lossy().into_owned()),
            },
            snapshot_file: None,
            proxy: Default::default(),
            lease_ttl_s: 10,
            shutdown_grace_ms: 10_000,
            drain_delay_ms: args.drain_delay_ms,
            upgrade_socket: args.upgrade_socket.clone(),
            workers: args.workers,
            zone: args.zone.clone(),
            admin_api: Some(EmbeddedAdmin {
                token_file: args.token_file.clone(),
            }),
            ops_token_file: None,
            client: Default::default(),
            mesh_tls: None,
            tracing: None,
            access_log: AccessLogSettings {
                mode: serde_yaml::from_str(&args.access_log).map_err(|_| {
                    anyhow::anyhow!("--access-log: give off, all, errors or sampled")
                })?,
                path: args.access_log_path.clone(),
                ..Default::default()
            },
        });
    }
    let path = args.config.as_ref().expect("clap requires --config");
    meshgate_config::node::load_checked(path, GatewayConfig::problems)
}

/// The admin API embedded on a standalone gateway's ops port. It lives in
/// the binary: the engine library (and so the sidecar) does not link the
/// admin API or its web framework.
mod admin {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use meshgate_gateway::http::body::full;
    use meshgate_gateway::node::gateway::{Embed, EmbedContext, EmbeddedAdmin};
    use meshgate_gateway::node::ops::OpsExtra;
    use tower::ServiceExt;

    /// Mounts the admin API with `settings` when the gateway runs.
    pub fn embed(settings: EmbeddedAdmin) -> Embed {
        Box::new(move |cx: EmbedContext| mount(settings, cx))
    }

    fn mount(settings: EmbeddedAdmin, cx: EmbedContext) -> anyhow::Result<OpsExtra> {
        let tokens = match &settings.token_file {
            Some(p) => meshgate_admin::Tokens::load(p)?,
            None => meshgate_admin::Tokens::default(),
        };
        meshgate_admin::check_listen(cx.ops_addr, &tokens)?;
        let mut admin = meshgate_admin::state(cx.store.clone(), tokens);
        admin.topology = Some(meshgate_admin::topology::Topology::spawn(
            cx.store.clone(),
            std::time::Duration::from_secs(10),
        ));
        // Explain in process, against this gateway's applied config.
        let snapshot = cx.snapshot.clone();
        admin.explainer = Some(Arc::new(move |req| {
            let explained = meshgate_gateway::node::explain::explain(&snapshot.load(), &req);
            let answer = explained.map_err(|b| {
                meshgate_admin::error::ApiError::new(
                    http::StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("{}: {}", b.field, b.message),
                )
                .field(b.field)
            });
            Box::pin(std::future::ready(answer))
        }));
        // Cache purges in process.
        let snapshot = cx.snapshot.clone();
        admin.purger = Some(Arc::new(move |route, key| {
            snapshot.load().purge_cache(route, key)
        }));
        let router = meshgate_admin::router(admin);
        Ok(Arc::new(move |req| {
            let router = router.clone();
            Box::pin(async move {
                let resp = router
                    .oneshot(req.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|never| match never {});
                // Admin answers are small JSON documents: buffered.
                let (parts, body) = resp.into_parts();
                let bytes = match body.collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        tracing::warn!(error = %e, "admin API answer failed");
                        bytes::Bytes::new()
                    }
                };
                http::Response::from_parts(parts, full(Full::new(bytes)))
            })
        }))
    }
}
