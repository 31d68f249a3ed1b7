//! Tracing: one span per hop, W3C trace context, exported over OTLP.
//!
//! A request's sampling is decided where its trace starts: an incoming
//! `traceparent` is followed (its `sampled` flag, never overridden); one
//! this process creates is flagged sampled for `sample_ratio` of requests.
//! A sampled request gets a span of this hop: a new span id, its parent
//! the incoming `traceparent`'s, and the `traceparent` sent on names this
//! span, so the next hop's span is its child. The span is built from the
//! request's [`Entry`] when its answer ends (route, service, tier, status,
//! each failed try as a span event), handed to a bounded queue (dropped
//! and counted when full, never waited for) and exported in batches by
//! one task, over OTLP HTTP/protobuf (`http://…/v1/traces`) or gRPC.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus::IntCounter;
use serde::Deserialize;

use super::access_log::{Entry, OK, RETRY_STATUS};
use crate::http::headers::TRACEPARENT;
use crate::metrics::Metrics;

/// How spans are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`POST <endpoint>/v1/traces`).
    #[default]
    Http,
    /// OTLP/gRPC.
    Grpc,
}

/// The `tracing:` section of a gateway's or sidecar's node config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSettings {
    /// The collector: `http://host:4318` (http) or `http://host:4317`
    /// (grpc).
    pub endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// The share of the traces this process starts that are sampled.
    #[serde(default = "default_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the spans (default: the process's own name).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Spans waiting for export; beyond, new ones are dropped and counted.
    #[serde(default = "default_queue")]
    pub max_queue_spans: usize,
    /// A batch is sent when it is this large, or every `export_interval_ms`.
    #[serde(default = "default_batch")]
    pub max_batch_spans: usize,
    #[serde(default = "default_interval")]
    pub export_interval_ms: u64,
}

fn default_ratio() -> f64 {
    0.01
}
fn default_queue() -> usize {
    8192
}
fn default_batch() -> usize {
    512
}
fn default_interval() -> u64 {
    1000
}

impl TracingSettings {
    /// The problems of these settings, with field paths under `tracing`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let scheme_ok =
            self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://");
        if !scheme_ok || self.endpoint.parse::<http::Uri>().is_err() {
            p.push((
                "tracing.endpoint".into(),
                "must be an http:// or https:// URL".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            p.push(("tracing.sample_ratio".into(), "must be from 0 to 1".into()));
        }
        if !(1..=1 << 20).contains(&self.max_queue_spans) {
            p.push((
                "tracing.max_queue_spans".into(),
                "must be from 1 to 1048576".into(),
            ));
        }
        if !(1..=10_000).contains(&self.max_batch_spans) {
            p.push((
                "tracing.max_batch_spans".into(),
                "must be from 1 to 10000".into(),
            ));
        }
        if !(10..=60_000).contains(&self.export_interval_ms) {
            p.push((
                "tracing.export_interval_ms".into(),
                "must be from 10 to 60000".into(),
            ));
        }
        p
    }
}

/// A sampled request's place in its trace.
#[derive(Debug, Clone, Copy)]
pub struct SpanCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The incoming `traceparent`'s span (none: the trace starts here).
    pub parent: Option<[u8; 8]>,
}

/// The process's tracer: sampling, and the queue to the exporter.
#[derive(Debug)]
pub struct Tracer {
    ratio: f64,
    tx: tokio::sync::mpsc::Sender<Span>,
    dropped: IntCounter,
}

impl Tracer {
    /// Starts the exporter task of `settings` for a process called
    /// `process` (the default `service.name`).
    pub fn start(
        settings: &TracingSettings,
        process: &str,
        metrics: &Metrics,
        grpc: Option<GrpcExport>,
    ) -> anyhow::Result<Arc<Tracer>> {
        let (tx, rx) = tokio::sync::mpsc::channel(settings.max_queue_spans);
        let exporter = Exporter::new(settings, grpc)?;
        let service = settings
            .service_name
            .clone()
            .unwrap_or_else(|| process.to_string());
        tokio::spawn(export_loop(
            rx,
            exporter,
            service,
            settings.max_batch_spans,
            Duration::from_millis(settings.export_interval_ms),
            metrics.trace_spans_exported.clone(),
            metrics.trace_export_failures.clone(),
        ));
        Ok(Arc::new(Tracer {
            ratio: settings.sample_ratio,
            tx,
            dropped: metrics.trace_spans_dropped.clone(),
        }))
    }

    /// Decides the request's sampling from `h` (its `traceparent` as it
    /// arrived, `had` whether it came with one, after the prelude ensured
    /// one), and for a sampled request makes the `traceparent` sent on
    /// name this hop's span. Flags an unsampled trace started here as not
    /// sampled.
    pub fn enter(&self, h: &mut HeaderMap, had: bool) -> Option<SpanCtx> {
        let (trace_id, span_id, flags) = h.get(TRACEPARENT).and_then(|v| parse(v.as_bytes()))?;
        let (sampled, parent) = if had {
            (flags & 1 == 1, Some(span_id))
        } else {
            (rand::random::<f64>() < self.ratio, None)
        };
        if !sampled {
            if !had {
                h.insert(TRACEPARENT, format_traceparent(&trace_id, &span_id, false));
            }
            return None;
        }
        let ours = match parent {
            // A trace started here: the created span id is this span's.
            None => span_id,
            Some(_) => loop {
                let id: [u8; 8] = rand::random();
                if id != [0; 8] {
                    break id;
                }
            },
        };
        h.insert(TRACEPARENT, format_traceparent(&trace_id, &ours, true));
        Some(SpanCtx {
            trace_id,
            span_id: ours,
            parent,
        })
    }

    /// Queues the span of a finished request; never waits.
    pub fn export(&self, e: &Entry, ctx: &SpanCtx) {
        if self.tx.try_send(span_of(e, ctx)).is_err() {
            self.dropped.inc();
        }
    }
}

/// `00-<trace id>-<span id>-<flags>` → its parts (all-zero ids refused).
fn parse(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split('-');
    let (ver, t, p, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ver.len() != 2 || ver == "ff" || t.len() != 32 || p.len() != 16 || f.len() != 2 {
        return None;
    }
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    for (i, b) in trace.iter_mut().enumerate() {
        *b = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    for (i, b) in span.iter_mut().enumerate() {
        *b = u8::from_str_radix(p.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let flags = u8::from_str_radix(f, 16).ok()?;
    (trace != [0; 16] && span != [0; 8]).then_some((trace, span, flags))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn format_traceparent(trace: &[u8; 16], span: &[u8; 8], sampled: bool) -> HeaderValue {
    let v = format!(
        "00-{}-{}-{}",
        hex(trace),
        hex(span),
        if sampled { "01" } else { "00" }
    );
    HeaderValue::from_str(&v).expect("hex is a valid header value")
}

fn attr(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
    }
}

fn text(key: &str, v: &str) -> KeyValue {
    attr(key, any_value::Value::StringValue(v.into()))
}

/// The span of a finished request: the hop, its answer, and each failed
/// try as an event.
fn span_of(e: &Entry, ctx: &SpanCtx) -> Span {
    let start = e.time_ms() * 1_000_000;
    let end = start + e.duration().as_nanos() as u64;
    let target = e.service.as_deref().or(e.route.as_deref()).unwrap_or("-");
    let mut attributes = vec![text("meshgate.listener", e.listener)];
    if let Some(m) = &e.method {
        attributes.push(text("http.request.method", m.as_str()));
    }
    if let Some(p) = &e.path {
        attributes.push(text("url.path", p));
    }
    attributes.push(attr(
        "http.response.status_code",
        any_value::Value::IntValue(i64::from(e.status)),
    ));
    for (k, v) in [
        ("meshgate.route", e.route.as_deref()),
        ("meshgate.service", e.service.as_deref()),
        ("meshgate.tier", e.tier),
        ("meshgate.endpoint", e.trail.served().map(|t| &*t.member)),
        (
            "meshgate.error",
            e.error.as_ref().and_then(|v| v.to_str().ok()),
        ),
        (
            "meshgate.source",
            e.source.as_ref().and_then(|v| v.to_str().ok()),
        ),
        (
            "meshgate.caller",
            e.caller.as_ref().and_then(|v| v.to_str().ok()),
        ),
    ] {
        if let Some(v) = v {
            attributes.push(text(k, v));
        }
    }
    // A try that did not answer: the fail-over step, as an event at the
    // time it ended.
    let mut at = start;
    let events = e
        .trail
        .tries
        .iter()
        .filter_map(|t| {
            at += t.us * 1000;
            (t.outcome != OK && t.outcome != RETRY_STATUS).then(|| span::Event {
                time_unix_nano: at,
                name: format!("{} member failed", t.set),
                attributes: vec![
                    text("meshgate.set", &t.name),
                    text("meshgate.member", &t.member),
                    text("meshgate.outcome", t.outcome),
                ],
                dropped_attributes_count: 0,
            })
        })
        .collect();
    let failed = e.status >= 500 || !e.completed;
    Span {
        trace_id: ctx.trace_id.to_vec(),
        span_id: ctx.span_id.to_vec(),
        parent_span_id: ctx.parent.map(|p| p.to_vec()).unwrap_or_default(),
        trace_state: String::new(),
        flags: 1,
        name: format!("{} {target}", e.listener),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes,
        dropped_attributes_count: 0,
        events,
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status: Some(Status {
            message: String::new(),
            code: if failed {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
        }),
    }
}

// One per process, made once and never moved on a request's path.
#[allow(clippy::large_enum_variant)]
enum Exporter {
    /// Through the engine's own pooled client (the one HTTP/2 upstreams
    /// use), over TLS for an `https://` collector (the system's roots).
    Http {
        /// The collector's address (`host:port`) and the request target.
        address: String,
        target: http::uri::PathAndQuery,
        pool: Arc<crate::http::pool::H1Pool>,
        tls: Option<Arc<crate::tls::ClientTls>>,
    },
    Grpc(Box<dyn GrpcSink>),
}

/// An OTLP/gRPC exporter (tonic), behind a trait object so that a process
/// that does not offer gRPC export (the lite sidecar: it passes no
/// [`GrpcExport`] to [`Tracer::start`]) links no gRPC client.
pub trait GrpcSink: Send {
    fn export(
        &mut self,
        req: ExportTraceServiceRequest,
    ) -> futures::future::BoxFuture<'_, Result<(), String>>;
}

/// Makes the gRPC exporter for a collector's base URL.
pub type GrpcExport = fn(&str) -> anyhow::Result<Box<dyn GrpcSink>>;

/// The OTLP/gRPC exporter (tonic, a lazily connected channel).
pub fn grpc_exporter(base: &str) -> anyhow::Result<Box<dyn GrpcSink>> {
    type Client =
        opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient<
            tonic::transport::Channel,
        >;
    struct Sink(Client);
    impl GrpcSink for Sink {
        fn export(
            &mut self,
            req: ExportTraceServiceRequest,
        ) -> futures::future::BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                self.0
                    .export(req)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(base.to_string())
        .map_err(|e| anyhow::anyhow!("tracing.endpoint: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(Box::new(Sink(Client::new(channel))))
}

impl Exporter {
    fn new(s: &TracingSettings, grpc: Option<GrpcExport>) -> anyhow::Result<Exporter> {
        let base = s.endpoint.trim_end_matches('/');
        Ok(match s.protocol {
            OtlpProtocol::Http => {
                let tls = match base.starts_with("https://") {
                    true => {
                        let spec = meshgate_config::model::UpstreamTls {
                            sni: None,
                            ca: None,
                            verify: true,
                        };
                        let t = crate::tls::ClientTls::new(&spec, &[b"http/1.1"])
                            .map_err(|e| anyhow::anyhow!("tracing.endpoint: {e}"))?;
                        Some(Arc::new(t))
                    }
                    false => None,
                };
                let url = if base.ends_with("/v1/traces") {
                    base.to_string()
                } else {
                    format!("{base}/v1/traces")
                };
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| anyhow::anyhow!("tracing.endpoint: {e}"))?;
                let Some(authority) = uri.authority() else {
                    anyhow::bail!("tracing.endpoint: no host in {url}");
                };
                let port = authority
                    .port_u16()
                    .unwrap_or(if tls.is_some() { 443 } else { 80 });
                Exporter::Http {
                    address: format!("{}:{port}", authority.host()),
                    target: uri
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                    pool: Arc::default(),
                    tls,
                }
            }
            OtlpProtocol::Grpc => {
                let make = grpc.ok_or_else(|| {
                    anyhow::anyhow!(
                        "tracing.protocol: grpc is not offered by this process (the lite sidecar exports over http)"
                    )
                })?;
                Exporter::Grpc(make(base)?)
            }
        })
    }

    async fn send(&mut self, req: ExportTraceServiceRequest) -> Result<(), String> {
        match self {
            Exporter::Http {
                address,
                target,
                pool,
                tls,
            } => {
                let body = prost::Message::encode_to_vec(&req);
                let r = http::Request::post(http::Uri::from(target.clone()))
                    .header(http::header::HOST, address.as_str())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(crate::http::body::full(http_body_util::Full::new(
                        bytes::Bytes::from(body),
                    )))
                    .map_err(|e| e.to_string())?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                let resp = pool
                    .send(
                        address,
                        tls.as_deref(),
                        Duration::from_secs(2),
                        None,
                        r,
                        deadline,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                // Read to the end, so the connection goes back to the pool.
                let status = resp.status();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                match status.is_success() {
                    true => Ok(()),
                    false => Err(format!("collector answered {status}")),
                }
            }
            Exporter::Grpc(sink) => sink.export(req).await,
        }
    }
}

/// The exporter task: a batch at `max_batch` spans or every `interval`.
async fn export_loop(
    mut rx: tokio::sync::mpsc::Receiver<Span>,
    mut exporter: Exporter,
    service: String,
    max_batch: usize,
    interval: Duration,
    exported: IntCounter,
    failures: IntCounter,
) {
    let resource = Resource {
        attributes: vec![text("service.name", &service)],
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    };
    let scope = InstrumentationScope {
        name: "meshgate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
    };
    let mut batch: Vec<Span> = Vec::with_capacity(max_batch);
    let mut tick = tokio::time::interval(interval);
    loop {
        let mut closed = false;
        let mut due = false;
        let room = max_batch - batch.len();
        tokio::select! {
            n = rx.recv_many(&mut batch, room) => closed = n == 0,
            _ = tick.tick() => due = true,
        }
        if batch.len() >= max_batch || ((due || closed) && !batch.is_empty()) {
            let n = batch.len() as u64;
            let req = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(scope.clone()),
                        spans: std::mem::take(&mut batch),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            match exporter.send(req).await {
                Ok(()) => exported.inc_by(n),
                Err(e) => {
                    failures.inc();
                    tracing::warn!(error = %e, spans = n, "trace export failed; spans dropped");
                }
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let v = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (t, s, f) = parse(v).unwrap();
        assert_eq!(hex(&t), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&s), "b7ad6b7169203331");
        assert_eq!(f, 1);
        assert_eq!(format_traceparent(&t, &s, true).as_bytes(), v);
        for bad in [
            &b"00-00000000000000000000000000000000-b7ad6b7169203331-01"[..],
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            b"00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }

    fn tracer(ratio: f64) -> Tracer {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Tracer {
            ratio,
            tx,
            dropped: IntCounter::new("d", "d").unwrap(),
        }
    }

    #[test]
    fn an_incoming_sampled_flag_is_followed_and_the_next_hop_is_our_child() {
        let t = tracer(0.0);
        let mut h = HeaderMap::new();
        let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(incoming));
        let ctx = t
            .enter(&mut h, true)
            .expect("sampled upstream: sampled here");
        assert_eq!(hex(&ctx.parent.unwrap()), "b7ad6b7169203331");
        let sent = h.get(TRACEPARENT).unwrap().to_str().unwrap();
        assert_eq!(
            sent,
            format!(
                "00-0af7651916cd43dd8448eb211c80319c-{}-01",
                hex(&ctx.span_id)
            )
        );

        // Not sampled upstream: not sampled here, even at ratio 1, and the
        // header passes untouched.
        let t = tracer(1.0);
        let off = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        h.insert(TRACEPARENT, HeaderValue::from_static(off));
        assert!(t.enter(&mut h, true).is_none());
        assert_eq!(h.get(TRACEPARENT).unwrap(), off);
    }

    #[test]
    fn a_trace_started_here_is_sampled_at_the_ratio_and_flagged_so() {
        let created = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(created));
        assert!(tracer(0.0).enter(&mut h, false).is_none());
        assert!(h
            .get(TRACEPARENT)
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-00"));
        h.insert(TRACEPARENT, HeaderValue::from_static(created));
        let ctx = tracer(1.0).enter(&mut h, false).unwrap();
        assert!(ctx.parent.is_none(), "a root span");
        assert_eq!(h.get(TRACEPARENT).unwrap(), created);
    }
}
