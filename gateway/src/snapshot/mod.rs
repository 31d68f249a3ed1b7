//! The compiled config snapshot the data plane reads, and the compiler that
//! turns store changes into new snapshots.
//!
//! Each change is decoded and validated alone: an invalid object is
//! rejected (and reported) while its previous good version stays in force.
//! The new snapshot is swapped in atomically; requests in flight finish on
//! the snapshot they started with. Upstream pools and endpoint health live
//! outside the snapshot and survive every swap.
//!
//! Applying a change costs what the change touches, not the size of the
//! config: the route tables, the service and group maps and the `/config`
//! view are persistent maps (a publish clones them in O(1)), and the
//! `/config` JSON is rendered when it is asked for, not on every change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_config::model::{
    CircuitBreaker, Consumer, Endpoint, Group, Instance, Mtls, Protocol, Rejection, Service,
    TcpRoute, Timeouts,
};
use meshgate_config::sync::{Apply, Change};
use meshgate_config::{Key, Kind, Object};

use crate::http::h2::{Clients, HttpClient, Wire};
use crate::http::limit::ConnLimit;
use crate::maps::FastMap;
use crate::policy::limit::LimitCheck;
use crate::policy::{ConsumerTable, EdgeCompiler};
use crate::routing::{CompiledRoute, Router};
use crate::tls::{CertTable, ClientTls, LiveIdentity, ServedCert, SharedCerts};
use crate::upstream::balance::{Balancer, RequestKey};
use crate::upstream::endpoint::EndpointRegistry;
use crate::upstream::health::HealthChecks;
use crate::upstream::resilience::{Outlier, Retry, ServiceShared, SharedRegistry};

/// Process-wide defaults for what a service or route does not set.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// The process's zone (locality preference), if it has one.
    pub zone: Option<String>,
}

/// A service ready for the data plane.
#[derive(Debug)]
pub struct ServiceRt {
    pub name: Arc<str>,
    pub version: i64,
    pub spec: Service,
    pub balancer: Balancer,
    /// The HTTP/2 client (HTTP/1.1 goes through each endpoint's pool).
    pub client: HttpClient,
    pub wire: Wire,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// One attempt's timeout (default: the whole request's).
    pub per_try_timeout: Option<Duration>,
    /// Response bodies and tunnels idle this long are closed.
    pub idle_timeout: Option<Duration>,
    /// What a consistent-hash service hashes.
    pub hash_on: Option<RequestKey>,
    /// The route used for a mesh request naming this service directly.
    pub implicit_route: Arc<CompiledRoute>,
    /// Breaker counters and the retry budget, shared across config changes.
    pub shared: Arc<ServiceShared>,
    pub breaker: CircuitBreaker,
    pub retry: Option<Retry>,
    pub outlier: Option<Outlier>,
    /// The service's own limit (`rate_limit`), over every caller.
    pub limit: Option<Arc<dyn LimitCheck>>,
}

/// The timeouts of one request: the route's, else the service's.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeouts {
    pub total: Duration,
    pub per_try: Duration,
    pub idle: Option<Duration>,
}

impl ServiceRt {
    /// The timeouts for a request on `route` (each field the route sets
    /// replaces the service's).
    pub fn timeouts(&self, route: Option<&Timeouts>) -> RequestTimeouts {
        let ms = |f: fn(&Timeouts) -> Option<u64>| route.and_then(f).map(Duration::from_millis);
        let total = ms(|t| t.request_ms).unwrap_or(self.request_timeout);
        let per_try = ms(|t| t.per_try_ms)
            .or(self.per_try_timeout)
            .unwrap_or(total)
            .min(total);
        RequestTimeouts {
            total,
            per_try,
            idle: ms(|t| t.idle_ms).or(self.idle_timeout),
        }
    }

    /// The connection limit of an attempt, when the breaker sets one.
    pub fn conn_limit(&self) -> Option<ConnLimit<'_>> {
        self.breaker.max_connections.map(|max| ConnLimit {
            counter: &self.shared.conns,
            max_connections: max,
            max_pending: self.breaker.max_pending_requests.unwrap_or(0),
        })
    }
}

/// An immutable view of the whole applied config.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub services: FastMap<Arc<str>, Arc<ServiceRt>>,
    pub groups: FastMap<String, Group>,
    pub mesh: Router,
    pub ingress: Router,
    /// L4 routes by name.
    pub tcp_routes: FastMap<String, Arc<TcpRoute>>,
    /// Every compiled route by name (both scopes), for `explain`.
    pub routes: FastMap<String, Arc<CompiledRoute>>,
    /// The ingress certificates (TLS listeners read them through
    /// [`Compiler::certs_handle`], at each handshake).
    pub certs: Arc<CertTable>,
    /// Some service has `allowed_callers` or some group denies by
    /// default: mesh calls are authorized (`proxy::authz`).
    pub authz_active: bool,
    /// The consumers, by credential, for routes with `auth` (none in a
    /// process without edge policies).
    pub consumers: Option<ConsumerTable>,
}

impl Snapshot {
    /// Drops the cached answers of route `route` (all, or those of `key`:
    /// `host` + target, or a target for every host). The number of keys
    /// dropped; an error for a route that does not exist or has no cache.
    pub fn purge_cache(&self, route: &str, key: Option<&str>) -> Result<u64, String> {
        let r = self
            .routes
            .get(route)
            .ok_or_else(|| format!("routes/{route} does not exist"))?;
        let cache = r
            .policy
            .as_ref()
            .and_then(|p| p.cache())
            .ok_or_else(|| format!("routes/{route} has no cache"))?;
        Ok(cache.purge(key))
    }

    /// The service's fallback service, when it names one other than itself.
    pub(crate) fn fallback_of(&self, svc: &ServiceRt) -> Option<Arc<ServiceRt>> {
        let name = svc.spec.fallback.as_deref()?;
        self.services
            .get(name)
            .filter(|f| f.name != svc.name)
            .cloned()
    }
}

/// The config objects refused as invalid, by key, each with its reason
/// (its previous good version stays in force). One handle is shared by
/// whatever applies config in a process (the compiler, a sidecar's policy)
/// and read by `/config`, `/readyz`, the metric and the node record.
#[derive(Debug, Clone, Default)]
pub struct Rejections(Arc<std::sync::Mutex<BTreeMap<Key, Rejection>>>);

impl Rejections {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Rejection>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `key` at `version` as refused, and logs it.
    pub fn reject(&self, key: &Key, version: i64, error: String) {
        tracing::error!(object = %key, version, %error, "config object rejected; previous version kept");
        let object = key.to_string();
        self.map().insert(
            key.clone(),
            Rejection {
                object,
                version,
                error,
            },
        );
    }

    /// `key` was accepted or deleted: no longer refused.
    pub fn clear(&self, key: &Key) {
        self.map().remove(key);
    }

    /// Every refusal, in key order.
    pub fn list(&self) -> Vec<Rejection> {
        self.map().values().cloned().collect()
    }
}

/// A service's TLS as a client config, offering by ALPN the protocol the
/// service speaks: its `tls`, or with `mtls` on, this process's mesh
/// identity, checking that the instance is one of the service (without a
/// mesh identity such a service is called in plaintext, which only a
/// permissive inbound takes).
fn upstream_tls(
    name: &str,
    svc: &Service,
    mesh: Option<&LiveIdentity>,
) -> Result<Option<Arc<ClientTls>>, String> {
    let alpn: &[&[u8]] = match svc.protocol {
        Protocol::Http2 | Protocol::Grpc => &[b"h2"],
        Protocol::Http1 | Protocol::Tcp => &[b"http/1.1"],
    };
    match (&svc.tls, svc.mtls, mesh) {
        (Some(spec), _, _) => ClientTls::new(spec, alpn).map(|t| Some(Arc::new(t))),
        (None, Mtls::Off, _) | (None, _, None) => Ok(None),
        (None, _, Some(mesh)) => mesh.client_tls(alpn, Some(name)).map(Some),
    }
}

/// Called after each publish with the snapshot.
pub(crate) type OnApply = Box<dyn Fn(&Snapshot) + Send>;

/// The shared handle the data plane reads from.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Turns store changes into snapshots. Runs in the sync task.
pub struct Compiler {
    shared: SharedSnapshot,
    defaults: Defaults,
    clients: Arc<Clients>,
    endpoints: Arc<EndpointRegistry>,
    service_shared: SharedRegistry,
    health: Arc<HealthChecks>,
    /// Services whose health checks follow the next publish (probers
    /// start or stop once the snapshot that has the service is out).
    checks_due: std::collections::BTreeSet<Arc<str>>,
    /// Accepted service specs (to recompile when their instances change),
    /// with their upstream TLS made ready.
    specs: std::collections::HashMap<String, (i64, Service, Option<Arc<ClientTls>>)>,
    /// Registered instances by service, then instance id.
    instances: std::collections::HashMap<String, BTreeMap<String, Instance>>,
    services: FastMap<Arc<str>, Arc<ServiceRt>>,
    routes: FastMap<String, Arc<CompiledRoute>>,
    mesh: Router,
    ingress: Router,
    tcp_routes: FastMap<String, Arc<TcpRoute>>,
    groups: FastMap<String, Group>,
    certs: Arc<CertTable>,
    /// The services with `allowed_callers` and the groups that deny by
    /// default (kept as they change, so a publish does not scan).
    authz: std::collections::BTreeSet<Key>,
    /// The certificates TLS listeners serve, updated at each publish.
    shared_certs: SharedCerts,
    /// Raw accepted objects (for the `/config` dump).
    accepted: imbl::OrdMap<Key, (i64, Arc<serde_json::Value>)>,
    rejected: Rejections,
    on_apply: OnApply,
    dump: ConfigDump,
    /// This process's mesh identity, for services with `mtls` on.
    mesh_identity: Option<Arc<LiveIdentity>>,
    /// Where a deleted route's or service's metric series are removed.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Accepted consumers; the table is rebuilt at the next publish when
    /// `consumers_changed`.
    consumer_specs: BTreeMap<String, Consumer>,
    consumers: Option<ConsumerTable>,
    consumers_changed: bool,
    /// The edge policies' compiler (a gateway's; none in a sidecar, which
    /// then links none of their code).
    edge: Option<Box<dyn EdgeCompiler>>,
}

/// What `/config` shows: the applied objects at the applied revision and
/// the rejected ones. Rendered to JSON on request.
#[derive(Clone, Default)]
pub struct ConfigDump {
    view: Arc<ArcSwap<DumpView>>,
}

#[derive(Default)]
struct DumpView {
    revision: i64,
    accepted: imbl::OrdMap<Key, (i64, Arc<serde_json::Value>)>,
}

impl std::fmt::Debug for ConfigDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigDump")
    }
}

impl ConfigDump {
    /// `{revision, objects: {kind: {name: {version, spec}}}, rejected: [...]}`.
    pub(crate) fn render(&self, rejected: &[Rejection]) -> serde_json::Value {
        let view = self.view.load();
        let mut kinds: BTreeMap<&str, BTreeMap<&str, serde_json::Value>> = BTreeMap::new();
        for (k, (v, obj)) in view.accepted.iter() {
            kinds
                .entry(k.kind.as_str())
                .or_default()
                .insert(&k.name, serde_json::json!({ "version": v, "spec": &**obj }));
        }
        serde_json::json!({ "revision": view.revision, "objects": kinds, "rejected": rejected })
    }
}

impl Compiler {
    pub fn new(
        shared: SharedSnapshot,
        defaults: Defaults,
        clients: Arc<Clients>,
        endpoints: Arc<EndpointRegistry>,
        health: Arc<HealthChecks>,
        on_apply: OnApply,
    ) -> Compiler {
        Compiler {
            shared,
            defaults,
            clients,
            endpoints,
            service_shared: SharedRegistry::default(),
            health,
            checks_due: Default::default(),
            specs: Default::default(),
            instances: Default::default(),
            services: Default::default(),
            routes: Default::default(),
            mesh: Router::default(),
            ingress: Router::default(),
            tcp_routes: Default::default(),
            groups: Default::default(),
            certs: Default::default(),
            authz: Default::default(),
            shared_certs: Default::default(),
            accepted: Default::default(),
            rejected: Rejections::default(),
            on_apply,
            dump: ConfigDump::default(),
            mesh_identity: None,
            metrics: None,
            consumer_specs: BTreeMap::new(),
            consumers: None,
            consumers_changed: false,
            edge: None,
        }
    }

    /// Compiles routes' and services' edge policies and the consumers
    /// with `edge` (`crate::policy::compiler`); without, they are ignored.
    pub fn with_edge_policies(mut self, edge: Box<dyn EdgeCompiler>) -> Compiler {
        self.edge = Some(edge);
        self
    }

    /// Drops the edge state of a deleted object.
    fn forget_edge(&self, key: &Key) {
        if let Some(e) = &self.edge {
            e.forget(&key.to_string());
        }
    }

    /// Removes the metric series of routes and services deleted from the
    /// config from `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Compiler {
        self.metrics = Some(metrics);
        self
    }

    /// Calls the instances of services with `mtls` on over mutual TLS
    /// with `identity`.
    pub fn with_mesh_identity(mut self, identity: Option<Arc<LiveIdentity>>) -> Compiler {
        self.mesh_identity = identity;
        self
    }

    /// A JSON dump of the applied config (accepted and rejected objects),
    /// updated after every change.
    pub fn dump_handle(&self) -> ConfigDump {
        self.dump.clone()
    }

    /// The applied certificates, for TLS listeners' certificate resolvers.
    pub fn certs_handle(&self) -> SharedCerts {
        self.shared_certs.clone()
    }

    /// The objects this compiler refused, updated as it applies changes.
    pub fn rejections(&self) -> Rejections {
        self.rejected.clone()
    }

    fn router_mut(&mut self, scope: meshgate_config::model::Scope) -> &mut Router {
        match scope {
            meshgate_config::model::Scope::Mesh => &mut self.mesh,
            meshgate_config::model::Scope::Ingress => &mut self.ingress,
        }
    }

    /// Takes a route out of the tables; `true` if it was there.
    fn remove_route(&mut self, name: &str) -> bool {
        match self.routes.remove(name) {
            Some(old) => {
                self.router_mut(old.scope).remove(&old);
                true
            }
            None => false,
        }
    }

    /// Compiles `name` from its accepted spec and its registered instances;
    /// its health checks are (re)started after the next publish.
    fn rebuild_service(&mut self, name: &str) {
        let Some((version, spec, tls)) = self.specs.get(name).cloned() else {
            return;
        };
        let rt = self.compile_service(name, version, spec, tls);
        self.checks_due.insert(rt.name.clone());
        self.services.insert(rt.name.clone(), Arc::new(rt));
    }

    /// Starts, changes or stops the health checks of the services changed
    /// since the last publish, as the published snapshot has them.
    fn follow_checks(&mut self) {
        for name in std::mem::take(&mut self.checks_due) {
            let rt = self.services.get(&name);
            let checked = rt.and_then(|rt| {
                let hc = rt.spec.health_check.as_ref()?;
                Some((hc, rt.balancer.endpoints().cloned().collect()))
            });
            self.health.set(&name, checked);
        }
    }

    fn compile_service(
        &self,
        name: &str,
        version: i64,
        mut spec: Service,
        tls: Option<Arc<ClientTls>>,
    ) -> ServiceRt {
        // Registered instances join the static endpoints (a static
        // endpoint with the same address wins).
        if let Some(inst) = self.instances.get(name) {
            for i in inst.values() {
                if spec.endpoints.iter().all(|e| e.address != i.address) {
                    spec.endpoints.push(Endpoint {
                        address: i.address.clone(),
                        weight: i.weight,
                        zone: i.zone.clone(),
                        priority: 0,
                        labels: i.labels.clone(),
                    });
                }
            }
        }
        let connect = spec
            .timeouts
            .connect_ms
            .map(Duration::from_millis)
            .unwrap_or(self.defaults.connect_timeout);
        let request_timeout = spec
            .timeouts
            .request_ms
            .map(Duration::from_millis)
            .unwrap_or(self.defaults.request_timeout);
        let wire = match spec.protocol {
            Protocol::Http2 | Protocol::Grpc => Wire::Http2,
            Protocol::Http1 | Protocol::Tcp => Wire::Http1,
        };
        // Balancer levels: by priority, and within a priority the
        // endpoints of this process's zone first.
        let members = spec
            .endpoints
            .iter()
            .map(|e| {
                let remote = match (&self.defaults.zone, &e.zone) {
                    (Some(mine), Some(theirs)) => u32::from(mine != theirs),
                    (Some(_), None) => 1,
                    (None, _) => 0,
                };
                let level = e.priority.saturating_mul(2).saturating_add(remote);
                (
                    self.endpoints.get_tls(&e.address, tls.clone()),
                    e.weight,
                    level,
                )
            })
            .collect();
        let limit = self
            .edge
            .as_ref()
            .and_then(|e| e.service_limit(name, &spec));
        ServiceRt {
            limit,
            name: name.into(),
            version,
            balancer: Balancer::with_policy(members, spec.load_balancing.into()),
            hash_on: spec.hash_on.as_ref().and_then(|h| {
                RequestKey::new(h.header.as_deref(), h.cookie.as_deref(), h.source_ip)
            }),
            client: self.clients.get(connect, tls),
            wire,
            connect_timeout: connect,
            request_timeout,
            per_try_timeout: spec.timeouts.per_try_ms.map(Duration::from_millis),
            idle_timeout: spec.timeouts.idle_ms.map(Duration::from_millis),
            implicit_route: Arc::new(CompiledRoute::implicit(name)),
            shared: self.service_shared.get(name),
            breaker: spec.circuit_breaker.unwrap_or_default(),
            retry: spec.retry.as_ref().map(Retry::new),
            outlier: spec.outlier_detection.as_ref().map(Outlier::from),
            spec,
        }
    }

    fn publish(&mut self, revision: i64) {
        if std::mem::take(&mut self.consumers_changed) {
            self.consumers = self
                .edge
                .as_ref()
                .map(|e| e.consumers(&self.consumer_specs));
        }
        let snap = Snapshot {
            consumers: self.consumers.clone(),
            revision,
            services: self.services.clone(),
            groups: self.groups.clone(),
            mesh: self.mesh.clone(),
            ingress: self.ingress.clone(),
            tcp_routes: self.tcp_routes.clone(),
            routes: self.routes.clone(),
            certs: self.certs.clone(),
            authz_active: !self.authz.is_empty(),
        };
        if !Arc::ptr_eq(&self.shared_certs.load(), &self.certs) {
            self.shared_certs.store(self.certs.clone());
        }
        (self.on_apply)(&snap);
        self.shared.store(Arc::new(snap));
        self.follow_checks();
        self.dump.view.store(Arc::new(DumpView {
            revision,
            accepted: self.accepted.clone(),
        }));
    }
}

impl Apply for Compiler {
    fn apply(&mut self, changes: Vec<Change>, revision: i64) {
        let mut touched = false;
        for change in changes {
            touched = true;
            match change {
                Change::Delete(key) => {
                    self.rejected.clear(&key);
                    self.accepted.remove(&key);
                    self.authz.remove(&key);
                    match key.kind {
                        Kind::Services => {
                            if let Some(m) = &self.metrics {
                                m.forget("service", &key.name);
                            }
                            self.services.remove(key.name.as_str());
                            self.specs.remove(&key.name);
                            self.forget_edge(&key);
                            self.checks_due.insert(key.name.as_str().into());
                        }
                        Kind::Instances => {
                            if let Some((svc, id)) = key.name.split_once('/') {
                                if let Some(m) = self.instances.get_mut(svc) {
                                    m.remove(id);
                                    if m.is_empty() {
                                        self.instances.remove(svc);
                                    }
                                }
                                let svc = svc.to_string();
                                self.rebuild_service(&svc);
                            }
                        }
                        Kind::TcpRoutes => {
                            self.tcp_routes.remove(&key.name);
                        }
                        Kind::Routes => {
                            self.forget_edge(&key);
                            let removed = self.remove_route(&key.name);
                            if let (true, Some(m)) = (removed, &self.metrics) {
                                m.forget("route", &key.name);
                            }
                        }
                        Kind::Groups => {
                            self.groups.remove(&key.name);
                        }
                        Kind::Certs => {
                            self.certs = Arc::new(self.certs.with(&key.name, None));
                        }
                        Kind::Consumers => {
                            self.consumer_specs.remove(&key.name);
                            self.forget_edge(&key);
                            self.consumers_changed = true;
                        }
                        _ => {}
                    }
                }
                Change::Put(entry) => {
                    let key = entry.key.clone();
                    let obj = match Object::decode(&key, &entry.value) {
                        Ok(o) => o,
                        Err(e) => {
                            self.rejected
                                .reject(&key, entry.mod_revision, e.to_string());
                            continue;
                        }
                    };
                    // A certificate is loaded before it is accepted (its
                    // key made ready to sign).
                    let cert = match &obj {
                        Object::Cert(c) => {
                            match ServedCert::new(&key.name, &c.certificate, &c.private_key) {
                                Ok(c) => Some(c),
                                Err(e) => {
                                    self.rejected.reject(
                                        &key,
                                        entry.mod_revision,
                                        format!("{key}: {e}"),
                                    );
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    // A service's upstream TLS is made ready before it is
                    // accepted (its CA loaded).
                    let tls = match &obj {
                        Object::Service(svc) => {
                            match upstream_tls(&key.name, svc, self.mesh_identity.as_deref()) {
                                Ok(t) => t,
                                Err(e) => {
                                    self.rejected.reject(
                                        &key,
                                        entry.mod_revision,
                                        format!("{key}: tls: {e}"),
                                    );
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    self.rejected.clear(&key);
                    if let Ok(mut v) = serde_json::from_slice(&entry.value) {
                        if let Some(info) = meshgate_config::validate::public_spec(key.kind, &mut v)
                        {
                            v["info"] = serde_json::json!(info);
                        }
                        self.accepted
                            .insert(key.clone(), (entry.mod_revision, Arc::new(v)));
                    }
                    match obj {
                        Object::Cert(_) => {
                            self.certs = Arc::new(self.certs.with(&key.name, cert));
                        }
                        Object::Service(s) => {
                            match s.allowed_callers.is_some() {
                                true => self.authz.insert(key.clone()),
                                false => self.authz.remove(&key),
                            };
                            self.specs
                                .insert(key.name.clone(), (entry.mod_revision, *s, tls));
                            self.rebuild_service(&key.name);
                        }
                        Object::Instance(i) => {
                            if let Some((svc, id)) = key.name.split_once('/') {
                                self.instances
                                    .entry(svc.to_string())
                                    .or_default()
                                    .insert(id.to_string(), i);
                                let svc = svc.to_string();
                                self.rebuild_service(&svc);
                            }
                        }
                        Object::TcpRoute(t) => {
                            self.tcp_routes.insert(key.name.clone(), Arc::new(t));
                        }
                        Object::Route(r) => {
                            let mut c = CompiledRoute::new(&key.name, entry.mod_revision, &r);
                            c.policy = self
                                .edge
                                .as_ref()
                                .and_then(|e| e.route(&key.name, entry.mod_revision, &r));
                            let c = Arc::new(c);
                            self.remove_route(&key.name);
                            self.router_mut(c.scope).insert(c.clone());
                            self.routes.insert(key.name.clone(), c);
                        }
                        Object::Group(g) => {
                            match g.authorization == meshgate_config::model::Authorization::Deny {
                                true => self.authz.insert(key.clone()),
                                false => self.authz.remove(&key),
                            };
                            self.groups.insert(key.name.clone(), g);
                        }
                        Object::Consumer(c) => {
                            self.consumer_specs.insert(key.name.clone(), *c);
                            self.consumers_changed = true;
                        }
                        Object::Node(_) => {}
                    }
                }
            }
        }
        let old_rev = self.shared.load().revision;
        if touched || revision != old_rev {
            if touched {
                tracing::info!(revision, "config applied");
            }
            self.publish(revision);
        }
    }
}

#[cfg(test)]
mod tests {
    use meshgate_config::store::Entry;

    use super::*;

    fn compiler(zone: Option<&str>) -> (Compiler, SharedSnapshot) {
        let shared: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let c = Compiler::new(
            shared.clone(),
            Defaults {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(1),
                zone: zone.map(str::to_string),
            },
            Default::default(),
            Default::default(),
            Default::default(),
            Box::new(|_| {}),
        );
        (c, shared)
    }

    fn put(kind: Kind, name: &str, json: serde_json::Value, rev: i64) -> Change {
        Change::Put(Entry {
            key: Key::new(kind, name),
            value: json.to_string().into_bytes(),
            mod_revision: rev,
        })
    }

    #[test]
    fn own_zone_first_then_spill_within_the_priority() {
        let (mut c, shared) = compiler(Some("z1"));
        let svc = serde_json::json!({"endpoints": [
            {"address": "10.0.0.1:80", "zone": "z2"},
            {"address": "10.0.0.2:80", "zone": "z1"},
            {"address": "10.0.0.3:80", "zone": "z1", "priority": 1},
        ]});
        c.apply(vec![put(Kind::Services, "s", svc, 2)], 2);
        let snap = shared.load_full();
        let s = snap.services.get("s").unwrap();
        for _ in 0..10 {
            assert_eq!(s.balancer.pick(&[]).unwrap().address, "10.0.0.2:80");
        }
        // The local endpoint down: the other zone of the same priority,
        // not the local endpoint of the lower priority.
        let local = s.balancer.pick(&[]).unwrap();
        local.on_failure();
        assert_eq!(s.balancer.pick(&[]).unwrap().address, "10.0.0.1:80");
    }

    #[test]
    fn instances_join_their_service_and_leave_it() {
        let (mut c, shared) = compiler(None);
        c.apply(
            vec![
                put(
                    Kind::Instances,
                    "s/i1",
                    serde_json::json!({"address": "10.0.0.9:80", "node": "n"}),
                    2,
                ),
                put(
                    Kind::Services,
                    "s",
                    serde_json::json!({"endpoints": [{"address": "10.0.0.1:80"}]}),
                    3,
                ),
            ],
            3,
        );
        let addrs = |shared: &SharedSnapshot| -> Vec<String> {
            let snap = shared.load_full();
            let mut v: Vec<String> = snap.services["s"]
                .balancer
                .endpoints()
                .map(|e| e.address.clone())
                .collect();
            v.sort();
            v
        };
        assert_eq!(addrs(&shared), ["10.0.0.1:80", "10.0.0.9:80"]);
        c.apply(vec![Change::Delete(Key::new(Kind::Instances, "s/i1"))], 4);
        assert_eq!(addrs(&shared), ["10.0.0.1:80"]);
    }
}
