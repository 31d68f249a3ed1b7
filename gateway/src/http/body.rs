//! The body types on the proxy path: a request body as the listener hands
//! it over ([`RequestBody`]: read whole by the HTTP/1.1 fast path, or
//! streamed by hyper); a streamed hyper body, a response from a pooled
//! upstream connection, or a buffered one (replayable for retries and
//! fail-over), without boxing; and, only when a service asks for it, a
//! body that holds a circuit-breaker slot until it ends and fails when
//! idle too long.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::http::pool::UpstreamBody;

/// A request body as a listener hands it to the request path.
#[derive(Debug)]
pub enum RequestBody {
    /// Read whole before the request was handed over (the HTTP/1.1 fast
    /// path, [`crate::server::h1`]); `None` once taken.
    Whole(Option<Bytes>),
    /// Streamed by hyper (HTTP/2, and HTTP/1.1 connections hyper serves).
    Incoming(Incoming),
}

impl RequestBody {
    /// An empty body.
    pub(crate) fn empty() -> RequestBody {
        RequestBody::Whole(None)
    }

    /// Whether the HTTP/1.1 fast path read it whole: the request is then
    /// no upgrade and no `CONNECT` (those go to hyper).
    pub fn is_whole(&self) -> bool {
        matches!(self, RequestBody::Whole(_))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Whole(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            RequestBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Whole(b) => b.as_ref().is_none_or(Bytes::is_empty),
            RequestBody::Incoming(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Incoming(b) => b.size_hint(),
        }
    }
}

/// A request or response body passing through the proxy.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from a client.
    Incoming(Incoming),
    /// Streamed from an HTTP/2 upstream connection.
    H2(crate::http::h2::H2Body),
    /// Streamed from a pooled HTTP/1.1 upstream connection.
    Upstream(UpstreamBody),
    /// In memory.
    Full(Full<Bytes>),
    /// Another body with a breaker slot and/or an idle timeout.
    Guarded(Box<Guarded>),
    /// A request body that notes when it fails (see [`Watched`]).
    Watched(Box<Watched>),
    /// A response body that reports its length when it ends (see
    /// [`Observed`]).
    Observed(Box<Observed>),
    /// Frames already read off a body, then the rest of it (see
    /// [`Prefixed`]).
    Prefixed(Box<Prefixed>),
}

/// The error of a body on the proxy path.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Full(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| Ok(r.unwrap_or_else(|never| match never {})))),
            ProxyBody::Guarded(g) => g.poll(cx),
            ProxyBody::Watched(w) => {
                let polled = Pin::new(&mut w.inner).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &polled {
                    w.failed.store(true, std::sync::atomic::Ordering::Release);
                }
                polled
            }
            ProxyBody::Observed(o) => o.poll(cx),
            ProxyBody::Prefixed(p) => match p.read.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => Pin::new(&mut p.rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::H2(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Guarded(g) => g.inner.is_end_stream(),
            ProxyBody::Watched(w) => w.inner.is_end_stream(),
            ProxyBody::Observed(o) => o.inner.is_end_stream(),
            ProxyBody::Prefixed(p) => p.read.is_empty() && p.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::H2(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Guarded(g) => g.inner.size_hint(),
            ProxyBody::Watched(w) => w.inner.size_hint(),
            ProxyBody::Observed(o) => o.inner.size_hint(),
            ProxyBody::Prefixed(p) => match p.read.is_empty() {
                true => p.rest.size_hint(),
                false => SizeHint::default(),
            },
        }
    }
}

/// A body some frames of which were read before it was handed on (a
/// response read for the cache that proved too large to keep): those
/// frames, then the rest.
#[derive(Debug)]
pub struct Prefixed {
    read: std::collections::VecDeque<Frame<Bytes>>,
    rest: ProxyBody,
}

impl Prefixed {
    pub fn wrap(read: std::collections::VecDeque<Frame<Bytes>>, rest: ProxyBody) -> ProxyBody {
        ProxyBody::Prefixed(Box::new(Prefixed { read, rest }))
    }
}

/// A request body sent by a client that another task streams on (the
/// HTTP/2 client's): when it fails, `failed` is set, so the sender can
/// tell the client's broken upload from the upstream's reset (hyper
/// reports both as a reset stream).
#[derive(Debug)]
pub struct Watched {
    inner: ProxyBody,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watched {
    /// Wraps a streamed body; returns it as is when it is already whole
    /// (nothing to fail), with the flag to read afterwards.
    pub fn wrap(
        inner: ProxyBody,
    ) -> (
        ProxyBody,
        Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) {
        if !matches!(inner, ProxyBody::Incoming(_) | ProxyBody::Observed(_)) {
            return (inner, None);
        }
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = ProxyBody::Watched(Box::new(Watched {
            inner,
            failed: failed.clone(),
        }));
        (body, Some(failed))
    }
}

/// Told, once, how a body ended: the bytes it carried and whether it
/// ended whole (false: it failed, or was dropped before its end).
pub trait OnEnd: Send + Sync {
    fn ended(self: Box<Self>, bytes: u64, whole: bool);
}

/// A body that counts its data and reports to an [`OnEnd`] when it ends
/// (the access log's record of the request).
pub struct Observed {
    inner: ProxyBody,
    bytes: u64,
    on_end: Option<Box<dyn OnEnd>>,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Observed {
    pub fn wrap(inner: ProxyBody, on_end: Box<dyn OnEnd>) -> ProxyBody {
        ProxyBody::Observed(Box::new(Observed {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }))
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Ready(None) => self.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn end(&mut self, whole: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end.ended(self.bytes, whole);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // A body never polled because it had nothing to send (a HEAD or
        // 204 answer, an empty body) ended whole.
        let whole = self.inner.is_end_stream();
        self.end(whole);
    }
}

/// Stores a body's length when it ends.
struct CountInto(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl OnEnd for CountInto {
    fn ended(self: Box<Self>, bytes: u64, _whole: bool) {
        self.0.store(bytes, std::sync::atomic::Ordering::Release);
    }
}

/// A body that keeps `hold` (a breaker slot) until it ends or is dropped,
/// and fails when no frame arrives for `idle`.
pub struct Guarded {
    inner: ProxyBody,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    hold: Option<crate::http::limit::Held>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("idle", &self.idle.as_ref().map(|i| i.0))
            .finish()
    }
}

/// A body stream idle for longer than its timeout.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}: idle timeout")]
pub(crate) struct IdleTimeout(pub Duration);

impl Guarded {
    /// Wraps `inner`; returns it as is when there is nothing to guard.
    pub(crate) fn wrap(
        inner: ProxyBody,
        idle: Option<Duration>,
        hold: Option<crate::http::limit::Held>,
    ) -> ProxyBody {
        if idle.is_none() && hold.is_none() {
            return inner;
        }
        ProxyBody::Guarded(Box::new(Guarded {
            inner,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            hold,
        }))
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some((d, sleep)) = &mut self.idle {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *d);
                }
                if self.inner.is_end_stream() {
                    self.hold = None;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(other) => {
                self.hold = None;
                self.idle = None;
                Poll::Ready(other)
            }
            Poll::Pending => {
                let fired = match &mut self.idle {
                    Some((d, sleep)) => sleep.as_mut().poll(cx).is_ready().then_some(*d),
                    None => None,
                };
                match fired {
                    Some(d) => {
                        self.idle = None;
                        self.hold = None;
                        Poll::Ready(Some(Err(Box::new(IdleTimeout(d)))))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }
}

/// Wraps a buffered body.
pub fn full(b: Full<Bytes>) -> ProxyBody {
    ProxyBody::Full(b)
}

/// An empty body.
pub(crate) fn empty() -> ProxyBody {
    ProxyBody::Full(Full::new(Bytes::new()))
}

/// A request body made replayable when that is cheap: empty bodies and
/// bodies announced (by `content-length`) at or under `limit` bytes are read
/// into memory; anything else stays a stream and can be sent only once.
pub enum ReplayBody {
    Buffered(Bytes),
    /// A stream (the client's body, perhaps counted: see
    /// [`ReplayBody::count_into`]).
    Streaming(ProxyBody),
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
    /// `headers` are the request's (for its `content-length`).
    pub async fn new(
        body: RequestBody,
        headers: &http::HeaderMap,
        limit: usize,
    ) -> Result<Self, BodyError> {
        let body = match body {
            // Already in memory: the listener bounded its size.
            RequestBody::Whole(b) => return Ok(ReplayBody::Buffered(b.unwrap_or_default())),
            RequestBody::Incoming(b) => b,
        };
        if body.is_end_stream() {
            return Ok(ReplayBody::Buffered(Bytes::new()));
        }
        let content_length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
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
            _ => Ok(ReplayBody::Streaming(ProxyBody::Incoming(body))),
        }
    }

    /// Counts a streamed body's bytes into `counter` as they are sent on
    /// (a buffered body's length is known); for the access log.
    pub fn count_into(&mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        if let ReplayBody::Streaming(_) = self {
            if let ReplayBody::Streaming(b) = std::mem::replace(self, ReplayBody::Spent) {
                *self = ReplayBody::Streaming(Observed::wrap(b, Box::new(CountInto(counter))));
            }
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
                ReplayBody::Streaming(b) => Some(b),
                _ => None,
            },
            ReplayBody::Spent => None,
        }
    }
}
