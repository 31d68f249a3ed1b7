//! The sidecar's local policy: scoped to what its service calls, and the
//! direct mode, where the sidecar balances to a destination's endpoints
//! itself and fails over to the group's gateways.

use std::collections::BTreeSet;
use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

/// The requests the gateways' mesh listeners answered for `orders`.
async fn gateway_orders_requests(m: &Mesh) -> f64 {
    let mut n = 0.0;
    for (_, p) in &m.gws {
        for class in ["2xx", "4xx", "5xx"] {
            let sample = format!(
                "meshgate_requests_total{{class=\"{class}\",listener=\"mesh\",route=\"orders\",service=\"orders\"}}"
            );
            n += metric(p.ops, &sample).await;
        }
    }
    n
}

fn strings(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_bypasses_the_gateways_and_fails_over_to_them() {
    let m = Mesh::start().await;
    let b3 = Backend::start("b3").await;
    let ops = m.sidecar.1.ops;
    let url = m.app_url("/x");
    let host = [("host", "orders")];

    // orders falls back to orders-backup (on the gateways); the sidecar
    // calls orders directly.
    let backup = json!({"group": "shop", "endpoints": [{"address": b3.addr.to_string()}]});
    assert_eq!(
        m.admin.put("services/orders-backup", &backup).await.status,
        201
    );
    let orders = json!({
        "group": "shop",
        "endpoints": [{"address": m.b1.addr.to_string()}, {"address": m.b2.addr.to_string()}],
        "fallback": "orders-backup",
        "health_check": {"tcp": true, "interval_ms": 200, "timeout_ms": 100, "unhealthy_threshold": 1},
    });
    assert_eq!(m.admin.put("services/orders", &orders).await.status, 200);
    let frontend =
        json!({"group": "shop", "destinations": [{"service": "orders", "mode": "direct"}]});
    assert_eq!(
        m.admin.put("services/frontend", &frontend).await.status,
        200
    );
    wait_until(
        "the sidecar compiles orders for direct mode",
        Duration::from_secs(15),
        || async { strings(&m.sidecar_config().await["direct"]).contains("services/orders") },
    )
    .await;

    // 1. Requests bypass the gateways.
    let before = gateway_orders_requests(&m).await;
    for _ in 0..20 {
        let r = http_get(&url, &host).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("direct"), "{r:?}");
        assert_eq!(r.header("x-seen-source"), Some("frontend"), "{r:?}");
    }
    assert_eq!(m.b1.hits() + m.b2.hits(), 20);
    assert_eq!(
        gateway_orders_requests(&m).await,
        before,
        "a gateway saw the requests"
    );
    let direct_ok =
        "meshgate_sidecar_requests_total{class=\"2xx\",destination=\"orders\",tier=\"direct\"}";
    assert_eq!(metric(ops, direct_ok).await, 20.0);

    // 2. A dead endpoint is ejected: the rest goes to b2, and at most one
    //    request ever tried b1 (a refused connect, then moved on).
    m.b1.stop().await;
    let b2_before = m.b2.hits();
    for _ in 0..40 {
        let r = http_get(&url, &host).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("direct"), "{r:?}");
        assert_eq!(r.header("x-served-by"), Some("b2"), "{r:?}");
    }
    assert_eq!(m.b2.hits() - b2_before, 40);
    let refused = metric(
        ops,
        "meshgate_upstream_connect_failures_total{service=\"orders\"}",
    )
    .await;
    assert!(refused <= 1.0, "{refused} connects to the dead endpoint");
    wait_until("b1 marked unhealthy", Duration::from_secs(10), || async {
        metric(
            ops,
            &format!(
                "meshgate_health_checks_total{{endpoint=\"{}\",result=\"fail\"}}",
                m.b1.addr
            ),
        )
        .await
            >= 1.0
    })
    .await;

    // 3. The whole destination down: GETs and POSTs fail over to the group
    //    gateways, whose fallback routing serves them from orders-backup.
    m.b2.stop().await;
    for i in 0..10 {
        let r = http_get(&url, &host).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
        assert_eq!(r.header("x-served-by"), Some("b3"), "{r:?}");
        let body = format!("{{\"order\":{i}}}");
        let r = http("POST", &url, &host, &body).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
    }
    assert_eq!(b3.posts.lock().unwrap().len(), 10, "each POST once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_policy_holds_only_what_the_service_calls() {
    let m = Mesh::start().await;
    let b3 = Backend::start("b3").await;

    // Objects the sidecar must not hold: another group, its service, a
    // service whose name extends a destination's, a route, and another
    // sidecar's node record.
    assert_eq!(m.admin.put("groups/other", &json!({})).await.status, 201);
    let ep = json!({"group": "other", "endpoints": [{"address": "127.0.0.1:9"}]});
    assert_eq!(m.admin.put("services/unrelated", &ep).await.status, 201);
    assert_eq!(m.admin.put("services/orders-v2", &ep).await.status, 201);
    // Applied by every gateway before the calls below (the central tier
    // must know payments when the uncovered call reaches it).
    let payments = json!({"group": "shop", "endpoints": [{"address": b3.addr.to_string()}]});
    assert_eq!(
        m.admin
            .put("services/payments?wait=10s", &payments)
            .await
            .status,
        201
    );
    let d = m.dir.path();
    let central = vec![addr(m.gws[2].1.mesh)];
    let (_other, other_ports) = start_sidecar(
        d,
        "sc-other",
        "unrelated",
        "other",
        &central,
        &m.etcd.endpoint(),
    );
    wait_ready(other_ports.ops).await;

    let expect = |extra: &[&str]| -> BTreeSet<String> {
        [
            "nodes/gateway/gw-a",
            "nodes/gateway/gw-b",
            "nodes/gateway/gw-c",
            "groups/shop",
            "services/frontend",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    wait_until(
        "the sidecar knows the 3 gateways",
        Duration::from_secs(15),
        || async { m.sidecar_config().await["gateways_known"] == 3 },
    )
    .await;
    let cfg = m.sidecar_config().await;
    assert_eq!(strings(&cfg["objects"]), expect(&[]), "{cfg}");
    assert_eq!(
        strings(&cfg["watched"]),
        ["groups/shop", "nodes/gateway/", "services/frontend"]
            .map(String::from)
            .into(),
        "{cfg}"
    );
    assert_eq!(cfg["destinations"], json!({"orders": "gateway"}), "{cfg}");

    // A covered destination goes through the group; one not covered goes
    // to the central tier.
    let r = http_get(&m.app_url("/x"), &[("host", "orders")])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-tier")),
        (200, Some("group")),
        "{r:?}"
    );
    let r = http_get(&m.app_url("/x"), &[("host", "payments")])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-tier")),
        (200, Some("central")),
        "{r:?}"
    );

    // Calling payments directly widens the watch to payments and its
    // instances, and nothing else.
    let frontend = json!({"group": "shop", "destinations": [
        {"service": "orders"}, {"service": "payments", "mode": "direct"}]});
    assert_eq!(
        m.admin.put("services/frontend", &frontend).await.status,
        200
    );
    wait_until(
        "the sidecar holds payments",
        Duration::from_secs(15),
        || async { strings(&m.sidecar_config().await["objects"]).contains("services/payments") },
    )
    .await;
    let cfg = m.sidecar_config().await;
    assert_eq!(
        strings(&cfg["objects"]),
        expect(&["services/payments"]),
        "{cfg}"
    );
    assert!(
        strings(&cfg["watched"]).contains("instances/payments/"),
        "{cfg}"
    );
    let r = http_get(&m.app_url("/x"), &[("host", "payments")])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-tier")),
        (200, Some("direct")),
        "{r:?}"
    );
    // An instance of payments joins the direct tier's endpoints.
    let b4 = Backend::start("b4").await;
    let mut etcd = m.etcd.client().await;
    let inst = json!({"address": b4.addr.to_string(), "node": "host-4"});
    etcd.put(
        "/meshgate/v1/instances/payments/host-4",
        inst.to_string(),
        None,
    )
    .await
    .unwrap();
    wait_until(
        "the instance reaches the sidecar",
        Duration::from_secs(15),
        || async {
            strings(&m.sidecar_config().await["objects"]).contains("instances/payments/host-4")
        },
    )
    .await;
    let seen = served_by(&m.app_url("/x"), &[("host", "payments")], 10).await;
    assert_eq!(seen.get("b4"), Some(&5), "{seen:?}");

    // The snapshot file holds the same slice.
    let snap = std::fs::read_to_string(d.join("sc-1.snapshot.json")).unwrap();
    for absent in ["unrelated", "orders-v2", "\"other\"", "sc-other"] {
        assert!(!snap.contains(absent), "snapshot holds {absent}: {snap}");
    }

    // Dropping the destination narrows the watch again.
    let frontend = json!({"group": "shop", "destinations": [{"service": "orders"}]});
    assert_eq!(
        m.admin.put("services/frontend", &frontend).await.status,
        200
    );
    wait_until(
        "the sidecar drops payments",
        Duration::from_secs(15),
        || async { strings(&m.sidecar_config().await["objects"]) == expect(&[]) },
    )
    .await;
    let r = http_get(&m.app_url("/x"), &[("host", "payments")])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-tier")),
        (200, Some("central")),
        "{r:?}"
    );
}
