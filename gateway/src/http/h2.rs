//! Upstream HTTP clients with pooled keep-alive connections, one per
//! (protocol, connect timeout, TLS settings) and shared by every service
//! with those settings, so pools survive config changes. A service with
//! `tls` gets connections that run the TLS handshake (ALPN `h2`) after
//! connecting ([`MeshConnector`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::http::body::ProxyBody;
use crate::tls::ClientTls;

/// A pooled upstream client.
pub type HttpClient = Client<MeshConnector, ProxyBody>;

/// Which wire protocol to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), or negotiated by ALPN over TLS.
    Http2,
}

/// Builds and caches clients.
#[derive(Default)]
pub struct Clients {
    cache: Mutex<HashMap<(Wire, u64, u64), HttpClient>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clients")
    }
}

impl Clients {
    /// The client for `wire` with `connect_timeout`, over `tls` when
    /// given. Called on config changes, not per request.
    pub fn get(
        &self,
        wire: Wire,
        connect_timeout: Duration,
        tls: Option<Arc<ClientTls>>,
    ) -> HttpClient {
        let key = (
            wire,
            connect_timeout.as_millis() as u64,
            tls.as_ref().map_or(0, |t| t.id),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| build_tls(wire, connect_timeout, tls))
            .clone()
    }
}

/// A plaintext client.
pub fn build(wire: Wire, connect_timeout: Duration) -> HttpClient {
    build_tls(wire, connect_timeout, None)
}

fn build_tls(wire: Wire, connect_timeout: Duration, tls: Option<Arc<ClientTls>>) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(connect_timeout));
    // The URI's scheme says what the request is (`https` over TLS); the
    // connector itself only connects TCP.
    conn.enforce_http(false);
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if wire == Wire::Http2 {
        b.http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10));
    }
    b.build(MeshConnector {
        tcp: conn,
        tls,
        handshake_timeout: connect_timeout,
    })
}

/// Connects TCP, then runs the TLS handshake when the service has `tls`.
#[derive(Clone)]
pub struct MeshConnector {
    tcp: HttpConnector,
    tls: Option<Arc<ClientTls>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector")
            .field("tls", &self.tls)
            .finish()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for MeshConnector {
    type Response = MeshIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri.clone());
        let tls = self.tls.clone();
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(MeshIo(TokioIo::new(Either::Left(tcp))));
            };
            let address = uri.authority().map_or("", |a| a.as_str()).to_string();
            let s = tokio::time::timeout(timeout, tls.connect(tcp, &address))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(MeshIo(TokioIo::new(Either::Right(s))))
        })
    }
}

/// An upstream connection of the HTTP/2 client, plain or TLS.
#[derive(Debug)]
pub struct MeshIo(TokioIo<Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>>);

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for MeshIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for MeshIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
