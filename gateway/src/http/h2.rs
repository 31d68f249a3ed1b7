//! HTTP/2 upstream connections (`protocol: http2` and `grpc` services,
//! and the mesh hops that carry gRPC), multiplexed and pooled per
//! endpoint address.
//!
//! **A small set of connections per endpoint.** Requests go on the first
//! connection with a free stream, up to [`MAX_STREAMS`] at once on each
//! (RFC 9113 asks servers to allow at least 100; nginx allows 128,
//! HAProxy 100): past that, another connection is opened rather than the
//! request queued behind the others, so a load of N concurrent requests
//! holds about N / 100 connections and opens no more. One connect runs at
//! a time per endpoint; requests arriving meanwhile wait for it and use
//! its free streams. A stream's place is held until its response body is
//! done ([`H2Body`]).
//!
//! **A request never sent is sent again.** A connection that closed (a
//! GOAWAY, the peer's idle timeout) is noticed at pick or when hyper hands
//! the request back unsent ([`hyper::client::conn::http2::SendRequest::try_send_request`]);
//! the request then goes on another connection. Errors tell a failed
//! connect (nothing sent: safe to try another endpoint) from a failed
//! exchange.
//!
//! Each connection's frames are read and written by a task of its own
//! (hyper's), which also sends keep-alive pings. Clients are cached per
//! (connect timeout, TLS settings) by [`Clients`] and shared by every
//! service with those settings, so pools survive config changes. Over TLS
//! the service's client config offers ALPN `h2`.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::http::body::ProxyBody;
use crate::tls::ClientTls;

/// Which wire protocol to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), or negotiated by ALPN over TLS.
    Http2,
}

/// Streams at once on one upstream connection before another is opened.
pub const MAX_STREAMS: usize = 100;
/// How often a request handed back unsent is tried on another connection.
const UNSENT_TRIES: usize = 3;

/// Builds and caches clients.
#[derive(Default)]
pub struct Clients {
    cache: Mutex<HashMap<(u64, u64), HttpClient>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clients")
    }
}

impl Clients {
    /// The client with `connect_timeout`, over `tls` when given. Called on
    /// config changes, not per request.
    pub fn get(&self, connect_timeout: Duration, tls: Option<Arc<ClientTls>>) -> HttpClient {
        let key = (
            connect_timeout.as_millis() as u64,
            tls.as_ref().map_or(0, |t| t.id),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| HttpClient::new(connect_timeout, tls))
            .clone()
    }
}

/// A pooled HTTP/2 client: one [`H2Pool`] per endpoint address.
#[derive(Clone)]
pub struct HttpClient(Arc<ClientInner>);

struct ClientInner {
    connect_timeout: Duration,
    tls: Option<Arc<ClientTls>>,
    pools: Mutex<HashMap<String, Arc<H2Pool>>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("tls", &self.0.tls)
            .finish()
    }
}

/// Why an HTTP/2 request failed.
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// No connection could be made (TCP, TLS or the HTTP/2 handshake):
    /// nothing was sent.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// Connections kept closing under the request before it was sent.
    #[error("the connections closed before the request was sent")]
    NotSent,
    /// The exchange failed; the request may have been (partly) sent.
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}

impl H2Error {
    /// Nothing was sent: the request may go to another endpoint.
    pub fn is_connect(&self) -> bool {
        matches!(self, H2Error::Connect(_) | H2Error::NotSent)
    }
}

impl HttpClient {
    /// A plaintext (h2c) client.
    pub fn plain(connect_timeout: Duration) -> HttpClient {
        HttpClient::new(connect_timeout, None)
    }

    fn new(connect_timeout: Duration, tls: Option<Arc<ClientTls>>) -> HttpClient {
        HttpClient(Arc::new(ClientInner {
            connect_timeout,
            tls,
            pools: Mutex::default(),
        }))
    }

    /// Sends `req` to the endpoint at `address` (`host:port`). Its URI is
    /// absolute: scheme and authority become `:scheme` and `:authority`
    /// (the host the request is for, which need not be the address).
    pub async fn request(
        &self,
        address: &str,
        req: Request<ProxyBody>,
    ) -> Result<Response<H2Body>, H2Error> {
        let pool = self.pool(address);
        pool.send(&self.0, req).await
    }

    fn pool(&self, authority: &str) -> Arc<H2Pool> {
        let mut pools = self.0.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get(authority) {
            return p.clone();
        }
        let p = Arc::new(H2Pool::new(authority));
        pools.insert(authority.to_string(), p.clone());
        p
    }

    /// Open connections to `authority` (tests, metrics).
    pub fn connections(&self, authority: &str) -> usize {
        self.pool(authority).live()
    }
}

/// The HTTP/2 connections of one endpoint.
struct H2Pool {
    address: String,
    conns: Mutex<Vec<H2Conn>>,
    /// Held while a connection is being opened (one at a time).
    connecting: tokio::sync::Mutex<()>,
}

struct H2Conn {
    tx: SendRequest<ProxyBody>,
    /// Streams open on it now.
    streams: Arc<AtomicUsize>,
}

/// A stream's place on its connection, released when dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl H2Pool {
    fn new(address: &str) -> H2Pool {
        H2Pool {
            address: address.to_string(),
            conns: Mutex::default(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<H2Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> usize {
        let mut conns = self.lock();
        conns.retain(|c| !c.tx.is_closed());
        conns.len()
    }

    /// A free stream on the first open connection that has one.
    fn pick(&self) -> Option<(SendRequest<ProxyBody>, StreamSlot)> {
        let mut conns = self.lock();
        conns.retain(|c| !c.tx.is_closed());
        conns.iter().find_map(|c| {
            let taken = c.streams.fetch_add(1, Ordering::AcqRel);
            if taken < MAX_STREAMS && c.tx.is_ready() {
                Some((c.tx.clone(), StreamSlot(c.streams.clone())))
            } else {
                c.streams.fetch_sub(1, Ordering::AcqRel);
                None
            }
        })
    }

    async fn send(
        &self,
        client: &ClientInner,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<H2Body>, H2Error> {
        for _ in 0..UNSENT_TRIES {
            let (mut tx, slot) = match self.pick() {
                Some(free) => free,
                None => self.open(client).await?,
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|inner| H2Body { inner, _slot: slot }));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: that connection is closing; try another.
                    Some(back) => req = back,
                    None => return Err(H2Error::Exchange(e.into_error())),
                },
            }
        }
        Err(H2Error::NotSent)
    }

    /// A new connection (or a free stream on one opened meanwhile).
    async fn open(
        &self,
        client: &ClientInner,
    ) -> Result<(SendRequest<ProxyBody>, StreamSlot), H2Error> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(free) = self.pick() {
            return Ok(free);
        }
        let io = connect(&self.address, client.connect_timeout, client.tls.as_deref())
            .await
            .map_err(H2Error::Connect)?;
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        let handshake = tokio::time::timeout(client.connect_timeout, b.handshake(io));
        let (tx, conn) = match handshake.await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(H2Error::Connect(io::Error::other(e))),
            Err(_) => {
                return Err(H2Error::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP/2 handshake timed out",
                )))
            }
        };
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%address, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        let streams = Arc::new(AtomicUsize::new(1));
        self.lock().push(H2Conn {
            tx: tx.clone(),
            streams: streams.clone(),
        });
        Ok((tx, StreamSlot(streams)))
    }
}

/// An HTTP/2 upstream connection, plain or TLS.
type H2Io = TokioIo<Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>>;

/// Connects TCP to `address` and runs the TLS handshake over it when
/// `tls` is given, all within `timeout`.
async fn connect(address: &str, timeout: Duration, tls: Option<&ClientTls>) -> io::Result<H2Io> {
    let connecting = async {
        let tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, io::Error>(match tls {
            None => Either::Left(tcp),
            Some(tls) => Either::Right(tls.connect(tcp, address).await?),
        })
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(r) => r.map(TokioIo::new),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {} ms", timeout.as_millis()),
        )),
    }
}

/// A response body from an HTTP/2 upstream: holds its stream's place on
/// the connection until it is dropped.
pub struct H2Body {
    inner: Incoming,
    _slot: StreamSlot,
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H2Body")
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;

    use super::*;

    /// An h2c backend that holds every answer until `together` requests
    /// are in at once; counts its connections.
    async fn backend(together: usize, max_streams: u32) -> (String, Arc<AtomicU64>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let n = accepted.clone();
        let barrier = Arc::new(tokio::sync::Barrier::new(together));
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let barrier = barrier.clone();
                        async move {
                            barrier.wait().await;
                            let body = req.uri().path().to_string();
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: &str, i: usize) -> Request<ProxyBody> {
        Request::get(format!("http://{addr}/{i}"))
            .version(http::Version::HTTP_2)
            .body(crate::http::body::empty())
            .unwrap()
    }

    async fn at_once(client: &HttpClient, addr: &str, n: usize) {
        let all = (0..n).map(|i| {
            let client = client.clone();
            let addr = addr.to_string();
            async move {
                let resp = client.request(&addr, get(&addr, i)).await.unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, format!("/{i}"));
            }
        });
        futures::future::join_all(all).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_share_one_connection_up_to_the_limit_then_a_second_opens() {
        // 150 at once: 100 on the first connection, 50 on a second.
        let (addr, accepted) = backend(150, 1000).await;
        let client = HttpClient::plain(Duration::from_secs(30));
        at_once(&client, &addr, 150).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Again: the same two carry it, nothing new is opened.
        for _ in 0..3 {
            at_once(&client, &addr, 150).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(client.connections(&addr), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_under_the_limit_uses_one_connection() {
        let (addr, accepted) = backend(40, 1000).await;
        let client = HttpClient::plain(Duration::from_secs(30));
        for _ in 0..3 {
            at_once(&client, &addr, 40).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let client = HttpClient::plain(Duration::from_secs(1));
        let e = client.request(&addr, get(&addr, 0)).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_the_peer_closed_is_replaced() {
        // A backend that serves one request per connection, then closes it
        // (GOAWAY): every request still succeeds.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                    let tx = Mutex::new(Some(tx));
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        if let Some(tx) = tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"once"),
                            )))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = rx => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        let client = HttpClient::plain(Duration::from_secs(30));
        for i in 0..5 {
            let resp = client.request(&addr, get(&addr, i)).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "once");
            // The peer closes it; the next request opens another.
            crate::testing::eventually("the peer's close is seen", || {
                client.connections(&addr) == 0
            })
            .await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }
}
