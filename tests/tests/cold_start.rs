//! End-to-end cold starts of a sidecar while etcd is down: with no
//! snapshot it sends everything to its bootstrap central tier, and requests
//! succeed; with a snapshot it serves from it (group tier); a corrupt
//! snapshot is ignored and reported, and the central tier serves. Also:
//! the sidecar's policy holds only its own slice of the config.

use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

async fn readyz(ops: u16) -> serde_json::Value {
    get_json(&format!("http://127.0.0.1:{ops}/readyz"))
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_start_cold_with_etcd_down() {
    let mut m = Mesh::start().await;
    let ep = m.etcd.endpoint();
    let central = vec![addr(m.gws[2].1.mesh)];
    let d = m.dir.path().to_path_buf();

    // Policy scoping: another group's objects exist, but sc-1's policy and
    // the keys it watched hold only its own service, its group and the
    // gateways.
    assert_eq!(m.admin.put("groups/other", &json!({})).await.status, 201);
    let r = m
        .admin
        .put(
            "services/unrelated",
            &json!({"group": "other", "endpoints": [{"address": "127.0.0.1:9"}]}),
        )
        .await;
    assert_eq!(r.status, 201);
    // Every gateway's registration reaches the sidecar in its own time.
    wait_until(
        "sidecar knows the 3 gateways",
        Duration::from_secs(15),
        || async { m.sidecar_config().await["gateways_known"] == 3 },
    )
    .await;
    let cfg = m.sidecar_config().await;
    assert_eq!(cfg["group"], "shop", "{cfg}");
    assert!(!cfg.to_string().contains("unrelated"), "{cfg}");
    assert!(!cfg.to_string().contains("\"other\""), "{cfg}");

    // A second sidecar gets its snapshot written while etcd is up.
    let (mut sc2, p2) = start_sidecar(&d, "sc-2", "frontend", "shop", &central, &ep);
    wait_ready(p2.ops).await;
    let snap = d.join("sc-2.snapshot.json");
    wait_until("sc-2 snapshot written", Duration::from_secs(10), || {
        let snap = snap.clone();
        async move { snap.exists() }
    })
    .await;
    sc2.term(Duration::from_secs(10));

    m.etcd.stop();

    // 1. No snapshot, etcd down: everything goes to the central tier.
    let (_sc3, p3) = start_sidecar(&d, "sc-3", "frontend", "shop", &central, &ep);
    wait_ready(p3.ops).await;
    let r = readyz(p3.ops).await;
    assert_eq!(r["policy"], "unavailable", "{r}");
    assert_eq!(
        metric(p3.ops, "meshgate_policy_state{state=\"unavailable\"}").await,
        1.0
    );
    assert_eq!(
        metric(p3.ops, "meshgate_policy_state{state=\"fresh\"}").await,
        0.0
    );
    let url3 = format!("http://127.0.0.1:{}/x", p3.app);
    for _ in 0..10 {
        let r = http_get(&url3, &[("host", "orders")]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("central"));
    }

    // 2. With its snapshot, etcd down: it serves from the snapshot, through
    //    its group's gateways.
    sc2.start();
    wait_ready(p2.ops).await;
    let r = readyz(p2.ops).await;
    assert_eq!(r["source"], "snapshot_file", "{r}");
    assert_eq!(r["policy"], "stale", "{r}");
    assert_eq!(
        metric(p2.ops, "meshgate_policy_state{state=\"stale\"}").await,
        1.0
    );
    // Since when: the snapshot's time, not now.
    let synced = metric(p2.ops, "meshgate_policy_last_sync_timestamp_seconds").await;
    assert_eq!(
        synced as u64,
        r["stale_since_ms"].as_u64().unwrap() / 1000,
        "{r}"
    );
    let url2 = format!("http://127.0.0.1:{}/x", p2.app);
    for _ in 0..10 {
        let r = http_get(&url2, &[("host", "orders")]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("group"));
    }

    // 3. A corrupt snapshot is ignored, with a log line saying so; the
    //    central tier serves.
    sc2.term(Duration::from_secs(10));
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&snap, bytes).unwrap();
    sc2.start();
    wait_ready(p2.ops).await;
    let r = readyz(p2.ops).await;
    assert_eq!(r["source"], "none", "{r}");
    assert_eq!(r["policy"], "unavailable", "{r}");
    assert!(
        sc2.log_text().contains("ignoring the snapshot file"),
        "no log line about the corrupt snapshot"
    );
    for _ in 0..10 {
        let r = http_get(&url2, &[("host", "orders")]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("central"));
    }
}

/// A gateway upgraded while etcd is down starts from the snapshot file
/// its previous release wrote (the fixture was written by 0.1.0's
/// gateway, see config/fixtures/README.md): ready, from the snapshot file,
/// with every object of it applied and routing by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starts_from_the_previous_releases_snapshot_with_etcd_down() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/fixtures/snapshot-0.1.0-gateway.json");
    std::fs::copy(&fixture, dir.path().join("gw-fixture.snapshot.json")).unwrap();
    // Nothing listens on this etcd port.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (_gw, ports) = start_gateway(
        dir.path(),
        "gw-fixture",
        &["egress", "ingress"],
        &["shop"],
        &nowhere,
    );
    wait_ready(ports.ops).await;
    let ready = readyz(ports.ops).await;
    assert_eq!(
        (
            ready["source"].clone(),
            ready["store_connected"].clone(),
            ready["revision"].clone()
        ),
        (json!("snapshot_file"), json!(false), json!(5)),
        "{ready}"
    );
    let config = get_json(&format!("http://127.0.0.1:{}/config", ports.ops))
        .await
        .unwrap();
    for (kind, name) in [
        ("services", "orders"),
        ("routes", "orders"),
        ("groups", "shop"),
    ] {
        assert!(
            config["objects"][kind][name].is_object(),
            "{kind}/{name} missing: {config}"
        );
    }
    assert_eq!(config["rejected"], json!([]), "{config}");
    // It routes by it: the route's host reaches the service (whose
    // endpoint is down: the gateway's own 502, not a 404).
    let r = http_get(
        &format!("http://127.0.0.1:{}/x", ports.ingress),
        &[("host", "orders.example")],
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-error")),
        (502, Some("upstream_connect_failed")),
        "{r:?}"
    );
}
