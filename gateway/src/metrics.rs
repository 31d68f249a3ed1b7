//! Prometheus metrics of a gateway or sidecar process, served on the ops
//! port at `/metrics`.
//!
//! Label cardinality is bounded by the config, never by what a client
//! sends: routes and services are the config's (an unmatched request
//! counts under route `""`); a status `code` is one of at most 500
//! values; a sidecar's `destination` is a service its policy knows, else
//! `other`; a mesh call's `caller` is a configured service, else
//! `unknown`. The series of a deleted route or service are removed
//! ([`Metrics::forget`]). Process metrics keep their standard unprefixed
//! `process_*` names, so stock dashboards work.

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
    /// The live gateways a `cluster` rate limit is shared by, by pool.
    pub cluster_gateways: IntGaugeVec,
    /// Mirrored requests by result.
    pub mirror_requests: IntCounterVec,
    /// Access log lines written, and records dropped because the writer
    /// was behind.
    pub access_log_lines: IntCounter,
    pub access_log_dropped: IntCounter,
    /// Synthetic answers (`x-mesh-error`) by listener and reason.
    pub mesh_errors: IntCounterVec,
    /// Calls taken on a mesh or inbound listener, by caller and
    /// destination service, and their duration.
    pub mesh_calls: IntCounterVec,
    pub mesh_call_duration: HistogramVec,
    /// A sidecar's requests from its app, by destination, tier, status
    /// class and code, and their duration.
    pub sidecar_requests: IntCounterVec,
    pub sidecar_duration: HistogramVec,
    /// Requests a sidecar moved from this tier to the next.
    pub sidecar_failovers: IntCounterVec,
    /// A sidecar's plain-TCP connections, by destination, tier and result.
    pub sidecar_tcp: IntCounterVec,
    /// Requests by listener, method and status class
    /// (`requests_by_method_total`), resolved on first use.
    by_method: IntCounterVec,
    by_method_cache: Box<[std::sync::OnceLock<IntCounter>; LISTENERS.len() * METHODS.len() * 5]>,
    /// Trace spans exported, dropped (queue full), and failed exports.
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounter,
    pub trace_export_failures: IntCounter,
    /// The process collector, outside the `meshgate_` prefix.
    process: Registry,
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
                "Requests handled, by listener, route, service, status class and code",
            ),
            &["listener", "route", "service", "class", "code"],
        )
        .expect("metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request received to response headers sent",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["listener", "route"],
        )
        .expect("metric");
        let mesh_errors = IntCounterVec::new(
            Opts::new(
                "mesh_errors_total",
                "Synthetic answers of the mesh (x-mesh-error), by listener and reason",
            ),
            &["listener", "error"],
        )
        .expect("metric");
        let mesh_calls = IntCounterVec::new(
            Opts::new(
                "mesh_calls_total",
                "Calls on mesh and inbound listeners by calling service (unknown: not a configured service) and destination",
            ),
            &["caller", "destination", "class"],
        )
        .expect("metric");
        let mesh_call_duration = HistogramVec::new(
            HistogramOpts::new(
                "mesh_call_duration_seconds",
                "Duration of calls on mesh and inbound listeners by caller and destination",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["caller", "destination"],
        )
        .expect("metric");
        let sidecar_requests = IntCounterVec::new(
            Opts::new(
                "sidecar_requests_total",
                "A sidecar's requests from its app by destination (other: not in its policy), tier, status class and code",
            ),
            &["destination", "tier", "class", "code"],
        )
        .expect("metric");
        let sidecar_duration = HistogramVec::new(
            HistogramOpts::new(
                "sidecar_request_duration_seconds",
                "A sidecar's requests from its app: time to response headers, by destination and tier",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["destination", "tier"],
        )
        .expect("metric");
        let sidecar_failovers = IntCounterVec::new(
            Opts::new(
                "sidecar_tier_failovers_total",
                "Requests a sidecar moved from this tier to the next one",
            ),
            &["tier"],
        )
        .expect("metric");
        let sidecar_tcp = IntCounterVec::new(
            Opts::new(
                "sidecar_tcp_connections_total",
                "A sidecar's plain-TCP local-port connections by destination, tier and result",
            ),
            &["destination", "tier", "result"],
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
        let cluster_gateways = IntGaugeVec::new(
            Opts::new(
                "cluster_gateways",
                "Live gateways that share this gateway's `cluster` rate limits, by pool (ingress, mesh, all)",
            ),
            &["pool"],
        )
        .expect("metric");
        let mirror_requests = IntCounterVec::new(
            Opts::new(
                "mirror_requests_total",
                "Requests copied to a route's shadow service, by result: answered, failed, dropped (too many in flight), skipped (body over the replay buffer)",
            ),
            &["result"],
        )
        .expect("metric");
        let access_log_lines =
            IntCounter::new("access_log_lines_total", "Access log lines written").expect("metric");
        let access_log_dropped = IntCounter::new(
            "access_log_dropped_total",
            "Access log records dropped because the writer was behind (never waited for)",
        )
        .expect("metric");
        let by_method = IntCounterVec::new(
            Opts::new(
                "requests_by_method_total",
                "Requests by listener, method (other: not a standard method) and status class",
            ),
            &["listener", "method", "class"],
        )
        .expect("metric");
        let trace_spans_exported = IntCounter::new(
            "trace_spans_exported_total",
            "Trace spans exported over OTLP",
        )
        .expect("metric");
        let trace_spans_dropped = IntCounter::new(
            "trace_spans_dropped_total",
            "Trace spans dropped because the export queue was full (never waited for)",
        )
        .expect("metric");
        let trace_export_failures = IntCounter::new(
            "trace_export_failures_total",
            "OTLP export requests that failed (their spans are dropped)",
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
            Box::new(cluster_gateways.clone()),
            Box::new(mirror_requests.clone()),
            Box::new(access_log_lines.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(mesh_errors.clone()),
            Box::new(mesh_calls.clone()),
            Box::new(mesh_call_duration.clone()),
            Box::new(sidecar_requests.clone()),
            Box::new(sidecar_duration.clone()),
            Box::new(sidecar_failovers.clone()),
            Box::new(sidecar_tcp.clone()),
            Box::new(by_method.clone()),
            Box::new(trace_spans_exported.clone()),
            Box::new(trace_spans_dropped.clone()),
            Box::new(trace_export_failures.clone()),
            Box::new(info),
        ] {
            registry.register(c).expect("unique metric");
        }
        let process = Registry::new();
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics");
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
            cluster_gateways,
            mirror_requests,
            access_log_lines,
            access_log_dropped,
            mesh_errors,
            mesh_calls,
            mesh_call_duration,
            sidecar_requests,
            sidecar_duration,
            sidecar_failovers,
            sidecar_tcp,
            by_method,
            by_method_cache: Box::new(std::array::from_fn(|_| std::sync::OnceLock::new())),
            trace_spans_exported,
            trace_spans_dropped,
            trace_export_failures,
            process,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts a request on `listener` (`ingress`, `mesh`, `inbound`,
    /// `app`) by its method and answer.
    pub fn count_method(&self, listener: &str, method: &http::Method, status: u16) {
        let Some(l) = LISTENERS.iter().position(|x| *x == listener) else {
            return;
        };
        let m = METHODS
            .iter()
            .position(|x| *x == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        let c = class_index(status);
        let i = (l * METHODS.len() + m) * 5 + c;
        self.by_method_cache[i]
            .get_or_init(|| {
                self.by_method
                    .with_label_values(&[LISTENERS[l], METHODS[m], CLASSES[c]])
            })
            .inc();
    }

    /// Removes every series whose `label` is `value` (a deleted route or
    /// service) from the request metrics.
    pub fn forget(&self, label: &str, value: &str) {
        forget(&self.requests, label, value);
        forget(&self.duration, label, value);
        if label == "service" {
            forget(&self.mesh_calls, "destination", value);
            forget(&self.mesh_call_duration, "destination", value);
            forget(&self.mesh_calls, "caller", value);
            forget(&self.mesh_call_duration, "caller", value);
            forget(&self.resilience, "service", value);
            forget(&self.connect_failures, "service", value);
            forget(&self.authz_denied, "service", value);
        }
    }

    /// Counts a call on a mesh or inbound listener from `caller` (a
    /// configured service, else counted as `unknown`) to `destination`.
    pub(crate) fn mesh_call(&self, caller: &str, destination: &str, status: u16, secs: f64) {
        self.mesh_calls
            .with_label_values(&[caller, destination, status_class(status)])
            .inc();
        self.mesh_call_duration
            .with_label_values(&[caller, destination])
            .observe(secs);
    }
}

impl Metrics {
    /// The calls this process has counted, for the admin's topology
    /// (`/calls` on the ops port): on mesh and inbound listeners by caller
    /// and destination, and a sidecar's direct tier by destination. Each
    /// with its requests, its 5xx answers and its cumulative latency
    /// buckets (`[upper bound s, count]`). The same numbers `/metrics`
    /// shows, in a form that needs no parser.
    pub fn calls_json(&self) -> serde_json::Value {
        use std::collections::BTreeMap;
        #[derive(Default)]
        struct Counts {
            requests: u64,
            errors: u64,
            buckets: Vec<(f64, u64)>,
        }
        let labels = |m: &prometheus::proto::Metric| -> BTreeMap<String, String> {
            m.get_label()
                .iter()
                .map(|l| (l.get_name().to_string(), l.get_value().to_string()))
                .collect()
        };
        let mut calls: BTreeMap<(String, String), Counts> = BTreeMap::new();
        let mut direct: BTreeMap<String, Counts> = BTreeMap::new();
        use prometheus::core::Collector;
        for f in self.mesh_calls.collect() {
            for m in f.get_metric() {
                let l = labels(m);
                let c = calls
                    .entry((l["caller"].clone(), l["destination"].clone()))
                    .or_default();
                let n = m.get_counter().get_value() as u64;
                c.requests += n;
                if l["class"] == "5xx" {
                    c.errors += n;
                }
            }
        }
        for f in self.mesh_call_duration.collect() {
            for m in f.get_metric() {
                let l = labels(m);
                let c = calls
                    .entry((l["caller"].clone(), l["destination"].clone()))
                    .or_default();
                c.buckets = buckets(m.get_histogram());
            }
        }
        for f in self.sidecar_requests.collect() {
            for m in f.get_metric() {
                let l = labels(m);
                if l["tier"] != "direct" {
                    continue;
                }
                let c = direct.entry(l["destination"].clone()).or_default();
                let n = m.get_counter().get_value() as u64;
                c.requests += n;
                if l["class"] == "5xx" {
                    c.errors += n;
                }
            }
        }
        for f in self.sidecar_duration.collect() {
            for m in f.get_metric() {
                let l = labels(m);
                if l["tier"] == "direct" {
                    direct.entry(l["destination"].clone()).or_default().buckets =
                        buckets(m.get_histogram());
                }
            }
        }
        let counts = |c: &Counts| serde_json::json!({"requests": c.requests, "errors": c.errors, "buckets": c.buckets});
        serde_json::json!({
            "calls": calls.iter().map(|((caller, dest), c)| {
                let mut v = counts(c);
                v["caller"] = caller.as_str().into();
                v["destination"] = dest.as_str().into();
                v
            }).collect::<Vec<_>>(),
            "direct": direct.iter().map(|(dest, c)| {
                let mut v = counts(c);
                v["destination"] = dest.as_str().into();
                v
            }).collect::<Vec<_>>(),
        })
    }
}

/// A histogram's cumulative buckets, `+Inf` last.
fn buckets(h: &prometheus::proto::Histogram) -> Vec<(f64, u64)> {
    let mut b: Vec<(f64, u64)> = h
        .get_bucket()
        .iter()
        .map(|b| (b.get_upper_bound(), b.get_cumulative_count()))
        .collect();
    b.push((f64::INFINITY, h.get_sample_count()));
    b
}

/// Histogram buckets from 50 µs (a gateway's median is tens of
/// microseconds) to 30 s.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Removes the series of `vec` whose `label` is `value`.
fn forget<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    label: &str,
    value: &str,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels = m.get_label();
            if !labels
                .iter()
                .any(|l| l.get_name() == label && l.get_value() == value)
            {
                continue;
            }
            let by_name: std::collections::HashMap<&str, &str> = labels
                .iter()
                .map(|l| (l.get_name(), l.get_value()))
                .collect();
            let _ = vec.remove(&by_name);
        }
    }
}

/// One route's metric handles: the duration histogram and a request
/// counter per backend and common status code, resolved on first use.
/// Resolving them once per route keeps label hashing and the
/// metric-vector lock off the request path; an uncommon code is resolved
/// at each use.
#[derive(Debug)]
pub struct RouteStats {
    pub duration: Histogram,
    listener: String,
    route: String,
    services: Vec<String>,
    /// `[backend index][common code index]` (see [`COMMON_CODES`]).
    requests: Vec<[std::sync::OnceLock<IntCounter>; COMMON_CODES.len()]>,
    vec: IntCounterVec,
}

impl RouteStats {
    /// Handles for a route on `listener` with these backend services
    /// (an empty list: the route answers itself, counted with service "").
    pub fn new(m: &Metrics, listener: &str, route: &str, backends: &[&str]) -> RouteStats {
        let services: Vec<String> = if backends.is_empty() {
            vec![String::new()]
        } else {
            backends.iter().map(|s| s.to_string()).collect()
        };
        RouteStats {
            duration: m.duration.with_label_values(&[listener, route]),
            listener: listener.into(),
            route: route.into(),
            requests: services.iter().map(|_| Default::default()).collect(),
            services,
            vec: m.requests.clone(),
        }
    }

    /// Counts a request served by backend `backend` (0 for routes without
    /// backends) with `status`; [`NO_BACKEND`]: answered before a backend
    /// was chosen (a refusal of the route's policies), counted with
    /// service "".
    pub(crate) fn count(&self, backend: usize, status: u16) {
        let Some(svc) = self.services.get(backend) else {
            let mut code = itoa::Buffer::new();
            self.vec
                .with_label_values(&[
                    &self.listener,
                    &self.route,
                    "",
                    status_class(status),
                    code.format(status),
                ])
                .inc();
            return;
        };
        let class = status_class(status);
        match COMMON_CODES.iter().position(|&c| c == status) {
            Some(i) => self.requests[backend][i]
                .get_or_init(|| {
                    let code = COMMON_NAMES[i];
                    self.vec
                        .with_label_values(&[&self.listener, &self.route, svc, class, code])
                })
                .inc(),
            None => {
                let mut code = itoa::Buffer::new();
                let code = code.format(status);
                self.vec
                    .with_label_values(&[&self.listener, &self.route, svc, class, code])
                    .inc()
            }
        }
    }
}

/// The backend index of a request answered before a backend was chosen.
pub const NO_BACKEND: usize = usize::MAX;

/// Status codes whose counters a route keeps at hand.
const COMMON_CODES: [u16; 16] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504, 101,
];
const COMMON_NAMES: [&str; 16] = [
    "200", "201", "204", "301", "302", "304", "400", "401", "403", "404", "429", "500", "502",
    "503", "504", "101",
];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The listeners counted by method.
const LISTENERS: [&str; 4] = ["ingress", "mesh", "inbound", "app"];
/// Methods with their own label; anything else is `other` (bounded: a
/// client chooses the method).
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

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
