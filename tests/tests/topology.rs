//! End-to-end: the admin's live service graph (`/api/v1/topology`,
//! `meshctl top`, `meshctl stat`) from real gateways and a sidecar: rates,
//! error rates, latency, the tier that carried each edge, and declared
//! destinations set against the calls observed.

use std::time::Duration;

use meshgate_tests::*;
use serde_json::{json, Value};

async fn topology(admin: &Admin) -> Value {
    let r = admin.get("topology?window_s=600").await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn edge<'a>(v: &'a Value, caller: &str, dest: &str) -> Option<&'a Value> {
    v["edges"]
        .as_array()?
        .iter()
        .find(|e| e["caller"] == caller && e["destination"] == dest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_shows_each_edge_its_tier_and_what_was_not_declared() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let ep = etcd.endpoint();
    let (_admin_proc, base, token) = start_admin_with(d, &ep, json!({"topology_interval_ms": 200}));
    let admin = Admin { base, token };
    admin.wait_up().await;
    let (orders, payments, inventory) = (
        Backend::start("orders").await,
        Backend::start("payments").await,
        Backend::start("inventory").await,
    );
    assert_eq!(admin.put("groups/shop", &json!({})).await.status, 201);
    for (name, b) in [
        ("orders", &orders),
        ("payments", &payments),
        ("inventory", &inventory),
    ] {
        let svc = json!({"group": "shop", "endpoints": [{"address": b.addr.to_string()}]});
        assert_eq!(
            admin.put(&format!("services/{name}"), &svc).await.status,
            201
        );
    }
    assert_eq!(
        admin
            .put("services/ledger", &json!({"group": "shop"}))
            .await
            .status,
        201
    );
    // frontend declares orders (through the gateways), inventory (direct)
    // and ledger (never called); it will also call payments, undeclared.
    let frontend = json!({"group": "shop", "destinations": [
        {"service": "orders"}, {"service": "inventory", "mode": "direct"}, {"service": "ledger"}]});
    assert_eq!(admin.put("services/frontend", &frontend).await.status, 201);

    let (_gw_a, a) = start_gateway(d, "gw-a", &["egress"], &["shop"], &ep);
    let (_gw_c, c) = start_gateway(d, "gw-c", &["central"], &[], &ep);
    let (_sc, sp) = start_sidecar(d, "sc", "frontend", "shop", &[addr(c.mesh)], &ep);
    for p in [a.ops, c.ops, sp.ops] {
        wait_ready(p).await;
    }
    let cfg_url = format!("http://127.0.0.1:{}/config", sp.ops);
    wait_until("the sidecar's policy", Duration::from_secs(20), || {
        let url = cfg_url.clone();
        async move {
            let cfg = get_json(&url).await.unwrap_or_default();
            cfg["tiers"]["group"].as_array().map(Vec::len) == Some(1)
                && cfg["destinations"]["inventory"] == "direct"
        }
    })
    .await;
    // Both gateways and the sidecar (it has a direct destination) are
    // polled before any traffic.
    wait_until(
        "the admin polls the nodes",
        Duration::from_secs(20),
        || async { topology(&admin).await["nodes_polled"] == 3 },
    )
    .await;

    let app = |dest: &'static str| {
        let url = format!("http://127.0.0.1:{}/x", sp.app);
        async move {
            let r = http_get(&url, &[("host", dest)]).await.unwrap();
            r.status
        }
    };
    for _ in 0..20 {
        assert_eq!(app("orders").await, 200);
    }
    orders.set_fail(503);
    for _ in 0..5 {
        assert_eq!(app("orders").await, 503);
    }
    for _ in 0..10 {
        assert_eq!(app("payments").await, 200);
        assert_eq!(app("inventory").await, 200);
    }

    wait_until(
        "every call is in the graph",
        Duration::from_secs(20),
        || async {
            let v = topology(&admin).await;
            let n = |c, d| edge(&v, c, d).map_or(0, |e| e["requests"].as_u64().unwrap_or(0));
            n("frontend", "orders") == 25
                && n("frontend", "payments") == 10
                && n("frontend", "inventory") == 10
        },
    )
    .await;
    let v = topology(&admin).await;
    let o = edge(&v, "frontend", "orders").unwrap();
    assert_eq!(o["error_rate"], 0.2, "{o}");
    assert!(o["rps"].as_f64().unwrap() > 0.0);
    assert!(
        o["p50_ms"].as_f64().unwrap() > 0.0
            && o["p99_ms"].as_f64().unwrap() >= o["p50_ms"].as_f64().unwrap()
    );
    assert_eq!(
        o["tiers"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["group"]
    );
    assert_eq!(
        (&o["declared"], &o["undeclared"]),
        (&json!(true), &json!(false))
    );
    let p = edge(&v, "frontend", "payments").unwrap();
    assert_eq!(
        p["tiers"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["central"],
        "{p}"
    );
    assert_eq!(p["undeclared"], true);
    let i = edge(&v, "frontend", "inventory").unwrap();
    assert_eq!(
        i["tiers"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["direct"],
        "{i}"
    );
    assert_eq!(i["error_rate"], 0.0);
    assert_eq!(
        v["unused"],
        json!([{"caller": "frontend", "destination": "ledger"}])
    );

    // meshctl prints it.
    let (ok, out) = meshctl(
        &admin.base,
        &admin.token,
        None,
        &["top", "-n", "1", "--window", "600"],
    );
    assert!(ok, "{out}");
    let row = out
        .lines()
        .find(|l| l.contains("payments"))
        .unwrap_or_default();
    assert!(
        row.contains("frontend") && row.contains("central:") && row.contains("undeclared"),
        "{out}"
    );
    assert!(
        out.contains("declared, not called in the window: frontend -> ledger"),
        "{out}"
    );
    let (ok, out) = meshctl(
        &admin.base,
        &admin.token,
        None,
        &["stat", "--window", "600"],
    );
    assert!(ok, "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("orders"))
        .unwrap_or_default();
    assert!(row.contains("20.0%"), "{out}");

    // A bad window is refused with its field.
    let r = admin.get("topology?window_s=0").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["field"], "window_s");
}
