//! Route matching: compiled routes (conditions, backends, rewrites,
//! policies) and the tables that index them by host and path.

mod router;

pub use router::*;
