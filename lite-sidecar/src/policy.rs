//! Local policy: the sidecar's own slice of config. It watches only
//! `nodes/` (to find gateway members), `groups/<its group>` and
//! `services/<its service>`, and compiles them into the tiers it forwards
//! to: its group's egress gateways, then the central gateways (from etcd
//! plus the bootstrap list of its config file). Every member of both tiers
//! is health-checked (TCP connect) so a dead one is skipped before a
//! request tries it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use meshgate_config::model::HealthCheck;
use meshgate_config::model::{Group, Node, NodeKind, Role};
use meshgate_config::sync::{Apply, Change};
use meshgate_config::validate::decode_json;
use meshgate_config::{Key, Kind};
use meshgate_gateway::balance::{Balancer, EndpointRegistry};
use meshgate_gateway::health::HealthChecks;
use serde_json::json;

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

/// Builds the policy from store changes.
pub struct PolicyCompiler {
    shared: SharedPolicy,
    group_name: String,
    bootstrap_central: Vec<String>,
    registry: Arc<EndpointRegistry>,
    /// TCP checks of the gateway members, when enabled.
    member_checks: Option<(Arc<HealthChecks>, HealthCheck)>,
    gateways: BTreeMap<String, Node>,
    group: Option<Group>,
    dump: Arc<std::sync::Mutex<serde_json::Value>>,
}

impl PolicyCompiler {
    pub fn new(
        group_name: String,
        bootstrap_central: Vec<String>,
        registry: Arc<EndpointRegistry>,
        member_checks: Option<(Arc<HealthChecks>, HealthCheck)>,
    ) -> (Self, SharedPolicy) {
        let shared = Arc::new(ArcSwap::from_pointee(Policy {
            group: None,
            group_tier: tier("group", &registry, vec![]),
            central_tier: tier("central", &registry, bootstrap_central.clone()),
            gateway_revisions: Vec::new(),
        }));
        let c = PolicyCompiler {
            shared: shared.clone(),
            group_name,
            bootstrap_central,
            registry,
            member_checks,
            gateways: BTreeMap::new(),
            group: None,
            dump: Arc::new(std::sync::Mutex::new(serde_json::Value::Null)),
        };
        (c, shared)
    }

    pub fn dump_handle(&self) -> Arc<std::sync::Mutex<serde_json::Value>> {
        self.dump.clone()
    }

    /// The store prefixes this policy needs.
    pub fn prefixes(group: &str, service: &str) -> Vec<String> {
        vec![
            Kind::Nodes.prefix(),
            Key::new(Kind::Groups, group).to_string(),
            Key::new(Kind::Services, service).to_string(),
        ]
    }
}

fn tier(name: &'static str, registry: &EndpointRegistry, mut addresses: Vec<String>) -> Tier {
    addresses.sort();
    addresses.dedup();
    let members = addresses.iter().map(|a| (registry.get(a), 1, 0)).collect();
    Tier {
        name,
        members: Balancer::new(members),
        addresses,
    }
}

impl Apply for PolicyCompiler {
    fn apply(&mut self, changes: Vec<Change>, revision: i64) {
        for ch in changes {
            match ch {
                Change::Put(e) => match e.key.kind {
                    Kind::Nodes => match decode_json::<Node>(&e.key, &e.value) {
                        Ok(n) if n.kind == NodeKind::Gateway => {
                            self.gateways.insert(e.key.name.clone(), n);
                        }
                        Ok(_) => {
                            self.gateways.remove(&e.key.name);
                        }
                        Err(err) => tracing::warn!(error = %err, "ignoring invalid node record"),
                    },
                    Kind::Groups if e.key.name == self.group_name => {
                        match decode_json::<Group>(&e.key, &e.value) {
                            Ok(g) => self.group = Some(g),
                            Err(err) => {
                                tracing::error!(error = %err, "group rejected; previous version kept")
                            }
                        }
                    }
                    _ => {}
                },
                Change::Delete(key) => match key.kind {
                    Kind::Nodes => {
                        self.gateways.remove(&key.name);
                    }
                    Kind::Groups if key.name == self.group_name => self.group = None,
                    _ => {}
                },
            }
        }
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
            group_tier: tier("group", &self.registry, group_members),
            central_tier: tier("central", &self.registry, central),
            gateway_revisions: self
                .gateways
                .iter()
                .map(|(id, n)| (id.clone(), n.applied_revision))
                .collect(),
        };
        if let Some((checks, spec)) = &self.member_checks {
            for t in [&p.group_tier, &p.central_tier] {
                let eps = t.members.endpoints().cloned().collect();
                checks.set(t.name, Some((spec, eps)));
            }
        }
        *self.dump.lock().unwrap_or_else(|e| e.into_inner()) = json!({
            "revision": revision,
            "group": self.group_name,
            "group_policy": p.group,
            "tiers": {
                "group": p.group_tier.addresses,
                "central": p.central_tier.addresses,
            },
            "gateways_known": self.gateways.len(),
        });
        tracing::debug!(revision, group = ?p.group_tier.addresses, central = ?p.central_tier.addresses, "local policy updated");
        self.shared.store(Arc::new(p));
    }
}
