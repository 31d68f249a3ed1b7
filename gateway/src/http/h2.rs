//! Upstream HTTP clients with pooled keep-alive connections, one per
//! (protocol, connect timeout) and shared by every service with those
//! settings, so pools survive config changes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::http::body::ProxyBody;

/// A pooled upstream client.
pub type HttpClient = Client<HttpConnector, ProxyBody>;

/// Which wire protocol to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// Builds and caches clients.
#[derive(Default)]
pub struct Clients {
    cache: Mutex<HashMap<(Wire, u64), HttpClient>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clients")
    }
}

impl Clients {
    /// The client for `wire` with `connect_timeout`. Called on config
    /// changes, not per request.
    pub fn get(&self, wire: Wire, connect_timeout: Duration) -> HttpClient {
        let key = (wire, connect_timeout.as_millis() as u64);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| build(wire, connect_timeout))
            .clone()
    }
}

pub fn build(wire: Wire, connect_timeout: Duration) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(connect_timeout));
    conn.enforce_http(true);
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
    b.build(conn)
}
