//! The live state of one endpoint (or gateway member), shared by address
//! across config changes: its HTTP/1.1 pool, requests in flight and
//! latency (for load-aware balancing), passive ejection after failures,
//! outlier counters, and the active health verdict. All atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::mono_ms;
use crate::http::pool::H1Pool;
use crate::tls::ClientTls;
use crate::upstream::resilience::Outlier;

/// The live state of one endpoint (or gateway member).
#[derive(Debug)]
pub struct EndpointState {
    pub address: String,
    /// The address parsed once, for building upstream URIs; `None` if it
    /// is not a valid authority (such an endpoint is never connected to).
    pub authority: Option<http::uri::Authority>,
    /// Idle HTTP/1.1 connections to this endpoint.
    pub h1: Arc<H1Pool>,
    /// TLS to the endpoint (its service's `tls`); plaintext when `None`.
    pub tls: Option<Arc<ClientTls>>,
    /// Requests sent and not yet answered (response headers).
    in_flight: AtomicU32,
    /// Peak-EWMA of the time to response headers, in ns (0: no sample yet).
    ewma_ns: AtomicU64,
    ewma_at_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Outlier detection: answers in a row that were 5xx / gateway failures.
    consecutive_5xx: AtomicU32,
    consecutive_gw: AtomicU32,
    /// Times ejected by outlier detection (the ejection time multiplier).
    outlier_ejections: AtomicU32,
    /// Active health: [`Health`] as u8.
    health: AtomicU8,
}

/// The active health-check verdict of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not checked (no health check configured, or no result yet).
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

/// What an attempt to an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with this status.
    Status(u16),
    /// Connect failure, reset or timeout.
    GatewayFailure,
}

/// Base ejection time; doubles with each consecutive ejection.
const EJECT_BASE: Duration = Duration::from_millis(1000);
const EJECT_MAX: Duration = Duration::from_secs(30);

impl EndpointState {
    pub fn new(address: impl Into<String>) -> Self {
        Self::with_tls(address, None)
    }

    /// An endpoint reached over TLS with `tls` (plaintext when `None`).
    pub fn with_tls(address: impl Into<String>, tls: Option<Arc<ClientTls>>) -> Self {
        let address = address.into();
        EndpointState {
            authority: address.parse().ok(),
            address,
            h1: Default::default(),
            tls,
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            ewma_at_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gw: AtomicU32::new(0),
            outlier_ejections: AtomicU32::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
        }
    }

    /// Not ejected and not failing its health check.
    pub fn available(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
            && self.health.load(Ordering::Relaxed) != Health::Unhealthy as u8
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub(crate) fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }

    /// Until when (mono ms) the endpoint is ejected; 0 when it is not.
    pub(crate) fn ejected_until_ms(&self) -> u64 {
        let t = self.ejected_until_ms.load(Ordering::Relaxed);
        if t > mono_ms() {
            t
        } else {
            0
        }
    }

    /// Feeds outlier detection with the outcome of one attempt. Returns
    /// `true` when this outcome crossed a threshold and the endpoint should
    /// be ejected (the caller checks the ejection cap, then calls
    /// [`EndpointState::eject_outlier`]).
    pub(crate) fn record_outcome(&self, outcome: Outcome, cfg: &Outlier) -> bool {
        let (is_5xx, is_gw) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::GatewayFailure => (true, true),
        };
        let bump = |c: &AtomicU32, hit: bool| -> u32 {
            if hit {
                c.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                if c.load(Ordering::Relaxed) != 0 {
                    c.store(0, Ordering::Relaxed);
                }
                0
            }
        };
        let n5 = bump(&self.consecutive_5xx, is_5xx);
        let ngw = bump(&self.consecutive_gw, is_gw);
        (cfg.consecutive_5xx > 0 && n5 >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway_failure > 0 && ngw >= cfg.consecutive_gateway_failure)
    }

    /// Ejects for `base` × the number of outlier ejections so far (at most
    /// `max`) and starts counting afresh.
    pub(crate) fn eject_outlier(&self, cfg: &Outlier) {
        let n = u64::from(self.outlier_ejections.fetch_add(1, Ordering::Relaxed)) + 1;
        let ms = (cfg.base_ejection.as_millis() as u64)
            .saturating_mul(n)
            .min(cfg.max_ejection.as_millis() as u64);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gw.store(0, Ordering::Relaxed);
        self.ejected_until_ms
            .store(mono_ms() + ms, Ordering::Relaxed);
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

    pub(crate) fn on_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn is_ejected(&self) -> bool {
        !self.available(mono_ms())
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records the time to response headers: peak-EWMA, so a slow answer
    /// counts at once and good ones pull the estimate down over `EWMA_DECAY`.
    pub(crate) fn observe_rtt(&self, rtt: Duration) {
        let ns = rtt.as_nanos().min(u128::from(u64::MAX)) as u64;
        let now = mono_ms();
        let last = self.ewma_at_ms.swap(now, Ordering::Relaxed);
        let prev = self.ewma_ns.load(Ordering::Relaxed);
        let next = if prev == 0 || ns > prev {
            ns
        } else {
            let w = (-((now.saturating_sub(last)) as f64) / EWMA_DECAY.as_millis() as f64).exp();
            (prev as f64 * w + ns as f64 * (1.0 - w)) as u64
        };
        self.ewma_ns.store(next.max(1), Ordering::Relaxed);
    }

    /// Peak-EWMA latency in ns (`EWMA_DEFAULT` before the first sample).
    pub(crate) fn ewma_ns(&self) -> u64 {
        match self.ewma_ns.load(Ordering::Relaxed) {
            0 => EWMA_DEFAULT.as_nanos() as u64,
            v => v,
        }
    }
}

/// A request in flight to an endpoint (see [`EndpointState::start`]).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How fast the peak-EWMA forgets (linkerd2-proxy uses 10 s).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint without samples.
const EWMA_DEFAULT: Duration = Duration::from_millis(1);

/// Endpoint states by address, shared across config changes.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    by_addr: std::sync::Mutex<HashMap<String, std::sync::Weak<EndpointState>>>,
}

impl EndpointRegistry {
    /// The state for `address`, reused if any live balancer still holds it.
    /// Called on config changes only, never per request.
    pub fn get(&self, address: &str) -> Arc<EndpointState> {
        self.get_tls(address, None)
    }

    /// [`EndpointRegistry::get`] for an endpoint reached over `tls`: kept
    /// apart from the plaintext one and from other TLS settings (its pool
    /// holds connections made with these settings only).
    pub fn get_tls(&self, address: &str, tls: Option<Arc<ClientTls>>) -> Arc<EndpointState> {
        let key = match &tls {
            None => address.to_string(),
            Some(t) => format!("{address}#tls:{:x}", t.id),
        };
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&key).and_then(|w| w.upgrade()) {
            return s;
        }
        let s = Arc::new(EndpointState::with_tls(address, tls));
        map.insert(key, Arc::downgrade(&s));
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        s
    }

    /// Closes, in every live endpoint's pool, the connections idle for the
    /// pool's idle timeout (see [`crate::http::pool`]): what a pool does
    /// as it is used, done here for pools no request uses any more.
    /// Returns how many were closed.
    pub fn sweep_idle(&self) -> usize {
        let live: Vec<Arc<EndpointState>> = {
            let map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
            map.values().filter_map(|w| w.upgrade()).collect()
        };
        live.iter().map(|e| e.h1.close_expired()).sum()
    }

    /// Runs [`EndpointRegistry::sweep_idle`] every [`SWEEP_EVERY`] on the
    /// current runtime, until the registry is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(r) = registry.upgrade() else { return };
                let closed = r.sweep_idle();
                if closed > 0 {
                    tracing::debug!(closed, "idle upstream connections closed");
                }
            }
        })
    }
}

/// How often idle upstream connections past their time are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);
