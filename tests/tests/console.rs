//! End-to-end: the web console in a real browser (Debian's Chromium,
//! headless, driven through Playwright): each page checked against the
//! API, a rollback done through the UI and seen applied, a viewer refused
//! the same rollback, and a screenshot of each page.

use std::time::Duration;

use meshgate_tests::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_mesh_and_rolls_back_through_the_ui() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let ep = etcd.endpoint();
    let (_admin_proc, base, token) = start_admin_with(d, &ep, json!({"topology_interval_ms": 200}));
    let admin = Admin {
        base: base.clone(),
        token: token.clone(),
    };
    admin.wait_up().await;
    let b = Backend::start("orders").await;
    assert_eq!(admin.put("groups/shop", &json!({})).await.status, 201);
    let orders = json!({"group": "shop", "endpoints": [{"address": b.addr.to_string()}]});
    assert_eq!(admin.put("services/orders", &orders).await.status, 201);
    let frontend = json!({"group": "shop", "destinations": [{"service": "orders"}]});
    assert_eq!(admin.put("services/frontend", &frontend).await.status, 201);
    // A route with a history: created, then changed.
    let v1 = json!({"scope": "mesh", "match": {"hosts": ["orders"], "path": {"prefix": "/"}}, "backends": [{"service": "orders"}]});
    assert_eq!(admin.put("routes/orders", &v1).await.status, 201);
    let v2 = json!({"scope": "mesh", "match": {"hosts": ["orders"], "path": {"prefix": "/v2"}}, "backends": [{"service": "orders"}]});
    assert_eq!(admin.put("routes/orders", &v2).await.status, 200);
    // A consumer with secrets: the console shows its key's hash only.
    let consumer = json!({
        "api_keys": [{"name": "main", "key": "mobile-key-0123456789"}],
        "jwt": {"keys": [{"kid": "m1", "algorithm": "HS256", "secret": "mobile-secret-0123456789abcdef0123"}]},
    });
    assert_eq!(admin.put("consumers/mobile", &consumer).await.status, 201);

    let (_gw, a) = start_gateway(d, "gw-a", &["egress"], &["shop"], &ep);
    let (_sc, sp) = start_sidecar(d, "sc", "frontend", "shop", &[], &ep);
    wait_ready(a.ops).await;
    wait_ready(sp.ops).await;
    let url = format!("http://127.0.0.1:{}/v2/items", sp.app);
    wait_until(
        "traffic through the mesh is in the graph",
        Duration::from_secs(30),
        || {
            let (url, admin) = (url.clone(), admin.clone());
            async move {
                let _ = http_get(&url, &[("host", "orders")]).await;
                let t = admin.get("topology?window_s=60").await.json();
                t["edges"].as_array().is_some_and(|e| !e.is_empty())
            }
        },
    )
    .await;

    let shots = d.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = std::process::Command::new("python3")
        .arg(peer("console_browser.py"))
        .args([
            &base,
            &token,
            shots.to_str().unwrap(),
            "orders",
            "orders",
            "viewer-token-0123456789",
            "mobile",
        ])
        .output()
        .expect("run the browser");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();

    // Topology: the services and edges the API has, drawn.
    let api = admin.get("topology?window_s=60").await.json();
    let mut drawn: Vec<&str> = seen["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    drawn.sort();
    let mut want: Vec<&str> = api["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    want.sort();
    assert_eq!(drawn, want);
    assert!(
        seen["edges"]
            .as_array()
            .unwrap()
            .contains(&json!(["frontend", "orders"])),
        "{seen}"
    );
    // The consumer's page: its key as a hash, no secret.
    let spec = seen["consumer_spec"].as_str().unwrap_or_default();
    let hash =
        meshgate_config::tokens::hex(&meshgate_config::tokens::digest("mobile-key-0123456789"));
    assert!(spec.contains(&hash), "{spec}");
    assert!(
        !spec.contains("mobile-key-0123456789") && !spec.contains("mobile-secret"),
        "{spec}"
    );
    // Nodes: every live node.
    let status = admin.get("status").await.json();
    let mut ids: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    ids.sort();
    let mut shown: Vec<&str> = seen["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    shown.sort();
    assert_eq!(shown, ids);
    // Config: both versions with their diffs; the rollback applied.
    assert_eq!(seen["versions"].as_array().unwrap().len(), 2, "{seen}");
    assert_eq!(seen["diff_has_changes"], true);
    let now = admin.get("routes/orders").await.json();
    assert_eq!(
        now["spec"]["match"]["path"]["prefix"], "/",
        "rolled back to the first version: {now}"
    );
    assert_eq!(now["version"], seen["version_after"]);
    assert!(seen["version_after"].as_i64() > seen["version_before"].as_i64());
    assert!(
        seen["rollback_message"]
            .as_str()
            .unwrap()
            .contains("applied by every gateway"),
        "{seen}"
    );
    // Explain and propagation.
    assert!(
        seen["explain"].as_str().unwrap().contains("orders"),
        "{seen}"
    );
    assert!(
        seen["last_write"]
            .as_str()
            .unwrap()
            .contains("routes/orders"),
        "{seen}"
    );
    assert!(
        seen["applied"].as_str().unwrap().starts_with("1 of 1"),
        "{seen}"
    );
    // A viewer may look, not change.
    assert!(
        seen["viewer_error"].as_str().unwrap().contains("(403)"),
        "{seen}"
    );
    for page in [
        "topology",
        "nodes",
        "config",
        "rolled-back",
        "explain",
        "propagation",
    ] {
        let png = std::fs::read(shots.join(format!("{page}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{page}.png"
        );
    }
}
