//! End-to-end: a service's `fallback` serves when none of the service's
//! endpoints is reachable, and traffic returns once one is.

use std::time::Duration;

use meshgate_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_service_serves_while_the_service_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let backup = Backend::start("backup").await;
    let primary_port = free_port(); // nothing listens here yet
    let yaml = format!(
        "services:\n  orders:\n    endpoints:\n      - address: 127.0.0.1:{primary_port}\n    fallback: orders-backup\n  orders-backup:\n    endpoints:\n      - address: {}\nroutes:\n  orders:\n    scope: ingress\n    match:\n      path: {{prefix: /orders}}\n    backends: [{{service: orders}}]\n",
        backup.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let ingress = ports.ingress;
    let url = format!("http://127.0.0.1:{ingress}/orders/1");

    // Primary down: every request (the first one included, whose connect
    // is refused) is served by the fallback; none fails.
    let by = served_by(&url, &[], 50).await;
    assert_eq!(by.get("backup"), Some(&50), "{by:?}");

    // A POST with a body, too (the refused connect sent nothing).
    let r = http("POST", &url, &[("content-type", "text/plain")], "order-1")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-served-by"), Some("backup"));
    assert_eq!(backup.posts.lock().unwrap().as_slice(), ["order-1"]);

    // The primary comes up: once its ejection ends, it serves again.
    let primary = Backend::start_on("primary", primary_port).await;
    wait_until("primary serves again", Duration::from_secs(40), || {
        let url = url.clone();
        async move {
            matches!(http_get(&url, &[]).await, Ok(r) if r.header("x-served-by") == Some("primary"))
        }
    })
    .await;
    let by = served_by(&url, &[], 20).await;
    assert_eq!(by.get("primary"), Some(&20), "{by:?}");
    assert!(primary.hits() >= 21);
}
