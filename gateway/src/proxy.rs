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

use crate::balance::{EndpointState, Outcome};
use crate::body::{full, Guarded, ProxyBody, ReplayBody, RequestBody};
use crate::client::Wire;
use crate::error::MeshError;
use crate::headers;
use crate::metrics::{status_class, Metrics, RouteStats};
use crate::resilience::{self, Overflow};
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
        req: Request<RequestBody>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = headers::is_grpc(req.headers());
        let (mut resp, route) = self.route_and_forward(kind, &peer, grpc, req).await;
        if grpc {
            resp = grpc_error(resp);
        }
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
        grpc: bool,
        mut req: Request<RequestBody>,
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
        if req.method() == http::Method::CONNECT {
            // Boxed, here and for upgrades: a rare path's future would
            // otherwise widen every request's future (copied when it is
            // created and moved).
            return (
                Box::pin(self.connect(kind, &snap, uri_host.as_deref(), req)).await,
                None,
            );
        }
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
            None => match (kind, snap.services.get(&*host)) {
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
        // A gRPC caller's deadline bounds the whole request.
        let deadline = if grpc {
            headers::grpc_timeout(req.headers())
        } else {
            None
        };
        let resp = self
            .forward(svc, &snap, &route, &peer.ip, deadline, req)
            .await;
        (resp, Some((route, index)))
    }

    /// Sends the request to one of the service's endpoints, under the
    /// service's circuit breaker, retry policy and timeouts:
    ///
    /// - a refused connection moves on to another endpoint (nothing was
    ///   sent: any method; HTTP/1.1 gets the unsent request back, so even a
    ///   streamed body can move on) and, when every endpoint is refused or
    ///   ejected, to the service's fallback;
    /// - after a request was sent, a reset, a per-try timeout or a status
    ///   of the retry policy is retried on another endpoint when the
    ///   method allows it, the body was buffered, the retry budget and
    ///   `max_retries` allow it, and the whole-request deadline is not past;
    /// - every answer and failure feeds outlier detection.
    async fn forward(
        &self,
        primary: Arc<ServiceRt>,
        snap: &Snapshot,
        route: &CompiledRoute,
        client_ip: &HeaderValue,
        deadline_hint: Option<Duration>,
        req: Request<RequestBody>,
    ) -> Response<ProxyBody> {
        if !req.body().is_whole() && headers::is_upgrade(req.headers()) {
            let t = primary.timeouts(route.timeouts.as_ref());
            let total = deadline_hint.map_or(t.total, |d| d.min(t.total));
            return Box::pin(self.forward_upgrade(primary, route, total, t.idle, req)).await;
        }
        let (mut parts, body) = req.into_parts();
        // Keep the caller's host for the upstream (HTTP/2 carries it in the URI).
        if !parts.headers.contains_key(header::HOST) {
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(header::HOST, v);
            }
        }
        let mut body =
            match ReplayBody::new(body, &parts.headers, self.opts.replay_buffer_bytes).await {
                Ok(b) => b,
                Err(e) => return MeshError::BadRequest.response(&e.to_string()),
            };
        self.forward_prepared(
            primary,
            snap,
            route,
            client_ip,
            deadline_hint,
            parts,
            &mut body,
        )
        .await
    }

    /// [`Proxy::forward`] of a request whose body is already read into a
    /// [`ReplayBody`]. A buffered body stays replayable afterwards, so a
    /// caller (the sidecar's direct mode) can send it on elsewhere when
    /// the answer is a mesh error.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward_prepared(
        &self,
        primary: Arc<ServiceRt>,
        snap: &Snapshot,
        route: &CompiledRoute,
        client_ip: &HeaderValue,
        deadline_hint: Option<Duration>,
        mut parts: http::request::Parts,
        body: &mut ReplayBody,
    ) -> Response<ProxyBody> {
        let t = primary.timeouts(route.timeouts.as_ref());
        let total = deadline_hint.map_or(t.total, |d| d.min(t.total));
        let deadline = Instant::now() + total;
        let admitted = if primary.breaker.max_requests.is_some() {
            match resilience::admit(&primary.shared, &primary.breaker) {
                Ok(a) => Some(a),
                Err(o) => return self.circuit_open(&primary.name, o),
            }
        } else {
            None
        };
        headers::strip_hop_by_hop(&mut parts.headers);
        let pq = upstream_target(route, &mut parts);
        let retry = route.retry.or(primary.retry);
        let retry = retry.as_ref();
        if retry.is_some() {
            primary.shared.budget.record_request();
        }
        // Whether a request already sent may be sent again.
        let resendable = body.replayable()
            && retry.is_some_and(|r| {
                r.attempts > 0
                    && r.method_allowed(&parts.method, headers::marked_retryable(&parts.headers))
            });
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
        let mut connect_failures = 0usize;
        let mut retries = 0u32;
        let mut _retry_permit: Option<resilience::RetryPermit> = None;
        // HTTP/1.1: the request itself, back unsent from a failed connect.
        let mut unsent: Option<Request<ProxyBody>> = None;
        loop {
            let exhausted = connect_failures >= self.opts.max_connect_attempts
                || (fallback.is_some() && tried.is_empty() && !svc.balancer.any_available());
            let picked = if exhausted {
                None
            } else {
                // A retry after a sent attempt prefers an endpoint not yet
                // tried, but may go back to one.
                svc.balancer.pick_keyed(&tried, key).or_else(|| {
                    (retries > 0)
                        .then(|| svc.balancer.pick_keyed(&[], key))
                        .flatten()
                })
            };
            let Some(ep) = picked else {
                if let Some(f) = fallback.take() {
                    if unsent.is_some() || body.replayable() || tried.is_empty() {
                        tracing::debug!(service = %svc.name, fallback = %f.name, "no healthy endpoint; using the fallback service");
                        svc = f;
                        key = fallback_key;
                        tried.clear();
                        connect_failures = 0;
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return MeshError::UpstreamTimeout.response(&format!(
                    "no response from {} within {} ms",
                    svc.name,
                    total.as_millis()
                ));
            }
            let per_try = t.per_try.min(left);
            // Keep a copy of the headers when the request may be sent again.
            let keep_copy = body.replayable() && (svc.wire == Wire::Http2 || resendable);
            let up = match unsent.take() {
                Some(r) => {
                    // HTTP/2 hands nothing back on failure: keep a copy.
                    if keep_copy && parts.headers.is_empty() {
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
                    *up.headers_mut() = if keep_copy {
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
                timeout: per_try,
                track_load: svc.balancer.tracks_load(),
                conn_limit: svc.conn_limit(),
            };
            let attempt = upstream::attempt(&ep, opts, &pq, up).await;
            // Whether this failure may be retried (and if so, takes a retry).
            let mut may_retry = |why: &'static str, svc: &ServiceRt| -> bool {
                let Some(r) = retry else { return false };
                if !resendable || retries >= r.attempts || Instant::now() >= deadline {
                    return false;
                }
                let events = &self.metrics.resilience;
                if !svc.shared.budget.try_withdraw(&r.budget) {
                    events
                        .with_label_values(&[&svc.name, "retry_budget_exhausted"])
                        .inc();
                    return false;
                }
                let Some(permit) = resilience::retry_permit(&svc.shared, &svc.breaker) else {
                    events
                        .with_label_values(&[&svc.name, "retry_overflow"])
                        .inc();
                    return false;
                };
                _retry_permit = Some(permit);
                retries += 1;
                events.with_label_values(&[&svc.name, "retry"]).inc();
                tracing::debug!(service = %svc.name, endpoint = %ep.address, why, retries, "retrying on another endpoint");
                true
            };
            match attempt {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    self.observe(&svc, &ep, Outcome::Status(status));
                    if retry.is_some_and(|r| r.on_status(status)) && may_retry("status", &svc) {
                        tried.push(ep);
                        continue;
                    }
                    let (mut rp, rb) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut rp.headers);
                    if let Some(rw) = &route.rewrite {
                        rw.response_headers(&mut rp.headers);
                    }
                    return Response::from_parts(rp, Guarded::wrap(rb, t.idle, admitted));
                }
                Err(Attempt::Connect(error, back)) => {
                    unsent = back.map(|b| *b);
                    connect_failures += 1;
                    self.connect_failed(&svc, &ep, &error);
                    tried.push(ep);
                    if unsent.is_none() && !body.replayable() {
                        return MeshError::UpstreamConnectFailed.response(&format!(
                            "cannot connect to service {} and the request body cannot be replayed",
                            svc.name
                        ));
                    }
                }
                Err(Attempt::Overflow(o)) => return self.circuit_open(&svc.name, o),
                Err(Attempt::Exchange(error)) => {
                    tracing::debug!(service = %svc.name, endpoint = %ep.address, %error, "upstream request failed");
                    self.observe(&svc, &ep, Outcome::GatewayFailure);
                    if retry.is_some_and(|r| r.on_reset) && may_retry("reset", &svc) {
                        tried.push(ep);
                        continue;
                    }
                    return MeshError::UpstreamReset
                        .response(&format!("upstream {} failed: {error}", svc.name));
                }
                Err(Attempt::Timeout) => {
                    self.observe(&svc, &ep, Outcome::GatewayFailure);
                    let whole = per_try >= left;
                    if !whole
                        && retry.is_some_and(|r| r.on_per_try_timeout)
                        && may_retry("per_try_timeout", &svc)
                    {
                        tried.push(ep);
                        continue;
                    }
                    return MeshError::UpstreamTimeout.response(&format!(
                        "no response from {} within {} ms",
                        svc.name,
                        per_try.as_millis()
                    ));
                }
            }
        }
    }

    /// Feeds an attempt's outcome to the service's outlier detection and
    /// ejects the endpoint when it crosses a threshold (within the cap).
    fn observe(&self, svc: &ServiceRt, ep: &EndpointState, outcome: Outcome) {
        let Some(cfg) = &svc.outlier else { return };
        if ep.record_outcome(outcome, cfg) && svc.balancer.may_eject(cfg.max_ejection_percent) {
            ep.eject_outlier(cfg);
            self.metrics
                .resilience
                .with_label_values(&[&svc.name, "outlier_ejection"])
                .inc();
            tracing::warn!(service = %svc.name, endpoint = %ep.address, "endpoint ejected by outlier detection");
        }
    }

    /// A connection to `ep` could not be made: eject it and count it.
    fn connect_failed(&self, svc: &ServiceRt, ep: &EndpointState, error: &str) {
        ep.on_failure();
        self.metrics
            .connect_failures
            .with_label_values(&[&svc.name])
            .inc();
        tracing::debug!(service = %svc.name, endpoint = %ep.address, %error, "upstream connect failed");
    }

    fn circuit_open(&self, service: &str, o: Overflow) -> Response<ProxyBody> {
        self.metrics
            .resilience
            .with_label_values(&[service, "circuit_open"])
            .inc();
        MeshError::CircuitOpen.response(&format!("service {service}: {} reached", o.as_str()))
    }

    /// An HTTP `CONNECT` on a mesh listener (a sidecar's plain-TCP local
    /// port): a TCP connection to an endpoint of the named service (the
    /// service's fallback when none accepts), answered 200 and then joined
    /// to the client's connection as a byte tunnel, bounded by the
    /// service's idle timeout. Routes do not apply: TCP has no path or
    /// headers to match.
    async fn connect(
        &self,
        kind: ListenerKind,
        snap: &Snapshot,
        uri_host: Option<&str>,
        mut req: Request<RequestBody>,
    ) -> Response<ProxyBody> {
        use crate::tcp::ConnectError;
        if kind != ListenerKind::Mesh {
            return MeshError::BadRequest.response("CONNECT is served on mesh listeners only");
        }
        let Some(dest) = headers::destination(req.headers(), uri_host).map(|d| d.into_owned())
        else {
            return MeshError::NoDestination.response("CONNECT names no service");
        };
        let Some(primary) = snap.services.get(dest.as_str()).cloned() else {
            return MeshError::NoRoute.response(&format!("service {dest} is not configured"));
        };
        let fallback = primary
            .spec
            .fallback
            .as_deref()
            .and_then(|f| snap.services.get(f).cloned());
        let mut result = crate::tcp::connect_service(&primary, &self.metrics).await;
        let mut svc = primary;
        if let (Err(ConnectError::NoEndpoint(_) | ConnectError::Refused(..)), Some(f)) =
            (&result, fallback)
        {
            tracing::debug!(service = %svc.name, fallback = %f.name, "no endpoint accepts; using the fallback service");
            result = crate::tcp::connect_service(&f, &self.metrics).await;
            svc = f;
        }
        match result {
            Ok((mut upstream, slot)) => {
                let client_side = hyper::upgrade::on(&mut req);
                let idle = svc.idle_timeout.unwrap_or(crate::tcp::DEFAULT_TUNNEL_IDLE);
                let name = svc.name.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let Ok(client) = client_side.await else {
                        return;
                    };
                    let mut client = hyper_util::rt::TokioIo::new(client);
                    if let Err(e) = crate::tcp::tunnel(&mut client, &mut upstream, idle).await {
                        tracing::debug!(service = %name, error = %e, "CONNECT tunnel ended");
                    }
                });
                Response::new(crate::body::empty())
            }
            Err(e @ ConnectError::CircuitOpen(_)) => {
                MeshError::CircuitOpen.response(&e.to_string())
            }
            Err(e @ ConnectError::NoEndpoint(_)) => {
                MeshError::NoHealthyEndpoint.response(&e.to_string())
            }
            Err(e @ ConnectError::Refused(..)) => {
                MeshError::UpstreamConnectFailed.response(&e.to_string())
            }
        }
    }

    /// A WebSocket (or other HTTP/1.1 `Upgrade`) request: sent on a fresh
    /// connection; on `101 Switching Protocols` the two connections are
    /// joined into a tunnel until either side closes or it idles.
    async fn forward_upgrade(
        &self,
        svc: Arc<ServiceRt>,
        route: &CompiledRoute,
        timeout: Duration,
        idle: Option<Duration>,
        mut req: Request<RequestBody>,
    ) -> Response<ProxyBody> {
        if svc.wire != Wire::Http1 {
            return MeshError::BadRequest.response(&format!(
                "service {} is not HTTP/1.1: upgrades are not supported",
                svc.name
            ));
        }
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop_keep_upgrade(&mut parts.headers);
        let pq = upstream_target(route, &mut parts);
        let mut tried = Vec::new();
        while let Some(ep) = (tried.len() < self.opts.max_connect_attempts)
            .then(|| svc.balancer.pick(&tried))
            .flatten()
        {
            match upstream::upgrade(&ep, svc.connect_timeout, timeout, &pq, &parts).await {
                Ok((resp, upstream_side)) => {
                    let (mut rp, rb) = resp.into_parts();
                    if let Some(rw) = &route.rewrite {
                        rw.response_headers(&mut rp.headers);
                    }
                    if let Some(up) = upstream_side {
                        let idle = idle.unwrap_or(crate::tcp::DEFAULT_TUNNEL_IDLE);
                        let name = svc.name.clone();
                        tokio::spawn(async move {
                            let Ok(client) = client_side.await else {
                                return;
                            };
                            let mut client = hyper_util::rt::TokioIo::new(client);
                            let mut upstream = hyper_util::rt::TokioIo::new(up);
                            if let Err(e) =
                                crate::tcp::tunnel(&mut client, &mut upstream, idle).await
                            {
                                tracing::debug!(service = %name, error = %e, "upgraded connection ended");
                            }
                        });
                    }
                    drop(body);
                    return Response::from_parts(rp, rb);
                }
                Err(Attempt::Connect(error, _)) => {
                    self.connect_failed(&svc, &ep, &error);
                    tried.push(ep);
                }
                Err(Attempt::Timeout) => {
                    return MeshError::UpstreamTimeout
                        .response(&format!("no upgrade answer from {}", svc.name))
                }
                Err(Attempt::Exchange(e)) => {
                    return MeshError::UpstreamReset
                        .response(&format!("upstream {} failed: {e}", svc.name))
                }
                Err(Attempt::Overflow(o)) => return self.circuit_open(&svc.name, o),
            }
        }
        if tried.is_empty() {
            MeshError::NoHealthyEndpoint.response(&format!("service {} has no endpoints", svc.name))
        } else {
            MeshError::UpstreamConnectFailed
                .response(&format!("cannot connect to service {}", svc.name))
        }
    }
}

/// The path and query sent upstream, with the route's request rewrites
/// (path prefix, headers) applied.
fn upstream_target(route: &CompiledRoute, parts: &mut http::request::Parts) -> PathAndQuery {
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match &route.rewrite {
        Some(rw) => {
            rw.request_headers(&mut parts.headers);
            rw.path(&pq).unwrap_or(pq)
        }
        None => pq,
    }
}

/// A synthetic error answered to a gRPC call becomes a gRPC status
/// (trailers-only response) instead of a bare HTTP error.
fn grpc_error(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(err) = resp
        .headers()
        .get(crate::error::X_MESH_ERROR)
        .and_then(|v| MeshError::from_code(v.as_bytes()))
    else {
        return resp;
    };
    if resp.headers().contains_key("grpc-status") {
        return resp;
    }
    let message = format!("{} ({})", err.code(), resp.status());
    err.grpc_response(&message)
}

fn append_forwarded_for(h: &mut http::HeaderMap, ip: &HeaderValue) {
    const XFF: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
    match h.entry(XFF) {
        header::Entry::Vacant(e) => {
            e.insert(ip.clone());
        }
        header::Entry::Occupied(mut e) => {
            let Ok(prev) = e.get().to_str() else { return };
            let joined = format!("{prev}, {}", ip.to_str().unwrap_or(""));
            if let Ok(v) = HeaderValue::from_str(&joined) {
                e.insert(v);
            }
        }
    }
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
