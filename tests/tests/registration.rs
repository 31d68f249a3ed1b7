//! End-to-end on a real etcd: a sidecar registers its app as an instance
//! of its service while the app passes its health check; gateways route to
//! it. An unhealthy app is deregistered and comes back when healthy. A
//! graceful stop deregisters and waits for the gateways before exiting. When
//! the host dies (sidecar SIGKILLed, app gone) the instance disappears with
//! its lease and no request goes to it afterwards.

use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_registers_its_app_while_it_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin_proc, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let (_gw, gw) = start_gateway(dir.path(), "gw-1", &["ingress"], &[], &etcd.endpoint());
    wait_ready(gw.ops).await;
    assert_eq!(admin.put("groups/shop", &json!({})).await.status, 201);
    assert_eq!(
        admin
            .put("services/orders", &json!({"group": "shop"}))
            .await
            .status,
        201
    );
    let route = json!({"scope": "ingress", "backends": [{"service": "orders"}]});
    assert_eq!(admin.put("routes/orders", &route).await.status, 201);

    let app = Backend::start("app").await;
    let extra = json!({
        "lease_ttl_s": 3,
        "app": {
            "address": app.addr.to_string(),
            "labels": {"version": "v1"},
            "health_check": {"http": {"path": "/healthz"}, "interval_ms": 200,
                             "timeout_ms": 200, "healthy_threshold": 1, "unhealthy_threshold": 1},
        },
    });
    let (mut sc, _) = start_sidecar_with(
        dir.path(),
        "sc-1",
        "orders",
        "shop",
        &[],
        &etcd.endpoint(),
        extra,
    );
    let url = format!("http://127.0.0.1:{}/x", gw.ingress);
    let serves = |who: &'static str| {
        let url = url.clone();
        move || {
            let url = url.clone();
            async move {
                http_get(&url, &[])
                    .await
                    .is_ok_and(|r| r.header("x-served-by") == Some(who))
            }
        }
    };
    let no_endpoint = || {
        let url = url.clone();
        async move {
            http_get(&url, &[])
                .await
                .is_ok_and(|r| r.header("x-mesh-error") == Some("no_healthy_endpoint"))
        }
    };
    wait_until(
        "the gateway routes to the registered app",
        Duration::from_secs(15),
        serves("app"),
    )
    .await;
    let mut client = etcd.client().await;
    let key = "/meshgate/v1/instances/orders/sc-1";
    let inst: serde_json::Value = {
        let r = client.get(key, None).await.unwrap();
        serde_json::from_slice(r.kvs()[0].value()).unwrap()
    };
    assert_eq!(inst["address"], app.addr.to_string());
    assert_eq!(inst["labels"]["version"], "v1");
    assert_eq!(inst["node"], "sc-1");

    // The app fails its health check: deregistered; healthy again: back.
    app.set_health(503);
    wait_until(
        "unhealthy app deregistered",
        Duration::from_secs(15),
        no_endpoint,
    )
    .await;
    assert!(client.get(key, None).await.unwrap().kvs().is_empty());
    app.set_health(0);
    wait_until(
        "healthy app registered again",
        Duration::from_secs(15),
        serves("app"),
    )
    .await;

    // Graceful stop: by the time the sidecar has exited, the instance is
    // gone from etcd and the gateway has applied that.
    sc.term(Duration::from_secs(15))
        .expect("sidecar exits on SIGTERM");
    assert!(client.get(key, None).await.unwrap().kvs().is_empty());
    let cfg = get_json(&format!("http://127.0.0.1:{}/config", gw.ops))
        .await
        .unwrap();
    assert!(
        cfg["objects"]["instances"].get("orders/sc-1").is_none(),
        "{cfg}"
    );

    // The host dies: sidecar SIGKILLed, app gone. The lease (3 s) expires
    // and the gateway stops routing there.
    sc.start();
    wait_until(
        "registered after restart",
        Duration::from_secs(15),
        serves("app"),
    )
    .await;
    sc.kill();
    app.stop().await;
    let hits = app.hits();
    wait_until(
        "the instance expires with its lease",
        Duration::from_secs(15),
        no_endpoint,
    )
    .await;
    for _ in 0..10 {
        let r = http_get(&url, &[]).await.unwrap();
        assert_eq!(
            r.header("x-mesh-error"),
            Some("no_healthy_endpoint"),
            "{r:?}"
        );
    }
    assert_eq!(app.hits(), hits, "a request reached the dead instance");
    assert!(client.get(key, None).await.unwrap().kvs().is_empty());
}
