//! The live service dependency graph (`GET /api/v1/topology`).
//!
//! The admin polls the live nodes' ops ports (`/calls`: the calls each
//! counted, by caller and destination, with latency buckets) every
//! `topology_interval_ms`: every gateway, and the sidecars whose service
//! has a destination in `direct` mode (their direct tier is the only
//! traffic no gateway sees; what a sidecar's inbound counts, its gateway
//! counted already). It keeps ten minutes of samples per node. A view over
//! a window is the difference between each node's newest sample and the
//! one a window before it, summed over nodes: request rate, 5xx rate,
//! p50/p99 (interpolated within the buckets, as Prometheus'
//! `histogram_quantile`), and the rate each tier carried. Declared
//! `destinations` are set against what was observed: an observed call a
//! service did not declare, and a declared one with no call in the
//! window, are flagged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshgate_config::key::Kind;
use meshgate_config::model::{DestinationMode, Node, NodeKind, Role, Service};
use meshgate_config::store::ConfigStore;
use serde_json::{json, Value};

/// How long samples are kept: the longest window.
pub const KEEP: Duration = Duration::from_secs(600);

/// Nodes polled at once.
const CONCURRENCY: usize = 64;

/// The graph's samples.
#[derive(Debug, Default)]
pub struct Topology {
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
}

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    tier: &'static str,
    edges: Vec<Counts>,
}

/// One edge's counters on one node.
#[derive(Debug, Clone, Default)]
struct Counts {
    caller: String,
    destination: String,
    requests: u64,
    errors: u64,
    /// Cumulative, by upper bound; `+Inf` last.
    buckets: Vec<(f64, u64)>,
}

impl Topology {
    /// Polls the nodes of `store` every `interval`, until the runtime
    /// ends.
    pub fn spawn(store: Arc<dyn ConfigStore>, interval: Duration) -> Arc<Topology> {
        let t = Arc::new(Topology::default());
        let poller = t.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = poller.poll(&*store).await {
                    tracing::debug!(error = %e, "topology: poll failed");
                }
            }
        });
        t
    }

    async fn poll(&self, store: &dyn ConfigStore) -> anyhow::Result<()> {
        let nodes = store.range(&Kind::Nodes.prefix()).await?;
        let services = store.range(&Kind::Services.prefix()).await?;
        // Services with a direct destination: their sidecars are polled.
        let direct: std::collections::HashSet<String> = services
            .entries
            .iter()
            .filter_map(|e| {
                let s: Service = serde_json::from_slice(&e.value).ok()?;
                let any = s
                    .destinations
                    .iter()
                    .any(|d| d.mode == DestinationMode::Direct);
                any.then(|| e.key.name.clone())
            })
            .collect();
        let mut targets = Vec::new();
        for e in &nodes.entries {
            let Ok(n) = serde_json::from_slice::<Node>(&e.value) else {
                continue;
            };
            let Some(ops) = n.admin_address.clone() else {
                continue;
            };
            let tier = match n.kind {
                NodeKind::Gateway if n.roles.contains(&Role::Egress) => "group",
                NodeKind::Gateway if n.roles.contains(&Role::Central) => "central",
                NodeKind::Gateway => "ingress",
                NodeKind::Sidecar if n.service.as_ref().is_some_and(|s| direct.contains(s)) => {
                    "direct"
                }
                NodeKind::Sidecar | NodeKind::Admin => continue,
            };
            targets.push((e.key.node_id().to_string(), ops, tier, n.service));
        }
        let mut got = Vec::new();
        for chunk in targets.chunks(CONCURRENCY) {
            let polls = chunk.iter().map(|(id, ops, tier, service)| async move {
                let url = format!("http://{ops}/calls");
                let answer =
                    crate::client::request(None, http::Method::GET, &url, &[], vec![]).await;
                let edges = match answer {
                    Ok((s, body)) if s.is_success() => parse(&body, tier, service.as_deref()),
                    Ok((s, _)) => {
                        tracing::debug!(node = %id, status = %s, "topology: /calls refused");
                        return None;
                    }
                    Err(e) => {
                        tracing::debug!(node = %id, error = %e, "topology: node unreachable");
                        return None;
                    }
                };
                Some((id.clone(), *tier, edges))
            });
            got.extend(futures::future::join_all(polls).await.into_iter().flatten());
        }
        let now = Instant::now();
        let live: std::collections::HashSet<&str> =
            targets.iter().map(|(id, ..)| id.as_str()).collect();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.retain(|id, _| live.contains(id.as_str()));
        for (id, tier, edges) in got {
            let q = samples.entry(id).or_default();
            q.push_back(Sample {
                at: now,
                tier,
                edges,
            });
            while q.front().is_some_and(|s| now.duration_since(s.at) > KEEP) {
                q.pop_front();
            }
        }
        Ok(())
    }

    /// The graph over the last `window`, with the `destinations` each
    /// service declares.
    pub fn view(&self, window: Duration, declared: &BTreeMap<String, Vec<String>>) -> Value {
        #[derive(Default)]
        struct Edge {
            requests: u64,
            errors: u64,
            rps: f64,
            errors_ps: f64,
            buckets: Vec<(f64, u64)>,
            tiers: BTreeMap<&'static str, f64>,
        }
        let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
        let mut spans = Vec::new();
        let polled;
        {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            polled = samples.len();
            for q in samples.values() {
                let Some(last) = q.back() else { continue };
                // The sample a window before the newest (else the oldest).
                let first = q
                    .iter()
                    .rev()
                    .find(|s| last.at.duration_since(s.at) >= window)
                    .or(q.front())
                    .expect("not empty");
                let span = last.at.duration_since(first.at).as_secs_f64();
                if span <= 0.0 {
                    continue;
                }
                spans.push(span);
                for c in &last.edges {
                    let before = first
                        .edges
                        .iter()
                        .find(|b| b.caller == c.caller && b.destination == c.destination);
                    let d = delta(c, before);
                    if d.requests == 0 {
                        continue;
                    }
                    let e = edges
                        .entry((c.caller.clone(), c.destination.clone()))
                        .or_default();
                    e.requests += d.requests;
                    e.errors += d.errors;
                    e.rps += d.requests as f64 / span;
                    e.errors_ps += d.errors as f64 / span;
                    *e.tiers.entry(last.tier).or_default() += d.requests as f64 / span;
                    add_buckets(&mut e.buckets, &d.buckets);
                }
            }
        }
        let declared_pairs: std::collections::BTreeSet<(&str, &str)> = declared
            .iter()
            .flat_map(|(s, ds)| ds.iter().map(move |d| (s.as_str(), d.as_str())))
            .collect();
        let out: Vec<Value> = edges
            .iter()
            .map(|((caller, dest), e)| {
                let is_declared = declared_pairs.contains(&(caller.as_str(), dest.as_str()));
                json!({
                    "caller": caller,
                    "destination": dest,
                    "requests": e.requests,
                    "rps": round(e.rps),
                    "error_rate": if e.rps > 0.0 { round(e.errors_ps / e.rps) } else { 0.0 },
                    "p50_ms": quantile(&e.buckets, 0.5).map(|s| round(s * 1000.0)),
                    "p99_ms": quantile(&e.buckets, 0.99).map(|s| round(s * 1000.0)),
                    "tiers": e.tiers.iter().map(|(t, r)| (t.to_string(), json!(round(*r)))).collect::<serde_json::Map<_, _>>(),
                    "declared": is_declared,
                    // A call by a known service that it did not declare.
                    "undeclared": !is_declared && declared.contains_key(caller),
                })
            })
            .collect();
        let unused: Vec<Value> = declared_pairs
            .iter()
            .filter(|(c, d)| !edges.contains_key(&(c.to_string(), d.to_string())))
            .map(|(c, d)| json!({"caller": c, "destination": d}))
            .collect();
        let mut services: std::collections::BTreeSet<&str> =
            declared.keys().map(String::as_str).collect();
        for (c, d) in edges.keys() {
            services.insert(c);
            services.insert(d);
        }
        json!({
            "window_s": window.as_secs(),
            "nodes_polled": polled,
            "observed_s": spans.iter().copied().fold(0.0, f64::max).round() as u64,
            "services": services,
            "edges": out,
            "unused": unused,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `/calls` as counts of `tier` (a sidecar's direct calls are its
/// `service`'s).
fn parse(body: &[u8], tier: &str, service: Option<&str>) -> Vec<Counts> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let one = |e: &Value, caller: &str| Counts {
        caller: caller.to_string(),
        destination: e["destination"].as_str().unwrap_or_default().to_string(),
        requests: e["requests"].as_u64().unwrap_or(0),
        errors: e["errors"].as_u64().unwrap_or(0),
        buckets: e["buckets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                let le = b.get(0)?.as_f64().unwrap_or(f64::INFINITY);
                Some((le, b.get(1)?.as_u64()?))
            })
            .collect(),
    };
    if tier == "direct" {
        let Some(service) = service else {
            return Vec::new();
        };
        return v["direct"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| one(e, service))
            .collect();
    }
    v["calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| one(e, e["caller"].as_str().unwrap_or_default()))
        .collect()
}

/// `now` less `before` (a counter reset: `now` itself).
fn delta(now: &Counts, before: Option<&Counts>) -> Counts {
    let Some(b) = before.filter(|b| b.requests <= now.requests) else {
        return now.clone();
    };
    Counts {
        requests: now.requests - b.requests,
        errors: now.errors.saturating_sub(b.errors),
        buckets: now
            .buckets
            .iter()
            .map(|&(le, n)| {
                let was = b.buckets.iter().find(|x| x.0 == le).map_or(0, |x| x.1);
                (le, n.saturating_sub(was))
            })
            .collect(),
        ..now.clone()
    }
}

fn add_buckets(into: &mut Vec<(f64, u64)>, add: &[(f64, u64)]) {
    if into.is_empty() {
        into.extend_from_slice(add);
        return;
    }
    for &(le, n) in add {
        if let Some(b) = into.iter_mut().find(|b| b.0 == le) {
            b.1 += n;
        }
    }
}

/// The `q` quantile of cumulative buckets, interpolated linearly within
/// the bucket it falls in (the highest finite bound when it falls in
/// `+Inf`).
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev = (0.0, 0u64);
    for &(le, n) in buckets {
        if n as f64 >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let inside = (n - prev.1) as f64;
            let frac = if inside > 0.0 {
                (rank - prev.1 as f64) / inside
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, n);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 100 requests: 50 under 1 ms, 40 in (1, 5] ms, 10 in (5, 10] ms.
        let b = [(0.001, 50), (0.005, 90), (0.01, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&b, 0.5), Some(0.001));
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.0095).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&[(0.001, 0), (f64::INFINITY, 0)], 0.5), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(
            quantile(&[(0.001, 0), (f64::INFINITY, 4)], 0.5),
            Some(0.001)
        );
    }

    #[test]
    fn a_window_is_the_difference_of_two_samples_summed_over_nodes() {
        let t = Topology::default();
        let edge = |n: u64, e: u64| Counts {
            caller: "shop".into(),
            destination: "orders".into(),
            requests: n,
            errors: e,
            buckets: vec![(0.001, n), (f64::INFINITY, n)],
        };
        let start = Instant::now();
        {
            let mut s = t.samples.lock().unwrap();
            for (node, tier, scale) in [("gw-a", "group", 1), ("gw-c", "central", 3)] {
                let q = s.entry(node.to_string()).or_default();
                for (secs, n, e) in [(0, 100, 0), (10, 200, 10), (20, 300, 10)] {
                    q.push_back(Sample {
                        at: start + Duration::from_secs(secs),
                        tier,
                        edges: vec![edge(n * scale, e * scale)],
                    });
                }
            }
        }
        let declared = BTreeMap::from([(
            "shop".to_string(),
            vec!["orders".to_string(), "ledger".to_string()],
        )]);
        let v = t.view(Duration::from_secs(10), &declared);
        let e = &v["edges"][0];
        // Last 10 s: 100 requests on gw-a, 300 on gw-c; no new error.
        assert_eq!(e["requests"], 400);
        assert_eq!(e["rps"], 40.0);
        assert_eq!(e["error_rate"], 0.0);
        assert_eq!(e["tiers"]["group"], 10.0);
        assert_eq!(e["tiers"]["central"], 30.0);
        assert_eq!(e["declared"], true);
        assert_eq!(
            v["unused"],
            json!([{"caller": "shop", "destination": "ledger"}])
        );
        // Over 20 s: the errors show.
        let v = t.view(Duration::from_secs(20), &declared);
        let e = &v["edges"][0];
        assert_eq!(e["requests"], 800);
        assert_eq!(e["error_rate"], 0.05);
        assert_eq!(e["p50_ms"], 0.5);
    }
}
