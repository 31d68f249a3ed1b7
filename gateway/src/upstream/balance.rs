//! Load balancing over endpoints: smooth weighted round robin, least
//! request and peak-EWMA latency (both by power of two choices), a
//! consistent-hash ring, priority levels, and passive ejection of endpoints
//! that refuse connections.
//!
//! The hot path is lock-free: a precomputed weighted schedule walked with an
//! atomic counter, and atomics for each endpoint's ejection state. Endpoint
//! state is shared by address across config changes, so a config change
//! does not forget that an endpoint is down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::clock::mono_ms;
use crate::upstream::endpoint::EndpointState;

const MAX_SCHEDULE: u64 = 4096;

/// A weighted round-robin order, precomputed with nginx's smooth algorithm
/// so that heavy endpoints are interleaved, not bunched.
#[derive(Debug)]
pub(crate) struct Schedule {
    order: Box<[u32]>,
    next: AtomicUsize,
}

impl Schedule {
    pub(crate) fn new(weights: &[u32]) -> Schedule {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let mut w: Vec<i64> = weights.iter().map(|w| i64::from(*w)).collect();
        if total > MAX_SCHEDULE {
            // Keep the schedule small: scale weights down, keeping every
            // non-zero weight at least 1.
            for x in &mut w {
                if *x > 0 {
                    *x = ((*x as u64 * MAX_SCHEDULE) / total).max(1) as i64;
                }
            }
        }
        let sum: i64 = w.iter().sum();
        let mut current = vec![0i64; w.len()];
        let mut order = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for i in 0..w.len() {
                current[i] += w[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= sum;
            order.push(best as u32);
        }
        // Start each schedule at a random point so that many processes do
        // not all hit the first endpoint first.
        let start = if order.is_empty() {
            0
        } else {
            rand::random::<usize>() % order.len()
        };
        Schedule {
            order: order.into_boxed_slice(),
            next: AtomicUsize::new(start),
        }
    }

    /// The next index in the schedule, or `None` if all weights are 0.
    pub(crate) fn next(&self) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.order[n % self.order.len()] as usize)
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

struct Level {
    endpoints: Vec<Arc<EndpointState>>,
    weights: Vec<u32>,
    schedule: Schedule,
    /// Consistent hash: (point, endpoint index), sorted by point.
    ring: Vec<(u64, u32)>,
}

/// Load-balancing policy of a [`Balancer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    RoundRobin,
    LeastRequest,
    PeakEwma,
    ConsistentHash,
}

impl From<meshgate_config::model::LoadBalancing> for Policy {
    fn from(l: meshgate_config::model::LoadBalancing) -> Policy {
        use meshgate_config::model::LoadBalancing as L;
        match l {
            L::RoundRobin => Policy::RoundRobin,
            L::LeastRequest => Policy::LeastRequest,
            L::PeakEwma => Policy::PeakEwma,
            L::ConsistentHash => Policy::ConsistentHash,
        }
    }
}

/// Virtual nodes per unit of weight on the hash ring, and the ring's cap.
const RING_POINTS_PER_WEIGHT: u64 = 100;
const RING_MAX: u64 = 100_000;

/// Picks endpoints: the lowest priority level with an available endpoint,
/// and within it by the service's policy.
pub struct Balancer {
    levels: Vec<Level>,
    policy: Policy,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("levels", &self.levels.len())
            .finish()
    }
}

impl Balancer {
    /// `members`: (state, weight, priority); weighted round robin.
    pub fn new(members: Vec<(Arc<EndpointState>, u32, u32)>) -> Balancer {
        Balancer::with_policy(members, Policy::RoundRobin)
    }

    /// `members`: (state, weight, priority).
    pub(crate) fn with_policy(
        members: Vec<(Arc<EndpointState>, u32, u32)>,
        policy: Policy,
    ) -> Balancer {
        let mut prios: Vec<u32> = members.iter().map(|m| m.2).collect();
        prios.sort_unstable();
        prios.dedup();
        let levels = prios
            .into_iter()
            .map(|p| {
                let (endpoints, weights): (Vec<_>, Vec<_>) = members
                    .iter()
                    .filter(|m| m.2 == p)
                    .map(|m| (m.0.clone(), m.1))
                    .unzip();
                let ring = if policy == Policy::ConsistentHash {
                    ring(&endpoints, &weights)
                } else {
                    Vec::new()
                };
                Level {
                    schedule: Schedule::new(&weights),
                    endpoints,
                    weights,
                    ring,
                }
            })
            .collect();
        Balancer { levels, policy }
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    pub fn len(&self) -> usize {
        self.levels.iter().map(|l| l.endpoints.len()).sum()
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<EndpointState>> {
        self.levels.iter().flat_map(|l| l.endpoints.iter())
    }

    /// Whether the policy uses requests in flight and latency (only then
    /// are they tracked per request).
    pub(crate) fn tracks_load(&self) -> bool {
        matches!(self.policy, Policy::LeastRequest | Policy::PeakEwma)
    }

    /// Whether one more endpoint may be ejected without going over
    /// `max_percent` of the endpoints ejected at once (one always may).
    pub(crate) fn may_eject(&self, max_percent: u32) -> bool {
        let total = self.len();
        let ejected = self
            .endpoints()
            .filter(|e| e.ejected_until_ms() != 0)
            .count();
        ejected == 0 || (ejected + 1) * 100 <= total * max_percent as usize
    }

    /// Whether any endpoint is currently not ejected.
    pub(crate) fn any_available(&self) -> bool {
        let now = mono_ms();
        self.endpoints().any(|e| e.available(now))
    }

    /// The next endpoint not in `tried` (round robin for a hash-ring
    /// service without a key). See [`Balancer::pick_keyed`].
    #[cfg(test)]
    pub(crate) fn pick(&self, tried: &[Arc<EndpointState>]) -> Option<Arc<EndpointState>> {
        self.pick_keyed(tried, None)
    }

    /// The next endpoint not in `tried`, by the policy (`key`: the request's
    /// hash for a consistent-hash service). Prefers available endpoints;
    /// when every untried one is ejected, returns one anyway (better to try
    /// than to fail without trying).
    pub(crate) fn pick_keyed(
        &self,
        tried: &[Arc<EndpointState>],
        key: Option<u64>,
    ) -> Option<Arc<EndpointState>> {
        let now = mono_ms();
        let untried = |e: &Arc<EndpointState>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
        let usable = |e: &Arc<EndpointState>| untried(e) && e.available(now);
        for level in &self.levels {
            let picked = match (self.policy, key) {
                (Policy::ConsistentHash, Some(k)) => level.on_ring(k, &usable),
                (Policy::LeastRequest, _) => level.p2c(&usable, |e, w| {
                    (f64::from(e.in_flight()) + 1.0) / f64::from(w.max(1))
                }),
                (Policy::PeakEwma, _) => level.p2c(&usable, |e, w| {
                    e.ewma_ns() as f64 * (f64::from(e.in_flight()) + 1.0) / f64::from(w.max(1))
                }),
                _ => None,
            };
            if picked.is_some() {
                return picked;
            }
        }
        let mut fallback = None;
        for level in &self.levels {
            let n = level.schedule.len();
            for _ in 0..n {
                let Some(i) = level.schedule.next() else {
                    break;
                };
                let e = &level.endpoints[i];
                if !untried(e) {
                    continue;
                }
                if e.available(now) {
                    return Some(e.clone());
                }
                if fallback.is_none() {
                    fallback = Some(e.clone());
                }
            }
        }
        fallback.or_else(|| self.endpoints().find(|e| untried(e)).cloned())
    }
}

impl Level {
    /// Power of two choices: two random usable endpoints (weights as
    /// sampling odds), the lower cost wins.
    fn p2c(
        &self,
        usable: &dyn Fn(&Arc<EndpointState>) -> bool,
        cost: impl Fn(&EndpointState, u32) -> f64,
    ) -> Option<Arc<EndpointState>> {
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.weights[i] > 0 && usable(&self.endpoints[i]))
            .collect();
        let (a, b) = match candidates.len() {
            0 => return None,
            1 => return Some(self.endpoints[candidates[0]].clone()),
            n => {
                let mut rng = rand::thread_rng();
                let a = rand::Rng::gen_range(&mut rng, 0..n);
                let mut b = rand::Rng::gen_range(&mut rng, 0..n - 1);
                if b >= a {
                    b += 1;
                }
                (candidates[a], candidates[b])
            }
        };
        let ca = cost(&self.endpoints[a], self.weights[a]);
        let cb = cost(&self.endpoints[b], self.weights[b]);
        Some(self.endpoints[if cb < ca { b } else { a }].clone())
    }

    /// The first usable endpoint clockwise from `key` on the ring.
    fn on_ring(
        &self,
        key: u64,
        usable: &dyn Fn(&Arc<EndpointState>) -> bool,
    ) -> Option<Arc<EndpointState>> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|(p, _)| *p < key);
        (0..self.ring.len())
            .map(|i| self.ring[(start + i) % self.ring.len()].1 as usize)
            .map(|i| &self.endpoints[i])
            .find(|e| usable(e))
            .cloned()
    }
}

/// Builds a hash ring: points per endpoint in proportion to its weight,
/// placed by hashing `address#n` (the same on every gateway).
fn ring(endpoints: &[Arc<EndpointState>], weights: &[u32]) -> Vec<(u64, u32)> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let per_weight = RING_POINTS_PER_WEIGHT.min((RING_MAX / total).max(1));
    let mut ring = Vec::new();
    for (i, (e, w)) in endpoints.iter().zip(weights).enumerate() {
        for n in 0..u64::from(*w) * per_weight {
            ring.push((
                stable_hash(format!("{}#{n}", e.address).as_bytes()),
                i as u32,
            ));
        }
    }
    ring.sort_unstable();
    ring
}

/// The request value hashed to choose a backend or an endpoint: a route's
/// `sticky` key or a consistent-hash service's `hash_on`.
#[derive(Debug)]
pub enum RequestKey {
    Header(http::HeaderName),
    Cookie(String),
    /// The client's IP address.
    SourceIp,
}

impl RequestKey {
    /// From the config's `{header}` / `{cookie}` / `source_ip` choice.
    pub fn new(header: Option<&str>, cookie: Option<&str>, source_ip: bool) -> Option<RequestKey> {
        match (header, cookie, source_ip) {
            (Some(h), _, _) => http::HeaderName::from_bytes(h.as_bytes())
                .ok()
                .map(RequestKey::Header),
            (None, Some(c), _) => Some(RequestKey::Cookie(c.to_string())),
            (None, None, true) => Some(RequestKey::SourceIp),
            _ => None,
        }
    }

    /// The stable hash of the request's value, if it carries one.
    pub(crate) fn hash(
        &self,
        headers: &http::HeaderMap,
        client_ip: Option<&http::HeaderValue>,
    ) -> Option<u64> {
        let v: &[u8] = match self {
            RequestKey::Header(n) => headers.get(n)?.as_bytes(),
            RequestKey::Cookie(c) => crate::http::headers::cookie(headers, c)?.as_bytes(),
            RequestKey::SourceIp => client_ip?.as_bytes(),
        };
        Some(stable_hash(v))
    }
}

/// A hash that is the same in every process and version (FNV-1a 64 with a
/// final avalanche), for rings and request keys.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser: FNV's low bits alone cluster on a ring.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::endpoint::{EndpointRegistry, InFlight};

    #[test]
    fn smooth_weighted_order() {
        let s = Schedule::new(&[5, 1, 1]);
        assert_eq!(&*s.order, &[0, 0, 1, 0, 2, 0, 0]);
        let counts = (0..700).fold([0; 3], |mut c, _| {
            c[s.next().unwrap()] += 1;
            c
        });
        assert_eq!(counts, [500, 100, 100]);
        assert!(Schedule::new(&[0, 0]).next().is_none());
        assert_eq!(Schedule::new(&[10_000, 10_000, 1]).len(), 2047 + 2047 + 1);
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_tried_ones_not_repeated() {
        let a = Arc::new(EndpointState::new("a:1"));
        let b = Arc::new(EndpointState::new("b:1"));
        let bal = Balancer::new(vec![(a.clone(), 1, 0), (b.clone(), 1, 0)]);
        a.on_failure();
        for _ in 0..10 {
            assert_eq!(bal.pick(&[]).unwrap().address, "b:1");
        }
        // Only the ejected one is left: still returned rather than nothing.
        assert_eq!(bal.pick(std::slice::from_ref(&b)).unwrap().address, "a:1");
        assert!(bal.pick(&[a.clone(), b.clone()]).is_none());
        a.on_success();
        let picked: Vec<_> = (0..4)
            .map(|_| bal.pick(&[]).unwrap().address.clone())
            .collect();
        assert!(picked.contains(&"a:1".to_string()));
    }

    #[test]
    fn lower_priority_level_preferred_then_spill() {
        let a = Arc::new(EndpointState::new("a:1"));
        let b = Arc::new(EndpointState::new("b:1"));
        let bal = Balancer::new(vec![(a.clone(), 1, 1), (b.clone(), 1, 0)]);
        assert_eq!(bal.pick(&[]).unwrap().address, "b:1");
        b.on_failure();
        assert_eq!(bal.pick(&[]).unwrap().address, "a:1");
    }

    #[test]
    fn registry_shares_state_by_address() {
        let r = EndpointRegistry::default();
        let a1 = r.get("a:1");
        a1.on_failure();
        let a2 = r.get("a:1");
        assert!(Arc::ptr_eq(&a1, &a2));
        assert!(a2.is_ejected());
    }

    fn members(addrs: &[&str]) -> Vec<(Arc<EndpointState>, u32, u32)> {
        addrs
            .iter()
            .map(|a| (Arc::new(EndpointState::new(*a)), 1, 0))
            .collect()
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let m = members(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let busy = m[0].0.clone();
        let b = Balancer::with_policy(m, Policy::LeastRequest);
        let _held: Vec<InFlight> = (0..5).map(|_| busy.start()).collect();
        assert_eq!(busy.in_flight(), 5);
        for _ in 0..300 {
            let e = b.pick(&[]).unwrap();
            assert!(!Arc::ptr_eq(&e, &busy), "picked the busy endpoint");
        }
        drop(_held);
        assert_eq!(busy.in_flight(), 0);
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint_and_reacts_to_a_slow_answer_at_once() {
        let m = members(&["10.0.0.1:80", "10.0.0.2:80"]);
        let (a, c) = (m[0].0.clone(), m[1].0.clone());
        let b = Balancer::with_policy(m, Policy::PeakEwma);
        a.observe_rtt(Duration::from_millis(50));
        c.observe_rtt(Duration::from_millis(1));
        for _ in 0..100 {
            assert!(Arc::ptr_eq(&b.pick(&[]).unwrap(), &c));
        }
        // One slow answer from the fast one: the peak counts immediately.
        c.observe_rtt(Duration::from_millis(200));
        assert_eq!(c.ewma_ns(), 200_000_000);
        for _ in 0..100 {
            assert!(Arc::ptr_eq(&b.pick(&[]).unwrap(), &a));
        }
    }

    #[test]
    fn consistent_hash_is_stable_balanced_and_moves_only_the_lost_keys() {
        let addrs = [
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.4:80",
            "10.0.0.5:80",
        ];
        let b5 = Balancer::with_policy(members(&addrs), Policy::ConsistentHash);
        // Built again (as another gateway would): same answers.
        let again = Balancer::with_policy(members(&addrs), Policy::ConsistentHash);
        let b4 = Balancer::with_policy(members(&addrs[..4]), Policy::ConsistentHash);
        let mut counts = std::collections::HashMap::new();
        let mut moved_wrongly = 0;
        for k in 0..10_000u32 {
            let key = stable_hash(format!("user-{k}").as_bytes());
            let e = b5.pick_keyed(&[], Some(key)).unwrap();
            assert_eq!(again.pick_keyed(&[], Some(key)).unwrap().address, e.address);
            *counts.entry(e.address.clone()).or_insert(0) += 1;
            let after = b4.pick_keyed(&[], Some(key)).unwrap();
            if e.address != addrs[4] && after.address != e.address {
                moved_wrongly += 1;
            }
        }
        assert_eq!(moved_wrongly, 0, "keys of surviving endpoints moved");
        for (addr, n) in &counts {
            assert!((1_000..=3_000).contains(n), "{addr}: {n} of 10000 keys");
        }
    }

    #[test]
    fn consistent_hash_skips_tried_and_ejected_endpoints() {
        let m = members(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let b = Balancer::with_policy(m, Policy::ConsistentHash);
        let key = stable_hash(b"user-1");
        let first = b.pick_keyed(&[], Some(key)).unwrap();
        let second = b
            .pick_keyed(std::slice::from_ref(&first), Some(key))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        first.on_failure();
        let now = b.pick_keyed(&[], Some(key)).unwrap();
        assert!(
            Arc::ptr_eq(&now, &second),
            "an ejected endpoint's keys go to the next one"
        );
    }
}
