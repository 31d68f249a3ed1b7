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
use meshgate_config::model::{Group, Protocol, Service, Timeouts};
use meshgate_config::sync::{Apply, Change};
use meshgate_config::{Key, Kind, Object};
use serde::Serialize;

use crate::balance::{Balancer, EndpointRegistry, RequestKey};
use crate::client::{Clients, HttpClient, Wire};
use crate::router::{CompiledRoute, Router};

/// Process-wide defaults for what a service or route does not set.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
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
    /// What a consistent-hash service hashes.
    pub hash_on: Option<RequestKey>,
    /// The route used for a mesh request naming this service directly.
    pub implicit_route: Arc<CompiledRoute>,
}

impl ServiceRt {
    /// The request timeout for a route (its own, else the service's).
    pub fn request_timeout(&self, route: Option<&Timeouts>) -> Duration {
        route
            .and_then(|t| t.request_ms)
            .map(Duration::from_millis)
            .unwrap_or(self.request_timeout)
    }
}

/// An immutable view of the whole applied config.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub services: imbl::HashMap<Arc<str>, Arc<ServiceRt>>,
    pub groups: imbl::HashMap<String, Group>,
    pub mesh: Router,
    pub ingress: Router,
}

/// What was rejected and why, for `/config` and logs.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub object: String,
    pub version: i64,
    pub error: String,
}

/// Called after each publish with the snapshot and the count of rejected objects.
pub type OnApply = Box<dyn Fn(&Snapshot, usize) + Send>;

/// The shared handle the data plane reads from.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Turns store changes into snapshots. Runs in the sync task.
pub struct Compiler {
    shared: SharedSnapshot,
    defaults: Defaults,
    clients: Arc<Clients>,
    endpoints: Arc<EndpointRegistry>,
    services: imbl::HashMap<Arc<str>, Arc<ServiceRt>>,
    routes: imbl::HashMap<String, Arc<CompiledRoute>>,
    mesh: Router,
    ingress: Router,
    groups: imbl::HashMap<String, Group>,
    /// Raw accepted objects (for the `/config` dump).
    accepted: imbl::OrdMap<Key, (i64, Arc<serde_json::Value>)>,
    rejected: Arc<std::sync::Mutex<BTreeMap<Key, Rejected>>>,
    on_apply: OnApply,
    dump: ConfigDump,
}

/// What `/config` shows: the applied objects at the applied revision and
/// the rejected ones. Rendered to JSON on request.
#[derive(Clone, Default)]
pub struct ConfigDump {
    view: Arc<ArcSwap<DumpView>>,
    rejected: Arc<std::sync::Mutex<BTreeMap<Key, Rejected>>>,
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
    pub fn render(&self) -> serde_json::Value {
        let view = self.view.load();
        let mut kinds: BTreeMap<&str, BTreeMap<&str, serde_json::Value>> = BTreeMap::new();
        for (k, (v, obj)) in view.accepted.iter() {
            kinds
                .entry(k.kind.as_str())
                .or_default()
                .insert(&k.name, serde_json::json!({ "version": v, "spec": &**obj }));
        }
        let rejected: Vec<Rejected> = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        serde_json::json!({ "revision": view.revision, "objects": kinds, "rejected": rejected })
    }
}

impl Compiler {
    pub fn new(
        shared: SharedSnapshot,
        defaults: Defaults,
        clients: Arc<Clients>,
        endpoints: Arc<EndpointRegistry>,
        on_apply: OnApply,
    ) -> Compiler {
        let rejected: Arc<std::sync::Mutex<BTreeMap<Key, Rejected>>> = Default::default();
        Compiler {
            shared,
            defaults,
            clients,
            endpoints,
            services: Default::default(),
            routes: Default::default(),
            mesh: Router::default(),
            ingress: Router::default(),
            groups: Default::default(),
            accepted: Default::default(),
            rejected: rejected.clone(),
            on_apply,
            dump: ConfigDump {
                view: Default::default(),
                rejected,
            },
        }
    }

    /// A JSON dump of the applied config (accepted and rejected objects),
    /// updated after every change.
    pub fn dump_handle(&self) -> ConfigDump {
        self.dump.clone()
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

    fn compile_service(&self, name: &str, version: i64, spec: Service) -> ServiceRt {
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
        let members = spec
            .endpoints
            .iter()
            .map(|e| (self.endpoints.get(&e.address), e.weight, e.priority))
            .collect();
        ServiceRt {
            name: name.into(),
            version,
            balancer: Balancer::with_policy(members, spec.load_balancing.into()),
            hash_on: spec.hash_on.as_ref().and_then(|h| {
                RequestKey::new(h.header.as_deref(), h.cookie.as_deref(), h.source_ip)
            }),
            client: self.clients.get(wire, connect),
            wire,
            connect_timeout: connect,
            request_timeout,
            implicit_route: Arc::new(CompiledRoute::implicit(name)),
            spec,
        }
    }

    fn reject(&mut self, key: &Key, version: i64, error: String) {
        tracing::error!(object = %key, version, %error, "config object rejected; previous version kept");
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Rejected {
                    object: key.to_string(),
                    version,
                    error,
                },
            );
    }

    fn publish(&mut self, revision: i64) {
        let snap = Snapshot {
            revision,
            services: self.services.clone(),
            groups: self.groups.clone(),
            mesh: self.mesh.clone(),
            ingress: self.ingress.clone(),
        };
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        (self.on_apply)(&snap, rejected);
        self.shared.store(Arc::new(snap));
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
                    self.rejected
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    self.accepted.remove(&key);
                    match key.kind {
                        Kind::Services => {
                            self.services.remove(key.name.as_str());
                        }
                        Kind::Routes => {
                            self.remove_route(&key.name);
                        }
                        Kind::Groups => {
                            self.groups.remove(&key.name);
                        }
                        _ => {}
                    }
                }
                Change::Put(entry) => {
                    let key = entry.key.clone();
                    let obj = match Object::decode(&key, &entry.value) {
                        Ok(o) => o,
                        Err(e) => {
                            self.reject(&key, entry.mod_revision, e.to_string());
                            continue;
                        }
                    };
                    self.rejected
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    if let Ok(v) = serde_json::from_slice(&entry.value) {
                        self.accepted
                            .insert(key.clone(), (entry.mod_revision, Arc::new(v)));
                    }
                    match obj {
                        Object::Service(s) => {
                            let rt = self.compile_service(&key.name, entry.mod_revision, s);
                            self.services.insert(rt.name.clone(), Arc::new(rt));
                        }
                        Object::Route(r) => {
                            let c = Arc::new(CompiledRoute::new(&key.name, entry.mod_revision, &r));
                            self.remove_route(&key.name);
                            self.router_mut(c.scope).insert(c.clone());
                            self.routes.insert(key.name.clone(), c);
                        }
                        Object::Group(g) => {
                            self.groups.insert(key.name.clone(), g);
                        }
                        Object::Node(_) | Object::Instance(_) => {}
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
