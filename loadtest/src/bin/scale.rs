//! `meshgate-scalebench`: the control plane at the scale where a mesh
//! outgrows one machine. It seeds etcd with the config of a large mesh
//! (services, routes, groups), then runs thousands of simulated sidecars
//! in this one process: each is the real sync code (`meshgate_config::sync`
//! on its own `EtcdStore`, its own connection, the prefixes a sidecar
//! watches) and the real registration (its node record under its own
//! lease), without a data plane. Pointed at `etcd grpc-proxy`, their
//! watches are coalesced as a real deployment's would be.
//!
//! It then measures:
//! - the fan-out of one admin write that every sidecar watches (their
//!   group) to all of them: time from the write until each has applied it
//!   (p50/p99/max), and how many never did within the deadline;
//! - the admin's `/status` (first page, and every page) and `/nodes` with
//!   every node registered, and a write with `?wait` (until both gateways
//!   applied it).
//!
//! Prints one JSON object. `loadtest/bench.py --only scale` starts etcd,
//! the proxy, the admin and two gateways around it and samples their CPU
//! and memory.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use meshgate_config::key::node_key;
use meshgate_config::model::{Node, NodeKind};
use meshgate_config::node::{EtcdConfig, StoreConfig};
use meshgate_config::registration::Registration;
use meshgate_config::store::{ConfigStore, Op};
use meshgate_config::sync::{self, Apply, Change, SyncOptions};
use meshgate_config::{Key, Kind};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// etcd as the simulated sidecars reach it (the grpc-proxy).
    #[arg(long)]
    sidecar_etcd: String,
    /// etcd itself, for seeding.
    #[arg(long)]
    etcd: String,
    /// The admin API's base URL and a token with the admin role.
    #[arg(long)]
    admin: String,
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 10_000)]
    sidecars: usize,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 50_000)]
    routes: usize,
    /// Groups the services are spread over; the simulated sidecars all
    /// belong to the first (`shop`), so one write to it reaches them all.
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Fan-out writes to time.
    #[arg(long, default_value_t = 5)]
    writes: usize,
    /// Sidecars started per second.
    #[arg(long, default_value_t = 500)]
    start_rate: usize,
    /// Node-record lease TTL, seconds.
    #[arg(long, default_value_t = 10)]
    lease_ttl_s: u64,
    /// Seconds the sidecars run steadily before the writes (the driver
    /// samples etcd's and the proxy's CPU then).
    #[arg(long, default_value_t = 20)]
    steady_s: u64,
}

/// What one simulated sidecar has applied: the revision of its group
/// object, and when (ns since the run's start).
#[derive(Default)]
struct Seen {
    group_revision: AtomicI64,
    at_ns: AtomicU64,
}

/// The simulated sidecar's config view: only when its group object
/// changes is noted.
struct Probe {
    seen: Arc<Seen>,
    group: Key,
    start: Instant,
}

impl Apply for Probe {
    fn apply(&mut self, changes: Vec<Change>, _revision: i64) {
        for c in changes {
            if let Change::Put(e) = c {
                if e.key == self.group {
                    self.seen
                        .at_ns
                        .store(self.start.elapsed().as_nanos() as u64, Ordering::Release);
                    self.seen
                        .group_revision
                        .store(e.mod_revision, Ordering::Release);
                }
            }
        }
    }
}

fn store_config(endpoint: &str) -> StoreConfig {
    StoreConfig {
        etcd: Some(EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            prefix: "/meshgate/v1".into(),
            timeout_ms: 10_000,
            tls: None,
            user: None,
            password_file: None,
        }),
        file: None,
    }
}

/// Writes the mesh's config straight into etcd, `max_txn_ops` at a time.
async fn seed(store: &Arc<dyn ConfigStore>, a: &Args) -> anyhow::Result<()> {
    let mut ops = Vec::new();
    let group = |i: usize| match i % a.groups {
        0 => "shop".to_string(),
        g => format!("g-{g}"),
    };
    for g in 0..a.groups {
        ops.push((
            Key::new(Kind::Groups, group(g)),
            json!({"description": "scale"}),
        ));
    }
    for i in 0..a.services {
        // The sidecars' own services are in `shop`.
        let g = if i < a.sidecars {
            "shop".into()
        } else {
            group(i)
        };
        ops.push((
            Key::new(Kind::Services, format!("svc-{i}")),
            json!({"group": g, "endpoints": [{"address": format!("10.{}.{}.{}:8080", i / 65536 % 256, i / 256 % 256, i % 256)}],
                   "destinations": [{"service": format!("svc-{}", (i + 1) % a.services)}]}),
        ));
    }
    for i in 0..a.routes {
        ops.push((
            Key::new(Kind::Routes, format!("r-{i}")),
            json!({"scope": "mesh", "match": {"hosts": [format!("r-{i}.scale.internal")]},
                   "backends": [{"service": format!("svc-{}", i % a.services)}]}),
        ));
    }
    for chunk in ops.chunks(100) {
        let puts = chunk
            .iter()
            .map(|(key, v)| Op::Put {
                key: key.clone(),
                value: v.to_string().into_bytes(),
                lease: None,
            })
            .collect();
        store.txn(vec![], puts).await?;
    }
    Ok(())
}

/// One HTTP/1.1 exchange with the admin API: status and JSON body.
async fn admin(
    a: &Args,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let url: http::Uri = format!("{}/api/v1/{path}", a.admin).parse()?;
    let host = url.authority().map(|h| h.to_string()).unwrap_or_default();
    let io = tokio::net::TcpStream::connect(&host).await?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", host)
        .header("authorization", format!("Bearer {}", a.token))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
    let resp = tx.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

fn quantiles(h: &Histogram<u64>) -> Value {
    json!({"p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
           "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
           "max_ms": h.max() as f64 / 1000.0})
}

/// Times `f` once, in ms.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed().as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let start = Instant::now();
    let direct = store_config(&a.etcd).open().await?;
    let (r, seed_ms) = timed(seed(&direct, &a)).await;
    r?;
    eprintln!(
        "seeded {} services, {} routes in {seed_ms:.0} ms",
        a.services, a.routes
    );

    // The simulated sidecars, started at `start_rate` per second.
    let seen: Vec<Arc<Seen>> = (0..a.sidecars).map(|_| Arc::default()).collect();
    let synced = Arc::new(AtomicUsize::new(0));
    let mut keep = Vec::with_capacity(a.sidecars);
    let group = Key::new(Kind::Groups, "shop");
    let t_start = Instant::now();
    for (i, s) in seen.iter().enumerate() {
        let store = store_config(&a.sidecar_etcd).open().await?;
        let own = format!("svc-{i}");
        let dest = format!("svc-{}", (i + 1) % a.services);
        let opts = SyncOptions::new(vec![
            "nodes/gateway/".into(),
            "groups/shop".into(),
            format!("services/{own}"),
            format!("services/{dest}"),
            format!("instances/{dest}/"),
        ]);
        let probe = Probe {
            seen: s.clone(),
            group: group.clone(),
            start,
        };
        let mut status = sync::spawn(store.clone(), opts, probe);
        let synced = synced.clone();
        tokio::spawn(async move {
            let _ = status.wait_for(|s| s.ready()).await;
            synced.fetch_add(1, Ordering::Relaxed);
        });
        let record = Node {
            kind: NodeKind::Sidecar,
            roles: vec![],
            groups: vec!["shop".into()],
            address: None,
            admin_address: None,
            service: Some(own),
            version: "scalebench".into(),
            applied_revision: 0,
            updated_at_ms: 0,
            policy: Some("fresh".into()),
            rejected: vec![],
            identity: None,
        };
        keep.push(Registration::spawn(
            store,
            node_key(NodeKind::Sidecar, &format!("sim-{i:05}")),
            serde_json::to_vec(&record)?,
            Duration::from_secs(a.lease_ttl_s),
        ));
        if (i + 1) % a.start_rate.max(1) == 0 {
            let due = t_start + Duration::from_secs(((i + 1) / a.start_rate.max(1)) as u64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while synced.load(Ordering::Relaxed) < a.sidecars && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_synced_ms = t_start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "{} of {} sidecars synced in {all_synced_ms:.0} ms",
        synced.load(Ordering::Relaxed),
        a.sidecars
    );
    // Every node registered.
    let want = a.sidecars;
    let reg_deadline = Instant::now() + Duration::from_secs(120);
    let mut registered = 0;
    while Instant::now() < reg_deadline {
        let (_, v) = admin(&a, "GET", "status?kind=sidecar&limit=1", None).await?;
        registered = v["counts"]["sidecars"].as_u64().unwrap_or(0) as usize;
        if registered >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{}",
        json!({"phase": "steady", "sidecars_synced": synced.load(Ordering::Relaxed), "registered": registered})
    );
    eprintln!("steady for {} s", a.steady_s);
    tokio::time::sleep(Duration::from_secs(a.steady_s)).await;

    // Fan-out: one write to `groups/shop`, applied by every sidecar.
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut writes = Vec::new();
    for k in 0..a.writes {
        let t0 = start.elapsed().as_nanos() as u64;
        // A write etcd refused under load (503: nothing changed) is tried
        // again, and counted.
        let mut refused = 0;
        let (st, v) = loop {
            let (st, v) = admin(
                &a,
                "PUT",
                "groups/shop",
                Some(json!({"description": format!("write {k}")})),
            )
            .await?;
            if st == 503 && refused < 20 {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            break (st, v);
        };
        anyhow::ensure!(st < 300, "PUT groups/shop: {st} {v}");
        let rev = v["version"].as_i64().unwrap_or(i64::MAX);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = seen
                .iter()
                .filter(|s| s.group_revision.load(Ordering::Acquire) >= rev)
                .count();
            if done == seen.len() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut missed = 0;
        for s in &seen {
            if s.group_revision.load(Ordering::Acquire) >= rev {
                let us = (s.at_ns.load(Ordering::Acquire).saturating_sub(t0) / 1000).max(1);
                h.record(us)?;
                all.record(us)?;
            } else {
                missed += 1;
            }
        }
        writes.push(json!({"revision": rev, "fanout": quantiles(&h), "missed": missed, "refused_first": refused}));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // The admin with every node registered.
    let (first, status_first_ms) = timed(admin(&a, "GET", "status", None)).await;
    let first = first?.1;
    let (_, status_all_ms) = timed(async {
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let q = match &after {
                Some(x) => format!("status?after={x}"),
                None => "status".into(),
            };
            let Ok((_, v)) = admin(&a, "GET", &q, None).await else {
                break;
            };
            pages += 1;
            match v["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        pages
    })
    .await;
    let (_, nodes_ms) = timed(admin(&a, "GET", "nodes?limit=1000", None)).await;
    let (waited, wait_ms) = timed(admin(
        &a,
        "PUT",
        "services/svc-0?wait=30s",
        Some(json!({"group": "shop", "endpoints": [{"address": "10.0.0.1:8081"}]})),
    ))
    .await;
    let waited = waited?.1;
    println!(
        "{}",
        json!({
            "phase": "result",
            "sidecars": a.sidecars, "services": a.services, "routes": a.routes, "groups": a.groups,
            "seed_ms": seed_ms,
            "all_synced_ms": all_synced_ms,
            "sidecars_synced": synced.load(Ordering::Relaxed),
            "registered": registered,
            "fanout": quantiles(&all),
            "writes": writes,
            "admin": {
                "status_first_page_ms": status_first_ms,
                "status_counts": first["counts"],
                "status_every_page_ms": status_all_ms,
                "nodes_page_ms": nodes_ms,
                "put_wait_ms": wait_ms,
                "put_wait_complete": waited["propagation"]["complete"],
            },
        })
    );
    drop(keep);
    Ok(())
}
