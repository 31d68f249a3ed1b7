//! The process's monotonic clock in milliseconds: ejection deadlines and
//! retry-budget windows are kept in atomics as such numbers.

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a process-wide monotonic clock.
pub(crate) fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
