//! End-to-end: standalone mode. The gateway runs on a YAML file: editing the
//! file applies the change, and a PUT through the embedded admin API (with
//! curl, as a user would) lands in the file.

use std::process::Command;
use std::time::Duration;

use meshgate_tests::*;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl installed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_edits_and_admin_puts_both_apply() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let model = format!(
        "services:\n  web:\n    endpoints:\n      - address: {}\nroutes:\n  web:\n    scope: ingress\n    match:\n      path:\n        prefix: /web\n    backends:\n      - service: web\n",
        b1.addr
    );
    let (_gw, ports, file) = start_standalone(dir.path(), &model).await;
    let (ingress, ops) = (ports.ingress, ports.ops);
    let url = format!("http://127.0.0.1:{ingress}/web/page");
    let (out, _) = curl(&["-i", &url]);
    assert!(out.contains("x-served-by: b1"), "{out}");

    // Edit the file by hand: point the service at b2.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(&b1.addr.to_string(), &b2.addr.to_string());
    std::fs::write(&file, text).unwrap();
    wait_until("file edit applied", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            matches!(http_get(&url, &[]).await, Ok(r) if r.header("x-served-by") == Some("b2"))
        }
    })
    .await;

    // PUT a new route through the embedded admin API with curl.
    let api = format!("http://127.0.0.1:{ops}/api/v1/routes/hello");
    let body = r#"{"scope":"ingress","match":{"path":{"exact":"/hello"}},"direct_response":{"status":200,"body":"hi from meshgate"}}"#;
    let (out, err) = curl(&[
        "-X",
        "PUT",
        "-H",
        "content-type: application/json",
        "-d",
        body,
        "-w",
        "\n%{http_code}",
        &api,
    ]);
    assert!(out.ends_with("201"), "{out} {err}");
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(
        saved.contains("hello:") && saved.contains("hi from meshgate"),
        "{saved}"
    );
    let hello = format!("http://127.0.0.1:{ingress}/hello");
    wait_until("admin PUT applied", Duration::from_secs(10), || {
        let hello = hello.clone();
        async move { matches!(http_get(&hello, &[]).await, Ok(r) if r.body == "hi from meshgate") }
    })
    .await;
    // The hand edit survived the admin's rewrite of the file.
    assert!(saved.contains(&b2.addr.to_string()), "{saved}");
    // The embedded admin API explains with this gateway's own router.
    let explain = format!("http://127.0.0.1:{ops}/api/v1/explain");
    let r = http(
        "POST",
        &explain,
        &[],
        r#"{"scope": "ingress", "host": "any", "path": "/hello"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"]["route"], "hello", "{r:?}");
    assert_eq!(r.json()["result"]["direct_response"], 200, "{r:?}");
    // A broken edit is refused; the gateway keeps serving the last good config.
    std::fs::write(&file, "routes: [this is not a map").unwrap();
    // Wait on the gateway having read the broken file: its log says so.
    let log = dir.path().join("gateway.log");
    wait_until("broken file noticed", Duration::from_secs(10), || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("config file rejected")
        }
    })
    .await;
    let r = http_get(&hello, &[]).await.unwrap();
    assert_eq!(r.body, "hi from meshgate");
    // The refusal shows where an operator looks, not only in the log:
    // `/readyz` (`last_error`, `rejected`), `/config`, the metric, and the
    // embedded admin's `/status`.
    let ops_json = |path: &'static str| async move {
        get_json(&format!("http://127.0.0.1:{ops}{path}"))
            .await
            .unwrap()
    };
    let objects = rejected_objects;
    let source = format!("file {}", file.display());
    wait_until("refusal in /readyz", Duration::from_secs(10), || async {
        objects(&ops_json("/readyz").await) == [source.clone()]
    })
    .await;
    let ready = ops_json("/readyz").await;
    assert!(
        ready["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{ready}"
    );
    assert_eq!(
        objects(&ops_json("/config").await),
        std::slice::from_ref(&source)
    );
    assert_eq!(metric(ops, "meshgate_config_rejected_objects").await, 1.0);
    wait_until(
        "refusal in the admin's /status",
        Duration::from_secs(10),
        || async {
            let st = ops_json("/api/v1/status").await;
            st["in_sync"] == false && objects(&st["nodes"][0]) == [source.clone()]
        },
    )
    .await;

    // A file that parses but holds an invalid object: that object is
    // refused (the file is no longer), the rest applies.
    let mut text = saved.clone();
    text.push_str("tcp_routes:\n  broken:\n    port: 0\n    service: web\n");
    std::fs::write(&file, &text).unwrap();
    wait_until(
        "object refusal in /readyz",
        Duration::from_secs(10),
        || async { objects(&ops_json("/readyz").await) == ["tcp_routes/broken"] },
    )
    .await;
    assert_eq!(
        ops_json("/readyz").await["last_error"],
        serde_json::Value::Null
    );
    assert_eq!(objects(&ops_json("/config").await), ["tcp_routes/broken"]);
    assert_eq!(metric(ops, "meshgate_config_rejected_objects").await, 1.0);
    // Fixed: nothing refused anywhere.
    std::fs::write(&file, &saved).unwrap();
    wait_until("refusals cleared", Duration::from_secs(10), || async {
        objects(&ops_json("/readyz").await).is_empty()
            && ops_json("/api/v1/status").await["in_sync"] == true
    })
    .await;
    assert!(objects(&ops_json("/config").await).is_empty());
    assert_eq!(metric(ops, "meshgate_config_rejected_objects").await, 0.0);
}

/// A sidecar on a YAML file instead of etcd (`store: {file}`), as
/// docs/configuration.md describes it: its `direct` destinations are served
/// from the file, everything else goes to the bootstrap central tier (a
/// standalone gateway here), since no gateway registration is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_on_a_file_store_serves_direct_and_central() {
    let dir = tempfile::tempdir().unwrap();
    let orders = Backend::start("orders-1").await;
    let other = Backend::start("other-1").await;
    let gw_model = format!(
        "groups:\n  shop: {{}}\nservices:\n  other:\n    group: shop\n    endpoints: [{{address: '{}'}}]\n",
        other.addr
    );
    let (_gw, gw_ports, _) = start_standalone(dir.path(), &gw_model).await;
    let sc_file = dir.path().join("sidecar-mesh.yaml");
    std::fs::write(
        &sc_file,
        format!(
            "groups:\n  shop: {{}}\nservices:\n  front:\n    group: shop\n    destinations: [{{service: orders, mode: direct}}, {{service: other}}]\n  \
             orders:\n    group: shop\n    endpoints: [{{address: '{}'}}]\n",
            orders.addr
        ),
    )
    .unwrap();
    let (_sc, sc) = start_sidecar_with(
        dir.path(),
        "sc-file",
        "front",
        "shop",
        &[addr(gw_ports.mesh)],
        "unused",
        serde_json::json!({"store": {"file": sc_file}}),
    );
    wait_ready(sc.ops).await;
    let url = format!("http://127.0.0.1:{}/x", sc.app);
    wait_until("direct destination served", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            matches!(http_get(&url, &[("host", "orders")]).await,
                Ok(r) if r.header("x-mesh-tier") == Some("direct") && r.header("x-served-by") == Some("orders-1"))
        }
    })
    .await;
    let r = http_get(&url, &[("host", "other")]).await.unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-tier"), r.header("x-served-by")),
        (200, Some("central"), Some("other-1")),
        "{r:?}"
    );
}

/// The ops port's access rule with tokens (here a standalone gateway's
/// admin tokens, which guard its ops port too): `/config` and `/explain`
/// need a viewer or admin token from every client, loopback included;
/// `/readyz` gives the count of refusals, not the list; `/healthz` and
/// `/metrics` stay open. The scheme is matched in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_ops_port_reveals_config_to_token_holders_only() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens:\n  - {name: dash, token: viewer-token-0123456789, role: viewer}\n",
    )
    .unwrap();
    let (_gw, ports, _) = start_standalone_with(
        dir.path(),
        "services:\n  web:\n    endpoints: [{address: '127.0.0.1:1'}]\n",
        &["--token-file", tokens.to_str().unwrap()],
    )
    .await;
    let ops = |path: &str| format!("http://127.0.0.1:{}{path}", ports.ops);
    let status = |args: &[&str]| {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        curl(&all).0
    };
    assert_eq!(status(&[&ops("/config")]), "401");
    assert_eq!(
        status(&["-X", "POST", "-d", "{\"host\": \"web\"}", &ops("/explain")]),
        "401"
    );
    assert_eq!(
        status(&[
            "-H",
            "authorization: bearer viewer-token-0123456789",
            &ops("/config")
        ]),
        "200"
    );
    assert_eq!(
        status(&[
            "-H",
            "Authorization: BEARER viewer-token-0123456789",
            &ops("/api/v1/services/web")
        ]),
        "200"
    );
    let (ready, _) = curl(&[&ops("/readyz")]);
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        (ready.get("rejected"), &ready["rejected_count"]),
        (None, &serde_json::json!(0)),
        "{ready}"
    );
    assert_eq!(status(&[&ops("/healthz")]), "200");
    assert_eq!(status(&[&ops("/metrics")]), "200");
}
