//! The failure vocabulary of the mesh.
//!
//! A [`Failure`] is a value: its reason ([`MeshError`], the `x-mesh-error`
//! code), whose fault it is ([`Side`]: the downstream client, the
//! upstream, or the mesh itself, as Pingora's error source), and whether
//! any byte of the request may have been sent on. The request path passes
//! failures up as values; the fail-over rules read them
//! ([`crate::proxy::attempts`]); one rescue at the edge turns a failure
//! into the synthetic response ([`Failure::into_response`]): status,
//! `x-mesh-error: <code>` and a small JSON body `{"error", "message"}`, or
//! a gRPC status for a gRPC call. `x-mesh-error` is read back into a
//! failure only where it crosses a process boundary
//! ([`Failure::from_answer`]).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::http::body::{full, ProxyBody};

/// The header naming the reason of a mesh-generated response.
pub const X_MESH_ERROR: &str = "x-mesh-error";

/// A mesh-generated failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshError {
    /// No route matched (404).
    NoRoute,
    /// The destination has no usable endpoint (503).
    NoHealthyEndpoint,
    /// No connection could be made to any endpoint tried (502).
    UpstreamConnectFailed,
    /// The upstream broke the connection after the request was sent (502).
    UpstreamReset,
    /// No response headers within the request timeout (504).
    UpstreamTimeout,
    /// Too many mesh hops: a forwarding loop (508).
    LoopDetected,
    /// The process has not loaded any config yet (503).
    NotReady,
    /// The request does not name a destination (400).
    NoDestination,
    /// The request is malformed in a way the proxy cannot forward (400).
    BadRequest,
    /// The request body is larger than allowed (413).
    PayloadTooLarge,
    /// The process is shutting down (503).
    ShuttingDown,
    /// A circuit-breaker limit of the service is reached (503).
    CircuitOpen,
    /// The request uses something the mesh does not forward faithfully:
    /// a transfer coding other than `chunked` (501).
    NotImplemented,
    /// The client went away in the middle of its upload (400, which it
    /// will not read; nginx logs such a request as 499).
    ClientAborted,
    /// The caller's identity may not call the destination, or the
    /// consumer may not use the route (403).
    Forbidden,
    /// The route takes consumers' credentials and the request has none
    /// that verify (401).
    Unauthenticated,
    /// A rate limit of the route, consumer or service is reached (429).
    RateLimited,
    /// A header (a credential) is too large to be read (431).
    HeaderTooLarge,
    /// An abort injected by the route's `fault` (its configured status).
    FaultInjected,
}

impl MeshError {
    pub fn code(self) -> &'static str {
        match self {
            MeshError::NoRoute => "no_route",
            MeshError::NoHealthyEndpoint => "no_healthy_endpoint",
            MeshError::UpstreamConnectFailed => "upstream_connect_failed",
            MeshError::UpstreamReset => "upstream_reset",
            MeshError::UpstreamTimeout => "upstream_timeout",
            MeshError::LoopDetected => "loop_detected",
            MeshError::NotReady => "not_ready",
            MeshError::NoDestination => "no_destination",
            MeshError::BadRequest => "bad_request",
            MeshError::PayloadTooLarge => "payload_too_large",
            MeshError::ShuttingDown => "shutting_down",
            MeshError::CircuitOpen => "circuit_open",
            MeshError::NotImplemented => "not_implemented",
            MeshError::ClientAborted => "client_aborted",
            MeshError::Forbidden => "forbidden",
            MeshError::Unauthenticated => "unauthenticated",
            MeshError::RateLimited => "rate_limited",
            MeshError::HeaderTooLarge => "header_too_large",
            MeshError::FaultInjected => "fault_injected",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            MeshError::NoRoute => StatusCode::NOT_FOUND,
            MeshError::NoHealthyEndpoint
            | MeshError::NotReady
            | MeshError::ShuttingDown
            | MeshError::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::UpstreamConnectFailed | MeshError::UpstreamReset => StatusCode::BAD_GATEWAY,
            MeshError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::LoopDetected => StatusCode::LOOP_DETECTED,
            MeshError::NoDestination | MeshError::BadRequest | MeshError::ClientAborted => {
                StatusCode::BAD_REQUEST
            }
            MeshError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            MeshError::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            MeshError::Forbidden => StatusCode::FORBIDDEN,
            MeshError::Unauthenticated => StatusCode::UNAUTHORIZED,
            MeshError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            MeshError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            MeshError::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether this error proves the request was not sent on to any
    /// upstream (so any method may safely be sent elsewhere). Only a reset
    /// or a timeout leaves that open.
    pub fn unsent(self) -> bool {
        !matches!(self, MeshError::UpstreamReset | MeshError::UpstreamTimeout)
    }

    /// Whose fault this error usually is.
    pub(crate) fn side(self) -> Side {
        match self {
            MeshError::UpstreamConnectFailed
            | MeshError::UpstreamReset
            | MeshError::UpstreamTimeout => Side::Upstream,
            MeshError::LoopDetected
            | MeshError::NoDestination
            | MeshError::BadRequest
            | MeshError::PayloadTooLarge
            | MeshError::NotImplemented
            | MeshError::ClientAborted
            | MeshError::Forbidden
            | MeshError::Unauthenticated
            | MeshError::RateLimited
            | MeshError::HeaderTooLarge
            | MeshError::FaultInjected => Side::Downstream,
            MeshError::NoRoute
            | MeshError::NoHealthyEndpoint
            | MeshError::NotReady
            | MeshError::ShuttingDown
            | MeshError::CircuitOpen => Side::Mesh,
        }
    }

    /// The gRPC status code a gRPC caller gets for this error.
    pub(crate) fn grpc_status(self) -> u8 {
        match self {
            // UNIMPLEMENTED: nothing serves this method here.
            MeshError::NoRoute | MeshError::NotImplemented => 12,
            MeshError::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            MeshError::LoopDetected => 10,   // ABORTED
            MeshError::ClientAborted => 1,   // CANCELLED
            MeshError::NoDestination | MeshError::BadRequest => 3, // INVALID_ARGUMENT
            MeshError::PayloadTooLarge => 8, // RESOURCE_EXHAUSTED
            MeshError::Forbidden => 7,       // PERMISSION_DENIED
            MeshError::Unauthenticated => 16, // UNAUTHENTICATED
            MeshError::RateLimited => 8,     // RESOURCE_EXHAUSTED
            MeshError::HeaderTooLarge => 3,  // INVALID_ARGUMENT
            MeshError::NoHealthyEndpoint
            | MeshError::UpstreamConnectFailed
            | MeshError::UpstreamReset
            | MeshError::NotReady
            | MeshError::ShuttingDown
            | MeshError::CircuitOpen
            | MeshError::FaultInjected => 14, // UNAVAILABLE
        }
    }

    /// Every error, for reverse lookups.
    pub(crate) const ALL: [MeshError; 19] = [
        MeshError::NoRoute,
        MeshError::NoHealthyEndpoint,
        MeshError::UpstreamConnectFailed,
        MeshError::UpstreamReset,
        MeshError::UpstreamTimeout,
        MeshError::LoopDetected,
        MeshError::NotReady,
        MeshError::NoDestination,
        MeshError::BadRequest,
        MeshError::PayloadTooLarge,
        MeshError::ShuttingDown,
        MeshError::CircuitOpen,
        MeshError::NotImplemented,
        MeshError::ClientAborted,
        MeshError::Forbidden,
        MeshError::Unauthenticated,
        MeshError::RateLimited,
        MeshError::HeaderTooLarge,
        MeshError::FaultInjected,
    ];

    /// The reason code named in an `x-mesh-error` header value.
    pub(crate) fn from_code(code: &[u8]) -> Option<MeshError> {
        MeshError::ALL
            .into_iter()
            .find(|e| e.code().as_bytes() == code)
    }

    /// The synthetic error as a gRPC "trailers-only" response: HTTP 200,
    /// `grpc-status` and `grpc-message` in the headers, no body; still
    /// marked with `x-mesh-error`.
    pub(crate) fn grpc_response(self, message: &str) -> Response<ProxyBody> {
        let mut resp = Response::new(crate::http::body::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_status())),
        );
        if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message)) {
            h.insert("grpc-message", v);
        }
        h.insert(X_MESH_ERROR, HeaderValue::from_static(self.code()));
        resp
    }

    /// The synthetic response, with a human message.
    pub fn response(self, message: &str) -> Response<ProxyBody> {
        let body = serde_json::json!({ "error": self.code(), "message": message });
        let mut resp = Response::new(full(Full::new(Bytes::from(body.to_string()))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(X_MESH_ERROR, HeaderValue::from_static(self.code()));
        resp
    }
}

/// Whether an error of the client's request body means the client went
/// away (the connection ended before the body did) rather than sent
/// something malformed.
pub(crate) fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// The innermost error message (hyper wraps io errors several levels deep).
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whose fault a failure is. Only [`Side::Upstream`] failures count
/// against an endpoint (outlier detection, ejection) and may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: a malformed or abandoned request or upload.
    Downstream,
    /// The upstream (an endpoint, or a gateway member): refused, reset,
    /// timed out.
    Upstream,
    /// The mesh's own decision: no route, no endpoint, a breaker limit,
    /// not ready.
    Mesh,
}

/// A failed request, as a value.
#[derive(Debug)]
pub struct Failure {
    pub reason: MeshError,
    pub side: Side,
    /// Whether any byte of the request may have reached an upstream.
    pub sent: bool,
    pub message: String,
    /// An answer that came with the failure (a gateway's own mesh error,
    /// read off the wire): passed on as is if the failure is final.
    pub answer: Option<Box<Response<ProxyBody>>>,
}

impl Failure {
    /// A failure of the reason's usual side, sent when the reason leaves
    /// it open (a reset, a timeout).
    pub fn new(reason: MeshError, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            side: reason.side(),
            sent: !reason.unsent(),
            message: message.into(),
            answer: None,
        }
    }

    /// The same failure, blamed on `side`.
    pub fn on(mut self, side: Side) -> Failure {
        self.side = side;
        self
    }

    /// The same failure, with whether the request may have been sent.
    pub fn sent(mut self, sent: bool) -> Failure {
        self.sent = sent;
        self
    }

    /// A mesh error answered by another mesh process (marked with
    /// `x-mesh-error`), as a failure carrying that answer; `None` for any
    /// other answer (an app's own 5xx is not a failure of the mesh). An
    /// unknown reason is taken as possibly sent.
    pub fn from_answer(resp: Response<ProxyBody>) -> Result<Response<ProxyBody>, Failure> {
        let Some(code) = resp.headers().get(X_MESH_ERROR) else {
            return Ok(resp);
        };
        let (reason, sent) = match MeshError::from_code(code.as_bytes()) {
            Some(e) => (e, !e.unsent()),
            None => (MeshError::UpstreamReset, true),
        };
        // The next hop's failure is the upstream's, for this process (a
        // route or endpoint the next hop lacked may be elsewhere), but for
        // a refusal of the caller itself: no other member or tier may serve
        // a call the caller may not make.
        let side = match reason {
            MeshError::Forbidden
            | MeshError::Unauthenticated
            | MeshError::RateLimited
            | MeshError::FaultInjected => Side::Downstream,
            _ => Side::Upstream,
        };
        Err(Failure {
            reason,
            side,
            sent,
            message: format!("{} answered by the next hop", reason.code()),
            answer: Some(Box::new(resp)),
        })
    }

    /// The rescue: the response a client gets for this failure. An answer
    /// carried from another mesh process is passed on as is; otherwise the
    /// synthetic response, as a gRPC status for a gRPC call.
    pub fn into_response(self, grpc: bool) -> Response<ProxyBody> {
        if let Some(answer) = self.answer {
            if grpc && !answer.headers().contains_key("grpc-status") {
                let message = format!("{} ({})", self.reason.code(), answer.status());
                return self.reason.grpc_response(&message);
            }
            return *answer;
        }
        match self.side {
            Side::Downstream if self.reason == MeshError::ClientAborted => {
                tracing::info!(message = %self.message, "client abort: the client went away mid-upload")
            }
            Side::Downstream => {
                tracing::debug!(reason = self.reason.code(), message = %self.message, "request failed on the client side")
            }
            Side::Upstream | Side::Mesh => {
                tracing::debug!(reason = self.reason.code(), message = %self.message, "request failed")
            }
        }
        let mut resp = if grpc {
            // `grpc-message` names the reason and the HTTP status it
            // stands for; the human message is in the log above.
            let message = format!("{} ({})", self.reason.code(), self.reason.status());
            self.reason.grpc_response(&message)
        } else {
            self.reason.response(&self.message)
        };
        if self.reason == MeshError::BadRequest && self.side == Side::Downstream {
            // Malformed or ambiguous: nothing more is read from this
            // client connection (HTTP/2 drops the header; its stream is
            // answered alone).
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.message)
    }
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except
/// `%` as is, everything else as `%XX` of its UTF-8 bytes.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_response_is_marked() {
        let r = MeshError::NoRoute.response("no route for GET /x");
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()[X_MESH_ERROR], "no_route");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn grpc_errors_are_trailers_only_statuses() {
        let r = MeshError::UpstreamTimeout.grpc_response("no answer in 5%");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["grpc-message"], "no answer in 5%25");
        assert_eq!(r.headers()[X_MESH_ERROR], "upstream_timeout");
        assert_eq!(
            MeshError::from_code(b"circuit_open"),
            Some(MeshError::CircuitOpen)
        );
    }
}
