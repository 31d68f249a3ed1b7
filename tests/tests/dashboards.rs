//! End-to-end: every metric the Grafana dashboard and the Prometheus alert
//! rules in `deploy/` query exists on the live `/metrics` of a real mesh
//! (mutual TLS on every hop, traffic, a retry, a refusal, a mesh error, a
//! tier fail-over), and the metrics keep their promises: status codes,
//! bounded labels, standard process names, deleted routes' series gone.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use meshgate_tests::*;
use serde_json::{json, Value};

/// Every `expr` in a JSON or YAML document.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names an expression queries (`meshgate_*`, `process_*`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = rest.starts_with("meshgate_") || rest.starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

fn queried() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/meshgate.json")).unwrap(),
    )
    .unwrap();
    let alerts: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    exprs(&alerts, &mut all);
    assert!(all.len() > 20, "expressions found: {all:?}");
    all.iter().flat_map(|e| metric_names(e)).collect()
}

async fn scrape(url: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let r = http_get(url, &headers).await.unwrap();
    assert_eq!(r.status, 200, "{url}: {r:?}");
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_live() {
    let names = queried();
    let mut m = Mesh::start_with(true).await;
    let url = m.app_url("/items");
    let orders = [("host", "orders")];

    // A certificate served at the ingress, a retry policy on 503.
    let ca = TestCa::new("Edge CA");
    let leaf = ca.leaf(&["www.test"]);
    let r = m
        .admin
        .put(
            "certs/www",
            &json!({"certificate": leaf.cert, "private_key": leaf.key}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let svc =
        json!({"group": "shop", "mtls": "strict", "retry": {"attempts": 1, "statuses": [503]}});
    assert_eq!(
        m.admin.put("services/orders?wait=10s", &svc).await.status,
        200
    );

    for _ in 0..10 {
        let r = http_get(&url, &orders).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    // A mesh error: no such service (the central gateway answers 404).
    let r = http_get(&url, &[("host", "nosuch")]).await.unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    // Retries: both instances answer 503.
    m.b1.set_fail(503);
    m.b2.set_fail(503);
    let r = http_get(&url, &orders).await.unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    m.b1.set_fail(0);
    m.b2.set_fail(0);
    // A refusal by authorization.
    let closed = json!({"group": "shop", "mtls": "strict",
        "allowed_callers": ["group/shop/service/someone-else"]});
    assert_eq!(
        m.admin
            .put("services/orders?wait=10s", &closed)
            .await
            .status,
        200
    );
    let r = http_get(&url, &orders).await.unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    let open = json!({"group": "shop", "mtls": "strict"});
    assert_eq!(
        m.admin.put("services/orders?wait=10s", &open).await.status,
        200
    );

    // Bounded labels: a destination the sidecar's policy does not know is
    // counted as `other`, and a status code is its own label.
    let sc = scrape(
        &format!("http://127.0.0.1:{}/metrics", m.sidecar.1.ops),
        None,
    )
    .await;
    assert!(
        metric_in(
            &sc,
            "meshgate_sidecar_requests_total{code=\"404\",destination=\"other\"}"
        ) >= 1.0,
        "{sc}"
    );
    assert!(
        metric_in(
            &sc,
            "meshgate_sidecar_requests_total{code=\"200\",destination=\"orders\",tier=\"group\"}"
        ) >= 10.0
    );
    assert_eq!(
        metric_in(
            &sc,
            "meshgate_sidecar_requests_total{destination=\"nosuch\"}"
        ),
        0.0
    );
    // The method, per listener.
    let by_method =
        "meshgate_requests_by_method_total{class=\"2xx\",listener=\"app\",method=\"GET\"}";
    assert!(metric_in(&sc, by_method) >= 10.0, "{sc}");
    // Callers: the gateways saw frontend call orders.
    let mut gw_text = String::new();
    for (_, p) in &m.gws {
        gw_text += &scrape(&format!("http://127.0.0.1:{}/metrics", p.ops), None).await;
    }
    assert!(
        metric_in(
            &gw_text,
            "meshgate_mesh_calls_total{caller=\"frontend\",destination=\"orders\",class=\"2xx\"}"
        ) >= 10.0,
        "{gw_text}"
    );
    assert!(
        metric_in(
            &gw_text,
            "meshgate_requests_total{code=\"403\",route=\"orders\"}"
        ) >= 1.0
    );
    assert!(
        metric_in(
            &gw_text,
            "meshgate_mesh_errors_total{error=\"forbidden\",listener=\"mesh\"}"
        ) >= 1.0
    );
    assert!(
        gw_text
            .lines()
            .any(|l| l.starts_with("process_resident_memory_bytes ")),
        "standard process metric names"
    );
    // A bucket under 100 µs exists (the histogram resolves the gateway's
    // own latency).
    assert!(gw_text.contains("le=\"0.00005\"}"), "{gw_text}");

    // A tier fail-over: the group gateways go; the central tier serves.
    for (p, _) in m.gws.iter_mut().take(2) {
        p.kill();
    }
    let r = http_get(&url, &orders).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-mesh-tier"), Some("central"));

    let mut text = scrape(
        &format!("http://127.0.0.1:{}/metrics", m.sidecar.1.ops),
        None,
    )
    .await;
    text += &scrape(
        &format!("http://127.0.0.1:{}/metrics", m.gws[2].1.ops),
        None,
    )
    .await;
    for (_, p) in &m.backend_sidecars {
        text += &scrape(&format!("http://127.0.0.1:{}/metrics", p.ops), None).await;
    }
    text += &gw_text;
    text += &scrape(
        &format!("{}/api/v1/metrics", m.admin.base),
        Some(&m.admin.token),
    )
    .await;
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or(""))
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exposed.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
    assert!(
        metric_in(
            &text,
            "meshgate_sidecar_tier_failovers_total{tier=\"group\"}"
        ) >= 1.0
    );

    // The admin's view: a lag per node, in sync.
    let admin = scrape(
        &format!("{}/api/v1/metrics", m.admin.base),
        Some(&m.admin.token),
    )
    .await;
    assert!(
        admin.contains("meshgate_node_lag_revisions{kind=\"sidecar\",node=\"sc-1\"}"),
        "{admin}"
    );
    let unauthorized = http_get(&format!("{}/api/v1/metrics", m.admin.base), &[])
        .await
        .unwrap();
    assert_eq!(unauthorized.status, 401, "the admin's metrics need a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_routes_series_go_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let model = orders_everywhere(b.addr);
    let (_gw, ports, _file) = start_standalone(dir.path(), &model).await;
    let url = format!("http://127.0.0.1:{}/x", ports.ingress);
    assert_eq!(http_get(&url, &[]).await.unwrap().status, 200);
    let series = "meshgate_requests_total{route=\"orders\"}";
    assert_eq!(metric(ports.ops, series).await, 1.0);
    let token_less = format!("http://127.0.0.1:{}/api/v1/routes/orders", ports.ops);
    let r = http("DELETE", &token_less, &[], "").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    wait_until(
        "the deleted route's series are gone",
        Duration::from_secs(10),
        || async {
            let text = scrape(&format!("http://127.0.0.1:{}/metrics", ports.ops), None).await;
            !text.contains("route=\"orders\"")
        },
    )
    .await;
}
