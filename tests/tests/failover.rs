//! End-to-end fail-over through the sidecar under a steady stream of GET
//! and POST requests: one group gateway SIGKILLed, then all of them
//! (traffic moves to the central tier), then both brought back (traffic
//! returns to the group tier). No GET fails, no POST reaches a backend
//! twice, and a POST fails only when it had already been sent; in
//! plaintext and with mutual TLS on every sidecar → gateway hop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate_tests::*;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Answers by tier (`x-mesh-tier`).
    tiers: Mutex<HashMap<String, u64>>,
    failed_gets: Mutex<Vec<String>>,
    /// Failed POSTs: (body, x-mesh-error or transport error).
    failed_posts: Mutex<Vec<(String, String)>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_die_and_return_under_get_and_post_load() {
    gateways_die_and_return(Mesh::start().await).await;
}

/// The same under mutual TLS on every sidecar → gateway hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_die_and_return_under_load_with_mutual_tls() {
    gateways_die_and_return(Mesh::start_with(true).await).await;
}

async fn gateways_die_and_return(mut m: Mesh) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seq = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for post in [false, false, true] {
        let (stop, tally, seq, url) = (stop.clone(), tally.clone(), seq.clone(), m.app_url("/o"));
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (method, body) = if post {
                    ("POST", format!("p-{}", seq.fetch_add(1, Ordering::Relaxed)))
                } else {
                    ("GET", String::new())
                };
                let r = http(method, &url, &[("host", "orders")], &body).await;
                match r {
                    Ok(r) if r.status == 200 => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        let tier = r.header("x-mesh-tier").unwrap_or("?").to_string();
                        *tally.tiers.lock().unwrap().entry(tier).or_default() += 1;
                    }
                    other if post => {
                        let why = match &other {
                            Ok(r) => r.header("x-mesh-error").unwrap_or("app").to_string(),
                            Err(e) => e.clone(),
                        };
                        tally.failed_posts.lock().unwrap().push((body, why));
                    }
                    other => tally.failed_gets.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    let tiers_now =
        |t: &Tally, tier: &str| -> u64 { t.tiers.lock().unwrap().get(tier).copied().unwrap_or(0) };
    let more = |n: u64| {
        let tally = tally.clone();
        let from = tally.ok.load(Ordering::Relaxed);
        move || {
            let tally = tally.clone();
            async move { tally.ok.load(Ordering::Relaxed) >= from + n }
        }
    };
    wait_until("traffic flowing", Duration::from_secs(10), more(200)).await;

    // One group gateway dies.
    m.gws[0].0.kill();
    wait_until("traffic after one kill", Duration::from_secs(20), more(500)).await;

    // All group gateways die: the central tier takes the traffic.
    m.gws[1].0.kill();
    let central_before = tiers_now(&tally, "central");
    wait_until(
        "traffic on the central tier",
        Duration::from_secs(30),
        || {
            let tally = tally.clone();
            async move { tiers_now(&tally, "central") >= central_before + 300 }
        },
    )
    .await;

    // Both come back: traffic returns to the group tier.
    m.gws[0].0.start();
    m.gws[1].0.start();
    let group_before = tiers_now(&tally, "group");
    wait_until(
        "traffic back on the group tier",
        Duration::from_secs(40),
        || {
            let tally = tally.clone();
            async move { tiers_now(&tally, "group") >= group_before + 300 }
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failed_gets = tally.failed_gets.lock().unwrap().clone();
    assert!(
        failed_gets.is_empty(),
        "{} GETs failed, first: {:?}\n--- sidecar log ---\n{}",
        failed_gets.len(),
        failed_gets.first(),
        m.sidecar.0.log_tail(80)
    );
    // No POST reached a backend twice.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in
        m.b1.posts
            .lock()
            .unwrap()
            .iter()
            .chain(m.b2.posts.lock().unwrap().iter())
    {
        *seen.entry(p.clone()).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicated POSTs: {dups:?}");
    // A POST failed only after it was sent (the exchange broke: never
    // replayed), never for a connection that could not be made.
    for (body, why) in tally.failed_posts.lock().unwrap().iter() {
        assert_eq!(
            why, "upstream_reset",
            "POST {body} failed before it was sent"
        );
    }
    let tiers = tally.tiers.lock().unwrap().clone();
    assert!(
        tiers.get("central").copied().unwrap_or(0) >= 300,
        "{tiers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_member_is_skipped_before_any_request_tries_it() {
    let mut m = Mesh::start().await;
    let url = m.app_url("/x");
    served_by(&url, &[("host", "orders")], 10).await;
    let dead = addr(m.gws[0].1.mesh);
    let ops = m.sidecar.1.ops;
    let failures = "meshgate_upstream_connect_failures_total{service=\"group\"}";
    let before = metric(ops, failures).await;

    // gw-a dies while no request is in flight; the sidecar's member check
    // (TCP, every second) notices it.
    m.gws[0].0.kill();
    let failed_check =
        format!("meshgate_health_checks_total{{endpoint=\"{dead}\",result=\"fail\"}}");
    wait_until(
        "the member check fails",
        Duration::from_secs(10),
        || async { metric(ops, &failed_check).await >= 1.0 },
    )
    .await;

    // Requests now go to gw-b only: not one connect to the dead member.
    for _ in 0..20 {
        let r = http_get(&url, &[("host", "orders")]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("group"));
    }
    assert_eq!(
        metric(ops, failures).await,
        before,
        "a request tried the dead member"
    );
}

/// A gateway member that dies after sending the response headers (here: a
/// fake member that announces 100 bytes, sends 3 and closes): the sidecar
/// reads small answers to GETs whole before passing them on, so the app
/// gets a complete answer from another member, never a broken body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dying_mid_answer_costs_a_get_nothing() {
    let m = Mesh::start().await;
    let broken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken_addr = broken.local_addr().unwrap().to_string();
    let served = Arc::new(AtomicU64::new(0));
    let s = served.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = broken.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if matches!(c.read(&mut buf).await, Ok(n) if n > 0) {
                    s.fetch_add(1, Ordering::SeqCst);
                    let _ = c
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nx-served-by: broken\r\n\r\nabc")
                        .await;
                }
            });
        }
    });
    // Registered the way a gateway registers itself.
    let node = serde_json::json!({"kind": "gateway", "roles": ["egress"], "groups": ["shop"],
        "address": broken_addr, "version": "0", "applied_revision": 0, "updated_at_ms": 0});
    let mut etcd = m.etcd.client().await;
    etcd.put(
        "/meshgate/v1/nodes/gateway/gw-broken",
        node.to_string(),
        None,
    )
    .await
    .unwrap();
    m.wait_group_members(3).await;
    for _ in 0..30 {
        let r = http_get(&m.app_url("/x"), &[("host", "orders")]).await;
        let r = r.unwrap_or_else(|e| panic!("a GET failed: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body == "b1\n" || r.body == "b2\n", "{r:?}");
        assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
    }
    assert!(
        served.load(Ordering::SeqCst) >= 1,
        "the broken member was never tried"
    );
}
