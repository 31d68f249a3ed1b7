//! Connection limits: the open connections of a service and the requests
//! waiting for one (`max_connections`, `max_pending_requests`), counted
//! with atomics and released by guards, and the name of the limit that
//! refused a request ([`Overflow`]). The pool opens connections under
//! them; the breaker's request counters reuse [`acquire`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Open connections of a service, with a wake-up for requests waiting for
/// one to be released or closed.
#[derive(Debug, Default)]
pub struct ConnCounter {
    pub open: AtomicU32,
    pub pending: AtomicU32,
    pub freed: Notify,
}

/// Held by an open connection; releases its slot when the connection ends.
#[derive(Debug)]
pub struct ConnSlot(pub Arc<ConnCounter>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// The connection limit of an attempt (see [`crate::http::pool::H1Pool::send`]).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimit<'a> {
    pub counter: &'a Arc<ConnCounter>,
    pub max_connections: u32,
    pub max_pending: u32,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Requests,
    Connections,
    Pending,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "max_requests",
            Overflow::Connections => "max_connections",
            Overflow::Pending => "max_pending_requests",
        }
    }
}

/// Things in flight under a limit (a service's requests, its retries).
#[derive(Debug, Default)]
pub struct InFlightCount(AtomicU32);

impl InFlightCount {
    /// One more in flight, if under `max` (no limit: always).
    pub(crate) fn hold(self: &Arc<Self>, max: Option<u32>) -> Option<Held> {
        acquire(&self.0, max).then(|| Held(self.clone()))
    }

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One unit held on an [`InFlightCount`]; leaves when dropped.
#[derive(Debug)]
pub(crate) struct Held(Arc<InFlightCount>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes a slot under `max` on `counter`, or fails without changing it.
fn acquire(counter: &AtomicU32, max: Option<u32>) -> bool {
    match max {
        None => {
            counter.fetch_add(1, Ordering::AcqRel);
            true
        }
        Some(max) => counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok(),
    }
}

/// Takes a connection slot if one is free.
pub(crate) fn try_open(limit: &ConnLimit<'_>) -> Option<ConnSlot> {
    acquire(&limit.counter.open, Some(limit.max_connections))
        .then(|| ConnSlot(limit.counter.clone()))
}

/// A waiting request; leaves the pending count when dropped.
#[derive(Debug)]
pub struct Pending<'a>(&'a ConnCounter);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Joins the requests waiting for a connection, under `max_pending`.
pub(crate) fn wait_slot<'a>(limit: &ConnLimit<'a>) -> Option<Pending<'a>> {
    acquire(&limit.counter.pending, Some(limit.max_pending)).then(|| Pending(limit.counter))
}
