//! The Meshgate proxy engine and the gateway process.
//!
//! Module map (each owns one concern):
//! - [`server`]: listeners, HTTP/1.1 + h2c connections, graceful drain
//! - [`h1_server`]: the HTTP/1.1 fast path those connections start on
//! - [`proxy`]: the gateway request path, in order (see its docs)
//! - [`router`]: route tables and matching
//! - [`balance`]: load-balancing policies, priorities, endpoint state
//!   (ejection, outlier counters, health verdict)
//! - [`health`]: active health checks, one prober per endpoint address
//! - [`resilience`]: circuit-breaker counters, retry policy and budget
//! - [`tcp`]: L4 routes: TCP listeners proxied to a service's endpoints
//! - [`upstream`]: HTTP/1.1 upstream connections pooled per endpoint
//! - [`h1`]: the HTTP/1.1 client codec those connections run
//! - [`client`]: the shared HTTP/2 upstream client
//! - [`state`]: the compiled snapshot and the compiler applying store changes
//! - [`headers`], [`body`], [`error`]: wire conventions, bodies, synthetic errors
//! - [`metrics`], [`ops`]: Prometheus metrics and the ops port
//! - [`process`]: the gateway process wiring and node config
//! - [`alloc`]: the process allocator (mimalloc)
//!
//! The lite sidecar is built from the same parts.

// Unsafe code is refused everywhere but in the allocator shim.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod alloc;

pub mod balance;
pub mod body;
pub mod client;
pub mod error;
pub mod explain;
pub mod h1;
pub mod h1_server;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod ops;
pub mod process;
pub mod proxy;
pub mod resilience;
pub mod router;
pub mod server;
pub mod state;
pub mod tcp;
pub mod upstream;
