//! Per-service resilience state of one gateway process: circuit-breaker
//! counters, the retry budget, and the retry policy compiled for the hot
//! path.
//!
//! The counters live in a [`ServiceShared`], one per service name, kept
//! across config changes (a change to a service must not reset what is in
//! flight to it); the limits and the policy come from the compiled service.
//! Everything here is atomics: no lock on the request path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::Method;
use meshgate_config::model::{CircuitBreaker, RetryBudget, RetryPolicy};

use crate::clock::mono_ms;
use crate::http::limit::{ConnCounter, Held, InFlightCount, Overflow};

/// Counters shared by every compiled version of one service.
#[derive(Debug, Default)]
pub struct ServiceShared {
    /// Requests in flight (admitted, response not yet finished).
    pub requests: Arc<InFlightCount>,
    /// Retries in flight.
    pub retries: Arc<InFlightCount>,
    /// Open HTTP/1.1 connections and requests waiting for one.
    pub conns: Arc<ConnCounter>,
    pub budget: BudgetWindow,
}

/// `ServiceShared` by service name, reused across config changes.
#[derive(Debug, Default)]
pub(crate) struct SharedRegistry {
    by_name: Mutex<HashMap<String, Weak<ServiceShared>>>,
}

impl SharedRegistry {
    /// Called on config changes only.
    pub(crate) fn get(&self, name: &str) -> Arc<ServiceShared> {
        let mut map = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(ServiceShared::default());
        map.insert(name.to_string(), Arc::downgrade(&s));
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        s
    }
}

/// A request admitted by the breaker; leaves when dropped.
pub(crate) type Admitted = Held;

/// A retry in flight; leaves when dropped.
pub(crate) type RetryPermit = Held;

/// Admits a request under `max_requests`.
pub(crate) fn admit(
    shared: &Arc<ServiceShared>,
    limits: &CircuitBreaker,
) -> Result<Admitted, Overflow> {
    shared
        .requests
        .hold(limits.max_requests)
        .ok_or(Overflow::Requests)
}

/// A retry slot under `max_retries`, or `None` (the retry is not made).
pub(crate) fn retry_permit(
    shared: &Arc<ServiceShared>,
    limits: &CircuitBreaker,
) -> Option<RetryPermit> {
    shared.retries.hold(limits.max_retries)
}

// === retry budget ===

const WINDOW_SLOTS: usize = 10;
const SLOT_MS: u64 = 1000;

/// Requests and retries over the last 10 seconds, in one-second slots.
#[derive(Debug, Default)]
pub struct BudgetWindow {
    slots: [Slot; WINDOW_SLOTS],
}

#[derive(Debug, Default)]
struct Slot {
    /// The second this slot counts (mono_ms / 1000).
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl BudgetWindow {
    fn slot(&self, now_s: u64) -> &Slot {
        let s = &self.slots[(now_s % WINDOW_SLOTS as u64) as usize];
        let seen = s.second.load(Ordering::Acquire);
        if seen != now_s
            && s.second
                .compare_exchange(seen, now_s, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            s.requests.store(0, Ordering::Release);
            s.retries.store(0, Ordering::Release);
        }
        s
    }

    /// Counts one request (first attempts only).
    pub(crate) fn record_request(&self) {
        self.slot(mono_ms() / SLOT_MS)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    fn totals(&self, now_s: u64) -> (u64, u64) {
        let mut req = 0u64;
        let mut ret = 0u64;
        for s in &self.slots {
            let sec = s.second.load(Ordering::Acquire);
            if sec + (WINDOW_SLOTS as u64) > now_s && sec <= now_s {
                req += u64::from(s.requests.load(Ordering::Relaxed));
                ret += u64::from(s.retries.load(Ordering::Relaxed));
            }
        }
        (req, ret)
    }

    /// Takes one retry from the budget: allowed while the retries in the
    /// window stay under `min_per_s` × 10 s + `percent` % of the requests.
    pub(crate) fn try_withdraw(&self, budget: &RetryBudget) -> bool {
        let now_s = mono_ms() / SLOT_MS;
        let (req, ret) = self.totals(now_s);
        let allowed = u64::from(budget.min_per_s) * WINDOW_SLOTS as u64
            + req * u64::from(budget.percent) / 100;
        if ret >= allowed {
            return false;
        }
        self.slot(now_s).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

// === retry policy ===

/// A retry policy ready for the request path.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub on_reset: bool,
    pub on_per_try_timeout: bool,
    /// Bit `s - 500` set for each retried status.
    statuses: u128,
    pub non_idempotent: bool,
    pub budget: RetryBudget,
}

impl Retry {
    pub fn new(p: &RetryPolicy) -> Retry {
        let statuses = p
            .statuses
            .iter()
            .filter(|s| (500..628).contains(*s))
            .fold(0u128, |acc, s| acc | 1u128 << (s - 500));
        Retry {
            attempts: p.attempts,
            on_reset: p.on_reset,
            on_per_try_timeout: p.on_per_try_timeout,
            statuses,
            non_idempotent: p.non_idempotent,
            budget: p.budget,
        }
    }

    pub(crate) fn on_status(&self, status: u16) -> bool {
        (500..628).contains(&status) && self.statuses & (1u128 << (status - 500)) != 0
    }

    /// Whether a request with this method (and `x-mesh-retryable`) may be
    /// sent again after it was sent once.
    pub(crate) fn method_allowed(&self, method: &Method, marked_retryable: bool) -> bool {
        self.non_idempotent || marked_retryable || crate::http::headers::idempotent(method)
    }
}

/// Outlier-detection settings ready for the request path.
#[derive(Debug, Clone, Copy)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl From<&meshgate_config::model::OutlierDetection> for Outlier {
    fn from(o: &meshgate_config::model::OutlierDetection) -> Outlier {
        Outlier {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway_failure: o.consecutive_gateway_failure,
            base_ejection: Duration::from_millis(o.base_ejection_ms),
            max_ejection: Duration::from_millis(o.max_ejection_ms),
            max_ejection_percent: o.max_ejection_percent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_the_minimum_then_a_share_of_requests() {
        let w = BudgetWindow::default();
        let b = RetryBudget {
            percent: 20,
            min_per_s: 1,
        };
        // 1/s over a 10 s window: 10 retries without any request.
        let granted = (0..50).filter(|_| w.try_withdraw(&b)).count();
        assert_eq!(granted, 10);
        // 100 requests add 20 more.
        for _ in 0..100 {
            w.record_request();
        }
        let granted = (0..50).filter(|_| w.try_withdraw(&b)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn breaker_refuses_over_the_limit_and_frees_on_drop() {
        let shared = Arc::new(ServiceShared::default());
        let limits = CircuitBreaker {
            max_requests: Some(2),
            ..Default::default()
        };
        let a = admit(&shared, &limits).unwrap();
        let _b = admit(&shared, &limits).unwrap();
        assert_eq!(admit(&shared, &limits).unwrap_err(), Overflow::Requests);
        drop(a);
        assert!(admit(&shared, &limits).is_ok());
    }

    #[test]
    fn retries_in_flight_are_capped() {
        let shared = Arc::new(ServiceShared::default());
        let limits = CircuitBreaker {
            max_retries: Some(1),
            ..Default::default()
        };
        let first = retry_permit(&shared, &limits).expect("one retry may fly");
        assert!(retry_permit(&shared, &limits).is_none());
        drop(first);
        assert!(retry_permit(&shared, &limits).is_some());
    }

    #[test]
    fn retry_statuses_and_methods() {
        let r = Retry::new(&RetryPolicy {
            attempts: 2,
            on_reset: true,
            on_per_try_timeout: true,
            statuses: vec![503, 504],
            non_idempotent: false,
            budget: RetryBudget::default(),
        });
        assert!(r.on_status(503) && r.on_status(504));
        assert!(!r.on_status(500) && !r.on_status(200));
        assert!(r.method_allowed(&Method::GET, false));
        assert!(!r.method_allowed(&Method::POST, false));
        assert!(r.method_allowed(&Method::POST, true));
    }
}
