//! `meshgate-load`: an HTTP/1.1 load generator with HDR latency histograms.
//!
//! Closed loop (each connection sends as fast as answers come) or open loop
//! (`--rate`: a fixed request rate, latency measured from each request's
//! *intended* send time so queueing is not hidden — coordinated omission).
//! Errors are counted by kind: connect, I/O, status class, and the mesh's
//! `x-mesh-error` reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// HTTP/1.1 load generator.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Target URL (http://host:port/path).
    url: String,
    /// Extra request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Concurrent keep-alive connections.
    #[arg(short, long, default_value_t = 10)]
    connections: usize,
    /// Run time in seconds.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Open loop at this many requests per second in total (default: closed loop).
    #[arg(short, long)]
    rate: Option<f64>,
    /// Print a JSON summary instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Stats {
    hist: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    ok: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let uri: http::Uri = match args.url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("meshgate-load: url: {e}");
            std::process::exit(2);
        }
    };
    let (Some(host), Some(port)) = (uri.host().map(str::to_string), uri.port_u16().or(Some(80)))
    else {
        eprintln!("meshgate-load: url: needs a host");
        std::process::exit(2);
    };
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let Some((k, v)) = h.split_once(':') else {
            eprintln!("meshgate-load: header {h:?}: expected `name: value`");
            std::process::exit(2);
        };
        match (
            http::HeaderName::from_bytes(k.trim().as_bytes()),
            http::HeaderValue::from_str(v.trim()),
        ) {
            (Ok(k), Ok(v)) => {
                headers.insert(k, v);
            }
            _ => {
                eprintln!("meshgate-load: header {h:?}: invalid");
                std::process::exit(2);
            }
        }
    }
    if !headers.contains_key(http::header::HOST) {
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(&format!("{host}:{port}")).expect("host"),
        );
    }
    let duration = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.connections.max(1) {
        let (host, headers, uri) = (host.clone(), headers.clone(), uri.clone());
        let interval = args
            .rate
            .map(|r| Duration::from_secs_f64(args.connections as f64 / r));
        // Spread open-loop start times so connections do not fire together.
        let offset = interval
            .map(|iv| iv.mul_f64(i as f64 / args.connections as f64))
            .unwrap_or_default();
        tasks.push(tokio::spawn(worker(
            host,
            port,
            uri,
            headers,
            start + offset,
            start + duration,
            interval,
        )));
    }
    let mut total = Stats {
        hist: Some(histogram()),
        ..Default::default()
    };
    for t in tasks {
        let s = t.await.expect("worker");
        total.ok += s.ok;
        if let (Some(a), Some(b)) = (&mut total.hist, &s.hist) {
            a.add(b).expect("same bounds");
        }
        for (k, v) in s.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let h = total.hist.as_ref().expect("histogram");
    let errors: u64 = total.errors.values().sum();
    let q = |p: f64| h.value_at_quantile(p);
    if args.json {
        let v = serde_json::json!({
            "url": args.url, "connections": args.connections, "rate": args.rate,
            "duration_s": elapsed, "requests": total.ok + errors, "ok": total.ok,
            "rps": (total.ok + errors) as f64 / elapsed,
            "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": h.max()},
            "errors": total.errors,
        });
        println!("{v}");
    } else {
        println!(
            "requests {}  ok {}  errors {}  in {:.2}s  = {:.0} req/s",
            total.ok + errors,
            total.ok,
            errors,
            elapsed,
            (total.ok + errors) as f64 / elapsed
        );
        println!(
            "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            h.max()
        );
        for (k, v) in &total.errors {
            println!("error {k}: {v}");
        }
    }
}

async fn worker(
    host: String,
    port: u16,
    uri: http::Uri,
    headers: http::HeaderMap,
    first: Instant,
    end: Instant,
    interval: Option<Duration>,
) -> Stats {
    let mut s = Stats {
        hist: Some(histogram()),
        ..Default::default()
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    let mut next = first;
    loop {
        let intended = match interval {
            Some(iv) => {
                if next >= end {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
                let t = next;
                next += iv;
                t
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        if sender.as_ref().is_none_or(|x| x.is_closed()) {
            match tokio::net::TcpStream::connect((host.as_str(), port)).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                        Ok((tx, conn)) => {
                            tokio::spawn(conn);
                            sender = Some(tx);
                        }
                        Err(_) => {
                            *s.errors.entry("connect".into()).or_default() += 1;
                            continue;
                        }
                    }
                }
                Err(_) => {
                    *s.errors.entry("connect".into()).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let tx = sender.as_mut().expect("connected");
        let mut req = http::Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = path.parse().expect("path");
        *req.headers_mut() = headers.clone();
        if tx.ready().await.is_err() {
            sender = None;
            *s.errors.entry("io".into()).or_default() += 1;
            continue;
        }
        match tx.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let mesh = resp
                    .headers()
                    .get("x-mesh-error")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let _ = resp.into_body().collect().await;
                let us = intended.elapsed().as_micros() as u64;
                if let Some(h) = &mut s.hist {
                    let _ = h.record(us.max(1));
                }
                if let Some(reason) = mesh {
                    *s.errors.entry(format!("mesh:{reason}")).or_default() += 1;
                } else if status >= 400 {
                    *s.errors
                        .entry(format!("status:{}xx", status / 100))
                        .or_default() += 1;
                } else {
                    s.ok += 1;
                }
            }
            Err(_) => {
                sender = None;
                *s.errors.entry("io".into()).or_default() += 1;
            }
        }
    }
    s
}
