//! HTTP/1.1 upstream connections, pooled per endpoint.
//!
//! Each endpoint keeps its idle keep-alive connections ([`h1::Conn`]) in a
//! small LIFO stack. The request path checks one out, or connects, and
//! runs the exchange on it from its own task ([`crate::h1`]); the response
//! body hands the connection back when it has been read to the end, so a
//! connection is never shared by two exchanges. Compared with hyper-util's
//! pooled client this skips the per-request pool-key hashing, the
//! connector service, the checkout futures and hyper's per-connection
//! task, and it lets the caller tell the ways a send can fail: no
//! connection (safe to try elsewhere), the connection limit, and a failure
//! after the request was (or may have been) written. A pooled connection
//! the peer has closed is noticed at checkout and skipped.
//!
//! HTTP/2 upstreams use the shared multiplexing client in [`crate::client`].
//! [`attempt`] is one try of a request on one endpoint over either wire,
//! shared by the gateway's and the sidecar's request paths.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::balance::EndpointState;
use crate::body::ProxyBody;
use crate::client::{HttpClient, Wire};
use crate::h1::{Conn, DeadlinePassed, Exchange};
use crate::proxy::root_cause;
use crate::resilience::{self, ConnLimit, ConnSlot, Overflow};

/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 256;
/// Idle connections older than this are closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The idle HTTP/1.1 connections of one endpoint.
#[derive(Default)]
pub struct H1Pool {
    idle: Mutex<Vec<(Conn, Instant)>>,
    /// Woken when a connection comes back idle (for requests waiting under
    /// a connection limit).
    released: tokio::sync::Notify,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

/// Why a send failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing was sent, and here is the
    /// request back, to try elsewhere.
    Connect(std::io::Error, Box<Request<ProxyBody>>),
    /// The service's connection limit refused it: nothing was sent.
    Overflow(Overflow, Box<Request<ProxyBody>>),
    /// The exchange failed; the request may have been (partly) sent.
    Exchange(std::io::Error),
    /// No response head by the deadline (waiting for a connection
    /// included).
    Timeout,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e, _) => write!(f, "connect: {e}"),
            SendError::Overflow(o, _) => write!(f, "{} reached", o.as_str()),
            SendError::Exchange(e) => write!(f, "{e}"),
            SendError::Timeout => f.write_str("no response head by the deadline"),
        }
    }
}

impl H1Pool {
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some((mut conn, since)) = idle.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && conn.usable_when_idle() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    fn put(&self, conn: Conn) {
        let mut idle = self.lock();
        let now = Instant::now();
        // Drop the oldest when full or expired (the bottom of the stack).
        if idle.len() >= MAX_IDLE
            || idle
                .first()
                .is_some_and(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        idle.push((conn, now));
        drop(idle);
        self.released.notify_waiters();
    }

    /// A new connection slot under `limit`: at once when one is free, else
    /// after waiting (as one of at most `max_pending` requests) for a
    /// connection of this endpoint to come back idle (`Err(conn)`) or
    /// for any connection of the service to close.
    async fn slot_or_idle(
        &self,
        limit: &ConnLimit<'_>,
    ) -> Result<Result<ConnSlot, Conn>, Overflow> {
        if let Some(s) = resilience::try_open(limit) {
            return Ok(Ok(s));
        }
        if limit.max_pending == 0 {
            return Err(Overflow::Connections);
        }
        let Some(_pending) = resilience::wait_slot(limit) else {
            return Err(Overflow::Pending);
        };
        loop {
            let released = self.released.notified();
            let freed = limit.counter.freed.notified();
            tokio::pin!(released, freed);
            released.as_mut().enable();
            freed.as_mut().enable();
            if let Some(conn) = self.checkout() {
                return Ok(Err(conn));
            }
            if let Some(s) = resilience::try_open(limit) {
                return Ok(Ok(s));
            }
            tokio::select! {
                _ = released => {}
                _ = freed => {}
            }
        }
    }

    /// Sends `req` (origin-form URI, `Host` header set) to `address`,
    /// reusing an idle connection when there is one. Under a connection
    /// `limit`, a new connection is opened only while the service is under
    /// it; otherwise the request waits (see [`resilience::ConnLimit`]).
    pub async fn send(
        self: &Arc<Self>,
        address: &str,
        connect_timeout: Duration,
        limit: Option<ConnLimit<'_>>,
        req: Request<ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let conn = match self.checkout() {
            Some(conn) => conn,
            // Boxed: a rare path whose future would otherwise widen every
            // request's.
            None => {
                let opened = tokio::time::timeout_at(
                    deadline,
                    Box::pin(self.open(address, connect_timeout, limit)),
                );
                match opened.await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(Opened::Failed(e))) => return Err(SendError::Connect(e, Box::new(req))),
                    Ok(Err(Opened::Overflow(o))) => {
                        return Err(SendError::Overflow(o, Box::new(req)))
                    }
                    Err(_) => return Err(SendError::Timeout),
                }
            }
        };
        let (parts, exchange) = conn.send(req, deadline).await.map_err(|e| {
            if DeadlinePassed::is(&e) {
                SendError::Timeout
            } else {
                SendError::Exchange(e)
            }
        })?;
        let mut body = UpstreamBody {
            exchange,
            pool: self.clone(),
        };
        body.release();
        Ok(Response::from_parts(parts, body))
    }

    /// A connection when none is idle: a new one (under `limit`, after
    /// waiting for a slot), or one that came back idle meanwhile.
    async fn open(
        &self,
        address: &str,
        connect_timeout: Duration,
        limit: Option<ConnLimit<'_>>,
    ) -> Result<Conn, Opened> {
        let slot = match &limit {
            None => None,
            Some(l) => match self.slot_or_idle(l).await {
                Ok(Ok(slot)) => Some(slot),
                Ok(Err(idle)) => return Ok(idle),
                Err(o) => return Err(Opened::Overflow(o)),
            },
        };
        Conn::connect(address, connect_timeout, slot)
            .await
            .map_err(Opened::Failed)
    }
}

/// Why no connection was opened.
enum Opened {
    Failed(std::io::Error),
    Overflow(Overflow),
}

/// How one attempt to an endpoint failed.
#[derive(Debug)]
pub enum Attempt {
    /// No connection: nothing was sent. HTTP/1.1 hands the request back.
    Connect(String, Option<Box<Request<ProxyBody>>>),
    /// The service's connection limit refused it: nothing was sent.
    Overflow(Overflow),
    /// Failed after the request was (or may have been) sent.
    Exchange(String),
    /// No response headers within the timeout.
    Timeout,
}

/// The wire and limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptOpts<'a> {
    pub wire: Wire,
    /// The HTTP/2 client (HTTP/1.1 uses the endpoint's own pool).
    pub h2: &'a HttpClient,
    pub connect_timeout: Duration,
    /// Time allowed for response headers.
    pub timeout: Duration,
    /// Count requests in flight and time answers on the endpoint (for
    /// load-aware balancing).
    pub track_load: bool,
    /// The service's connection limit (HTTP/1.1).
    pub conn_limit: Option<ConnLimit<'a>>,
}

/// Sends `req` to `ep`: sets the request target for the wire (origin-form
/// through the endpoint's HTTP/1.1 pool, absolute-form through the HTTP/2
/// client), waits for response headers, and marks the endpoint's success.
/// Failures are for the caller to judge (eject, retry, move on).
pub async fn attempt(
    ep: &Arc<EndpointState>,
    opts: AttemptOpts<'_>,
    pq: &PathAndQuery,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Attempt> {
    match opts.wire {
        Wire::Http1 => {
            *req.uri_mut() = Uri::from(pq.clone());
            *req.version_mut() = Version::HTTP_11;
        }
        Wire::Http2 => {
            let Some(auth) = &ep.authority else {
                return Err(Attempt::Connect(
                    format!("{} is not a valid address", ep.address),
                    Some(Box::new(req)),
                ));
            };
            *req.uri_mut() = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(auth.clone())
                .path_and_query(pq.clone())
                .build()
                .expect("valid uri parts");
            *req.version_mut() = Version::HTTP_2;
        }
    }
    let in_flight = opts.track_load.then(|| ep.start());
    let sent_at = Instant::now();
    let result = match opts.wire {
        Wire::Http1 => {
            // The pool's connections carry their own timers (see
            // `h1::Conn`): no timer is armed per request.
            let deadline = tokio::time::Instant::from_std(sent_at) + opts.timeout;
            let sent = ep.h1.send(
                &ep.address,
                opts.connect_timeout,
                opts.conn_limit,
                req,
                deadline,
            );
            match sent.await {
                Ok(resp) => Ok(resp.map(ProxyBody::Upstream)),
                Err(SendError::Connect(e, back)) => {
                    Err(Attempt::Connect(e.to_string(), Some(back)))
                }
                Err(SendError::Overflow(o, _)) => Err(Attempt::Overflow(o)),
                Err(SendError::Exchange(e)) => Err(Attempt::Exchange(e.to_string())),
                Err(SendError::Timeout) => Err(Attempt::Timeout),
            }
        }
        Wire::Http2 => {
            match tokio::time::timeout(opts.timeout, Box::pin(opts.h2.request(req))).await {
                Ok(Ok(resp)) => Ok(resp.map(ProxyBody::Incoming)),
                Ok(Err(e)) if e.is_connect() => Err(Attempt::Connect(root_cause(&e), None)),
                Ok(Err(e)) => Err(Attempt::Exchange(root_cause(&e))),
                Err(_) => Err(Attempt::Timeout),
            }
        }
    };
    drop(in_flight);
    if result.is_ok() {
        ep.on_success();
        if opts.track_load {
            ep.observe_rtt(sent_at.elapsed());
        }
    }
    result
}

/// Sends an upgrade request (`Connection: upgrade`, e.g. WebSocket) to
/// `ep` on a fresh connection of its own. On `101 Switching Protocols`
/// returns the upstream side of the upgraded connection with the (empty)
/// response; any other answer is returned as is, with its body.
pub async fn upgrade(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    timeout: Duration,
    pq: &PathAndQuery,
    parts: &http::request::Parts,
) -> Result<(Response<ProxyBody>, Option<hyper::upgrade::Upgraded>), Attempt> {
    let mut req = Request::new(crate::body::empty());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = Uri::from(pq.clone());
    *req.headers_mut() = parts.headers.clone();
    let switched = |s: http::StatusCode| s == http::StatusCode::SWITCHING_PROTOCOLS;
    switch(ep, connect_timeout, timeout, req, switched).await
}

/// Sends `CONNECT <authority>` with `headers` to `ep` on a fresh
/// connection. On a 2xx answer the connection becomes a byte tunnel and is
/// returned with the response; any other answer is returned alone.
pub async fn connect_tunnel(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    timeout: Duration,
    authority: &str,
    headers: http::HeaderMap,
) -> Result<(Response<ProxyBody>, Option<hyper::upgrade::Upgraded>), Attempt> {
    let uri = Uri::try_from(authority)
        .map_err(|e| Attempt::Exchange(format!("invalid CONNECT authority {authority:?}: {e}")))?;
    let mut req = Request::new(crate::body::empty());
    *req.method_mut() = http::Method::CONNECT;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    switch(ep, connect_timeout, timeout, req, |s| s.is_success()).await
}

/// Sends `req` on a fresh HTTP/1.1 connection to `ep`; when the answer's
/// status passes `switched`, takes the connection over as a tunnel.
async fn switch(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    timeout: Duration,
    req: Request<ProxyBody>,
    switched: impl Fn(http::StatusCode) -> bool,
) -> Result<(Response<ProxyBody>, Option<hyper::upgrade::Upgraded>), Attempt> {
    let stream = tokio::time::timeout(
        connect_timeout,
        tokio::net::TcpStream::connect(ep.address.as_str()),
    )
    .await
    .map_err(|_| Attempt::Connect("connect timed out".into(), None))?
    .map_err(|e| Attempt::Connect(e.to_string(), None))?;
    let _ = stream.set_nodelay(true);
    let (mut tx, conn) = http1::Builder::new()
        .handshake::<_, ProxyBody>(TokioIo::new(stream))
        .await
        .map_err(|e| Attempt::Connect(root_cause(&e), None))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended with error");
        }
    });
    let mut resp = match tokio::time::timeout(timeout, tx.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(Attempt::Exchange(root_cause(&e))),
        Err(_) => return Err(Attempt::Timeout),
    };
    ep.on_success();
    if !switched(resp.status()) {
        return Ok((resp.map(ProxyBody::Incoming), None));
    }
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| Attempt::Exchange(root_cause(&e)))?;
    Ok((resp.map(|_| crate::body::empty()), Some(upgraded)))
}

/// A response body from a pooled connection: returns the connection to
/// its pool once the body has been read to the end. A body dropped early
/// closes its connection instead (its remaining bytes are unread).
pub struct UpstreamBody {
    exchange: Exchange,
    pool: Arc<H1Pool>,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(conn) = self.exchange.take_idle() {
            self.pool.put(conn);
        }
    }
}

impl Drop for UpstreamBody {
    /// A body complete but never polled to its end (the answer to a
    /// `HEAD`, a 204) still gives its connection back.
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamBody")
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let r = self.exchange.poll_frame(cx);
        if r.is_ready() {
            self.release();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exchange.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;

    use super::*;

    /// A backend counting its accepted connections; with `close` it
    /// closes each connection after one response.
    async fn backend(close: bool) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"hi"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(3600)
    }

    fn get(addr: &str) -> Request<ProxyBody> {
        let mut r = Request::new(crate::body::empty());
        *r.uri_mut() = "/".parse().unwrap();
        r.headers_mut()
            .insert(http::header::HOST, addr.parse().unwrap());
        r
    }

    async fn exchange(pool: &Arc<H1Pool>, addr: &str) -> Bytes {
        let resp = pool
            .send(addr, Duration::from_secs(1), None, get(addr), far())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn reuses_one_connection_for_sequential_requests() {
        let (addr, accepted) = backend(false).await;
        let pool = Arc::new(H1Pool::default());
        for _ in 0..20 {
            assert_eq!(exchange(&pool, &addr).await, "hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_peer_is_not_an_error() {
        let (addr, accepted) = backend(true).await;
        let pool = Arc::new(H1Pool::default());
        for _ in 0..5 {
            assert_eq!(exchange(&pool, &addr).await, "hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_refused_connect_hands_the_request_back() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let pool = Arc::new(H1Pool::default());
        let mut req = get(&addr);
        req.headers_mut()
            .insert("x-marker", http::HeaderValue::from_static("kept"));
        match pool
            .send(&addr, Duration::from_secs(1), None, req, far())
            .await
        {
            Err(SendError::Connect(_, back)) => assert_eq!(back.headers()["x-marker"], "kept"),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
