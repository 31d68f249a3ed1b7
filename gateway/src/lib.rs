//! The Meshgate proxy engine and the gateway process.
//!
//! The engine is layered; a module only imports from layers below it
//! (`scripts/check-layers.sh` fails the build on an upward import):
//!
//! | layer | owns |
//! |---|---|
//! | [`alloc`], [`clock`], [`maps`], [`metrics`], [`tls`], `testing` | leaves: the allocator, the monotonic clock, the config-table map type, Prometheus handles, TLS configs and the certificates served by SNI; the unit tests' shared helpers (`cfg(test)` only) |
//! | [`http`] | bodies, headers, the synthetic error vocabulary, HTTP/1 wire primitives, the h1 client codec and pool, connection limits, the h2 client, the byte tunnel |
//! | [`server`], [`upstream`], [`observe`], [`policy`] | accepting and serving client connections; endpoints, balancing, health, breakers, one attempt; the access log and spans; edge policies (consumers and their credentials, rate limits, injected faults) |
//! | [`routing`] | compiled routes and their tables |
//! | [`snapshot`] | the compiled config snapshot and the compiler |
//! | [`proxy`] | the request path: prelude, phases, the attempt loop, the rescue, upgrades, `CONNECT`, TCP routes |
//! | [`node`] | process wiring, the ops port, explain |
//! | `fuzzing` (feature `fuzzing` only) | entry points for the fuzz targets in `fuzz/`; no behaviour of its own |
//!
//! The lite sidecar is built from the same parts (its crate uses the
//! `pub` API; everything else is `pub(crate)`).

// Unsafe code is refused everywhere but in the allocator shim.
#![deny(unsafe_code)]
// `pub` only where another crate is meant to use it.
#![warn(unreachable_pub)]

#[allow(unsafe_code)]
pub mod alloc;
pub(crate) mod clock;
pub(crate) mod maps;
pub mod metrics;
pub mod tls;

pub mod http;
pub mod observe;
pub mod policy;
pub mod server;
pub mod upstream;

pub mod routing;

pub mod snapshot;

pub mod proxy;

pub mod node;

#[cfg(test)]
pub(crate) mod testing;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
