//! Load balancing over endpoints: smooth weighted round robin, priority
//! levels, and passive ejection of endpoints that refuse connections.
//!
//! The hot path is lock-free: a precomputed weighted schedule walked with an
//! atomic counter, and atomics for each endpoint's ejection state. Endpoint
//! state is shared by address across config changes, so a config change
//! does not forget that an endpoint is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds on a process-wide monotonic clock.
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

const MAX_SCHEDULE: u64 = 4096;

/// A weighted round-robin order, precomputed with nginx's smooth algorithm
/// so that heavy endpoints are interleaved, not bunched.
#[derive(Debug)]
pub struct Schedule {
    order: Box<[u32]>,
    next: AtomicUsize,
}

impl Schedule {
    pub fn new(weights: &[u32]) -> Schedule {
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
    pub fn next(&self) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.order[n % self.order.len()] as usize)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The live state of one endpoint (or gateway member).
#[derive(Debug)]
pub struct EndpointState {
    pub address: String,
    /// The address parsed once, for building upstream URIs; `None` if it
    /// is not a valid authority (such an endpoint is never connected to).
    pub authority: Option<http::uri::Authority>,
    /// Idle HTTP/1.1 connections to this endpoint.
    pub h1: Arc<crate::upstream::H1Pool>,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
}

/// Base ejection time; doubles with each consecutive ejection.
const EJECT_BASE: Duration = Duration::from_millis(1000);
const EJECT_MAX: Duration = Duration::from_secs(30);

impl EndpointState {
    pub fn new(address: impl Into<String>) -> Self {
        let address = address.into();
        EndpointState {
            authority: address.parse().ok(),
            address,
            h1: Default::default(),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    pub fn available(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// A connection could not be made (or broke before use): eject for a
    /// time that grows with repeated ejections.
    pub fn on_failure(&self) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(5);
        let ms = (EJECT_BASE.as_millis() as u64 * (1 << n)).min(EJECT_MAX.as_millis() as u64);
        self.ejected_until_ms
            .store(mono_ms() + ms, Ordering::Relaxed);
    }

    pub fn on_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn is_ejected(&self) -> bool {
        !self.available(mono_ms())
    }
}

/// Endpoint states by address, shared across config changes.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    by_addr: std::sync::Mutex<HashMap<String, std::sync::Weak<EndpointState>>>,
}

impl EndpointRegistry {
    /// The state for `address`, reused if any live balancer still holds it.
    /// Called on config changes only, never per request.
    pub fn get(&self, address: &str) -> Arc<EndpointState> {
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(address).and_then(|w| w.upgrade()) {
            return s;
        }
        let s = Arc::new(EndpointState::new(address));
        map.insert(address.to_string(), Arc::downgrade(&s));
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        s
    }
}

struct Level {
    endpoints: Vec<Arc<EndpointState>>,
    schedule: Schedule,
}

/// Picks endpoints: the lowest priority level with an available endpoint,
/// weighted round robin within it.
pub struct Balancer {
    levels: Vec<Level>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("levels", &self.levels.len())
            .finish()
    }
}

impl Balancer {
    /// `members`: (state, weight, priority).
    pub fn new(members: Vec<(Arc<EndpointState>, u32, u32)>) -> Balancer {
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
                Level {
                    schedule: Schedule::new(&weights),
                    endpoints,
                }
            })
            .collect();
        Balancer { levels }
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

    /// Whether any endpoint is currently not ejected.
    pub fn any_available(&self) -> bool {
        let now = mono_ms();
        self.endpoints().any(|e| e.available(now))
    }

    /// The next endpoint not in `tried`. Prefers available endpoints; when
    /// every untried one is ejected, returns one anyway (better to try than
    /// to fail without trying).
    pub fn pick(&self, tried: &[Arc<EndpointState>]) -> Option<Arc<EndpointState>> {
        let now = mono_ms();
        let untried = |e: &Arc<EndpointState>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
