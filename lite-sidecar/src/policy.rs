//! Local policy: the sidecar's own slice of config, and nothing more.
//!
//! It watches `nodes/gateway/` (gateway members), `groups/<its group>`,
//! `services/<its service>` and, for every destination its service calls
//! in `direct` mode, `services/<destination>` and `instances/<destination>/`.
//! The watched set follows the service's `destinations` (the sync re-reads
//! when it changes), so memory and start-up time grow with what this
//! service calls, not with the mesh.
//!
//! It compiles them into:
//! - the destinations covered, each with its mode (a call to any other
//!   destination goes to the central tier);
//! - the gateway tiers: the group's egress gateways, then the central
//!   gateways (from etcd plus the bootstrap list of its config file), every
//!   member health-checked (TCP connect) so a dead one is skipped before a
//!   request tries it;
//! - the direct tier: the gateway's own config compiler, fed only the
//!   direct destinations, so the sidecar balances to their endpoints with
//!   the same health checks, outlier detection, breakers, retries and
//!   timeouts as a gateway;
//! - the inbound ([`InboundFeed`]): the gateway's compiler again, fed the
//!   sidecar's own service as the local app (its one endpoint the app's
//!   loopback address; its `allowed_callers`, protocol and timeouts kept)
//!   and its group (the authorization default); and the inbound
//!   listener's mode from the service's `mtls` (plaintext callers taken
//!   unless `strict`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use meshgate_config::key::node_prefix;
use meshgate_config::model::{
    DestinationMode, Group, HealthCheck, Mtls, Node, NodeKind, Role, Service,
};
use meshgate_config::store::Entry;
use meshgate_config::sync::{diff, Apply, Change};
use meshgate_config::{Key, Kind, Object};
use meshgate_gateway::snapshot::{Compiler, Rejections};
use meshgate_gateway::tls::{ClientTls, LiveIdentity};
use meshgate_gateway::upstream::balance::Balancer;
use meshgate_gateway::upstream::endpoint::EndpointRegistry;
use meshgate_gateway::upstream::health::HealthChecks;
use serde_json::json;
use tokio::sync::watch;

/// A tier of gateway members.
#[derive(Debug)]
pub struct Tier {
    pub name: &'static str,
    pub members: Balancer,
    pub addresses: Vec<String>,
}

/// The compiled local policy.
#[derive(Debug)]
pub struct Policy {
    pub group: Option<Group>,
    pub group_tier: Tier,
    pub central_tier: Tier,
    /// Every live gateway's id and applied config revision.
    pub gateway_revisions: Vec<(String, i64)>,
    /// The destinations the service calls, and how.
    pub destinations: HashMap<String, DestinationMode>,
}

impl Policy {
    /// The gateways that have not applied `revision` yet.
    pub fn gateways_behind(&self, revision: i64) -> Vec<String> {
        self.gateway_revisions
            .iter()
            .filter(|(_, r)| *r < revision)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

pub type SharedPolicy = Arc<ArcSwap<Policy>>;

/// What the inbound listener's data plane is compiled from.
pub struct InboundFeed {
    pub compiler: Compiler,
    /// The app on loopback.
    pub app_address: String,
    /// The sidecar's identity, whose listener follows the service's `mtls`.
    pub identity: Arc<LiveIdentity>,
    fed: BTreeMap<Key, Entry>,
}

impl InboundFeed {
    pub fn new(compiler: Compiler, app_address: String, identity: Arc<LiveIdentity>) -> Self {
        InboundFeed {
            compiler,
            app_address,
            identity,
            fed: BTreeMap::new(),
        }
    }

    /// The own service as the local app: one endpoint, the app; no TLS,
    /// health checks, outlier detection, retries, fallback or breaker
    /// (the calling gateway has them, over all instances).
    fn local_app(&self, entry: &Entry) -> Option<Entry> {
        let mut v: serde_json::Value = serde_json::from_slice(&entry.value).ok()?;
        let o = v.as_object_mut()?;
        for field in [
            "tls",
            "mtls",
            "health_check",
            "outlier_detection",
            "retry",
            "fallback",
            "circuit_breaker",
            "hash_on",
            "destinations",
            "load_balancing",
        ] {
            o.remove(field);
        }
        o.insert("endpoints".into(), json!([{ "address": self.app_address }]));
        Some(Entry {
            key: entry.key.clone(),
            value: serde_json::to_vec(&v).ok()?,
            mod_revision: entry.mod_revision,
        })
    }
}

/// Builds the policy from store changes.
pub struct PolicyCompiler {
    shared: SharedPolicy,
    group_name: String,
    service_name: String,
    bootstrap_central: Vec<String>,
    registry: Arc<EndpointRegistry>,
    /// Mutual TLS to the gateway tiers (the sidecar's mesh identity).
    mesh_tls: Option<Arc<ClientTls>>,
    /// TCP checks of the gateway members, when enabled.
    member_checks: Option<(Arc<HealthChecks>, HealthCheck)>,
    gateways: BTreeMap<String, Node>,
    group: Option<Group>,
    service: Option<Service>,
    /// Every `services/` and `instances/` object received.
    services: BTreeMap<Key, Entry>,
    /// What the direct tier's compiler holds (a subset of `services`).
    fed: BTreeMap<Key, Entry>,
    direct: Compiler,
    /// The prefixes to watch; the sync follows this channel.
    scope: watch::Sender<Vec<String>>,
    dump: Arc<std::sync::Mutex<serde_json::Value>>,
    /// Refused objects: the group and own service refused here, and the
    /// direct tier's (one handle, shared with its compiler).
    rejected: Rejections,
    /// The group as last accepted (fed to the inbound).
    group_entry: Option<Entry>,
    inbound: Option<InboundFeed>,
}

impl PolicyCompiler {
    /// `direct` is the compiler of the direct tier's snapshot.
    pub fn new(
        group_name: String,
        service_name: String,
        bootstrap_central: Vec<String>,
        registry: Arc<EndpointRegistry>,
        member_checks: Option<(Arc<HealthChecks>, HealthCheck)>,
        direct: Compiler,
        mesh_tls: Option<Arc<ClientTls>>,
    ) -> (Self, SharedPolicy, watch::Receiver<Vec<String>>) {
        let shared = Arc::new(ArcSwap::from_pointee(Policy {
            group: None,
            group_tier: tier("group", &registry, vec![], &mesh_tls),
            central_tier: tier("central", &registry, bootstrap_central.clone(), &mesh_tls),
            gateway_revisions: Vec::new(),
            destinations: HashMap::new(),
        }));
        let (scope, scope_rx) = watch::channel(Vec::new());
        let c = PolicyCompiler {
            shared: shared.clone(),
            group_name,
            service_name,
            bootstrap_central,
            registry,
            member_checks,
            mesh_tls,
            gateways: BTreeMap::new(),
            group: None,
            service: None,
            services: BTreeMap::new(),
            fed: BTreeMap::new(),
            rejected: direct.rejections(),
            direct,
            scope,
            dump: Arc::new(std::sync::Mutex::new(serde_json::Value::Null)),
            group_entry: None,
            inbound: None,
        };
        c.scope.send_replace(c.prefixes());
        (c, shared, scope_rx)
    }

    /// Compiles the inbound listener's data plane too.
    pub fn with_inbound(mut self, feed: Option<InboundFeed>) -> Self {
        self.inbound = feed;
        self
    }

    /// Feeds the inbound its service and group, and sets its listener's
    /// mode from the service's `mtls`.
    fn feed_inbound(&mut self, revision: i64) {
        let Some(feed) = &mut self.inbound else {
            return;
        };
        let own = Key::new(Kind::Services, &self.service_name);
        let mut want = BTreeMap::new();
        if let Some(e) = self.services.get(&own).filter(|_| self.service.is_some()) {
            if let Some(app) = feed.local_app(e) {
                want.insert(own.clone(), app);
            }
        }
        if let Some(g) = &self.group_entry {
            want.insert(g.key.clone(), g.clone());
        }
        let changes = diff(&feed.fed, &want);
        feed.fed = want;
        if !changes.is_empty() {
            feed.compiler.apply(changes, revision);
        }
        if let Some(svc) = &self.service {
            let permissive = svc.mtls != Mtls::Strict;
            if let Err(e) = feed.identity.set_permissive(permissive) {
                tracing::warn!(error = %e, "inbound listener: mode unchanged");
            }
        }
    }

    pub fn dump_handle(&self) -> Arc<std::sync::Mutex<serde_json::Value>> {
        self.dump.clone()
    }

    /// What this sidecar refused of its config.
    pub fn rejections(&self) -> Rejections {
        self.rejected.clone()
    }

    fn destinations(&self) -> impl Iterator<Item = (&str, DestinationMode)> {
        self.service
            .iter()
            .flat_map(|s| s.destinations.iter())
            .map(|d| (d.service.as_str(), d.mode))
    }

    fn is_direct(&self, service: &str) -> bool {
        self.destinations()
            .any(|(d, m)| d == service && m == DestinationMode::Direct)
    }

    /// The store prefixes this policy needs now.
    fn prefixes(&self) -> Vec<String> {
        let mut p = vec![
            node_prefix(NodeKind::Gateway),
            Key::new(Kind::Groups, &self.group_name).to_string(),
            Key::new(Kind::Services, &self.service_name).to_string(),
        ];
        for (d, mode) in self.destinations() {
            if mode == DestinationMode::Direct {
                p.push(Key::new(Kind::Services, d).to_string());
                p.push(format!("{}{d}/", Kind::Instances.prefix()));
            }
        }
        p.sort();
        p.dedup();
        p
    }
}

/// A tier of gateways at `addresses`, reached over mutual TLS with the
/// sidecar's mesh identity when it has one.
fn tier(
    name: &'static str,
    registry: &EndpointRegistry,
    mut addresses: Vec<String>,
    tls: &Option<Arc<ClientTls>>,
) -> Tier {
    addresses.sort();
    addresses.dedup();
    let members = addresses
        .iter()
        .map(|a| (registry.get_tls(a, tls.clone()), 1, 0))
        .collect();
    Tier {
        name,
        members: Balancer::new(members),
        addresses,
    }
}

/// The service an instance key belongs to.
fn key_service(key: &Key) -> &str {
    match key.kind {
        Kind::Instances => key.name.split_once('/').map_or("", |(s, _)| s),
        _ => &key.name,
    }
}

impl Apply for PolicyCompiler {
    fn apply(&mut self, changes: Vec<Change>, revision: i64) {
        for ch in changes {
            match ch {
                Change::Put(e) => match e.key.kind {
                    // Decoded and validated as the gateway does: an
                    // invalid object is rejected alone, the previous
                    // version stays.
                    Kind::Nodes => match Object::decode(&e.key, &e.value) {
                        Ok(Object::Node(n)) if n.kind == NodeKind::Gateway => {
                            self.gateways.insert(e.key.name.clone(), n);
                        }
                        Ok(_) => {
                            self.gateways.remove(&e.key.name);
                        }
                        Err(err) => tracing::warn!(error = %err, "ignoring invalid node record"),
                    },
                    Kind::Groups if e.key.name == self.group_name => {
                        match Object::decode(&e.key, &e.value) {
                            Ok(Object::Group(g)) => {
                                self.rejected.clear(&e.key);
                                self.group = Some(g);
                                self.group_entry = Some(e.clone());
                            }
                            Ok(_) => {}
                            Err(err) => {
                                self.rejected
                                    .reject(&e.key, e.mod_revision, err.to_string())
                            }
                        }
                    }
                    Kind::Services | Kind::Instances => {
                        if e.key.kind == Kind::Services && e.key.name == self.service_name {
                            match Object::decode(&e.key, &e.value) {
                                Ok(Object::Service(s)) => {
                                    self.rejected.clear(&e.key);
                                    self.service = Some(*s);
                                }
                                Ok(_) => {}
                                Err(err) => {
                                    self.rejected
                                        .reject(&e.key, e.mod_revision, err.to_string())
                                }
                            }
                        }
                        self.services.insert(e.key.clone(), e);
                    }
                    _ => {}
                },
                Change::Delete(key) => match key.kind {
                    Kind::Nodes => {
                        self.gateways.remove(&key.name);
                    }
                    Kind::Groups if key.name == self.group_name => {
                        self.rejected.clear(&key);
                        self.group = None;
                        self.group_entry = None;
                    }
                    Kind::Services | Kind::Instances => {
                        if key.kind == Kind::Services && key.name == self.service_name {
                            self.rejected.clear(&key);
                            self.service = None;
                        }
                        self.services.remove(&key);
                    }
                    _ => {}
                },
            }
        }
        // The direct tier gets exactly the direct destinations' objects.
        let want: BTreeMap<Key, Entry> = self
            .services
            .iter()
            .filter(|(k, _)| self.is_direct(key_service(k)))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let direct_changes = diff(&self.fed, &want);
        self.fed = want;
        self.direct.apply(direct_changes, revision);
        self.feed_inbound(revision);
        // Follow the destinations with the watch (a no-op when unchanged).
        let prefixes = self.prefixes();
        self.scope.send_if_modified(|p| {
            let changed = *p != prefixes;
            *p = prefixes;
            changed
        });

        let with_role = |role: Role, group: Option<&str>| -> Vec<String> {
            self.gateways
                .values()
                .filter(|n| n.roles.contains(&role))
                .filter(|n| group.is_none_or(|g| n.groups.iter().any(|x| x == g)))
                .filter_map(|n| n.address.clone())
                .collect()
        };
        let group_members = with_role(Role::Egress, Some(&self.group_name));
        let mut central = with_role(Role::Central, None);
        central.extend(self.bootstrap_central.iter().cloned());
        let p = Policy {
            group: self.group.clone(),
            group_tier: tier("group", &self.registry, group_members, &self.mesh_tls),
            central_tier: tier("central", &self.registry, central, &self.mesh_tls),
            gateway_revisions: self
                .gateways
                .iter()
                .map(|(name, n)| {
                    let id = Key::new(Kind::Nodes, name.clone()).node_id().to_string();
                    (id, n.applied_revision)
                })
                .collect(),
            destinations: self
                .destinations()
                .map(|(d, m)| (d.to_string(), m))
                .collect(),
        };
        if let Some((checks, spec)) = &self.member_checks {
            for t in [&p.group_tier, &p.central_tier] {
                let eps = t.members.endpoints().cloned().collect();
                checks.set(t.name, Some((spec, eps)));
            }
        }
        let mut held: Vec<String> = self
            .gateways
            .keys()
            .map(|id| Key::new(Kind::Nodes, id.clone()).to_string())
            .collect();
        if self.group.is_some() {
            held.push(Key::new(Kind::Groups, &self.group_name).to_string());
        }
        held.extend(self.services.keys().map(Key::to_string));
        let destinations: BTreeMap<&str, DestinationMode> = self.destinations().collect();
        *self.dump.lock().unwrap_or_else(|e| e.into_inner()) = json!({
            "revision": revision,
            "service": self.service_name,
            "group": self.group_name,
            "group_policy": p.group,
            "destinations": destinations,
            "direct": self.fed.keys().map(Key::to_string).collect::<Vec<_>>(),
            "tiers": {
                "group": p.group_tier.addresses,
                "central": p.central_tier.addresses,
            },
            "gateways_known": self.gateways.len(),
            "watched": self.scope.borrow().clone(),
            "objects": held,
        });
        tracing::debug!(revision, group = ?p.group_tier.addresses, central = ?p.central_tier.addresses, "local policy updated");
        self.shared.store(Arc::new(p));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshgate_gateway::http::h2::Clients;
    use meshgate_gateway::snapshot::{Defaults, Snapshot};

    use super::*;

    fn compiler() -> (PolicyCompiler, SharedPolicy) {
        let registry = Arc::new(EndpointRegistry::default());
        let direct = Compiler::new(
            Default::default(),
            Defaults {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(1),
                zone: None,
            },
            Arc::new(Clients::default()),
            registry.clone(),
            Arc::new(HealthChecks::default()),
            Box::new(|_: &Snapshot| {}),
        );
        let (c, policy, _) = PolicyCompiler::new(
            "g".into(),
            "front".into(),
            vec![],
            registry,
            None,
            direct,
            None,
        );
        (c, policy)
    }

    fn put(kind: Kind, name: &str, json: serde_json::Value, rev: i64) -> Change {
        Change::Put(Entry {
            key: Key::new(kind, name),
            value: serde_json::to_vec(&json).unwrap(),
            mod_revision: rev,
        })
    }

    #[test]
    fn an_invalid_own_service_or_group_is_rejected_and_the_previous_kept() {
        let (mut c, policy) = compiler();
        let good = json!({"destinations": [{"service": "orders"}]});
        c.apply(vec![put(Kind::Services, "front", good, 2)], 2);
        assert!(policy.load().destinations.contains_key("orders"));
        // Well-typed but invalid: a duplicate destination and a bad name.
        let bad = json!({"destinations": [{"service": "ledger"}, {"service": "ledger"}, {"service": "Bad Name"}]});
        c.apply(vec![put(Kind::Services, "front", bad, 3)], 3);
        let p = policy.load();
        assert!(
            p.destinations.contains_key("orders"),
            "previous version kept"
        );
        assert!(!p.destinations.contains_key("ledger"));

        c.apply(vec![put(Kind::Groups, "g", json!({}), 4)], 4);
        assert!(policy.load().group.is_some());
        let bad_group = json!({"max_policy_staleness_s": 0});
        c.apply(vec![put(Kind::Groups, "g", bad_group.clone(), 5)], 5);
        let kept = policy.load().group.clone().unwrap();
        assert_eq!(kept, serde_json::from_value::<Group>(json!({})).unwrap());

        // Both refusals are reported (for /config, /readyz, the metric and
        // the node record), with their versions, until fixed.
        let refused = |c: &PolicyCompiler| -> Vec<(String, i64)> {
            c.rejections()
                .list()
                .into_iter()
                .map(|r| (r.object, r.version))
                .collect()
        };
        assert_eq!(
            refused(&c),
            [
                ("services/front".to_string(), 3),
                ("groups/g".to_string(), 5)
            ]
        );
        c.apply(vec![put(Kind::Groups, "g", json!({}), 6)], 6);
        c.apply(vec![Change::Delete(Key::new(Kind::Services, "front"))], 7);
        assert_eq!(refused(&c), []);
    }
}
