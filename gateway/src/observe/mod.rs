//! Observability of the request path: what each request did, recorded
//! once per request by the edge that took it (a gateway listener, the
//! sidecar's app port, a sidecar's inbound).
//!
//! - [`access_log`]: one JSON line per request, with every tier and member
//!   tried and why it moved on ([`Trail`]), written off the request path
//!   by a bounded writer that counts what it drops.
//!
//! The request path calls it in two places: [`AccessLog::begin`] when a
//! request arrives (the sampling decision; `None` costs nothing further),
//! and [`AccessLog::finish`] when its answer has been sent (or abandoned).
//! The attempt loop adds each try to the request's [`Trail`].

pub mod access_log;

pub use access_log::{AccessLog, AccessLogSettings, Entry, LogMode, Trail, Try};
