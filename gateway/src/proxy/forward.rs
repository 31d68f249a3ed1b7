//! Forwarding an HTTP request to a service's endpoints, under the
//! service's circuit breaker, retry policy and timeouts:
//!
//! - the breaker admits the request (`max_requests`, else 503
//!   `circuit_open`); its slot is held until the response body ends;
//! - the body is made replayable when that is cheap; hop-by-hop headers
//!   are stripped and the route's rewrites applied;
//! - the attempt loop ([`super::attempts`]) walks the endpoints: a refused
//!   connection moves on (nothing was sent: any method; HTTP/1.1 hands
//!   the unsent request back, so even a streamed body can move on); after
//!   a request was sent, a reset, a per-try timeout or a status of the
//!   retry policy is resent elsewhere when the method allows it, the body
//!   was buffered, the retry budget and `max_retries` allow it, and the
//!   whole-request deadline is not past; every answer and every upstream
//!   failure feeds outlier detection;
//! - when no endpoint took it, the service's fallback service, once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Request, Response};

use super::attempts::{self, Attempt, Members, Step, Why};
use super::{prelude, Proxy};
use crate::http::body::{Guarded, ProxyBody, ReplayBody, RequestBody};
use crate::http::error::{Failure, MeshError, Side};
use crate::http::h2::Wire;
use crate::http::headers;
use crate::http::limit::Overflow;
use crate::metrics::Metrics;
use crate::observe::Trail;
use crate::policy::cache::{self, Lookup, ResponseCache};
use crate::routing::CompiledRoute;
use crate::snapshot::{ServiceRt, Snapshot};
use crate::upstream::attempt::{self, AttemptError, AttemptOpts};
use crate::upstream::endpoint::{EndpointState, Outcome};
use crate::upstream::resilience::{self, Retry, RetryPermit};

/// Where a request goes: the service, on which route, in which snapshot,
/// from which client.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    pub service: &'a Arc<ServiceRt>,
    pub route: &'a CompiledRoute,
    pub snapshot: &'a Snapshot,
    /// The client's address (what `hash_on.source_ip` hashes).
    pub client_ip: &'a HeaderValue,
    /// A deadline the caller set (a gRPC timeout), bounding the route's.
    pub deadline: Option<Duration>,
}

/// A request on its way to a service's endpoints: what every attempt
/// needs, and what the attempts change.
struct Sending<'a> {
    parts: &'a mut http::request::Parts,
    body: &'a mut ReplayBody,
    /// HTTP/1.1: the request itself, handed back unsent by a refused
    /// connect.
    unsent: Option<Request<ProxyBody>>,
    pq: PathAndQuery,
    retry: Option<Retry>,
    /// Whether a request already sent may be sent again (buffered body,
    /// method allowed by the retry policy).
    resendable: bool,
    /// The whole request's deadline, and its length.
    deadline: Instant,
    total: Duration,
    per_try: Duration,
    retries: u32,
    /// The retry in flight, counted under `max_retries` while it lasts.
    permit: Option<RetryPermit>,
    /// The access log's record of the tries, when the request is logged.
    trail: Option<&'a mut Trail>,
}

impl Proxy {
    /// Forwards an HTTP request (not an upgrade) to `dest`.
    pub(crate) async fn forward(
        &self,
        dest: Dest<'_>,
        req: Request<RequestBody>,
        trail: Option<&mut Trail>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let (mut parts, body) = req.into_parts();
        prelude::keep_host(&mut parts.headers, parts.uri.authority());
        let mut body = ReplayBody::new(body, &parts.headers, self.opts.replay_buffer_bytes)
            .await
            .map_err(|e| Failure::new(MeshError::BadRequest, e.to_string()))?;
        if let Some(m) = dest.route.policy.as_ref().and_then(|p| p.mirror()) {
            self.mirrors
                .copy(m, dest.snapshot, &parts, &body, &self.metrics);
        }
        let mut trail = trail;
        if let Some(t) = trail.as_deref_mut() {
            t.count_upload(&mut body);
        }
        self.forward_prepared(dest, parts, &mut body, trail).await
    }

    /// [`Proxy::forward`] through the route's response cache: a hit is
    /// answered from it; the first miss for a key goes upstream and stores
    /// what may be stored while the others wait for it. Keyed by the
    /// request's host and target.
    pub(crate) async fn forward_cached(
        &self,
        cache: &dyn ResponseCache,
        dest: Dest<'_>,
        req: Request<RequestBody>,
        trail: Option<&mut Trail>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let host = headers::request_host(req.headers(), req.uri().host()).unwrap_or_default();
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let key = cache::key(&host, pq);
        match cache.lookup(req.method(), req.headers(), &key).await {
            Lookup::Hit(resp) => Ok(*resp),
            Lookup::Bypass => Ok(cache::mark(self.forward(dest, req, trail).await?, "bypass")),
            Lookup::Miss(None) => Ok(cache::mark(self.forward(dest, req, trail).await?, "miss")),
            Lookup::Miss(Some(fetch)) => {
                let headers = req.headers().clone();
                let resp = self.forward(dest, req, trail).await?;
                cache
                    .store(fetch, &headers, resp)
                    .await
                    .map_err(|e| Failure::new(MeshError::UpstreamReset, e))
            }
        }
    }

    /// [`Proxy::forward`] of a request whose body is already read into a
    /// [`ReplayBody`]. A buffered body stays replayable afterwards, so a
    /// caller (the sidecar's direct tier) can send it on elsewhere when
    /// this fails. Each try is added to `trail` when given.
    pub async fn forward_prepared(
        &self,
        dest: Dest<'_>,
        mut parts: http::request::Parts,
        body: &mut ReplayBody,
        trail: Option<&mut Trail>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let primary = dest.service;
        let t = primary.timeouts(dest.route.timeouts.as_ref());
        let total = dest.deadline.map_or(t.total, |d| d.min(t.total));
        let admitted = match primary.breaker.max_requests {
            Some(_) => Some(
                resilience::admit(&primary.shared, &primary.breaker)
                    .map_err(|o| self.circuit_open(&primary.name, o))?,
            ),
            None => None,
        };
        headers::strip_hop_by_hop(&mut parts.headers);
        let pq = upstream_target(dest.route, &mut parts);
        let retry = dest.route.retry.or(primary.retry);
        if retry.is_some() {
            primary.shared.budget.record_request();
        }
        let resendable = body.replayable()
            && retry.is_some_and(|r| {
                r.attempts > 0
                    && r.method_allowed(&parts.method, headers::marked_retryable(&parts.headers))
            });
        let fallback = dest.snapshot.fallback_of(primary);
        // Consistent-hash keys, computed while the headers are at hand.
        let key_of = |s: &ServiceRt| {
            s.hash_on
                .as_ref()
                .and_then(|k| k.hash(&parts.headers, Some(dest.client_ip)))
        };
        let key = key_of(primary);
        let fallback_key = fallback.as_deref().and_then(key_of);
        let mut s = Sending {
            parts: &mut parts,
            body,
            unsent: None,
            pq,
            retry,
            resendable,
            deadline: Instant::now() + total,
            total,
            per_try: t.per_try,
            retries: 0,
            permit: None,
            trail,
        };
        let mut svc = primary;
        let mut sent = self.send(svc, key, fallback.is_some(), &mut s).await;
        if let (Err(f), Some(fb)) = (&sent, &fallback) {
            let have_request = s.unsent.is_some() || s.body.replayable();
            if attempts::use_fallback(f)
                && (have_request || f.reason == MeshError::NoHealthyEndpoint)
            {
                tracing::debug!(service = %svc.name, fallback = %fb.name, "no endpoint took the request; using the fallback service");
                svc = fb;
                sent = Box::pin(self.send(svc, fallback_key, false, &mut s)).await;
            }
        }
        let (mut rp, rb) = sent?.into_parts();
        headers::strip_hop_by_hop(&mut rp.headers);
        if let Some(rw) = &dest.route.rewrite {
            rw.response_headers(&mut rp.headers);
        }
        Ok(Response::from_parts(
            rp,
            Guarded::wrap(rb, t.idle, admitted),
        ))
    }

    /// Runs the attempt loop over `svc`'s endpoints.
    async fn send(
        &self,
        svc: &ServiceRt,
        key: Option<u64>,
        fallback_waits: bool,
        s: &mut Sending<'_>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let members = Members {
            what: "service",
            name: &svc.name,
            balancer: &svc.balancer,
            key,
            max_connects: self.opts.max_connect_attempts,
            revisit: true,
            skip_when_none_available: fallback_waits,
        };
        let mut http = HttpAttempt {
            proxy: self,
            svc,
            s,
        };
        attempts::run(members, &mut http).await
    }

    fn circuit_open(&self, service: &str, o: Overflow) -> Failure {
        self.metrics
            .resilience
            .with_label_values(&[service, "circuit_open"])
            .inc();
        Failure::new(
            MeshError::CircuitOpen,
            format!("service {service}: {} reached", o.as_str()),
        )
    }
}

/// One HTTP attempt of a [`Sending`] request on an endpoint of `svc`.
struct HttpAttempt<'a, 'b> {
    proxy: &'a Proxy,
    svc: &'a ServiceRt,
    s: &'a mut Sending<'b>,
}

impl Attempt for HttpAttempt<'_, '_> {
    type Answer = Response<ProxyBody>;

    async fn attempt(&mut self, ep: Arc<EndpointState>) -> Step<Response<ProxyBody>> {
        let (svc, s) = (self.svc, &mut *self.s);
        let left = s.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let msg = format!(
                "no response from {} within {} ms",
                svc.name,
                s.total.as_millis()
            );
            return Step::Failed(Failure::new(MeshError::UpstreamTimeout, msg).on(Side::Mesh));
        }
        // Keep a copy of the headers when the request may be sent again.
        let keep_copy = s.body.replayable() && (svc.wire == Wire::Http2 || s.resendable);
        let up = match s.unsent.take() {
            Some(r) => {
                // HTTP/2 hands nothing back on failure: keep a copy.
                if keep_copy && s.parts.headers.is_empty() {
                    s.parts.headers = r.headers().clone();
                }
                r
            }
            None => {
                let Some(attempt_body) = s.body.take() else {
                    let msg = format!(
                        "cannot connect to service {} and the request body cannot be replayed",
                        svc.name
                    );
                    let f = Failure::new(MeshError::UpstreamConnectFailed, msg).on(Side::Mesh);
                    return Step::Failed(f);
                };
                let mut up = Request::new(attempt_body);
                *up.method_mut() = s.parts.method.clone();
                *up.headers_mut() = if keep_copy {
                    s.parts.headers.clone()
                } else {
                    std::mem::take(&mut s.parts.headers)
                };
                up
            }
        };
        let opts = AttemptOpts {
            wire: svc.wire,
            h2: &svc.client,
            connect_timeout: svc.connect_timeout,
            timeout: s.per_try.min(left),
            track_load: svc.balancer.tracks_load(),
            conn_limit: svc.conn_limit(),
        };
        match attempt::attempt(&ep, opts, &s.pq, up).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                observe(&self.proxy.metrics, svc, &ep, Outcome::Status(status));
                if s.retry.is_some_and(|r| r.on_status(status)) {
                    Step::Retry(resp)
                } else {
                    Step::Done(resp)
                }
            }
            Err(AttemptError::Connect(e, back)) => {
                s.unsent = back.map(|b| *b);
                Step::Failed(AttemptError::Connect(e, None).into_failure(&svc.name, &ep))
            }
            Err(AttemptError::Overflow(o)) => Step::Failed(self.proxy.circuit_open(&svc.name, o)),
            Err(e) => Step::Failed(e.into_failure(&svc.name, &ep)),
        }
    }

    fn may_resend(&mut self, why: Why<'_>) -> bool {
        let (svc, s) = (self.svc, &mut *self.s);
        let Some(r) = &s.retry else { return false };
        let wanted = match why {
            Why::Answer => true,
            Why::Failed(f) => match f.reason {
                MeshError::UpstreamReset => r.on_reset,
                MeshError::UpstreamTimeout => r.on_per_try_timeout,
                _ => false,
            },
        };
        if !wanted || !s.resendable || s.retries >= r.attempts || Instant::now() >= s.deadline {
            return false;
        }
        let events = &self.proxy.metrics.resilience;
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
        s.permit = Some(permit);
        s.retries += 1;
        events.with_label_values(&[&svc.name, "retry"]).inc();
        tracing::debug!(service = %svc.name, retries = s.retries, "retrying on another endpoint");
        true
    }

    fn blame(&mut self, ep: &EndpointState, f: &Failure) {
        blame(&self.proxy.metrics, self.svc, ep, f);
    }

    fn trail(&mut self) -> Option<&mut Trail> {
        self.s.trail.as_deref_mut()
    }
}

/// Counts an upstream failure against the endpoint: a refused connect
/// ejects it for a while (and is counted), anything else feeds outlier
/// detection.
pub(crate) fn blame(metrics: &Metrics, svc: &ServiceRt, ep: &EndpointState, f: &Failure) {
    if f.reason == MeshError::UpstreamConnectFailed {
        ep.on_failure();
        metrics
            .connect_failures
            .with_label_values(&[&svc.name])
            .inc();
        tracing::debug!(service = %svc.name, endpoint = %ep.address, error = %f.message, "upstream connect failed");
    } else {
        tracing::debug!(service = %svc.name, endpoint = %ep.address, error = %f, "upstream request failed");
        observe(metrics, svc, ep, Outcome::GatewayFailure);
    }
}

/// Feeds an attempt's outcome to the service's outlier detection and
/// ejects the endpoint when it crosses a threshold (within the cap).
fn observe(metrics: &Metrics, svc: &ServiceRt, ep: &EndpointState, outcome: Outcome) {
    let Some(cfg) = &svc.outlier else { return };
    if ep.record_outcome(outcome, cfg) && svc.balancer.may_eject(cfg.max_ejection_percent) {
        ep.eject_outlier(cfg);
        metrics
            .resilience
            .with_label_values(&[&svc.name, "outlier_ejection"])
            .inc();
        tracing::warn!(service = %svc.name, endpoint = %ep.address, "endpoint ejected by outlier detection");
    }
}

/// The path and query sent upstream, with the route's request rewrites
/// (path prefix, headers) applied.
pub(crate) fn upstream_target(
    route: &CompiledRoute,
    parts: &mut http::request::Parts,
) -> PathAndQuery {
    let pq = prelude::target(&parts.uri);
    match &route.rewrite {
        Some(rw) => {
            rw.request_headers(&mut parts.headers);
            rw.path(&pq).unwrap_or(pq)
        }
        None => pq,
    }
}
