//! The load engine behind `meshgate-load`, usable in-process by tests and
//! benchmark drivers.
//!
//! Two modes:
//! - **closed loop**: each worker sends its next request as soon as the
//!   previous answer is read (maximum throughput);
//! - **open loop** (`rate`): a pacer releases request slots at fixed
//!   intended send times into a shared queue; idle workers take them. A
//!   request's latency is measured from its *intended* send time, so time
//!   spent queued behind a slow answer counts (no coordinated omission).
//!   The pacer sleeps on tokio's millisecond timer until just before a slot
//!   and then yields in a loop until the exact instant, so slots are
//!   released with microsecond precision rather than up to 1 ms late.
//!
//! HTTP/1.1 (one request at a time per connection) or HTTP/2 by prior
//! knowledge (`streams` concurrent requests per connection). Every failed
//! request is recorded with its sequence number, its send time and its
//! kind (`connect`, `timeout`, `io`, `status:5xx`, `mesh:<reason>` from
//! `x-mesh-error`), and a per-second timeline is kept for fail-over figures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::sync::Mutex;

/// What to send and how.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub host: String,
    pub port: u16,
    /// Path and query.
    pub path: String,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Connections to open.
    pub connections: usize,
    /// HTTP/2 (prior knowledge) instead of HTTP/1.1.
    pub http2: bool,
    /// Concurrent streams per HTTP/2 connection.
    pub streams: usize,
    pub duration: Duration,
    /// Open loop at this many requests per second in total.
    pub rate: Option<f64>,
    /// Time allowed for one request (connect excluded).
    pub timeout: Duration,
    /// Send each request's sequence number in this header (lets a backend
    /// detect duplicates).
    pub seq_header: Option<HeaderName>,
    /// Keep at most this many individual failure records.
    pub max_failure_records: usize,
    /// HTTP/1.1: a new connection for every request (sent with
    /// `connection: close`).
    pub new_connections: bool,
}

impl LoadConfig {
    pub fn new(host: impl Into<String>, port: u16, path: impl Into<String>) -> LoadConfig {
        LoadConfig {
            host: host.into(),
            port,
            path: path.into(),
            method: Method::GET,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            connections: 10,
            http2: false,
            streams: 1,
            duration: Duration::from_secs(10),
            rate: None,
            timeout: Duration::from_secs(10),
            seq_header: None,
            max_failure_records: 100_000,
            new_connections: false,
        }
    }

    fn workers(&self) -> usize {
        self.connections.max(1) * if self.http2 { self.streams.max(1) } else { 1 }
    }
}

/// One failed request.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// Sequence number (order of intended send).
    pub seq: u64,
    /// Intended send time, ms since the run started.
    pub at_ms: f64,
    /// `connect`, `timeout`, `io`, `status:4xx`/`status:5xx`, `mesh:<reason>`.
    pub kind: String,
    /// HTTP status when there was a response.
    pub status: Option<u16>,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub second: u64,
    pub ok: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Latency quantiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub protocol: &'static str,
    pub connections: usize,
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub rps: f64,
    pub latency_us: Latency,
    /// Error counts by kind.
    pub errors: BTreeMap<String, u64>,
    /// Open loop: slots that were still queued when the run ended (the
    /// target could not keep up); they are not counted as requests.
    pub unsent: u64,
    pub timeline: Vec<Second>,
    pub failures: Vec<Failure>,
    /// More failures happened than `max_failure_records`.
    pub failures_truncated: bool,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// A table for humans.
    pub fn table(&self) -> String {
        let l = &self.latency_us;
        let mut s = format!(
            "{} {} conns{}  {:.1}s\n\
             requests  ok        errors    req/s\n\
             {:<9} {:<9} {:<9} {:.0}\n\
             latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.0}\n",
            self.url,
            self.connections,
            self.rate
                .map(|r| format!(", open loop at {r:.0} req/s"))
                .unwrap_or_default(),
            self.duration_s,
            self.requests,
            self.ok,
            self.error_count(),
            self.rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean,
        );
        for (k, v) in &self.errors {
            s.push_str(&format!("error {k}: {v}\n"));
        }
        if self.unsent > 0 {
            s.push_str(&format!(
                "unsent: {} slots still queued at the end (target saturated)\n",
                self.unsent
            ));
        }
        s
    }
}

/// Live counters, for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub errors: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

#[derive(Default)]
struct Stats {
    hist: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    ok: u64,
    failures: Vec<Failure>,
    truncated: bool,
    /// Per second: ok, errors, latency histogram.
    seconds: Vec<(u64, u64, Histogram<u64>)>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Some(histogram()),
            ..Default::default()
        }
    }

    fn second(&mut self, at: Duration) -> &mut (u64, u64, Histogram<u64>) {
        let i = at.as_secs() as usize;
        while self.seconds.len() <= i {
            self.seconds.push((
                0,
                0,
                Histogram::new_with_bounds(1, 120_000_000, 2).expect("bounds"),
            ));
        }
        &mut self.seconds[i]
    }

    fn record(&mut self, cfg: &LoadConfig, slot: Slot, start: Instant, outcome: Outcome) {
        let at = slot.intended.saturating_duration_since(start);
        match outcome {
            Outcome::Ok(us) => {
                self.ok += 1;
                if let Some(h) = &mut self.hist {
                    let _ = h.record(us.max(1));
                }
                let s = self.second(at);
                s.0 += 1;
                let _ = s.2.record(us.max(1));
            }
            Outcome::Failed {
                kind,
                status,
                latency_us,
            } => {
                // Answers (even error answers) have a latency worth keeping.
                if let Some(us) = latency_us {
                    if let Some(h) = &mut self.hist {
                        let _ = h.record(us.max(1));
                    }
                }
                self.second(at).1 += 1;
                if self.failures.len() < cfg.max_failure_records {
                    self.failures.push(Failure {
                        seq: slot.seq,
                        at_ms: at.as_secs_f64() * 1000.0,
                        kind: kind.clone(),
                        status,
                    });
                } else {
                    self.truncated = true;
                }
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        if let (Some(a), Some(b)) = (&mut self.hist, &o.hist) {
            a.add(b).expect("same bounds");
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.failures.extend(o.failures);
        self.truncated |= o.truncated;
        for (i, (ok, err, h)) in o.seconds.into_iter().enumerate() {
            let s = self.second(Duration::from_secs(i as u64));
            s.0 += ok;
            s.1 += err;
            s.2.add(&h).expect("same bounds");
        }
    }
}

/// One request slot: its sequence number and intended send time.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    intended: Instant,
}

enum Outcome {
    Ok(u64),
    Failed {
        kind: String,
        status: Option<u16>,
        latency_us: Option<u64>,
    },
}

impl Outcome {
    fn failed(kind: &str) -> Outcome {
        Outcome::Failed {
            kind: kind.into(),
            status: None,
            latency_us: None,
        }
    }
}

/// Where slots come from.
enum Source {
    /// Closed loop: a slot is "now" whenever a worker is free.
    Closed { next_seq: Arc<AtomicU64> },
    /// Open loop: slots released by the pacer.
    Open {
        rx: Arc<Mutex<tokio::sync::mpsc::UnboundedReceiver<Slot>>>,
        unsent: AtomicU64,
    },
}

/// Open loop: queued slots are still sent this long after the run's end;
/// later ones are reported as unsent.
const DRAIN: Duration = Duration::from_secs(2);

impl Source {
    async fn next(&self, end: Instant) -> Option<Slot> {
        match self {
            Source::Closed { next_seq } => {
                let now = Instant::now();
                (now < end).then(|| Slot {
                    seq: next_seq.fetch_add(1, Ordering::Relaxed),
                    intended: now,
                })
            }
            Source::Open { rx, unsent } => {
                let slot = rx.lock().await.recv().await?;
                if Instant::now() > end + DRAIN {
                    unsent.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Some(slot)
            }
        }
    }
}

/// A connection of a worker.
enum Conn {
    None,
    H1(http1::SendRequest<Full<Bytes>>),
    /// Shared by the workers of one HTTP/2 connection.
    H2(Arc<Mutex<Option<http2::SendRequest<Full<Bytes>>>>>),
}

/// Runs the load and returns the report. `progress` is updated live.
pub async fn run(cfg: LoadConfig, progress: Arc<Progress>) -> Report {
    let cfg = Arc::new(cfg);
    let start = Instant::now();
    let end = start + cfg.duration;
    let workers = cfg.workers();
    let (source, pacer) = match cfg.rate {
        None => (
            Arc::new(Source::Closed {
                next_seq: Arc::new(AtomicU64::new(0)),
            }),
            None,
        ),
        Some(rate) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let pacer = tokio::spawn(pace(tx, start, end, rate));
            (
                Arc::new(Source::Open {
                    rx: Arc::new(Mutex::new(rx)),
                    unsent: AtomicU64::new(0),
                }),
                Some(pacer),
            )
        }
    };
    let mut tasks = Vec::with_capacity(workers);
    let per_conn = if cfg.http2 { cfg.streams.max(1) } else { 1 };
    for _ in 0..cfg.connections.max(1) {
        let shared = Arc::new(Mutex::new(None));
        for _ in 0..per_conn {
            let conn = if cfg.http2 {
                Conn::H2(shared.clone())
            } else {
                Conn::None
            };
            tasks.push(tokio::spawn(worker(
                cfg.clone(),
                source.clone(),
                conn,
                start,
                end,
                progress.clone(),
            )));
        }
    }
    let mut total = Stats::new();
    for t in tasks {
        total.merge(t.await.expect("load worker"));
    }
    let mut unsent = 0;
    if let Some(p) = pacer {
        let _ = p.await;
    }
    if let Source::Open { rx, unsent: u } = &*source {
        unsent = u.load(Ordering::Relaxed);
        let mut rx = rx.lock().await;
        while rx.try_recv().is_ok() {
            unsent += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    total.failures.sort_by_key(|f| f.seq);
    let h = total.hist.as_ref().expect("histogram");
    let errors: u64 = total.errors.values().sum();
    let timeline = total
        .seconds
        .iter()
        .enumerate()
        .map(|(i, (ok, err, h))| Second {
            second: i as u64,
            ok: *ok,
            errors: *err,
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        })
        .collect();
    Report {
        url: format!("http://{}:{}{}", cfg.host, cfg.port, cfg.path),
        protocol: if cfg.http2 { "h2c" } else { "http/1.1" },
        connections: cfg.connections,
        rate: cfg.rate,
        duration_s: elapsed,
        requests: total.ok + errors,
        ok: total.ok,
        rps: (total.ok + errors) as f64 / elapsed,
        latency_us: Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        },
        errors: total.errors,
        unsent,
        timeline,
        failures: total.failures,
        failures_truncated: total.truncated,
    }
}

/// Releases slots at `rate` per second from `start` until `end`.
async fn pace(
    tx: tokio::sync::mpsc::UnboundedSender<Slot>,
    start: Instant,
    end: Instant,
    rate: f64,
) {
    let ns_per_slot = 1e9 / rate.max(0.001);
    // tokio's timer has millisecond granularity: sleep to within this much
    // of the slot, then yield until it is due.
    const SPIN: Duration = Duration::from_micros(1500);
    let mut seq = 0u64;
    loop {
        // Rounded nanoseconds, so N/s for 1 s is exactly N slots.
        let intended = start + Duration::from_nanos((seq as f64 * ns_per_slot).round() as u64);
        if intended >= end {
            return;
        }
        let now = Instant::now();
        if intended > now + SPIN {
            tokio::time::sleep_until((intended - SPIN).into()).await;
            continue;
        }
        if intended > now {
            tokio::task::yield_now().await;
            continue;
        }
        if tx.send(Slot { seq, intended }).is_err() {
            return;
        }
        seq += 1;
    }
}

async fn worker(
    cfg: Arc<LoadConfig>,
    source: Arc<Source>,
    mut conn: Conn,
    start: Instant,
    end: Instant,
    progress: Arc<Progress>,
) -> Stats {
    let mut s = Stats::new();
    while let Some(slot) = source.next(end).await {
        let outcome = one(&cfg, &mut conn, slot).await;
        if matches!(outcome, Outcome::Failed { .. }) {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
        let connect_failed = matches!(&outcome, Outcome::Failed { kind, .. } if kind == "connect");
        s.record(&cfg, slot, start, outcome);
        if connect_failed && cfg.rate.is_none() {
            // Closed loop against a refusing port: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    s
}

async fn connect(cfg: &LoadConfig) -> std::io::Result<TokioIo<tokio::net::TcpStream>> {
    let stream = tokio::time::timeout(
        cfg.timeout,
        tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(stream))
}

/// Sends one request on the worker's connection (connecting when needed).
async fn one(cfg: &LoadConfig, conn: &mut Conn, slot: Slot) -> Outcome {
    let mut req = Request::new(Full::new(cfg.body.clone()));
    *req.method_mut() = cfg.method.clone();
    *req.headers_mut() = cfg.headers.clone();
    if let Some(h) = &cfg.seq_header {
        req.headers_mut()
            .insert(h.clone(), HeaderValue::from(slot.seq));
    }
    if cfg.new_connections && !cfg.http2 {
        req.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    // A request the connection never sent (it had closed, or the server
    // refused it unprocessed: an HTTP/2 GOAWAY) goes on a new connection;
    // one that was sent and not answered is a failure.
    let mut tries = 0;
    let sent = loop {
        tries += 1;
        let attempt = match conn {
            Conn::None | Conn::H1(_) => {
                if cfg.new_connections || !matches!(conn, Conn::H1(tx) if !tx.is_closed()) {
                    let Ok(io) = connect(cfg).await else {
                        *conn = Conn::None;
                        return Outcome::failed("connect");
                    };
                    match http1::handshake(io).await {
                        Ok((tx, c)) => {
                            tokio::spawn(c);
                            *conn = Conn::H1(tx);
                        }
                        Err(_) => return Outcome::failed("connect"),
                    }
                }
                let Conn::H1(tx) = conn else {
                    unreachable!("connected above")
                };
                *req.uri_mut() = cfg.path.parse().expect("path");
                match tx.ready().await {
                    Err(_) => Err(req),
                    Ok(()) => send(cfg.timeout, tx.try_send_request(req)).await,
                }
            }
            Conn::H2(shared) => {
                let tx = {
                    let mut g = shared.lock().await;
                    if g.as_ref().is_none_or(|t| t.is_closed()) {
                        *g = None;
                        let Ok(io) = connect(cfg).await else {
                            return Outcome::failed("connect");
                        };
                        match http2::handshake(TokioExecutor::new(), io).await {
                            Ok((tx, c)) => {
                                tokio::spawn(c);
                                *g = Some(tx);
                            }
                            Err(_) => return Outcome::failed("connect"),
                        }
                    }
                    g.clone().expect("connected above")
                };
                let mut tx = tx;
                *req.uri_mut() = format!("http://{}:{}{}", cfg.host, cfg.port, cfg.path)
                    .parse()
                    .expect("uri");
                *req.version_mut() = http::Version::HTTP_2;
                match tx.ready().await {
                    Err(_) => {
                        shared.lock().await.take();
                        Err(req)
                    }
                    Ok(()) => send(cfg.timeout, tx.try_send_request(req)).await,
                }
            }
        };
        match attempt {
            Ok(answered) => break answered,
            Err(unsent) if tries < 3 => {
                if let Conn::H1(_) = conn {
                    *conn = Conn::None;
                }
                req = unsent;
            }
            Err(_) => return Outcome::failed("io"),
        }
    };
    let latency_us = slot.intended.elapsed().as_micros() as u64;
    match sent {
        Err(_) => {
            // A timed-out HTTP/1.1 connection has an answer in flight.
            if let Conn::H1(_) = conn {
                *conn = Conn::None;
            }
            Outcome::Failed {
                kind: "timeout".into(),
                status: None,
                latency_us: Some(latency_us),
            }
        }
        Ok(Err(_)) => {
            if let Conn::H1(_) = conn {
                *conn = Conn::None;
            }
            Outcome::failed("io")
        }
        Ok(Ok((status, mesh_error))) => match mesh_error {
            Some(reason) => Outcome::Failed {
                kind: format!("mesh:{reason}"),
                status: Some(status),
                latency_us: Some(latency_us),
            },
            None if status >= 400 => Outcome::Failed {
                kind: format!("status:{}xx", status / 100),
                status: Some(status),
                latency_us: Some(latency_us),
            },
            None => Outcome::Ok(latency_us),
        },
    }
}

/// What became of a request sent: timed out, or its answer (status and
/// `x-mesh-error`) or error.
type Sent = Result<hyper::Result<(u16, Option<String>)>, tokio::time::error::Elapsed>;

/// Awaits a request handed to a connection; `Err` gives the request back
/// when the connection never sent it.
async fn send(
    timeout: Duration,
    sending: impl std::future::Future<
        Output = Result<
            http::Response<hyper::body::Incoming>,
            hyper::client::conn::TrySendError<Request<Full<Bytes>>>,
        >,
    >,
) -> Result<Sent, Request<Full<Bytes>>> {
    let answered = tokio::time::timeout(timeout, async {
        match sending.await {
            Ok(resp) => Ok(read(resp).await),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(req),
                None => Ok(Err(e.into_error())),
            },
        }
    })
    .await;
    match answered {
        Err(elapsed) => Ok(Err(elapsed)),
        Ok(Ok(r)) => Ok(Ok(r)),
        Ok(Err(req)) => Err(req),
    }
}

/// Reads a whole response: its status and `x-mesh-error` reason.
async fn read(resp: http::Response<hyper::body::Incoming>) -> hyper::Result<(u16, Option<String>)> {
    let status = resp.status().as_u16();
    let mesh = resp
        .headers()
        .get("x-mesh-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    resp.into_body().collect().await?;
    Ok((status, mesh))
}

/// Parses `name: value` header arguments.
pub fn parse_header(h: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = h
        .split_once(':')
        .ok_or_else(|| format!("header {h:?}: expected `name: value`"))?;
    let name =
        HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| format!("header {h:?}: {e}"))?;
    let value = HeaderValue::from_str(v.trim()).map_err(|e| format!("header {h:?}: {e}"))?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        let (n, v) = parse_header("X-Mesh-Service: orders").unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("x-mesh-service", "orders")
        );
        assert!(parse_header("nocolon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[test]
    fn failures_and_timeline_are_recorded_by_second() {
        let cfg = LoadConfig::new("127.0.0.1", 1, "/");
        let start = Instant::now();
        let mut s = Stats::new();
        let slot = |seq, ms| Slot {
            seq,
            intended: start + Duration::from_millis(ms),
        };
        s.record(&cfg, slot(0, 10), start, Outcome::Ok(100));
        s.record(&cfg, slot(1, 1500), start, Outcome::failed("connect"));
        s.record(
            &cfg,
            slot(2, 1600),
            start,
            Outcome::Failed {
                kind: "mesh:upstream_timeout".into(),
                status: Some(504),
                latency_us: Some(2000),
            },
        );
        assert_eq!(s.ok, 1);
        assert_eq!(s.errors["connect"], 1);
        assert_eq!(s.errors["mesh:upstream_timeout"], 1);
        assert_eq!(s.failures.len(), 2);
        assert_eq!(s.failures[1].seq, 2);
        assert!((s.failures[0].at_ms - 1500.0).abs() < 1.0);
        assert_eq!(s.seconds.len(), 2);
        assert_eq!((s.seconds[0].0, s.seconds[0].1), (1, 0));
        assert_eq!((s.seconds[1].0, s.seconds[1].1), (0, 2));
    }
}
