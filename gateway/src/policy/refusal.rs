//! The answers of the edge policies' refusals, as [`Failure`]s carrying
//! their full answer (`WWW-Authenticate`, `Retry-After`,
//! `RateLimit-Policy`, `RateLimit`, an injected abort's status), final at
//! every hop: no other member or tier takes a refused request.

use http::header::{self, HeaderValue};
use http::{Request, Uri};

use super::auth::Refusal;
use super::fault::Abort;
use super::limit::Denied;
use crate::http::body::{ProxyBody, RequestBody};
use crate::http::error::{Failure, MeshError};

pub(crate) fn limited(d: Denied, grpc: bool) -> Failure {
    // Whole seconds, rounded up: a client that waits that long is let in.
    let secs = d.retry_after.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
    let message = format!("rate limit reached; retry in {secs} s");
    let mut resp = answer(MeshError::RateLimited, &message, grpc);
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    h.insert("ratelimit-policy", d.policy);
    if let Ok(v) = HeaderValue::from_str(&format!("\"limit\";r=0;t={secs}")) {
        h.insert("ratelimit", v);
    }
    with_answer(MeshError::RateLimited, message, resp)
}

pub(crate) fn refused(r: Refusal, grpc: bool) -> Failure {
    match r {
        Refusal::Unauthenticated { message, challenge } => {
            let mut resp = answer(MeshError::Unauthenticated, &message, grpc);
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
            with_answer(MeshError::Unauthenticated, message, resp)
        }
        Refusal::NotAllowed(message) => Failure::new(MeshError::Forbidden, message),
        Refusal::TooLarge => Failure::new(
            MeshError::HeaderTooLarge,
            "the credential is larger than the gateway reads",
        ),
    }
}

/// An injected abort, as the route configured it.
pub(crate) fn aborted(a: Abort, grpc: bool) -> Failure {
    let message = "fault injected by the route";
    let mut resp = answer(MeshError::FaultInjected, message, grpc);
    if grpc {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from(u16::from(a.grpc_status)));
    } else {
        *resp.status_mut() = a.status;
    }
    with_answer(MeshError::FaultInjected, message.into(), resp)
}

fn answer(reason: MeshError, message: &str, grpc: bool) -> http::Response<ProxyBody> {
    match grpc {
        true => reason.grpc_response(message),
        false => reason.response(message),
    }
}

fn with_answer(reason: MeshError, message: String, resp: http::Response<ProxyBody>) -> Failure {
    let mut f = Failure::new(reason, message);
    f.answer = Some(Box::new(resp));
    f
}

/// Removes query parameter `name` (a credential) from the request's target.
pub(crate) fn strip_query_param(req: &mut Request<RequestBody>, name: &str) {
    let Some(query) = req.uri().query() else {
        return;
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| p.split_once('=').map_or(*p, |(k, _)| k) != name)
        .collect();
    let path = req.uri().path();
    let pq = match kept.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{}", kept.join("&")),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}
