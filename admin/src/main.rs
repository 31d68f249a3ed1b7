//! `meshgate-admin`: the admin REST API as its own process, against etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshgate_config::node;
use serde::Deserialize;

/// Meshgate admin REST API server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Admin node config file (YAML): `listen`, `store`, `token_file`.
    #[arg(short, long)]
    config: PathBuf,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `meshgate=debug`.
    #[arg(long, env = "MESHGATE_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminConfig {
    /// Address of the API, e.g. 127.0.0.1:9000.
    listen: SocketAddr,
    store: meshgate_config::node::StoreConfig,
    /// YAML file of bearer tokens; required unless `listen` is loopback.
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// Change-log entries kept (default 1000).
    #[serde(default = "default_history_limit")]
    history_limit: usize,
    /// How often the nodes' call counters are polled for the topology, ms
    /// (default 10000).
    #[serde(default = "default_topology_interval")]
    topology_interval_ms: u64,
    /// Largest request body, bytes (default 1 MiB).
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    /// Most items in a batch (default 100).
    #[serde(default = "default_max_batch")]
    max_batch_items: usize,
    /// Most operations or conditions per etcd transaction: set it to
    /// etcd's `--max-txn-ops` (default 128).
    #[serde(default = "default_max_txn_ops")]
    max_txn_ops: usize,
    /// Serve the API over TLS with this certificate and key (PEM files).
    #[serde(default)]
    tls: Option<ServeTls>,
    /// Be the mesh CA: issue workload identities to nodes with a join
    /// token (needs `tls`).
    #[serde(default)]
    ca: Option<CaConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaConfig {
    /// The CA directory as `meshctl ca init` lays it out (`trust-domain`,
    /// `issuer.crt`, `issuer.key`, `bundle.pem`; `root.key` is not read:
    /// keep it offline).
    dir: PathBuf,
    /// Lifetime of the certificates issued, seconds (default 86400);
    /// nodes renew at half of it.
    #[serde(default = "default_identity_lifetime")]
    lifetime_s: u64,
}

fn default_identity_lifetime() -> u64 {
    86_400
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn default_max_body() -> usize {
    meshgate_admin::api::Limits::default().max_body_bytes
}

fn default_max_batch() -> usize {
    meshgate_admin::api::Limits::default().max_batch_items
}

fn default_max_txn_ops() -> usize {
    meshgate_admin::api::Limits::default().max_txn_ops
}

fn default_topology_interval() -> u64 {
    10_000
}

fn default_history_limit() -> usize {
    meshgate_admin::api::HISTORY_LIMIT
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    node::init_logging(&args.log);
    node::exit_on_error("meshgate-admin", 2, run(args).await);
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg: AdminConfig = node::load_checked(&args.config, |c: &AdminConfig| {
        let mut p = c.store.problems();
        if !(100..=600_000).contains(&c.topology_interval_ms) {
            p.push((
                "topology_interval_ms".into(),
                "must be from 100 to 600000".into(),
            ));
        }
        if !(1..=100_000).contains(&c.history_limit) {
            p.push(("history_limit".into(), "must be from 1 to 100000".into()));
        }
        if !(1024..=64 << 20).contains(&c.max_body_bytes) {
            p.push((
                "max_body_bytes".into(),
                "must be from 1024 to 67108864".into(),
            ));
        }
        if !(1..=10_000).contains(&c.max_batch_items) {
            p.push(("max_batch_items".into(), "must be from 1 to 10000".into()));
        }
        if c.max_txn_ops < 2 {
            p.push(("max_txn_ops".into(), "must be at least 2".into()));
        }
        if let Some(ca) = &c.ca {
            if c.tls.is_none() {
                p.push((
                    "ca".into(),
                    "needs tls: join tokens and certificates must not cross the network in plaintext".into(),
                ));
            }
            if !(2..=366 * 86_400).contains(&ca.lifetime_s) {
                p.push(("ca.lifetime_s".into(), "must be from 2 to 31622400".into()));
            }
        }
        p
    })?;
    let tokens = match &cfg.token_file {
        Some(p) => meshgate_admin::Tokens::load(p)?,
        None => meshgate_admin::Tokens::default(),
    };
    meshgate_admin::check_listen(cfg.listen, &tokens)?;
    let store = cfg.store.open().await?;
    let mut state = meshgate_admin::state(store.clone(), tokens);
    state.topology = Some(meshgate_admin::topology::Topology::spawn(
        store,
        Duration::from_millis(cfg.topology_interval_ms),
    ));
    if let Some(ca) = &cfg.ca {
        let issuer =
            meshgate_admin::issuer::MeshIssuer::load(&ca.dir, Duration::from_secs(ca.lifetime_s))?;
        tracing::info!(trust_domain = %issuer.trust_domain, lifetime_s = ca.lifetime_s, "mesh CA: issuing identities");
        state.issuer = Some(std::sync::Arc::new(issuer));
    }
    state.history_limit = cfg.history_limit;
    state.limits = meshgate_admin::api::Limits {
        max_body_bytes: cfg.max_body_bytes,
        max_batch_items: cfg.max_batch_items,
        max_txn_ops: cfg.max_txn_ops,
    };
    let state_issuer = state.issuer.clone();
    let app =
        meshgate_admin::router(state).route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: listen: cannot bind {}: {e}",
                args.config.display(),
                cfg.listen
            )
        })?;
    let shutdown = async {
        node::shutdown_signal().await;
        tracing::info!("shutting down");
        node::notify(node::Notify::Stopping);
    };
    // The admin keeps no state of its own: it serves once it listens.
    node::notify(node::Notify::Ready);
    match &cfg.tls {
        None => {
            tracing::info!(listen = %cfg.listen, "admin API listening");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        Some(t) => {
            let client_roots = match &state_issuer {
                Some(i) => Some(i.roots()?),
                None => None,
            };
            let tls = meshgate_admin::tls::server_config(&t.cert_file, &t.key_file, client_roots)?;
            tracing::info!(listen = %cfg.listen, "admin API listening (TLS)");
            meshgate_admin::tls::serve(listener, app, tls, shutdown).await?;
        }
    }
    Ok(())
}
