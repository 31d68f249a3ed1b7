//! Listeners: the accept loop shared by gateway and sidecar. Each
//! connection starts on the HTTP/1.1 fast path ([`crate::server::h1`]); the
//! first request it does not serve (an upload to stream, an upgrade, the
//! HTTP/2 preface, malformed input) hands the connection, with the bytes
//! already read, to hyper's auto builder for the rest of its life
//! (HTTP/1.1 with keep-alive and upgrades, or HTTP/2 cleartext by prior
//! knowledge). Both enforce the same [`Limits`]: a request-read timeout
//! against slow senders, a largest request head (431), and, through
//! [`client_io`], a write timeout against clients that stop reading and a
//! lingering close. Malformed HTTP/1 gets hyper's `400 Bad Request` and a
//! closed connection. On shutdown the loop stops accepting, idle
//! connections close, and in-flight requests are drained up to a deadline.

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::http::body::{ProxyBody, RequestBody};
pub(crate) mod client_io;
pub(crate) mod h1;

use client_io::ClientIo;
use h1::End;
pub use h1::{Limits, DEFAULT_MAX_HEAD, DEFAULT_WRITE_TIMEOUT, MIN_MAX_HEAD};

/// The client end of a connection, resolved once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's IP as a header value (for `x-forwarded-for`).
    pub ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            ip: HeaderValue::from_str(&addr.ip().to_string()).expect("an IP is a valid header"),
        }
    }
}

/// Serves HTTP on `listener` with `handler` until `shutdown` turns true,
/// then drains open connections for at most `grace`.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    limits: Limits,
) where
    H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
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
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            (stream, remote) = accept(name, &listener) => {
                let handler = handler.clone();
                let builder = builder.clone();
                let mut shutdown = shutdown.clone();
                connections.spawn(async move {
                    let mut stream = ClientIo::new(stream, limits.write_timeout);
                    let peer = Peer::new(remote);
                    let end = match limits.fast_path {
                        true => h1::serve(&mut stream, &peer, &handler, &mut shutdown, limits).await,
                        false => End::HandOff(Default::default()),
                    };
                    match end {
                        End::Closed => {
                            let _ = stream.shutdown().await;
                        }
                        End::HandOff(read) => {
                            let io = Rewind { read: read.freeze(), io: stream };
                            if let Err(e) = with_hyper(io, peer, handler, &builder, shutdown).await {
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

/// Accepts plain TCP connections on `listener` until `stop` turns true,
/// each handled by `conn` in a task of its own (open connections carry on
/// after the listener stops).
pub async fn serve_tcp<H, F>(
    name: &str,
    listener: TcpListener,
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

/// Serves the rest of a connection with hyper's auto builder (HTTP/1.1,
/// or HTTP/2 by prior knowledge), with upgrades; on shutdown it finishes
/// the requests in flight and closes.
async fn with_hyper<H, F>(
    io: Rewind,
    peer: Peer,
    handler: H,
    builder: &Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: Fn(Peer, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let fut = handler(peer.clone(), req.map(RequestBody::Incoming));
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => res,
        _ = wait_true(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
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
