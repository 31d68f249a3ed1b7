//! End-to-end: the access logs of a sidecar and the gateways behind it
//! (real etcd, admin, gateways, sidecar and backends): one JSON line per
//! request on each hop, joined by the request and trace ids, with every
//! member and tier tried and why it moved on; the file reopened on SIGHUP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshgate_tests::*;
use serde_json::{json, Value};

/// The JSON lines of an access log file (none while it does not exist).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits until `path` holds a line for which `pick` holds, and returns it.
async fn line_where(path: &Path, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = lines(path).into_iter().find(|l| pick(l)) {
            return l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line in {} for: {what}; lines: {:#?}",
            path.display(),
            lines(path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_cfg(path: &Path) -> Value {
    json!({"access_log": {"mode": "all", "path": path}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_logs_the_request_with_its_tries_and_reopens_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let ep = etcd.endpoint();
    let (_admin_proc, base, token) = start_admin(d, &ep);
    let admin = Admin { base, token };
    admin.wait_up().await;
    let b1 = Backend::start("b1").await;
    let dead = free_port(); // nothing listens here
    assert_eq!(admin.put("groups/shop", &json!({})).await.status, 201);
    let orders = json!({"group": "shop", "endpoints": [
        {"address": format!("127.0.0.1:{dead}")}, {"address": b1.addr.to_string()}]});
    assert_eq!(admin.put("services/orders", &orders).await.status, 201);
    let route = json!({"scope": "mesh", "match": {"hosts": ["orders"]}, "backends": [{"service": "orders"}]});
    assert_eq!(admin.put("routes/orders", &route).await.status, 201);
    let frontend = json!({"group": "shop", "destinations": [{"service": "orders"}]});
    assert_eq!(admin.put("services/frontend", &frontend).await.status, 201);

    let (gw_log, central_log, sc_log): (PathBuf, PathBuf, PathBuf) = (
        d.join("gw-a.access.log"),
        d.join("gw-c.access.log"),
        d.join("sc.access.log"),
    );
    let (mut gw_a, a) =
        start_gateway_with(d, "gw-a", &["egress"], &["shop"], &ep, log_cfg(&gw_log));
    let (gw_c, c) = start_gateway_with(d, "gw-c", &["central"], &[], &ep, log_cfg(&central_log));
    let central = vec![addr(c.mesh)];
    let (_sc, sp) =
        start_sidecar_with(d, "sc", "frontend", "shop", &central, &ep, log_cfg(&sc_log));
    for p in [a.ops, c.ops, sp.ops] {
        wait_ready(p).await;
    }
    let sidecar_cfg = format!("http://127.0.0.1:{}/config", sp.ops);
    wait_until(
        "the sidecar knows its group gateway",
        Duration::from_secs(20),
        || {
            let url = sidecar_cfg.clone();
            async move {
                let cfg = get_json(&url).await.unwrap_or_default();
                cfg["tiers"]["group"].as_array().map(Vec::len) == Some(1)
            }
        },
    )
    .await;

    // Through the group gateway: until one request met the dead endpoint
    // first (round robin from a random start; once refused, it is ejected).
    let url = format!("http://127.0.0.1:{}/orders/1?token=secret", sp.app);
    let mut bodies = Vec::new();
    for i in 0..2 {
        let id = format!("req-{i}");
        let r = http_get(&url, &[("host", "orders"), ("x-request-id", &id)])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        bodies.push((id, r.body.len()));
    }
    let b1_addr = b1.addr.to_string();
    let dead_addr = format!("127.0.0.1:{dead}");
    let failed_over = line_where(&gw_log, "a request that met the refused endpoint", |l| {
        l["attempts"] == 2
    })
    .await;
    assert_eq!(failed_over["listener"], "mesh");
    assert_eq!(failed_over["route"], "orders");
    assert_eq!(failed_over["service"], "orders");
    assert_eq!(failed_over["status"], 200);
    assert_eq!(failed_over["source"], "frontend", "{failed_over}");
    assert_eq!(
        failed_over["path"], "/orders/1",
        "the query is never logged"
    );
    let tries = failed_over["tries"].as_array().unwrap();
    assert_eq!(tries[0]["member"], dead_addr.as_str());
    assert_eq!(tries[0]["outcome"], "upstream_connect_failed");
    assert_eq!(tries[1]["member"], b1_addr.as_str());
    assert_eq!(tries[1]["outcome"], "ok");
    assert_eq!(failed_over["endpoint"], b1_addr.as_str());
    assert!(
        failed_over["upstream_us"].as_u64().unwrap()
            <= failed_over["duration_us"].as_u64().unwrap()
    );
    assert_eq!(failed_over["completed"], true);

    // The sidecar's line for the same request: joined by its ids.
    let id = failed_over["request_id"].as_str().unwrap().to_string();
    let sc_line = line_where(&sc_log, "the sidecar's line of that request", |l| {
        l["request_id"] == id.as_str()
    })
    .await;
    assert_eq!(sc_line["listener"], "app");
    assert_eq!(sc_line["tier"], "group");
    assert_eq!(sc_line["service"], "orders");
    assert_eq!(sc_line["trace_id"], failed_over["trace_id"]);
    assert_eq!(sc_line["tries"][0]["set"], "tier");
    assert_eq!(sc_line["tries"][0]["member"], addr(a.mesh).as_str());
    let (_, len) = bodies
        .iter()
        .find(|(rid, _)| *rid == id)
        .expect("the client saw that request id");
    assert_eq!(sc_line["bytes_out"], *len as u64, "{sc_line}");
    assert_eq!(failed_over["bytes_out"], *len as u64);

    // A chunked upload, streamed through: its bytes are counted on every
    // hop as they go.
    let upload = d.join("upload.bin");
    std::fs::write(&upload, vec![b'x'; 100_000]).unwrap();
    let curl = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "host: orders",
        ])
        .args([
            "-H",
            "x-request-id: upload",
            "-H",
            "transfer-encoding: chunked",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", upload.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    for (log, hop) in [(&sc_log, "sidecar"), (&gw_log, "gateway")] {
        let l = line_where(log, hop, |l| l["request_id"] == "upload").await;
        assert_eq!(l["method"], "POST");
        assert_eq!(l["bytes_in"], 100_000, "{hop}: {l}");
    }

    // The group gateway dies: the sidecar's next request moves from the
    // group tier (refused) to the central tier, and its line says so.
    gw_a.kill();
    let id = "after-the-kill".to_string();
    let r = http_get(&url, &[("host", "orders"), ("x-request-id", &id)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let moved = line_where(&sc_log, "the request that moved to the central tier", |l| {
        l["request_id"] == id.as_str()
    })
    .await;
    assert_eq!(moved["tier"], "central", "{moved}");
    let tries = moved["tries"].as_array().unwrap();
    assert_eq!(tries.len(), 2, "{moved}");
    assert_eq!(
        (&tries[0]["name"], &tries[0]["outcome"]),
        (&json!("group"), &json!("upstream_connect_failed"))
    );
    assert_eq!(
        (&tries[1]["name"], &tries[1]["outcome"]),
        (&json!("central"), &json!("ok"))
    );
    line_where(&central_log, "the central gateway's line of it", |l| {
        l["request_id"] == id.as_str() && l["status"] == 200
    })
    .await;

    // logrotate: the file is moved away, SIGHUP, and new lines go to a
    // new file at the configured path.
    let rotated = d.join("gw-c.access.log.1");
    std::fs::rename(&central_log, &rotated).unwrap();
    let before = lines(&rotated).len();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &gw_c.pid().to_string()])
        .status()
        .unwrap()
        .success());
    wait_until(
        "lines go to the reopened file",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            let path = central_log.clone();
            async move {
                let r = http_get(&url, &[("host", "orders")]).await;
                assert!(matches!(&r, Ok(r) if r.status == 200), "{r:?}");
                !lines(&path).is_empty()
            }
        },
    )
    .await;
    assert!(
        lines(&rotated).len() >= before,
        "the old file keeps its lines"
    );
    let written = metric(c.ops, "meshgate_access_log_lines_total").await;
    assert!(written >= 2.0, "{written}");
    assert_eq!(
        metric(c.ops, "meshgate_access_log_dropped_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_access_log_setting_is_refused_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("gw.yaml");
    let node = |access_log: Value| {
        json!({
            "id": "gw", "roles": ["central"], "listen": addr(free_port()),
            "admin_listen": addr(free_port()),
            "store": {"file": d.join("mesh.yaml")},
            "access_log": access_log,
        })
    };
    std::fs::write(d.join("mesh.yaml"), "services: {}\n").unwrap();
    for (access_log, expect) in [
        (
            json!({"mode": "sampled", "sample_ratio": 2.0}),
            "access_log.sample_ratio",
        ),
        (json!({"mode": "loud"}), "access_log.mode"),
        (
            json!({"mode": "all", "path": d.join("no/such/dir/a.log")}),
            "access_log.path",
        ),
    ] {
        std::fs::write(&cfg, serde_yaml::to_string(&node(access_log)).unwrap()).unwrap();
        let out = std::process::Command::new(bin("meshgate-gateway"))
            .args(["--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(expect), "{expect}: {err}");
    }
}
