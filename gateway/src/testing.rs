//! Helpers shared by the crate's unit tests.

use std::time::Duration;

/// Waits until `cond` holds, polling it, for at most 10 s; panics naming
/// `what` if it never does.
pub(crate) async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 10 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
