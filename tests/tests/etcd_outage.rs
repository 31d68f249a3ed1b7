//! End-to-end: etcd goes away. Gateways and the sidecar keep serving; a
//! gateway restarted during the outage serves from its snapshot file; when
//! etcd returns, a new change applies without restarting anything.

use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_survives_an_etcd_outage_and_a_restart_during_it() {
    let mut m = Mesh::start().await;
    let seen = served_by(&m.app_url("/x"), &[("host", "orders")], 10).await;
    assert_eq!(seen.values().sum::<usize>(), 10);
    // Let every gateway write its snapshot file (debounced after changes).
    let dir = m.dir.path().to_path_buf();
    wait_until("snapshot files written", Duration::from_secs(10), || {
        let dir = dir.clone();
        async move {
            ["gw-a", "gw-b", "gw-c"]
                .iter()
                .all(|id| dir.join(format!("{id}.snapshot.json")).exists())
        }
    })
    .await;
    let pids: Vec<i32> = m.gws.iter().map(|g| g.0.pid()).collect();

    m.etcd.stop();
    // Everything keeps serving.
    let seen = served_by(&m.app_url("/x"), &[("host", "orders")], 20).await;
    assert_eq!(seen.values().sum::<usize>(), 20);
    let ops = m.sidecar.1.ops;
    wait_until(
        "sidecar reports the store down, policy stale",
        Duration::from_secs(15),
        || async move {
            get_json(&format!("http://127.0.0.1:{ops}/readyz"))
                .await
                .is_some_and(|v| v["store_connected"] == false && v["policy"] == "stale")
        },
    )
    .await;

    // Restart gw-a while etcd is down: it comes back from its snapshot file.
    let gw_a_ports = m.gws[0].1;
    m.gws[0].0.term(Duration::from_secs(10));
    m.gws[0].0.start();
    wait_ready(gw_a_ports.ops).await;
    let ready = get_json(&format!("http://127.0.0.1:{}/readyz", gw_a_ports.ops))
        .await
        .unwrap();
    assert_eq!(ready["source"], "snapshot_file", "{ready}");
    let direct = format!("http://127.0.0.1:{}/direct", gw_a_ports.mesh);
    let r = http_get(&direct, &[("x-mesh-service", "orders")])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(["b1", "b2"].contains(&r.header("x-served-by").unwrap()));

    // etcd returns; a change applies everywhere without restarts.
    m.etcd.restart().await;
    let b3 = Backend::start("b3").await;
    let admin = m.admin.clone();
    let b3addr = b3.addr.to_string();
    wait_until("admin API writes again", Duration::from_secs(20), || {
        let (admin, b3addr) = (admin.clone(), b3addr.clone());
        async move {
            admin
                .put(
                    "services/orders",
                    &json!({"group": "shop", "endpoints": [{"address": b3addr}]}),
                )
                .await
                .status
                == 200
        }
    })
    .await;
    for (_, p) in &m.gws {
        let url = format!("http://127.0.0.1:{}/x", p.mesh);
        wait_until(&format!("gateway on {} serves the change", p.mesh), Duration::from_secs(20), || {
            let url = url.clone();
            async move { matches!(http_get(&url, &[("x-mesh-service", "orders")]).await, Ok(r) if r.header("x-served-by") == Some("b3")) }
        })
        .await;
    }
    let url = m.app_url("/x");
    wait_until("sidecar path serves the change", Duration::from_secs(20), || {
        let url = url.clone();
        async move { matches!(http_get(&url, &[("host", "orders")]).await, Ok(r) if r.header("x-served-by") == Some("b3")) }
    })
    .await;
    wait_until(
        "sidecar policy fresh again",
        Duration::from_secs(20),
        || async move {
            get_json(&format!("http://127.0.0.1:{ops}/readyz"))
                .await
                .is_some_and(|v| v["policy"] == "fresh")
        },
    )
    .await;
    let ready = get_json(&format!("http://127.0.0.1:{}/readyz", gw_a_ports.ops))
        .await
        .unwrap();
    assert_eq!(ready["source"], "store");
    // Only gw-a was restarted (on purpose); the others kept their process.
    assert_eq!(m.gws[1].0.pid(), pids[1]);
    assert_eq!(m.gws[2].0.pid(), pids[2]);
    for g in &mut m.gws {
        assert!(g.0.running(), "{} died", g.0.name);
    }
}
