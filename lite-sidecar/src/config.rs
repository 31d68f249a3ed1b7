//! The sidecar's node config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use meshgate_config::node::StoreConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Unique node id (its key in `nodes/`).
    pub id: String,
    /// The service of the local app (sent as `x-mesh-source`).
    pub service: String,
    /// The app's service group: its egress gateways are the first tier.
    pub group: String,
    /// App-facing listener; must be a loopback address.
    pub listen: SocketAddr,
    /// Ops port: /healthz, /readyz, /metrics, /config.
    pub admin_listen: SocketAddr,
    /// Bootstrap addresses of the central gateway tier (`host:port`), used
    /// when local policy is unavailable; refreshed from etcd when reachable.
    #[serde(default)]
    pub central: Vec<String>,
    pub store: StoreConfig,
    /// Bearer tokens (the admin API's token file format) that may read
    /// the ops port's config endpoints; without, only loopback clients may.
    #[serde(default)]
    pub ops_token_file: Option<PathBuf>,
    /// Limits of client connections on every listener.
    #[serde(default)]
    pub client: meshgate_gateway::node::ClientSettings,
    /// Last-known-good local-policy file.
    #[serde(default)]
    pub snapshot_file: Option<PathBuf>,
    /// Policy older than this (while the store is unreachable) is treated
    /// as unavailable; the group's `max_policy_staleness_s` overrides it.
    #[serde(default = "default_staleness")]
    pub max_policy_staleness_s: u64,
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u64,
    #[serde(default)]
    pub proxy: SidecarProxy,
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// After SIGTERM, how long the listeners keep accepting once readiness
    /// went false, ms; default 0.
    #[serde(default)]
    pub drain_delay_ms: u64,
    /// The Unix socket a new binary takes the listening sockets over from
    /// (`--takeover`, `meshgate-sidecar upgrade`); hot upgrades are off
    /// without it.
    #[serde(default)]
    pub upgrade_socket: Option<PathBuf>,
    /// Worker threads (default 1: a sidecar serves one app, and one thread
    /// keeps its CPU and memory small; 0 = one per CPU).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// The local app as an instance of `service`: registered under
    /// `instances/<service>/<id>` with a lease while it passes its health
    /// check, so gateways send it traffic.
    #[serde(default)]
    pub app: Option<AppInstance>,
    /// Per-service local ports, for clients that cannot name the
    /// destination in a header: everything on `listen` goes to `service`.
    #[serde(default)]
    pub local_ports: Vec<LocalPort>,
    /// The sidecar's mesh identity: mutual TLS to the gateway tiers (and
    /// to the instances of direct destinations with `mtls` on).
    #[serde(default)]
    pub mesh_tls: Option<meshgate_gateway::node::MeshTlsSettings>,
    /// The inbound listener: terminates the mesh's mutual TLS for calls
    /// of the local app, authorizes the caller, and forwards to `app`
    /// on loopback. The app's instance is registered at this address.
    #[serde(default)]
    pub inbound: Option<Inbound>,
    /// The access log (off unless set): a JSON line per request of the
    /// app, and per call taken by the inbound.
    #[serde(default)]
    pub access_log: meshgate_gateway::observe::AccessLogSettings,
    /// Spans exported over OTLP (off unless set).
    #[serde(default)]
    pub tracing: Option<meshgate_gateway::observe::TracingSettings>,
}

/// The sidecar's inbound listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Where gateways (and other sidecars' direct tiers) reach the app,
    /// e.g. `0.0.0.0:15006`.
    pub listen: SocketAddr,
    /// The address registered for the instance (`host:port`), when
    /// `listen` is not one others can dial (an unspecified address).
    #[serde(default)]
    pub advertise: Option<String>,
}

impl Inbound {
    /// The address registered as the app's instance.
    pub fn address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// A local port bound to one destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPort {
    /// Loopback address to listen on, e.g. `127.0.0.1:16001`.
    pub listen: SocketAddr,
    pub service: String,
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// What a local port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1 or HTTP/2 (gRPC included); the port names the destination.
    #[default]
    Http,
    /// Plain TCP: bytes are tunnelled to the destination (directly, or
    /// through an HTTP `CONNECT` tunnel via the gateway tiers).
    Tcp,
}

/// The local app, as gateways reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppInstance {
    /// The app's address as gateways reach it (`host:port`).
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    /// E.g. `{version: v2}`.
    #[serde(default)]
    pub labels: meshgate_config::model::Labels,
    /// How the sidecar checks the app (default: TCP connect every second,
    /// healthy after 1 pass, unhealthy after 2 failures).
    #[serde(default = "default_app_check")]
    pub health_check: meshgate_config::model::HealthCheck,
    /// On shutdown, how long to wait for the gateways to apply the
    /// deregistration before draining.
    #[serde(default = "default_deregister_wait")]
    pub deregister_wait_ms: u64,
}

fn default_weight() -> u32 {
    1
}
fn default_deregister_wait() -> u64 {
    5_000
}
fn default_app_check() -> meshgate_config::model::HealthCheck {
    meshgate_config::model::HealthCheck {
        http: None,
        tcp: true,
        interval_ms: 1_000,
        timeout_ms: 500,
        healthy_threshold: 1,
        unhealthy_threshold: 2,
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarProxy {
    pub max_hops: u32,
    pub replay_buffer_bytes: usize,
    /// Connect timeout to a gateway member.
    pub connect_timeout_ms: u64,
    /// Time for a tier to answer with response headers.
    pub request_timeout_ms: u64,
    /// Every gateway member is checked with a TCP connect this often, so a
    /// dead member is skipped before a request tries it (0: off).
    pub member_check_interval_ms: u64,
}

impl Default for SidecarProxy {
    fn default() -> Self {
        SidecarProxy {
            max_hops: 8,
            replay_buffer_bytes: 64 * 1024,
            connect_timeout_ms: 1000,
            request_timeout_ms: 15_000,
            member_check_interval_ms: 1000,
        }
    }
}

fn default_staleness() -> u64 {
    3600
}
fn default_lease_ttl() -> u64 {
    10
}
fn default_grace() -> u64 {
    10_000
}
fn default_workers() -> usize {
    1
}

impl SidecarConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = self.store.problems();
        let name_ok = meshgate_config::key::valid_name;
        for (field, v) in [
            ("id", &self.id),
            ("service", &self.service),
            ("group", &self.group),
        ] {
            if !name_ok(v) {
                p.push((
                    field.into(),
                    "must be 1-128 characters of a-z, 0-9, '-', '_', '.'".into(),
                ));
            }
        }
        if !self.listen.ip().is_loopback() {
            p.push((
                "listen".into(),
                "the app-facing listener must be a loopback address".into(),
            ));
        }
        for (i, c) in self.central.iter().enumerate() {
            if !meshgate_config::validate::valid_address(c) {
                p.push((format!("central[{i}]"), "must be host:port".into()));
            }
        }
        if self.max_policy_staleness_s == 0 {
            p.push(("max_policy_staleness_s".into(), "must be at least 1".into()));
        }
        if self.lease_ttl_s < 2 {
            p.push(("lease_ttl_s".into(), "must be at least 2".into()));
        }
        if self.proxy.connect_timeout_ms == 0 || self.proxy.request_timeout_ms == 0 {
            p.push(("proxy".into(), "timeouts must be greater than 0".into()));
        }
        let mut bound = vec![self.listen, self.admin_listen];
        for (i, lp) in self.local_ports.iter().enumerate() {
            if !lp.listen.ip().is_loopback() {
                p.push((
                    format!("local_ports[{i}].listen"),
                    "must be a loopback address".into(),
                ));
            }
            if lp.listen.port() != 0 && bound.contains(&lp.listen) {
                p.push((
                    format!("local_ports[{i}].listen"),
                    "address already used by another listener".into(),
                ));
            }
            bound.push(lp.listen);
            if !name_ok(&lp.service) {
                p.push((
                    format!("local_ports[{i}].service"),
                    "must be 1-128 characters of a-z, 0-9, '-', '_', '.'".into(),
                ));
            }
        }
        if let Some(app) = &self.app {
            if !meshgate_config::validate::valid_address(&app.address) {
                p.push(("app.address".into(), "must be host:port".into()));
            }
            if !(1..=10_000).contains(&app.weight) {
                p.push(("app.weight".into(), "must be from 1 to 10000".into()));
            }
            for e in meshgate_config::validate::health_check_problems(&app.health_check) {
                p.push((format!("app.{}", e.field), e.message));
            }
        }
        p.extend(self.client.problems());
        p.extend(self.mesh_tls.iter().flat_map(|t| t.problems()));
        p.extend(self.access_log.problems());
        p.extend(self.tracing.iter().flat_map(|t| t.problems()));
        if let Some(i) = &self.inbound {
            p.extend(i.problems(self, &bound));
        }
        p
    }
}

impl Inbound {
    fn problems(&self, cfg: &SidecarConfig, bound: &[SocketAddr]) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut push = |f: &str, m: &str| p.push((f.to_string(), m.to_string()));
        if cfg.mesh_tls.is_none() {
            push(
                "inbound",
                "needs mesh_tls (the inbound serves mutual TLS with the sidecar's identity)",
            );
        }
        match &cfg.app {
            None => push("inbound", "needs app (the local app it forwards to)"),
            Some(app) if !loopback(&app.address) => push(
                "app.address",
                "with an inbound listener the app must listen on loopback (127.0.0.1, ::1 or localhost): the inbound is its only way in",
            ),
            Some(_) => {}
        }
        if self.listen.port() != 0 && bound.contains(&self.listen) {
            push("inbound.listen", "address already used by another listener");
        }
        match &self.advertise {
            Some(a) if !meshgate_config::validate::valid_address(a) => {
                push("inbound.advertise", "must be host:port")
            }
            None if self.listen.ip().is_unspecified() || self.listen.port() == 0 => push(
                "inbound.advertise",
                "required when inbound.listen is an unspecified address or port 0",
            ),
            _ => {}
        }
        p
    }
}

/// Whether `address` (`host:port`) is on loopback.
fn loopback(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> SidecarConfig {
        let base = "id: sc\nservice: orders\ngroup: shop\nlisten: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\nstore: {file: x.yaml}\n";
        serde_yaml::from_str(&format!("{base}{extra}")).unwrap()
    }

    fn fields(c: &SidecarConfig) -> Vec<String> {
        c.problems().into_iter().map(|(f, _)| f).collect::<Vec<_>>()
    }

    #[test]
    fn an_inbound_needs_an_identity_an_app_on_loopback_and_an_address() {
        let tls = "mesh_tls: {cert_file: a, key_file: b, ca_file: c}\n";
        let ok = config(&format!(
            "{tls}app: {{address: 127.0.0.1:8080}}\ninbound: {{listen: 127.0.0.1:15006}}\n"
        ));
        assert_eq!(fields(&ok), Vec::<String>::new());
        assert_eq!(ok.inbound.unwrap().address(), "127.0.0.1:15006");
        let no_tls = config("app: {address: 127.0.0.1:8080}\ninbound: {listen: 127.0.0.1:15006}\n");
        assert_eq!(fields(&no_tls), ["inbound"]);
        let no_app = config(&format!("{tls}inbound: {{listen: 127.0.0.1:15006}}\n"));
        assert_eq!(fields(&no_app), ["inbound"]);
        let open_app = config(&format!(
            "{tls}app: {{address: 10.0.0.5:8080}}\ninbound: {{listen: 127.0.0.1:15006}}\n"
        ));
        assert_eq!(fields(&open_app), ["app.address"]);
        let anywhere = config(&format!(
            "{tls}app: {{address: localhost:8080}}\ninbound: {{listen: 0.0.0.0:15006}}\n"
        ));
        assert_eq!(fields(&anywhere), ["inbound.advertise"]);
        let advertised = config(&format!(
            "{tls}app: {{address: '[::1]:8080'}}\ninbound: {{listen: 0.0.0.0:15006, advertise: 10.0.0.5:15006}}\n"
        ));
        assert_eq!(fields(&advertised), Vec::<String>::new());
        assert_eq!(advertised.inbound.unwrap().address(), "10.0.0.5:15006");
        let clash = config(&format!(
            "{tls}app: {{address: 127.0.0.1:8080}}\ninbound: {{listen: 127.0.0.1:2}}\n"
        ));
        assert_eq!(fields(&clash), ["inbound.listen"]);
    }
}
