//! End-to-end on a real etcd: instances registered under
//! `instances/<service>/` (as sidecars register their apps, under a lease)
//! join the service's endpoints on the gateway live, and leave when their
//! lease ends; after that no request goes to them.

use std::time::Duration;

use etcd_client::PutOptions;
use meshgate_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_instances_join_and_leave_the_endpoint_set() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin_proc, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let (_gw, ports) = start_gateway(dir.path(), "gw-1", &["ingress"], &[], &etcd.endpoint());
    wait_ready(ports.ops).await;

    // A service with no static endpoint at all.
    assert_eq!(admin.put("services/orders", &json!({})).await.status, 201);
    let route = json!({"scope": "ingress", "backends": [{"service": "orders"}]});
    assert_eq!(admin.put("routes/orders", &route).await.status, 201);
    let url = format!("http://127.0.0.1:{}/x", ports.ingress);
    wait_until("route applied", Duration::from_secs(10), || async {
        http_get(&url, &[])
            .await
            .is_ok_and(|r| r.header("x-mesh-error") == Some("no_healthy_endpoint"))
    })
    .await;

    // Two apps register, each under its own lease (kept alive, as a
    // sidecar does while its app is healthy).
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut client = etcd.client().await;
    let register = |id: &'static str, addr: String| {
        let mut client = client.clone();
        async move {
            let lease = client.lease_grant(3, None).await.unwrap().id();
            let value = json!({"address": addr, "node": format!("sc-{id}")}).to_string();
            client
                .put(
                    format!("/meshgate/v1/instances/orders/{id}"),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .unwrap();
            let (mut keeper, _stream) = client.lease_keep_alive(lease).await.unwrap();
            let keeper = tokio::spawn(async move {
                loop {
                    if keeper.keep_alive().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
            keeper.abort_handle()
        }
    };
    let keep_a = register("i-a", a.addr.to_string()).await;
    let _keep_b = register("i-b", b.addr.to_string()).await;
    wait_until("both instances serve", Duration::from_secs(10), || async {
        let _ = http_get(&url, &[]).await;
        a.hits() > 0 && b.hits() > 0
    })
    .await;
    let by = served_by(&url, &[], 20).await;
    assert_eq!(by.get("a"), Some(&10), "{by:?}");
    assert_eq!(by.get("b"), Some(&10), "{by:?}");

    // a's host dies: its lease is no longer kept alive and expires.
    keep_a.abort();
    wait_until(
        "a's instance gone from the gateway",
        Duration::from_secs(15),
        || async {
            get_json(&format!("http://127.0.0.1:{}/config", ports.ops))
                .await
                .is_some_and(|c| c["objects"]["instances"].get("orders/i-a").is_none())
        },
    )
    .await;
    let before = a.hits();
    let by = served_by(&url, &[], 20).await;
    assert_eq!(by.get("b"), Some(&20), "{by:?}");
    assert_eq!(a.hits(), before, "a request went to the expired instance");
    client
        .delete("/meshgate/v1/instances/orders/i-b", None)
        .await
        .unwrap();
    wait_until("no endpoint left", Duration::from_secs(10), || async {
        http_get(&url, &[])
            .await
            .is_ok_and(|r| r.header("x-mesh-error") == Some("no_healthy_endpoint"))
    })
    .await;
}
