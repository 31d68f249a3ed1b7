//! End-to-end: route matching on path regex, header value regex, header
//! absence and query parameters, through a standalone gateway on real
//! sockets, with curl as the client.

use std::process::Command;

use meshgate_tests::*;

/// `(status, x-served-by)` for a curl request.
fn served(url: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl installed");
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let by = head
        .lines()
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .unwrap_or("")
        .trim()
        .to_string();
    (status, by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_header_and_query_conditions_pick_the_route() {
    let dir = tempfile::tempdir().unwrap();
    let (items, iphone, v2, anon, fallback) = (
        Backend::start("items").await,
        Backend::start("iphone").await,
        Backend::start("v2").await,
        Backend::start("anon").await,
        Backend::start("fallback").await,
    );
    let svc = |name: &str, b: &Backend| {
        format!("  {name}:\n    endpoints:\n      - address: {}\n", b.addr)
    };
    let yaml = format!(
        "services:\n{}{}{}{}{}routes:\n{}",
        svc("items", &items),
        svc("iphone", &iphone),
        svc("v2", &v2),
        svc("anon", &anon),
        svc("fallback", &fallback),
        r#"  items:
    scope: ingress
    match:
      path: {regex: '/shop/items/[0-9]+'}
    backends: [{service: items}]
  iphone:
    scope: ingress
    match:
      path: {prefix: /shop}
      headers: [{name: user-agent, regex: '.*iPhone.*'}]
    backends: [{service: iphone}]
  v2:
    scope: ingress
    match:
      path: {prefix: /shop}
      query: [{name: version, exact: '2'}]
    backends: [{service: v2}]
  anon:
    scope: ingress
    match:
      path: {prefix: /account}
      headers: [{name: authorization, present: false}]
    backends: [{service: anon}]
  fallback:
    scope: ingress
    match:
      path: {prefix: /}
    backends: [{service: fallback}]
"#
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let ingress = ports.ingress;
    let base = format!("http://127.0.0.1:{ingress}");
    let u = |p: &str| format!("{base}{p}");

    // Regex path: digits only, whole path.
    assert_eq!(served(&u("/shop/items/42"), &[]), (200, "items".into()));
    assert_eq!(served(&u("/shop/items/42x"), &[]), (200, "fallback".into()));
    assert_eq!(
        served(&u("/shop/items/42/reviews"), &[]),
        (200, "fallback".into())
    );
    // Header regex (a user-agent containing iPhone).
    let ua = ["-A", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)"];
    assert_eq!(served(&u("/shop/cart"), &ua), (200, "iphone".into()));
    assert_eq!(
        served(&u("/shop/cart"), &["-A", "curl"]),
        (200, "fallback".into())
    );
    // Query parameter, percent-decoded, any of repeated values.
    assert_eq!(served(&u("/shop/cart?version=2"), &[]), (200, "v2".into()));
    assert_eq!(
        served(&u("/shop/cart?a=1&version=%32"), &[]),
        (200, "v2".into())
    );
    assert_eq!(
        served(&u("/shop/cart?version=3"), &[]),
        (200, "fallback".into())
    );
    // A more specific path still wins over conditions on a shorter one.
    assert_eq!(
        served(&u("/shop/items/7?version=2"), &ua),
        (200, "items".into())
    );
    // Header absence.
    assert_eq!(served(&u("/account"), &[]), (200, "anon".into()));
    assert_eq!(
        served(&u("/account"), &["-H", "authorization: Bearer x"]),
        (200, "fallback".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_header_canary_and_sticky_users() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let yaml = format!(
        "services:\n  orders-v1:\n    endpoints:\n      - address: {}\n  orders-v2:\n    endpoints:\n      - address: {}\nroutes:\n{}",
        v1.addr,
        v2.addr,
        r#"  split:
    scope: ingress
    match:
      path: {prefix: /split}
    backends:
      - {service: orders-v1, weight: 95}
      - {service: orders-v2, weight: 5}
    backend_rules:
      - match:
          headers: [{name: user-agent, regex: '.*iPhone.*'}]
        backends: [{service: orders-v2}]
  sticky:
    scope: ingress
    match:
      path: {prefix: /sticky}
    backends:
      - {service: orders-v1, weight: 50}
      - {service: orders-v2, weight: 50}
    sticky: {header: x-user}
"#
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let ingress = ports.ingress;

    // 95/5 over 2,000 requests: 100 expected on v2. Smooth weighted round
    // robin makes it exact per cycle of 20; allow for the cycle's phase.
    let url = format!("http://127.0.0.1:{ingress}/split/x");
    let by = served_by(&url, &[], 2000).await;
    let n2 = by.get("v2").copied().unwrap_or(0);
    assert!((95..=105).contains(&n2), "{by:?}");
    assert_eq!(by.values().sum::<usize>(), 2000);

    // The header rule sends every iPhone to v2.
    let by = served_by(&url, &[("user-agent", "Mozilla/5.0 (iPhone)")], 200).await;
    assert_eq!(by.get("v2"), Some(&200), "{by:?}");

    // Sticky: each user stays on one backend; users spread ~50/50.
    let url = format!("http://127.0.0.1:{ingress}/sticky/cart");
    let mut on_v2 = 0;
    for u in 0..200 {
        let user = format!("user-{u}");
        let by = served_by(&url, &[("x-user", &user)], 5).await;
        assert_eq!(by.len(), 1, "user {user} moved between backends: {by:?}");
        on_v2 += usize::from(by.contains_key("v2"));
    }
    // Binomial(200, 0.5): mean 100, sd ~7.1; allow 4.5 sd.
    assert!((68..=132).contains(&on_v2), "{on_v2} of 200 users on v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_path_host_and_headers_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (_echo, echo_port) = start_echo(dir.path(), "echo");
    let yaml = format!(
        "services:\n  api:\n    endpoints:\n      - address: 127.0.0.1:{echo_port}\nroutes:\n{}",
        r#"  api:
    scope: ingress
    match:
      path: {prefix: /public/api}
    backends: [{service: api}]
    rewrite:
      path_prefix: /v2
      host: api.internal
      request_headers:
        set: {x-env: prod}
        remove: [x-debug]
      response_headers:
        set: {x-frame-options: DENY}
        remove: [x-served-by]
"#
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let ingress = ports.ingress;
    let url = format!("http://127.0.0.1:{ingress}/public/api/orders/7?full=1");
    wait_until(
        "echo answers through the gateway",
        std::time::Duration::from_secs(10),
        || {
            let url = url.clone();
            async move { matches!(http_get(&url, &[]).await, Ok(r) if r.status == 200) }
        },
    )
    .await;
    let r = http_get(&url, &[("x-debug", "1"), ("x-keep", "yes")])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["path"], "/v2/orders/7?full=1", "{seen}");
    let h = &seen["headers"];
    assert_eq!(h["host"], "api.internal", "{seen}");
    assert_eq!(h["x-env"], "prod", "{seen}");
    assert_eq!(h["x-keep"], "yes", "{seen}");
    assert!(h.get("x-debug").is_none(), "{seen}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-served-by"), None);
}
