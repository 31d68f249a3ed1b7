//! Listeners: the accept loop shared by gateway and sidecar. Each
//! connection starts on the HTTP/1.1 fast path ([`crate::server::h1`]); the
//! first request it does not serve (an upload to stream, an upgrade, the
//! HTTP/2 preface, malformed input) hands the connection, with the bytes
//! already read, to hyper's auto builder for the rest of its life
//! (HTTP/1.1 with keep-alive and upgrades, or HTTP/2 cleartext by prior
//! knowledge; its streams run in the connection's task, see [`streams`]).
//! Both enforce the same [`Limits`]: a request-read timeout
//! against slow senders, a largest request head (431), and, through
//! [`client_io`], a write timeout against clients that stop reading and a
//! lingering close. Malformed HTTP/1 gets hyper's `400 Bad Request` and a
//! closed connection. A TLS listener ([`crate::tls::TlsListener`]) runs
//! each connection's handshake first, in the connection's task, bounded by
//! its handshake timeout; a failed handshake costs only its connection.
//! On shutdown the loop stops accepting; handshakes under way finish, a
//! request in flight is answered with `connection: close` (HTTP/2: a
//! GOAWAY), an idle HTTP/1.1 connection is kept briefly for a request its
//! client may be sending, and everything ends by the grace deadline.
//! [`listeners`] binds every listener, taking over the sockets of the
//! process a hot upgrade replaces.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use listeners::Listener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::http::body::{ProxyBody, RequestBody};
use crate::tls::{TlsInfo, TlsListener};
pub(crate) mod client_io;
#[cfg(test)]
mod differential;
pub(crate) mod h1;
pub mod listeners;
mod streams;

use client_io::{ClientIo, Stream};
use h1::End;
pub use h1::{Limits, DEFAULT_MAX_HEAD, DEFAULT_WRITE_TIMEOUT, MIN_MAX_HEAD};
use streams::{ConnExec, Streams};

/// The client end of a connection, resolved once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's IP as a header value (for `x-forwarded-for`).
    pub ip: HeaderValue,
    /// What the TLS handshake settled; `None` on a plaintext listener.
    pub tls: Option<Arc<TlsInfo>>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            ip: HeaderValue::from_str(&addr.ip().to_string()).expect("an IP is a valid header"),
            tls: None,
        }
    }
}

/// Serves HTTP on `listener` with `handler` until `shutdown` turns true,
/// then drains open connections for at most `grace`.
pub async fn serve<H, F>(
    name: &'static str,
    listener: impl Into<Listener>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    limits: Limits,
    tls: Option<TlsListener>,
) where
    H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // After a request served on the fast path the connection is HTTP/1.1
    // for good: the rest goes to hyper's HTTP/1 alone.
    let mut h1_only = hyper::server::conn::http1::Builder::new();
    h1_only
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_read)
        .max_buf_size(limits.max_head.max(MIN_MAX_HEAD))
        .keep_alive(true);
    let hyper = Arc::new(h1_only);
    let listener: Listener = listener.into();
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            (stream, remote) = accept(name, &listener) => {
                let handler = handler.clone();
                let hyper = hyper.clone();
                let mut shutdown = shutdown.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let mut peer = Peer::new(remote);
                    let stream = match tls {
                        None => Stream::Plain(stream),
                        Some(tls) if tls.plaintext_too.load(std::sync::atomic::Ordering::Acquire) && !starts_tls(&stream, tls.handshake_timeout).await => {
                            tls.handshakes.with_label_values(&[name, "plaintext"]).inc();
                            Stream::Plain(stream)
                        }
                        Some(tls) => match boxed(|| handshake(name, &tls, stream)).await {
                            Some((s, info)) => {
                                peer.tls = Some(Arc::new(info));
                                Stream::Tls(Box::new(s))
                            }
                            None => return,
                        },
                    };
                    let mut stream = ClientIo::new(stream, limits.write_timeout);
                    let end = match limits.fast_path {
                        true => h1::serve(&mut stream, &peer, &handler, &mut shutdown, limits).await,
                        false => End::HandOff { read: Default::default(), served: false },
                    };
                    match end {
                        End::Closed => {
                            let _ = stream.shutdown().await;
                        }
                        End::HandOff { read, served } => {
                            let io = Rewind { read: read.freeze(), io: stream };
                            let conn = match served {
                                true => Hyper::Http1(&hyper),
                                false => Hyper::Auto,
                            };
                            // Boxed: hyper's connection state would
                            // otherwise size every connection's task.
                            if let Err(e) = boxed(|| with_hyper(io, peer, handler, conn, limits, shutdown)).await {
                                tracing::debug!(listener = name, %remote, error = %e, "connection ended with error");
                            }
                        }
                    }
                });
            }
            _ = wait_true(&mut shutdown) => break,
        }
    }
    drop(listener);
    connections.close();
    tracing::info!(listener = name, "stopped accepting; draining connections");
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain deadline reached; closing remaining connections"
        );
    }
}

/// Whether a connection starts with a TLS handshake record (a
/// permissive listener's test; waits at most `timeout` for a first byte).
async fn starts_tls(stream: &TcpStream, timeout: Duration) -> bool {
    const HANDSHAKE_RECORD: u8 = 0x16;
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] == HANDSHAKE_RECORD
    )
}

/// The server side of a TLS handshake, bounded by the listener's handshake
/// timeout (and given up on shutdown). A failure is logged at debug level
/// (clients probing with garbage are common) and counted.
async fn handshake(
    name: &str,
    tls: &TlsListener,
    stream: TcpStream,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, TlsInfo)> {
    let remote = stream.peer_addr().ok();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.load_full());
    // A handshake under way when the listener stops is finished (bounded
    // by the handshake timeout), so its request is served, not cut.
    let result = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream)).await;
    let outcome = match result {
        Ok(Ok(s)) => {
            let info = TlsInfo::of(s.get_ref().1);
            tls.handshakes.with_label_values(&[name, "ok"]).inc();
            return Some((s, info));
        }
        // A certificate refused on a listener that verifies clients (the
        // mesh's) is news: logged plainly. Other failures (scanners,
        // garbage) only at debug level.
        Ok(Err(e)) if refused_certificate(&e) => {
            tracing::warn!(listener = name, remote = ?remote, error = %e, "TLS handshake refused: the client's certificate");
            "failed"
        }
        Ok(Err(e)) => {
            tracing::debug!(listener = name, remote = ?remote, error = %e, "TLS handshake failed");
            "failed"
        }
        Err(_) => {
            tracing::debug!(listener = name, remote = ?remote, "TLS handshake timed out");
            "timeout"
        }
    };
    tls.handshakes.with_label_values(&[name, outcome]).inc();
    None
}

/// Whether a handshake failed on the client's certificate (expired, not
/// yet valid, of another CA, none where one is required).
fn refused_certificate(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    )
}

/// Accepts plain TCP connections on `listener` until `stop` turns true,
/// each handled by `conn` in a task of its own (open connections carry on
/// after the listener stops).
pub async fn serve_tcp<H, F>(
    name: &str,
    listener: Listener,
    conn: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            (stream, remote) = accept(name, &listener) => {
                tokio::spawn(conn(stream, remote));
            }
            _ = wait_true(&mut stop) => return,
        }
    }
}

/// The next connection, with `TCP_NODELAY` set. Accept errors (EMFILE and
/// friends) are logged and backed off from instead of spinning.
async fn accept(name: &str, listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                return (stream, remote);
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// hyper's server for a connection that may be HTTP/1.1 or HTTP/2 by
/// prior knowledge, with the connection's own executor (see [`streams`]).
fn auto_builder(limits: Limits, exec: ConnExec) -> Builder<ConnExec> {
    let mut builder = Builder::new(exec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_read)
        .max_buf_size(limits.max_head.max(MIN_MAX_HEAD))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .max_header_list_size(u32::try_from(limits.max_head).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024);
    builder
}

/// Which of hyper's connections serves the rest of a connection.
enum Hyper<'a> {
    /// HTTP/1.1, or HTTP/2 by prior knowledge.
    Auto,
    /// HTTP/1.1 only (the fast path served a request first).
    Http1(&'a hyper::server::conn::http1::Builder),
}

/// Serves the rest of a connection with hyper, with upgrades; on shutdown
/// it finishes the requests in flight and closes. An HTTP/1 head over
/// [`Limits::max_head`] that hyper read whole (it checks its buffer only
/// while a head is incomplete) gets 431 here.
async fn with_hyper<H, F>(
    io: Rewind,
    peer: Peer,
    handler: H,
    conn: Hyper<'_>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        // Boxed: hyper moves the future it is given several times (into
        // its HTTP/2 stream task, into the executor), and the proxy's is
        // kilobytes; moved by value it was most of the instructions of an
        // HTTP/2 request (callgrind).
        let fut = (h1_head_len(&req) <= limits.max_head)
            .then(|| boxed(|| handler(peer.clone(), req.map(RequestBody::Incoming))));
        async move {
            Ok::<_, Infallible>(match fut {
                Some(fut) => fut.await,
                None => head_too_large(),
            })
        }
    });
    let io = TokioIo::new(io);
    match conn {
        Hyper::Auto => {
            let mut streams = Streams::default();
            let builder = auto_builder(limits, streams.exec());
            let conn = builder.serve_connection_with_upgrades(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                res = streams::drive(&mut streams, conn.as_mut()) => res,
                _ = wait_true(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    streams::drive(&mut streams, conn.as_mut()).await
                }
            }
        }
        Hyper::Http1(b) => {
            let conn = b.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => res.map_err(Into::into),
                _ = wait_true(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await.map_err(Into::into)
                }
            }
        }
    }
}

/// A future, boxed (a request's, or a connection's stage), so that it
/// does not size the task that awaits it. The box is allocated first and
/// the future made after, so that the compiler can build it in the box
/// rather than on the stack and then copy it in: the proxy's future is
/// about 8 KB, and `Box::pin(handler(..))` copied all of it on every
/// request.
#[inline(always)]
pub(crate) fn boxed<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

/// The size of an HTTP/1 request's head as sent in the usual form
/// (`name: value` lines); 0 for HTTP/2, whose header list hyper's
/// `max_header_list_size` bounds.
fn h1_head_len<B>(req: &Request<B>) -> usize {
    if req.version() == http::Version::HTTP_2 {
        return 0;
    }
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| {
            a.as_str().len() + uri.scheme_str().map_or(0, |s| s.len() + 3)
        });
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + fields + 2
}

/// 431 and the connection closed, as the fast path answers it.
fn head_too_large() -> Response<ProxyBody> {
    let mut resp = Response::new(crate::http::body::empty());
    *resp.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A client connection with bytes already read from it: they are read
/// again first.
struct Rewind {
    read: Bytes,
    io: ClientIo,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Resolves once the flag is true (or its sender is gone).
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
