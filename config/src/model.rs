//! The config model: the serde types stored one JSON object per key in etcd
//! (or together in the standalone YAML file).
//!
//! Config kinds: [`Service`], [`Route`], [`Group`]. Runtime kinds, written by
//! the processes under leases: [`Node`], [`Instance`]. Every type refuses
//! unknown fields; [`crate::validate`] checks the semantics and names the
//! field path of every problem.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels attached to objects, for filtering and for humans.
pub type Labels = BTreeMap<String, String>;

// === services ===

/// A destination service: where its endpoints are and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    Http2,
    Grpc,
    Tcp,
}

/// Load-balancing policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time to establish a TCP connection to an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    /// Time from sending the request until the response headers arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
}

// === routes ===

/// Which listeners a route applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// North–south traffic on ingress listeners.
    Ingress,
    /// East–west traffic on mesh listeners (egress and central roles).
    #[default]
    Mesh,
}

/// A route: which requests it matches and where they go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Overrides the service's timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// What a route matches. Every given condition must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRule {
    #[serde(rename = "match", default)]
    pub matches: RuleMatch,
    pub backends: Vec<Backend>,
}

/// The request conditions of a backend rule (all must hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// What a sticky choice hashes: exactly one of a header and a cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

/// Request and response rewrites of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// A response generated by the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

// === groups ===

/// A service group: its services' sidecars share the group's egress gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Group {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// How old a sidecar's local policy may get (while its store is
    /// unreachable) before it is treated as unavailable. Default 1 hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_policy_staleness_s: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

// === runtime kinds ===

/// What kind of process a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Gateway,
    Sidecar,
    Admin,
}

/// A gateway role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Ingress,
    Egress,
    Central,
}

/// A live process, registered by itself under a lease (`nodes/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
}

/// An app instance registered by its sidecar (`instances/<service>/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
