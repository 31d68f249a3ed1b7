//! Prometheus metrics of a gateway or sidecar process, served on the ops
//! port at `/metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by listener, route, service and status class.
    pub requests: IntCounterVec,
    /// Request duration by listener and route.
    pub duration: HistogramVec,
    /// Failed upstream connection attempts by service (or tier).
    pub connect_failures: IntCounterVec,
    /// The store revision of the applied config.
    pub config_revision: IntGauge,
    /// 1 while the config store watch is established.
    pub store_connected: IntGauge,
    /// Config objects currently rejected as invalid (their previous
    /// version, if any, stays in force).
    pub config_rejected: IntGauge,
    /// Active health-check results by endpoint and result (pass/fail).
    pub health_checks: IntCounterVec,
    /// Resilience events by service: retry, retry_budget_exhausted,
    /// retry_overflow, circuit_open, outlier_ejection.
    pub resilience: IntCounterVec,
    /// TCP route listeners open.
    pub tcp_listeners: IntGauge,
    /// Requests whose client went away mid-upload (client aborts).
    pub client_aborts: IntCounter,
    /// TLS handshakes by listener and result (`ok`, `failed`, `timeout`).
    pub tls_handshakes: IntCounterVec,
    /// When each served certificate (`certs/<name>`) expires.
    pub cert_expiry: IntGaugeVec,
    /// When the process's mesh identity certificate expires (0: none).
    pub identity_expiry: IntGauge,
    /// Calls refused by authorization, by destination service.
    pub authz_denied: IntCounterVec,
    /// Access log lines written, and records dropped because the writer
    /// was behind.
    pub access_log_lines: IntCounter,
    pub access_log_dropped: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Adds a process-specific metric (e.g. the sidecar's policy state).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "metric not registered");
        }
    }

    pub fn new(process: &str) -> Metrics {
        let registry = Registry::new_custom(Some("meshgate".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests handled, by listener, route, service and status class",
            ),
            &["listener", "route", "service", "class"],
        )
        .expect("metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request received to response headers sent",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["listener", "route"],
        )
        .expect("metric");
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "upstream_connect_failures_total",
                "Failed connection attempts to upstream endpoints",
            ),
            &["service"],
        )
        .expect("metric");
        let config_revision =
            IntGauge::new("config_revision", "Store revision of the applied config")
                .expect("metric");
        let store_connected = IntGauge::new(
            "store_connected",
            "1 while the config store watch is established",
        )
        .expect("metric");
        let config_rejected = IntGauge::new(
            "config_rejected_objects",
            "Config objects rejected as invalid (previous good version kept)",
        )
        .expect("metric");
        let health_checks = IntCounterVec::new(
            Opts::new(
                "health_checks_total",
                "Active health checks by endpoint and result",
            ),
            &["endpoint", "result"],
        )
        .expect("metric");
        let resilience = IntCounterVec::new(
            Opts::new(
                "resilience_events_total",
                "Retries, refused retries, breaker refusals and outlier ejections by service",
            ),
            &["service", "event"],
        )
        .expect("metric");
        let tcp_listeners =
            IntGauge::new("tcp_route_listeners", "TCP route listeners open").expect("metric");
        let client_aborts = IntCounter::new(
            "client_aborts_total",
            "Requests whose client went away in the middle of its upload",
        )
        .expect("metric");
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "tls_handshakes_total",
                "TLS handshakes on client listeners, by listener and result (ok, failed, timeout)",
            ),
            &["listener", "result"],
        )
        .expect("metric");
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "tls_cert_expiry_timestamp_seconds",
                "When each certificate served by the TLS ingress expires (Unix time)",
            ),
            &["cert"],
        )
        .expect("metric");
        let identity_expiry = IntGauge::new(
            "identity_cert_expiry_timestamp_seconds",
            "When this process's mesh identity certificate expires (Unix time; 0 without one)",
        )
        .expect("metric");
        let authz_denied = IntCounterVec::new(
            Opts::new(
                "authz_denied_total",
                "Mesh calls refused because the caller may not call the service (403 forbidden)",
            ),
            &["service"],
        )
        .expect("metric");
        let access_log_lines =
            IntCounter::new("access_log_lines_total", "Access log lines written").expect("metric");
        let access_log_dropped = IntCounter::new(
            "access_log_dropped_total",
            "Access log records dropped because the writer was behind (never waited for)",
        )
        .expect("metric");
        let info = IntGauge::with_opts(
            Opts::new("build_info", "Build information")
                .const_label("version", env!("CARGO_PKG_VERSION"))
                .const_label("process", process),
        )
        .expect("metric");
        info.set(1);
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(connect_failures.clone()),
            Box::new(config_revision.clone()),
            Box::new(store_connected.clone()),
            Box::new(config_rejected.clone()),
            Box::new(health_checks.clone()),
            Box::new(resilience.clone()),
            Box::new(tcp_listeners.clone()),
            Box::new(client_aborts.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(cert_expiry.clone()),
            Box::new(identity_expiry.clone()),
            Box::new(authz_denied.clone()),
            Box::new(access_log_lines.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            requests,
            duration,
            connect_failures,
            config_revision,
            store_connected,
            config_rejected,
            health_checks,
            resilience,
            tcp_listeners,
            client_aborts,
            tls_handshakes,
            cert_expiry,
            identity_expiry,
            authz_denied,
            access_log_lines,
            access_log_dropped,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// One route's metric handles: the duration histogram and a request
/// counter per backend and status class. Resolving them once per route
/// keeps label hashing and the metric-vector lock off the request path.
#[derive(Debug)]
pub struct RouteStats {
    pub duration: Histogram,
    /// `[backend index][status class index]` (see [`class_index`]).
    requests: Vec<[IntCounter; 5]>,
}

impl RouteStats {
    /// Handles for a route on `listener` with these backend services
    /// (an empty list: the route answers itself, counted with service "").
    pub fn new(m: &Metrics, listener: &str, route: &str, backends: &[&str]) -> RouteStats {
        let services: Vec<&str> = if backends.is_empty() {
            vec![""]
        } else {
            backends.to_vec()
        };
        RouteStats {
            duration: m.duration.with_label_values(&[listener, route]),
            requests: services
                .iter()
                .map(|svc| {
                    CLASSES
                        .map(|class| m.requests.with_label_values(&[listener, route, svc, class]))
                })
                .collect(),
        }
    }

    /// Counts a request served by backend `backend` (0 for routes without
    /// backends) with `status`.
    pub(crate) fn count(&self, backend: usize, status: u16) {
        if let Some(row) = self.requests.get(backend) {
            row[class_index(status)].inc();
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index of a status's class in [`CLASSES`].
pub(crate) fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// `2xx`, `4xx`...
pub fn status_class(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}
