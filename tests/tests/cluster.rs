//! End-to-end: the cluster path through a sidecar and gateways on a real
//! etcd, config changes through the admin API, and killing a gateway under
//! load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_the_sidecar_reach_both_backends_and_follow_route_changes() {
    let m = Mesh::start().await;

    // Both backends serve, through a group gateway.
    let seen = served_by(&m.app_url("/x"), &[("host", "orders")], 20).await;
    assert!(
        seen.get("b1").copied().unwrap_or(0) > 0 && seen.get("b2").copied().unwrap_or(0) > 0,
        "{seen:?}"
    );
    let r = http_get(&m.app_url("/x"), &[("host", "orders.mesh")])
        .await
        .unwrap();
    assert_eq!(r.header("x-mesh-tier"), Some("group"));
    assert_eq!(
        r.header("x-seen-source"),
        Some("frontend"),
        "x-mesh-source set by the sidecar"
    );
    let r = http_get(&m.app_url("/x"), &[("x-mesh-service", "orders")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // Every process is listed with its roles.
    let nodes = m.admin.get("nodes").await.json();
    let ids: Vec<&str> = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    for id in ["gw-a", "gw-b", "gw-c", "sc-1"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }

    // Change the route to a new service; the change reaches the data plane.
    let b3 = Backend::start("b3").await;
    let r = m
        .admin
        .put(
            "services/orders-v2",
            &json!({"group": "shop", "endpoints": [{"address": b3.addr.to_string()}]}),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = m
        .admin
        .put(
            "routes/orders",
            &json!({"match": {"hosts": ["orders"]}, "backends": [{"service": "orders-v2"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let version = r.json()["version"].as_i64().unwrap();
    let url = m.app_url("/x");
    wait_until("route change applied", Duration::from_secs(10), || {
        let url = url.clone();
        async move { matches!(http_get(&url, &[("host", "orders")]).await, Ok(r) if r.header("x-served-by") == Some("b3")) }
    })
    .await;
    // Each gateway reports the revision it applied.
    let admin = m.admin.clone();
    wait_until(
        "all gateways report the new revision",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let nodes = admin.get("nodes").await.json();
                nodes["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| n["kind"] == "gateway")
                    .all(|n| n["applied_revision"].as_i64().unwrap_or(0) >= version)
            }
        },
    )
    .await;
    let seen = served_by(&m.app_url("/x"), &[("host", "orders")], 10).await;
    assert_eq!(seen.get("b3"), Some(&10), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_egress_gateway_under_load_fails_no_request() {
    let mut m = Mesh::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) =
            (stop.clone(), ok.clone(), failed.clone(), m.app_url("/load"));
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http_get(&url, &[("host", "orders")]).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    let ok2 = ok.clone();
    wait_until("traffic flowing", Duration::from_secs(10), || {
        let ok = ok2.clone();
        async move { ok.load(Ordering::Relaxed) >= 200 }
    })
    .await;
    m.gws[0].0.kill();
    let at_kill = ok.load(Ordering::Relaxed);
    let ok3 = ok.clone();
    wait_until(
        "traffic continues after the kill",
        Duration::from_secs(20),
        || {
            let ok = ok3.clone();
            async move { ok.load(Ordering::Relaxed) >= at_kill + 1000 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failures = failed.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}\n--- sidecar log ---\n{}",
        failures.len(),
        failures.first(),
        m.sidecar.0.log_tail(80)
    );
    // The dead member's lease expires and the sidecar drops it.
    m.wait_group_members(1).await;
    let r = http_get(&m.app_url("/x"), &[("host", "orders")])
        .await
        .unwrap();
    assert_eq!(r.header("x-mesh-tier"), Some("group"));
}
