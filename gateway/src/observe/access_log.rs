//! The access log: one JSON line per request.
//!
//! A request's [`Entry`] is created when it arrives (only when the node
//! logs it: `off` creates none, `sampled` decides here), filled as the
//! request goes (route, service, tier, the [`Trail`] of tries the attempt
//! loop adds), and handed to the log when its answer has been sent or
//! abandoned ([`super::Observer::respond`] wraps the answer's body in an
//! [`crate::http::body::Observed`] body whose end calls
//! [`AccessLog::finish`]). Handing over is a `try_send` on a
//! bounded channel: the request path never waits for the disk, and a
//! record that finds the channel full is dropped and counted
//! (`meshgate_access_log_dropped_total`). One writer thread formats the
//! records and writes them in batches, to standard output or to a file
//! that SIGHUP reopens (for logrotate).
//!
//! With the log off, nothing of this runs: the request path holds
//! `None` for its entry and every step is a skipped `if let`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use prometheus::IntCounter;

use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};

/// Which requests are logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogMode {
    /// None (the default).
    #[default]
    Off,
    /// Every request.
    All,
    /// Requests that went wrong somewhere ([`Entry::is_error`]): an answer
    /// of 500 or more, a mesh error (`x-mesh-error`), a failed try on the
    /// way (the request failed over), or an answer not sent whole.
    Errors,
    /// A share of requests (`sample_ratio`), chosen when they arrive.
    Sampled,
}

/// The `access_log:` section of a gateway's or sidecar's node config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogSettings {
    pub mode: LogMode,
    /// `sampled`: the share of requests logged, more than 0 and at most 1.
    pub sample_ratio: f64,
    /// A file, appended to and reopened on SIGHUP; absent or `-`: standard
    /// output (where the process's own log lines go too).
    pub path: Option<PathBuf>,
    /// Records waiting for the writer; a record finding it full is dropped
    /// and counted.
    pub buffer_records: usize,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        AccessLogSettings {
            mode: LogMode::Off,
            sample_ratio: 0.01,
            path: None,
            buffer_records: 16 * 1024,
        }
    }
}

impl AccessLogSettings {
    /// The problems of these settings, with field paths under `access_log`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(self.sample_ratio > 0.0 && self.sample_ratio <= 1.0) {
            p.push((
                "access_log.sample_ratio".into(),
                "must be more than 0 and at most 1".into(),
            ));
        }
        if !(1..=1 << 20).contains(&self.buffer_records) {
            p.push((
                "access_log.buffer_records".into(),
                "must be from 1 to 1048576".into(),
            ));
        }
        if self.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            p.push((
                "access_log.path".into(),
                "must be a file path, or - for standard output".into(),
            ));
        }
        p
    }

    fn file(&self) -> Option<&PathBuf> {
        self.path.as_ref().filter(|p| p.as_os_str() != "-")
    }
}

/// A node's access log.
#[derive(Debug)]
pub struct AccessLog {
    mode: LogMode,
    ratio: f64,
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
}

enum Msg {
    Entry(Box<Entry>),
    /// Answered once every record sent before it is written.
    Flush(mpsc::Sender<()>),
}

impl AccessLog {
    /// Starts the writer of `settings`; `None` when the log is off. Fails
    /// when the file cannot be opened.
    pub fn start(
        settings: &AccessLogSettings,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Arc<AccessLog>>> {
        if settings.mode == LogMode::Off {
            return Ok(None);
        }
        let sink = match settings.file() {
            Some(path) => Sink::File(
                path.clone(),
                open(path).map_err(|e| {
                    anyhow::anyhow!("access_log.path: cannot open {}: {e}", path.display())
                })?,
            ),
            None => Sink::Stdout,
        };
        let (log, rx) = AccessLog::unstarted(settings, metrics);
        let flag = log.reopen.clone();
        let written = metrics.access_log_lines.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, sink, &flag, &written))?;
        Ok(Some(Arc::new(log)))
    }

    /// The log and the receiving end of its channel, with no writer yet.
    fn unstarted(settings: &AccessLogSettings, metrics: &Metrics) -> (AccessLog, Receiver<Msg>) {
        let (tx, rx) = mpsc::sync_channel(settings.buffer_records);
        let log = AccessLog {
            mode: settings.mode,
            ratio: settings.sample_ratio,
            tx,
            reopen: Arc::new(AtomicBool::new(false)),
            dropped: metrics.access_log_dropped.clone(),
        };
        (log, rx)
    }

    /// A new request's entry on `listener`, or `None` when it is not
    /// logged.
    pub fn begin(&self, listener: &'static str) -> Option<Box<Entry>> {
        match self.mode {
            LogMode::Off => None,
            LogMode::Sampled if rand::random::<f64>() >= self.ratio => None,
            _ => Some(Box::new(Entry::new(listener))),
        }
    }

    /// Hands a finished request's entry to the writer (unless only errors
    /// are logged and it is none); never waits.
    pub fn finish(&self, mut entry: Box<Entry>) {
        entry.end();
        if self.mode == LogMode::Errors && !entry.is_error() {
            return;
        }
        match self.tx.try_send(Msg::Entry(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Reopens the file before the next write (after a logrotate).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// Waits (at most `timeout`) until every record handed over so far is
    /// written: at shutdown.
    pub fn flush(&self, timeout: Duration) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(timeout);
        }
    }

    /// Reopens the log's file on every SIGHUP, until the process ends.
    pub fn reopen_on_sighup(self: &Arc<AccessLog>) {
        use tokio::signal::unix::{signal, SignalKind};
        let log = self.clone();
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reopening the access log");
                        log.reopen();
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: the access log is not reopened")
            }
        }
    }
}

/// What one request did, filled on its way.
#[derive(Debug)]
pub struct Entry {
    start: Instant,
    /// Unix milliseconds when it arrived.
    time_ms: u64,
    duration: Duration,
    pub listener: &'static str,
    pub method: Option<http::Method>,
    pub authority: Option<String>,
    /// The path, without the query (which may carry credentials).
    pub path: Option<String>,
    pub version: Option<http::Version>,
    pub client: Option<HeaderValue>,
    pub route: Option<Arc<str>>,
    /// The destination service.
    pub service: Option<String>,
    /// The sidecar's tier that answered (`direct`, or a gateway tier).
    pub tier: Option<&'static str>,
    pub trail: Trail,
    pub status: u16,
    /// The answer's `x-mesh-error`.
    pub error: Option<HeaderValue>,
    /// The request body's length: known when it arrived whole or with a
    /// `content-length`, else counted as it is streamed on.
    pub bytes_in: Option<u64>,
    pub bytes_out: u64,
    /// Whether the answer was sent whole (false: the client went away,
    /// or the upstream broke off).
    pub completed: bool,
    pub request_id: Option<HeaderValue>,
    pub traceparent: Option<HeaderValue>,
    /// The caller's verified identity (`x-mesh-caller`).
    pub caller: Option<HeaderValue>,
    /// The calling service (`x-mesh-source`).
    pub source: Option<HeaderValue>,
    /// The consumer the route's `auth` authenticated.
    pub consumer: Option<Arc<str>>,
    /// Whether the access log takes it (else it exists for its span).
    pub logged: bool,
    /// Its span, when the request is sampled for tracing.
    pub trace: Option<super::trace::SpanCtx>,
}

impl Entry {
    pub(crate) fn new(listener: &'static str) -> Entry {
        Entry {
            start: Instant::now(),
            time_ms: meshgate_config::model::now_ms(),
            duration: Duration::ZERO,
            listener,
            method: None,
            authority: None,
            path: None,
            version: None,
            client: None,
            route: None,
            service: None,
            tier: None,
            trail: Trail::default(),
            status: 0,
            error: None,
            bytes_in: None,
            bytes_out: 0,
            completed: false,
            request_id: None,
            traceparent: None,
            caller: None,
            source: None,
            consumer: None,
            logged: true,
            trace: None,
        }
    }

    /// Marks the request's end (its duration), once.
    pub(crate) fn end(&mut self) {
        if self.duration.is_zero() {
            self.duration = self.start.elapsed();
        }
        if let (None, Some(n)) = (self.bytes_in, &self.trail.uploaded) {
            self.bytes_in = Some(n.load(Ordering::Acquire));
        }
    }

    /// Unix milliseconds when it arrived.
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }

    /// From its arrival to the end of its answer (once finished).
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The request line and the body's length, as the request arrived.
    pub fn request<B: http_body::Body>(&mut self, req: &http::Request<B>) {
        self.method = Some(req.method().clone());
        self.path = Some(req.uri().path().to_string());
        self.version = Some(req.version());
        self.authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                let host = req.headers().get(http::header::HOST)?;
                host.to_str().ok().map(str::to_string)
            });
        self.bytes_in = req.body().size_hint().exact();
        self.ids(req.headers());
    }

    /// The ids and the caller, as the prelude left them.
    pub fn ids(&mut self, h: &http::HeaderMap) {
        use crate::http::headers::{TRACEPARENT, X_MESH_CALLER, X_MESH_SOURCE, X_REQUEST_ID};
        self.request_id = h.get(X_REQUEST_ID).cloned();
        self.traceparent = h.get(TRACEPARENT).cloned();
        self.caller = h.get(X_MESH_CALLER).cloned();
        self.source = h.get(X_MESH_SOURCE).cloned();
    }

    /// The answer's head.
    pub fn response<B>(&mut self, resp: &http::Response<B>) {
        self.status = resp.status().as_u16();
        self.error = resp
            .headers()
            .get(crate::http::error::X_MESH_ERROR)
            .cloned();
    }

    /// Whether the request went wrong somewhere: what `errors` logs.
    pub fn is_error(&self) -> bool {
        self.status >= 500
            || self.error.is_some()
            || !self.completed
            || self.trail.tries.iter().any(|t| t.outcome != OK)
    }

    /// Writes the JSON line (with its newline) to `out`.
    fn write_json(&self, out: &mut Vec<u8>) {
        let served = self.trail.served();
        let line = Line {
            time: meshgate_config::tls::rfc3339_ms(self.time_ms),
            listener: self.listener,
            method: self.method.as_ref().map(http::Method::as_str),
            authority: self.authority.as_deref(),
            path: self.path.as_deref(),
            protocol: self.version.map(version_str),
            status: self.status,
            error: text(&self.error),
            route: self.route.as_deref(),
            service: self.service.as_deref(),
            tier: self.tier,
            endpoint: served.map(|t| &*t.member),
            attempts: self.trail.tries.len(),
            tries: &self.trail.tries,
            duration_us: self.duration.as_micros() as u64,
            upstream_us: served.map(|t| t.us),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            completed: self.completed,
            client: text(&self.client),
            request_id: text(&self.request_id),
            trace_id: text(&self.traceparent).and_then(trace_id),
            caller: text(&self.caller),
            source: text(&self.source),
            consumer: self.consumer.as_deref(),
        };
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

fn text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|t| t.len() == 32)
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The outcome of a try that answered.
pub const OK: &str = "ok";
/// The outcome of a try whose answer the retry policy names (sent again
/// elsewhere, or passed on when no resend was left).
pub const RETRY_STATUS: &str = "retry_status";

/// Every member a request was tried on, in order; and the bytes of its
/// streamed body sent on, counted as they go.
#[derive(Debug, Default)]
pub struct Trail {
    pub tries: Vec<Try>,
    pub uploaded: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// One try: which set (`service`, `tier`) and member, what came of it
/// (`ok`, `retry_status`, or the failure's `x-mesh-error` code), and how
/// long it took to the answer's head.
#[derive(Debug, Serialize)]
pub struct Try {
    pub set: &'static str,
    pub name: Box<str>,
    pub member: Box<str>,
    pub outcome: &'static str,
    pub us: u64,
}

impl Trail {
    /// The last try, if it answered.
    pub fn served(&self) -> Option<&Try> {
        self.tries
            .last()
            .filter(|t| t.outcome == OK || t.outcome == RETRY_STATUS)
    }

    /// Marks the last try failed with `outcome` (its answer was a mesh
    /// error of the next hop).
    pub fn last_failed(&mut self, outcome: &'static str) {
        if let Some(t) = self.tries.last_mut() {
            t.outcome = outcome;
        }
    }

    /// Counts the bytes of `body` sent on, when it is a stream.
    pub fn count_upload(&mut self, body: &mut crate::http::body::ReplayBody) {
        if !body.replayable() {
            let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
            body.count_into(n.clone());
            self.uploaded = Some(n);
        }
    }

    /// Adds a try.
    pub fn push(
        &mut self,
        set: &'static str,
        name: &str,
        member: &str,
        outcome: &'static str,
        took: Duration,
    ) {
        self.tries.push(Try {
            set,
            name: name.into(),
            member: member.into(),
            outcome,
            us: took.as_micros() as u64,
        });
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    listener: &'a str,
    method: Option<&'a str>,
    authority: Option<&'a str>,
    path: Option<&'a str>,
    protocol: Option<&'a str>,
    status: u16,
    error: Option<&'a str>,
    route: Option<&'a str>,
    service: Option<&'a str>,
    tier: Option<&'a str>,
    endpoint: Option<&'a str>,
    attempts: usize,
    tries: &'a [Try],
    duration_us: u64,
    upstream_us: Option<u64>,
    bytes_in: Option<u64>,
    bytes_out: u64,
    completed: bool,
    client: Option<&'a str>,
    request_id: Option<&'a str>,
    trace_id: Option<&'a str>,
    caller: Option<&'a str>,
    source: Option<&'a str>,
    consumer: Option<&'a str>,
}

enum Sink {
    Stdout,
    File(PathBuf, std::fs::File),
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl Sink {
    fn write(&mut self, buf: &[u8]) {
        let res = match self {
            Sink::Stdout => std::io::stdout().lock().write_all(buf),
            Sink::File(_, f) => f.write_all(buf),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "access log write failed");
        }
    }

    fn reopen(&mut self) {
        if let Sink::File(path, f) = self {
            match open(path) {
                Ok(new) => *f = new,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "access log not reopened; writing to the old file")
                }
            }
        }
    }
}

/// Largest batch formatted before a write.
const BATCH_BYTES: usize = 256 * 1024;

/// The pause after each batch. Measured (BENCHMARKS.md, access log): a
/// writer woken for every record cost the requests about 9 µs of CPU
/// each, most of it waking this thread.
const GATHER: Duration = Duration::from_millis(50);

/// The writer thread: formats records in batches and writes each batch
/// at once, then pauses ([`GATHER`]); checks for a reopen at least twice a
/// second.
fn write_loop(rx: Receiver<Msg>, mut sink: Sink, reopen: &AtomicBool, written: &IntCounter) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut acks = Vec::new();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if reopen.swap(false, Ordering::AcqRel) {
                    sink.reopen();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut lines = 0;
        let mut next = Some(first);
        // Whether the queue was emptied (else the batch is full and the
        // next one follows at once).
        let mut drained = false;
        while let Some(m) = next {
            match m {
                Msg::Entry(e) => {
                    e.write_json(&mut buf);
                    lines += 1;
                }
                Msg::Flush(ack) => acks.push(ack),
            }
            next = if buf.len() < BATCH_BYTES {
                let m = rx.try_recv().ok();
                drained = m.is_none();
                m
            } else {
                None
            };
        }
        if reopen.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
        if !buf.is_empty() {
            sink.write(&buf);
            buf.clear();
        }
        written.inc_by(lines);
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        // Let records gather: while this thread sleeps, a request handing
        // one over finds no waiting receiver to wake (no syscall), and the
        // next batch is written at once.
        if drained {
            std::thread::sleep(GATHER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Metrics {
        Metrics::new("test")
    }

    fn settings(mode: LogMode, path: &std::path::Path) -> AccessLogSettings {
        AccessLogSettings {
            mode,
            path: Some(path.to_path_buf()),
            ..Default::default()
        }
    }

    fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    #[test]
    fn off_creates_nothing_and_bad_settings_name_their_field() {
        let off = AccessLogSettings::default();
        assert!(AccessLog::start(&off, &counters()).unwrap().is_none());
        let bad = AccessLogSettings {
            sample_ratio: 0.0,
            buffer_records: 0,
            path: Some(PathBuf::new()),
            ..Default::default()
        };
        let fields: Vec<String> = bad.problems().into_iter().map(|p| p.0).collect();
        assert_eq!(
            fields,
            [
                "access_log.sample_ratio",
                "access_log.buffer_records",
                "access_log.path"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/access.log");
        let err = AccessLog::start(&settings(LogMode::All, &missing), &counters()).unwrap_err();
        assert!(
            err.to_string().starts_with("access_log.path: cannot open"),
            "{err}"
        );
    }

    #[test]
    fn a_line_carries_the_request_its_tries_and_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let c = counters();
        let log = AccessLog::start(&settings(LogMode::All, &path), &c)
            .unwrap()
            .unwrap();
        let mut e = log.begin("mesh").expect("all: logged");
        let req = http::Request::builder()
            .uri("/orders/7?token=secret")
            .header("host", "orders")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("x-mesh-source", "shop")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"abc")))
            .unwrap();
        e.request(&req);
        e.service = Some("orders".into());
        e.trail.push(
            "service",
            "orders",
            "127.0.0.1:1",
            "upstream_connect_failed",
            Duration::from_micros(40),
        );
        e.trail.push(
            "service",
            "orders",
            "127.0.0.1:2",
            OK,
            Duration::from_micros(900),
        );
        let resp = http::Response::builder().status(201).body(()).unwrap();
        e.response(&resp);
        e.bytes_out = 12;
        e.completed = true;
        log.finish(e);
        log.flush(Duration::from_secs(5));
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!(l["path"], "/orders/7", "no query: {l}");
        assert_eq!(l["authority"], "orders");
        assert_eq!(l["status"], 201);
        assert_eq!(l["attempts"], 2);
        assert_eq!(l["endpoint"], "127.0.0.1:2");
        assert_eq!(l["upstream_us"], 900);
        assert_eq!(l["tries"][0]["outcome"], "upstream_connect_failed");
        assert_eq!(l["bytes_in"], 3);
        assert_eq!(l["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(l["source"], "shop");
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        assert_eq!(c.access_log_lines.get(), 1);
    }

    #[test]
    fn errors_mode_keeps_only_what_went_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&settings(LogMode::Errors, &path), &counters())
            .unwrap()
            .unwrap();
        for (status, completed, failover) in [
            (200, true, false),
            (503, true, false),
            (200, false, false),
            (200, true, true),
        ] {
            let mut e = log.begin("ingress").unwrap();
            e.status = status;
            e.completed = completed;
            if failover {
                e.trail
                    .push("tier", "group", "a", "upstream_reset", Duration::ZERO);
                e.trail.push("tier", "central", "b", OK, Duration::ZERO);
            }
            log.finish(e);
        }
        log.flush(Duration::from_secs(5));
        let lines = read_lines(&path);
        let kept: Vec<(u64, bool, u64)> = lines
            .iter()
            .map(|l| {
                (
                    l["status"].as_u64().unwrap(),
                    l["completed"].as_bool().unwrap(),
                    l["attempts"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(kept, [(503, true, 0), (200, false, 0), (200, true, 2)]);
    }

    #[test]
    fn sampling_keeps_about_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let s = AccessLogSettings {
            sample_ratio: 0.25,
            ..settings(LogMode::Sampled, &dir.path().join("a.log"))
        };
        let log = AccessLog::start(&s, &counters()).unwrap().unwrap();
        let kept = (0..10_000).filter(|_| log.begin("mesh").is_some()).count();
        // 10,000 draws at p = 0.25: the standard deviation is about 43.
        assert!((2_250..=2_750).contains(&kept), "{kept}");
    }

    #[test]
    fn a_full_buffer_drops_and_counts_instead_of_waiting() {
        // A writer that is behind: the channel's receiver, never read.
        let m = counters();
        let s = AccessLogSettings {
            mode: LogMode::All,
            buffer_records: 2,
            ..Default::default()
        };
        let (log, rx) = AccessLog::unstarted(&s, &m);
        for _ in 0..5 {
            let e = log.begin("mesh").unwrap();
            log.finish(e);
        }
        assert_eq!(m.access_log_dropped.get(), 3, "two waited, three dropped");
        assert_eq!(rx.try_iter().count(), 2);
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let log = AccessLog::start(&settings(LogMode::All, &path), &counters())
            .unwrap()
            .unwrap();
        let one = |log: &AccessLog| {
            let mut e = log.begin("mesh").unwrap();
            e.completed = true;
            log.finish(e);
            log.flush(Duration::from_secs(5));
        };
        one(&log);
        std::fs::rename(&path, dir.path().join("a.log.1")).unwrap();
        one(&log);
        assert!(!path.exists(), "still writing to the renamed file");
        log.reopen();
        one(&log);
        assert_eq!(read_lines(&path).len(), 1);
        assert_eq!(read_lines(&dir.path().join("a.log.1")).len(), 2);
    }
}
