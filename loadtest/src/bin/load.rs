//! `meshgate-load`: HTTP/1.1 and HTTP/2 load generator with HDR latency
//! histograms, closed or open loop (see the library docs for the model).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use meshgate_loadtest::{parse_header, run, LoadConfig, Progress};

/// HTTP load generator: closed loop (max throughput) or open loop at a
/// fixed rate with latency measured from each request's intended send time.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Target URL (http://host:port/path).
    url: String,
    /// Extra request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Request body.
    #[arg(long, default_value = "")]
    body: String,
    /// Concurrent keep-alive connections.
    #[arg(short, long, default_value_t = 10)]
    connections: usize,
    /// HTTP/2 with prior knowledge (h2c).
    #[arg(long)]
    h2: bool,
    /// HTTP/2: concurrent streams per connection.
    #[arg(short = 'm', long, default_value_t = 1)]
    streams: usize,
    /// Run time in seconds.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Open loop at this many requests per second in total (default: closed loop).
    #[arg(short, long)]
    rate: Option<f64>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Send each request's sequence number in this header.
    #[arg(long)]
    seq_header: Option<String>,
    /// Print the JSON report (with the timeline and every failure) instead of the table.
    #[arg(long)]
    json: bool,
    /// Show a progress bar even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("meshgate-load: {msg}");
    std::process::exit(2)
}

/// A finite number above zero (NaN is not).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn config(args: &Args) -> LoadConfig {
    let uri: http::Uri = args
        .url
        .parse()
        .unwrap_or_else(|e| fail(format!("url: {e}")));
    if uri.scheme_str() != Some("http") {
        fail("url: only http:// is supported");
    }
    let Some(host) = uri.host() else {
        fail("url: needs a host")
    };
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut cfg = LoadConfig::new(host, port, path);
    for h in &args.headers {
        let (k, v) = parse_header(h).unwrap_or_else(|e| fail(e));
        cfg.headers.insert(k, v);
    }
    if !args.h2 && !cfg.headers.contains_key(http::header::HOST) {
        let v = http::HeaderValue::from_str(&format!("{host}:{port}"))
            .unwrap_or_else(|e| fail(format!("url: {e}")));
        cfg.headers.insert(http::header::HOST, v);
    }
    cfg.method = args
        .method
        .parse()
        .unwrap_or_else(|e| fail(format!("method: {e}")));
    cfg.body = Bytes::from(args.body.clone());
    cfg.connections = args.connections.max(1);
    cfg.http2 = args.h2;
    cfg.streams = args.streams.max(1);
    if !positive(args.duration) {
        fail("duration: must be greater than 0");
    }
    cfg.duration = Duration::from_secs_f64(args.duration);
    if let Some(r) = args.rate {
        if !positive(r) {
            fail("rate: must be greater than 0");
        }
    }
    cfg.rate = args.rate;
    if !positive(args.timeout) {
        fail("timeout: must be greater than 0");
    }
    cfg.timeout = Duration::from_secs_f64(args.timeout);
    cfg.seq_header = args.seq_header.as_ref().map(|h| {
        http::HeaderName::from_bytes(h.as_bytes())
            .unwrap_or_else(|e| fail(format!("seq-header: {e}")))
    });
    cfg
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let cfg = config(&args);
    let progress = Arc::new(Progress::default());
    let bar = indicatif::ProgressBar::new(cfg.duration.as_millis() as u64);
    if args.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    } else if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}")
            .expect("template"),
    );
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            let mut last = (start, 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = std::time::Instant::now();
                let done = progress.done.load(Ordering::Relaxed);
                let rps = (done - last.1) as f64 / (now - last.0).as_secs_f64();
                last = (now, done);
                bar.set_position((now - start).as_millis() as u64);
                bar.set_message(format!(
                    "{done} requests, {rps:.0} req/s, {} errors",
                    progress.errors.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let report = run(cfg, progress).await;
    ticker.abort();
    bar.finish_and_clear();
    let out = if args.json {
        serde_json::to_string(&report).expect("report encodes") + "\n"
    } else {
        report.table()
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
}
