//! Edge policies, compiled from the config and applied on the request path
//! before a request is forwarded: who the caller is ([`auth`]: consumers,
//! API keys, JWTs), how many requests it may send ([`limit`]: per route,
//! consumer and service; per gateway or shared by the cluster), the
//! faults injected for chaos tests ([`fault`]), which requests are
//! mirrored to a shadow service ([`MirrorRule`]), and a route's response
//! cache ([`cache`]). A route that sets none of
//! them carries no [`RoutePolicy`], and its requests pay nothing for them.

pub mod auth;
pub mod cache;
pub mod fault;
pub mod limit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshgate_config::model::{Cache, Route, Scope};

use cache::RouteCache;

use auth::AuthRule;
use fault::FaultRule;
use limit::{Limiter, LimiterRegistry, Pool};

/// A route's edge policies.
#[derive(Debug)]
pub struct RoutePolicy {
    pub auth: Option<AuthRule>,
    pub limit: Option<Arc<Limiter>>,
    /// The route's faults.
    pub fault: Option<FaultRule>,
    /// Each backend rule's own faults (in the route's order).
    pub rule_faults: Vec<Option<FaultRule>>,
    /// The shadow service a share of the requests is copied to.
    pub mirror: Option<MirrorRule>,
    /// The route's response cache.
    pub cache: Option<Arc<RouteCache>>,
}

/// State compiled from a spec and kept, by the object that sets it, across
/// config changes that leave the spec as it was (a limiter's counts, a
/// cache's answers).
#[derive(Debug)]
pub struct Kept<S, T> {
    map: Mutex<HashMap<String, (S, Arc<T>)>>,
}

impl<S, T> Default for Kept<S, T> {
    fn default() -> Self {
        Kept {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<S: PartialEq + Clone, T> Kept<S, T> {
    /// The state of `id` for `spec`: the kept one if its spec is the same,
    /// else `make()`'s, kept from now on.
    pub fn get(&self, id: &str, spec: &S, make: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some((s, t)) if s == spec => t.clone(),
            _ => {
                let t = Arc::new(make());
                map.insert(id.to_string(), (spec.clone(), t.clone()));
                t
            }
        }
    }

    /// Drops the state of a deleted object, or one whose spec was removed.
    pub fn forget(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(id);
    }
}

/// Where compiled policies keep their state across config changes.
#[derive(Debug, Default)]
pub struct PolicyState {
    pub limiters: LimiterRegistry,
    pub caches: Kept<Cache, RouteCache>,
}

/// A route's traffic mirroring, compiled.
#[derive(Debug, Clone)]
pub struct MirrorRule {
    pub service: Arc<str>,
    share: f64,
}

impl MirrorRule {
    /// Whether this request is mirrored.
    pub fn draw(&self) -> bool {
        self.share >= 1.0 || (self.share > 0.0 && rand::random::<f64>() < self.share)
    }
}

impl RoutePolicy {
    /// The policies of route `name`, or `None` when it sets none.
    pub fn compile(
        name: &str,
        version: i64,
        r: &Route,
        state: &PolicyState,
    ) -> Option<RoutePolicy> {
        let limiters = &state.limiters;
        let id = format!("routes/{name}");
        let cache = match &r.cache {
            Some(c) => Some(state.caches.get(&id, c, || RouteCache::new(c))),
            None => {
                state.caches.forget(&id);
                None
            }
        };
        let limit = match &r.rate_limit {
            Some(l) => {
                let pool = match r.scope {
                    Scope::Ingress => Pool::Ingress,
                    Scope::Mesh => Pool::Mesh,
                };
                Some(limiters.get(&id, l, pool))
            }
            None => {
                limiters.forget(&id);
                None
            }
        };
        let rule_faults: Vec<Option<FaultRule>> = r
            .backend_rules
            .iter()
            .map(|b| b.fault.as_ref().map(FaultRule::new))
            .collect();
        let p = RoutePolicy {
            auth: r.auth.as_ref().map(|a| AuthRule::new(name, version, a)),
            limit,
            fault: r.fault.as_ref().map(FaultRule::new),
            cache,
            mirror: r.mirror.as_ref().map(|m| MirrorRule {
                service: m.service.as_str().into(),
                share: m.percent.0 / 100.0,
            }),
            rule_faults: match rule_faults.iter().any(Option::is_some) {
                true => rule_faults,
                false => Vec::new(),
            },
        };
        let none = p.auth.is_none()
            && p.limit.is_none()
            && p.fault.is_none()
            && p.rule_faults.is_empty()
            && p.mirror.is_none()
            && p.cache.is_none();
        (!none).then_some(p)
    }

    /// The faults for a request that took backend rule `rule` (`None`:
    /// the default backends): the rule's own, else the route's.
    pub fn fault_for(&self, rule: Option<usize>) -> Option<&FaultRule> {
        rule.and_then(|i| self.rule_faults.get(i)?.as_ref())
            .or(self.fault.as_ref())
    }
}
