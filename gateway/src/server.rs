//! Listeners: the accept loop shared by gateway and sidecar. Each connection
//! is served by hyper's auto builder (HTTP/1.1 with keep-alive, or HTTP/2
//! cleartext by prior knowledge), with a header read timeout against slow
//! clients. Malformed HTTP/1 gets `400 Bad Request` and a closed connection.
//! On shutdown the loop stops accepting and in-flight requests are drained
//! up to a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;

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
) where
    H: Fn(Peer, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .max_concurrent_streams(1024);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let (stream, remote) = match res {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                let peer = Peer::new(remote);
                let svc = service_fn(move |req| {
                    // Not boxed here: hyper keeps one boxed slot per
                    // connection and moves each request's future into it.
                    let fut = h(peer.clone(), req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(listener = name, %remote, error = %e, "connection ended with error");
                    }
                });
            }
            _ = wait_true(&mut shutdown) => break,
        }
    }
    drop(listener);
    tracing::info!(listener = name, "stopped accepting; draining connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain deadline reached; closing remaining connections"
        );
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
