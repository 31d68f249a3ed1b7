//! The request path of a gateway listener. In order, for every request
//! (ARCHITECTURE.md lists the same steps; `scripts/check-docs.sh` keeps
//! the two lists equal):
//!
//! 1. ready? no config loaded yet → 503 `not_ready`
//! 2. prelude ([`prelude`]): the `Host` rule (none on HTTP/1.1, two, an
//!    invalid one, or one that disagrees with an HTTP/1 absolute-form
//!    target → 400 and a closed connection), a transfer coding other than `chunked` → 501
//!    `not_implemented`, `x-mesh-hops` + 1 (508 `loop_detected` over the
//!    limit), `x-request-id` and `traceparent` created when missing;
//!    on ingress listeners `x-mesh-source` and `x-mesh-caller` removed
//!    (never trusted from outside) and `x-forwarded-proto` set (`https`
//!    on the TLS ingress); on mesh and inbound listeners both set from
//!    the client's certificate (a sidecar's service and identity; a
//!    gateway's caller kept; removed without a verified identity);
//!    `x-forwarded-for` appended
//! 3. `CONNECT` (a sidecar's plain-TCP local port, mesh listeners only) →
//!    a TCP tunnel to the named service ([`tunnel`])
//! 4. route match on the listener's table (mesh: by `x-mesh-service` or
//!    host; a service named directly gets its implicit route; a sidecar's
//!    inbound: its own service's implicit route) → 404 `no_route`
//! 5. the route's edge policies ([`edge`]): its consumer authenticated
//!    (401 `unauthenticated` with `WWW-Authenticate`, 403 `forbidden` for
//!    a consumer the route does not take; `x-mesh-consumer` set), the
//!    route's and the consumer's rate limits (429 `rate_limited` with
//!    `Retry-After` and the `RateLimit` headers)
//! 6. a direct response, or a backend: the first backend rule whose
//!    conditions hold, else the weighted split (sticky by header or cookie
//!    hash when set) → the service (503 `no_healthy_endpoint` when it is
//!    not configured); the faults drawn for the rule or route (a delay;
//!    an abort with its status, `fault_injected`); the service's own rate
//!    limit (429); on mesh and inbound listeners, authorization of
//!    the caller's verified identity ([`authz`]) → 403 `forbidden`,
//!    never retried
//! 7. an `Upgrade` (WebSocket) → a fresh connection, `101` → a byte tunnel
//!    ([`tunnel`])
//! 8. forward ([`forward`]): a GET or HEAD answered from the route's
//!    cache when it holds a fresh answer (misses of one key coalesced);
//!    breaker admission (503 `circuit_open`), the body made replayable
//!    (and a share copied to the route's mirror, [`mirror`]), hop-by-hop
//!    headers stripped, rewrites; the
//!    attempt loop ([`attempts`]) over the service's endpoints (refused
//!    connects move on; resets, per-try timeouts and listed statuses are
//!    resent under the retry policy, budget and deadline; outcomes feed
//!    outlier detection); the fallback service when no endpoint took it
//! 9. the rescue: a [`Failure`] becomes its synthetic response, or a gRPC
//!    status for a gRPC call ([`Failure::into_response`])
//! 10. metrics per route and backend; the access log's record and the
//!     hop's span ([`crate::observe`]), handed over when the answer's body
//!     ends

pub mod attempts;
pub(crate) mod authz;
pub(crate) mod edge;
pub mod forward;
pub mod mirror;
pub mod prelude;
pub(crate) mod tcp;
pub mod tunnel;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use http::{Request, Response};
use http_body_util::Full;

use crate::http::body::{full, ProxyBody, RequestBody};
use crate::http::error::{Failure, MeshError};
use crate::http::headers;
use crate::metrics::{status_class, Metrics, RouteStats, NO_BACKEND};
use crate::observe::{Entry, Observer};
use crate::routing::{CompiledRoute, RequestView};
use crate::server::Peer;
use crate::snapshot::SharedSnapshot;
use forward::Dest;

/// Which table a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// North–south traffic: `scope: ingress` routes.
    Ingress,
    /// East–west traffic from sidecars: `scope: mesh` routes.
    Mesh,
    /// A sidecar's inbound: calls of its own service, whatever they name
    /// ([`Proxy::inbound`]).
    Inbound,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Ingress => "ingress",
            ListenerKind::Mesh => "mesh",
            ListenerKind::Inbound => "inbound",
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
    snapshot: SharedSnapshot,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    opts: ProxyOptions,
    /// The one service an inbound listener serves.
    inbound: Option<Arc<str>>,
    /// The access log and tracer, when the node has either.
    obs: Option<Arc<Observer>>,
    /// Mirrored copies in flight.
    mirrors: mirror::Mirrors,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("opts", &self.opts).finish()
    }
}

impl Proxy {
    /// A data plane over `snapshot`, serving once `ready` is set.
    pub fn new(
        snapshot: SharedSnapshot,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        opts: ProxyOptions,
    ) -> Proxy {
        Proxy {
            snapshot,
            ready,
            metrics,
            opts,
            inbound: None,
            obs: None,
            mirrors: Default::default(),
        }
    }

    /// Records the requests of this data plane in `obs` (access log,
    /// spans).
    pub fn with_observer(mut self, obs: Option<Arc<Observer>>) -> Proxy {
        self.obs = obs;
        self
    }

    /// The data plane of a sidecar's inbound listener: every request goes
    /// to `service` (the local app, as `snapshot` has it), after the
    /// authorization of the caller.
    pub fn inbound(mut self, service: &str) -> Proxy {
        self.inbound = Some(service.into());
        self
    }

    /// The snapshot this data plane reads.
    pub fn snapshot(&self) -> &SharedSnapshot {
        &self.snapshot
    }

    /// Handles one request end to end; never fails (a failure becomes its
    /// synthetic response at this edge).
    pub async fn handle(
        &self,
        kind: ListenerKind,
        peer: Peer,
        req: Request<RequestBody>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = headers::is_grpc(req.headers());
        let method = req.method().clone();
        let mut entry = self.obs.as_ref().and_then(|o| o.begin(kind.as_str()));
        if let Some(e) = entry.as_deref_mut() {
            e.request(&req);
            e.client = Some(peer.ip.clone());
        }
        let mut caller = None;
        let (result, route) = self
            .route_and_forward(kind, &peer, grpc, req, entry.as_deref_mut(), &mut caller)
            .await;
        // The rescue. A gRPC caller also gets an upstream mesh process's
        // own error (`x-mesh-error` crossing the process boundary) as a
        // gRPC status.
        let rescued = match result {
            Ok(resp) if grpc => Failure::from_answer(resp),
            other => other,
        };
        let resp = match rescued {
            Ok(resp) => resp,
            Err(f) => {
                if f.reason == MeshError::ClientAborted {
                    self.metrics.client_aborts.inc();
                }
                self.metrics
                    .mesh_errors
                    .with_label_values(&[kind.as_str(), f.reason.code()])
                    .inc();
                f.into_response(grpc)
            }
        };
        let status = resp.status().as_u16();
        let elapsed = start.elapsed().as_secs_f64();
        self.metrics.count_method(kind.as_str(), &method, status);
        match route {
            Some((route, backend)) => {
                let stats = route.stats.get_or_init(|| {
                    let backends: Vec<&str> = route.backends.iter().map(|b| &**b).collect();
                    RouteStats::new(&self.metrics, kind.as_str(), &route.name, &backends)
                });
                stats.count(backend, status);
                stats.duration.observe(elapsed);
                if let (Some(caller), Some(dest)) = (&caller, route.backends.get(backend)) {
                    self.metrics.mesh_call(caller, dest, status, elapsed);
                }
            }
            None => {
                let mut code = itoa::Buffer::new();
                self.metrics
                    .requests
                    .with_label_values(&[
                        kind.as_str(),
                        "",
                        "",
                        status_class(status),
                        code.format(status),
                    ])
                    .inc();
                self.metrics
                    .duration
                    .with_label_values(&[kind.as_str(), ""])
                    .observe(elapsed);
            }
        }
        match (entry, &self.obs) {
            (Some(e), Some(obs)) => obs.respond(e, resp),
            _ => resp,
        }
    }

    /// The response or the failure, the route and backend index it is
    /// counted under, and its caller.
    async fn route_and_forward(
        &self,
        kind: ListenerKind,
        peer: &Peer,
        grpc: bool,
        mut req: Request<RequestBody>,
        mut entry: Option<&mut Entry>,
        caller: &mut Option<Arc<str>>,
    ) -> (
        Result<Response<ProxyBody>, Failure>,
        Option<(Arc<CompiledRoute>, usize)>,
    ) {
        // 1. ready?
        if !self.ready.load(Ordering::Acquire) {
            let f = Failure::new(MeshError::NotReady, "no config loaded yet");
            return (Err(f), None);
        }
        let snap = self.snapshot.load_full();
        // 2. prelude
        if let Err(f) = prelude::check(&req) {
            return (Err(f), None);
        }
        let h = req.headers_mut();
        let had_traceparent = h.contains_key(&headers::TRACEPARENT);
        if let Err(f) = prelude::stamp(h, self.opts.max_hops) {
            return (Err(f), None);
        }
        if kind == ListenerKind::Ingress {
            h.remove(&headers::X_MESH_SOURCE);
            h.remove(&headers::X_MESH_CALLER);
            h.remove(&headers::X_MESH_CONSUMER);
            prelude::forwarded_proto(h, peer.tls.is_some());
        } else {
            prelude::source_from_identity(h, peer.tls.as_deref());
            // The calling service, for the caller → destination metrics:
            // a configured service's name, else `unknown` (bounded).
            let source = h.get(&headers::X_MESH_SOURCE).and_then(|v| v.to_str().ok());
            *caller = Some(match source.and_then(|s| snap.services.get_key_value(s)) {
                Some((name, _)) => name.clone(),
                None => UNKNOWN_CALLER.clone(),
            });
        }
        prelude::forwarded_for(h, &peer.ip);
        if let (Some(e), Some(obs)) = (entry.as_deref_mut(), &self.obs) {
            obs.enter(e, h, had_traceparent);
        }

        let uri_host = req.uri().host().map(str::to_string);
        // 3. CONNECT. Boxed, here and for upgrades: a rare path's future
        // would otherwise widen every request's future (copied when it is
        // created and moved).
        if req.method() == http::Method::CONNECT {
            let connect = self.connect(kind, &snap, uri_host.as_deref(), req);
            return (Box::pin(connect).await, None);
        }
        // 4. route match
        let (router, host) = match kind {
            ListenerKind::Mesh => (
                &snap.mesh,
                headers::destination(req.headers(), uri_host.as_deref()),
            ),
            ListenerKind::Ingress => (
                &snap.ingress,
                headers::request_host(req.headers(), uri_host.as_deref()),
            ),
            // No routes: the implicit route of the inbound's service.
            ListenerKind::Inbound => (&snap.mesh, self.inbound.as_deref().map(Into::into)),
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
                (ListenerKind::Mesh | ListenerKind::Inbound, Some(svc)) => {
                    svc.implicit_route.clone()
                }
                _ => {
                    let msg = format!(
                        "no {} route for {} {}{}",
                        kind.as_str(),
                        req.method(),
                        host,
                        path
                    );
                    return (Err(Failure::new(MeshError::NoRoute, msg)), None);
                }
            },
        };
        if let Some(e) = entry.as_deref_mut() {
            e.route = Some(route.name.clone());
        }
        // 5. the route's edge policies
        let mut consumer = None;
        if let Some(policy) = &route.policy {
            match policy.admit(snap.consumers.as_ref(), peer.ip.as_bytes(), grpc, &mut req) {
                Ok(c) => consumer = c,
                Err(f) => return (Err(f), Some((route, NO_BACKEND))),
            }
            if let Some(e) = entry.as_deref_mut() {
                e.consumer.clone_from(&consumer);
            }
        }
        // 6. direct response, or a backend; the faults drawn for it
        if let Some((status, body, ctype)) = &route.direct {
            if let Some(p) = &route.policy {
                if let Err(f) = edge::inject(&**p, None, grpc, req.headers()).await {
                    return (Err(f), Some((route, 0)));
                }
            }
            let mut resp = Response::new(full(Full::new(body.clone())));
            *resp.status_mut() = *status;
            if let Some(c) = ctype {
                resp.headers_mut().insert(header::CONTENT_TYPE, c.clone());
            }
            return (Ok(resp), Some((route, 0)));
        }
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let Some((index, backend)) = route.pick_backend(&view) else {
            let f = Failure::new(
                MeshError::NoHealthyEndpoint,
                "route has no weighted backend",
            );
            return (Err(f), None);
        };
        if let Some(e) = entry.as_deref_mut() {
            e.service = Some(backend.to_string());
        }
        let Some(svc) = snap.services.get(&**backend).cloned() else {
            let msg = format!("service {backend} is not configured");
            let f = Failure::new(MeshError::NoHealthyEndpoint, msg);
            return (Err(f), Some((route, index)));
        };
        if let Some(p) = &route.policy {
            if let Err(f) = edge::inject(&**p, route.rule_of(index), grpc, req.headers()).await {
                return (Err(f), Some((route, index)));
            }
        }
        if let (Some(limit), false) = (&svc.limit, kind == ListenerKind::Inbound) {
            let input = crate::policy::limit::KeyInput {
                consumer: consumer.as_deref(),
                client_ip: peer.ip.as_bytes(),
                headers: req.headers(),
            };
            if let Err(f) = edge::check(&**limit, &input, grpc) {
                return (Err(f), Some((route, index)));
            }
        }
        // authorization by identity (mesh listeners, a sidecar's inbound)
        if kind != ListenerKind::Ingress && snap.authz_active {
            if let Err(f) = authz::check(&snap, &svc, peer, req.headers()) {
                self.metrics
                    .authz_denied
                    .with_label_values(&[&svc.name])
                    .inc();
                tracing::info!(error = %f.message, "call refused by authorization");
                return (Err(f), Some((route, index)));
            }
        }
        // A gRPC caller's deadline bounds the whole request.
        let deadline = if grpc {
            headers::grpc_timeout(req.headers())
        } else {
            None
        };
        // 7. upgrade
        if !req.body().is_whole() && headers::is_upgrade(req.headers()) {
            let t = svc.timeouts(route.timeouts.as_ref());
            let total = deadline.map_or(t.total, |d| d.min(t.total));
            let upgrade = self.forward_upgrade(svc, &route, total, t.idle, req);
            return (Box::pin(upgrade).await, Some((route, index)));
        }
        // 8. forward
        let dest = Dest {
            service: &svc,
            route: &route,
            snapshot: &snap,
            client_ip: &peer.ip,
            deadline,
        };
        let trail = entry.map(|e| &mut e.trail);
        let result = match route.policy.as_ref().and_then(|p| p.cache()) {
            // Boxed: the cache's path would widen every request's future.
            Some(cache) => Box::pin(self.forward_cached(cache, dest, req, trail)).await,
            None => self.forward(dest, req, trail).await,
        };
        (result, Some((route, index)))
    }
}

/// The caller label of a call whose source is not a configured service.
static UNKNOWN_CALLER: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| "unknown".into());

/// Default timeouts of the proxy path.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
