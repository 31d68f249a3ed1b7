//! The edge phase: a route's policies ([`crate::policy`]) applied to one
//! request through the route's [`RouteEdge`]: the consumer authenticated
//! (`x-mesh-consumer` set upstream, an API key in the query removed), the
//! route's and the consumer's rate limits, then the faults drawn for the
//! backend chosen; and a service's own limit. Every refusal is a
//! [`Failure`] carrying its full answer (`crate::policy::refusal`).

use http::HeaderMap;

use crate::http::error::Failure;
use crate::policy::limit::{KeyInput, LimitCheck};
use crate::policy::{refusal, RouteEdge};

/// Counts a request against a service's `limit`: 429 `rate_limited` over
/// it.
pub(crate) fn check(
    limit: &dyn LimitCheck,
    input: &KeyInput<'_>,
    grpc: bool,
) -> Result<(), Failure> {
    limit.check(input).map_err(|d| refusal::limited(d, grpc))
}

/// The faults drawn for a request that took backend rule `rule`: waits
/// out a delay, and fails with an abort. Boxed: a rare path's timer would
/// otherwise widen every request's future.
pub(crate) async fn inject(
    policy: &dyn RouteEdge,
    rule: Option<usize>,
    grpc: bool,
    headers: &HeaderMap,
) -> Result<(), Failure> {
    let drawn = policy.faults(rule, headers);
    if let Some(d) = drawn.delay {
        Box::pin(tokio::time::sleep(d)).await;
    }
    match drawn.abort {
        Some(a) => Err(refusal::aborted(a, grpc)),
        None => Ok(()),
    }
}
