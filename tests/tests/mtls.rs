//! Mutual TLS on the sidecar → gateway hop, with real processes: a
//! gateway whose mesh listener requires a mesh certificate, a sidecar
//! presenting its SPIFFE identity, an echo backend that shows what arrived.
//! The caller's `x-mesh-source` comes from its certificate, never from the
//! request; clients without a certificate, with one from another CA, or in
//! plaintext are refused; a permissive listener takes plaintext too and
//! counts it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

const TRUST_DOMAIN: &str = "mesh.test";

/// Writes `leaf` as `<name>.crt` / `<name>.key` and the CA as `ca.pem` in
/// `dir`; returns the `mesh_tls` settings that use them.
fn identity(dir: &Path, ca: &TestCa, name: &str, spiffe: &str, mode: &str) -> serde_json::Value {
    let leaf = ca.leaf(&[spiffe]);
    std::fs::write(dir.join(format!("{name}.crt")), &leaf.cert).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &leaf.key).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    json!({
        "cert_file": dir.join(format!("{name}.crt")),
        "key_file": dir.join(format!("{name}.key")),
        "ca_file": dir.join("ca.pem"),
        "mode": mode,
    })
}

/// curl to the mesh listener as `name` (its `<name>.crt`/`.key`; none when
/// `None`), trusting `ca.pem`; returns (exit ok, stdout, stderr).
fn curl_mesh(
    dir: &Path,
    port: u16,
    cert: Option<&str>,
    headers: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-k"]);
    if let Some(name) = cert {
        cmd.arg("--cert").arg(dir.join(format!("{name}.crt")));
        cmd.arg("--key").arg(dir.join(format!("{name}.key")));
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}/whoami"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_to_gateway_is_mutual_tls_and_the_source_is_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let (_admin, base, token) = start_admin(d, &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let echo_port = free_port();
    let _echo = Proc::spawn(
        "echo",
        &bin("meshgate-echo"),
        &[
            "--listen".into(),
            addr(echo_port),
            "--name".into(),
            "orders".into(),
        ],
        d,
    );
    assert_eq!(admin.put("groups/shop", &json!({})).await.status, 201);
    let orders = json!({"group": "shop", "endpoints": [{"address": addr(echo_port)}]});
    assert_eq!(admin.put("services/orders", &orders).await.status, 201);
    let front = json!({"group": "shop", "destinations": [{"service": "orders"}]});
    assert_eq!(admin.put("services/front", &front).await.status, 201);

    let ca = TestCa::new("Mesh root");
    let gw_id = identity(
        d,
        &ca,
        "gw1",
        &format!("spiffe://{TRUST_DOMAIN}/gateway/gw1"),
        "strict",
    );
    let sc_id = identity(
        d,
        &ca,
        "front",
        &format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front"),
        "strict",
    );
    let (_gw, gw) = start_gateway_with(
        d,
        "gw1",
        &["egress"],
        &["shop"],
        &etcd.endpoint(),
        json!({"mesh_tls": gw_id}),
    );
    wait_ready(gw.ops).await;
    let (_sc, sc) = start_sidecar_with(
        d,
        "sc1",
        "front",
        "shop",
        &[],
        &etcd.endpoint(),
        json!({"mesh_tls": sc_id}),
    );
    wait_ready(sc.ops).await;

    // app → sidecar → (mTLS) → group gateway → orders. The app's forged
    // source does not survive: the sidecar sets its own, and the gateway
    // takes it from the sidecar's certificate.
    let url = format!("http://127.0.0.1:{}/whoami", sc.app);
    wait_until(
        "a call through the group tier over mTLS",
        Duration::from_secs(15),
        || {
            let url = url.clone();
            async move {
                matches!(http_get(&url, &[("host", "orders")]).await,
                Ok(r) if r.status == 200 && r.header("x-mesh-tier") == Some("group"))
            }
        },
    )
    .await;
    let r = http_get(
        &url,
        &[("host", "orders"), ("x-mesh-source", "admin-console")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-mesh-tier"), Some("group"));
    assert_eq!(r.json()["headers"]["x-mesh-source"], "front", "{}", r.body);
    let handshakes = "meshgate_tls_handshakes_total{listener=\"mesh\",result=\"ok\"}";
    assert!(metric(gw.ops, handshakes).await >= 1.0);
    let expiry = metric(sc.ops, "meshgate_identity_cert_expiry_timestamp_seconds").await;
    assert!(expiry > meshgate_config::tls::now_unix() as f64, "{expiry}");

    // Another workload of the mesh calling the gateway directly with its
    // own certificate: its source is its certificate's service, whatever
    // it claims.
    identity(
        d,
        &ca,
        "intruder",
        &format!("spiffe://{TRUST_DOMAIN}/group/shop/service/intruder"),
        "strict",
    );
    let (ok, out, err) = curl_mesh(
        d,
        gw.mesh,
        Some("intruder"),
        &["x-mesh-service: orders", "x-mesh-source: front"],
    );
    assert!(ok, "{err}");
    let seen: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(seen["headers"]["x-mesh-source"], "intruder", "{out}");

    // No certificate, one from another CA, or plaintext: refused.
    let (ok, out, _) = curl_mesh(d, gw.mesh, None, &["x-mesh-service: orders"]);
    assert!(
        !ok && !out.contains("orders"),
        "no client certificate was served: {out}"
    );
    let other = TestCa::new("Another root");
    let other_dir = d.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    identity(
        &other_dir,
        &other,
        "front",
        &format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front"),
        "strict",
    );
    let (ok, out, _) = curl_mesh(
        &other_dir,
        gw.mesh,
        Some("front"),
        &["x-mesh-service: orders"],
    );
    assert!(
        !ok && !out.contains("orders"),
        "a certificate of another CA was served: {out}"
    );
    let plain = raw_exchange(
        gw.mesh,
        b"GET /whoami HTTP/1.1\r\nHost: orders\r\nx-mesh-service: orders\r\n\r\n",
    )
    .await;
    assert!(!plain.contains("200 OK"), "plaintext was served: {plain:?}");
    let failed = "meshgate_tls_handshakes_total{listener=\"mesh\",result=\"failed\"}";
    assert!(metric(gw.ops, failed).await >= 3.0);

    // The sidecar still gets through: a refused client costs only its own
    // connection.
    let r = http_get(&url, &[("host", "orders")]).await.unwrap();
    assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_mesh_listener_takes_plaintext_too_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let echo_port = free_port();
    let _echo = Proc::spawn(
        "echo",
        &bin("meshgate-echo"),
        &[
            "--listen".into(),
            addr(echo_port),
            "--name".into(),
            "orders".into(),
        ],
        d,
    );
    let ca = TestCa::new("Mesh root");
    let gw_id = identity(
        d,
        &ca,
        "gw1",
        &format!("spiffe://{TRUST_DOMAIN}/gateway/gw1"),
        "permissive",
    );
    identity(
        d,
        &ca,
        "front",
        &format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front"),
        "strict",
    );
    let etcd = Etcd::start(d).await;
    let mut c = etcd.client().await;
    c.put(
        "/meshgate/v1/services/orders",
        json!({"endpoints": [{"address": addr(echo_port)}]}).to_string(),
        None,
    )
    .await
    .unwrap();
    let (_gw, gw) = start_gateway_with(
        d,
        "gw1",
        &["central"],
        &[],
        &etcd.endpoint(),
        json!({"mesh_tls": gw_id}),
    );
    wait_ready(gw.ops).await;
    // Plaintext: served, counted.
    let r = http_get(
        &format!("http://127.0.0.1:{}/whoami", gw.mesh),
        &[("x-mesh-service", "orders"), ("x-mesh-source", "legacy")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-mesh-source"], "legacy");
    let plaintext = "meshgate_tls_handshakes_total{listener=\"mesh\",result=\"plaintext\"}";
    assert!(metric(gw.ops, plaintext).await >= 1.0);
    // TLS with a certificate: the source from the certificate.
    let (ok, out, err) = curl_mesh(
        d,
        gw.mesh,
        Some("front"),
        &["x-mesh-service: orders", "x-mesh-source: legacy"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"x-mesh-source\":\"front\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_authorized_by_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let (_admin, base, token) = start_admin(d, &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let echo_port = free_port();
    let _echo = Proc::spawn(
        "echo",
        &bin("meshgate-echo"),
        &[
            "--listen".into(),
            addr(echo_port),
            "--name".into(),
            "backend".into(),
        ],
        d,
    );
    let echo = json!([{"address": addr(echo_port)}]);
    for (path, body) in [
        ("groups/shop", json!({})),
        ("groups/vault", json!({"authorization": "deny"})),
        (
            "services/orders",
            json!({"group": "shop", "endpoints": echo, "allowed_callers": ["group/shop/service/front"]}),
        ),
        (
            "services/ledger",
            json!({"group": "vault", "endpoints": echo}),
        ),
        (
            "services/front",
            json!({"group": "shop", "destinations": [{"service": "orders"}, {"service": "ledger"}]}),
        ),
    ] {
        let r = admin.put(path, &body).await;
        assert_eq!(r.status, 201, "{path}: {r:?}");
    }
    // A bad rule is refused with its field.
    let r = admin
        .put("services/bad", &json!({"allowed_callers": ["group/shop"]}))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["field"], "allowed_callers[0]");

    let ca = TestCa::new("Mesh root");
    let gw_id = identity(
        d,
        &ca,
        "gw1",
        &format!("spiffe://{TRUST_DOMAIN}/gateway/gw1"),
        "strict",
    );
    let sc_id = identity(
        d,
        &ca,
        "front",
        &format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front"),
        "strict",
    );
    identity(
        d,
        &ca,
        "intruder",
        &format!("spiffe://{TRUST_DOMAIN}/group/shop/service/intruder"),
        "strict",
    );
    let (_gw, gw) = start_gateway_with(
        d,
        "gw1",
        &["egress", "central"],
        &["shop"],
        &etcd.endpoint(),
        json!({"mesh_tls": gw_id}),
    );
    wait_ready(gw.ops).await;
    // The same gateway is the sidecar's central tier too: a refusal must
    // not be carried there.
    let (_sc, sc) = start_sidecar_with(
        d,
        "sc1",
        "front",
        "shop",
        &[addr(gw.mesh)],
        &etcd.endpoint(),
        json!({"mesh_tls": sc_id}),
    );
    wait_ready(sc.ops).await;
    let url = format!("http://127.0.0.1:{}/", sc.app);

    // front may call orders.
    wait_until(
        "front calls orders through the group tier",
        Duration::from_secs(15),
        || {
            let url = url.clone();
            async move {
                matches!(http_get(&url, &[("host", "orders")]).await,
                Ok(r) if r.status == 200 && r.header("x-mesh-tier") == Some("group"))
            }
        },
    )
    .await;
    // ledger's group denies by default: 403 from the group tier, not
    // retried at central.
    let requests_before = metric(gw.ops, "meshgate_authz_denied_total{service=\"ledger\"}").await;
    let r = http_get(&url, &[("host", "ledger")]).await.unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("forbidden"));
    assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
    assert_eq!(
        metric(gw.ops, "meshgate_authz_denied_total{service=\"ledger\"}").await,
        requests_before + 1.0,
        "refused once: no other tier tried it"
    );
    // Another service of the group is not in orders' list, whatever
    // source it claims.
    let (ok, out, err) = curl_mesh(
        d,
        gw.mesh,
        Some("intruder"),
        &["x-mesh-service: orders", "x-mesh-source: front"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"error\":\"forbidden\""), "{out}");
    assert!(
        out.contains("service intruder may not call service orders"),
        "{out}"
    );
    // A gRPC caller gets PERMISSION_DENIED.
    let out = Command::new("curl")
        .args(["-sS", "-k", "-i", "--http2", "--max-time", "10"])
        .arg("--cert")
        .arg(d.join("intruder.crt"))
        .arg("--key")
        .arg(d.join("intruder.key"))
        .args([
            "-H",
            "x-mesh-service: orders",
            "-H",
            "content-type: application/grpc",
            "-X",
            "POST",
        ])
        .arg(format!("https://127.0.0.1:{}/echo.Echo/Say", gw.mesh))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("grpc-status: 7"), "{text}");
    assert!(metric(gw.ops, "meshgate_authz_denied_total{service=\"orders\"}").await >= 2.0);

    // Opening orders to the whole group lets the intruder in, live.
    let open =
        json!({"group": "shop", "endpoints": echo, "allowed_callers": ["group/shop/service/*"]});
    assert_eq!(
        admin.put("services/orders?wait=10s", &open).await.status,
        200
    );
    let (ok, out, err) = curl_mesh(d, gw.mesh, Some("intruder"), &["x-mesh-service: orders"]);
    assert!(
        ok && out.contains("\"x-mesh-source\":\"intruder\""),
        "{out} {err}"
    );
}
