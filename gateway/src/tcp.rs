//! L4: TCP routes and byte tunnels.
//!
//! A TCP route (`tcp_routes/<name>`: a port and a service) makes every
//! gateway with the ingress role listen on that port (on its ingress
//! listener's address) and proxy each connection, byte for byte, to one of
//! the service's endpoints: picked by the service's balancer (health checks
//! and ejections apply), with a refused connect moving on to the next
//! endpoint, under the service's `max_connections` breaker, and closed
//! after `timeouts.idle_ms` without data either way (default 1 hour).
//!
//! Listeners follow the config live: a new route binds its port, a
//! removed one stops accepting (its open connections carry on), and a
//! route pointed at another service sends new connections there. A port
//! that cannot be bound is logged and retried.
//!
//! [`tunnel`] is also what an upgraded HTTP connection (WebSocket) and an
//! HTTP `CONNECT` tunnel (a sidecar's plain-TCP local port) run on;
//! [`connect_service`] is how both reach a service's endpoint.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::resilience;
use crate::state::{ServiceRt, SharedSnapshot};

/// Idle timeout of tunnels whose service sets none.
pub const DEFAULT_TUNNEL_IDLE: Duration = Duration::from_secs(3600);
/// Endpoints tried per connection when connects are refused.
const MAX_CONNECT_ATTEMPTS: usize = 3;
/// How often a port that could not be bound is tried again.
const REBIND_EVERY: Duration = Duration::from_secs(5);

/// Copies bytes both ways until both sides are done, or until no byte has
/// moved either way for `idle` (then fails with `TimedOut`).
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Activity {
        io: a,
        start,
        last: last.clone(),
    };
    let mut b = Activity {
        io: b,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            r = &mut copy => return r,
            _ = tokio::time::sleep_until(due.into()) => {
                let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if Instant::now() >= due {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no data for {idle:?}"),
                    ));
                }
            }
        }
    }
}

/// An I/O object that records when it last read anything.
struct Activity<'a, T: ?Sized> {
    io: &'a mut T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Activity<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

struct Running {
    port: u16,
    stop: watch::Sender<bool>,
}

/// Keeps one listener per TCP route in step with the applied config until
/// `shutdown` turns true. `changed` ticks after every config apply.
pub async fn run_listeners<T>(
    ip: IpAddr,
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
    mut changed: watch::Receiver<T>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        let snap = snapshot.load_full();
        // Stop listeners whose route is gone or moved to another port.
        running.retain(|name, r| {
            let keep = snap.tcp_routes.get(name).is_some_and(|t| t.port == r.port);
            if !keep {
                let _ = r.stop.send(true);
                tracing::info!(route = %name, port = r.port, "tcp route removed; stopped listening");
            }
            keep
        });
        let mut unbound = false;
        for (name, route) in snap.tcp_routes.iter() {
            if running.contains_key(name) {
                continue;
            }
            let addr = SocketAddr::new(ip, route.port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(route = %name, %addr, "tcp route listening");
                    let (stop, stop_rx) = watch::channel(false);
                    tokio::spawn(accept_loop(
                        name.clone(),
                        l,
                        snapshot.clone(),
                        metrics.clone(),
                        stop_rx,
                    ));
                    running.insert(
                        name.clone(),
                        Running {
                            port: route.port,
                            stop,
                        },
                    );
                }
                Err(e) => {
                    unbound = true;
                    tracing::error!(route = %name, %addr, error = %e, "tcp route cannot bind its port; retrying");
                }
            }
        }
        metrics.tcp_listeners.set(running.len() as i64);
        let retry = async {
            if unbound {
                tokio::time::sleep(REBIND_EVERY).await
            } else {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            r = changed.changed() => if r.is_err() { break },
            _ = retry => {}
            _ = crate::server::wait_true(&mut shutdown) => break,
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
}

async fn accept_loop(
    route: String,
    listener: TcpListener,
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((client, peer)) => {
                    let _ = client.set_nodelay(true);
                    let (route, snapshot, metrics) = (route.clone(), snapshot.clone(), metrics.clone());
                    tokio::spawn(async move {
                        if let Err(e) = proxy_connection(&route, client, &snapshot, &metrics).await {
                            tracing::debug!(route = %route, %peer, error = %e, "tcp connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(route = %route, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = crate::server::wait_true(&mut stop) => return,
        }
    }
}

/// Connects `client` to an endpoint of the route's service and tunnels.
async fn proxy_connection(
    route: &str,
    mut client: TcpStream,
    snapshot: &SharedSnapshot,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let snap = snapshot.load_full();
    let not_found = |what: String| std::io::Error::new(std::io::ErrorKind::NotFound, what);
    let service = snap
        .tcp_routes
        .get(route)
        .map(|t| t.service.clone())
        .ok_or_else(|| not_found(format!("tcp route {route} is gone")))?;
    let svc = snap
        .services
        .get(service.as_str())
        .cloned()
        .ok_or_else(|| not_found(format!("service {service} is not configured")))?;
    drop(snap);
    let (mut upstream, _slot) = connect_service(&svc, metrics).await?;
    let idle = svc.idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE);
    tunnel(&mut client, &mut upstream, idle).await.map(|_| ())
}

/// Why no connection to a service could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("service {0}: max_connections reached")]
    CircuitOpen(Arc<str>),
    #[error("service {0} has no available endpoint")]
    NoEndpoint(Arc<str>),
    #[error("no endpoint of {0} accepts connections ({1} tried)")]
    Refused(Arc<str>, usize),
}

impl From<ConnectError> for std::io::Error {
    fn from(e: ConnectError) -> Self {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
    }
}

/// A TCP connection to one of the service's endpoints: picked by its
/// balancer, a refused or timed-out connect moving on to the next one (up
/// to 3), under its `max_connections` breaker (the slot is held as long as
/// the returned guard lives).
pub async fn connect_service(
    svc: &ServiceRt,
    metrics: &Metrics,
) -> Result<(TcpStream, Option<resilience::ConnSlot>), ConnectError> {
    let slot = match svc.conn_limit() {
        Some(limit) => match resilience::try_open(&limit) {
            Some(s) => Some(s),
            None => {
                metrics
                    .resilience
                    .with_label_values(&[&svc.name, "circuit_open"])
                    .inc();
                return Err(ConnectError::CircuitOpen(svc.name.clone()));
            }
        },
        None => None,
    };
    let mut tried = Vec::new();
    loop {
        let Some(ep) = (tried.len() < MAX_CONNECT_ATTEMPTS)
            .then(|| svc.balancer.pick(&tried))
            .flatten()
        else {
            return Err(if tried.is_empty() {
                ConnectError::NoEndpoint(svc.name.clone())
            } else {
                ConnectError::Refused(svc.name.clone(), tried.len())
            });
        };
        let connect = TcpStream::connect(ep.address.as_str());
        match tokio::time::timeout(svc.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                ep.on_success();
                let _ = s.set_nodelay(true);
                return Ok((s, slot));
            }
            Ok(Err(e)) => tracing::debug!(endpoint = %ep.address, error = %e, "tcp connect failed"),
            Err(_) => tracing::debug!(endpoint = %ep.address, "tcp connect timed out"),
        }
        ep.on_failure();
        metrics
            .connect_failures
            .with_label_values(&[&svc.name])
            .inc();
        tried.push(ep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tunnel_copies_both_ways_and_closes_when_idle() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(64);
        let (mut b_inner, mut b_outer) = tokio::io::duplex(64);
        let t = tokio::spawn(async move {
            tunnel(&mut a_inner, &mut b_inner, Duration::from_millis(200)).await
        });
        a_outer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b_outer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        b_outer.write_all(b"pong").await.unwrap();
        a_outer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Nothing more is sent: the tunnel gives up with TimedOut.
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
