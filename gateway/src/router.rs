//! Route tables: compiled routes indexed by host, and matching a request to
//! the best route (highest priority, then the most specific match).
//!
//! Ranking: priority, then host (exact > longest `*.suffix` > any), then
//! path (exact > longer prefix > none), then methods and header conditions
//! given; the route name breaks remaining ties so matching is deterministic.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use meshgate_config::model::{Route, Scope, Timeouts};

use crate::balance::Schedule;

#[derive(Debug, Clone)]
enum PathCond {
    Any,
    Exact(String),
    Prefix(String),
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
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    /// Backend service names and the weighted order to pick them in.
    pub backends: Vec<Arc<str>>,
    backend_schedule: Schedule,
    pub direct: Option<(StatusCode, Bytes, Option<HeaderValue>)>,
    pub timeouts: Option<Timeouts>,
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
            _ => PathCond::Any,
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
            headers: m
                .headers
                .iter()
                .filter_map(|h| {
                    let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                    let val = match &h.exact {
                        Some(v) => Some(HeaderValue::from_str(v).ok()?),
                        None => None,
                    };
                    Some((name, val))
                })
                .collect(),
            backends: r
                .backends
                .iter()
                .map(|b| Arc::from(b.service.as_str()))
                .collect(),
            backend_schedule: Schedule::new(
                &r.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            ),
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
            stats: Default::default(),
        }
    }

    /// A route to one service with no conditions: the mesh's implicit
    /// route for a request naming a service that no route matches.
    pub fn implicit(service: &str) -> CompiledRoute {
        let r = Route {
            scope: Scope::Mesh,
            matches: Default::default(),
            priority: i32::MIN,
            backends: vec![meshgate_config::model::Backend {
                service: service.to_string(),
                weight: 1,
            }],
            direct_response: None,
            timeouts: None,
            labels: Default::default(),
        };
        let mut c = CompiledRoute::new(service, 0, &r);
        c.name = Arc::from(format!("service:{service}"));
        c
    }

    /// The backend service for the next request.
    /// The next backend in weighted order, with its index in `backends`.
    pub fn pick_backend(&self) -> Option<(usize, &Arc<str>)> {
        self.backend_schedule.next().map(|i| (i, &self.backends[i]))
    }

    fn matches_rest(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            PathCond::Any => true,
            PathCond::Exact(p) => path == p,
            PathCond::Prefix(p) => prefix_match(path, p),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|(n, v)| match (headers.get(n), v) {
                (Some(_), None) => true,
                (Some(got), Some(want)) => got == want,
                (None, _) => false,
            })
    }

    /// Specificity of the non-host conditions, higher is more specific.
    fn specificity(&self) -> (u8, usize, bool, usize) {
        let (kind, len) = match &self.path {
            PathCond::Exact(p) => (2, p.len()),
            PathCond::Prefix(p) => (1, p.len()),
            PathCond::Any => (0, 0),
        };
        (kind, len, !self.methods.is_empty(), self.headers.len())
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

/// The routes of one scope, indexed for matching.
#[derive(Debug, Default, Clone)]
pub struct Router {
    exact: HashMap<String, Vec<Arc<CompiledRoute>>>,
    /// (suffix including the dot, routes), longest suffix first.
    wildcard: Vec<(String, Vec<Arc<CompiledRoute>>)>,
    any: Vec<Arc<CompiledRoute>>,
    len: usize,
}

impl Router {
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a Arc<CompiledRoute>>) -> Router {
        let mut r = Router::default();
        let mut wild: HashMap<String, Vec<Arc<CompiledRoute>>> = HashMap::new();
        for route in routes {
            r.len += 1;
            if route.hosts.is_empty() {
                r.any.push(route.clone());
            }
            for h in &route.hosts {
                match h.strip_prefix('*') {
                    Some(suffix) => wild
                        .entry(suffix.to_string())
                        .or_default()
                        .push(route.clone()),
                    None => r.exact.entry(h.clone()).or_default().push(route.clone()),
                }
            }
        }
        r.any.sort_by(bucket_order);
        for v in r.exact.values_mut() {
            v.sort_by(bucket_order);
        }
        r.wildcard = wild
            .into_iter()
            .map(|(s, mut v)| {
                v.sort_by(bucket_order);
                (s, v)
            })
            .collect();
        r.wildcard
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        r
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The best route for a request, if any.
    pub fn find<'a>(
        &'a self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&'a Arc<CompiledRoute>> {
        fn first<'r>(
            bucket: &'r [Arc<CompiledRoute>],
            method: &Method,
            path: &str,
            headers: &HeaderMap,
        ) -> Option<&'r Arc<CompiledRoute>> {
            bucket
                .iter()
                .find(|r| r.matches_rest(method, path, headers))
        }
        // The best candidate with its host rank: (kind, suffix length).
        let mut best: Option<(&Arc<CompiledRoute>, (u8, usize))> = None;
        let consider =
            |r: &'a Arc<CompiledRoute>,
             rank: (u8, usize),
             best: &mut Option<(&'a Arc<CompiledRoute>, (u8, usize))>| {
                let better = match best {
                    None => true,
                    Some((b, brank)) => {
                        (r.priority, rank, r.specificity()) > (b.priority, *brank, b.specificity())
                    }
                };
                if better {
                    *best = Some((r, rank));
                }
            };
        if let Some(r) = self
            .exact
            .get(host)
            .and_then(|b| first(b, method, path, headers))
        {
            consider(r, (2, 0), &mut best);
        }
        for (suffix, bucket) in &self.wildcard {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                if let Some(r) = first(bucket, method, path, headers) {
                    consider(r, (1, suffix.len()), &mut best);
                }
            }
        }
        if let Some(r) = first(&self.any, method, path, headers) {
            consider(r, (0, 0), &mut best);
        }
        best.map(|(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_config::{Key, Kind, Object};

    fn route(name: &str, json: &str) -> Arc<CompiledRoute> {
        let key = Key::new(Kind::Routes, name);
        let Object::Route(r) = Object::decode(&key, json.as_bytes()).unwrap() else {
            panic!()
        };
        Arc::new(CompiledRoute::new(name, 1, &r))
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
        r.find(
            host,
            &Method::from_bytes(method.as_bytes()).unwrap(),
            path,
            &h,
        )
        .map(|r| &*r.name)
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
        let mut n = 0;
        for _ in 0..400 {
            if &**r.pick_backend().unwrap().1 == "v2" {
                n += 1;
            }
        }
        assert_eq!(n, 100);
    }
}
