//! Edge policies, compiled from the config and applied on the request path
//! before a request is forwarded: who the caller is ([`auth`]: consumers,
//! API keys, JWTs), how many requests it may send ([`limit`]: per route,
//! consumer and service; per gateway or shared by the cluster), and the
//! faults injected for chaos tests ([`fault`]). A route that sets none of
//! them carries no [`RoutePolicy`], and its requests pay nothing for them.

pub mod auth;
pub mod fault;
pub mod limit;

use std::sync::Arc;

use meshgate_config::model::{Route, Scope};

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
}

impl RoutePolicy {
    /// The policies of route `name`, or `None` when it sets none.
    pub fn compile(
        name: &str,
        version: i64,
        r: &Route,
        limiters: &LimiterRegistry,
    ) -> Option<RoutePolicy> {
        let id = format!("routes/{name}");
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
            rule_faults: match rule_faults.iter().any(Option::is_some) {
                true => rule_faults,
                false => Vec::new(),
            },
        };
        let none =
            p.auth.is_none() && p.limit.is_none() && p.fault.is_none() && p.rule_faults.is_empty();
        (!none).then_some(p)
    }

    /// The faults for a request that took backend rule `rule` (`None`:
    /// the default backends): the rule's own, else the route's.
    pub fn fault_for(&self, rule: Option<usize>) -> Option<&FaultRule> {
        rule.and_then(|i| self.rule_faults.get(i)?.as_ref())
            .or(self.fault.as_ref())
    }
}
