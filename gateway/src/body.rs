//! The body types on the proxy path: a streamed hyper body, a response
//! from a pooled upstream connection, or a buffered one (replayable for
//! retries and fail-over), without boxing.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::upstream::UpstreamBody;

/// A request or response body passing through the proxy.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from a client, or from an HTTP/2 upstream.
    Incoming(Incoming),
    /// Streamed from a pooled HTTP/1.1 upstream connection.
    Upstream(UpstreamBody),
    /// In memory.
    Full(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Full(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| Ok(r.unwrap_or_else(|never| match never {})))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Full(b) => b.size_hint(),
        }
    }
}

/// Wraps a buffered body.
pub fn full(b: Full<Bytes>) -> ProxyBody {
    ProxyBody::Full(b)
}

/// An empty body.
pub fn empty() -> ProxyBody {
    ProxyBody::Full(Full::new(Bytes::new()))
}

/// A request body made replayable when that is cheap: empty bodies and
/// bodies announced (by `content-length`) at or under `limit` bytes are read
/// into memory; anything else stays a stream and can be sent only once.
pub enum ReplayBody {
    Buffered(Bytes),
    Streaming(Incoming),
    /// A streaming body already sent.
    Spent,
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the request body: {0}")]
    Read(String),
}

impl ReplayBody {
    pub async fn new(
        body: Incoming,
        content_length: Option<u64>,
        limit: usize,
    ) -> Result<Self, BodyError> {
        if body.is_end_stream() {
            return Ok(ReplayBody::Buffered(Bytes::new()));
        }
        match content_length {
            Some(n) if n <= limit as u64 => {
                let collected = Limited::new(body, limit).collect().await.map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        BodyError::TooLarge(limit)
                    } else {
                        BodyError::Read(e.to_string())
                    }
                })?;
                Ok(ReplayBody::Buffered(collected.to_bytes()))
            }
            _ => Ok(ReplayBody::Streaming(body)),
        }
    }

    /// Whether another copy can be sent after this one.
    pub fn replayable(&self) -> bool {
        matches!(self, ReplayBody::Buffered(_))
    }

    /// A body for one attempt. For a streaming body this consumes it; later
    /// calls return `None`.
    pub fn take(&mut self) -> Option<ProxyBody> {
        match self {
            ReplayBody::Buffered(b) => Some(full(Full::new(b.clone()))),
            ReplayBody::Streaming(_) => match std::mem::replace(self, ReplayBody::Spent) {
                ReplayBody::Streaming(inc) => Some(ProxyBody::Incoming(inc)),
                _ => None,
            },
            ReplayBody::Spent => None,
        }
    }
}
