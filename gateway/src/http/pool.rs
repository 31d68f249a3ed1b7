//! HTTP/1.1 upstream connections, pooled per endpoint.
//!
//! Each endpoint keeps its idle keep-alive connections ([`Conn`]) in a
//! LIFO stack. The request path checks one out, or connects, and
//! runs the exchange on it from its own task ([`super::h1`]); the response
//! body hands the connection back when it has been read to the end, so a
//! connection is never shared by two exchanges. Compared with hyper-util's
//! pooled client this skips the per-request pool-key hashing, the
//! connector service, the checkout futures and hyper's per-connection
//! task, and it lets the caller tell the ways a send can fail: no
//! connection (safe to try elsewhere), the connection limit, a failure of
//! the request's own body (the client's), and a failure after the request
//! was (or may have been) written. A pooled connection the peer has
//! closed is noticed at checkout and skipped.
//!
//! **How many stay open.** Every connection that comes back whole is kept:
//! no count cap, so a load that needs N connections at once keeps N and
//! opens none after warming up (a fixed cap closed and re-opened
//! connections at the rate of the load once concurrency passed it). What
//! bounds them is the service's `max_connections` (idle ones hold their
//! slot) and time: the stack is used from the top, so connections beyond
//! what the load needs sink to the bottom and are closed once idle for
//! [`IDLE_TIMEOUT`] (as the pool is used, and by
//! [`crate::upstream::endpoint::EndpointRegistry::sweep_idle`] when it is
//! not). This is HAProxy's policy (`http-reuse`, idle connections purged
//! by age), with most-recently-used first, as Envoy and HAProxy pick.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};

use crate::http::body::ProxyBody;
use crate::http::h1::{Conn, DeadlinePassed, Exchange, RequestBodyFailed};
use crate::http::limit::{self, ConnLimit, ConnSlot, Overflow};
use crate::tls::ClientTls;

/// Idle connections older than this are closed instead of reused.
/// Shorter than the keep-alive timeouts of common servers (nginx 75 s,
/// Node 5 s excepted: its close is noticed at checkout), so the pool
/// usually closes first.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The idle HTTP/1.1 connections of one endpoint.
#[derive(Default)]
pub struct H1Pool {
    /// Most recently used at the back, each with when it came back.
    idle: Mutex<VecDeque<(Conn, Instant)>>,
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
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent, and here is the
    /// request back, to try elsewhere.
    Connect(std::io::Error, Box<Request<ProxyBody>>),
    /// The service's connection limit refused it: nothing was sent.
    Overflow(Overflow),
    /// The request's own body failed while it was sent (the client's
    /// fault); part of the request may have been sent.
    RequestBody(std::io::Error),
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
            SendError::Overflow(o) => write!(f, "{} reached", o.as_str()),
            SendError::RequestBody(e) | SendError::Exchange(e) => write!(f, "{e}"),
            SendError::Timeout => f.write_str("no response head by the deadline"),
        }
    }
}

impl H1Pool {
    pub(crate) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Conn, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some((mut conn, since)) = idle.pop_back() {
            if now.duration_since(since) >= IDLE_TIMEOUT {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if conn.usable_when_idle() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    fn put(&self, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.lock();
        let expired = expire(&mut idle, now);
        idle.push_back((conn, now));
        drop(idle);
        drop(expired);
        self.released.notify_waiters();
    }

    /// Closes the connections idle for [`IDLE_TIMEOUT`] or longer; returns
    /// how many.
    pub(crate) fn close_expired(&self) -> usize {
        self.close_expired_at(Instant::now())
    }

    fn close_expired_at(&self, now: Instant) -> usize {
        let expired = {
            let mut idle = self.lock();
            expire(&mut idle, now)
        };
        // Closed (dropped) outside the lock.
        expired.len()
    }

    /// A new connection slot under `limit`: at once when one is free, else
    /// after waiting (as one of at most `max_pending` requests) for a
    /// connection of this endpoint to come back idle (`Err(conn)`) or
    /// for any connection of the service to close.
    async fn slot_or_idle(
        &self,
        limit: &ConnLimit<'_>,
    ) -> Result<Result<ConnSlot, Conn>, Overflow> {
        if let Some(s) = limit::try_open(limit) {
            return Ok(Ok(s));
        }
        if limit.max_pending == 0 {
            return Err(Overflow::Connections);
        }
        let Some(_pending) = limit::wait_slot(limit) else {
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
            if let Some(s) = limit::try_open(limit) {
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
    /// it; otherwise the request waits (see [`ConnLimit`]).
    pub(crate) async fn send(
        self: &Arc<Self>,
        address: &str,
        tls: Option<&ClientTls>,
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
                    Box::pin(self.open(address, tls, connect_timeout, limit)),
                );
                match opened.await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(Opened::Failed(e))) => return Err(SendError::Connect(e, Box::new(req))),
                    Ok(Err(Opened::Overflow(o))) => return Err(SendError::Overflow(o)),
                    Err(_) => return Err(SendError::Timeout),
                }
            }
        };
        let (parts, exchange) = conn.send(req, deadline).await.map_err(|e| {
            if DeadlinePassed::is(&e) {
                SendError::Timeout
            } else if RequestBodyFailed::of_io(&e).is_some() {
                SendError::RequestBody(e)
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
        tls: Option<&ClientTls>,
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
        Conn::connect(address, connect_timeout, slot, tls)
            .await
            .map_err(Opened::Failed)
    }
}

/// Takes the connections idle since before `now` − [`IDLE_TIMEOUT`] off
/// the bottom of the stack (the oldest are there).
fn expire(idle: &mut VecDeque<(Conn, Instant)>, now: Instant) -> Vec<(Conn, Instant)> {
    let n = idle
        .iter()
        .take_while(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT)
        .count();
    idle.drain(..n).collect()
}

/// Why no connection was opened.
enum Opened {
    Failed(std::io::Error),
    Overflow(Overflow),
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
    use hyper_util::rt::TokioIo;

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
        let mut r = Request::new(crate::http::body::empty());
        *r.uri_mut() = "/".parse().unwrap();
        r.headers_mut()
            .insert(http::header::HOST, addr.parse().unwrap());
        r
    }

    async fn exchange(pool: &Arc<H1Pool>, addr: &str) -> Bytes {
        let resp = pool
            .send(addr, None, Duration::from_secs(1), None, get(addr), far())
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

    /// A backend that answers once `together` requests are in at once
    /// (so that many connections are open together), counting the
    /// connections it accepted and those still open.
    struct Gathering {
        addr: String,
        accepted: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
    }

    async fn gathering(together: usize) -> Gathering {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(together));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (barrier, o) = (barrier.clone(), o.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let barrier = barrier.clone();
                        async move {
                            barrier.wait().await;
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"hi"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Gathering {
            addr,
            accepted,
            open,
        }
    }

    /// `n` requests at once through `pool`, each answered in full. The
    /// connect timeout is generous: hundreds of connects at once on a busy
    /// machine can wait for the backend's accept loop.
    async fn at_once(pool: &Arc<H1Pool>, addr: &str, n: usize) {
        let all = (0..n).map(|_| async {
            let resp = pool
                .send(addr, None, Duration::from_secs(30), None, get(addr), far())
                .await
                .unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        });
        for body in futures::future::join_all(all).await {
            assert_eq!(body, "hi");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_as_many_connections_as_the_load_needs_at_once() {
        // More than any fixed idle cap the pool had (256): each round
        // needs 300 connections open together.
        const AT_ONCE: usize = 300;
        let b = gathering(AT_ONCE).await;
        let pool = Arc::new(H1Pool::default());
        at_once(&pool, &b.addr, AT_ONCE).await;
        assert_eq!(b.accepted.load(Ordering::SeqCst), AT_ONCE);
        assert_eq!(pool.idle_count(), AT_ONCE);
        for _ in 0..3 {
            at_once(&pool, &b.addr, AT_ONCE).await;
        }
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            AT_ONCE,
            "connections were opened again after warming up"
        );
        assert_eq!(pool.idle_count(), AT_ONCE);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_past_their_time_are_closed() {
        let b = gathering(20).await;
        let pool = Arc::new(H1Pool::default());
        at_once(&pool, &b.addr, 20).await;
        assert_eq!(pool.idle_count(), 20);
        // Not yet.
        assert_eq!(pool.close_expired(), 0);
        assert_eq!(pool.close_expired_at(Instant::now() + IDLE_TIMEOUT), 20);
        assert_eq!(pool.idle_count(), 0);
        crate::testing::eventually("the backend sees them closed", || {
            b.open.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_limit_holds_under_concurrency() {
        let b = gathering(1).await;
        let pool = Arc::new(H1Pool::default());
        let counter = Arc::new(limit::ConnCounter::default());
        let lim = ConnLimit {
            counter: &counter,
            max_connections: 8,
            max_pending: 1000,
        };
        let sends = (0..200).map(|_| {
            let pool = pool.clone();
            let addr = b.addr.clone();
            async move {
                let resp = pool
                    .send(
                        &addr,
                        None,
                        Duration::from_secs(30),
                        Some(lim),
                        get(&addr),
                        far(),
                    )
                    .await
                    .unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            }
        });
        for body in futures::future::join_all(sends).await {
            assert_eq!(body, "hi");
        }
        assert!(
            b.accepted.load(Ordering::SeqCst) <= 8,
            "{} connections opened under a limit of 8",
            b.accepted.load(Ordering::SeqCst)
        );
        assert!(counter.open.load(Ordering::SeqCst) <= 8);
        assert_eq!(
            pool.idle_count() as u32,
            counter.open.load(Ordering::SeqCst)
        );
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
            .send(&addr, None, Duration::from_secs(1), None, req, far())
            .await
        {
            Err(SendError::Connect(_, back)) => assert_eq!(back.headers()["x-marker"], "kept"),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
