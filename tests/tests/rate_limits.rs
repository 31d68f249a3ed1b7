//! End-to-end: rate limits and injected faults on real gateways, measured
//! with the real load generator (`meshgate-load`'s engine, open loop).
//!
//! - a route's limit accepts its rate within ±5% over 10 s, and answers
//!   the rest 429 with `Retry-After` and the `RateLimit` headers;
//! - a limit keyed by a header counts each value apart; a service's own
//!   limit holds whatever route reaches it; a limit changed live applies;
//! - a `cluster` limit of 300/s on 3 gateways (a real etcd, node records)
//!   is 300/s ±10% in all, and 150/s each once one is killed;
//! - an abort injected into 30% of the requests hits a share within a
//!   5-sigma binomial bound, a delay only requests with the header, and a
//!   gRPC caller gets the configured gRPC status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_loadtest::{run, LoadConfig, Progress, Report};
use meshgate_tests::*;
use serde_json::json;

/// An open-loop run of `rate` requests per second for `secs` at `url`'s
/// port and path.
async fn load(port: u16, path: &str, rate: f64, secs: f64, headers: &[(&str, &str)]) -> Report {
    let mut c = LoadConfig::new("127.0.0.1", port, path);
    c.headers.insert(
        http::header::HOST,
        format!("127.0.0.1:{port}").parse().unwrap(),
    );
    for (k, v) in headers {
        c.headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    c.connections = 8;
    c.rate = Some(rate);
    c.duration = Duration::from_secs_f64(secs);
    run(c, Arc::new(Progress::default())).await
}

/// Every answer was a 2xx or a 429 `rate_limited` (nothing else went
/// wrong).
fn only_ok_or_limited(r: &Report) {
    let other: u64 = r
        .errors
        .iter()
        .filter(|(k, _)| k.as_str() != "mesh:rate_limited")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(other, 0, "{}", r.table());
    assert_eq!(r.unsent, 0, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_limit_holds_its_rate_and_says_when_to_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let slow_svc = Backend::start("s").await;
    let model = format!(
        r#"services:
  web:
    endpoints: [{{address: "{b}"}}]
  fragile:
    endpoints: [{{address: "{s}"}}]
    rate_limit: {{requests: 5, burst: 5, per: minute}}
routes:
  limited:
    scope: ingress
    match: {{path: {{prefix: /limited}}}}
    backends: [{{service: web}}]
    rate_limit: {{requests: 200, burst: 10}}
  per-user:
    scope: ingress
    match: {{path: {{prefix: /user}}}}
    backends: [{{service: web}}]
    rate_limit: {{requests: 2, burst: 2, per: minute, key: header, header: x-user}}
  fragile-a:
    scope: ingress
    match: {{path: {{prefix: /fa}}}}
    backends: [{{service: fragile}}]
  fragile-b:
    scope: ingress
    match: {{path: {{prefix: /fb}}}}
    backends: [{{service: fragile}}]
"#,
        b = b.addr,
        s = slow_svc.addr
    );
    let (_gw, ports, _file) = start_standalone(dir.path(), &model).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);

    // 400/s offered for 10 s to a 200/s limit (burst 10).
    let before = b.hits();
    let r = load(ports.ingress, "/limited", 400.0, 10.0, &[]).await;
    only_ok_or_limited(&r);
    let accepted_rate = (r.ok as f64 - 10.0) / 10.0;
    assert!(
        (accepted_rate - 200.0).abs() <= 10.0,
        "accepted {accepted_rate:.1}/s of a 200/s limit\n{}",
        r.table()
    );
    assert_eq!(
        b.hits() - before,
        r.ok,
        "only accepted requests reach the backend"
    );
    // The limiter has refilled since the run: use that up with bursts of
    // concurrent requests (one at a time, a slow machine could ask no
    // faster than the 200/s refill) and keep the first refusal.
    let url = format!("{base}/limited");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let burst = futures::future::join_all((0..50).map(|_| http_get(&url, &[]))).await;
        let refused = burst
            .into_iter()
            .map(Result::unwrap)
            .find(|r| r.status == 429);
        match refused {
            Some(r) => break r,
            None if Instant::now() < deadline => continue,
            None => panic!("no burst of 50 concurrent requests was refused in 10 s"),
        }
    };
    assert_eq!(refused.header("x-mesh-error"), Some("rate_limited"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"limit\";q=200;w=1")
    );
    assert_eq!(refused.header("ratelimit"), Some("\"limit\";r=0;t=1"));

    // Keyed by a header: each user has their own 2 per minute.
    let user = |u: &'static str| {
        let url = format!("{base}/user");
        async move { http_get(&url, &[("x-user", u)]).await.unwrap() }
    };
    for u in ["ann", "ben"] {
        assert_eq!(user(u).await.status, 200);
        assert_eq!(user(u).await.status, 200);
        let r = user(u).await;
        assert_eq!(r.status, 429);
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=30).contains(&wait), "retry in {wait} s");
        assert_eq!(r.header("ratelimit-policy"), Some("\"limit\";q=2;w=60"));
    }

    // A service's own limit holds over every route to it.
    let mut statuses = Vec::new();
    for i in 0..10 {
        let path = if i % 2 == 0 { "/fa" } else { "/fb" };
        statuses.push(
            http_get(&format!("{base}{path}"), &[])
                .await
                .unwrap()
                .status,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(slow_svc.hits(), 5);

    // Changed live through the admin API: the new limit applies.
    let admin = format!("http://127.0.0.1:{}/api/v1", ports.ops);
    let put = http(
        "PUT",
        &format!("{admin}/routes/per-user"),
        &[],
        &json!({"scope": "ingress", "match": {"path": {"prefix": "/user"}},
                "backends": [{"service": "web"}],
                "rate_limit": {"requests": 100, "per": "minute", "key": "header", "header": "x-user"}})
        .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    wait_until("the new limit applies", Duration::from_secs(10), || async {
        user("ann").await.status == 200
    })
    .await;
    // Bad input: refused with the field path, nothing changed.
    for (body, field) in [
        (json!({"requests": 0}), "rate_limit.requests"),
        (json!({"requests": -3}), "rate_limit.requests"),
        (json!({"requests": 5, "key": "header"}), "rate_limit.header"),
    ] {
        let r = http(
            "PUT",
            &format!("{admin}/routes/limited"),
            &[],
            &json!({"scope": "ingress", "backends": [{"service": "web"}], "rate_limit": body})
                .to_string(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains(field), "{field}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_hit_their_share_and_only_the_requests_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let model = format!(
        r#"services:
  web:
    endpoints: [{{address: "{b}"}}]
routes:
  chaos:
    scope: ingress
    match: {{path: {{prefix: /chaos}}}}
    backends: [{{service: web}}]
    fault: {{abort: {{status: 418, grpc_status: 8, percent: 30}}}}
  slow:
    scope: ingress
    match: {{path: {{prefix: /slow}}}}
    backends: [{{service: web}}]
    fault: {{delay: {{ms: 300, percent: 100}}, header: x-chaos}}
"#,
        b = b.addr
    );
    let (_gw, ports, _file) = start_standalone(dir.path(), &model).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);

    let n = 2000u64;
    let before = b.hits();
    let r = load(ports.ingress, "/chaos", 400.0, n as f64 / 400.0, &[]).await;
    assert_eq!(r.requests, n, "{}", r.table());
    let aborted = r.errors.get("mesh:fault_injected").copied().unwrap_or(0);
    // Binomial(2000, 0.3): mean 600, sigma 20.5; 5 sigma either side.
    assert!((498..=702).contains(&aborted), "{aborted} of {n} aborted");
    assert_eq!(aborted + r.ok, n, "{}", r.table());
    assert_eq!(
        b.hits() - before,
        r.ok,
        "an aborted request never reaches the backend"
    );
    // The abort as configured, for HTTP and for gRPC callers.
    let mut got = (false, false);
    for _ in 0..200 {
        let r = http_get(&format!("{base}/chaos"), &[]).await.unwrap();
        if r.status == 418 {
            assert_eq!(r.header("x-mesh-error"), Some("fault_injected"));
            got.0 = true;
        }
        let g = http(
            "POST",
            &format!("{base}/chaos"),
            &[("content-type", "application/grpc")],
            "",
        )
        .await
        .unwrap();
        if g.header("x-mesh-error") == Some("fault_injected") {
            assert_eq!(g.header("grpc-status"), Some("8"));
            got.1 = true;
        }
        if got == (true, true) {
            break;
        }
    }
    assert_eq!(got, (true, true));

    // The delay applies only to requests with the header.
    let t = Instant::now();
    let r = http_get(&format!("{base}/slow"), &[("x-chaos", "1")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300), "not delayed");
    let hits = b.hits();
    let r = http_get(&format!("{base}/slow"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(b.hits(), hits + 1);
    // Bad input.
    let admin = format!("http://127.0.0.1:{}/api/v1", ports.ops);
    let r = http(
        "PUT",
        &format!("{admin}/routes/chaos"),
        &[],
        &json!({"scope": "ingress", "backends": [{"service": "web"}],
                "fault": {"abort": {"status": 418, "percent": 150}}})
        .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("fault.abort.percent"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_limit_is_shared_by_the_live_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let (_admin_proc, base, token) = start_admin(d, &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let b = Backend::start("b").await;
    let r = admin
        .put(
            "services/web",
            &json!({"endpoints": [{"address": b.addr.to_string()}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = admin
        .put(
            "routes/shared",
            &json!({"scope": "ingress", "match": {"path": {"prefix": "/"}},
                    "backends": [{"service": "web"}],
                    "rate_limit": {"requests": 300, "burst": 30, "scope": "cluster"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let mut gws = Vec::new();
    for id in ["gw-1", "gw-2", "gw-3"] {
        let (p, ports) = start_gateway(d, id, &["ingress"], &[], &etcd.endpoint());
        gws.push((p, ports));
    }
    for (_, ports) in &gws {
        wait_ready(ports.ops).await;
    }
    let sharing = |ports: Vec<GatewayPorts>, n: f64| async move {
        wait_until(
            &format!("{n} gateways share the limit"),
            Duration::from_secs(20),
            || {
                let ports = ports.clone();
                async move {
                    for p in &ports {
                        let m = metric(p.ops, "meshgate_cluster_gateways{pool=\"ingress\"}").await;
                        if m != n {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await
    };
    sharing(gws.iter().map(|g| g.1).collect(), 3.0).await;

    // A round-robin client: the same offered load at each gateway, 600/s
    // in all for 10 s, against 300/s for the cluster.
    let runs = gws
        .iter()
        .map(|(_, p)| tokio::spawn(load(p.ingress, "/", 200.0, 10.0, &[])))
        .collect::<Vec<_>>();
    let mut total = 0;
    for r in runs {
        let r = r.await.unwrap();
        only_ok_or_limited(&r);
        total += r.ok;
    }
    let rate = total as f64 / 10.0;
    assert!(
        (270.0..=330.0).contains(&rate),
        "the cluster accepted {rate:.1}/s of 300/s"
    );

    // One gateway killed: once its lease is gone, the others take 150/s each.
    gws[2].0.kill();
    sharing(gws[..2].iter().map(|g| g.1).collect(), 2.0).await;
    let runs = gws[..2]
        .iter()
        .map(|(_, p)| tokio::spawn(load(p.ingress, "/", 300.0, 10.0, &[])))
        .collect::<Vec<_>>();
    for r in runs {
        let r = r.await.unwrap();
        only_ok_or_limited(&r);
        let rate = r.ok as f64 / 10.0;
        assert!(
            (135.0..=165.0).contains(&rate),
            "one gateway accepted {rate:.1}/s of 150/s\n{}",
            r.table()
        );
    }
}
