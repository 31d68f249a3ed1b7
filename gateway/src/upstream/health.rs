//! Active health checks: one prober task per endpoint address in the whole
//! process (not per thread, not per service), started as soon as a service
//! with a `health_check` is configured and stopped when no service wants
//! it any more.
//!
//! A prober connects (TCP check) or sends `GET <path>` over HTTP/1.1 (HTTP
//! check) every interval and sets the endpoint's [`Health`]: the first
//! result counts at once; after that `unhealthy_threshold` failures in a row
//! turn it unhealthy and `healthy_threshold` passes turn it healthy again.
//! The balancer skips unhealthy endpoints. When two services check the same
//! address differently, the service whose name sorts first decides.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use meshgate_config::model::HealthCheck;
use prometheus::IntCounterVec;

use crate::tls::ClientTls;
use crate::upstream::endpoint::{EndpointState, Health};

/// The process's health checks.
pub struct HealthChecks {
    inner: Mutex<Inner>,
    /// `health_checks_total{endpoint, result}`.
    counter: Option<IntCounterVec>,
}

#[derive(Default)]
struct Inner {
    /// What each service asks for.
    wanted: BTreeMap<String, (HealthCheck, Vec<Arc<EndpointState>>)>,
    /// Running probers by address.
    running: HashMap<String, Prober>,
}

struct Prober {
    spec: HealthCheck,
    endpoint: Arc<EndpointState>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lock().running.len();
        f.debug_struct("HealthChecks").field("probers", &n).finish()
    }
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks::new(None)
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, p) in self.lock().running.drain() {
            p.task.abort();
        }
    }
}

impl HealthChecks {
    pub fn new(counter: Option<IntCounterVec>) -> HealthChecks {
        HealthChecks {
            inner: Mutex::default(),
            counter,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or with `None` clears) what `service` wants checked, and
    /// starts or stops probers to match. Called on config changes.
    pub fn set(&self, service: &str, check: Option<(&HealthCheck, Vec<Arc<EndpointState>>)>) {
        let mut inner = self.lock();
        match check {
            Some((spec, eps)) => {
                inner
                    .wanted
                    .insert(service.to_string(), (spec.clone(), eps));
            }
            None => {
                if inner.wanted.remove(service).is_none() {
                    return;
                }
            }
        }
        // The spec each address should be probed with.
        let mut want: HashMap<&str, (&HealthCheck, &Arc<EndpointState>)> = HashMap::new();
        for (spec, eps) in inner.wanted.values() {
            for e in eps {
                want.entry(e.address.as_str()).or_insert((spec, e));
            }
        }
        let mut stop = Vec::new();
        for (addr, p) in &inner.running {
            match want.get(addr.as_str()) {
                Some((spec, e)) if **spec == p.spec && Arc::ptr_eq(e, &p.endpoint) => {}
                _ => stop.push(addr.clone()),
            }
        }
        let mut start = Vec::new();
        for (addr, (spec, e)) in &want {
            if !inner.running.contains_key(*addr) || stop.iter().any(|s| s == addr) {
                start.push(((*spec).clone(), (*e).clone()));
            }
        }
        // A departed endpoint's series go with it.
        let departed: Vec<String> = stop
            .iter()
            .filter(|a| !want.contains_key(a.as_str()))
            .cloned()
            .collect();
        for addr in stop {
            if let Some(p) = inner.running.remove(&addr) {
                p.task.abort();
                p.endpoint.set_health(Health::Unknown);
            }
        }
        if let Some(c) = &self.counter {
            for addr in &departed {
                for result in ["pass", "fail"] {
                    let _ = c.remove_label_values(&[addr, result]);
                }
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (spec, endpoint) in start {
            let task = rt.spawn(probe_loop(
                spec.clone(),
                endpoint.clone(),
                self.counter.clone(),
            ));
            inner.running.insert(
                endpoint.address.clone(),
                Prober {
                    spec,
                    endpoint,
                    task,
                },
            );
        }
    }

    /// Addresses being probed.
    #[cfg(test)]
    pub(crate) fn probing(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().running.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Health from a run of check results: the first result counts at once;
/// then `unhealthy_threshold` failures in a row turn it unhealthy and
/// `healthy_threshold` passes healthy again.
#[derive(Debug, Default)]
pub struct Verdict {
    passes: u32,
    fails: u32,
    healthy: Option<bool>,
}

impl Verdict {
    /// Records one result; returns whether the target is healthy now.
    pub fn record(&mut self, ok: bool, spec: &HealthCheck) -> bool {
        if ok {
            self.passes += 1;
            self.fails = 0;
        } else {
            self.fails += 1;
            self.passes = 0;
        }
        let now = match self.healthy {
            None => ok,
            Some(_) if ok && self.passes >= spec.healthy_threshold => true,
            Some(_) if !ok && self.fails >= spec.unhealthy_threshold => false,
            Some(h) => h,
        };
        self.healthy = Some(now);
        now
    }
}

async fn probe_loop(spec: HealthCheck, ep: Arc<EndpointState>, counter: Option<IntCounterVec>) {
    let interval = Duration::from_millis(spec.interval_ms);
    let timeout = Duration::from_millis(spec.timeout_ms);
    let mut verdict = Verdict::default();
    loop {
        let result =
            tokio::time::timeout(timeout, probe(&spec, &ep.address, ep.tls.as_deref())).await;
        let ok = match result {
            Ok(Ok(())) => true,
            Ok(Err(why)) => {
                tracing::debug!(endpoint = %ep.address, %why, "health check failed");
                false
            }
            Err(_) => {
                tracing::debug!(endpoint = %ep.address, "health check timed out");
                false
            }
        };
        if let Some(c) = &counter {
            c.with_label_values(&[&ep.address, if ok { "pass" } else { "fail" }])
                .inc();
        }
        let before = ep.health();
        let after = if verdict.record(ok, &spec) {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
        if after != before {
            ep.set_health(after);
            if after == Health::Unhealthy {
                tracing::warn!(endpoint = %ep.address, "endpoint failed its health check; not sending it traffic");
            } else if before == Health::Unhealthy {
                tracing::info!(endpoint = %ep.address, "endpoint passes its health check again");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One check of `address`, over `tls` when given (no timeout of its own:
/// the caller bounds it).
pub async fn probe(
    spec: &HealthCheck,
    address: &str,
    tls: Option<&ClientTls>,
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let stream = match tls {
        None => tokio_util::either::Either::Left(stream),
        Some(tls) => tokio_util::either::Either::Right(
            tls.connect(stream, address)
                .await
                .map_err(|e| format!("TLS: {e}"))?,
        ),
    };
    let Some(http) = &spec.http else {
        return Ok(());
    };
    if let tokio_util::either::Either::Left(s) = &stream {
        let _ = s.set_nodelay(true);
    }
    let (mut tx, conn) = http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = Request::get(http.path.as_str())
        .header(http::header::HOST, http.host.as_deref().unwrap_or(address))
        .header(http::header::USER_AGENT, "meshgate-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string());
    conn.abort();
    let status = resp?.status();
    if passes(status, &http.expected_statuses) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn passes(status: StatusCode, expected: &[u16]) -> bool {
    if expected.is_empty() {
        status.is_success()
    } else {
        expected.contains(&status.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_counts_the_first_result_then_thresholds() {
        let spec = HealthCheck {
            http: None,
            tcp: true,
            interval_ms: 1000,
            timeout_ms: 100,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let mut v = Verdict::default();
        assert!(!v.record(false, &spec), "the first result counts at once");
        assert!(!v.record(true, &spec));
        assert!(v.record(true, &spec), "healthy after 2 passes");
        assert!(v.record(false, &spec));
        assert!(v.record(false, &spec));
        assert!(!v.record(false, &spec), "unhealthy after 3 failures");
    }

    #[test]
    fn expected_statuses_default_to_2xx() {
        assert!(passes(StatusCode::OK, &[]));
        assert!(passes(StatusCode::NO_CONTENT, &[]));
        assert!(!passes(StatusCode::SERVICE_UNAVAILABLE, &[]));
        assert!(passes(StatusCode::SERVICE_UNAVAILABLE, &[503]));
        assert!(!passes(StatusCode::OK, &[204]));
    }

    #[tokio::test]
    async fn one_prober_per_address_across_services() {
        let hc = HealthChecks::default();
        let ep = Arc::new(EndpointState::new("127.0.0.1:1"));
        let spec = HealthCheck {
            http: None,
            tcp: true,
            interval_ms: 60_000,
            timeout_ms: 100,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        };
        hc.set("a", Some((&spec, vec![ep.clone()])));
        hc.set("b", Some((&spec, vec![ep.clone()])));
        assert_eq!(hc.probing(), ["127.0.0.1:1"]);
        hc.set("a", None);
        assert_eq!(hc.probing(), ["127.0.0.1:1"]);
        hc.set("b", None);
        assert!(hc.probing().is_empty());
        assert_eq!(ep.health(), Health::Unknown);
    }
}
