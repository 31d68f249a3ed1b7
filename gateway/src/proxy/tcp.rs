//! L4: TCP routes.
//!
//! A TCP route (`tcp_routes/<name>`: a port and a service) makes every
//! gateway with the ingress role listen on that port (on its ingress
//! listener's address) and proxy each connection, byte for byte, to one of
//! the service's endpoints: picked by the service's balancer (health checks
//! and ejections apply), with a refused connect moving on to the next
//! endpoint, under the service's `max_connections` breaker, and closed
//! after `timeouts.idle_ms` without data either way (default 1 hour). The
//! connect runs the same attempt loop as HTTP ([`connect_service`]).
//!
//! Listeners follow the config live: a new route binds its port, a
//! removed one stops accepting (its open connections carry on), and a
//! route pointed at another service sends new connections there. A port
//! that cannot be bound is logged and retried.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::server::listeners::Listener;
use tokio::sync::watch;

use crate::http::tunnel::{tunnel, DEFAULT_TUNNEL_IDLE};
use crate::metrics::Metrics;
use crate::proxy::tunnel::connect_service;
use crate::snapshot::SharedSnapshot;

/// How often a port that could not be bound is tried again.
const REBIND_EVERY: Duration = Duration::from_secs(5);

struct Running {
    port: u16,
    stop: watch::Sender<bool>,
}

/// Keeps one listener per TCP route in step with the applied config until
/// `shutdown` turns true. `changed` ticks after every config apply.
pub(crate) async fn run_listeners<T>(
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
            match crate::server::listeners::bind(addr).await {
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
    listener: Listener,
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let name = route.clone();
    let conn = move |client, peer| {
        let (route, snapshot, metrics) = (route.clone(), snapshot.clone(), metrics.clone());
        async move {
            if let Err(e) = proxy_connection(&route, client, &snapshot, &metrics).await {
                tracing::debug!(route = %route, %peer, error = %e, "tcp connection ended");
            }
        }
    };
    crate::server::serve_tcp(&name, listener, conn, stop).await
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
    let (mut upstream, _slot) = connect_service(&svc, metrics)
        .await
        .map_err(|f| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, f.to_string()))?;
    let idle = svc.idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE);
    tunnel(&mut client, &mut upstream, idle).await.map(|_| ())
}
