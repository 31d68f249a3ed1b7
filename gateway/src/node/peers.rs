//! The live gateways a gateway shares its `cluster` rate limits with,
//! followed from the node records in `nodes/gateway/` (each written under
//! a lease: a gateway that stops deregisters at once, one that dies is
//! gone when its lease expires). The counts go into the
//! [`Peers`](crate::policy::limit::Peers) the limiters divide by, within a
//! watch event of a change. While the store is unreachable the last
//! counts stay in force.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshgate_config::key::node_prefix;
use meshgate_config::model::{Node, NodeKind, Role};
use meshgate_config::store::{ConfigStore, Event};
use meshgate_config::validate::decode_json;

use crate::policy::limit::Peers;

/// What a gateway's share depends on: its roles and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub roles: Vec<Role>,
    pub groups: Vec<String>,
}

impl Member {
    /// The mesh pool: the same mesh roles and groups (the members a
    /// sidecar spreads its calls over), `None` without a mesh role.
    fn mesh_pool(&self) -> Option<(Vec<Role>, Vec<String>)> {
        let mut roles: Vec<Role> = self
            .roles
            .iter()
            .copied()
            .filter(|r| *r != Role::Ingress)
            .collect();
        roles.sort();
        roles.dedup();
        let mut groups = self.groups.clone();
        groups.sort();
        (!roles.is_empty()).then_some((roles, groups))
    }
}

/// The counts of `peers` for gateway `me` among `live` (which includes
/// `me` whether or not its record is there yet).
pub(crate) fn count(me: (&str, &Member), live: &BTreeMap<String, Member>) -> (u32, u32, u32) {
    let mut all: BTreeMap<&str, &Member> = live.iter().map(|(k, v)| (k.as_str(), v)).collect();
    all.insert(me.0, me.1);
    let mine = me.1.mesh_pool();
    let ingress = all
        .values()
        .filter(|m| m.roles.contains(&Role::Ingress))
        .count();
    let mesh = all
        .values()
        .filter(|m| mine.is_some() && m.mesh_pool() == mine)
        .count();
    (ingress as u32, mesh as u32, all.len() as u32)
}

/// Follows `nodes/gateway/` into `peers` until the process ends.
pub(crate) fn spawn(
    store: Arc<dyn ConfigStore>,
    id: String,
    me: Member,
    peers: Arc<Peers>,
    gauge: prometheus::IntGaugeVec,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let prefix = node_prefix(NodeKind::Gateway);
        let shown = |i: u32, m: u32, a: u32| {
            peers.set(i, m, a);
            for (pool, n) in [("ingress", i), ("mesh", m), ("all", a)] {
                gauge.with_label_values(&[pool]).set(i64::from(n.max(1)));
            }
        };
        loop {
            if let Err(e) = follow(&*store, &prefix, &id, &me, &shown).await {
                tracing::debug!(error = %e, "following the gateways for cluster limits; again in 1 s");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

async fn follow(
    store: &dyn ConfigStore,
    prefix: &str,
    id: &str,
    me: &Member,
    set: &impl Fn(u32, u32, u32),
) -> Result<(), meshgate_config::store::StoreError> {
    let r = store.range(prefix).await?;
    let mut live = BTreeMap::new();
    for e in &r.entries {
        if let Some((id, m)) = member(&e.key, &e.value) {
            live.insert(id, m);
        }
    }
    let publish = |live: &BTreeMap<String, Member>| {
        let (i, m, a) = count((id, me), live);
        set(i, m, a);
    };
    publish(&live);
    let mut watch = store.watch(prefix, r.revision + 1).await?;
    while let Some(batch) = watch.next().await {
        for ev in batch?.events {
            match ev {
                Event::Put(e) => {
                    if let Some((id, m)) = member(&e.key, &e.value) {
                        live.insert(id, m);
                    }
                }
                Event::Delete { key, .. } => {
                    let id = key.name.split_once('/').map_or(key.name.as_str(), |x| x.1);
                    live.remove(id);
                }
            }
        }
        publish(&live);
    }
    Ok(())
}

fn member(key: &meshgate_config::Key, value: &[u8]) -> Option<(String, Member)> {
    let n: Node = decode_json(key, value).ok()?;
    let id = key.name.split_once('/')?.1.to_string();
    Some((
        id,
        Member {
            roles: n.roles,
            groups: n.groups,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(roles: &[Role], groups: &[&str]) -> Member {
        Member {
            roles: roles.to_vec(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn counts_by_pool_including_self() {
        let me = m(&[Role::Ingress, Role::Egress], &["g1"]);
        let mut live = BTreeMap::new();
        live.insert("b".to_string(), m(&[Role::Ingress], &[]));
        live.insert("c".to_string(), m(&[Role::Egress], &["g1"]));
        live.insert("d".to_string(), m(&[Role::Egress], &["g2"]));
        live.insert("e".to_string(), m(&[Role::Central], &[]));
        // Not registered yet: counted anyway.
        assert_eq!(count(("a", &me), &live), (2, 2, 5));
        // Registered: not twice.
        live.insert("a".to_string(), me.clone());
        assert_eq!(count(("a", &me), &live), (2, 2, 5));
    }
}
