//! End-to-end: spans per hop over OTLP, received by real OTLP receivers
//! (HTTP/protobuf and gRPC, decoded with the official protobuf
//! definitions): parentage across sidecar → gateway → backend, the
//! incoming `sampled` flag followed, fail-over steps as span events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshgate_tests::*;
use serde_json::{json, Value};

fn spans(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("spans.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the receiver in `dir` has `n` spans of `trace`.
async fn trace_spans(dir: &Path, trace: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got: Vec<Value> = spans(dir)
            .into_iter()
            .filter(|s| s["trace_id"] == trace)
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} span(s) of trace {trace} in {}; got {got:#?}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tracing_cfg(port: u16, protocol: &str, ratio: f64) -> Value {
    json!({"tracing": {"endpoint": format!("http://127.0.0.1:{port}"), "protocol": protocol,
        "sample_ratio": ratio, "export_interval_ms": 100}})
}

/// The trace and parent ids of a `traceparent`.
fn ids(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_join_across_hops_follow_the_sampled_flag_and_record_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (http_dir, grpc_dir): (PathBuf, PathBuf) = (d.join("otlp-http"), d.join("otlp-grpc"));
    std::fs::create_dir_all(&http_dir).unwrap();
    std::fs::create_dir_all(&grpc_dir).unwrap();
    let (_rh, http_port) = py_server(&http_dir, "otlp_receiver.py", "http").await;
    let (_rg, grpc_port) = py_server(&grpc_dir, "otlp_receiver.py", "grpc").await;

    let etcd = Etcd::start(d).await;
    let ep = etcd.endpoint();
    let (_admin_proc, base, token) = start_admin(d, &ep);
    let admin = Admin { base, token };
    admin.wait_up().await;
    let (_echo, echo_port) = start_echo(d, "orders");
    let dead = free_port();
    assert_eq!(admin.put("groups/shop", &json!({})).await.status, 201);
    let orders = json!({"group": "shop", "endpoints": [
        {"address": format!("127.0.0.1:{dead}")}, {"address": addr(echo_port)}]});
    assert_eq!(admin.put("services/orders", &orders).await.status, 201);
    let frontend = json!({"group": "shop", "destinations": [{"service": "orders"}]});
    assert_eq!(admin.put("services/frontend", &frontend).await.status, 201);

    // The group gateway samples nothing it starts itself: it follows the
    // sidecar's decision. The central one exports over gRPC.
    let (mut gw_a, a) = start_gateway_with(
        d,
        "gw-a",
        &["egress"],
        &["shop"],
        &ep,
        tracing_cfg(http_port, "http", 0.0),
    );
    let (_gw_c, c) = start_gateway_with(
        d,
        "gw-c",
        &["central"],
        &[],
        &ep,
        tracing_cfg(grpc_port, "grpc", 0.0),
    );
    let (_sc, sp) = start_sidecar_with(
        d,
        "sc",
        "frontend",
        "shop",
        &[addr(c.mesh)],
        &ep,
        tracing_cfg(http_port, "http", 1.0),
    );
    for p in [a.ops, c.ops, sp.ops] {
        wait_ready(p).await;
    }
    let cfg_url = format!("http://127.0.0.1:{}/config", sp.ops);
    wait_until(
        "the sidecar knows its group gateway",
        Duration::from_secs(20),
        || {
            let url = cfg_url.clone();
            async move {
                get_json(&url).await.unwrap_or_default()["tiers"]["group"]
                    .as_array()
                    .map(Vec::len)
                    == Some(1)
            }
        },
    )
    .await;
    let url = format!("http://127.0.0.1:{}/items", sp.app);

    // Two requests started at the sidecar (one of them meets the refused
    // endpoint first: round robin from a random start).
    let mut failed_over = None;
    for _ in 0..2 {
        let r = http_get(&url, &[("host", "orders")]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let seen: Value = serde_json::from_str(&r.body).unwrap();
        let (trace, backend_parent, flags) = ids(seen["headers"]["traceparent"].as_str().unwrap());
        assert_eq!(flags, "01");
        let got = trace_spans(&http_dir, &trace, 2).await;
        let sidecar = got
            .iter()
            .find(|s| s["name"] == "app orders")
            .expect("the sidecar's span");
        let gateway = got
            .iter()
            .find(|s| s["name"] == "mesh orders")
            .expect("the gateway's span");
        assert_eq!(
            sidecar["parent"], "",
            "the trace starts at the sidecar: {sidecar}"
        );
        assert_eq!(gateway["parent"], sidecar["span_id"], "{gateway}");
        assert_eq!(
            gateway["span_id"],
            backend_parent.as_str(),
            "the backend's parent is the gateway's span"
        );
        assert_eq!(sidecar["attributes"]["meshgate.tier"], "group");
        assert_eq!(gateway["attributes"]["http.response.status_code"], 200);
        assert_eq!(gateway["kind"], 2, "SPAN_KIND_SERVER");
        assert_eq!(sidecar["service"], "lite-sidecar/frontend");
        if !gateway["events"].as_array().unwrap().is_empty() {
            failed_over = Some(gateway.clone());
        }
    }
    let g = failed_over.expect("one request met the refused endpoint");
    assert_eq!(g["events"][0]["name"], "service member failed");
    assert_eq!(
        g["events"][0]["attributes"]["meshgate.outcome"],
        "upstream_connect_failed"
    );
    assert_eq!(
        g["events"][0]["attributes"]["meshgate.member"],
        format!("127.0.0.1:{dead}")
    );

    // An incoming trace flagged not sampled: no hop records it, and the
    // header reaches the backend as it was sent.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let r = http_get(&url, &[("host", "orders"), ("traceparent", unsampled)])
        .await
        .unwrap();
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["headers"]["traceparent"], unsampled);
    // An incoming sampled trace: the sidecar's span is its child. Sent
    // after the unsampled one by the same processes, it shows the queue
    // has carried everything before it.
    let sampled = "00-33333333333333333333333333333333-4444444444444444-01";
    let r = http_get(&url, &[("host", "orders"), ("traceparent", sampled)])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let got = trace_spans(&http_dir, "33333333333333333333333333333333", 2).await;
    let sidecar = got.iter().find(|s| s["name"] == "app orders").unwrap();
    assert_eq!(sidecar["parent"], "4444444444444444");
    assert!(spans(&http_dir)
        .iter()
        .all(|s| s["trace_id"] != "11111111111111111111111111111111"));

    // The group gateway dies: the sidecar's span records the tier it
    // left, and the central gateway's span arrives over gRPC.
    gw_a.kill();
    let r = http_get(&url, &[("host", "orders")]).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    let (trace, backend_parent, _) = ids(seen["headers"]["traceparent"].as_str().unwrap());
    let side = trace_spans(&http_dir, &trace, 1).await;
    let central = trace_spans(&grpc_dir, &trace, 1).await;
    assert_eq!(central[0]["protocol"], "grpc");
    assert_eq!(central[0]["parent"], side[0]["span_id"]);
    assert_eq!(central[0]["span_id"], backend_parent.as_str());
    assert_eq!(side[0]["attributes"]["meshgate.tier"], "central");
    let ev = &side[0]["events"][0];
    assert_eq!(ev["name"], "tier member failed", "{side:?}");
    assert_eq!(ev["attributes"]["meshgate.set"], "group");
    assert!(metric(sp.ops, "meshgate_trace_spans_exported_total").await >= 4.0);

    // A sidecar exports over HTTP only (it links no gRPC client): asked
    // for gRPC, it refuses to start, naming the field.
    let (mut refused, _) = start_sidecar_with(
        d,
        "sc-grpc",
        "frontend",
        "shop",
        &[],
        &ep,
        tracing_cfg(grpc_port, "grpc", 1.0),
    );
    wait_until(
        "the sidecar asked for gRPC export exits",
        Duration::from_secs(15),
        || {
            let running = refused.running();
            async move { !running }
        },
    )
    .await;
    assert!(
        refused
            .log_text()
            .contains("tracing.protocol: grpc is not offered"),
        "{}",
        refused.log_tail(20)
    );
}
