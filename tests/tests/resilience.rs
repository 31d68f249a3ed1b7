//! End-to-end resilience of the gateway, each feature on real sockets with
//! real backends: retries (landing on another endpoint, sparing POSTs),
//! the retry budget, per-try and whole-request timeouts, circuit breakers,
//! outlier detection with its ejection cap, active health checks and the
//! idle timeout.

use std::time::{Duration, Instant};

use meshgate_tests::*;

fn two_endpoint_service(a: &Backend, b: &Backend, extra: &str) -> String {
    format!(
        "services:\n  orders:\n    endpoints:\n      - address: {}\n      - address: {}\n{extra}routes:\n  orders:\n    scope: ingress\n    match:\n      path: {{prefix: /}}\n    backends: [{{service: orders}}]\n",
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_land_on_another_endpoint_and_spare_posts() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Backend::start("bad").await;
    let good = Backend::start("good").await;
    bad.set_fail(503);
    let yaml = two_endpoint_service(
        &bad,
        &good,
        "    retry:\n      attempts: 2\n      statuses: [503]\n",
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let url = format!("http://127.0.0.1:{}/x", ports.ingress);

    // Every GET succeeds: those sent to `bad` first are retried on `good`.
    let by = served_by(&url, &[], 40).await;
    assert_eq!(by.get("good"), Some(&40), "{by:?}");
    let retried = bad.hits();
    assert!(retried > 0, "round robin sent nothing to the bad endpoint");
    assert_eq!(good.hits(), 40);
    let retries = metric(
        ports.ops,
        "meshgate_resilience_events_total{event=\"retry\",service=\"orders\"}",
    )
    .await;
    assert_eq!(retries as u64, retried);

    // POST is not idempotent: its 503 comes back as is, never resent.
    let (bad_before, good_before) = (bad.hits(), good.hits());
    let mut failed = 0;
    for i in 0..20 {
        let r = http("POST", &url, &[], &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
        if r.status == 503 {
            assert_eq!(r.header("x-served-by"), Some("bad"));
            failed += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    assert!(failed > 0);
    assert_eq!(bad.hits() - bad_before, failed);
    assert_eq!(good.hits() - good_before, 20 - failed);

    // ... unless the client marks it retryable.
    for _ in 0..10 {
        let r = http("POST", &url, &[("x-mesh-retryable", "true")], "{}")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }

    // A body over the 64 KiB replay buffer is streamed, so never resent,
    // retryable or not.
    let big = format!("\"{}\"", "x".repeat(100 * 1024));
    let bad_before = bad.hits();
    let mut failed = 0;
    for _ in 0..6 {
        let r = http("POST", &url, &[("x-mesh-retryable", "true")], &big)
            .await
            .unwrap();
        if r.status == 503 {
            failed += 1;
        }
    }
    assert!(failed > 0);
    assert_eq!(bad.hits() - bad_before, failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_a_retry_storm() {
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    a.set_fail(503);
    b.set_fail(503);
    // Up to 3 retries per request, but a budget of 0% plus 1 retry/s:
    // 10 retries per 10 s window, whatever the request rate.
    let yaml = two_endpoint_service(
        &a,
        &b,
        "    retry:\n      attempts: 3\n      statuses: [503]\n      budget: {percent: 0, min_per_s: 1}\n",
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let url = format!("http://127.0.0.1:{}/x", ports.ingress);
    let started = Instant::now();
    for _ in 0..100 {
        let r = http_get(&url, &[]).await.unwrap();
        assert_eq!(r.status, 503);
    }
    let windows = started.elapsed().as_secs() / 10 + 1;
    let sent = a.hits() + b.hits();
    // Without the budget: 400 upstream requests.
    assert!(sent >= 110, "the budget's minimum was not granted: {sent}");
    assert!(
        sent <= 100 + 10 * windows,
        "{sent} upstream requests for 100 requests"
    );
    let refused = metric(
        ports.ops,
        "meshgate_resilience_events_total{event=\"retry_budget_exhausted\",service=\"orders\"}",
    )
    .await;
    assert!(refused > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_elsewhere_and_the_whole_request_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Backend::start_slow("slow", Duration::from_secs(3)).await;
    let fast = Backend::start("fast").await;
    let yaml = format!(
        "services:
  orders:
    endpoints: [{{address: {slow}}}, {{address: {fast}}}]
    timeouts: {{per_try_ms: 200, request_ms: 10000}}
    retry: {{attempts: 1}}
  stuck:
    endpoints: [{{address: {slow}}}]
    timeouts: {{request_ms: 300}}
routes:
  orders:
    scope: ingress
    match: {{path: {{prefix: /x}}}}
    backends: [{{service: orders}}]
  stuck:
    scope: ingress
    match: {{path: {{prefix: /stuck}}}}
    backends: [{{service: stuck}}]
",
        slow = slow.addr,
        fast = fast.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);

    let by = served_by(&format!("{base}/x"), &[], 6).await;
    assert_eq!(by.get("fast"), Some(&6), "{by:?}");
    assert!(slow.hits() > 0, "no request tried the slow endpoint first");

    let r = http_get(&format!("{base}/stuck"), &[]).await.unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("upstream_timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_answers_503_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Backend::start_slow("slow", Duration::from_millis(1500)).await;
    let pooled = Backend::start_slow("pooled", Duration::from_millis(1500)).await;
    let yaml = format!(
        "services:\n  orders:\n    endpoints: [{{address: {}}}]\n    circuit_breaker: {{max_requests: 2}}\n  pooled:\n    endpoints: [{{address: {}}}]\n    circuit_breaker: {{max_connections: 1, max_pending_requests: 1}}\nroutes:\n  orders:\n    scope: ingress\n    match: {{path: {{prefix: /orders}}}}\n    backends: [{{service: orders}}]\n  pooled:\n    scope: ingress\n    match: {{path: {{prefix: /pooled}}}}\n    backends: [{{service: pooled}}]\n",
        slow.addr, pooled.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);

    // max_requests: two in flight, the third is refused at once.
    let url = format!("{base}/orders");
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { http_get(&url, &[]).await.unwrap() })
        })
        .collect();
    wait_until("two requests in flight", Duration::from_secs(5), || async {
        slow.hits() == 2
    })
    .await;
    let r = http_get(&url, &[]).await.unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("circuit_open"));
    assert!(r.body.contains("max_requests"), "{}", r.body);
    assert_eq!(slow.hits(), 2, "the refused request reached the backend");
    for t in in_flight {
        assert_eq!(t.await.unwrap().status, 200);
    }
    // Slots are freed when responses end.
    assert_eq!(http_get(&url, &[]).await.unwrap().status, 200);

    // max_connections 1, max_pending 1: one in flight, one waits for the
    // connection, the rest are refused; the waiting one is then served on
    // the same connection.
    let url = format!("{base}/pooled");
    let first = {
        let url = url.clone();
        tokio::spawn(async move { http_get(&url, &[]).await.unwrap() })
    };
    wait_until(
        "first request in flight",
        Duration::from_secs(5),
        || async { pooled.hits() == 1 },
    )
    .await;
    let rest: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { http_get(&url, &[]).await.unwrap() })
        })
        .collect();
    assert_eq!(first.await.unwrap().status, 200);
    let mut ok = 0;
    let mut refused = 0;
    for t in rest {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.header("x-mesh-error"), Some("circuit_open"));
                refused += 1;
            }
            s => panic!("unexpected status {s}: {r:?}"),
        }
    }
    assert_eq!((ok, refused), (1, 3));
    assert_eq!(pooled.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_within_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    a.set_fail(500);
    let yaml = format!(
        "services:\n  orders:\n    endpoints: [{{address: {}}}, {{address: {}}}, {{address: {}}}]\n    outlier_detection: {{consecutive_5xx: 3, base_ejection_ms: 60000, max_ejection_percent: 50}}\nroutes:\n  orders:\n    scope: ingress\n    match: {{path: {{prefix: /}}}}\n    backends: [{{service: orders}}]\n",
        a.addr, b.addr, c.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let url = format!("http://127.0.0.1:{}/x", ports.ingress);

    let by = served_by_any(&url, 60).await;
    // `a` answered 500 three times in a row, then was ejected: it gets
    // nothing more.
    assert_eq!(a.hits(), 3, "{by:?}");
    let by = served_by_any(&url, 30).await;
    assert_eq!(a.hits(), 3, "{by:?}");
    assert_eq!(
        by.get("b").copied().unwrap_or(0) + by.get("c").copied().unwrap_or(0),
        30
    );
    assert_eq!(
        metric(
            ports.ops,
            "meshgate_resilience_events_total{event=\"outlier_ejection\",service=\"orders\"}"
        )
        .await,
        1.0
    );

    // `b` fails too, but ejecting it would put 2 of 3 endpoints (67%) out,
    // over the 50% cap: it keeps its share.
    b.set_fail(500);
    let before = b.hits();
    served_by_any(&url, 30).await;
    assert!(b.hits() - before >= 10, "b was ejected over the cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_steer_traffic_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let sick = Backend::start("sick").await;
    let well = Backend::start("well").await;
    sick.set_health(503);
    let dead_port = free_port();
    let yaml = format!(
        "services:\n  orders:\n    endpoints: [{{address: {}}}, {{address: {}}}]\n    health_check: {{http: {{path: /healthz}}, interval_ms: 100, timeout_ms: 100, healthy_threshold: 2, unhealthy_threshold: 2}}\n  tcp-checked:\n    endpoints: [{{address: '127.0.0.1:{dead_port}'}}, {{address: {}}}]\n    health_check: {{tcp: true, interval_ms: 100, timeout_ms: 100}}\nroutes:\n  orders:\n    scope: ingress\n    match: {{path: {{prefix: /orders}}}}\n    backends: [{{service: orders}}]\n  tcp:\n    scope: ingress\n    match: {{path: {{prefix: /tcp}}}}\n    backends: [{{service: tcp-checked}}]\n",
        sick.addr, well.addr, well.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);

    // The checks run from the moment the service is configured.
    let sick_fail = format!(
        "meshgate_health_checks_total{{endpoint=\"{}\",result=\"fail\"}}",
        sick.addr
    );
    let dead_fail = format!(
        "meshgate_health_checks_total{{endpoint=\"127.0.0.1:{dead_port}\",result=\"fail\"}}"
    );
    wait_until("first failed checks", Duration::from_secs(10), || async {
        metric(ports.ops, &sick_fail).await >= 1.0 && metric(ports.ops, &dead_fail).await >= 1.0
    })
    .await;
    assert_eq!(sick.hits(), 0);
    assert!(sick.health_hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    let by = served_by(&format!("{base}/orders"), &[], 20).await;
    assert_eq!(by.get("well"), Some(&20), "{by:?}");
    assert_eq!(sick.hits(), 0);
    // The TCP check keeps the dead endpoint out: no request fails.
    let by = served_by(&format!("{base}/tcp"), &[], 10).await;
    assert_eq!(by.get("well"), Some(&10), "{by:?}");

    // Healthy again after `healthy_threshold` passed checks.
    sick.set_health(0);
    wait_until("sick serves again", Duration::from_secs(10), || async {
        http_get(&format!("{base}/orders"), &[])
            .await
            .is_ok_and(|r| r.header("x-served-by") == Some("sick"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_response_body_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let yaml = format!(
        "services:\n  orders:\n    endpoints: [{{address: {}}}]\n    timeouts: {{idle_ms: 300}}\nroutes:\n  orders:\n    scope: ingress\n    match: {{path: {{prefix: /}}}}\n    backends: [{{service: orders}}]\n",
        b.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    // The backend sends headers and one chunk, then stalls forever; the
    // gateway cuts the body instead of holding it open (the client sees an
    // incomplete body, never a complete-looking one).
    let r = http_get(&format!("http://127.0.0.1:{}/stall", ports.ingress), &[]).await;
    let err = r.expect_err("a stalled body must not complete");
    assert_ne!(err, "timeout", "the gateway did not cut the idle body");
    // Other requests are unaffected.
    let r = http_get(&format!("http://127.0.0.1:{}/ok", ports.ingress), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_retried_only_when_the_policy_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let broken = Backend::start("broken").await;
    let good = Backend::start("good").await;
    broken.set_fail(RESET);
    let yaml = format!(
        "services:
  retried:
    endpoints: [{{address: {b}}}, {{address: {g}}}]
    retry: {{attempts: 1, on_reset: true}}
  plain:
    endpoints: [{{address: {b}}}, {{address: {g}}}]
routes:
  retried:
    scope: ingress
    match: {{path: {{prefix: /retried}}}}
    backends: [{{service: retried}}]
  plain:
    scope: ingress
    match: {{path: {{prefix: /plain}}}}
    backends: [{{service: plain}}]
",
        b = broken.addr,
        g = good.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);

    // The connection breaks after the request was sent: retried on the
    // other endpoint, so every GET succeeds.
    let by = served_by(&format!("{base}/retried"), &[], 10).await;
    assert_eq!(by.get("good"), Some(&10), "{by:?}");
    assert!(broken.hits() > 0);

    // Without a retry policy the reset is answered as 502 upstream_reset.
    let mut resets = 0;
    for _ in 0..10 {
        let r = http_get(&format!("{base}/plain"), &[]).await.unwrap();
        if r.status == 502 {
            assert_eq!(r.header("x-mesh-error"), Some("upstream_reset"));
            resets += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    assert!(resets > 0);
}

/// A client's broken upload is the client's fault: it gets 400 when it is
/// still there to read it, it is never retried, and it never counts
/// against the endpoint that was receiving it (eight such uploads used to
/// eject a healthy endpoint by outlier detection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_broken_upload_does_not_eject_a_healthy_endpoint() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a").await;
    let yaml = format!(
        "services:\n  up:\n    endpoints: [{{address: {}}}]\n    outlier_detection: {{consecutive_gateway_failure: 2, consecutive_5xx: 2, base_ejection_ms: 60000, max_ejection_percent: 100}}\nroutes:\n  up:\n    scope: ingress\n    match: {{path: {{prefix: /}}}}\n    backends: [{{service: up}}]\n",
        a.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", ports.ingress));
    // Four malformed chunked uploads (a chunk size that is not hex): 400,
    // and the connection closed.
    for _ in 0..4 {
        let out = raw_exchange(
            ports.ingress,
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 400") && !out.contains("upstream_reset"),
            "blamed on the upstream: {out}"
        );
    }
    // Four uploads abandoned mid-body (too large to be buffered first, so
    // they stream to the endpoint).
    for _ in 0..4 {
        let mut s = connect().await.unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
            .await
            .unwrap();
        drop(s);
    }
    // Every one of the eight has been handled (and counted as the
    // client's 4xx) before the ejection count is read.
    let client_errors =
        "meshgate_requests_total{class=\"4xx\",listener=\"ingress\",route=\"up\",service=\"up\"}";
    wait_until("eight uploads handled", Duration::from_secs(15), || async {
        metric(ports.ops, client_errors).await >= 8.0
    })
    .await;
    let ejected = "meshgate_resilience_events_total{event=\"outlier_ejection\",service=\"up\"}";
    assert_eq!(
        metric(ports.ops, ejected).await,
        0.0,
        "a healthy endpoint was ejected"
    );
    assert_eq!(metric(ports.ops, client_errors).await, 8.0);
    // The abandoned ones (and only they) are client aborts: counted, and
    // logged as such.
    assert_eq!(metric(ports.ops, "meshgate_client_aborts_total").await, 4.0);
    let log = dir.path().join("gateway.log");
    let aborts_logged = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("client abort")
            .count()
    };
    wait_until(
        "four client aborts logged",
        Duration::from_secs(10),
        || async { aborts_logged() >= 4 },
    )
    .await;
    assert_eq!(aborts_logged(), 4);
    let r = http_get(&format!("http://127.0.0.1:{}/after", ports.ingress), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}
