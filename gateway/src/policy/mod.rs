//! Edge policies, compiled from the config and applied on the request path
//! before a request is forwarded: who the caller is ([`auth`]: consumers,
//! API keys, JWTs), how many requests it may send ([`limit`]: per route,
//! consumer and service; per gateway or shared by the cluster), the
//! faults injected for chaos tests ([`fault`]), which requests are
//! mirrored to a shadow service ([`MirrorRule`]), and a route's response
//! cache ([`cache`]). A route that sets none of
//! them carries no policy, and its requests pay nothing for them.
//!
//! The request path and the snapshot hold them as trait objects
//! ([`RouteEdge`], [`limit::LimitCheck`], [`cache::ResponseCache`],
//! [`ConsumerTable`]), made only by the [`EdgeCompiler`] that [`compiler`]
//! returns and the gateway process gives its config compiler. A process
//! that never does (the lite sidecar) links none of their code: moka,
//! governor and JWT verification stay out of its binary, whose resident
//! pages are most of its memory (BENCHMARKS.md, mutual TLS).

pub mod auth;
pub mod cache;
pub mod fault;
pub mod limit;
pub(crate) mod refusal;

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderValue, Request};
use meshgate_config::model::{Cache, Consumer, Route, Scope, Service};

use cache::{ResponseCache, RouteCache};

use crate::http::body::RequestBody;
use crate::http::error::Failure;
use crate::http::headers::X_MESH_CONSUMER;
use auth::{AuthRule, Consumers};
use fault::{FaultRule, Injected};
use limit::{KeyInput, LimitCheck, Limiter, LimiterRegistry, Peers, Pool};

/// The consumers table routes with `auth` read (an [`auth::Consumers`]).
pub type ConsumerTable = Arc<dyn Any + Send + Sync>;

/// A route's edge policies, as the request path applies them.
pub trait RouteEdge: Send + Sync + std::fmt::Debug {
    /// Authenticates the request's consumer (when the route has `auth`:
    /// `x-mesh-consumer` set, an API key in the query removed) and counts
    /// it against the route's and the consumer's limits. The consumer's
    /// name, when there is one.
    fn admit(
        &self,
        consumers: Option<&ConsumerTable>,
        client_ip: &[u8],
        grpc: bool,
        req: &mut Request<RequestBody>,
    ) -> Result<Option<Arc<str>>, Failure>;
    /// The faults drawn for a request that took backend rule `rule`
    /// (`None`: the default backends, or a direct response).
    fn faults(&self, rule: Option<usize>, headers: &HeaderMap) -> Injected;
    /// The route's mirroring.
    fn mirror(&self) -> Option<&MirrorRule>;
    /// The route's response cache.
    fn cache(&self) -> Option<&dyn ResponseCache>;
}

/// Compiles edge policies for a config compiler, keeping their state
/// across config changes.
pub trait EdgeCompiler: Send + Sync {
    /// Route `name`'s policies; `None` when it sets none.
    fn route(&self, name: &str, version: i64, r: &Route) -> Option<Arc<dyn RouteEdge>>;
    /// Service `name`'s own limit.
    fn service_limit(&self, name: &str, s: &Service) -> Option<Arc<dyn LimitCheck>>;
    /// The consumers table of these consumers.
    fn consumers(&self, specs: &BTreeMap<String, Consumer>) -> ConsumerTable;
    /// Drops the state of deleted object `id` (e.g. `routes/api`).
    fn forget(&self, id: &str);
}

/// The edge-policy compiler of a gateway whose `cluster` limits divide by
/// `peers`.
pub fn compiler(peers: Arc<Peers>) -> Box<dyn EdgeCompiler> {
    Box::new(PolicyState {
        limiters: LimiterRegistry::new(peers),
        caches: Kept::default(),
    })
}

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

impl RouteEdge for RoutePolicy {
    fn admit(
        &self,
        consumers: Option<&ConsumerTable>,
        client_ip: &[u8],
        grpc: bool,
        req: &mut Request<RequestBody>,
    ) -> Result<Option<Arc<str>>, Failure> {
        let consumer = match &self.auth {
            Some(rule) => {
                let empty = Consumers::default();
                let table = consumers
                    .and_then(|c| c.downcast_ref::<Consumers>())
                    .unwrap_or(&empty);
                let found = rule
                    .authenticate(table, req.headers(), req.uri().query())
                    .map_err(|r| refusal::refused(r, grpc))?;
                if let Ok(v) = HeaderValue::from_str(&found.name) {
                    req.headers_mut().insert(X_MESH_CONSUMER, v);
                }
                if let Some(param) = rule.query_param() {
                    refusal::strip_query_param(req, param);
                }
                Some(found)
            }
            None => None,
        };
        let input = KeyInput {
            consumer: consumer.as_deref().map(|c| &*c.name),
            client_ip,
            headers: req.headers(),
        };
        if let Some(l) = &self.limit {
            l.check(&input).map_err(|d| refusal::limited(d, grpc))?;
        }
        if let Some(l) = consumer.as_ref().and_then(|c| c.limit.as_ref()) {
            l.check(&input).map_err(|d| refusal::limited(d, grpc))?;
        }
        Ok(consumer.map(|c| c.name.clone()))
    }

    fn faults(&self, rule: Option<usize>, headers: &HeaderMap) -> Injected {
        self.fault_for(rule)
            .map_or_else(Injected::default, |f| f.draw(headers))
    }

    fn mirror(&self) -> Option<&MirrorRule> {
        self.mirror.as_ref()
    }

    fn cache(&self) -> Option<&dyn ResponseCache> {
        self.cache.as_deref().map(|c| c as &dyn ResponseCache)
    }
}

impl EdgeCompiler for PolicyState {
    fn route(&self, name: &str, version: i64, r: &Route) -> Option<Arc<dyn RouteEdge>> {
        RoutePolicy::compile(name, version, r, self).map(|p| Arc::new(p) as Arc<dyn RouteEdge>)
    }

    fn service_limit(&self, name: &str, s: &Service) -> Option<Arc<dyn LimitCheck>> {
        let id = format!("services/{name}");
        match &s.rate_limit {
            Some(l) => Some(self.limiters.get(&id, l, Pool::All) as Arc<dyn LimitCheck>),
            None => {
                self.limiters.forget(&id);
                None
            }
        }
    }

    fn consumers(&self, specs: &BTreeMap<String, Consumer>) -> ConsumerTable {
        Arc::new(Consumers::new(specs.iter().map(|(n, c)| {
            let limit = c.rate_limit.as_ref().map(|l| {
                self.limiters
                    .get(&format!("consumers/{n}"), l, Pool::Ingress)
            });
            (n.as_str(), c, limit)
        })))
    }

    fn forget(&self, id: &str) {
        self.limiters.forget(id);
        self.caches.forget(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_rule_s_fault_replaces_the_route_s() {
        let r: Route = serde_json::from_value(serde_json::json!({
            "scope": "ingress",
            "backends": [{"service": "a"}],
            "backend_rules": [
                {"match": {"headers": [{"name": "x-canary"}]}, "backends": [{"service": "b"}],
                 "fault": {"abort": {"status": 500, "percent": 100}}},
                {"match": {"headers": [{"name": "x-other"}]}, "backends": [{"service": "c"}]}
            ],
            "fault": {"abort": {"status": 418, "percent": 100}}
        }))
        .unwrap();
        let p = RoutePolicy::compile("r", 1, &r, &PolicyState::default()).unwrap();
        let status = |rule| {
            p.fault_for(rule)
                .unwrap()
                .draw(&http::HeaderMap::new())
                .abort
                .unwrap()
                .status
        };
        assert_eq!(status(None), 418);
        assert_eq!(status(Some(0)), 500);
        // A rule without its own fault takes the route's.
        assert_eq!(status(Some(1)), 418);
        // A route without policies carries none.
        let plain: Route =
            serde_json::from_value(serde_json::json!({"backends": [{"service": "a"}]})).unwrap();
        assert!(RoutePolicy::compile("p", 1, &plain, &PolicyState::default()).is_none());
    }
}
