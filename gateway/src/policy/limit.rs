//! Rate limits (governor's GCRA): one limiter per route, service or
//! consumer that sets `rate_limit`, counting the whole object or each key
//! (consumer, client address, header value) separately.
//!
//! Keyed state is bounded: one small limiter per key in a moka cache of at
//! most `max_keys` entries (TinyLFU admission, so a flood of new keys does
//! not push out the busy ones) that forgets a key once it has been idle
//! long enough to be back to a full burst, so forgetting it changes no
//! decision.
//!
//! A `cluster` limit is shared by the live gateways that serve the object:
//! each allows `requests / N` (and `burst / N`), N read from [`Peers`],
//! which the gateway keeps from the node records in the store. When N
//! changes, the next request rebuilds the limiter at the new share (its
//! counts start again). Limiters live in a [`LimiterRegistry`] so that a
//! config change that leaves an object's limit as it was keeps its counts.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue};
use meshgate_config::model::{LimitKey, LimitScope, RateLimit};

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Default `max_keys`.
pub const DEFAULT_MAX_KEYS: u32 = 100_000;

/// The number of live gateways that share a `cluster` limit, by the
/// listeners they serve. Each count includes this gateway and is at least 1.
#[derive(Debug)]
pub struct Peers {
    /// Gateways with the ingress role.
    pub ingress: AtomicU32,
    /// Gateways in this gateway's mesh pool (the same mesh roles and
    /// groups: the members a sidecar spreads its calls over).
    pub mesh: AtomicU32,
    /// Every gateway (a service's limit: any gateway may call it).
    pub all: AtomicU32,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            ingress: AtomicU32::new(1),
            mesh: AtomicU32::new(1),
            all: AtomicU32::new(1),
        }
    }
}

/// Which count of [`Peers`] divides a cluster limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Ingress,
    Mesh,
    All,
}

impl Peers {
    fn count(&self, pool: Pool) -> u32 {
        let c = match pool {
            Pool::Ingress => &self.ingress,
            Pool::Mesh => &self.mesh,
            Pool::All => &self.all,
        };
        c.load(Ordering::Relaxed).max(1)
    }

    /// Sets the counts (each at least 1).
    pub fn set(&self, ingress: u32, mesh: u32, all: u32) {
        self.ingress.store(ingress.max(1), Ordering::Relaxed);
        self.mesh.store(mesh.max(1), Ordering::Relaxed);
        self.all.store(all.max(1), Ordering::Relaxed);
    }
}

/// A limit refused a request.
#[derive(Debug, Clone)]
pub struct Denied {
    /// The limit, as `RateLimit-Policy` names it.
    pub policy: HeaderValue,
    /// When a request of this key would be allowed again.
    pub retry_after: Duration,
}

/// A limit, as the request path counts against it.
pub trait LimitCheck: Send + Sync + std::fmt::Debug {
    /// Counts one request; `Err` when it is over the limit.
    fn check(&self, input: &KeyInput<'_>) -> Result<(), Denied>;
}

impl LimitCheck for Limiter {
    fn check(&self, input: &KeyInput<'_>) -> Result<(), Denied> {
        Limiter::check(self, input)
    }
}

/// One configured limit and its state.
pub struct Limiter {
    spec: RateLimit,
    header: Option<HeaderName>,
    /// A cluster limit's divisor, and where it is read.
    shared: Option<(Arc<Peers>, Pool)>,
    state: ArcSwap<Shares>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("spec", &self.spec).finish()
    }
}

/// The limiter state at one share of the limit.
struct Shares {
    divisor: u32,
    quota: Quota,
    policy: HeaderValue,
    one: Option<Direct>,
    keyed: Option<moka::sync::Cache<Box<[u8]>, Arc<Direct>>>,
}

/// What a request is counted by.
#[derive(Debug, Clone, Copy)]
pub struct KeyInput<'a> {
    pub consumer: Option<&'a str>,
    /// The client's address, as text.
    pub client_ip: &'a [u8],
    pub headers: &'a http::HeaderMap,
}

impl Limiter {
    /// A limiter for `spec`; a `cluster` limit divides by `peers`' count
    /// of `pool`.
    pub fn new(spec: &RateLimit, peers: &Arc<Peers>, pool: Pool) -> Limiter {
        let shared = (spec.scope == LimitScope::Cluster).then(|| (peers.clone(), pool));
        let divisor = shared.as_ref().map_or(1, |(p, pool)| p.count(*pool));
        Limiter {
            header: spec
                .header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            state: ArcSwap::from_pointee(Shares::new(spec, divisor)),
            spec: spec.clone(),
            shared,
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request; `Err` when it is over the limit.
    pub fn check(&self, input: &KeyInput<'_>) -> Result<(), Denied> {
        let mut state = self.state.load();
        if let Some((peers, pool)) = &self.shared {
            let n = peers.count(*pool);
            if n != state.divisor {
                self.state.store(Arc::new(Shares::new(&self.spec, n)));
                state = self.state.load();
            }
        }
        let outcome = match (&state.one, &state.keyed) {
            (Some(one), _) => one.check(),
            (None, Some(keyed)) => {
                let key = self.key_of(input);
                match keyed.get(key) {
                    Some(l) => l.check(),
                    None => {
                        let quota = state.quota;
                        let l = keyed.get_with(key.into(), || {
                            Arc::new(RateLimiter::direct(quota).with_middleware())
                        });
                        l.check()
                    }
                }
            }
            (None, None) => return Ok(()),
        };
        outcome.map(drop).map_err(|not_until| Denied {
            policy: state.policy.clone(),
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    fn key_of<'a>(&self, input: &KeyInput<'a>) -> &'a [u8] {
        match self.spec.key {
            LimitKey::Route => b"",
            LimitKey::Consumer => match input.consumer {
                Some(c) => c.as_bytes(),
                None => input.client_ip,
            },
            LimitKey::SourceIp => input.client_ip,
            LimitKey::Header => self
                .header
                .as_ref()
                .and_then(|h| input.headers.get(h))
                .map_or(b"", |v| v.as_bytes()),
        }
    }

    /// Keys tracked now.
    #[cfg(test)]
    fn keys(&self) -> u64 {
        let state = self.state.load();
        state.keyed.as_ref().map_or(0, |k| {
            k.run_pending_tasks();
            k.entry_count()
        })
    }
}

impl Shares {
    fn new(spec: &RateLimit, divisor: u32) -> Shares {
        let window = Duration::from_secs(spec.per.seconds());
        let requests = (spec.requests / divisor).max(1);
        let burst = (spec.burst.unwrap_or(spec.requests) / divisor).max(1);
        let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        // One request every window / requests; never a zero period.
        let period = (window / requests).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(nz(burst));
        let w = spec.per.seconds();
        let policy = HeaderValue::from_str(&format!("\"limit\";q={requests};w={w}"))
            .unwrap_or_else(|_| HeaderValue::from_static("\"limit\""));
        let (one, keyed) = match spec.key {
            LimitKey::Route => (Some(RateLimiter::direct(quota).with_middleware()), None),
            _ => {
                // A key idle for a full burst's worth of periods is back
                // to a fresh state: forgetting it then changes nothing.
                let idle = (period * burst).max(Duration::from_secs(1));
                let cache = moka::sync::Cache::builder()
                    .max_capacity(u64::from(spec.max_keys.unwrap_or(DEFAULT_MAX_KEYS)))
                    .time_to_idle(idle)
                    .build();
                (None, Some(cache))
            }
        };
        Shares {
            divisor,
            quota,
            policy,
            one,
            keyed,
        }
    }
}

/// The limiters of the applied config, by the object that sets them, kept
/// across config changes that leave a limit as it was.
#[derive(Debug, Default)]
pub struct LimiterRegistry {
    kept: super::Kept<RateLimit, Limiter>,
    peers: Arc<Peers>,
}

impl LimiterRegistry {
    /// A registry whose cluster limits divide by `peers`.
    pub fn new(peers: Arc<Peers>) -> LimiterRegistry {
        LimiterRegistry {
            kept: Default::default(),
            peers,
        }
    }

    /// The limiter of object `id` (e.g. `routes/api`) for `spec`: the
    /// current one if its spec is the same, else a new one.
    pub fn get(&self, id: &str, spec: &RateLimit, pool: Pool) -> Arc<Limiter> {
        self.kept
            .get(id, spec, || Limiter::new(spec, &self.peers, pool))
    }

    /// Drops the limiter of a deleted object (or one whose limit was
    /// removed).
    pub fn forget(&self, id: &str) {
        self.kept.forget(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_config::model::Per;

    fn spec(requests: u32, burst: u32, key: LimitKey, scope: LimitScope) -> RateLimit {
        RateLimit {
            requests,
            per: Per::Second,
            burst: Some(burst),
            key,
            header: None,
            scope,
            max_keys: Some(1000),
        }
    }

    fn input<'a>(ip: &'a str, h: &'a http::HeaderMap) -> KeyInput<'a> {
        KeyInput {
            consumer: None,
            client_ip: ip.as_bytes(),
            headers: h,
        }
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_wait() {
        let l = Limiter::new(
            &spec(10, 3, LimitKey::Route, LimitScope::Gateway),
            &Default::default(),
            Pool::Ingress,
        );
        let h = http::HeaderMap::new();
        for _ in 0..3 {
            l.check(&input("1.1.1.1", &h)).unwrap();
        }
        let d = l.check(&input("2.2.2.2", &h)).unwrap_err();
        assert!(d.retry_after <= Duration::from_millis(100), "{d:?}");
        assert_eq!(d.policy, "\"limit\";q=10;w=1");
    }

    #[test]
    fn keys_are_counted_apart_and_bounded() {
        let l = Limiter::new(
            &spec(10, 1, LimitKey::SourceIp, LimitScope::Gateway),
            &Default::default(),
            Pool::Ingress,
        );
        let h = http::HeaderMap::new();
        l.check(&input("1.1.1.1", &h)).unwrap();
        l.check(&input("2.2.2.2", &h)).unwrap();
        assert!(l.check(&input("1.1.1.1", &h)).is_err());
        for i in 0..5000 {
            let _ = l.check(&input(&format!("10.0.{}.{}", i / 256, i % 256), &h));
        }
        assert!(l.keys() <= 1000, "{} keys kept", l.keys());
    }

    #[test]
    fn a_cluster_limit_is_shared_by_the_live_gateways() {
        let peers = Arc::new(Peers::default());
        peers.set(3, 1, 3);
        let l = Limiter::new(
            &spec(30, 30, LimitKey::Route, LimitScope::Cluster),
            &peers,
            Pool::Ingress,
        );
        let h = http::HeaderMap::new();
        let allowed = (0..30).filter(|_| l.check(&input("a", &h)).is_ok()).count();
        assert_eq!(allowed, 10);
        // One gateway left: the share grows at the next request.
        peers.set(2, 1, 2);
        let allowed = (0..30).filter(|_| l.check(&input("a", &h)).is_ok()).count();
        assert_eq!(allowed, 15);
    }

    #[test]
    fn an_unchanged_limit_keeps_its_counts_across_config_changes() {
        let reg = LimiterRegistry::default();
        let s = spec(10, 1, LimitKey::Route, LimitScope::Gateway);
        let a = reg.get("routes/r", &s, Pool::Ingress);
        let b = reg.get("routes/r", &s, Pool::Ingress);
        assert!(Arc::ptr_eq(&a, &b));
        let c = reg.get(
            "routes/r",
            &spec(20, 1, LimitKey::Route, LimitScope::Gateway),
            Pool::Ingress,
        );
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
