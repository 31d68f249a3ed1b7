//! End-to-end: a route's response cache and traffic mirroring on a real
//! gateway, counting the requests that reach the backends.
//!
//! - cache: `max-age` answers are kept (hit, `Age`, HEAD from the GET
//!   answer), `no-store` and `private` never, `Vary` keeps one answer per
//!   value, a burst of misses for one key sends one request upstream,
//!   other methods bypass, purge by key and by route through the admin API;
//! - mirror: every request copied to the shadow service, its body too;
//!   a shadow that takes 5 s, or is down, changes nothing for the main
//!   answers; copies in flight are bounded (the rest dropped and counted).

use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_what_the_upstream_allows_and_coalesces_misses() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let model = format!(
        r#"services:
  web:
    endpoints: [{{address: "{b}"}}]
routes:
  cached:
    scope: ingress
    match: {{path: {{prefix: /c}}}}
    backends: [{{service: web}}]
    cache: {{max_bytes: 1048576, max_object_bytes: 1024}}
"#,
        b = b.addr
    );
    let (_gw, ports, _file) = start_standalone(dir.path(), &model).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);
    let get = |path: &str, h: &[(&str, &str)]| {
        let url = format!("{base}{path}");
        let h: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            http_get(&url, &h).await.unwrap()
        }
    };

    // Fresh for a minute: one request upstream, then hits.
    let hits = b.hits();
    let r = get("/c/a?cc=max-age%3D60", &[]).await;
    assert_eq!((r.status, r.header("x-mesh-cache")), (200, Some("miss")));
    for _ in 0..3 {
        let r = get("/c/a?cc=max-age%3D60", &[]).await;
        assert_eq!(r.header("x-mesh-cache"), Some("hit"));
        assert_eq!(r.body, "b\n");
        assert!(r.header("age").is_some());
    }
    let head = http("HEAD", &format!("{base}/c/a?cc=max-age%3D60"), &[], "")
        .await
        .unwrap();
    assert_eq!(
        (head.status, head.header("x-mesh-cache")),
        (200, Some("hit"))
    );
    assert_eq!(b.hits(), hits + 1);

    // Never kept: no-store, private, no-cache.
    for cc in ["no-store", "private%2C%20max-age%3D60", "no-cache"] {
        let hits = b.hits();
        for _ in 0..2 {
            let r = get(&format!("/c/n?cc={cc}"), &[]).await;
            assert_eq!(r.header("x-mesh-cache"), Some("miss"), "{cc}");
        }
        assert_eq!(b.hits(), hits + 2, "{cc} was served from the cache");
    }

    // Vary: one answer per language.
    let hits = b.hits();
    let path = "/c/v?cc=max-age%3D60&vary=accept-language";
    for lang in ["en", "fr", "en", "fr", "en"] {
        let r = get(path, &[("accept-language", lang)]).await;
        assert_eq!(r.body, format!("b {lang}\n"));
    }
    assert_eq!(b.hits(), hits + 2);

    // A burst of 20 misses for one key: one request upstream.
    let hits = b.hits();
    let burst = (0..20)
        .map(|_| tokio::spawn(get("/c/slow?cc=max-age%3D60&sleep_ms=500", &[])))
        .collect::<Vec<_>>();
    let mut marks = Vec::new();
    for r in burst {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200);
        marks.push(r.header("x-mesh-cache").unwrap_or_default().to_string());
    }
    assert_eq!(b.hits(), hits + 1, "{marks:?}");
    assert_eq!(
        marks.iter().filter(|m| *m == "miss").count(),
        1,
        "{marks:?}"
    );

    // Other methods bypass the cache.
    let r = http("POST", &format!("{base}/c/a?cc=max-age%3D60"), &[], "{}")
        .await
        .unwrap();
    assert_eq!(r.header("x-mesh-cache"), Some("bypass"));

    // Purge one key, then the whole route, through the admin API.
    let admin = format!("http://127.0.0.1:{}/api/v1", ports.ops);
    let purge = |body: serde_json::Value| {
        let url = format!("{admin}/cache/purge");
        async move { http("POST", &url, &[], &body.to_string()).await.unwrap() }
    };
    let r = purge(json!({"route": "cached", "key": "/c/a?cc=max-age%3D60"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["gateways"]["standalone"]["purged"], 1);
    assert_eq!(
        get("/c/a?cc=max-age%3D60", &[])
            .await
            .header("x-mesh-cache"),
        Some("miss")
    );
    let r = purge(json!({"route": "cached"})).await;
    assert!(
        r.json()["gateways"]["standalone"]["purged"]
            .as_u64()
            .unwrap()
            >= 3,
        "{}",
        r.body
    );
    assert_eq!(
        get("/c/a?cc=max-age%3D60", &[])
            .await
            .header("x-mesh-cache"),
        Some("miss")
    );
    assert_eq!(purge(json!({"route": "nope"})).await.status, 404);

    // Bad input: refused with the field path, nothing changed.
    let r = http(
        "PUT",
        &format!("{admin}/routes/cached"),
        &[],
        &json!({"scope": "ingress", "backends": [{"service": "web"}], "cache": {"max_bytes": 0}})
            .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("cache.max_bytes"), "{}", r.body);
    assert_eq!(
        get("/c/a?cc=max-age%3D60", &[])
            .await
            .header("x-mesh-cache"),
        Some("hit")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_mirror_never_touches_the_main_answers() {
    let dir = tempfile::tempdir().unwrap();
    let main = Backend::start("main").await;
    let slow = Backend::start_slow("slow-shadow", Duration::from_secs(5)).await;
    let fast = Backend::start("fast-shadow").await;
    let dead = free_port();
    let model = format!(
        r#"services:
  web:
    endpoints: [{{address: "{main}"}}]
  slow-shadow:
    endpoints: [{{address: "{slow}"}}]
  fast-shadow:
    endpoints: [{{address: "{fast}"}}]
  dead-shadow:
    endpoints: [{{address: "127.0.0.1:{dead}"}}]
routes:
  to-slow:
    scope: ingress
    match: {{path: {{prefix: /slow}}}}
    backends: [{{service: web}}]
    mirror: {{service: slow-shadow}}
  to-fast:
    scope: ingress
    match: {{path: {{prefix: /fast}}}}
    backends: [{{service: web}}]
    mirror: {{service: fast-shadow}}
  to-dead:
    scope: ingress
    match: {{path: {{prefix: /dead}}}}
    backends: [{{service: web}}]
    mirror: {{service: dead-shadow}}
"#,
        main = main.addr,
        slow = slow.addr,
        fast = fast.addr,
    );
    let (_gw, ports, _file) = start_standalone(dir.path(), &model).await;
    let base = format!("http://127.0.0.1:{}", ports.ingress);
    let mirrored = |result: &'static str| async move {
        metric(
            ports.ops,
            &format!("meshgate_mirror_requests_total{{result=\"{result}\"}}"),
        )
        .await
    };

    // Copies with their bodies.
    let r = http("POST", &format!("{base}/fast/orders"), &[], "{\"id\":7}")
        .await
        .unwrap();
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("main")));
    wait_until(
        "the copy reached the shadow",
        Duration::from_secs(10),
        || async { fast.posts.lock().unwrap().iter().any(|p| p == "{\"id\":7}") },
    )
    .await;

    // A shadow that answers in 5 s: 300 main answers, all from the main
    // backend, all of them before any copy was answered.
    let reqs = (0..300)
        .map(|_| {
            let url = format!("{base}/slow/x");
            tokio::spawn(async move { http_get(&url, &[]).await.unwrap() })
        })
        .collect::<Vec<_>>();
    for r in reqs {
        let r = r.await.unwrap();
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("main")));
    }
    assert_eq!(
        mirrored("answered").await,
        1.0,
        "only the fast shadow's copy was answered"
    );
    // At most 256 copies in flight: the rest were dropped, and counted.
    let dropped = mirrored("dropped").await;
    assert!(dropped >= 44.0, "{dropped} dropped");
    wait_until(
        "every copy is answered or dropped",
        Duration::from_secs(30),
        || async { mirrored("answered").await - 1.0 + mirrored("dropped").await == 300.0 },
    )
    .await;
    assert!(
        slow.hits() <= 256,
        "{} copies in flight at once",
        slow.hits()
    );

    // A dead shadow: the main answers are as always; the copies fail.
    for _ in 0..10 {
        let r = http_get(&format!("{base}/dead/x"), &[]).await.unwrap();
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("main")));
    }
    wait_until(
        "the failed copies are counted",
        Duration::from_secs(10),
        || async { mirrored("failed").await == 10.0 },
    )
    .await;

    // A mirror to a service that does not exist is refused on write.
    let admin = format!("http://127.0.0.1:{}/api/v1", ports.ops);
    let r = http(
        "PUT",
        &format!("{admin}/routes/to-fast"),
        &[],
        &json!({"scope": "ingress", "backends": [{"service": "web"}], "mirror": {"service": "ghost"}})
            .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("mirror.service"), "{}", r.body);
}
