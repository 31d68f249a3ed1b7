//! Traffic mirroring: a copy of a request sent to a route's shadow
//! service, fire-and-forget. The copy is made once the body is buffered
//! (a body over the replay buffer is not mirrored); it is sent by a task
//! of its own, one try on one endpoint within the shadow service's
//! request timeout, and its answer is read and dropped: the shadow's
//! latency, errors and body never reach the main response. At most
//! [`MAX_IN_FLIGHT`] copies are in flight per process; more are dropped
//! and counted (`meshgate_mirror_requests_total{result}`).

use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

use super::prelude;
use crate::http::body::{full, ReplayBody};
use crate::http::headers;
use crate::metrics::Metrics;
use crate::policy::MirrorRule;
use crate::snapshot::Snapshot;
use crate::upstream::attempt::{self, AttemptOpts};

/// Copies in flight at once, per process.
pub const MAX_IN_FLIGHT: usize = 256;

/// Marks a mirrored copy (the shadow can tell it from live traffic).
pub const X_MESH_MIRROR: &str = "x-mesh-mirror";

/// The bound on copies in flight.
#[derive(Debug)]
pub struct Mirrors(Arc<Semaphore>);

impl Default for Mirrors {
    fn default() -> Self {
        Mirrors(Arc::new(Semaphore::new(MAX_IN_FLIGHT)))
    }
}

impl Mirrors {
    /// Sends a copy of the request (`parts` as it arrived, `body`) to the
    /// rule's service when the rule draws it.
    pub(crate) fn copy(
        &self,
        rule: &MirrorRule,
        snap: &Snapshot,
        parts: &http::request::Parts,
        body: &ReplayBody,
        metrics: &Arc<Metrics>,
    ) {
        if !rule.draw() {
            return;
        }
        let count = |result: &str| metrics.mirror_requests.with_label_values(&[result]).inc();
        let ReplayBody::Buffered(bytes) = body else {
            return count("skipped");
        };
        let Some(svc) = snap.services.get(&*rule.service).cloned() else {
            return count("failed");
        };
        let Ok(permit) = self.0.clone().try_acquire_owned() else {
            return count("dropped");
        };
        let mut req = Request::new(full(Full::new(Bytes::clone(bytes))));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        headers::strip_hop_by_hop(req.headers_mut());
        req.headers_mut()
            .insert(X_MESH_MIRROR, HeaderValue::from_static("true"));
        let pq = prelude::target(&parts.uri);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match svc.balancer.pick_keyed(&[], None) {
                None => "failed",
                Some(ep) => {
                    let opts = AttemptOpts {
                        wire: svc.wire,
                        h2: &svc.client,
                        connect_timeout: svc.connect_timeout,
                        timeout: svc.request_timeout,
                        track_load: false,
                        conn_limit: svc.conn_limit(),
                    };
                    match attempt::attempt(&ep, opts, &pq, req).await {
                        // Read to the end (so the connection is reused),
                        // within the same time bound.
                        Ok(resp) => {
                            let read = resp.into_body().collect();
                            match tokio::time::timeout(svc.request_timeout, read).await {
                                Ok(Ok(_)) => "answered",
                                _ => "failed",
                            }
                        }
                        Err(_) => "failed",
                    }
                }
            };
            metrics.mirror_requests.with_label_values(&[result]).inc();
        });
    }
}
