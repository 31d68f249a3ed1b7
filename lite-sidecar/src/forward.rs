//! The sidecar's request path and fail-over chain.
//!
//! 1. the engine's `Host` rule (400 and a closed connection for a missing,
//!    doubled, invalid or disagreeing `Host`) and transfer-coding rule
//!    (501 for a coding other than `chunked`); destination:
//!    `x-mesh-service`, else `Host` (`svc` or `svc.mesh`) → 400
//!    `no_destination`
//! 2. the engine's prelude (`x-mesh-hops` + 1, 508 over the limit; ids),
//!    `x-mesh-source` = own service
//! 3. tiers: local policy available and the destination covered by it →
//!    [direct (destinations in `direct` mode), group egress gateways,
//!    central]; otherwise (no policy, too stale, destination not covered)
//!    → [central]. The direct tier is the gateway's own forwarding path
//!    over the destination's endpoints (health checks, outlier ejection,
//!    breakers, retries, timeouts from the destination's config), and its
//!    failures come back as typed values, not headers.
//! 4. within a tier, the engine's attempt loop
//!    ([`meshgate_gateway::proxy::attempts`]) tries members in weighted
//!    round robin, ejected members skipped: a refused connection moves to
//!    the next member (any method: nothing was sent); a broken exchange
//!    does so only for idempotent or `x-mesh-retryable: true` requests with
//!    a replayable body; a timeout ends the request. A small answer
//!    (`content-length` within the replay buffer) to a request that may be
//!    resent is read whole first, so a member dying mid-body costs a
//!    resend, not a broken body
//! 5. a tier's failure, or a gateway's own error (`x-mesh-error`, read back
//!    into a failure where it crosses the process boundary), moves the
//!    request to the next tier by the engine's rule
//!    ([`meshgate_gateway::proxy::attempts::next_tier`]): any request when
//!    nothing was sent on, idempotent or retryable ones otherwise; an app's
//!    own 5xx never does, nor a gateway's `forbidden` (the caller may
//!    not make the call, whichever tier it reaches)
//! 6. the rescue: a failure becomes its synthetic response (a gRPC status
//!    for a gRPC call)
//! 7. metrics by tier and destination; the answer says which tier served
//!    it (`x-mesh-tier`); the access log's record (every tier and member
//!    tried, and why it moved on) and the hop's span, handed over when the
//!    answer's body ends

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use meshgate_config::model::now_ms;
use meshgate_config::model::DestinationMode;
use meshgate_config::sync::{Source, SyncStatus};
use meshgate_gateway::http::body::{ProxyBody, ReplayBody, RequestBody};
use meshgate_gateway::http::error::{Failure, MeshError, Side, X_MESH_ERROR};
use meshgate_gateway::http::h2::{HttpClient, Wire};
use meshgate_gateway::http::headers;
use meshgate_gateway::http::tunnel::{self, DEFAULT_TUNNEL_IDLE};
use meshgate_gateway::metrics::{status_class, Metrics};
use meshgate_gateway::observe::{Entry, Observer, Trail};
use meshgate_gateway::proxy::attempts::{self, Attempt, Members, Resend, Step, Why};
use meshgate_gateway::proxy::forward::Dest;
use meshgate_gateway::proxy::tunnel::connect_service;
use meshgate_gateway::proxy::{prelude, Proxy};
use meshgate_gateway::upstream::attempt::{self, AttemptError, AttemptOpts, Switched};
use meshgate_gateway::upstream::endpoint::EndpointState;
use tokio::sync::watch;

use crate::policy::{Policy, SharedPolicy, Tier};

/// Freshness of the local policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Watching the store.
    Fresh,
    /// Store unreachable; policy within the staleness bound.
    Stale,
    /// No policy, or older than the bound.
    Unavailable,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::Unavailable => "unavailable",
        }
    }
}

/// Computes freshness from the sync status and the staleness bound.
pub fn freshness(s: &SyncStatus, max_staleness: Duration) -> Freshness {
    match s.source {
        Source::None => Freshness::Unavailable,
        _ if s.connected => Freshness::Fresh,
        _ => {
            let age = now_ms().saturating_sub(s.last_sync_ms);
            if age <= max_staleness.as_millis() as u64 {
                Freshness::Stale
            } else {
                Freshness::Unavailable
            }
        }
    }
}

pub struct Forwarder {
    pub service: HeaderValue,
    pub policy: SharedPolicy,
    pub status: watch::Receiver<SyncStatus>,
    pub default_staleness: Duration,
    /// Connect timeout to a member (HTTP/1.1 goes through each member's
    /// connection pool).
    pub connect_timeout: Duration,
    /// The HTTP/2 client, for apps speaking HTTP/2.
    pub h2: HttpClient,
    pub metrics: Arc<Metrics>,
    pub max_hops: u32,
    pub replay_buffer_bytes: usize,
    pub request_timeout: Duration,
    /// The direct tier: a gateway data plane over the direct destinations.
    pub direct: Proxy,
    /// The access log and tracer, when the sidecar has either.
    pub obs: Option<Arc<Observer>>,
}

/// The client address the direct tier hashes on (`hash_on.source_ip`).
static LOOPBACK: HeaderValue = HeaderValue::from_static("127.0.0.1");

impl Forwarder {
    pub fn freshness(&self) -> Freshness {
        let policy = self.policy.load();
        let bound = policy
            .group
            .as_ref()
            .and_then(|g| g.max_policy_staleness_s)
            .map(Duration::from_secs)
            .unwrap_or(self.default_staleness);
        freshness(&self.status.borrow(), bound)
    }

    pub async fn handle(&self, req: Request<RequestBody>) -> Response<ProxyBody> {
        let start = std::time::Instant::now();
        let grpc = headers::is_grpc(req.headers());
        let method = req.method().clone();
        let mut entry = self.obs.as_ref().and_then(|o| o.begin("app"));
        if let Some(e) = entry.as_deref_mut() {
            e.request(&req);
            e.client = Some(LOOPBACK.clone());
        }
        let (result, dest, tier) = self.forward(req, entry.as_deref_mut()).await;
        if let Err(f) = &result {
            if f.reason == MeshError::ClientAborted {
                self.metrics.client_aborts.inc();
            }
            self.metrics
                .mesh_errors
                .with_label_values(&["app", f.reason.code()])
                .inc();
        }
        // The rescue: a failure becomes its synthetic response here (the
        // direct tier's marked with its tier, as gateways mark theirs).
        let resp = match result {
            Ok(resp) => resp,
            Err(f) if tier == "direct" => tag_tier(f.into_response(grpc), tier),
            Err(f) => f.into_response(grpc),
        };
        let status = resp.status().as_u16();
        self.metrics.count_method("app", &method, status);
        let mut code = itoa::Buffer::new();
        let label = self.destination_label(&dest);
        self.metrics
            .sidecar_requests
            .with_label_values(&[label, tier, status_class(status), code.format(status)])
            .inc();
        self.metrics
            .sidecar_duration
            .with_label_values(&[label, tier])
            .observe(start.elapsed().as_secs_f64());
        match (entry, &self.obs) {
            (Some(mut e), Some(obs)) => {
                e.tier = (!tier.is_empty()).then_some(tier);
                e.service = (!dest.is_empty()).then_some(dest);
                obs.respond(e, resp)
            }
            _ => resp,
        }
    }

    /// `dest` as a metric label: a destination the policy or the direct
    /// tier knows, else `other` (the app names destinations; the labels
    /// stay bounded by the config).
    pub fn destination_label<'d>(&self, dest: &'d str) -> &'d str {
        let known = self.policy.load().destinations.contains_key(dest)
            || self.direct.snapshot().load().services.contains_key(dest);
        if known {
            dest
        } else {
            "other"
        }
    }

    /// Names the destination and stamps the mesh headers: the engine's
    /// prelude (hops, ids), then `x-mesh-service`, `x-mesh-source` and
    /// `host`. A failure comes with the destination named, if any.
    fn prelude(&self, req: &mut Request<RequestBody>) -> Result<String, (Failure, String)> {
        if let Err(f) = prelude::check(req) {
            return Err((f, String::new()));
        }
        let Some(dest) =
            headers::destination(req.headers(), req.uri().host()).map(|d| d.into_owned())
        else {
            let msg = "name the destination with Host: <service> or x-mesh-service";
            return Err((Failure::new(MeshError::NoDestination, msg), String::new()));
        };
        let authority = req.uri().authority().cloned();
        let h = req.headers_mut();
        if let Err(f) = prelude::stamp(h, self.max_hops) {
            return Err((f, dest));
        }
        if let Ok(v) = HeaderValue::from_str(&dest) {
            h.insert(headers::X_MESH_SERVICE, v);
        }
        h.insert(headers::X_MESH_SOURCE, self.service.clone());
        h.remove(&headers::X_MESH_CALLER);
        prelude::keep_host(h, authority.as_ref());
        Ok(dest)
    }

    /// The destination's mode (`None`: policy unavailable or destination
    /// not covered) and the gateway tiers to try, in order.
    fn tiers<'p>(
        &self,
        policy: &'p Policy,
        dest: &str,
    ) -> (Option<DestinationMode>, impl Iterator<Item = &'p Tier>) {
        let mode = match self.freshness() {
            Freshness::Unavailable => None,
            _ => policy.destinations.get(dest).copied(),
        };
        let group = mode.map(|_| &policy.group_tier);
        let tiers = group.into_iter().chain([&policy.central_tier]);
        (mode, tiers.filter(|t| !t.members.is_empty()))
    }

    /// The fail-over chain for an HTTP request: the direct tier (the
    /// gateway's own forwarding path, in process), then each gateway tier
    /// through the attempt loop; from one tier to the next by
    /// [`attempts::next_tier`].
    async fn forward(
        &self,
        mut req: Request<RequestBody>,
        entry: Option<&mut Entry>,
    ) -> (Result<Response<ProxyBody>, Failure>, String, &'static str) {
        let had_traceparent = req.headers().contains_key(&headers::TRACEPARENT);
        let dest = match self.prelude(&mut req) {
            Ok(d) => d,
            Err((f, dest)) => return (Err(f), dest, ""),
        };
        let mut trail = match (entry, &self.obs) {
            (Some(e), Some(obs)) => {
                obs.enter(e, req.headers_mut(), had_traceparent);
                Some(&mut e.trail)
            }
            _ => None,
        };
        if !req.body().is_whole() && headers::is_upgrade(req.headers()) {
            return Box::pin(self.forward_upgrade(req, dest)).await;
        }
        let (mut parts, body) = req.into_parts();
        let method_ok =
            headers::idempotent(&parts.method) || headers::marked_retryable(&parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers);
        let mut body = match ReplayBody::new(body, &parts.headers, self.replay_buffer_bytes).await {
            Ok(b) => b,
            Err(e) => {
                return (
                    Err(Failure::new(MeshError::BadRequest, e.to_string())),
                    dest,
                    "",
                )
            }
        };
        if let Some(t) = trail.as_deref_mut() {
            t.count_upload(&mut body);
        }
        let pq = prelude::target(&parts.uri);
        // The app's protocol is kept on the way to the gateway.
        let wire = if parts.version == Version::HTTP_2 {
            Wire::Http2
        } else {
            Wire::Http1
        };
        let mut s = Sending {
            parts,
            body,
            unsent: None,
            pq,
            wire,
            method_ok,
        };
        let policy = self.policy.load_full();
        let (mode, tiers) = self.tiers(&policy, &dest);
        // The last error a tier answered (the direct tier's, or a
        // gateway's own), which the app gets when no tier serves it.
        let mut answered: Option<(Failure, &'static str)> = None;
        let mut tried_any = false;
        if mode == Some(DestinationMode::Direct) {
            if let Some(result) = self.direct(&dest, &mut s, trail.as_deref_mut()).await {
                tried_any = true;
                match result {
                    Ok(resp) => return (Ok(resp), dest, "direct"),
                    Err(Broken(f)) => {
                        if let Some(t) = trail.as_deref_mut() {
                            t.last_failed(f.reason.code());
                        }
                        self.failed_over("direct");
                        tracing::debug!(service = %dest, error = %f, "endpoint broke off its answer; next tier")
                    }
                    Err(Answered(f)) if !attempts::next_tier(&f, s.resend()) => {
                        return (Err(f), dest, "direct")
                    }
                    Err(Answered(f)) => {
                        tracing::debug!(service = %dest, error = %f, "direct tier failed; next tier");
                        self.failed_over("direct");
                        answered = Some((f, "direct"));
                    }
                }
            }
        }
        for tier in tiers {
            tried_any = true;
            let mut member = MemberAttempt {
                fwd: self,
                tier,
                s: &mut s,
                trail: trail.as_deref_mut(),
            };
            let members = Members::all("tier", tier.name, &tier.members);
            // A gateway's own mesh error is a failure of its tier.
            let result = attempts::run(members, &mut member).await;
            let answered_ok = result.is_ok();
            let f = match result.and_then(Failure::from_answer) {
                Ok(resp) => return (Ok(resp), dest, tier.name),
                Err(f) => f,
            };
            if let (true, Some(t)) = (answered_ok, trail.as_deref_mut()) {
                t.last_failed(f.reason.code());
            }
            let spent = own_timeout(&f);
            if spent || !attempts::next_tier(&f, s.resend()) {
                return match (f.answer.is_some() || spent, answered) {
                    (false, Some((last, tier))) if f.side == Side::Mesh => (Err(last), dest, tier),
                    _ => (Err(f), dest, tier.name),
                };
            }
            tracing::debug!(tier = tier.name, error = %f, "tier failed; next tier");
            self.failed_over(tier.name);
            if f.answer.is_some() {
                answered = Some((f, tier.name));
            }
        }
        match answered {
            Some((f, tier)) => (Err(f), dest, tier),
            None if tried_any => {
                let msg = "no gateway tier could be reached";
                (
                    Err(Failure::new(MeshError::UpstreamConnectFailed, msg)),
                    dest,
                    "",
                )
            }
            None => {
                let msg = "no gateway tier is known (no policy and no central bootstrap)";
                (
                    Err(Failure::new(MeshError::UpstreamConnectFailed, msg)),
                    dest,
                    "",
                )
            }
        }
    }

    /// The direct tier: the gateway's forwarding path over `dest`'s
    /// endpoints, in process. `None` when the tier does not know `dest`.
    async fn direct(
        &self,
        dest: &str,
        s: &mut Sending,
        trail: Option<&mut Trail>,
    ) -> Option<Result<Response<ProxyBody>, DirectFailure>> {
        let snap = self.direct.snapshot().load_full();
        let svc = snap.services.get(dest).cloned()?;
        let mut copy = Request::new(());
        *copy.method_mut() = s.parts.method.clone();
        *copy.uri_mut() = s.parts.uri.clone();
        *copy.version_mut() = s.parts.version;
        *copy.headers_mut() = s.parts.headers.clone();
        let deadline = headers::is_grpc(&s.parts.headers)
            .then(|| headers::grpc_timeout(&s.parts.headers))
            .flatten();
        let route = svc.implicit_route.clone();
        let to = Dest {
            service: &svc,
            route: &route,
            snapshot: &snap,
            client_ip: &LOOPBACK,
            deadline,
        };
        let sent = self
            .direct
            .forward_prepared(to, copy.into_parts().0, &mut s.body, trail)
            .await;
        Some(match sent {
            Ok(resp) => {
                let may_resend = s.method_ok && s.body.replayable();
                let settled = self.settle(tag_tier(resp, "direct"), may_resend).await;
                settled.map_err(Broken)
            }
            Err(f) => Err(Answered(f)),
        })
    }

    /// An HTTP/1.1 `Upgrade` (WebSocket): sent to the gateway tiers on a
    /// fresh connection per attempt (a refused or broken connection, or a
    /// mesh error, moves it on: nothing has been tunnelled yet); on `101`
    /// the app's connection and the gateway's are joined into a tunnel.
    /// Upgrades skip the direct tier.
    async fn forward_upgrade(
        &self,
        mut req: Request<RequestBody>,
        dest: String,
    ) -> (Result<Response<ProxyBody>, Failure>, String, &'static str) {
        let client = hyper::upgrade::on(&mut req);
        let (mut parts, _body) = req.into_parts();
        headers::strip_hop_by_hop_keep_upgrade(&mut parts.headers);
        let pq = prelude::target(&parts.uri);
        let policy = self.policy.load_full();
        let (_, tiers) = self.tiers(&policy, &dest);
        // Nothing has been tunnelled yet: any failure may move on.
        let anything = Resend {
            body: true,
            method: true,
        };
        let mut last: Option<(Failure, &'static str)> = None;
        for tier in tiers {
            let mut member = Switch {
                fwd: self,
                tier,
                target: SwitchTo::Upgrade(&pq, &parts),
            };
            let result =
                attempts::run(Members::all("tier", tier.name, &tier.members), &mut member).await;
            let f = match result {
                Ok((resp, Some(up))) => {
                    let idle = DEFAULT_TUNNEL_IDLE;
                    tunnel::spawn(client, TokioIo::new(up), idle, dest.as_str().into(), ());
                    return (Ok(tag_tier(resp, tier.name)), dest, tier.name);
                }
                Ok((resp, None)) => match Failure::from_answer(tag_tier(resp, tier.name)) {
                    Ok(resp) => return (Ok(resp), dest, tier.name),
                    Err(f) => f,
                },
                Err(f) => f,
            };
            let spent = own_timeout(&f);
            if spent || !attempts::next_tier(&f, anything) {
                return (Err(f), dest, tier.name);
            }
            // Only an answered error is kept for the app; refusals are not.
            if f.answer.is_some() {
                last = Some((f, tier.name));
            }
        }
        match last {
            Some((f, tier)) => (Err(f), dest, tier),
            None => {
                let f = Failure::new(
                    MeshError::UpstreamConnectFailed,
                    "no gateway tier could be reached",
                );
                (Err(f), dest, "")
            }
        }
    }

    /// A connection on a plain-TCP local port for `dest`: joined to an
    /// endpoint of `dest` (direct mode), else to an HTTP `CONNECT` tunnel
    /// through the gateway tiers. Nothing has been read from the app
    /// before the tunnel stands, so any failure moves on to the next
    /// member or tier. Returns, once the tunnel has ended, the tier that
    /// carried it; an error when no tier could open one.
    pub async fn tcp(
        &self,
        dest: &str,
        mut client: tokio::net::TcpStream,
    ) -> Result<&'static str, String> {
        let policy = self.policy.load_full();
        let (mode, tiers) = self.tiers(&policy, dest);
        if mode == Some(DestinationMode::Direct) {
            let snap = self.direct.snapshot().load_full();
            if let Some(svc) = snap.services.get(dest).cloned() {
                drop(snap);
                match connect_service(&svc, &self.metrics).await {
                    Ok((mut up, _slot)) => {
                        let idle = svc.idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE);
                        if let Err(e) = tunnel::tunnel(&mut client, &mut up, idle).await {
                            tracing::debug!(service = %dest, error = %e, "tcp tunnel ended");
                        }
                        return Ok("direct");
                    }
                    Err(f) => {
                        tracing::debug!(service = %dest, error = %f, "direct tcp connect failed; next tier")
                    }
                }
            }
        }
        let mut h = http::HeaderMap::new();
        let dest_value = HeaderValue::from_str(dest).map_err(|e| e.to_string())?;
        h.insert(header::HOST, dest_value.clone());
        h.insert(headers::X_MESH_SERVICE, dest_value);
        h.insert(headers::X_MESH_SOURCE, self.service.clone());
        prelude::stamp(&mut h, self.max_hops).map_err(|f| f.to_string())?;
        let authority = format!("{dest}:0");
        for tier in tiers {
            let mut member = Switch {
                fwd: self,
                tier,
                target: SwitchTo::Connect(&authority, &h),
            };
            let result =
                attempts::run(Members::all("tier", tier.name, &tier.members), &mut member).await;
            match result {
                Ok((_, Some(up))) => {
                    let mut up = TokioIo::new(up);
                    let idle = DEFAULT_TUNNEL_IDLE;
                    if let Err(e) = tunnel::tunnel(&mut client, &mut up, idle).await {
                        tracing::debug!(service = %dest, error = %e, "tcp tunnel ended");
                    }
                    return Ok(tier.name);
                }
                Ok((resp, None)) => {
                    let why = resp
                        .headers()
                        .get(X_MESH_ERROR)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("refused")
                        .to_string();
                    tracing::debug!(tier = tier.name, status = %resp.status(), %why, "CONNECT refused; next tier");
                }
                Err(f) => {
                    tracing::debug!(tier = tier.name, error = %f, "no member took the tunnel; next tier")
                }
            }
        }
        Err(format!("no tier could open a tunnel to {dest}"))
    }

    /// A request moves from `tier` to the next one.
    fn failed_over(&self, tier: &str) {
        self.metrics
            .sidecar_failovers
            .with_label_values(&[tier])
            .inc();
    }

    /// A member failed: ejected for a while, and a failed connect counted.
    fn member_failed(&self, tier: &Tier, member: &EndpointState, f: &Failure) {
        if f.reason == MeshError::UpstreamConnectFailed && !f.sent {
            self.metrics
                .connect_failures
                .with_label_values(&[tier.name])
                .inc();
        }
        tracing::debug!(tier = tier.name, member = %member.address, error = %f, "gateway member failed");
        member.on_failure();
    }

    /// When `may_resend`, reads an answer whose announced body fits the
    /// replay buffer into memory, so that a body broken off by a dying
    /// member is found here, where the request can still be sent again.
    /// Streams (no length, or larger) pass through untouched.
    async fn settle(
        &self,
        resp: Response<ProxyBody>,
        may_resend: bool,
    ) -> Result<Response<ProxyBody>, Failure> {
        let small = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= self.replay_buffer_bytes);
        if !may_resend || !small || hyper::body::Body::is_end_stream(resp.body()) {
            return Ok(resp);
        }
        let (parts, body) = resp.into_parts();
        // Usually the whole body came with the head: try once without
        // arming a timer, and wait under the timeout only when it did not.
        let mut collect = std::pin::pin!(body.collect());
        let first = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::future::Future::poll(collect.as_mut(), &mut cx)
        };
        let read = match first {
            std::task::Poll::Ready(r) => Ok(r),
            std::task::Poll::Pending => tokio::time::timeout(self.request_timeout, collect).await,
        };
        let broken = |why: String| {
            let msg = format!("the answer broke off: {why}");
            Failure::new(MeshError::UpstreamReset, msg)
        };
        match read {
            Ok(Ok(c)) => Ok(Response::from_parts(
                parts,
                meshgate_gateway::http::body::full(http_body_util::Full::new(c.to_bytes())),
            )),
            Ok(Err(e)) => Err(broken(e.to_string())),
            Err(_) => Err(broken(
                "body not complete within the request timeout".into(),
            )),
        }
    }
}

/// How the direct tier failed.
enum DirectFailure {
    /// Its forwarding path failed: the tier's answer.
    Answered(Failure),
    /// An endpoint broke off an answer that was being read whole (only
    /// for a request that may be sent again).
    Broken(Failure),
}

use DirectFailure::{Answered, Broken};

/// An HTTP request on its way through the tiers: what every attempt
/// needs, and what the attempts change.
struct Sending {
    parts: http::request::Parts,
    body: ReplayBody,
    /// HTTP/1.1: the request itself, handed back unsent by a refused
    /// connect.
    unsent: Option<Request<ProxyBody>>,
    pq: PathAndQuery,
    wire: Wire,
    /// Idempotent, or marked `x-mesh-retryable`.
    method_ok: bool,
}

impl Sending {
    /// What the request still allows.
    fn resend(&self) -> Resend {
        Resend {
            body: self.unsent.is_some() || self.body.replayable(),
            method: self.method_ok,
        }
    }
}

/// One try of a [`Sending`] request on a member of a gateway tier.
struct MemberAttempt<'a> {
    fwd: &'a Forwarder,
    tier: &'a Tier,
    s: &'a mut Sending,
    trail: Option<&'a mut Trail>,
}

impl Attempt for MemberAttempt<'_> {
    type Answer = Response<ProxyBody>;

    async fn attempt(&mut self, member: Arc<EndpointState>) -> Step<Response<ProxyBody>> {
        let (fwd, s) = (self.fwd, &mut *self.s);
        let up = match s.unsent.take() {
            Some(r) => r,
            None => {
                let Some(body) = s.body.take() else {
                    let msg = "the request body cannot be replayed";
                    let f = Failure::new(MeshError::UpstreamConnectFailed, msg).on(Side::Mesh);
                    return Step::Failed(f);
                };
                let mut up = Request::new(body);
                *up.method_mut() = s.parts.method.clone();
                *up.headers_mut() = s.parts.headers.clone();
                up
            }
        };
        let opts = AttemptOpts {
            wire: s.wire,
            h2: &fwd.h2,
            connect_timeout: fwd.connect_timeout,
            timeout: fwd.request_timeout,
            track_load: false,
            conn_limit: None,
        };
        let resp = match attempt::attempt(&member, opts, &s.pq, up).await {
            Ok(resp) => resp,
            Err(AttemptError::Connect(e, back)) => {
                s.unsent = back.map(|b| *b);
                let e = AttemptError::Connect(e, None);
                return Step::Failed(e.into_failure(self.tier.name, &member));
            }
            Err(e) => return Step::Failed(e.into_failure(self.tier.name, &member)),
        };
        let (mut rp, rb) = resp.into_parts();
        headers::strip_hop_by_hop(&mut rp.headers);
        let resp = tag_tier(Response::from_parts(rp, rb), self.tier.name);
        // A small answer to a request that may be sent again is read whole
        // first: a member dying mid-body then costs a retry, not a broken
        // body.
        let may_resend = s.method_ok && s.body.replayable();
        match fwd.settle(resp, may_resend).await {
            Ok(resp) => Step::Done(resp),
            Err(f) => Step::Failed(f),
        }
    }

    /// A member's timeout spent the request's time; anything else may be
    /// resent when the request allows it.
    fn may_resend(&mut self, why: Why<'_>) -> bool {
        let timed_out = matches!(why, Why::Failed(f) if own_timeout(f));
        !timed_out && self.s.method_ok && self.s.body.replayable()
    }

    /// A slow member is not ejected: its timeout ends the request.
    fn blame(&mut self, member: &EndpointState, f: &Failure) {
        if !own_timeout(f) {
            self.fwd.member_failed(self.tier, member, f);
        }
    }

    fn trail(&mut self) -> Option<&mut Trail> {
        self.trail.as_deref_mut()
    }
}

/// What a [`Switch`] asks a gateway member for.
enum SwitchTo<'a> {
    /// The app's upgrade request.
    Upgrade(&'a PathAndQuery, &'a http::request::Parts),
    /// A `CONNECT` tunnel to the authority, with these headers.
    Connect(&'a str, &'a http::HeaderMap),
}

/// One try at a tunnel through a member of a gateway tier, on a fresh
/// connection: nothing of the app's has been sent before it stands, so
/// any failure may move on; but an upgrade's timeout ends the request (it
/// spent the request's time) and does not eject the member.
struct Switch<'a> {
    fwd: &'a Forwarder,
    tier: &'a Tier,
    target: SwitchTo<'a>,
}

impl Switch<'_> {
    fn upgrade_timeout(&self, why: Why<'_>) -> bool {
        matches!(self.target, SwitchTo::Upgrade(..))
            && matches!(why, Why::Failed(f) if own_timeout(f))
    }
}

impl Attempt for Switch<'_> {
    type Answer = Switched;

    async fn attempt(&mut self, member: Arc<EndpointState>) -> Step<Switched> {
        let (connect, timeout) = (self.fwd.connect_timeout, self.fwd.request_timeout);
        let sent = match &self.target {
            SwitchTo::Upgrade(pq, parts) => {
                attempt::upgrade(&member, connect, timeout, pq, parts).await
            }
            SwitchTo::Connect(authority, h) => {
                attempt::connect_tunnel(&member, connect, timeout, authority, (*h).clone()).await
            }
        };
        match sent {
            Ok(switched) => Step::Done(switched),
            Err(e) => Step::Failed(e.into_failure(self.tier.name, &member)),
        }
    }

    fn may_resend(&mut self, why: Why<'_>) -> bool {
        !self.upgrade_timeout(why)
    }

    fn blame(&mut self, member: &EndpointState, f: &Failure) {
        if !self.upgrade_timeout(Why::Failed(f)) {
            self.fwd.member_failed(self.tier, member, f);
        }
    }
}

/// A gateway member that gave no answer within the request timeout: each
/// member is given the whole of it, so the request's time is spent (it is
/// not resent, nor moved to another tier, and the slow member is not
/// ejected for it). A timeout a gateway answered is a mesh error like the
/// others.
fn own_timeout(f: &Failure) -> bool {
    f.reason == MeshError::UpstreamTimeout && f.answer.is_none()
}

fn tag_tier(mut resp: Response<ProxyBody>, tier: &'static str) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(headers::X_MESH_TIER, HeaderValue::from_static(tier));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(source: Source, connected: bool, age_ms: u64) -> SyncStatus {
        SyncStatus {
            source,
            connected,
            revision: 1,
            last_sync_ms: now_ms() - age_ms,
            last_error: None,
            source_errors: Vec::new(),
            store_reset: None,
        }
    }

    #[test]
    fn freshness_rules() {
        let bound = Duration::from_secs(60);
        assert_eq!(
            freshness(&status(Source::None, false, 0), bound),
            Freshness::Unavailable
        );
        assert_eq!(
            freshness(&status(Source::Store, true, 0), bound),
            Freshness::Fresh
        );
        assert_eq!(
            freshness(&status(Source::Store, false, 1000), bound),
            Freshness::Stale
        );
        assert_eq!(
            freshness(&status(Source::SnapshotFile, false, 120_000), bound),
            Freshness::Unavailable
        );
    }
}
