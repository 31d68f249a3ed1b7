//! The upstream side of one request: the endpoints of a service and their
//! live state, choosing one, keeping them healthy, the service's breaker
//! counters and retry budget, and one attempt on one endpoint.
//!
//! - [`endpoint`]: per-endpoint state shared across config changes
//! - [`balance`]: load-balancing policies, priority and zone levels
//! - [`health`]: active health checks, one prober per endpoint address
//! - [`resilience`]: breaker counters, retry budget, compiled retry and
//!   outlier policies
//! - [`attempt`]: one try on one endpoint, with a typed failure
//!
//! Depends on [`crate::http`] only; what to do after a failed attempt is
//! decided above, in [`crate::proxy`].

pub mod attempt;
pub mod balance;
pub mod endpoint;
pub mod health;
pub mod resilience;
