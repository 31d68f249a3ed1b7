//! Observability of the request path: what each request did, recorded
//! once per request by the edge that took it (a gateway listener, the
//! sidecar's app port, a sidecar's inbound).
//!
//! - [`access_log`]: one JSON line per request, with every tier and member
//!   tried and why it moved on ([`Trail`]), written off the request path
//!   by a bounded writer that counts what it drops;
//! - [`trace`]: one span per hop, W3C trace context, exported over OTLP
//!   in batches off the request path.
//!
//! The request path calls the [`Observer`] in three places:
//! [`Observer::begin`] when a request arrives (`None` when neither the
//! log nor the tracer wants it: nothing further happens),
//! [`Observer::enter`] once the prelude has stamped the request's ids (the
//! sampling decision and this hop's span), and [`Observer::respond`] with
//! the answer, whose body hands the entry over when it ends. The attempt
//! loop adds each try to the request's [`Trail`].

pub mod access_log;
pub mod trace;

use std::sync::Arc;

pub use access_log::{AccessLog, AccessLogSettings, Entry, LogMode, Trail, Try};
pub use trace::{Tracer, TracingSettings};

use crate::http::body::{Observed, OnEnd, ProxyBody};

/// A process's access log and tracer.
#[derive(Debug)]
pub struct Observer {
    log: Option<Arc<AccessLog>>,
    tracer: Option<Arc<Tracer>>,
}

impl Observer {
    /// Starts a node's access log (reopened on SIGHUP) and tracer
    /// (`service.name` default `process`); `None` when it has neither.
    pub fn start(
        log: &AccessLogSettings,
        tracing: Option<&TracingSettings>,
        process: &str,
        metrics: &crate::metrics::Metrics,
        grpc: Option<trace::GrpcExport>,
    ) -> anyhow::Result<Option<Arc<Observer>>> {
        let log = AccessLog::start(log, metrics)?;
        if let Some(l) = &log {
            l.reopen_on_sighup();
        }
        let tracer = tracing
            .map(|t| Tracer::start(t, process, metrics, grpc))
            .transpose()?;
        Ok((log.is_some() || tracer.is_some()).then(|| Arc::new(Observer { log, tracer })))
    }

    /// At shutdown: waits (at most `timeout`) for the access log's
    /// records to be written.
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Some(l) = &self.log {
            l.flush(timeout);
        }
    }

    /// A new request's entry on `listener`: when the log takes it, or for
    /// its span when the process traces.
    pub fn begin(&self, listener: &'static str) -> Option<Box<Entry>> {
        if let Some(e) = self.log.as_ref().and_then(|l| l.begin(listener)) {
            return Some(e);
        }
        self.tracer.as_ref()?;
        let mut e = Box::new(Entry::new(listener));
        e.logged = false;
        Some(e)
    }

    /// After the prelude: the request's ids, and (tracing) its sampling
    /// and this hop's span, named in the `traceparent` sent on. `had`:
    /// whether the request came with a `traceparent`.
    pub fn enter(&self, e: &mut Entry, h: &mut http::HeaderMap, had: bool) {
        if let Some(t) = &self.tracer {
            e.trace = t.enter(h, had);
        }
        e.ids(h);
    }

    /// Notes the answer's head in `entry`, and has the answer's body hand
    /// the entry over when it ends (with its length, and whether it was
    /// sent whole).
    pub fn respond(
        self: &Arc<Observer>,
        mut entry: Box<Entry>,
        resp: http::Response<ProxyBody>,
    ) -> http::Response<ProxyBody> {
        entry.response(&resp);
        let pending = Box::new(Pending {
            entry,
            obs: self.clone(),
        });
        resp.map(|b| Observed::wrap(b, pending))
    }

    fn finish(&self, mut entry: Box<Entry>) {
        entry.end();
        if let (Some(t), Some(ctx)) = (&self.tracer, entry.trace) {
            t.export(&entry, &ctx);
        }
        if let (true, Some(log)) = (entry.logged, &self.log) {
            log.finish(entry);
        }
    }
}

/// An entry waiting for its answer's body to end.
struct Pending {
    entry: Box<Entry>,
    obs: Arc<Observer>,
}

impl OnEnd for Pending {
    fn ended(self: Box<Self>, bytes: u64, whole: bool) {
        let Pending { mut entry, obs } = *self;
        entry.bytes_out = bytes;
        entry.completed = whole;
        obs.finish(entry);
    }
}
