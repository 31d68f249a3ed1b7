//! Decoding and validation of config objects, reporting the field path of
//! every problem (`routes/checkout: match.path.prefix: must start with '/'`).
//!
//! Decoding uses `serde_path_to_error`, so a wrong type or an unknown field is
//! reported with its path too. Validation never stops at the first problem.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::key::{valid_name, Key, Kind};
use crate::model::*;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `backends[0].weight`; empty for the
    /// object as a whole.
    pub field: String,
    pub message: String,
}

/// Everything wrong with one object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// The object, e.g. `routes/checkout`.
    pub object: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if e.field.is_empty() {
                write!(f, "{}: {}", self.object, e.message)?;
            } else {
                write!(f, "{}: {}: {}", self.object, e.field, e.message)?;
            }
        }
        Ok(())
    }
}

/// A decoded, validated object of any kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Cert(Box<Cert>),
    Service(Box<Service>),
    Route(Box<Route>),
    TcpRoute(TcpRoute),
    Group(Group),
    Consumer(Box<Consumer>),
    Node(Node),
    Instance(Instance),
}

impl Object {
    /// Decodes and validates the JSON value stored at `key`.
    pub fn decode(key: &Key, json: &[u8]) -> Result<Object, Invalid> {
        let obj = match key.kind {
            Kind::Certs => Object::Cert(Box::new(decode_json(key, json)?)),
            Kind::Services => Object::Service(Box::new(decode_json(key, json)?)),
            Kind::Routes => Object::Route(Box::new(decode_json(key, json)?)),
            Kind::TcpRoutes => Object::TcpRoute(decode_json(key, json)?),
            Kind::Groups => Object::Group(decode_json(key, json)?),
            Kind::Consumers => Object::Consumer(Box::new(decode_json(key, json)?)),
            Kind::Nodes => Object::Node(decode_json(key, json)?),
            Kind::Instances => Object::Instance(decode_json(key, json)?),
            Kind::History | Kind::JoinTokens => {
                return Err(Invalid {
                    object: key.to_string(),
                    errors: vec![FieldError {
                        field: String::new(),
                        message: format!("{} records are not config objects", key.kind),
                    }],
                })
            }
        };
        obj.validate(key)?;
        Ok(obj)
    }

    /// Checks the semantics of the object (its types are already right).
    pub fn validate(&self, key: &Key) -> Result<(), Invalid> {
        let mut v = Errors::default();
        match self {
            Object::Cert(c) => {
                for (field, problem) in crate::tls::check_pair(&c.certificate, &c.private_key) {
                    v.push(field, problem);
                }
            }
            Object::Service(s) => validate_service(s, &mut v),
            Object::Route(r) => validate_route(r, &mut v),
            Object::TcpRoute(t) => {
                v.check("port", t.port > 0, "must be from 1 to 65535");
                v.check("service", valid_name(&t.service), NAME_MSG);
            }
            Object::Group(g) => validate_group(g, &mut v),
            Object::Consumer(c) => validate_consumer(c, &mut v),
            Object::Node(n) => {
                if let Some(a) = &n.address {
                    v.check("address", valid_address(a), ADDRESS_MSG);
                }
                for (i, g) in n.groups.iter().enumerate() {
                    v.check(&format!("groups[{i}]"), valid_name(g), NAME_MSG);
                }
            }
            Object::Instance(i) => {
                v.check("address", valid_address(&i.address), ADDRESS_MSG);
                v.check("weight", (1..=10_000).contains(&i.weight), WEIGHT_MSG);
            }
        }
        v.into_result(key)
    }

    /// The encoded form stored in etcd.
    pub fn to_json(&self) -> Vec<u8> {
        let r = match self {
            Object::Cert(x) => serde_json::to_vec(x),
            Object::Service(x) => serde_json::to_vec(x),
            Object::Route(x) => serde_json::to_vec(x),
            Object::TcpRoute(x) => serde_json::to_vec(x),
            Object::Group(x) => serde_json::to_vec(x),
            Object::Consumer(x) => serde_json::to_vec(x),
            Object::Node(x) => serde_json::to_vec(x),
            Object::Instance(x) => serde_json::to_vec(x),
        };
        r.expect("config types always serialize")
    }

    /// Names of the objects this one refers to and that must exist.
    pub fn references(&self) -> Vec<(String, Key)> {
        match self {
            Object::Route(r) => {
                let refs = |base: String, list: &[crate::model::Backend]| {
                    list.iter()
                        .enumerate()
                        .map(|(i, b)| {
                            (
                                format!("{base}backends[{i}].service"),
                                Key::new(Kind::Services, &b.service),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let mut out = refs(String::new(), &r.backends);
                for (j, rule) in r.backend_rules.iter().enumerate() {
                    out.extend(refs(format!("backend_rules[{j}]."), &rule.backends));
                }
                if let Some(m) = &r.mirror {
                    out.push((
                        "mirror.service".into(),
                        Key::new(Kind::Services, &m.service),
                    ));
                }
                for (i, c) in r.auth.iter().flat_map(|a| &a.consumers).enumerate() {
                    out.push((format!("auth.consumers[{i}]"), Key::new(Kind::Consumers, c)));
                }
                out
            }
            Object::TcpRoute(t) => {
                vec![("service".to_string(), Key::new(Kind::Services, &t.service))]
            }
            Object::Service(s) => {
                let mut refs = Vec::new();
                if let Some(g) = &s.group {
                    refs.push(("group".to_string(), Key::new(Kind::Groups, g)));
                }
                if let Some(f) = &s.fallback {
                    refs.push(("fallback".to_string(), Key::new(Kind::Services, f)));
                }
                for (i, d) in s.destinations.iter().enumerate() {
                    refs.push((
                        format!("destinations[{i}].service"),
                        Key::new(Kind::Services, &d.service),
                    ));
                }
                refs
            }
            _ => Vec::new(),
        }
    }
}

/// Makes a stored spec fit to show (API answers, the change log, a
/// process's `/config`): a certificate loses its private key, and its leaf
/// is described.
pub fn public_spec(kind: Kind, spec: &mut serde_json::Value) -> Option<crate::tls::CertInfo> {
    match kind {
        Kind::Certs => crate::tls::redact_cert(spec),
        Kind::Consumers => {
            redact_consumer(spec);
            None
        }
        _ => None,
    }
}

/// A consumer without its secrets: an API key shows as its `sha256` (a
/// key written in a standalone file is hashed here), a JWT secret not at
/// all.
pub fn redact_consumer(spec: &mut serde_json::Value) {
    hash_api_keys(spec);
    let jwt_keys = spec.pointer_mut("/jwt/keys").and_then(|k| k.as_array_mut());
    for k in jwt_keys
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_object_mut())
    {
        k.remove("secret");
    }
}

/// Replaces each API key of a consumer by its `sha256`: the form stored.
pub fn hash_api_keys(spec: &mut serde_json::Value) {
    if let Some(keys) = spec.get_mut("api_keys").and_then(|k| k.as_array_mut()) {
        for k in keys.iter_mut().filter_map(|k| k.as_object_mut()) {
            if let Some(serde_json::Value::String(key)) = k.remove("key") {
                let sha = crate::tokens::hex(&crate::tokens::digest(&key));
                k.insert("sha256".into(), sha.into());
            }
        }
    }
}

/// Decodes JSON with the path of the offending field in the error.
pub fn decode_json<T: DeserializeOwned>(key: &Key, json: &[u8]) -> Result<T, Invalid> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = clean_path(&e.path().to_string());
        let message = strip_position(&e.inner().to_string());
        Invalid {
            object: key.to_string(),
            errors: vec![FieldError { field, message }],
        }
    })
}

/// Decodes a `serde_json::Value` with field paths in the error.
pub fn decode_value<T: DeserializeOwned>(
    key: &Key,
    value: serde_json::Value,
) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| Invalid {
        object: key.to_string(),
        errors: vec![FieldError {
            field: clean_path(&e.path().to_string()),
            message: strip_position(&e.inner().to_string()),
        }],
    })
}

fn clean_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

/// serde_json appends "at line 1 column 23": useless to an API user, who
/// gets the field path instead.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

// === impl Errors ===

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn check(&mut self, field: &str, ok: bool, message: &str) {
        if !ok {
            self.push(field, message);
        }
    }

    fn into_result(self, key: &Key) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                object: key.to_string(),
                errors: self.0,
            })
        }
    }
}

const NAME_MSG: &str =
    "must be 1-128 characters of a-z, 0-9, '-', '_', '.', starting and ending with a letter or digit";
const ADDRESS_MSG: &str = "must be host:port with a port from 1 to 65535";
const WEIGHT_MSG: &str = "must be from 1 to 10000";
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// `host:port` (IPv6 as `[::1]:port`), port 1..=65535.
pub fn valid_address(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    let port_ok = matches!(port.parse::<u16>(), Ok(p) if p > 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        valid_hostname(host)
    };
    port_ok && host_ok
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn validate_timeouts(t: &Timeouts, base: &str, v: &mut Errors) {
    for (name, val) in [
        ("connect_ms", t.connect_ms),
        ("request_ms", t.request_ms),
        ("per_try_ms", t.per_try_ms),
        ("idle_ms", t.idle_ms),
    ] {
        if let Some(ms) = val {
            v.check(
                &format!("{base}{name}"),
                (1..=MAX_TIMEOUT_MS).contains(&ms),
                "must be from 1 to 3600000 (one hour)",
            );
        }
    }
}

fn validate_service(s: &Service, v: &mut Errors) {
    if let Some(g) = &s.group {
        v.check("group", valid_name(g), NAME_MSG);
    }
    if let Some(f) = &s.fallback {
        v.check("fallback", valid_name(f), NAME_MSG);
    }
    if let Some(t) = &s.tls {
        if let Some(sni) = &t.sni {
            v.check("tls.sni", valid_hostname(sni), "must be a DNS name");
        }
        if let Some(ca) = &t.ca {
            if let Err(e) = crate::tls::parse_chain(ca) {
                v.push("tls.ca", e);
            }
        }
        if s.protocol == Protocol::Tcp {
            v.push(
                "tls",
                "not available for protocol tcp (TCP routes pass bytes through)",
            );
        }
    }
    if s.mtls != crate::model::Mtls::Off {
        if s.tls.is_some() {
            v.push(
                "mtls",
                "cannot be combined with tls (mutual TLS is the mesh's own TLS to the instances)",
            );
        }
        if s.protocol == Protocol::Tcp {
            v.push(
                "mtls",
                "not available for protocol tcp (TCP routes pass bytes through)",
            );
        }
    }
    for (i, c) in s.allowed_callers.iter().flatten().enumerate() {
        v.check(
            &format!("allowed_callers[{i}]"),
            caller_rule_ok(c),
            "must be `*`, a service name, `group/<group>/service/<service or *>` or `gateway/<id or *>`",
        );
    }
    let mut dests = std::collections::HashSet::new();
    for (i, d) in s.destinations.iter().enumerate() {
        let field = format!("destinations[{i}].service");
        v.check(&field, valid_name(&d.service), NAME_MSG);
        if !dests.insert(d.service.as_str()) {
            v.push(&field, "duplicate destination");
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, e) in s.endpoints.iter().enumerate() {
        let base = format!("endpoints[{i}]");
        v.check(
            &format!("{base}.address"),
            valid_address(&e.address),
            ADDRESS_MSG,
        );
        v.check(
            &format!("{base}.weight"),
            (1..=10_000).contains(&e.weight),
            WEIGHT_MSG,
        );
        if !seen.insert(e.address.as_str()) {
            v.push(&format!("{base}.address"), "duplicate endpoint address");
        }
    }
    validate_timeouts(&s.timeouts, "timeouts.", v);
    if let Some(l) = &s.rate_limit {
        validate_rate_limit(l, "rate_limit.", v);
        v.check(
            "rate_limit.key",
            l.key != LimitKey::Consumer,
            "consumers are known on ingress routes only: limit them on the route",
        );
    }
    if let Some(h) = &s.health_check {
        validate_health_check(h, v);
    }
    if let Some(o) = &s.outlier_detection {
        validate_outlier(o, v);
    }
    if let Some(c) = &s.circuit_breaker {
        for (name, val) in [
            ("max_connections", c.max_connections),
            ("max_pending_requests", c.max_pending_requests),
            ("max_requests", c.max_requests),
            ("max_retries", c.max_retries),
        ] {
            if let Some(n) = val {
                v.check(
                    &format!("circuit_breaker.{name}"),
                    n <= 1_000_000,
                    "must be at most 1000000",
                );
            }
        }
        if c.max_pending_requests.is_some() && c.max_connections.is_none() {
            v.push(
                "circuit_breaker.max_pending_requests",
                "only used with max_connections (requests wait for a connection)",
            );
        }
    }
    if let Some(r) = &s.retry {
        validate_retry(r, "retry.", v);
    }
    if s.protocol == Protocol::Tcp {
        if let Some(h) = &s.health_check {
            if h.http.is_some() {
                v.push(
                    "health_check.http",
                    "a tcp service is checked with tcp: true",
                );
            }
        }
    }
    match (&s.load_balancing, &s.hash_on) {
        (crate::model::LoadBalancing::ConsistentHash, None) => v.push(
            "hash_on",
            "consistent_hash needs hash_on: {header}, {cookie} or {source_ip: true}",
        ),
        (crate::model::LoadBalancing::ConsistentHash, Some(h)) => {
            let given = usize::from(h.header.is_some())
                + usize::from(h.cookie.is_some())
                + usize::from(h.source_ip);
            if given != 1 {
                v.push(
                    "hash_on",
                    "give exactly one of 'header', 'cookie' and 'source_ip'",
                );
            }
            if let Some(name) = &h.header {
                v.check(
                    "hash_on.header",
                    http_header_name(name),
                    "must be a lower-case HTTP header name",
                );
            }
        }
        (_, Some(_)) => v.push("hash_on", "only used with load_balancing: consistent_hash"),
        _ => {}
    }
}

/// The problems of a health check, with field paths under `health_check.`
/// (for node configs that embed one).
pub fn health_check_problems(h: &HealthCheck) -> Vec<FieldError> {
    let mut v = Errors::default();
    validate_health_check(h, &mut v);
    v.0
}

fn validate_health_check(h: &HealthCheck, v: &mut Errors) {
    match (&h.http, h.tcp) {
        (Some(_), true) | (None, false) => {
            v.push("health_check", "give exactly one of 'http' and 'tcp: true'")
        }
        _ => {}
    }
    if let Some(c) = &h.http {
        v.check(
            "health_check.http.path",
            c.path.starts_with('/') && header_value_ok(&c.path) && !c.path.contains(' '),
            "must start with '/' and hold no spaces or control characters",
        );
        for (i, s) in c.expected_statuses.iter().enumerate() {
            v.check(
                &format!("health_check.http.expected_statuses[{i}]"),
                (100..=599).contains(s),
                "must be an HTTP status from 100 to 599",
            );
        }
        if let Some(host) = &c.host {
            v.check(
                "health_check.http.host",
                !host.is_empty() && header_value_ok(host),
                "must be a non-empty header value",
            );
        }
    }
    v.check(
        "health_check.interval_ms",
        (100..=MAX_TIMEOUT_MS).contains(&h.interval_ms),
        "must be from 100 to 3600000",
    );
    v.check(
        "health_check.timeout_ms",
        (1..=MAX_TIMEOUT_MS).contains(&h.timeout_ms),
        "must be from 1 to 3600000",
    );
    if h.timeout_ms > h.interval_ms {
        v.push("health_check.timeout_ms", "must not exceed interval_ms");
    }
    for (name, n) in [
        ("healthy_threshold", h.healthy_threshold),
        ("unhealthy_threshold", h.unhealthy_threshold),
    ] {
        v.check(
            &format!("health_check.{name}"),
            (1..=100).contains(&n),
            "must be from 1 to 100",
        );
    }
}

fn validate_outlier(o: &OutlierDetection, v: &mut Errors) {
    for (name, n) in [
        ("consecutive_5xx", o.consecutive_5xx),
        ("consecutive_gateway_failure", o.consecutive_gateway_failure),
    ] {
        v.check(
            &format!("outlier_detection.{name}"),
            n <= 1000,
            "must be from 0 (off) to 1000",
        );
    }
    v.check(
        "outlier_detection.base_ejection_ms",
        (1..=MAX_TIMEOUT_MS).contains(&o.base_ejection_ms),
        "must be from 1 to 3600000",
    );
    v.check(
        "outlier_detection.max_ejection_ms",
        (1..=MAX_TIMEOUT_MS).contains(&o.max_ejection_ms),
        "must be from 1 to 3600000",
    );
    if o.max_ejection_ms < o.base_ejection_ms {
        v.push(
            "outlier_detection.max_ejection_ms",
            "must not be less than base_ejection_ms",
        );
    }
    v.check(
        "outlier_detection.max_ejection_percent",
        o.max_ejection_percent <= 100,
        "must be from 0 to 100",
    );
}

/// The methods retried without `non_idempotent`.
pub const IDEMPOTENT_METHODS: [&str; 6] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"];

fn validate_retry(r: &RetryPolicy, base: &str, v: &mut Errors) {
    v.check(
        &format!("{base}attempts"),
        r.attempts <= 10,
        "must be from 0 to 10",
    );
    let mut seen = std::collections::HashSet::new();
    for (i, s) in r.statuses.iter().enumerate() {
        v.check(
            &format!("{base}statuses[{i}]"),
            (500..=599).contains(s),
            "only 5xx statuses are retried (500 to 599)",
        );
        if !seen.insert(*s) {
            v.push(&format!("{base}statuses[{i}]"), "duplicate status");
        }
    }
    v.check(
        &format!("{base}budget.percent"),
        r.budget.percent <= 1000,
        "must be from 0 to 1000",
    );
    v.check(
        &format!("{base}budget.min_per_s"),
        r.budget.min_per_s <= 100_000,
        "must be from 0 to 100000",
    );
}

/// Longest regex source accepted, and the compiled-size limit: routes are
/// matched on every request, so patterns stay small.
pub const REGEX_MAX_LEN: usize = 1024;
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Compiles a route regex the way the gateway does: anchored to the whole
/// input, with a size limit.
pub fn compile_regex(src: &str) -> Result<regex::Regex, String> {
    if src.len() > REGEX_MAX_LEN {
        return Err(format!("longer than {REGEX_MAX_LEN} characters"));
    }
    regex::RegexBuilder::new(&format!("^(?:{src})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            e.to_string()
                .lines()
                .last()
                .unwrap_or("invalid")
                .trim()
                .to_string()
        })
}

fn check_regex(field: &str, src: &str, v: &mut Errors) {
    if let Err(e) = compile_regex(src) {
        v.push(field, format!("invalid regex: {e}"));
    }
}

/// Headers a rewrite may not set: `host` has `rewrite.host`, and
/// hop-by-hop headers belong to one connection.
const HOP_BY_HOP_OR_HOST: [&str; 9] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "trailer",
    "content-length",
];

fn validate_backends(list: &[crate::model::Backend], base: &str, v: &mut Errors) {
    let mut total = 0u64;
    for (i, b) in list.iter().enumerate() {
        v.check(
            &format!("{base}backends[{i}].service"),
            valid_name(&b.service),
            NAME_MSG,
        );
        v.check(
            &format!("{base}backends[{i}].weight"),
            b.weight <= 10_000,
            "must be from 0 to 10000",
        );
        total += u64::from(b.weight);
    }
    if !list.is_empty() && total == 0 {
        v.push(
            &format!("{base}backends"),
            "the backend weights must not all be 0",
        );
    }
}

/// Printable ASCII (and tab): what a header value set by config may hold.
fn header_value_ok(x: &str) -> bool {
    x.bytes().all(|c| c == b'\t' || (0x20..0x7f).contains(&c))
}

/// Header and query conditions under `prefix` (`match.` or
/// `backend_rules[i].match.`).
fn validate_conditions(
    headers: &[crate::model::ValueMatch],
    query: &[crate::model::ValueMatch],
    prefix: &str,
    v: &mut Errors,
) {
    for (i, h) in headers.iter().enumerate() {
        let base = format!("{prefix}headers[{i}]");
        v.check(
            &format!("{base}.name"),
            http_header_name(&h.name),
            "must be a lower-case HTTP header name",
        );
        if let Some(x) = &h.exact {
            v.check(
                &format!("{base}.exact"),
                header_value_ok(x),
                "must be printable ASCII (a header value)",
            );
        }
        validate_value_match(h, &base, v);
    }
    for (i, q) in query.iter().enumerate() {
        let base = format!("{prefix}query[{i}]");
        v.check(
            &format!("{base}.name"),
            !q.name.is_empty() && q.name.len() <= 256,
            "must be 1-256 characters",
        );
        validate_value_match(q, &base, v);
    }
}

fn validate_value_match(m: &crate::model::ValueMatch, base: &str, v: &mut Errors) {
    if m.exact.is_some() && m.regex.is_some() {
        v.push(base, "give at most one of 'exact' and 'regex'");
    }
    if m.present == Some(false) && (m.exact.is_some() || m.regex.is_some()) {
        v.push(
            &format!("{base}.present"),
            "'present: false' cannot be combined with 'exact' or 'regex'",
        );
    }
    if let Some(r) = &m.regex {
        check_regex(&format!("{base}.regex"), r, v);
    }
}

fn validate_route(r: &Route, v: &mut Errors) {
    let m = &r.matches;
    for (i, h) in m.hosts.iter().enumerate() {
        let name = h.strip_prefix("*.").unwrap_or(h);
        v.check(
            &format!("match.hosts[{i}]"),
            valid_hostname(name) && !name.bytes().any(|c| c.is_ascii_uppercase()),
            "must be a lower-case host name without port, optionally starting with '*.'",
        );
    }
    if let Some(p) = &m.path {
        match (&p.exact, &p.prefix, &p.regex) {
            (Some(x), None, None) => v.check(
                "match.path.exact",
                x.starts_with('/'),
                "must start with '/'",
            ),
            (None, Some(x), None) => v.check(
                "match.path.prefix",
                x.starts_with('/'),
                "must start with '/'",
            ),
            (None, None, Some(x)) => check_regex("match.path.regex", x, v),
            _ => v.push(
                "match.path",
                "give exactly one of 'exact', 'prefix' and 'regex'",
            ),
        }
    }
    for (i, meth) in m.methods.iter().enumerate() {
        v.check(
            &format!("match.methods[{i}]"),
            !meth.is_empty() && meth.bytes().all(|c| c.is_ascii_uppercase()),
            "must be an upper-case HTTP method such as GET",
        );
    }
    validate_conditions(&m.headers, &m.query, "match.", v);
    match (&r.backends.is_empty(), &r.direct_response) {
        (true, None) => v.push("backends", "a route needs backends or a direct_response"),
        (false, Some(_)) => v.push(
            "direct_response",
            "give either backends or a direct_response, not both",
        ),
        _ => {}
    }
    validate_backends(&r.backends, "", v);
    for (j, rule) in r.backend_rules.iter().enumerate() {
        let base = format!("backend_rules[{j}].");
        if rule.backends.is_empty() {
            v.push(&format!("{base}backends"), "give at least one backend");
        }
        validate_backends(&rule.backends, &base, v);
        if rule.matches.headers.is_empty() && rule.matches.query.is_empty() {
            v.push(
                &format!("{base}match"),
                "give at least one header or query condition",
            );
        }
        validate_conditions(
            &rule.matches.headers,
            &rule.matches.query,
            &format!("{base}match."),
            v,
        );
    }
    if let Some(rw) = &r.rewrite {
        if let Some(p) = &rw.path_prefix {
            if !p.starts_with('/') {
                v.push("rewrite.path_prefix", "must start with '/'");
            } else if m.path.as_ref().and_then(|p| p.prefix.as_ref()).is_none() {
                v.push(
                    "rewrite.path_prefix",
                    "needs a match.path.prefix to replace",
                );
            }
        }
        if let Some(h) = &rw.host {
            v.check(
                "rewrite.host",
                valid_address(h) || valid_hostname(h),
                "must be a host name, optionally with :port",
            );
        }
        for (base, edits) in [
            ("rewrite.request_headers", &rw.request_headers),
            ("rewrite.response_headers", &rw.response_headers),
        ] {
            for (name, value) in &edits.set {
                v.check(
                    &format!("{base}.set.{name}"),
                    http_header_name(name) && !HOP_BY_HOP_OR_HOST.contains(&name.as_str()),
                    "must be a lower-case HTTP header name (not host or a hop-by-hop header)",
                );
                v.check(
                    &format!("{base}.set.{name}"),
                    header_value_ok(value),
                    "the value must be printable ASCII",
                );
            }
            for (i, name) in edits.remove.iter().enumerate() {
                v.check(
                    &format!("{base}.remove[{i}]"),
                    http_header_name(name),
                    "must be a lower-case HTTP header name",
                );
            }
        }
        if r.direct_response.is_some() {
            v.push("rewrite", "a direct_response route sends nothing upstream");
        }
    }
    if !r.backend_rules.is_empty() && r.direct_response.is_some() {
        v.push(
            "backend_rules",
            "a direct_response route has no backends to choose",
        );
    }
    if let Some(st) = &r.sticky {
        match (&st.header, &st.cookie) {
            (Some(h), None) => v.check(
                "sticky.header",
                http_header_name(h),
                "must be a lower-case HTTP header name",
            ),
            (None, Some(c)) => v.check(
                "sticky.cookie",
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_graphic() && !b";=,".contains(&b)),
                "must be a cookie name",
            ),
            _ => v.push("sticky", "give exactly one of 'header' and 'cookie'"),
        }
    }
    if let Some(d) = &r.direct_response {
        v.check(
            "direct_response.status",
            (200..=599).contains(&d.status),
            "must be an HTTP status from 200 to 599",
        );
    }
    if let Some(rp) = &r.retry {
        validate_retry(rp, "retry.", v);
    }
    if let Some(t) = &r.timeouts {
        validate_timeouts(t, "timeouts.", v);
    }
    if let Some(a) = &r.auth {
        validate_auth(a, r.scope, v);
    }
    if let Some(l) = &r.rate_limit {
        validate_rate_limit(l, "rate_limit.", v);
        if l.key == LimitKey::Consumer && r.auth.is_none() {
            v.push("rate_limit.key", "`consumer` needs the route's `auth`");
        }
    }
    if let Some(f) = &r.fault {
        validate_fault(f, "fault.", v);
    }
    if let Some(m) = &r.mirror {
        v.check("mirror.service", valid_name(&m.service), NAME_MSG);
        check_percent("mirror.percent", m.percent, v);
        if r.direct_response.is_some() {
            v.push("mirror", "a direct_response route sends nothing upstream");
        }
    }
    if let Some(c) = &r.cache {
        v.check(
            "cache.max_bytes",
            (1..=1 << 40).contains(&c.max_bytes),
            "must be from 1 to 1099511627776 bytes",
        );
        v.check(
            "cache.max_object_bytes",
            c.max_object_bytes >= 1 && c.max_object_bytes <= c.max_bytes,
            "must be from 1 to `max_bytes`",
        );
    }
    for (j, rule) in r.backend_rules.iter().enumerate() {
        if let Some(f) = &rule.fault {
            validate_fault(f, &format!("backend_rules[{j}].fault."), v);
        }
    }
}

fn validate_auth(a: &RouteAuth, scope: Scope, v: &mut Errors) {
    if a.api_key.is_none() && a.jwt.is_none() {
        v.push("auth", "give `api_key`, `jwt` or both");
    }
    if scope != Scope::Ingress {
        v.push(
            "auth",
            "consumers authenticate on ingress routes (mesh callers are authorized by identity: `allowed_callers`)",
        );
    }
    if let Some(k) = &a.api_key {
        if let Some(h) = &k.header {
            v.check("auth.api_key.header", http_header_name(h), HEADER_MSG);
        }
        if let Some(q) = &k.query {
            v.check(
                "auth.api_key.query",
                !q.is_empty()
                    && q.bytes()
                        .all(|c| c.is_ascii_graphic() && !b"&=#".contains(&c)),
                "must be a query parameter name",
            );
        }
    }
    if let Some(j) = &a.jwt {
        v.check(
            "auth.jwt.clock_skew_s",
            j.clock_skew_s <= 600,
            "must be from 0 to 600",
        );
        for (i, aud) in j.audiences.iter().enumerate() {
            v.check(
                &format!("auth.jwt.audiences[{i}]"),
                !aud.is_empty(),
                "must not be empty",
            );
        }
        for (i, c) in j.required_claims.iter().enumerate() {
            v.check(
                &format!("auth.jwt.required_claims[{i}]"),
                !c.is_empty(),
                "must not be empty",
            );
        }
    }
    for (i, c) in a.consumers.iter().enumerate() {
        v.check(&format!("auth.consumers[{i}]"), valid_name(c), NAME_MSG);
    }
}

/// The largest rate a limit may name: one request per nanosecond is what
/// the limiter resolves.
const MAX_RATE_PER_S: u64 = 1_000_000_000;

fn validate_rate_limit(l: &RateLimit, base: &str, v: &mut Errors) {
    v.check(
        &format!("{base}requests"),
        l.requests > 0 && u64::from(l.requests) / l.per.seconds() <= MAX_RATE_PER_S,
        "must be a positive number of requests",
    );
    if let Some(b) = l.burst {
        v.check(&format!("{base}burst"), b > 0, "must be at least 1");
    }
    if let Some(m) = l.max_keys {
        v.check(
            &format!("{base}max_keys"),
            (1..=10_000_000).contains(&m),
            "must be from 1 to 10000000",
        );
    }
    match (&l.key, &l.header) {
        (LimitKey::Header, Some(h)) => {
            v.check(&format!("{base}header"), http_header_name(h), HEADER_MSG)
        }
        (LimitKey::Header, None) => {
            v.push(&format!("{base}header"), "`key: header` needs `header`")
        }
        (_, Some(_)) => v.push(&format!("{base}header"), "only with `key: header`"),
        _ => {}
    }
}

fn validate_fault(f: &Fault, base: &str, v: &mut Errors) {
    if f.delay.is_none() && f.abort.is_none() {
        v.push(base.trim_end_matches('.'), "give `delay`, `abort` or both");
    }
    if let Some(d) = &f.delay {
        v.check(
            &format!("{base}delay.ms"),
            (1..=MAX_TIMEOUT_MS).contains(&d.ms),
            "must be from 1 to 3600000 (one hour)",
        );
        check_percent(&format!("{base}delay.percent"), d.percent, v);
    }
    if let Some(a) = &f.abort {
        v.check(
            &format!("{base}abort.status"),
            (200..=599).contains(&a.status),
            "must be an HTTP status from 200 to 599",
        );
        if let Some(g) = a.grpc_status {
            v.check(
                &format!("{base}abort.grpc_status"),
                (1..=16).contains(&g),
                "must be a gRPC status code from 1 to 16",
            );
        }
        check_percent(&format!("{base}abort.percent"), a.percent, v);
    }
    if let Some(h) = &f.header {
        v.check(&format!("{base}header"), http_header_name(h), HEADER_MSG);
    }
}

fn check_percent(field: &str, p: Percent, v: &mut Errors) {
    v.check(
        field,
        p.0.is_finite() && (0.0..=100.0).contains(&p.0),
        "must be a percentage from 0 to 100",
    );
}

fn validate_consumer(c: &Consumer, v: &mut Errors) {
    let mut names = std::collections::HashSet::new();
    for (i, k) in c.api_keys.iter().enumerate() {
        let base = format!("api_keys[{i}]");
        match (&k.key, &k.sha256) {
            (Some(key), None) => v.check(
                &format!("{base}.key"),
                key.len() >= 16 && key.len() <= 512 && key.bytes().all(|b| b.is_ascii_graphic()),
                "must be 16 to 512 printable ASCII characters",
            ),
            (None, Some(h)) => v.check(
                &format!("{base}.sha256"),
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "must be 64 lower-case hex digits",
            ),
            _ => v.push(&base, "give exactly one of `key` and `sha256`"),
        }
        if let Some(n) = &k.name {
            v.check(&format!("{base}.name"), valid_name(n), NAME_MSG);
            if !names.insert(n.as_str()) {
                v.push(&format!("{base}.name"), "duplicate key name");
            }
        }
    }
    if let Some(j) = &c.jwt {
        if j.keys.is_empty() && j.jwks.is_none() {
            v.push("jwt", "give `keys`, `jwks` or both");
        }
        let mut kids = std::collections::HashSet::new();
        for (i, k) in j.keys.iter().enumerate() {
            let base = format!("jwt.keys[{i}]");
            if let Some(kid) = &k.kid {
                if !kids.insert(kid.as_str()) {
                    v.push(&format!("{base}.kid"), "duplicate kid");
                }
            }
            if let Err((field, e)) = crate::jwt::decoding_key(k) {
                v.push(&format!("{base}.{field}"), e);
            }
        }
        if let Some(doc) = &j.jwks {
            for (field, e) in crate::jwt::check_jwks(doc) {
                v.push(&format!("jwt.jwks{field}"), e);
            }
        }
    }
    if let Some(l) = &c.rate_limit {
        validate_rate_limit(l, "rate_limit.", v);
        v.check(
            "rate_limit.key",
            matches!(l.key, LimitKey::Route | LimitKey::Consumer),
            "a consumer's limit counts the consumer's requests (leave `key` out)",
        );
    }
}

const HEADER_MSG: &str = "must be a lower-case HTTP header name";

/// An `allowed_callers` entry.
fn caller_rule_ok(rule: &str) -> bool {
    let name_or_any = |s: &str| s == "*" || valid_name(s);
    let parts: Vec<&str> = rule.split('/').collect();
    match parts.as_slice() {
        ["*"] => true,
        [svc] => valid_name(svc),
        ["gateway", id] => name_or_any(id),
        ["group", g, "service", svc] => valid_name(g) && name_or_any(svc),
        _ => false,
    }
}

fn validate_group(g: &Group, v: &mut Errors) {
    if let Some(s) = g.max_policy_staleness_s {
        v.check(
            "max_policy_staleness_s",
            (1..=30 * 86_400).contains(&s),
            "must be from 1 to 2592000 (30 days)",
        );
    }
}

fn http_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_!#$%&'*+.^`|~".contains(&c)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_key() -> Key {
        Key::new(Kind::Routes, "checkout")
    }

    fn decode_route(json: &str) -> Result<Object, Invalid> {
        Object::decode(&route_key(), json.as_bytes())
    }

    #[test]
    fn good_route_decodes() {
        let o = decode_route(
            r#"{"match":{"hosts":["shop.example.com","*.api.io"],"path":{"prefix":"/cart"},"methods":["GET"]},
                "backends":[{"service":"cart","weight":90},{"service":"cart-v2","weight":10}]}"#,
        )
        .unwrap();
        let Object::Route(r) = o else { panic!() };
        assert_eq!(r.scope, Scope::Mesh);
        assert_eq!(r.backends.len(), 2);
    }

    #[test]
    fn bad_path_names_the_field() {
        let e =
            decode_route(r#"{"match":{"path":{"prefix":"cart"}},"backends":[{"service":"a"}]}"#)
                .unwrap_err();
        assert_eq!(
            e.to_string(),
            "routes/checkout: match.path.prefix: must start with '/'"
        );
    }

    #[test]
    fn unknown_field_names_the_path() {
        let e = decode_route(r#"{"match":{"pathh":{"prefix":"/"}},"backends":[{"service":"a"}]}"#)
            .unwrap_err();
        assert_eq!(e.errors[0].field, "match.pathh");
        assert!(e.errors[0].message.contains("unknown field `pathh`"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_path() {
        let e = decode_route(r#"{"backends":[{"service":"a","weight":"heavy"}]}"#).unwrap_err();
        assert_eq!(e.errors[0].field, "backends[0].weight");
        assert!(!e.errors[0].message.contains("line"), "{e}");
    }

    #[test]
    fn every_problem_is_listed() {
        let e = decode_route(
            r#"{"match":{"hosts":["Shop:80"],"methods":["get"],"headers":[{"name":"X Y"}]},
                "backends":[{"service":"Bad Name","weight":0}]}"#,
        )
        .unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "match.hosts[0]",
                "match.methods[0]",
                "match.headers[0].name",
                "backends[0].service",
                "backends"
            ]
        );
    }

    #[test]
    fn match_conditions_are_checked_with_field_paths() {
        let fields = |json: &str| -> Vec<(String, String)> {
            let e = decode_route(json).unwrap_err();
            e.errors
                .iter()
                .map(|e| (e.field.clone(), e.message.clone()))
                .collect()
        };
        let f =
            fields(r#"{"match":{"path":{"regex":"/items/[0-9"}},"backends":[{"service":"a"}]}"#);
        assert_eq!(f[0].0, "match.path.regex");
        assert!(f[0].1.starts_with("invalid regex:"), "{f:?}");
        let f = fields(
            r#"{"match":{"path":{"prefix":"/a","regex":"/a"}},"backends":[{"service":"a"}]}"#,
        );
        assert_eq!(f[0].0, "match.path");
        let f = fields(
            r#"{"match":{"headers":[{"name":"user-agent","exact":"x","regex":"y"}]},"backends":[{"service":"a"}]}"#,
        );
        assert_eq!(f[0].0, "match.headers[0]");
        let f = fields(
            r#"{"match":{"headers":[{"name":"authorization","present":false,"exact":"x"}]},"backends":[{"service":"a"}]}"#,
        );
        assert_eq!(f[0].0, "match.headers[0].present");
        let f = fields(
            r#"{"match":{"query":[{"name":""},{"name":"v","regex":"("}]},"backends":[{"service":"a"}]}"#,
        );
        let names: Vec<&str> = f.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["match.query[0].name", "match.query[1].regex"]);
        let long = "a".repeat(REGEX_MAX_LEN + 1);
        let f = fields(&format!(
            r#"{{"match":{{"path":{{"regex":"{long}"}}}},"backends":[{{"service":"a"}}]}}"#
        ));
        assert_eq!(f[0].0, "match.path.regex");
        // And good ones decode.
        decode_route(
            r#"{"match":{"path":{"regex":"/i/[0-9]+"},"headers":[{"name":"x-a","present":false},{"name":"user-agent","regex":".*iPhone.*"}],
                "query":[{"name":"v","exact":"2"},{"name":"debug"}]},"backends":[{"service":"a"}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn rules_and_sticky_are_validated_and_referenced() {
        let o = decode_route(
            r#"{"backends":[{"service":"v1"}],"sticky":{"cookie":"user"},
                "backend_rules":[{"match":{"headers":[{"name":"user-agent","regex":".*iPhone.*"}]},"backends":[{"service":"v2"}]}]}"#,
        )
        .unwrap();
        let refs: Vec<String> = o
            .references()
            .into_iter()
            .map(|(f, k)| format!("{f}={k}"))
            .collect();
        assert_eq!(
            refs,
            [
                "backends[0].service=services/v1",
                "backend_rules[0].backends[0].service=services/v2"
            ]
        );
        let e = decode_route(
            r#"{"backends":[{"service":"v1"}],"sticky":{"header":"X User","cookie":"c"},
                "backend_rules":[{"match":{},"backends":[]},{"match":{"query":[{"name":"q","regex":"("}]},"backends":[{"service":"v2","weight":0}]}]}"#,
        )
        .unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "backend_rules[0].backends",
                "backend_rules[0].match",
                "backend_rules[1].backends",
                "backend_rules[1].match.query[0].regex",
                "sticky"
            ]
        );
    }

    #[test]
    fn rewrites_are_validated_with_field_paths() {
        let e = decode_route(
            r#"{"match":{"path":{"exact":"/a"}},"backends":[{"service":"a"}],
                "rewrite":{"path_prefix":"/b","host":"bad host",
                  "request_headers":{"set":{"host":"x","x-ok":"1"}},
                  "response_headers":{"remove":["Bad Name"]}}}"#,
        )
        .unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "rewrite.path_prefix",
                "rewrite.host",
                "rewrite.request_headers.set.host",
                "rewrite.response_headers.remove[0]"
            ]
        );
        let e = decode_route(r#"{"direct_response":{"status":200},"rewrite":{"host":"a.io"}}"#)
            .unwrap_err();
        assert_eq!(e.errors[0].field, "rewrite");
        decode_route(
            r#"{"match":{"path":{"prefix":"/public"}},"backends":[{"service":"a"}],
                "rewrite":{"path_prefix":"/","host":"api.internal:8080",
                  "request_headers":{"set":{"x-env":"prod"},"remove":["x-debug"]}}}"#,
        )
        .unwrap();
    }

    #[test]
    fn load_balancing_settings_are_checked() {
        let svc = |json: &str| {
            Object::decode(&Key::new(Kind::Services, "s"), json.as_bytes())
                .map_err(|e| e.errors.iter().map(|e| e.field.clone()).collect::<Vec<_>>())
        };
        let ep = r#""endpoints":[{"address":"127.0.0.1:1"}]"#;
        assert_eq!(
            svc(&format!(r#"{{{ep},"load_balancing":"consistent_hash"}}"#)).unwrap_err(),
            ["hash_on"]
        );
        assert_eq!(
            svc(&format!(
                r#"{{{ep},"load_balancing":"consistent_hash","hash_on":{{"header":"X-User","source_ip":true}}}}"#
            ))
            .unwrap_err(),
            ["hash_on", "hash_on.header"]
        );
        assert_eq!(
            svc(&format!(
                r#"{{{ep},"load_balancing":"least_request","hash_on":{{"cookie":"u"}}}}"#
            ))
            .unwrap_err(),
            ["hash_on"]
        );
        assert_eq!(
            svc(&format!(r#"{{{ep},"load_balancing":"fastest"}}"#)).unwrap_err(),
            ["load_balancing"]
        );
        for ok in [
            r#""load_balancing":"peak_ewma""#,
            r#""load_balancing":"least_request""#,
            r#""load_balancing":"consistent_hash","hash_on":{"source_ip":true}"#,
        ] {
            svc(&format!("{{{ep},{ok}}}")).unwrap();
        }
    }

    #[test]
    fn route_needs_a_target() {
        let e = decode_route(r#"{}"#).unwrap_err();
        assert_eq!(e.errors[0].field, "backends");
        let e = decode_route(r#"{"backends":[{"service":"a"}],"direct_response":{"status":200}}"#)
            .unwrap_err();
        assert_eq!(e.errors[0].field, "direct_response");
    }

    #[test]
    fn service_validation() {
        let key = Key::new(Kind::Services, "orders");
        let e = Object::decode(
            &key,
            br#"{"endpoints":[{"address":"127.0.0.1:0"},{"address":"a.b:80","weight":0},{"address":"a.b:80"}],
                 "timeouts":{"connect_ms":0}}"#,
        )
        .unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "endpoints[0].address",
                "endpoints[1].weight",
                "endpoints[2].address",
                "timeouts.connect_ms"
            ]
        );
        let ok = Object::decode(
            &key,
            br#"{"group":"shop","endpoints":[{"address":"[::1]:8080","weight":5,"zone":"a"}],"protocol":"http2"}"#,
        )
        .unwrap();
        assert_eq!(
            ok.references(),
            vec![("group".to_string(), Key::new(Kind::Groups, "shop"))]
        );
    }

    #[test]
    fn addresses() {
        assert!(valid_address("127.0.0.1:80"));
        assert!(valid_address("orders.internal:8080"));
        assert!(valid_address("[::1]:1"));
        assert!(!valid_address("127.0.0.1"));
        assert!(!valid_address("127.0.0.1:70000"));
        assert!(!valid_address(":80"));
        assert!(!valid_address("a b:80"));
    }

    /// The field paths of every problem with `json` stored at `kind/x`.
    fn problems(kind: Kind, json: &str) -> Vec<String> {
        match Object::decode(&Key::new(kind, "x"), json.as_bytes()) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn resilience_fields_are_checked_with_field_paths() {
        let svc = |extra: &str| problems(Kind::Services, &format!(r#"{{{extra}}}"#));
        let cases: &[(&str, &[&str])] = &[
            (
                r#""timeouts":{"per_try_ms":0,"idle_ms":4000000}"#,
                &["timeouts.per_try_ms", "timeouts.idle_ms"],
            ),
            (r#""health_check":{"interval_ms":1000}"#, &["health_check"]),
            (
                r#""destinations":[{"service":"a"},{"service":"a","mode":"direct"},{"service":"B"}]"#,
                &["destinations[1].service", "destinations[2].service"],
            ),
            (
                r#""destinations":[{"service":"a","mode":"sideways"}]"#,
                &["destinations[0].mode"],
            ),
            (
                r#""health_check":{"tcp":true,"http":{"path":"/h"}}"#,
                &["health_check"],
            ),
            (
                r#""health_check":{"http":{"path":"h","expected_statuses":[99]}}"#,
                &[
                    "health_check.http.path",
                    "health_check.http.expected_statuses[0]",
                ],
            ),
            (
                r#""health_check":{"tcp":true,"interval_ms":50,"timeout_ms":10}"#,
                &["health_check.interval_ms"],
            ),
            (
                r#""health_check":{"tcp":true,"interval_ms":1000,"timeout_ms":2000}"#,
                &["health_check.timeout_ms"],
            ),
            (
                r#""health_check":{"tcp":true,"healthy_threshold":0,"unhealthy_threshold":101}"#,
                &[
                    "health_check.healthy_threshold",
                    "health_check.unhealthy_threshold",
                ],
            ),
            (
                r#""health_check":{"tcp":true,"intervall_ms":1}"#,
                &["health_check.intervall_ms"],
            ),
            (
                r#""outlier_detection":{"consecutive_5xx":1001,"max_ejection_percent":101}"#,
                &[
                    "outlier_detection.consecutive_5xx",
                    "outlier_detection.max_ejection_percent",
                ],
            ),
            (
                r#""outlier_detection":{"base_ejection_ms":0}"#,
                &["outlier_detection.base_ejection_ms"],
            ),
            (
                r#""outlier_detection":{"base_ejection_ms":5000,"max_ejection_ms":1000}"#,
                &["outlier_detection.max_ejection_ms"],
            ),
            (
                r#""circuit_breaker":{"max_requests":2000000}"#,
                &["circuit_breaker.max_requests"],
            ),
            (
                r#""circuit_breaker":{"max_pending_requests":5}"#,
                &["circuit_breaker.max_pending_requests"],
            ),
            (
                r#""circuit_breaker":{"max_connections":-1}"#,
                &["circuit_breaker.max_connections"],
            ),
            (r#""retry":{"attempts":11}"#, &["retry.attempts"]),
            (
                r#""retry":{"statuses":[404,503,503]}"#,
                &["retry.statuses[0]", "retry.statuses[2]"],
            ),
            (
                r#""retry":{"budget":{"percent":1001,"min_per_s":100001}}"#,
                &["retry.budget.percent", "retry.budget.min_per_s"],
            ),
            (
                r#""protocol":"tcp","health_check":{"http":{"path":"/h"}}"#,
                &["health_check.http"],
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(&svc(extra), want, "{extra}");
        }
        // Good values pass.
        assert!(svc(r#""timeouts":{"per_try_ms":100,"idle_ms":1000},
            "health_check":{"http":{"path":"/healthz","expected_statuses":[200,204]},"interval_ms":1000,"timeout_ms":500},
            "outlier_detection":{},"circuit_breaker":{"max_connections":10,"max_pending_requests":5,"max_requests":100,"max_retries":3},
            "retry":{"attempts":2,"statuses":[502,503],"budget":{"percent":20,"min_per_s":10}}"#)
        .is_empty());
        // A route's retry and timeouts are checked the same way.
        assert_eq!(
            problems(
                Kind::Routes,
                r#"{"backends":[{"service":"a"}],"retry":{"attempts":20},"timeouts":{"per_try_ms":0}}"#
            ),
            ["retry.attempts", "timeouts.per_try_ms"]
        );
    }

    #[test]
    fn tcp_routes_are_checked_with_field_paths() {
        assert_eq!(
            problems(Kind::TcpRoutes, r#"{"port":0,"service":"Bad Name"}"#),
            ["port", "service"]
        );
        assert_eq!(
            problems(Kind::TcpRoutes, r#"{"port":70000,"service":"db"}"#),
            ["port"]
        );
        assert_eq!(problems(Kind::TcpRoutes, r#"{"service":"db"}"#), [""]);
        assert!(problems(Kind::TcpRoutes, r#"{"port":5432,"service":"db"}"#).is_empty());
    }

    #[test]
    fn edge_policies_are_checked_with_field_paths() {
        let route = |extra: &str| {
            problems(
                Kind::Routes,
                &format!(r#"{{"scope":"ingress","backends":[{{"service":"a"}}],{extra}}}"#),
            )
        };
        assert_eq!(
            route(r#""rate_limit":{"requests":0}"#),
            ["rate_limit.requests"]
        );
        assert_eq!(
            route(r#""rate_limit":{"requests":-5}"#),
            ["rate_limit.requests"]
        );
        assert_eq!(
            route(r#""rate_limit":{"requests":5,"burst":0,"key":"header"}"#),
            ["rate_limit.burst", "rate_limit.header"]
        );
        assert_eq!(
            route(r#""rate_limit":{"requests":5,"key":"consumer"}"#),
            ["rate_limit.key"]
        );
        assert_eq!(route(r#""auth":{}"#), ["auth"]);
        assert_eq!(
            route(r#""auth":{"api_key":{"header":"X-Key"},"consumers":["Bad Name"]}"#),
            ["auth.api_key.header", "auth.consumers[0]"]
        );
        assert_eq!(
            route(r#""fault":{"abort":{"status":99,"percent":101}}"#),
            ["fault.abort.status", "fault.abort.percent"]
        );
        assert_eq!(route(r#""fault":{}"#), ["fault"]);
        assert!(route(
            r#""auth":{"jwt":{"issuer":"idp"}},"rate_limit":{"requests":5,"key":"consumer"},"fault":{"delay":{"ms":5,"percent":12.5}}"#
        )
        .is_empty());
        // Consumers authenticate at the edge only.
        assert_eq!(
            problems(
                Kind::Routes,
                r#"{"backends":[{"service":"a"}],"auth":{"api_key":{}}}"#
            ),
            ["auth"]
        );
    }

    #[test]
    fn consumers_are_checked_with_field_paths() {
        let c = |json: &str| problems(Kind::Consumers, json);
        assert_eq!(c(r#"{"api_keys":[{"key":"short"}]}"#), ["api_keys[0].key"]);
        assert_eq!(
            c(r#"{"api_keys":[{"sha256":"XYZ"}]}"#),
            ["api_keys[0].sha256"]
        );
        assert_eq!(c(r#"{"api_keys":[{}]}"#), ["api_keys[0]"]);
        assert_eq!(
            c(
                r#"{"jwt":{"keys":[{"algorithm":"RS256","public_key":"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"}]}}"#
            ),
            ["jwt.keys[0].public_key"]
        );
        assert_eq!(
            c(r#"{"jwt":{"keys":[{"algorithm":"HS256","secret":"too short"}]}}"#),
            ["jwt.keys[0].secret"]
        );
        assert_eq!(
            c(r#"{"jwt":{"keys":[{"algorithm":"none"}]}}"#),
            ["jwt.keys[0].algorithm"]
        );
        assert_eq!(
            c(r#"{"jwt":{"jwks":{"keys":[{"kty":"oct"}]}}}"#),
            ["jwt.jwks"]
        );
        assert_eq!(
            c(r#"{"rate_limit":{"requests":1,"key":"source_ip"}}"#),
            ["rate_limit.key"]
        );
        assert!(c(
            r#"{"api_keys":[{"name":"k1","key":"0123456789abcdef"}],"jwt":{"keys":[{"kid":"a","algorithm":"HS256","secret":"0123456789abcdef0123456789abcdef"}]}}"#
        )
        .is_empty());
    }

    #[test]
    fn a_consumer_shows_no_secret() {
        let mut v = serde_json::json!({
            "api_keys": [{"name": "k", "key": "0123456789abcdef"}],
            "jwt": {"keys": [{"kid": "a", "algorithm": "HS256", "secret": "s"}]}
        });
        public_spec(Kind::Consumers, &mut v);
        let text = v.to_string();
        assert!(
            !text.contains("0123456789abcdef") && !text.contains("\"secret\""),
            "{text}"
        );
        assert_eq!(
            v["api_keys"][0]["sha256"],
            crate::tokens::hex(&crate::tokens::digest("0123456789abcdef"))
        );
    }
}
