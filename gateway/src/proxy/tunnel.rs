//! Requests that become byte tunnels: an HTTP/1.1 `Upgrade` (WebSocket)
//! sent on a fresh connection and joined to the client's on `101`, and an
//! HTTP `CONNECT` on a mesh listener (a sidecar's plain-TCP local port)
//! joined to a TCP connection to the named service. Both reach their
//! endpoint through the attempt loop ([`super::attempts`]), as TCP routes
//! do ([`connect_service`]).

use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::attempts::{self, Attempt, Members, Step};
use super::forward::blame;
use super::{ListenerKind, Proxy};
use crate::http::body::{ProxyBody, RequestBody};
use crate::http::error::{Failure, MeshError};
use crate::http::h2::Wire;
use crate::http::headers;
use crate::http::limit::{self, ConnSlot};
use crate::http::tunnel::{self, DEFAULT_TUNNEL_IDLE};
use crate::metrics::Metrics;
use crate::routing::CompiledRoute;
use crate::snapshot::{ServiceRt, Snapshot};
use crate::upstream::attempt::{self, connect_tcp, Switched};
use crate::upstream::endpoint::EndpointState;

/// Endpoints tried per tunnel when connects are refused.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// A TCP connection to one of the service's endpoints, through the attempt
/// loop (a refused or timed-out connect moves on, up to 3 endpoints),
/// under its `max_connections` breaker (the slot is held as long as the
/// returned guard lives).
pub async fn connect_service(
    svc: &ServiceRt,
    metrics: &Metrics,
) -> Result<(TcpStream, Option<ConnSlot>), Failure> {
    let slot = match svc.conn_limit() {
        Some(l) => match limit::try_open(&l) {
            Some(s) => Some(s),
            None => {
                metrics
                    .resilience
                    .with_label_values(&[&svc.name, "circuit_open"])
                    .inc();
                return Err(Failure::new(
                    MeshError::CircuitOpen,
                    format!("service {}: max_connections reached", svc.name),
                ));
            }
        },
        None => None,
    };
    let members = Members {
        max_connects: MAX_CONNECT_ATTEMPTS,
        ..Members::all("service", &svc.name, &svc.balancer)
    };
    let stream = attempts::run(members, &mut TcpConnect { svc, metrics }).await?;
    Ok((stream, slot))
}

/// One TCP connect to an endpoint of `svc`.
struct TcpConnect<'a> {
    svc: &'a ServiceRt,
    metrics: &'a Metrics,
}

impl Attempt for TcpConnect<'_> {
    type Answer = TcpStream;

    async fn attempt(&mut self, ep: Arc<EndpointState>) -> Step<TcpStream> {
        match connect_tcp(&ep, self.svc.connect_timeout).await {
            Ok(s) => {
                ep.on_success();
                Step::Done(s)
            }
            Err(e) => Step::Failed(e.into_failure(&self.svc.name, &ep)),
        }
    }

    fn blame(&mut self, ep: &EndpointState, f: &Failure) {
        blame(self.metrics, self.svc, ep, f);
    }
}

/// One upgrade request to an endpoint of `svc`, on a fresh connection.
struct Upgrade<'a> {
    svc: &'a ServiceRt,
    metrics: &'a Metrics,
    timeout: Duration,
    pq: &'a PathAndQuery,
    parts: &'a http::request::Parts,
}

impl Attempt for Upgrade<'_> {
    type Answer = Switched;

    async fn attempt(&mut self, ep: Arc<EndpointState>) -> Step<Switched> {
        let svc = self.svc;
        let sent = attempt::upgrade(&ep, svc.connect_timeout, self.timeout, self.pq, self.parts);
        match sent.await {
            Ok(switched) => Step::Done(switched),
            Err(e) => Step::Failed(e.into_failure(&svc.name, &ep)),
        }
    }

    /// Only a refused connect counts against the endpoint: an upgrade's
    /// answer is the start of a long-lived connection, not a sample for
    /// outlier detection.
    fn blame(&mut self, ep: &EndpointState, f: &Failure) {
        if f.reason == MeshError::UpstreamConnectFailed {
            blame(self.metrics, self.svc, ep, f);
        }
    }
}

impl Proxy {
    /// An HTTP `CONNECT` on a mesh listener: a TCP connection to an
    /// endpoint of the named service (its fallback when none accepts),
    /// answered 200 and then joined to the client's connection, bounded by
    /// the service's idle timeout. Routes do not apply: TCP has no path or
    /// headers to match.
    pub(crate) async fn connect(
        &self,
        kind: ListenerKind,
        snap: &Snapshot,
        uri_host: Option<&str>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<ProxyBody>, Failure> {
        if kind != ListenerKind::Mesh {
            return Err(Failure::new(
                MeshError::BadRequest,
                "CONNECT is served on mesh listeners only",
            ));
        }
        let Some(dest) = headers::destination(req.headers(), uri_host).map(|d| d.into_owned())
        else {
            return Err(Failure::new(
                MeshError::NoDestination,
                "CONNECT names no service",
            ));
        };
        let Some(primary) = snap.services.get(dest.as_str()).cloned() else {
            return Err(Failure::new(
                MeshError::NoRoute,
                format!("service {dest} is not configured"),
            ));
        };
        let (svc, (upstream, slot)) = match connect_service(&primary, &self.metrics).await {
            Ok(c) => (primary, c),
            Err(f) => match snap.fallback_of(&primary) {
                Some(fb) if attempts::use_fallback(&f) => {
                    tracing::debug!(service = %primary.name, fallback = %fb.name, "no endpoint accepts; using the fallback service");
                    let c = connect_service(&fb, &self.metrics).await?;
                    (fb, c)
                }
                _ => return Err(f),
            },
        };
        let idle = svc.idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE);
        let client = hyper::upgrade::on(&mut req);
        tunnel::spawn(client, upstream, idle, svc.name.clone(), slot);
        Ok(Response::new(crate::http::body::empty()))
    }

    /// A WebSocket (or other HTTP/1.1 `Upgrade`) request: sent on a fresh
    /// connection through the attempt loop (a refused connect moves on;
    /// nothing is resent); on `101 Switching Protocols` the two
    /// connections are joined into a tunnel until either side closes or it
    /// idles. Any other answer is passed on.
    pub(crate) async fn forward_upgrade(
        &self,
        svc: Arc<ServiceRt>,
        route: &CompiledRoute,
        timeout: Duration,
        idle: Option<Duration>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<ProxyBody>, Failure> {
        if svc.wire != Wire::Http1 {
            return Err(Failure::new(
                MeshError::BadRequest,
                format!(
                    "service {} is not HTTP/1.1: upgrades are not supported",
                    svc.name
                ),
            ));
        }
        let client = hyper::upgrade::on(&mut req);
        let (mut parts, _body) = req.into_parts();
        headers::strip_hop_by_hop_keep_upgrade(&mut parts.headers);
        let pq = super::forward::upstream_target(route, &mut parts);
        let members = Members {
            max_connects: self.opts.max_connect_attempts,
            ..Members::all("service", &svc.name, &svc.balancer)
        };
        let mut upgrade = Upgrade {
            svc: &svc,
            metrics: &self.metrics,
            timeout,
            pq: &pq,
            parts: &parts,
        };
        let (resp, upstream) = attempts::run(members, &mut upgrade).await?;
        let (mut rp, rb) = resp.into_parts();
        if let Some(rw) = &route.rewrite {
            rw.response_headers(&mut rp.headers);
        }
        if let Some(up) = upstream {
            let idle = idle.unwrap_or(DEFAULT_TUNNEL_IDLE);
            tunnel::spawn(client, TokioIo::new(up), idle, svc.name.clone(), ());
        }
        Ok(Response::from_parts(rp, rb))
    }
}
