//! `meshgate-routebench`: route-table scale. Loads N routes through the
//! gateway's real config compiler (the same code a gateway runs on a watch
//! event), then measures (1) matching a request against the published
//! table and (2) applying one changed route, end to end: decode, compile,
//! publish a new snapshot. Two table shapes: one host per route
//! (`hosts`), and one shared host with a path prefix per route (`paths`).

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use clap::Parser;
use hdrhistogram::Histogram;
use meshgate_config::store::Entry;
use meshgate_config::sync::{Apply, Change};
use meshgate_config::{Key, Kind};
use meshgate_gateway::http::h2::Clients;
use meshgate_gateway::snapshot::{Compiler, Defaults, Snapshot};
use meshgate_gateway::upstream::endpoint::EndpointRegistry;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Routes in the table.
    #[arg(long, default_value_t = 50_000)]
    routes: usize,
    /// Lookups to time.
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
    /// Single-route changes to time.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// `hosts` or `paths`.
    #[arg(long, default_value = "hosts")]
    shape: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn route_json(shape: &str, i: usize, weight: u32) -> Vec<u8> {
    let m = match shape {
        "paths" => {
            serde_json::json!({"hosts": ["api.example.com"], "path": {"prefix": format!("/svc-{i}")}})
        }
        _ => {
            serde_json::json!({"hosts": [format!("svc-{i}.example.com")], "path": {"prefix": "/"}})
        }
    };
    serde_json::to_vec(&serde_json::json!({
        "scope": "ingress",
        "match": m,
        "backends": [{"service": "backend", "weight": weight}],
    }))
    .expect("json")
}

fn quantiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999), "max": h.max(), "mean": h.mean().round(),
    })
}

fn main() {
    let args = Args::parse();
    if args.shape != "hosts" && args.shape != "paths" {
        eprintln!("meshgate-routebench: --shape: `hosts` or `paths`");
        std::process::exit(2);
    }
    let shared = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let mut compiler = Compiler::new(
        shared.clone(),
        Defaults {
            connect_timeout: std::time::Duration::from_secs(1),
            request_timeout: std::time::Duration::from_secs(1),
            zone: None,
        },
        Arc::new(Clients::default()),
        Arc::new(EndpointRegistry::default()),
        Default::default(),
        Box::new(|_| {}),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let put = |key: Key, value: Vec<u8>, rev: i64| {
        Change::Put(Entry {
            key,
            value,
            mod_revision: rev,
        })
    };
    let mut changes = vec![put(
        Key::new(Kind::Services, "backend"),
        br#"{"endpoints":[{"address":"127.0.0.1:1"}]}"#.to_vec(),
        1,
    )];
    for i in 0..args.routes {
        changes.push(put(
            Key::new(Kind::Routes, format!("r-{i}")),
            route_json(&args.shape, i, 1),
            2 + i as i64,
        ));
    }
    let t = Instant::now();
    compiler.apply(changes, 1 + args.routes as i64);
    let initial_ms = t.elapsed().as_secs_f64() * 1000.0;

    // Matching: requests for random routes (and some misses).
    let snap = shared.load_full();
    let method = http::Method::GET;
    let headers = http::HeaderMap::new();
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut lookup = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("bounds");
    let mut found = 0usize;
    for _ in 0..args.lookups {
        let i = (next() % (args.routes as u64 + args.routes as u64 / 10 + 1)) as usize;
        let (host, path) = match args.shape.as_str() {
            "paths" => ("api.example.com".to_string(), format!("/svc-{i}/items/42")),
            _ => (format!("svc-{i}.example.com"), "/items/42".to_string()),
        };
        let t = Instant::now();
        let view = meshgate_gateway::routing::RequestView {
            method: &method,
            path: &path,
            query: None,
            headers: &headers,
        };
        let r = snap.ingress.find(&host, &view);
        let ns = t.elapsed().as_nanos() as u64;
        found += usize::from(r.is_some());
        let _ = lookup.record(ns.max(1));
    }

    // One changed route at a time, through the compiler.
    let mut apply = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).expect("bounds");
    let mut rev = 2 + args.routes as i64;
    for c in 0..args.changes {
        let i = (next() % args.routes as u64) as usize;
        rev += 1;
        let change = put(
            Key::new(Kind::Routes, format!("r-{i}")),
            route_json(&args.shape, i, 2 + c as u32),
            rev,
        );
        let t = Instant::now();
        compiler.apply(vec![change], rev);
        let _ = apply.record(t.elapsed().as_nanos() as u64);
    }
    assert_eq!(shared.load().revision, rev, "every change was published");

    let out = serde_json::json!({
        "shape": args.shape, "routes": args.routes, "initial_load_ms": initial_ms,
        "lookups": args.lookups, "found": found, "match_ns": quantiles(&lookup),
        "changes": args.changes, "apply_one_change_us": quantiles(&apply.clone()).as_object().map(|o| {
            o.iter().map(|(k, v)| (k.clone(), serde_json::json!(v.as_f64().unwrap_or(0.0) / 1000.0))).collect::<serde_json::Map<_, _>>()
        }),
    });
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    }
}
