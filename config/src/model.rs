//! The config model: the serde types stored one JSON object per key in etcd
//! (or together in the standalone YAML file).
//!
//! Config kinds: [`Cert`], [`Service`], [`Route`], [`Group`], [`Consumer`]. Runtime kinds, written by
//! the processes under leases: [`Node`], [`Instance`]. Every type refuses
//! unknown fields; [`crate::validate`] checks the semantics and names the
//! field path of every problem.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Labels attached to objects, for filtering and for humans.
pub type Labels = BTreeMap<String, String>;

// === services ===

/// A destination service: where its endpoints are and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The service group this service belongs to (its sidecars use that
    /// group's egress gateways).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Static endpoints. Instances registered in etcd join these.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Upstream protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Load-balancing policy.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// What `consistent_hash` hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Default timeouts for requests to this service.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Service to use when this one has no healthy endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Active health checking of the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Passive health: eject endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Limits on what this gateway sends to the service at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Default retry policy of routes to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// TLS to the endpoints (an HTTPS or gRPC-over-TLS backend); plaintext
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Mutual TLS to the service's instances (their sidecars' inbound
    /// listeners): `off` (the default: plaintext, or `tls`; for endpoints
    /// outside the mesh), `permissive` (gateways call with mutual TLS;
    /// the inbound takes plaintext callers too, for a migration) or
    /// `strict` (the inbound takes mutual TLS only).
    #[serde(default, skip_serializing_if = "Mtls::is_off")]
    pub mtls: Mtls,
    /// Who may call this service through the mesh, by verified identity:
    /// `*` (any), `<service>`, `group/<g>/service/<svc>`,
    /// `group/<g>/service/*`, `gateway/<id>`, `gateway/*`. Absent: the
    /// group's `authorization` default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_callers: Option<Vec<String>>,
    /// The services this service calls, and how its sidecars reach each
    /// one. A sidecar's local policy covers exactly these; a call to any
    /// other destination goes to the central tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<Destination>,
    /// Requests this service takes through the gateways from all callers
    /// together (by `key`, per gateway or shared by the cluster): over it,
    /// 429 `rate_limited`, whatever the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// How a gateway reaches a service's endpoints over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent by SNI and verified in the endpoint's certificate;
    /// default: the endpoint's host (a name or an IP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM certificates of the roots to trust; default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Verify the endpoint's certificate (default `true`). `false` accepts
    /// any certificate: for a lab, never across a network you do not own.
    #[serde(default = "default_true")]
    pub verify: bool,
}

/// A service that a service calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub service: String,
    #[serde(default)]
    pub mode: DestinationMode,
}

/// How a sidecar reaches a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum DestinationMode {
    /// Through the group's egress gateways (then the central tier).
    #[default]
    Gateway,
    /// The sidecar balances to the destination's endpoints itself, with
    /// the destination's timeouts, retries, health checks and outlier
    /// detection; then the group's gateways, then the central tier.
    Direct,
}

/// Active health checks: an HTTP request or a TCP connect to every
/// endpoint, every `interval_ms`, from the moment the service is
/// configured. An endpoint turns unhealthy after `unhealthy_threshold`
/// failed checks in a row and healthy again after `healthy_threshold`
/// passed ones; the first result after (re)configuration counts at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Check with an HTTP/1.1 GET (exactly one of `http` and `tcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Check that a TCP connection can be made.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tcp: bool,
    #[serde(default = "default_hc_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// The HTTP request of a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub path: String,
    /// Statuses that pass (default: any 2xx).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
    /// The `Host` header sent (default: the endpoint address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn default_hc_interval() -> u64 {
    5_000
}
fn default_hc_timeout() -> u64 {
    1_000
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

/// Passive outlier detection (Envoy's model): an endpoint that fails
/// `consecutive_5xx` (any 5xx answer or gateway failure) or
/// `consecutive_gateway_failure` (connect failure, reset, timeout, 502, 503,
/// 504) times in a row is ejected for `base_ejection_ms` × the number of
/// times it has been ejected, at most `max_ejection_ms`; never more than
/// `max_ejection_percent` of the endpoints at once (but always at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default = "default_consecutive")]
    pub consecutive_5xx: u32,
    #[serde(default = "default_consecutive")]
    pub consecutive_gateway_failure: u32,
    #[serde(default = "default_base_ejection")]
    pub base_ejection_ms: u64,
    #[serde(default = "default_max_ejection")]
    pub max_ejection_ms: u64,
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: default_consecutive(),
            consecutive_gateway_failure: default_consecutive(),
            base_ejection_ms: default_base_ejection(),
            max_ejection_ms: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection() -> u64 {
    30_000
}
fn default_max_ejection() -> u64 {
    300_000
}
fn default_max_ejection_percent() -> u32 {
    50
}

/// Per-service limits of one gateway process. A request over a limit is
/// answered at once with 503 `x-mesh-error: circuit_open`; a retry over
/// `max_retries` is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Open HTTP/1.1 connections to the service's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection (when `max_connections` is reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight (until their response body ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// When and how often a failed request is tried again, on another
/// endpoint. A refused connection is always tried elsewhere (nothing was
/// sent); this policy covers what happens after a request was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0..=10).
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Retry when the connection breaks after the request was sent.
    #[serde(default = "default_true")]
    pub on_reset: bool,
    /// Retry when an attempt gets no answer within `timeouts.per_try_ms`.
    #[serde(default = "default_true")]
    pub on_per_try_timeout: bool,
    /// Upstream statuses that are retried (e.g. `[503]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<u16>,
    /// Also retry non-idempotent methods (POST, PATCH). Off by default: only
    /// GET, HEAD, OPTIONS, PUT, DELETE and TRACE are retried, or requests
    /// marked `x-mesh-retryable: true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Retries allowed on top of the live traffic.
    #[serde(default)]
    pub budget: RetryBudget,
}

/// A retry budget (linkerd2-proxy's): over a 10-second window, retries may
/// add at most `percent` % of the requests, plus `min_per_s` per second, so
/// that retries cannot multiply an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default = "default_budget_percent")]
    pub percent: u32,
    #[serde(default = "default_budget_min")]
    pub min_per_s: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: default_budget_percent(),
            min_per_s: default_budget_min(),
        }
    }
}

fn default_retry_attempts() -> u32 {
    2
}
fn default_true() -> bool {
    true
}
fn default_budget_percent() -> u32 {
    20
}
fn default_budget_min() -> u32 {
    10
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `host:port`; the host is an IP address or a DNS name.
    pub address: String,
    /// Relative weight for weighted load balancing (1..=10000).
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Lower number = preferred. Higher priorities are used only when no
    /// endpoint of a lower one is healthy.
    #[serde(default)]
    pub priority: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

fn default_weight() -> u32 {
    1
}

/// Upstream protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    Http2,
    Grpc,
    Tcp,
}

/// Load-balancing policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Smooth weighted round robin (nginx's algorithm).
    #[default]
    RoundRobin,
    /// Power of two choices: the one of two random endpoints with fewer
    /// requests in flight (per unit of weight).
    LeastRequest,
    /// Power of two choices over peak-EWMA latency × requests in flight
    /// (linkerd2-proxy's balancer): slow endpoints get less traffic.
    PeakEwma,
    /// A hash ring on `hash_on`: one key, one endpoint, and few keys move
    /// when endpoints come and go.
    ConsistentHash,
}

/// The request value a consistent-hash service hashes (exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The client's IP address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
}

/// Timeouts in milliseconds. `None` means the process default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time to establish a TCP connection to an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    /// The whole request: from its arrival until the response headers,
    /// retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// One attempt: from sending it until the response headers (default:
    /// the whole `request_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_ms: Option<u64>,
    /// A response body, WebSocket or TCP stream with no data for this long
    /// is closed (default: none for HTTP, 1 hour for tunnels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

// === routes ===

/// Which listeners a route applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// North–south traffic on ingress listeners.
    Ingress,
    /// East–west traffic on mesh listeners (egress and central roles).
    #[default]
    Mesh,
}

/// A route: which requests it matches and where they go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default)]
    pub scope: Scope,
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    /// Higher wins. Among equal priorities the most specific match wins.
    #[serde(default)]
    pub priority: i32,
    /// Weighted backends. Exactly one of `backends` and `direct_response`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Backends chosen by request conditions, tried in order before
    /// `backends` (e.g. `user-agent` matching `.*iPhone.*` → `orders-v2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_rules: Vec<BackendRule>,
    /// Keep one user on one backend: the backend is chosen by a hash of
    /// this header or cookie (by weight) instead of round robin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Changes made to the request on its way upstream and to the response
    /// on its way back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Answer directly from the gateway instead of proxying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    /// Overrides the service's timeouts (each field set replaces the
    /// service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Overrides the service's retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Who may call the route: its consumers' credentials (ingress
    /// routes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuth>,
    /// Requests the route takes, by `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Delays or aborts injected into a share of the requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// A share of the requests copied to a shadow service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Responses to GET and HEAD kept and served by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// An L4 route: a TCP port on the ingress gateways whose connections are
/// proxied, byte for byte, to a service's endpoints (load balancing,
/// health checks, outlier ejection and connect fail-over as for HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// The port listened on, on the ingress listener's address.
    pub port: u16,
    pub service: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// What a route matches. Every given condition must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Host names (without port), lower case. Empty = any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Upper-case HTTP methods. Empty = any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions (values compared percent-decoded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// A path condition: exactly one of the fields. `regex` must match the
/// whole path (it is anchored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A header or query-parameter condition. With only `name` (or
/// `present: true`) the header must be present; `present: false` means it
/// must be absent; `exact` and `regex` (anchored) constrain the value: any
/// one of the header's values matching is enough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A header condition.
pub type HeaderMatch = ValueMatch;

/// Backends for requests matching conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendRule {
    #[serde(rename = "match", default)]
    pub matches: RuleMatch,
    pub backends: Vec<Backend>,
    /// Faults injected into the requests this rule takes (instead of the
    /// route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// The request conditions of a backend rule (all must hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// What a sticky choice hashes: exactly one of a header and a cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

/// Request and response rewrites of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the matched `match.path.prefix` (`/` strips it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The `Host` sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
}

/// Header changes: `remove` first, then `set` (replacing any value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// A backend of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// A response generated by the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

// === edge policies ===

/// A rate limit: `requests` per `per`, with `burst` taken at once (GCRA:
/// a request is allowed when the limiter's theoretical arrival time is at
/// most `burst` emission intervals ahead of now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per `per` (at least 1).
    pub requests: u32,
    #[serde(default)]
    pub per: Per,
    /// Requests allowed at once (default: `requests`, a whole window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// What is counted separately: the whole route or service (default),
    /// each consumer, each client address, or each value of `header`. A
    /// consumer's own `rate_limit` is always by consumer.
    #[serde(default)]
    pub key: LimitKey,
    /// The header whose value is the key (with `key: header`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// `gateway` (default): each gateway allows the limit; `cluster`: the
    /// limit is shared by the live gateways that serve the route (each
    /// allows `requests / N`, N read from `nodes/`).
    #[serde(default)]
    pub scope: LimitScope,
    /// Distinct keys tracked per gateway (default 100 000); the least
    /// used idle ones are forgotten first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
}

/// The window of a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    #[default]
    Second,
    Minute,
}

impl Per {
    pub fn seconds(self) -> u64 {
        match self {
            Per::Second => 1,
            Per::Minute => 60,
        }
    }
}

/// What a rate limit counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// One count for every request.
    #[default]
    Route,
    /// One count per authenticated consumer (requests without one share
    /// the count of the client address).
    Consumer,
    /// One count per client address.
    SourceIp,
    /// One count per value of `header` (requests without it share one).
    Header,
}

/// Who shares a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    #[default]
    Gateway,
    Cluster,
}

/// A route's authentication: the credentials it takes (`api_key`, `jwt`
/// or both: the first one the request presents decides). The consumer
/// found is sent upstream in `x-mesh-consumer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAuth>,
    /// The consumers allowed (others get 403); empty: every consumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
}

/// Where a request's API key is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    /// The header holding the key (default `x-api-key` when `query` is
    /// not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The query parameter holding the key (removed before the request
    /// goes upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// What a bearer JWT must satisfy (its signature: a key of a consumer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct JwtAuth {
    /// The `iss` required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// One of these must be in `aud` (empty: `aud` is not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Leeway for `exp` and `nbf` (default 30 s).
    #[serde(default = "default_clock_skew")]
    pub clock_skew_s: u64,
    /// Claims that must be present (`exp` always is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<String>,
}

fn default_clock_skew() -> u64 {
    30
}

/// Faults injected into a share of a route's requests, for chaos tests:
/// a delay before the request goes on, and/or an abort answered by the
/// gateway (`x-mesh-error: fault_injected`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    /// Only requests carrying this header are eligible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// An injected delay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub ms: u64,
    /// Share of eligible requests delayed (0–100, decimals allowed).
    pub percent: Percent,
}

/// An injected abort: `status` for HTTP callers, `grpc_status` (default
/// 14, UNAVAILABLE) for gRPC callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(default = "default_abort_status")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    /// Share of eligible requests aborted (0–100, decimals allowed).
    pub percent: Percent,
}

fn default_abort_status() -> u16 {
    503
}

/// Traffic mirroring: a share of a route's requests also sent to a shadow
/// service, fire-and-forget (its answer, time and failures never touch
/// the main response). Bodies are mirrored up to the replay-buffer size;
/// a request with a larger body is not mirrored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub service: String,
    /// Share of the requests mirrored (0–100, decimals allowed; default 100).
    #[serde(default = "full_percent")]
    pub percent: Percent,
}

fn full_percent() -> Percent {
    Percent(100.0)
}

/// A route's response cache (GET and HEAD): what the upstream allows by
/// `Cache-Control` (`s-maxage`, `max-age`; never `no-store`, `private` or
/// `no-cache`), `Expires`, and `Vary`. Answers carry `x-mesh-cache: hit`,
/// `miss` or `bypass`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Total bytes of bodies kept per gateway (default 64 MiB).
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: u64,
    /// The largest body kept (default 1 MiB).
    #[serde(default = "default_cache_object_bytes")]
    pub max_object_bytes: u64,
}

fn default_cache_bytes() -> u64 {
    64 << 20
}
fn default_cache_object_bytes() -> u64 {
    1 << 20
}

/// A percentage, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Percent(pub f64);

impl Eq for Percent {}

// === consumers ===

/// An external caller of ingress routes (`consumers/<name>`): its
/// credentials, labels and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// API keys. Only their SHA-256 is stored: the admin API replaces a
    /// written `key` by its `sha256`, and never shows either.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
    /// Keys that verify this consumer's JWTs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<ConsumerJwt>,
    /// This consumer's requests on this gateway, over every route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// One API key of a consumer: exactly one of `key` (write-only) and
/// `sha256` (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// A name for the key (to rotate it), shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A consumer's JWT verification keys: `keys`, and/or a JWKS document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsumerJwt {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<JwtKey>,
    /// A JWKS document (`{"keys": [...]}`) held in the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
}

/// One JWT verification key. A token whose header names a `kid` is
/// checked with the key of that `kid` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    pub algorithm: JwtAlgorithm,
    /// The HS256 secret (write-only: never shown; a write without it
    /// keeps the stored one of the same `kid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The PEM public key (RS256, ES256, EdDSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// The JWT signature algorithms taken (never `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
    EdDSA,
}

// === certs ===

/// An ingress TLS certificate (`certs/<name>`). Every gateway's TLS
/// ingress listener serves it to clients whose SNI matches one of the
/// leaf's DNS names (exact, then wildcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Cert {
    /// PEM: the leaf first, then its intermediates.
    pub certificate: String,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 RSA or SEC1 EC).
    /// Write-only: GET and the change log never show it; a PUT without it
    /// keeps the stored key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub private_key: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

// === groups ===

/// A service group: its services' sidecars share the group's egress gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Group {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// How old a sidecar's local policy may get (while its store is
    /// unreachable) before it is treated as unavailable. Default 1 hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_policy_staleness_s: Option<u64>,
    /// Whether the group's services that set no `allowed_callers` take
    /// calls from anyone (`allow`, the default) or from no one (`deny`).
    #[serde(default, skip_serializing_if = "Authorization::is_allow")]
    pub authorization: Authorization,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// A service's `mtls` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mtls {
    #[default]
    Off,
    Permissive,
    Strict,
}

impl Mtls {
    pub fn is_off(&self) -> bool {
        *self == Mtls::Off
    }
}

/// A group's default for services without `allowed_callers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Authorization {
    #[default]
    Allow,
    Deny,
}

impl Authorization {
    pub fn is_allow(&self) -> bool {
        *self == Authorization::Allow
    }
}

// === runtime kinds ===

/// What kind of process a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Gateway,
    Sidecar,
    Admin,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Gateway => "gateway",
            NodeKind::Sidecar => "sidecar",
            NodeKind::Admin => "admin",
        }
    }
}

/// A gateway role.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Ingress,
    Egress,
    Central,
}

/// A live process, registered by itself under a lease
/// (`nodes/<kind>/<id>`). Unknown fields are ignored (not refused): the
/// record is written by processes, and during a rolling upgrade a newer
/// one may add a field an older reader does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Node {
    pub kind: NodeKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// Groups served (egress gateways) or belonged to (sidecars).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The mesh traffic address other processes forward to (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The ops address (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<String>,
    /// The service a sidecar fronts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub version: String,
    /// The store revision of the config this process has applied.
    pub applied_revision: i64,
    /// Unix time (ms) of the last update of this record.
    pub updated_at_ms: u64,
    /// `fresh`, `stale` or `unavailable` (sidecars: their local policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// What this process refused of the config it follows (the previous
    /// good version of each stays in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejection>,
    /// The process's mesh identity, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<NodeIdentity>,
}

/// A process's mesh identity in its node record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeIdentity {
    /// Its SPIFFE ID.
    pub id: String,
    /// When its certificate expires (Unix ms).
    pub expires_at_ms: u64,
}

/// A config object (or the standalone file itself) a process refused, and
/// why. Shown in `/config`, `/readyz`, the node record, and the admin's
/// `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Rejection {
    /// `kind/name`, or the store's source (`file <path>`).
    pub object: String,
    /// The refused version (the store revision it was written at; 0 for
    /// the store's own source).
    pub version: i64,
    pub error: String,
}

/// An app instance registered by its sidecar (`instances/<service>/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// The node id of the sidecar that registered it.
    pub node: String,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request to explain (`POST /api/v1/explain`, answered by a gateway's
/// router over its applied config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    /// `mesh` (default: from sidecars, by service name) or `ingress`.
    #[serde(default)]
    pub scope: Scope,
    #[serde(default = "default_explain_method")]
    pub method: String,
    /// The host; for `mesh`, the destination service.
    pub host: String,
    /// Path and query, e.g. `/api/items?page=2`.
    #[serde(default = "default_explain_path")]
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

fn default_explain_method() -> String {
    "GET".into()
}

fn default_explain_path() -> String {
    "/".into()
}
