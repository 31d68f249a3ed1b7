//! The sidecar's request path and fail-over chain.
//!
//! 1. destination: `x-mesh-service`, else `Host` (`svc` or `svc.mesh`) → 400 `no_destination`
//! 2. `x-mesh-hops` + 1 (508 over the limit), ids, `x-mesh-source` = own service
//! 3. tiers: local policy available and the destination covered by it →
//!    [direct (destinations in `direct` mode), group egress gateways,
//!    central]; otherwise (no policy, too stale, destination not covered)
//!    → [central]. The direct tier is the gateway's own forwarding path
//!    over the destination's endpoints (health checks, outlier ejection,
//!    breakers, retries, timeouts from the destination's config); a mesh
//!    error from it moves the request on under the rule of step 5.
//! 4. within a tier, members are tried in weighted round robin, ejected
//!    members skipped: a refused connection moves to the next member (any
//!    method: nothing was sent); a broken exchange does so only for
//!    idempotent or `x-mesh-retryable: true` requests with a replayable body
//! 5. a gateway-originated error (`x-mesh-error`) moves idempotent or
//!    retryable requests to the next tier, and any request when the reason
//!    proves it was not sent on (every reason but `upstream_reset` and
//!    `upstream_timeout`); an app's own 5xx never does

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Version};
use http_body_util::BodyExt;

use meshgate_config::model::now_ms;
use meshgate_config::model::DestinationMode;
use meshgate_config::sync::{Source, SyncStatus};
use meshgate_gateway::balance::EndpointState;
use meshgate_gateway::body::{ProxyBody, ReplayBody, RequestBody};
use meshgate_gateway::client::HttpClient;
use meshgate_gateway::client::Wire;
use meshgate_gateway::error::{MeshError, X_MESH_ERROR};
use meshgate_gateway::headers;
use meshgate_gateway::metrics::{status_class, Metrics};
use meshgate_gateway::proxy::Proxy;
use meshgate_gateway::upstream::{self, Attempt, AttemptOpts};
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
        let (resp, dest, tier) = self.forward(req).await;
        self.metrics
            .requests
            .with_label_values(&["app", tier, &dest, status_class(resp.status().as_u16())])
            .inc();
        self.metrics
            .duration
            .with_label_values(&["app", tier])
            .observe(start.elapsed().as_secs_f64());
        resp
    }

    /// Names the destination and stamps the mesh headers: hops (508 over
    /// the limit), ids, `x-mesh-service`, `x-mesh-source`, `host`.
    fn prelude(
        &self,
        req: &mut Request<RequestBody>,
    ) -> Result<String, Box<(Response<ProxyBody>, String)>> {
        let Some(dest) =
            headers::destination(req.headers(), req.uri().host()).map(|d| d.into_owned())
        else {
            let msg = "name the destination with Host: <service> or x-mesh-service";
            return Err(Box::new((
                MeshError::NoDestination.response(msg),
                String::new(),
            )));
        };
        let authority = req.uri().authority().cloned();
        let h = req.headers_mut();
        match headers::bump_hops(h) {
            None => {
                let resp = MeshError::BadRequest.response("x-mesh-hops is not a number");
                return Err(Box::new((resp, dest)));
            }
            Some(n) if n > self.max_hops => {
                let resp = MeshError::LoopDetected.response("too many mesh hops");
                return Err(Box::new((resp, dest)));
            }
            Some(_) => {}
        }
        headers::ensure_ids(h);
        if let Ok(v) = HeaderValue::from_str(&dest) {
            h.insert(headers::X_MESH_SERVICE, v);
        }
        h.insert(headers::X_MESH_SOURCE, self.service.clone());
        if !h.contains_key(header::HOST) {
            if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                h.insert(header::HOST, v);
            }
        }
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
        (mode, tiers)
    }

    async fn forward(
        &self,
        mut req: Request<RequestBody>,
    ) -> (Response<ProxyBody>, String, &'static str) {
        let dest = match self.prelude(&mut req) {
            Ok(d) => d,
            Err(e) => {
                let (resp, dest) = *e;
                return (resp, dest, "");
            }
        };
        if !req.body().is_whole() && headers::is_upgrade(req.headers()) {
            return self.forward_upgrade(req, dest).await;
        }
        let (mut parts, body) = req.into_parts();
        let h = &mut parts.headers;
        let retryable = headers::idempotent(&parts.method) || headers::marked_retryable(h);
        headers::strip_hop_by_hop(h);
        let mut body = match ReplayBody::new(body, h, self.replay_buffer_bytes).await {
            Ok(b) => b,
            Err(e) => return (MeshError::BadRequest.response(&e.to_string()), dest, ""),
        };
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // The app's protocol is kept on the way to the gateway.
        let wire = if parts.version == Version::HTTP_2 {
            Wire::Http2
        } else {
            Wire::Http1
        };
        // HTTP/1.1: the request itself, back unsent from a failed connect.
        let mut unsent: Option<Request<ProxyBody>> = None;

        let policy = self.policy.load_full();
        let (mode, tiers) = self.tiers(&policy, &dest);
        let mut last_error: Option<(Response<ProxyBody>, &'static str)> = None;
        let mut tried_any = false;
        if mode == Some(DestinationMode::Direct) {
            let snap = self.direct.snapshot.load_full();
            if let Some(svc) = snap.services.get(dest.as_str()).cloned() {
                tried_any = true;
                let mut copy = Request::new(());
                *copy.method_mut() = parts.method.clone();
                *copy.uri_mut() = parts.uri.clone();
                *copy.version_mut() = parts.version;
                *copy.headers_mut() = parts.headers.clone();
                let deadline = headers::is_grpc(&parts.headers)
                    .then(|| headers::grpc_timeout(&parts.headers))
                    .flatten();
                let route = svc.implicit_route.clone();
                let resp = self
                    .direct
                    .forward_prepared(
                        svc,
                        &snap,
                        &route,
                        &LOOPBACK,
                        deadline,
                        copy.into_parts().0,
                        &mut body,
                    )
                    .await;
                let resp = tag_tier(resp, "direct");
                match self.settle(resp, retryable && body.replayable()).await {
                    Ok(resp) if !(self.moves_on(&resp, retryable) && body.replayable()) => {
                        return (resp, dest, "direct");
                    }
                    Ok(resp) => last_error = Some((resp, "direct")),
                    Err(error) => {
                        tracing::debug!(service = %dest, %error, "endpoint broke off its answer; next tier")
                    }
                }
            }
        }
        for tier in tiers {
            let mut tried = Vec::new();
            while let Some(member) = tier.members.pick(&tried) {
                tried_any = true;
                let up = match unsent.take() {
                    Some(r) => r,
                    None => {
                        let Some(attempt) = body.take() else {
                            return self.give_up(
                                last_error,
                                "the request body cannot be replayed",
                                dest,
                            );
                        };
                        let mut up = Request::new(attempt);
                        *up.method_mut() = parts.method.clone();
                        *up.headers_mut() = parts.headers.clone();
                        up
                    }
                };
                let opts = AttemptOpts {
                    wire,
                    h2: &self.h2,
                    connect_timeout: self.connect_timeout,
                    timeout: self.request_timeout,
                    track_load: false,
                    conn_limit: None,
                };
                let attempt = match upstream::attempt(&member, opts, &pq, up).await {
                    Err(Attempt::Timeout) => return self.timed_out(dest, tier.name),
                    Err(Attempt::Connect(error, back)) => {
                        unsent = back.map(|b| *b);
                        Err(Some(error))
                    }
                    // No connection limit is set here; were one hit, nothing was sent.
                    Err(Attempt::Overflow(o)) => Err(Some(o.as_str().to_string())),
                    Err(Attempt::Exchange(error)) => {
                        tracing::debug!(tier = tier.name, member = %member.address, %error, "gateway exchange failed");
                        Err(None)
                    }
                    Ok(resp) => Ok(resp),
                };
                match attempt {
                    Ok(resp) => {
                        let (mut rp, rb) = resp.into_parts();
                        headers::strip_hop_by_hop(&mut rp.headers);
                        let resp = tag_tier(Response::from_parts(rp, rb), tier.name);
                        // A small answer to a request that may be sent
                        // again is read whole first: a member dying
                        // mid-body then costs a retry, not a broken body.
                        let resp = match self.settle(resp, retryable && body.replayable()).await {
                            Ok(r) => r,
                            Err(error) => {
                                tracing::debug!(tier = tier.name, member = %member.address, %error, "gateway broke off its answer; next member");
                                member.on_failure();
                                tried.push(member);
                                continue;
                            }
                        };
                        if self.moves_on(&resp, retryable) && body.replayable() {
                            // The tier itself failed: try the next tier.
                            tracing::debug!(tier = tier.name, member = %member.address, "gateway error; next tier");
                            last_error = Some((resp, tier.name));
                            break;
                        }
                        return (resp, dest, tier.name);
                    }
                    // No connection: nothing was sent; any request moves on.
                    Err(Some(error)) => {
                        member.on_failure();
                        self.metrics
                            .connect_failures
                            .with_label_values(&[tier.name])
                            .inc();
                        tracing::debug!(tier = tier.name, member = %member.address, %error, "gateway connect failed");
                        tried.push(member);
                    }
                    // The exchange broke after the request was (maybe) sent.
                    Err(None) => {
                        member.on_failure();
                        if !(retryable && body.replayable()) {
                            let msg = format!(
                                "gateway {} failed after the request was sent",
                                member.address
                            );
                            return (MeshError::UpstreamReset.response(&msg), dest, tier.name);
                        }
                        tried.push(member);
                    }
                }
            }
        }
        if !tried_any {
            return (
                MeshError::UpstreamConnectFailed
                    .response("no gateway tier is known (no policy and no central bootstrap)"),
                dest,
                "",
            );
        }
        self.give_up(last_error, "no gateway tier could be reached", dest)
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
    ) -> (Response<ProxyBody>, String, &'static str) {
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, _body) = req.into_parts();
        headers::strip_hop_by_hop_keep_upgrade(&mut parts.headers);
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let policy = self.policy.load_full();
        let (_, tiers) = self.tiers(&policy, &dest);
        let mut last_error: Option<(Response<ProxyBody>, &'static str)> = None;
        for tier in tiers {
            let mut tried = Vec::new();
            while let Some(member) = tier.members.pick(&tried) {
                let attempt = upstream::upgrade(
                    &member,
                    self.connect_timeout,
                    self.request_timeout,
                    &pq,
                    &parts,
                )
                .await;
                match attempt {
                    Ok((resp, Some(up))) => {
                        tokio::spawn(async move {
                            let Ok(client) = client_side.await else {
                                return;
                            };
                            let mut client = hyper_util::rt::TokioIo::new(client);
                            let mut up = hyper_util::rt::TokioIo::new(up);
                            let idle = meshgate_gateway::tcp::DEFAULT_TUNNEL_IDLE;
                            if let Err(e) =
                                meshgate_gateway::tcp::tunnel(&mut client, &mut up, idle).await
                            {
                                tracing::debug!(error = %e, "upgraded connection ended");
                            }
                        });
                        return (tag_tier(resp, tier.name), dest, tier.name);
                    }
                    Ok((resp, None)) => {
                        let resp = tag_tier(resp, tier.name);
                        if !self.moves_on(&resp, true) {
                            return (resp, dest, tier.name);
                        }
                        last_error = Some((resp, tier.name));
                        break;
                    }
                    Err(Attempt::Timeout) => return self.timed_out(dest, tier.name),
                    Err(e) => {
                        self.member_failed(tier, &member, &e);
                        tried.push(member);
                    }
                }
            }
        }
        self.give_up(last_error, "no gateway tier could be reached", dest)
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
            let snap = self.direct.snapshot.load_full();
            if let Some(svc) = snap.services.get(dest).cloned() {
                drop(snap);
                match meshgate_gateway::tcp::connect_service(&svc, &self.metrics).await {
                    Ok((mut up, _slot)) => {
                        let idle = svc
                            .idle_timeout
                            .unwrap_or(meshgate_gateway::tcp::DEFAULT_TUNNEL_IDLE);
                        if let Err(e) =
                            meshgate_gateway::tcp::tunnel(&mut client, &mut up, idle).await
                        {
                            tracing::debug!(service = %dest, error = %e, "tcp tunnel ended");
                        }
                        return Ok("direct");
                    }
                    Err(e) => {
                        tracing::debug!(service = %dest, error = %e, "direct tcp connect failed; next tier")
                    }
                }
            }
        }
        let mut h = http::HeaderMap::new();
        let dest_value = HeaderValue::from_str(dest).map_err(|e| e.to_string())?;
        h.insert(header::HOST, dest_value.clone());
        h.insert(headers::X_MESH_SERVICE, dest_value);
        h.insert(headers::X_MESH_SOURCE, self.service.clone());
        h.insert(headers::X_MESH_HOPS, HeaderValue::from_static("1"));
        headers::ensure_ids(&mut h);
        let authority = format!("{dest}:0");
        for tier in tiers {
            let mut tried = Vec::new();
            while let Some(member) = tier.members.pick(&tried) {
                let attempt = upstream::connect_tunnel(
                    &member,
                    self.connect_timeout,
                    self.request_timeout,
                    &authority,
                    h.clone(),
                )
                .await;
                match attempt {
                    Ok((_, Some(up))) => {
                        let mut up = hyper_util::rt::TokioIo::new(up);
                        let idle = meshgate_gateway::tcp::DEFAULT_TUNNEL_IDLE;
                        if let Err(e) =
                            meshgate_gateway::tcp::tunnel(&mut client, &mut up, idle).await
                        {
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
                        tracing::debug!(tier = tier.name, member = %member.address, status = %resp.status(), %why, "CONNECT refused; next tier");
                        break;
                    }
                    Err(e) => {
                        self.member_failed(tier, &member, &e);
                        tried.push(member);
                    }
                }
            }
        }
        Err(format!("no tier could open a tunnel to {dest}"))
    }

    /// A member could not take a tunnel: ejected for a while, and a failed
    /// connect counted.
    fn member_failed(&self, tier: &Tier, member: &EndpointState, e: &Attempt) {
        if let Attempt::Connect(..) = e {
            self.metrics
                .connect_failures
                .with_label_values(&[tier.name])
                .inc();
        }
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
    ) -> Result<Response<ProxyBody>, String> {
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
        match read {
            Ok(Ok(c)) => Ok(Response::from_parts(
                parts,
                meshgate_gateway::body::full(http_body_util::Full::new(c.to_bytes())),
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("body not complete within the request timeout".into()),
        }
    }

    /// Whether a tier's answer moves the request to the next tier: a mesh
    /// error does for an idempotent (or marked) request, and for any
    /// request when the error proves it was not sent on (not ready, no
    /// route, no endpoint, connect failed...). An app's own answer never
    /// does.
    fn moves_on(&self, resp: &Response<ProxyBody>, retryable: bool) -> bool {
        match resp
            .headers()
            .get(X_MESH_ERROR)
            .map(|v| MeshError::from_code(v.as_bytes()))
        {
            None => false,
            Some(Some(e)) => retryable || e.unsent(),
            Some(None) => retryable,
        }
    }

    fn timed_out(
        &self,
        dest: String,
        tier: &'static str,
    ) -> (Response<ProxyBody>, String, &'static str) {
        let msg = format!("no response within {} ms", self.request_timeout.as_millis());
        (MeshError::UpstreamTimeout.response(&msg), dest, tier)
    }

    fn give_up(
        &self,
        last_error: Option<(Response<ProxyBody>, &'static str)>,
        msg: &str,
        dest: String,
    ) -> (Response<ProxyBody>, String, &'static str) {
        match last_error {
            Some((resp, tier)) => (resp, dest, tier),
            None => (MeshError::UpstreamConnectFailed.response(msg), dest, ""),
        }
    }
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
