//! The gateway's request path. In order, for every request:
//!
//! 1. readiness: no config loaded yet → 503 `not_ready`
//! 2. `x-mesh-hops` + 1; over the limit → 508 `loop_detected`
//! 3. `x-request-id` / `traceparent` created when missing; on ingress
//!    listeners `x-mesh-source` is removed (never trusted from outside)
//! 4. route match on the listener's table (mesh: by `x-mesh-service` or
//!    host; a service named directly gets its implicit route) → 404 `no_route`
//! 5. direct response, or weighted backend choice → service
//! 6. forward: pick an endpoint (weighted round robin, ejected ones
//!    skipped); a refused connection is retried on another endpoint when the
//!    body can be replayed; timeouts → 504, connect failures → 502
//! 7. metrics and the response, hop-by-hop headers removed

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::balance::EndpointState;
use crate::body::{full, ProxyBody, ReplayBody};
use crate::client::Wire;
use crate::error::MeshError;
use crate::headers;
use crate::metrics::{status_class, Metrics, RouteStats};
use crate::router::{CompiledRoute, RequestView};
use crate::server::Peer;
use crate::state::{ServiceRt, SharedSnapshot, Snapshot};
use crate::upstream::{self, Attempt, AttemptOpts};

/// Which table a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// North–south traffic: `scope: ingress` routes.
    Ingress,
    /// East–west traffic from sidecars: `scope: mesh` routes.
    Mesh,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Ingress => "ingress",
            ListenerKind::Mesh => "mesh",
        }
    }
}

/// Tunables of the proxy path.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    pub max_hops: u32,
    /// Request bodies up to this size are buffered so they can be replayed.
    pub replay_buffer_bytes: usize,
    /// Endpoints tried per request when connections are refused.
    pub max_connect_attempts: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            max_hops: 8,
            replay_buffer_bytes: 64 * 1024,
            max_connect_attempts: 3,
        }
    }
}

/// The gateway data plane.
pub struct Proxy {
    pub snapshot: SharedSnapshot,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub opts: ProxyOptions,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("opts", &self.opts).finish()
    }
}

impl Proxy {
    /// Handles one request end to end; never fails (errors become synthetic
    /// responses).
    pub async fn handle(
        &self,
        kind: ListenerKind,
        peer: Peer,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let (resp, route) = self.route_and_forward(kind, &peer, req).await;
        let status = resp.status().as_u16();
        let elapsed = start.elapsed().as_secs_f64();
        match route {
            Some((route, backend)) => {
                let stats = route.stats.get_or_init(|| {
                    let backends: Vec<&str> = route.backends.iter().map(|b| &**b).collect();
                    RouteStats::new(&self.metrics, kind.as_str(), &route.name, &backends)
                });
                stats.count(backend, status);
                stats.duration.observe(elapsed);
            }
            None => {
                self.metrics
                    .requests
                    .with_label_values(&[kind.as_str(), "", "", status_class(status)])
                    .inc();
                self.metrics
                    .duration
                    .with_label_values(&[kind.as_str(), ""])
                    .observe(elapsed);
            }
        }
        resp
    }

    /// The response, and the route and backend index it was counted under.
    async fn route_and_forward(
        &self,
        kind: ListenerKind,
        peer: &Peer,
        mut req: Request<Incoming>,
    ) -> (Response<ProxyBody>, Option<(Arc<CompiledRoute>, usize)>) {
        if !self.ready.load(Ordering::Acquire) {
            return (MeshError::NotReady.response("no config loaded yet"), None);
        }
        let snap = self.snapshot.load_full();
        let h = req.headers_mut();
        match headers::bump_hops(h) {
            None => {
                return (
                    MeshError::BadRequest.response("x-mesh-hops is not a number"),
                    None,
                )
            }
            Some(n) if n > self.opts.max_hops => {
                return (
                    MeshError::LoopDetected
                        .response(&format!("more than {} mesh hops", self.opts.max_hops)),
                    None,
                )
            }
            Some(_) => {}
        }
        headers::ensure_ids(h);
        if kind == ListenerKind::Ingress {
            h.remove(&headers::X_MESH_SOURCE);
        }
        append_forwarded_for(h, &peer.ip);

        let uri_host = req.uri().host().map(str::to_string);
        let (router, host) = match kind {
            ListenerKind::Mesh => (
                &snap.mesh,
                headers::destination(req.headers(), uri_host.as_deref()),
            ),
            ListenerKind::Ingress => (
                &snap.ingress,
                headers::request_host(req.headers(), uri_host.as_deref()),
            ),
        };
        let host = host.unwrap_or_default();
        let path = req.uri().path();
        let view = RequestView {
            method: req.method(),
            path,
            query: req.uri().query(),
            headers: req.headers(),
        };
        let found = router.find(&host, &view).cloned();
        let route: Arc<CompiledRoute> = match found {
            Some(r) => r,
            None => match (kind, snap.services.get(host.as_str())) {
                (ListenerKind::Mesh, Some(svc)) => svc.implicit_route.clone(),
                _ => {
                    let msg = format!(
                        "no {} route for {} {}{}",
                        kind.as_str(),
                        req.method(),
                        host,
                        path
                    );
                    return (MeshError::NoRoute.response(&msg), None);
                }
            },
        };
        if let Some((status, body, ctype)) = &route.direct {
            let mut resp = Response::new(full(Full::new(body.clone())));
            *resp.status_mut() = *status;
            if let Some(c) = ctype {
                resp.headers_mut().insert(header::CONTENT_TYPE, c.clone());
            }
            return (resp, Some((route, 0)));
        }
        let Some((index, backend)) = route.pick_backend(&view) else {
            return (
                MeshError::NoHealthyEndpoint.response("route has no weighted backend"),
                None,
            );
        };
        let Some(svc) = snap.services.get(&**backend).cloned() else {
            let msg = format!("service {backend} is not configured");
            return (
                MeshError::NoHealthyEndpoint.response(&msg),
                Some((route, index)),
            );
        };
        let resp = self.forward(svc, &snap, &route, &peer.ip, req).await;
        (resp, Some((route, index)))
    }

    /// Sends the request to one of the service's endpoints. A refused
    /// connection moves on to another endpoint (HTTP/1.1 gets the unsent
    /// request back, so even a streamed body can move on; HTTP/2 replays a
    /// buffered body).
    async fn forward(
        &self,
        primary: Arc<ServiceRt>,
        snap: &Snapshot,
        route: &CompiledRoute,
        client_ip: &HeaderValue,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body =
            match ReplayBody::new(body, content_length, self.opts.replay_buffer_bytes).await {
                Ok(b) => b,
                Err(e) => return MeshError::BadRequest.response(&e.to_string()),
            };
        // Keep the caller's host for the upstream (HTTP/2 carries it in the URI).
        if !parts.headers.contains_key(header::HOST) {
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        let mut pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if let Some(rw) = &route.rewrite {
            rw.request_headers(&mut parts.headers);
            if let Some(p) = rw.path(&pq) {
                pq = p;
            }
        }
        let timeout = primary.request_timeout(route.timeouts.as_ref());
        // The service's fallback, used once when none of its endpoints is
        // available or every connect failed (one level: a fallback's own
        // fallback is not followed, so chains cannot loop).
        let mut fallback: Option<Arc<ServiceRt>> = primary
            .spec
            .fallback
            .as_deref()
            .and_then(|f| snap.services.get(f).cloned())
            .filter(|f| !Arc::ptr_eq(f, &primary));
        // Consistent-hash keys, computed while the headers are at hand.
        let key_of = |s: &ServiceRt| {
            s.hash_on
                .as_ref()
                .and_then(|k| k.hash(&parts.headers, Some(client_ip)))
        };
        let mut key = key_of(&primary);
        let fallback_key = fallback.as_deref().and_then(key_of);
        let mut svc = primary;
        let mut tried: Vec<Arc<EndpointState>> = Vec::new();
        // HTTP/1.1: the request itself, back unsent from a failed connect.
        let mut unsent: Option<Request<ProxyBody>> = None;
        loop {
            let exhausted = tried.len() >= self.opts.max_connect_attempts
                || (fallback.is_some() && tried.is_empty() && !svc.balancer.any_available());
            let picked = if exhausted {
                None
            } else {
                svc.balancer.pick_keyed(&tried, key)
            };
            let Some(ep) = picked else {
                if let Some(f) = fallback.take() {
                    if unsent.is_some() || body.replayable() || tried.is_empty() {
                        tracing::debug!(service = %svc.name, fallback = %f.name, "no healthy endpoint; using the fallback service");
                        svc = f;
                        key = fallback_key;
                        tried.clear();
                        continue;
                    }
                }
                return if tried.is_empty() {
                    MeshError::NoHealthyEndpoint
                        .response(&format!("service {} has no endpoints", svc.name))
                } else {
                    MeshError::UpstreamConnectFailed.response(&format!(
                        "cannot connect to service {} ({} attempt(s))",
                        svc.name,
                        tried.len()
                    ))
                };
            };
            let up = match unsent.take() {
                Some(r) => {
                    // HTTP/2 hands nothing back on failure: keep a copy.
                    if svc.wire == Wire::Http2 && body.replayable() && parts.headers.is_empty() {
                        parts.headers = r.headers().clone();
                    }
                    r
                }
                None => {
                    let Some(attempt_body) = body.take() else {
                        return MeshError::UpstreamConnectFailed
                            .response("connection failed and the request body cannot be replayed");
                    };
                    let mut up = Request::new(attempt_body);
                    *up.method_mut() = parts.method.clone();
                    // HTTP/1.1 hands an unsent request back, so the headers
                    // can move; HTTP/2 may need them again for a retry.
                    *up.headers_mut() = if svc.wire == Wire::Http2 && body.replayable() {
                        parts.headers.clone()
                    } else {
                        std::mem::take(&mut parts.headers)
                    };
                    up
                }
            };
            let opts = AttemptOpts {
                wire: svc.wire,
                h2: &svc.client,
                connect_timeout: svc.connect_timeout,
                timeout,
                track_load: svc.balancer.tracks_load(),
            };
            let attempt = upstream::attempt(&ep, opts, &pq, up).await;
            match attempt {
                Ok(resp) => {
                    let (mut rp, rb) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut rp.headers);
                    if let Some(rw) = &route.rewrite {
                        rw.response_headers(&mut rp.headers);
                    }
                    return Response::from_parts(rp, rb);
                }
                Err(Attempt::Connect(error, back)) => {
                    unsent = back.map(|b| *b);
                    ep.on_failure();
                    self.metrics
                        .connect_failures
                        .with_label_values(&[&svc.name])
                        .inc();
                    tracing::debug!(service = %svc.name, endpoint = %ep.address, %error, "upstream connect failed");
                    tried.push(ep);
                    if unsent.is_none() && !body.replayable() {
                        return MeshError::UpstreamConnectFailed.response(&format!(
                            "cannot connect to service {} and the request body cannot be replayed",
                            svc.name
                        ));
                    }
                }
                Err(Attempt::Exchange(error)) => {
                    tracing::debug!(service = %svc.name, endpoint = %ep.address, %error, "upstream request failed");
                    return MeshError::UpstreamReset
                        .response(&format!("upstream {} failed: {error}", svc.name));
                }
                Err(Attempt::Timeout) => {
                    return MeshError::UpstreamTimeout.response(&format!(
                        "no response from {} within {} ms",
                        svc.name,
                        timeout.as_millis()
                    ));
                }
            }
        }
    }
}

fn append_forwarded_for(h: &mut http::HeaderMap, ip: &HeaderValue) {
    const XFF: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
    let v = match h.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            match HeaderValue::from_str(&format!("{prev}, {}", ip.to_str().unwrap_or(""))) {
                Ok(v) => v,
                Err(_) => return,
            }
        }
        None => ip.clone(),
    };
    h.insert(XFF, v);
}

/// The innermost error message (hyper wraps io errors several levels deep).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A small text response (used by ops endpoints and tests).
pub fn text(status: http::StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(full(Full::new(Bytes::from_static(body.as_bytes()))));
    *r.status_mut() = status;
    r
}

/// Default timeouts of the proxy path.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
