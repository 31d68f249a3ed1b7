//! A Meshgate process: node config, the wiring of store, sync, data plane,
//! listeners, ops port and registration, and ordered shutdown.
//!
//! - [`gateway`]: the gateway process
//! - [`ops`]: the ops port (`/healthz`, `/readyz`, `/metrics`, `/config`)
//! - [`explain`]: which route a request would match, and why not the others

pub mod explain;
pub mod gateway;
pub mod ops;
