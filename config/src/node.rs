//! What every Meshgate process shares at its edges: where the store is,
//! loading its node config file (errors name the file and the field),
//! logging set-up, and the shutdown signal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{ConfigStore, EtcdOptions, EtcdStore, FileStore};

/// Where the config lives: exactly one of `etcd` and `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Cluster mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
    /// Standalone mode: one YAML file of the config model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// etcd connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Bound on every etcd call, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// TLS to etcd (`https://` endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTls>,
    /// etcd user (etcd's authentication); its password is read from
    /// `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,
}

/// TLS to etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// PEM roots that etcd's certificate must chain to.
    pub ca_file: std::path::PathBuf,
    /// A client certificate and its key (PEM), for etcd's
    /// `--client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// The name etcd's certificate is checked for (default: the endpoint's
    /// host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

fn default_prefix() -> String {
    "/meshgate/v1".to_string()
}

fn default_timeout_ms() -> u64 {
    2000
}

impl StoreConfig {
    /// Checks the settings; returns `(field, message)` problems.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match (&self.etcd, &self.file) {
            (Some(_), Some(_)) | (None, None) => {
                out.push((
                    "store".into(),
                    "give exactly one of `etcd` and `file`".into(),
                ));
            }
            (Some(e), None) => {
                if e.endpoints.is_empty() {
                    out.push((
                        "store.etcd.endpoints".into(),
                        "must list at least one endpoint".into(),
                    ));
                }
                for (i, ep) in e.endpoints.iter().enumerate() {
                    if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                        out.push((
                            format!("store.etcd.endpoints[{i}]"),
                            "must be a URL such as http://127.0.0.1:2379".into(),
                        ));
                    }
                }
                let https = e.endpoints.iter().any(|ep| ep.starts_with("https://"));
                if https != e.tls.is_some() {
                    out.push((
                        "store.etcd.tls".into(),
                        "give `tls` exactly when the endpoints are https:// URLs".into(),
                    ));
                }
                if e.endpoints.iter().any(|ep| ep.starts_with("https://"))
                    && e.endpoints.iter().any(|ep| ep.starts_with("http://"))
                {
                    out.push((
                        "store.etcd.endpoints".into(),
                        "mixes http:// and https:// endpoints".into(),
                    ));
                }
                if let Some(t) = &e.tls {
                    if t.cert_file.is_some() != t.key_file.is_some() {
                        out.push((
                            "store.etcd.tls".into(),
                            "give both cert_file and key_file, or neither".into(),
                        ));
                    }
                }
                if e.user.is_some() != e.password_file.is_some() {
                    out.push((
                        "store.etcd.user".into(),
                        "give both user and password_file, or neither".into(),
                    ));
                }
                if !e.prefix.starts_with('/') {
                    out.push(("store.etcd.prefix".into(), "must start with '/'".into()));
                }
                if e.timeout_ms == 0 {
                    out.push((
                        "store.etcd.timeout_ms".into(),
                        "must be greater than 0".into(),
                    ));
                }
            }
            (None, Some(f)) => {
                if f.is_empty() {
                    out.push(("store.file".into(), "must name a file".into()));
                }
            }
        }
        out
    }

    /// Opens the store.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn ConfigStore>> {
        Ok(match (&self.etcd, &self.file) {
            (Some(e), _) => Arc::new(
                EtcdStore::connect(EtcdOptions {
                    endpoints: e.endpoints.clone(),
                    prefix: e.prefix.clone(),
                    timeout: Duration::from_millis(e.timeout_ms),
                    tls: e.tls.as_ref().map(etcd_tls).transpose()?,
                    user: match (&e.user, &e.password_file) {
                        (Some(u), Some(f)) => {
                            Some((u.clone(), read_secret(f, "store.etcd.password_file")?))
                        }
                        _ => None,
                    },
                })
                .await?,
            ),
            (None, Some(f)) => FileStore::open(f).await?,
            (None, None) => anyhow::bail!("store: give exactly one of `etcd` and `file`"),
        })
    }
}

/// The etcd client's TLS settings from their files (each error names its
/// field).
fn etcd_tls(t: &EtcdTls) -> anyhow::Result<etcd_client::TlsOptions> {
    let read = |p: &Path, field: &str| {
        std::fs::read(p)
            .map_err(|e| anyhow::anyhow!("store.etcd.tls.{field}: {}: {e}", p.display()))
    };
    let mut o = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(
        read(&t.ca_file, "ca_file")?,
    ));
    if let (Some(c), Some(k)) = (&t.cert_file, &t.key_file) {
        o = o.identity(etcd_client::Identity::from_pem(
            read(c, "cert_file")?,
            read(k, "key_file")?,
        ));
    }
    if let Some(n) = &t.server_name {
        o = o.domain_name(n.clone());
    }
    Ok(o)
}

/// A secret from a file (its first line, trimmed): a password, a token.
pub fn read_secret(path: &Path, field: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        anyhow::bail!("{field}: {} is empty", path.display());
    }
    Ok(secret)
}

/// Reads a YAML file into `T`. The error names the file and the field path,
/// e.g. `gateway.yaml: listen: invalid socket address syntax`.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    parse_yaml(path, text.as_bytes()).map_err(|e| anyhow::anyhow!(e))
}

/// Parses YAML into `T`; the error reads `<file>: <field path>: <problem>`.
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, String> {
    let de = serde_yaml::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_yaml starts some messages with the path (or its parent):
        // drop that, the full path is given once in front.
        let inner = match inner.split_once(": ") {
            Some((head, rest)) if !head.contains(' ') && field.starts_with(head) => rest,
            _ => inner.as_str(),
        };
        if field == "." {
            format!("{}: {inner}", path.display())
        } else {
            format!("{}: {field}: {inner}", path.display())
        }
    })
}

/// Formats validation problems of a node config file as one error.
pub fn problems_to_error(path: &Path, problems: Vec<(String, String)>) -> anyhow::Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = problems
        .into_iter()
        .map(|(f, m)| format!("{}: {f}: {m}", path.display()))
        .collect();
    Err(anyhow::anyhow!("{}", lines.join("\n")))
}

/// Loads a node config file and runs its semantic checks.
pub fn load_checked<T: DeserializeOwned>(
    path: &Path,
    problems: impl FnOnce(&T) -> Vec<(String, String)>,
) -> anyhow::Result<T> {
    let cfg: T = load_yaml(path)?;
    problems_to_error(path, problems(&cfg))?;
    Ok(cfg)
}

/// Sets up logging with a tracing env-filter (`--log` / `MESHGATE_LOG`).
pub fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
}

/// Prints `<binary>: <error>` and exits with `code` when `res` failed.
pub fn exit_on_error<T>(binary: &str, code: i32, res: anyhow::Result<T>) -> T {
    res.unwrap_or_else(|e| {
        eprintln!("{binary}: {e:#}");
        std::process::exit(code)
    })
}

/// Builds the process's tokio runtime: `workers` threads, or one per CPU
/// when 0. One worker runs everything on the calling thread (a
/// current-thread runtime: no cross-thread wake-ups, the cheapest choice
/// for a sidecar or a pinned single-core gateway).
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b.enable_all().build()
    }
}

/// Tells the service manager (systemd, `Type=notify`) how the process
/// stands: `READY=1` once it serves, `STOPPING=1` when it drains,
/// `MAINPID=` when a successor takes over. Does nothing when the process
/// was not started by one (no `NOTIFY_SOCKET`).
pub fn notify(state: Notify) {
    use sd_notify::NotifyState;
    let st = match state {
        Notify::Ready => NotifyState::Ready,
        Notify::Stopping => NotifyState::Stopping,
        Notify::MainPid(pid) => NotifyState::MainPid(pid),
    };
    if let Err(e) = sd_notify::notify(false, &[st]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// What [`notify`] tells the service manager.
#[derive(Debug, Clone, Copy)]
pub enum Notify {
    Ready,
    Stopping,
    /// A successor process with this pid is now the service's main process.
    MainPid(u32),
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        roles: Vec<crate::model::Role>,
        store: StoreConfig,
    }

    #[test]
    fn yaml_errors_name_file_and_field_once() {
        let p = Path::new("gw.yaml");
        let e = parse_yaml::<Doc>(p, b"roles: [egres]\nstore: {}\n").unwrap_err();
        assert!(
            e.starts_with("gw.yaml: roles[0]: unknown variant `egres`"),
            "{e}"
        );
        let e = parse_yaml::<Doc>(p, b"roles: []\nstore: {etcd: {endpoints: [], colour: 1}}\n")
            .unwrap_err();
        assert!(
            e.starts_with("gw.yaml: store.etcd.colour: unknown field `colour`")
                || e.starts_with("gw.yaml: store.etcd: unknown field `colour`"),
            "{e}"
        );
        let doc: Doc = parse_yaml(p, b"roles: [egress]\nstore: {file: m.yaml}\n").unwrap();
        assert_eq!(doc.store.problems(), vec![]);
        let doc: Doc = parse_yaml(p, b"roles: [egress]\nstore: {}\n").unwrap();
        assert_eq!(doc.store.problems()[0].0, "store");
    }

    #[test]
    fn etcd_tls_and_credentials_come_whole() {
        let problems = |etcd: &str| {
            let doc: Doc = parse_yaml(
                Path::new("gw.yaml"),
                format!("roles: []\nstore: {{etcd: {etcd}}}\n").as_bytes(),
            )
            .unwrap();
            doc.store
                .problems()
                .into_iter()
                .map(|(f, _)| f)
                .collect::<Vec<_>>()
        };
        assert_eq!(problems("{endpoints: ['https://e:2379'], tls: {ca_file: ca.pem}, user: u, password_file: p}"), Vec::<String>::new());
        assert_eq!(
            problems("{endpoints: ['https://e:2379']}"),
            ["store.etcd.tls"]
        );
        assert_eq!(
            problems("{endpoints: ['http://e:2379'], tls: {ca_file: ca.pem}}"),
            ["store.etcd.tls"]
        );
        assert_eq!(
            problems("{endpoints: ['https://e:2379', 'http://f:2379'], tls: {ca_file: ca.pem}}"),
            ["store.etcd.endpoints"]
        );
        assert_eq!(
            problems("{endpoints: ['https://e:2379'], tls: {ca_file: ca.pem, cert_file: c.pem}}"),
            ["store.etcd.tls"]
        );
        assert_eq!(
            problems("{endpoints: ['http://e:2379'], user: u}"),
            ["store.etcd.user"]
        );
    }

    #[test]
    fn a_secret_is_the_first_line_of_its_file_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "  s3cret \nignored\n").unwrap();
        assert_eq!(read_secret(&f, "password_file").unwrap(), "s3cret");
        std::fs::write(&f, "\n").unwrap();
        let e = read_secret(&f, "password_file").unwrap_err().to_string();
        assert!(
            e.starts_with("password_file: ") && e.ends_with("is empty"),
            "{e}"
        );
    }
}
