//! End-to-end: SIGTERM drains. The gateway deregisters, stops accepting, and
//! finishes the requests already in flight before exiting cleanly.

use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin_proc, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let slow = Backend::start("slow").await;
    let r = admin
        .put(
            "services/slow",
            &json!({"endpoints": [{"address": slow.addr.to_string()}]}),
        )
        .await;
    assert_eq!(r.status, 201);
    let (mut gw, ports) = start_gateway(dir.path(), "gw", &["central"], &[], &etcd.endpoint());
    wait_ready(ports.ops).await;
    admin.wait_nodes(1).await;

    // A request that takes 1.5 s is in flight when SIGTERM arrives.
    let url = format!("http://127.0.0.1:{}/delay/1500", ports.mesh);
    let in_flight =
        tokio::spawn(async move { http_get(&url, &[("x-mesh-service", "slow")]).await });
    let hits = slow.hits.clone();
    wait_until(
        "request reached the backend",
        Duration::from_secs(10),
        || {
            let hits = hits.clone();
            async move { hits.load(std::sync::atomic::Ordering::SeqCst) == 1 }
        },
    )
    .await;
    assert!(
        !in_flight.is_finished(),
        "the request must still be in flight at SIGTERM"
    );
    let exit = tokio::task::spawn_blocking(move || {
        let st = gw.term(Duration::from_secs(10));
        (st, gw)
    });
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("slow")));
    let (status, _gw) = exit.await.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit, got {status:?}"
    );
    // It deregistered itself rather than waiting for its lease to expire.
    assert_eq!(admin.get("nodes").await.json()["items"], json!([]));
    // And it no longer accepts connections.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", ports.mesh))
        .await
        .is_err());
}
