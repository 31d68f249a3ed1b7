//! Route tables: compiled routes indexed by host, and matching a request to
//! the best route (highest priority, then the most specific match).
//!
//! Ranking: priority, then host (exact > longest `*.suffix` > any), then
//! path (exact > longer prefix > none), then methods and header conditions
//! given; the route name breaks remaining ties so matching is deterministic.

use std::cmp::Ordering;
use std::sync::Arc;

use crate::maps::FastMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use meshgate_config::model::{Route, Scope, Timeouts};

use crate::upstream::balance::Schedule;

#[derive(Debug, Clone)]
enum PathCond {
    Any,
    Exact(String),
    Prefix(String),
    /// Anchored to the whole path.
    Regex(regex::Regex),
}

/// A condition on a header's or query parameter's values.
#[derive(Debug, Clone)]
enum ValueCond {
    Present,
    Absent,
    Exact(String),
    /// Anchored to the whole value.
    Regex(regex::Regex),
    /// A condition that cannot be compiled (the config validation refuses
    /// these; this keeps a route from over-matching if one slips through).
    Never,
}

impl ValueCond {
    fn describe(&self) -> String {
        match self {
            ValueCond::Present => "must be present".into(),
            ValueCond::Absent => "must be absent".into(),
            ValueCond::Exact(v) => format!("must equal {v:?}"),
            ValueCond::Regex(re) => format!("must match the regex {:?}", re.as_str()),
            ValueCond::Never => "is not a valid condition".into(),
        }
    }

    fn new(m: &meshgate_config::model::ValueMatch) -> ValueCond {
        match (&m.exact, &m.regex, m.present) {
            (_, _, Some(false)) => ValueCond::Absent,
            (Some(x), None, _) => ValueCond::Exact(x.clone()),
            (None, Some(r), _) => match meshgate_config::validate::compile_regex(r) {
                Ok(re) => ValueCond::Regex(re),
                Err(_) => ValueCond::Never,
            },
            (None, None, _) => ValueCond::Present,
            (Some(_), Some(_), _) => ValueCond::Never,
        }
    }

    /// Whether the values (none when absent) satisfy the condition.
    fn matches<'v>(&self, mut values: impl Iterator<Item = &'v str>) -> bool {
        match self {
            ValueCond::Present => values.next().is_some(),
            ValueCond::Absent => values.next().is_none(),
            ValueCond::Exact(want) => values.any(|v| v == want),
            ValueCond::Regex(re) => values.any(|v| re.is_match(v)),
            ValueCond::Never => false,
        }
    }
}

/// Header and query conditions (all must hold).
#[derive(Debug, Default)]
struct Conditions {
    headers: Vec<(HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
}

impl Conditions {
    fn new(
        headers: &[meshgate_config::model::ValueMatch],
        query: &[meshgate_config::model::ValueMatch],
    ) -> Conditions {
        Conditions {
            headers: headers
                .iter()
                .map(|h| match HeaderName::from_bytes(h.name.as_bytes()) {
                    Ok(name) => (name, ValueCond::new(h)),
                    Err(_) => (HeaderName::from_static("x-invalid"), ValueCond::Never),
                })
                .collect(),
            query: query
                .iter()
                .map(|q| (q.name.clone(), ValueCond::new(q)))
                .collect(),
        }
    }

    fn len(&self) -> usize {
        self.headers.len() + self.query.len()
    }

    fn hold(&self, req: &RequestView<'_>) -> bool {
        self.headers.iter().all(|(n, cond)| {
            cond.matches(
                req.headers
                    .get_all(n)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            )
        }) && (self.query.is_empty() || self.query_holds(req.query.unwrap_or("")))
    }

    fn query_holds(&self, query: &str) -> bool {
        let pairs: Vec<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> =
            form_urlencoded::parse(query.as_bytes()).collect();
        self.query.iter().all(|(name, cond)| {
            cond.matches(
                pairs
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.as_ref()),
            )
        })
    }
}

/// A weighted choice among a contiguous run of a route's backends.
#[derive(Debug)]
struct Choice {
    /// Index of the first backend in `CompiledRoute::backends`.
    first: usize,
    weights: Vec<u32>,
    schedule: Schedule,
}

impl Choice {
    fn new(first: usize, list: &[meshgate_config::model::Backend]) -> Choice {
        let weights: Vec<u32> = list.iter().map(|b| b.weight).collect();
        Choice {
            first,
            schedule: Schedule::new(&weights),
            weights,
        }
    }

    /// Index into the run: by `hash` (sticky) or the round-robin schedule.
    fn pick(&self, hash: Option<u64>) -> Option<usize> {
        let Some(h) = hash else {
            return self.schedule.next();
        };
        let total: u64 = self.weights.iter().map(|w| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut point = h % total;
        for (i, w) in self.weights.iter().enumerate() {
            if point < u64::from(*w) {
                return Some(i);
            }
            point -= u64::from(*w);
        }
        None
    }
}

/// A route's rewrites, ready to apply.
#[derive(Debug, Default)]
pub struct CompiledRewrite {
    /// (matched prefix, replacement).
    prefix: Option<(String, String)>,
    host: Option<HeaderValue>,
    request: Edits,
    response: Edits,
}

#[derive(Debug, Default)]
struct Edits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
}

impl Edits {
    fn new(e: &meshgate_config::model::HeaderEdits) -> Edits {
        Edits {
            remove: e
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            set: e
                .set
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        }
    }

    fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
    }
}

impl CompiledRewrite {
    fn new(rw: &meshgate_config::model::Rewrite, matched_prefix: Option<&str>) -> CompiledRewrite {
        CompiledRewrite {
            prefix: match (matched_prefix, &rw.path_prefix) {
                (Some(m), Some(r)) => Some((m.to_string(), r.clone())),
                _ => None,
            },
            host: rw
                .host
                .as_deref()
                .and_then(|h| HeaderValue::from_str(h).ok()),
            request: Edits::new(&rw.request_headers),
            response: Edits::new(&rw.response_headers),
        }
    }

    /// The upstream path and query after the prefix rewrite.
    pub fn path(&self, pq: &http::uri::PathAndQuery) -> Option<http::uri::PathAndQuery> {
        let (matched, replacement) = self.prefix.as_ref()?;
        let rest = pq.path().strip_prefix(matched.as_str())?;
        let mut path = String::with_capacity(replacement.len() + rest.len() + 16);
        path.push_str(replacement);
        // `/api` → `/` on `/api/x` gives `/x`, not `//x`.
        if path.ends_with('/') && rest.starts_with('/') {
            path.pop();
        }
        if !path.ends_with('/') && !rest.is_empty() && !rest.starts_with('/') {
            path.push('/');
        }
        path.push_str(rest);
        if path.is_empty() {
            path.push('/');
        }
        if let Some(q) = pq.query() {
            path.push('?');
            path.push_str(q);
        }
        path.parse().ok()
    }

    /// Applies the request header edits and the host.
    pub(crate) fn request_headers(&self, h: &mut HeaderMap) {
        self.request.apply(h);
        if let Some(host) = &self.host {
            h.insert(http::header::HOST, host.clone());
        }
    }

    pub(crate) fn response_headers(&self, h: &mut HeaderMap) {
        self.response.apply(h);
    }
}

/// What matching looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// A route ready for matching.
#[derive(Debug)]
pub struct CompiledRoute {
    pub name: Arc<str>,
    pub scope: Scope,
    pub version: i64,
    priority: i32,
    hosts: Vec<String>,
    path: PathCond,
    methods: Vec<Method>,
    conds: Conditions,
    /// Backend service names: the default backends, then each rule's.
    pub backends: Vec<Arc<str>>,
    /// The default backends' choice (the first `default.len` of `backends`).
    default: Choice,
    /// Backend rules, tried in order.
    rules: Vec<(Conditions, Choice)>,
    sticky: Option<crate::upstream::balance::RequestKey>,
    pub direct: Option<(StatusCode, Bytes, Option<HeaderValue>)>,
    pub timeouts: Option<Timeouts>,
    /// Overrides the service's retry policy.
    pub retry: Option<crate::upstream::resilience::Retry>,
    pub rewrite: Option<CompiledRewrite>,
    /// Authentication, rate limit, injected faults (set by the compiler;
    /// `None` for a route that sets none of them).
    pub policy: Option<Arc<dyn crate::policy::RouteEdge>>,
    /// This route's metric handles, resolved on first use so the request
    /// path does not hash label values (see `metrics::RouteStats`).
    pub stats: std::sync::OnceLock<crate::metrics::RouteStats>,
}

impl CompiledRoute {
    /// Compiles a validated route.
    pub fn new(name: &str, version: i64, r: &Route) -> CompiledRoute {
        let m = &r.matches;
        let path = match &m.path {
            Some(p) if p.exact.is_some() => PathCond::Exact(p.exact.clone().unwrap_or_default()),
            Some(p) if p.prefix.is_some() => PathCond::Prefix(p.prefix.clone().unwrap_or_default()),
            Some(p) => match p
                .regex
                .as_deref()
                .map(meshgate_config::validate::compile_regex)
            {
                Some(Ok(re)) => PathCond::Regex(re),
                // Refused by validation; never match rather than match all.
                _ => PathCond::Exact(String::new()),
            },
            None => PathCond::Any,
        };
        CompiledRoute {
            name: name.into(),
            scope: r.scope,
            version,
            priority: r.priority,
            hosts: m.hosts.clone(),
            path,
            methods: m
                .methods
                .iter()
                .filter_map(|s| Method::from_bytes(s.as_bytes()).ok())
                .collect(),
            conds: Conditions::new(&m.headers, &m.query),
            backends: r
                .backends
                .iter()
                .chain(r.backend_rules.iter().flat_map(|rule| &rule.backends))
                .map(|b| Arc::from(b.service.as_str()))
                .collect(),
            default: Choice::new(0, &r.backends),
            rules: {
                let mut first = r.backends.len();
                r.backend_rules
                    .iter()
                    .map(|rule| {
                        let c = Choice::new(first, &rule.backends);
                        first += rule.backends.len();
                        (
                            Conditions::new(&rule.matches.headers, &rule.matches.query),
                            c,
                        )
                    })
                    .collect()
            },
            sticky: r.sticky.as_ref().and_then(|s| {
                crate::upstream::balance::RequestKey::new(
                    s.header.as_deref(),
                    s.cookie.as_deref(),
                    false,
                )
            }),
            direct: r.direct_response.as_ref().map(|d| {
                (
                    StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK),
                    Bytes::from(d.body.clone()),
                    d.content_type
                        .as_deref()
                        .and_then(|c| HeaderValue::from_str(c).ok()),
                )
            }),
            timeouts: r.timeouts,
            retry: r
                .retry
                .as_ref()
                .map(crate::upstream::resilience::Retry::new),
            rewrite: r.rewrite.as_ref().map(|rw| {
                CompiledRewrite::new(rw, m.path.as_ref().and_then(|p| p.prefix.as_deref()))
            }),
            policy: None,
            stats: Default::default(),
        }
    }

    /// A route to one service with no conditions: the mesh's implicit
    /// route for a request naming a service that no route matches.
    pub(crate) fn implicit(service: &str) -> CompiledRoute {
        let r = Route {
            scope: Scope::Mesh,
            matches: Default::default(),
            priority: i32::MIN,
            backends: vec![meshgate_config::model::Backend {
                service: service.to_string(),
                weight: 1,
            }],
            backend_rules: Vec::new(),
            sticky: None,
            rewrite: None,
            direct_response: None,
            timeouts: None,
            retry: None,
            auth: None,
            rate_limit: None,
            fault: None,
            mirror: None,
            cache: None,
            labels: Default::default(),
        };
        let mut c = CompiledRoute::new(service, 0, &r);
        c.name = Arc::from(format!("service:{service}"));
        c
    }

    /// The backend for a request, with its index in `backends`: the first
    /// backend rule whose conditions hold, else the default backends; by a
    /// hash of the sticky key when the request carries it, else in
    /// weighted round robin.
    pub(crate) fn pick_backend(&self, req: &RequestView<'_>) -> Option<(usize, &Arc<str>)> {
        let choice = self
            .rules
            .iter()
            .find(|(c, _)| c.hold(req))
            .map(|(_, choice)| choice)
            .unwrap_or(&self.default);
        let hash = self.sticky.as_ref().and_then(|k| k.hash(req.headers, None));
        let i = choice.first + choice.pick(hash)?;
        Some((i, &self.backends[i]))
    }

    /// The backend rule a backend index of [`CompiledRoute::pick_backend`]
    /// belongs to (`None`: the default backends).
    pub fn rule_of(&self, index: usize) -> Option<usize> {
        self.rules
            .iter()
            .position(|(_, c)| (c.first..c.first + c.weights.len()).contains(&index))
    }

    /// Why this route does not match a request for `host` (empty: it
    /// matches). For the admin API's `explain`; the request path uses
    /// [`Router::find`].
    pub(crate) fn mismatches(&self, host: &str, req: &RequestView<'_>) -> Vec<String> {
        let mut why = Vec::new();
        let host_ok = self.hosts.is_empty()
            || self.hosts.iter().any(|h| match h.strip_prefix('*') {
                Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
                None => h == host,
            });
        if !host_ok {
            why.push(format!("host {host:?} is not one of {:?}", self.hosts));
        }
        let (path_ok, path_want) = match &self.path {
            PathCond::Any => (true, String::new()),
            PathCond::Exact(p) => (req.path == p, format!("exactly {p:?}")),
            PathCond::Prefix(p) => (prefix_match(req.path, p), format!("the prefix {p:?}")),
            PathCond::Regex(re) => (
                re.is_match(req.path),
                format!("the regex {:?}", re.as_str()),
            ),
        };
        if !path_ok {
            why.push(format!("path {:?} does not match {path_want}", req.path));
        }
        if !self.methods.is_empty() && !self.methods.contains(req.method) {
            let methods: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
            why.push(format!("method {} is not one of {methods:?}", req.method));
        }
        for (name, cond) in &self.conds.headers {
            let values = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok());
            if !cond.matches(values) {
                why.push(format!("header {name}: {}", cond.describe()));
            }
        }
        if !self.conds.query.is_empty() && !self.conds.query_holds(req.query.unwrap_or("")) {
            why.push("a query condition does not hold".to_string());
        }
        why
    }

    /// Which backends a matching request would be split over: the index
    /// of the first backend rule whose conditions hold (`None`: the
    /// default backends), and the services with their weights.
    pub(crate) fn backend_choice(
        &self,
        req: &RequestView<'_>,
    ) -> (Option<usize>, Vec<(Arc<str>, u32)>) {
        let (rule, choice) = match self.rules.iter().position(|(c, _)| c.hold(req)) {
            Some(i) => (Some(i), &self.rules[i].1),
            None => (None, &self.default),
        };
        let services = choice
            .weights
            .iter()
            .enumerate()
            .map(|(i, w)| (self.backends[choice.first + i].clone(), *w))
            .collect();
        (rule, services)
    }

    /// Priority, then specificity: how the router orders matching routes.
    pub(crate) fn rank(&self) -> i32 {
        self.priority
    }

    fn matches_rest(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathCond::Any => true,
            PathCond::Exact(p) => req.path == p,
            PathCond::Prefix(p) => prefix_match(req.path, p),
            PathCond::Regex(re) => re.is_match(req.path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(req.method))
            && self.conds.hold(req)
    }

    /// Specificity of the non-host conditions, higher is more specific:
    /// path (exact > regex > prefix, longer first), methods given, then
    /// the number of header and query conditions.
    fn specificity(&self) -> (u8, usize, bool, usize) {
        let (kind, len) = match &self.path {
            PathCond::Exact(p) => (3, p.len()),
            PathCond::Regex(re) => (2, re.as_str().len()),
            PathCond::Prefix(p) => (1, p.len()),
            PathCond::Any => (0, 0),
        };
        (kind, len, !self.methods.is_empty(), self.conds.len())
    }
}

/// A prefix matches whole path segments when it ends without '/':
/// `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_match(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => {
            prefix.ends_with('/')
                || rest.is_empty()
                || rest.starts_with('/')
                || rest.starts_with('?')
        }
    }
}

/// Sort order within a bucket: best first.
fn bucket_order(a: &Arc<CompiledRoute>, b: &Arc<CompiledRoute>) -> Ordering {
    b.priority
        .cmp(&a.priority)
        .then_with(|| b.specificity().cmp(&a.specificity()))
        .then_with(|| a.name.cmp(&b.name))
}

/// The routes sharing one host key, indexed by path: exact paths and
/// prefixes in hash maps (a request probes its own path and each of its
/// segment boundaries), routes without a path condition in a list. Each
/// list is sorted best first. Persistent maps: a clone is O(1) and a
/// change copies only the touched nodes.
#[derive(Debug, Clone, Default)]
struct Bucket {
    exact: FastMap<String, Vec<Arc<CompiledRoute>>>,
    prefix: FastMap<String, Vec<Arc<CompiledRoute>>>,
    /// Regex-path routes: tried one by one (keep them few per host).
    regex: Vec<Arc<CompiledRoute>>,
    any: Vec<Arc<CompiledRoute>>,
    len: usize,
}

impl Bucket {
    fn list_mut(&mut self, path: &PathCond) -> ListMut<'_> {
        match path {
            PathCond::Any => ListMut::Vec(&mut self.any),
            PathCond::Regex(_) => ListMut::Vec(&mut self.regex),
            PathCond::Exact(p) => ListMut::Map(&mut self.exact, p.clone()),
            PathCond::Prefix(p) => ListMut::Map(&mut self.prefix, p.clone()),
        }
    }

    fn insert(&mut self, route: Arc<CompiledRoute>) {
        let path = route.path.clone();
        self.list_mut(&path).update(|list| {
            list.push(route);
            list.sort_by(bucket_order);
        });
        self.len += 1;
    }

    /// Removes the route named `name` whose path condition is `path`.
    fn remove(&mut self, name: &str, path: &PathCond) {
        let mut removed = false;
        self.list_mut(path).update(|list| {
            let before = list.len();
            list.retain(|r| &*r.name != name);
            removed = list.len() != before;
        });
        if removed {
            self.len -= 1;
        }
    }

    /// The best route of this bucket for a request.
    fn best<'a>(&'a self, req: &RequestView<'_>) -> Option<&'a Arc<CompiledRoute>> {
        let path = req.path;
        let first = |list: &'a [Arc<CompiledRoute>]| list.iter().find(|r| r.matches_rest(req));
        let mut best: Option<&'a Arc<CompiledRoute>> = None;
        let mut consider = |r: Option<&'a Arc<CompiledRoute>>| {
            if let Some(r) = r {
                if best.is_none_or(|b| bucket_order(r, b) == Ordering::Less) {
                    best = Some(r);
                }
            }
        };
        if !self.exact.is_empty() {
            consider(self.exact.get(path).and_then(|l| first(l)));
        }
        if !self.prefix.is_empty() {
            // A prefix matches at a segment boundary: `/api` and `/api/`
            // both match `/api/x`; the whole path matches itself.
            for (i, c) in path.bytes().enumerate() {
                if c == b'/' {
                    if i > 0 {
                        consider(self.prefix.get(&path[..i]).and_then(|l| first(l)));
                    }
                    consider(self.prefix.get(&path[..=i]).and_then(|l| first(l)));
                }
            }
            if !path.ends_with('/') {
                consider(self.prefix.get(path).and_then(|l| first(l)));
            }
        }
        consider(first(&self.regex));
        consider(first(&self.any));
        best
    }
}

/// One list of a bucket, to update in place.
enum ListMut<'a> {
    Vec(&'a mut Vec<Arc<CompiledRoute>>),
    Map(&'a mut FastMap<String, Vec<Arc<CompiledRoute>>>, String),
}

impl ListMut<'_> {
    fn update(self, f: impl FnOnce(&mut Vec<Arc<CompiledRoute>>)) {
        match self {
            ListMut::Vec(v) => f(v),
            ListMut::Map(map, key) => {
                let mut list = map.get(&key).cloned().unwrap_or_default();
                f(&mut list);
                if list.is_empty() {
                    map.remove(&key);
                } else {
                    map.insert(key, list);
                }
            }
        }
    }
}

/// The routes of one scope, indexed for matching: by exact host, by
/// `*.suffix` (a request probes each of its host's dot-suffixes), and the
/// routes without hosts; within each, by path. Changing one route touches
/// only its buckets (O(log n)), and publishing the table is an O(1) clone:
/// the cost of a change does not grow with the size of the table.
#[derive(Debug, Default, Clone)]
pub struct Router {
    exact: FastMap<String, Bucket>,
    /// Keyed by the suffix including the dot (`.example.com`).
    wildcard: FastMap<String, Bucket>,
    any: Bucket,
    len: usize,
}

enum HostKey<'a> {
    Exact(&'a str),
    Wildcard(&'a str),
    Any,
}

fn host_keys(route: &CompiledRoute) -> Vec<HostKey<'_>> {
    if route.hosts.is_empty() {
        return vec![HostKey::Any];
    }
    route
        .hosts
        .iter()
        .map(|h| match h.strip_prefix('*') {
            Some(suffix) => HostKey::Wildcard(suffix),
            None => HostKey::Exact(h),
        })
        .collect()
}

impl Router {
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a Arc<CompiledRoute>>) -> Router {
        let mut r = Router::default();
        for route in routes {
            r.insert(route.clone());
        }
        r
    }

    fn update(&mut self, key: &HostKey<'_>, f: impl FnOnce(&mut Bucket)) {
        let (map, k) = match key {
            HostKey::Any => return f(&mut self.any),
            HostKey::Exact(h) => (&mut self.exact, *h),
            HostKey::Wildcard(s) => (&mut self.wildcard, *s),
        };
        let mut b = map.get(k).cloned().unwrap_or_default();
        f(&mut b);
        if b.len == 0 {
            map.remove(k);
        } else {
            map.insert(k.to_string(), b);
        }
    }

    /// Adds a route (its name must not be in the table).
    pub fn insert(&mut self, route: Arc<CompiledRoute>) {
        for key in host_keys(&route) {
            let r = route.clone();
            self.update(&key, |b| b.insert(r));
        }
        self.len += 1;
    }

    /// Removes a route previously inserted (matched by name).
    pub fn remove(&mut self, route: &CompiledRoute) {
        for key in host_keys(route) {
            self.update(&key, |b| b.remove(&route.name, &route.path));
        }
        self.len = self.len.saturating_sub(1);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The best route for a request, if any.
    pub fn find<'a>(&'a self, host: &str, req: &RequestView<'_>) -> Option<&'a Arc<CompiledRoute>> {
        // The best candidate with its host rank: (kind, suffix length).
        let mut best: Option<(&Arc<CompiledRoute>, (u8, usize))> = None;
        let mut consider = |r: Option<&'a Arc<CompiledRoute>>, rank: (u8, usize)| {
            let Some(r) = r else { return };
            let better = match &best {
                None => true,
                Some((b, brank)) => {
                    (r.priority, rank, r.specificity()) > (b.priority, *brank, b.specificity())
                }
            };
            if better {
                best = Some((r, rank));
            }
        };
        if let Some(b) = self.exact.get(host) {
            consider(b.best(req), (2, 0));
        }
        if !self.wildcard.is_empty() {
            for (i, c) in host.bytes().enumerate() {
                if c == b'.' && i > 0 {
                    let suffix = &host[i..];
                    if let Some(b) = self.wildcard.get(suffix) {
                        consider(b.best(req), (1, suffix.len()));
                    }
                }
            }
        }
        if self.any.len > 0 {
            consider(self.any.best(req), (0, 0));
        }
        best.map(|(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use meshgate_config::{Key, Kind, Object};

    fn route(name: &str, json: &str) -> Arc<CompiledRoute> {
        let key = Key::new(Kind::Routes, name);
        let Object::Route(r) = Object::decode(&key, json.as_bytes()).unwrap() else {
            panic!()
        };
        Arc::new(CompiledRoute::new(name, 1, &r))
    }

    #[test]
    fn a_backend_index_names_its_rule() {
        let r = route(
            "r",
            r#"{"backends": [{"service": "a"}, {"service": "b"}],
                "backend_rules": [
                  {"match": {"headers": [{"name": "x-1"}]}, "backends": [{"service": "c"}]},
                  {"match": {"headers": [{"name": "x-2"}]}, "backends": [{"service": "d"}, {"service": "e"}]}]}"#,
        );
        let rules: Vec<Option<usize>> = (0..5).map(|i| r.rule_of(i)).collect();
        assert_eq!(rules, [None, None, Some(0), Some(1), Some(1)]);
    }

    fn find<'a>(
        r: &'a Router,
        host: &str,
        method: &str,
        path: &str,
        hdrs: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let view = RequestView {
            method: &method,
            path,
            query,
            headers: &h,
        };
        r.find(host, &view).map(|r| &*r.name)
    }

    #[test]
    fn host_path_method_header_matching() {
        let routes = vec![
            route("catch-all", r#"{"backends":[{"service":"a"}]}"#),
            route(
                "shop",
                r#"{"match":{"hosts":["shop.io"]},"backends":[{"service":"a"}]}"#,
            ),
            route(
                "shop-api",
                r#"{"match":{"hosts":["shop.io"],"path":{"prefix":"/api"}},"backends":[{"service":"a"}]}"#,
            ),
            route(
                "shop-api-exact",
                r#"{"match":{"hosts":["shop.io"],"path":{"exact":"/api/v1"}},"backends":[{"service":"a"}]}"#,
            ),
            route(
                "post-only",
                r#"{"match":{"hosts":["shop.io"],"path":{"prefix":"/api"},"methods":["POST"]},"backends":[{"service":"a"}]}"#,
            ),
            route(
                "beta",
                r#"{"match":{"hosts":["shop.io"],"path":{"prefix":"/api"},"headers":[{"name":"x-beta","exact":"1"}]},"backends":[{"service":"a"}]}"#,
            ),
            route(
                "wild",
                r#"{"match":{"hosts":["*.shop.io"]},"backends":[{"service":"a"}]}"#,
            ),
            route(
                "wild-deeper",
                r#"{"match":{"hosts":["*.eu.shop.io"]},"backends":[{"service":"a"}]}"#,
            ),
        ];
        let r = Router::build(&routes);
        assert_eq!(r.len(), 8);
        assert_eq!(find(&r, "shop.io", "GET", "/", &[]), Some("shop"));
        assert_eq!(find(&r, "shop.io", "GET", "/api/x", &[]), Some("shop-api"));
        assert_eq!(find(&r, "shop.io", "GET", "/apix", &[]), Some("shop"));
        assert_eq!(
            find(&r, "shop.io", "GET", "/api/v1", &[]),
            Some("shop-api-exact")
        );
        assert_eq!(
            find(&r, "shop.io", "POST", "/api/x", &[]),
            Some("post-only")
        );
        assert_eq!(
            find(&r, "shop.io", "GET", "/api/x", &[("x-beta", "1")]),
            Some("beta")
        );
        assert_eq!(
            find(&r, "shop.io", "GET", "/api/x", &[("x-beta", "2")]),
            Some("shop-api")
        );
        assert_eq!(find(&r, "a.shop.io", "GET", "/", &[]), Some("wild"));
        assert_eq!(
            find(&r, "a.eu.shop.io", "GET", "/", &[]),
            Some("wild-deeper")
        );
        assert_eq!(find(&r, "other.io", "GET", "/", &[]), Some("catch-all"));
        // "*.shop.io" does not match the bare domain.
        assert_eq!(find(&r, "x.io", "GET", "/", &[]), Some("catch-all"));
    }

    #[test]
    fn priority_beats_specificity() {
        let routes = vec![
            route(
                "specific",
                r#"{"match":{"hosts":["a.io"],"path":{"exact":"/x"}},"backends":[{"service":"a"}]}"#,
            ),
            route("urgent", r#"{"priority":10,"backends":[{"service":"a"}]}"#),
        ];
        let r = Router::build(&routes);
        assert_eq!(find(&r, "a.io", "GET", "/x", &[]), Some("urgent"));
        assert_eq!(
            find(&Router::build(&routes[..1]), "a.io", "GET", "/y", &[]),
            None
        );
    }

    #[test]
    fn weighted_backends() {
        let r = route(
            "split",
            r#"{"backends":[{"service":"v1","weight":3},{"service":"v2","weight":1}]}"#,
        );
        let h = HeaderMap::new();
        let view = RequestView {
            method: &Method::GET,
            path: "/",
            query: None,
            headers: &h,
        };
        let mut n = 0;
        for _ in 0..400 {
            if &**r.pick_backend(&view).unwrap().1 == "v2" {
                n += 1;
            }
        }
        assert_eq!(n, 100);
    }

    /// The reference: every route checked, best by (priority, host rank,
    /// specificity), ties by name.
    fn find_linear<'a>(
        routes: &'a BTreeMap<String, Arc<CompiledRoute>>,
        host: &str,
        method: &Method,
        path: &str,
    ) -> Option<&'a str> {
        let h = HeaderMap::new();
        let mut best: Option<(&CompiledRoute, (u8, usize))> = None;
        for r in routes.values() {
            let rank = if r.hosts.is_empty() {
                Some((0, 0))
            } else {
                r.hosts
                    .iter()
                    .filter_map(|rh| match rh.strip_prefix('*') {
                        Some(suf) if host.len() > suf.len() && host.ends_with(suf) => {
                            Some((1u8, suf.len()))
                        }
                        None if rh == host => Some((2, 0)),
                        _ => None,
                    })
                    .max()
            };
            let Some(rank) = rank else { continue };
            let view = RequestView {
                method,
                path,
                query: None,
                headers: &h,
            };
            if !r.matches_rest(&view) {
                continue;
            }
            let better = match &best {
                None => true,
                Some((b, brank)) => {
                    let a = (r.priority, rank, r.specificity());
                    let bb = (b.priority, *brank, b.specificity());
                    a > bb || (a == bb && r.name < b.name)
                }
            };
            if better {
                best = Some((r, rank));
            }
        }
        best.map(|(r, _)| &*r.name)
    }

    #[test]
    fn incremental_changes_match_a_linear_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let hosts = ["a.io", "b.io", "*.io", "*.x.io", "y.x.io"];
        let paths = ["/", "/api", "/api/", "/api/v1", "/web"];
        let mut model: BTreeMap<String, Arc<CompiledRoute>> = BTreeMap::new();
        let mut router = Router::default();
        for step in 0..3000 {
            let name = format!("r{}", rng.gen_range(0..40));
            if rng.gen_bool(0.2) {
                if let Some(old) = model.remove(&name) {
                    router.remove(&old);
                }
            } else {
                let mut m = serde_json::Map::new();
                let nh = rng.gen_range(0..3);
                if nh > 0 {
                    let hs: Vec<&str> = (0..nh)
                        .map(|_| hosts[rng.gen_range(0..hosts.len())])
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    m.insert("hosts".into(), serde_json::json!(hs));
                }
                match rng.gen_range(0..3) {
                    0 => {}
                    1 => {
                        m.insert(
                            "path".into(),
                            serde_json::json!({"exact": paths[rng.gen_range(0..paths.len())]}),
                        );
                    }
                    _ => {
                        m.insert(
                            "path".into(),
                            serde_json::json!({"prefix": paths[rng.gen_range(0..paths.len())]}),
                        );
                    }
                }
                if rng.gen_bool(0.2) {
                    m.insert("methods".into(), serde_json::json!(["POST"]));
                }
                let json = serde_json::json!({
                    "match": m, "priority": rng.gen_range(0..3),
                    "backends": [{"service": "s"}],
                });
                let r = route(&name, &json.to_string());
                if let Some(old) = model.insert(name.clone(), r.clone()) {
                    router.remove(&old);
                }
                router.insert(r);
            }
            assert_eq!(router.len(), model.len(), "step {step}");
            for host in ["a.io", "b.io", "c.io", "y.x.io", "z.x.io", "other"] {
                for path in [
                    "/",
                    "/api",
                    "/api/",
                    "/api/v1",
                    "/api/v1/x",
                    "/apix",
                    "/web/1",
                ] {
                    for method in [Method::GET, Method::POST] {
                        let h = HeaderMap::new();
                        let view = RequestView {
                            method: &method,
                            path,
                            query: None,
                            headers: &h,
                        };
                        let got = router.find(host, &view);
                        assert_eq!(
                            got.map(|r| &*r.name),
                            find_linear(&model, host, &method, path),
                            "step {step}: {method} {host}{path}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_published_table_does_not_see_later_changes() {
        let a = route(
            "a",
            r#"{"match":{"hosts":["a.io"]},"backends":[{"service":"s"}]}"#,
        );
        let mut r = Router::default();
        r.insert(a.clone());
        let published = r.clone();
        r.remove(&a);
        assert!(find(&r, "a.io", "GET", "/", &[]).is_none());
        assert_eq!(find(&published, "a.io", "GET", "/", &[]), Some("a"));
    }

    fn pick(r: &CompiledRoute, hdrs: &[(&str, &str)], query: Option<&str>) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let view = RequestView {
            method: &Method::GET,
            path: "/",
            query,
            headers: &h,
        };
        r.pick_backend(&view).unwrap().1.to_string()
    }

    #[test]
    fn backend_rules_in_order_then_the_default_split() {
        let r = route(
            "canary",
            r#"{"backends":[{"service":"v1"}],
                "backend_rules":[
                  {"match":{"headers":[{"name":"user-agent","regex":".*iPhone.*"}]},"backends":[{"service":"v2"}]},
                  {"match":{"query":[{"name":"beta"}]},"backends":[{"service":"v3"}]},
                  {"match":{"headers":[{"name":"user-agent","regex":".*"}]},"backends":[{"service":"v4"}]}]}"#,
        );
        assert_eq!(
            pick(&r, &[("user-agent", "Mozilla (iPhone)")], Some("beta=1")),
            "v2"
        );
        assert_eq!(
            pick(&r, &[("user-agent", "Mozilla (X11)")], Some("beta=1")),
            "v3"
        );
        assert_eq!(pick(&r, &[("user-agent", "curl")], None), "v4");
        assert_eq!(pick(&r, &[], None), "v1");
        // Indexes are into the flattened backend list (metrics use them).
        assert_eq!(r.backends.len(), 4);
    }

    #[test]
    fn sticky_keys_keep_a_user_on_one_backend_and_follow_the_weights() {
        let r = route(
            "sticky",
            r#"{"backends":[{"service":"v1","weight":90},{"service":"v2","weight":10}],
                "sticky":{"cookie":"user"}}"#,
        );
        let mut v2 = 0;
        for u in 0..2000 {
            let cookie = format!("theme=dark; user=u{u}");
            let first = pick(&r, &[("cookie", &cookie)], None);
            // The same user lands on the same backend every time.
            for _ in 0..3 {
                assert_eq!(pick(&r, &[("cookie", &cookie)], None), first);
            }
            v2 += usize::from(first == "v2");
        }
        // 10% of 2,000 users: mean 200, sd ~13.4; allow 4.5 sd.
        assert!((140..=260).contains(&v2), "{v2} users on v2");
        // Without the cookie: the weighted round robin.
        let picks: Vec<String> = (0..10).map(|_| pick(&r, &[], None)).collect();
        assert_eq!(picks.iter().filter(|p| *p == "v2").count(), 1);
    }

    #[test]
    fn prefix_rewrites_keep_one_slash_and_the_query() {
        let rw = |m: &str, r: &str| CompiledRewrite {
            prefix: Some((m.into(), r.into())),
            ..Default::default()
        };
        let p = |rw: &CompiledRewrite, pq: &str| rw.path(&pq.parse().unwrap()).unwrap().to_string();
        assert_eq!(p(&rw("/api", "/"), "/api/x?y=1"), "/x?y=1");
        assert_eq!(p(&rw("/api", "/"), "/api"), "/");
        assert_eq!(p(&rw("/api/", "/v2/"), "/api/x"), "/v2/x");
        assert_eq!(p(&rw("/api", "/v2"), "/api/x"), "/v2/x");
        assert_eq!(p(&rw("/api", "/v2"), "/api"), "/v2");
        assert_eq!(p(&rw("/api/", "/v2"), "/api/x"), "/v2/x");
    }
}
