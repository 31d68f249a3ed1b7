//! Mutual TLS on every mesh hop (sidecar → gateway, gateway → the
//! destination sidecar's inbound), with real processes: a
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
    // Replaced whole: a running process may be reading the bundle.
    let tmp = dir.join(".ca.pem.tmp");
    std::fs::write(&tmp, &ca.pem).unwrap();
    std::fs::rename(&tmp, dir.join("ca.pem")).unwrap();
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
    let (_echo, echo_port) = start_echo(d, "orders");
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
    wait_for_group_tier(
        "a call through the group tier over mTLS",
        &url,
        Duration::from_secs(15),
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
    // Who each process is, and when its certificate expires: /readyz and
    // the admin's /status.
    let rz = get_json(&format!("http://127.0.0.1:{}/readyz", sc.ops))
        .await
        .unwrap();
    assert_eq!(
        rz["identity"]["id"],
        format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front"),
        "{rz}"
    );
    assert!(
        rz["identity"]["expires_in_s"].as_i64().unwrap() > 3600,
        "{rz}"
    );
    wait_until(
        "/status shows both identities",
        Duration::from_secs(10),
        || async {
            let st = admin.get("status").await.json();
            let ids: Vec<String> = st["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["identity"]["id"].as_str().map(str::to_string))
                .collect();
            ids.contains(&format!("spiffe://{TRUST_DOMAIN}/gateway/gw1"))
                && ids.contains(&format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front"))
        },
    )
    .await;
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
    // Expired or not yet valid: refused, with a clear log line.
    for (name, from, to, why) in [
        ("expired", -7200, -3600, "certificate expired"),
        ("early", 3600, 7200, "certificate not valid yet"),
    ] {
        let leaf = ca.leaf_valid(
            &[&format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front")],
            from,
            to,
        );
        std::fs::write(d.join(format!("{name}.crt")), &leaf.cert).unwrap();
        std::fs::write(d.join(format!("{name}.key")), &leaf.key).unwrap();
        let (ok, out, _) = curl_mesh(d, gw.mesh, Some(name), &["x-mesh-service: orders"]);
        assert!(!ok && !out.contains("orders"), "{name}: {out}");
        wait_until(
            &format!("the gateway logs the {name} certificate"),
            Duration::from_secs(5),
            || {
                let log = std::fs::read_to_string(d.join("gw1.log")).unwrap_or_default();
                async move {
                    log.lines().any(|l| {
                        l.contains("TLS handshake refused: the client's certificate")
                            && l.contains(why)
                    })
                }
            },
        )
        .await;
    }
    let failed = "meshgate_tls_handshakes_total{listener=\"mesh\",result=\"failed\"}";
    assert!(metric(gw.ops, failed).await >= 5.0);

    // The sidecar still gets through: a refused client costs only its own
    // connection.
    let r = http_get(&url, &[("host", "orders")]).await.unwrap();
    assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_mesh_listener_takes_plaintext_too_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_echo, echo_port) = start_echo(d, "orders");
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
    let (_echo, echo_port) = start_echo(d, "backend");
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
    wait_for_group_tier(
        "front calls orders through the group tier",
        &url,
        Duration::from_secs(15),
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

/// Writes a new leaf for `spiffe` from `ca` as `<name>.crt`/`.key`, each
/// file replaced whole (the processes may read them at any moment).
fn renew(dir: &Path, ca: &TestCa, name: &str, spiffe: &str, lifetime: Duration) {
    let leaf = ca.leaf_for(&[spiffe], lifetime);
    for (ext, text) in [("key", &leaf.key), ("crt", &leaf.cert)] {
        let tmp = dir.join(format!(".{name}.{ext}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }
}

fn write_bundle(dir: &Path, roots: &[&TestCa]) {
    let tmp = dir.join(".ca.pem.tmp");
    let pem: String = roots.iter().map(|r| r.pem.as_str()).collect();
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, dir.join("ca.pem")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_renew_and_the_trust_bundle_rotates_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let (_echo, echo_port) = start_echo(d, "orders");
    shop_calls_orders(&etcd, echo_port).await;
    // Certificates live 4 s and are renewed every second: every one the
    // processes started with expires during the run.
    let lifetime = Duration::from_secs(4);
    let old_root = TestCa::new("Mesh root 1");
    let gw_spiffe = format!("spiffe://{TRUST_DOMAIN}/gateway/gw1");
    let sc_spiffe = format!("spiffe://{TRUST_DOMAIN}/group/shop/service/front");
    let settings = |name: &str| {
        json!({
            "cert_file": d.join(format!("{name}.crt")),
            "key_file": d.join(format!("{name}.key")),
            "ca_file": d.join("ca.pem"),
            "reload_interval_ms": 200,
        })
    };
    write_bundle(d, &[&old_root]);
    renew(d, &old_root, "gw1", &gw_spiffe, lifetime);
    renew(d, &old_root, "front", &sc_spiffe, lifetime);
    let (_gw, gw) = start_gateway_with(
        d,
        "gw1",
        &["egress"],
        &["shop"],
        &etcd.endpoint(),
        json!({"mesh_tls": settings("gw1")}),
    );
    wait_ready(gw.ops).await;
    let (sc_proc, sc) = start_sidecar_with(
        d,
        "sc1",
        "front",
        "shop",
        &[],
        &etcd.endpoint(),
        json!({"mesh_tls": settings("front")}),
    );
    wait_ready(sc.ops).await;
    let url = format!("http://127.0.0.1:{}/", sc.app);
    wait_for_group_tier("the group tier over mTLS", &url, Duration::from_secs(15)).await;
    let first = served_fingerprint(gw.mesh);
    let record_expiry = || async {
        let mut c = etcd.client().await;
        let r = c.get("/meshgate/v1/nodes/gateway/gw1", None).await.unwrap();
        let node: serde_json::Value = serde_json::from_slice(r.kvs()[0].value()).unwrap();
        node["identity"]["expires_at_ms"].as_u64().unwrap_or(0)
    };
    let first_expiry = record_expiry().await;
    assert!(first_expiry > 0, "the node record names the identity");

    // Steady load through the sidecar for the whole run.
    let load = tokio::process::Command::new(bin("meshgate-load"))
        .args([
            "--json",
            "-c",
            "8",
            "-r",
            "200",
            "-d",
            "16",
            "-H",
            "host: orders",
            &url,
        ])
        .output();
    let rotate = async {
        let started = std::time::Instant::now();
        let new_root = TestCa::new("Mesh root 2");
        while started.elapsed() < Duration::from_secs(15) {
            // Seconds 0-4: renewals from the old root; 5-9: both roots
            // trusted, certificates from the new root from second 7; 10-14:
            // the old root removed.
            let secs = started.elapsed().as_secs();
            let bundle: &[&TestCa] = match secs {
                0..=4 => &[&old_root],
                5..=9 => &[&old_root, &new_root],
                _ => &[&new_root],
            };
            write_bundle(d, bundle);
            let issuer = if secs >= 7 { &new_root } else { &old_root };
            renew(d, issuer, "gw1", &gw_spiffe, lifetime);
            renew(d, issuer, "front", &sc_spiffe, lifetime);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    };
    let (out, ()) = tokio::join!(load, rotate);
    let out = out.unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["ok"].as_u64().unwrap() > 1000, "{report}");
    assert_eq!(
        report["errors"],
        json!({}),
        "failures: {}; sidecar log:\n{}",
        report["failures"],
        sc_proc.log_tail(30)
    );
    // The gateway serves a renewed certificate, and both renewed many times;
    // the node record (and so the admin's /status) follows.
    assert_ne!(served_fingerprint(gw.mesh), first);
    wait_until(
        "the node record shows the renewed expiry",
        Duration::from_secs(5),
        || async { record_expiry().await >= first_expiry + 5_000 },
    )
    .await;
    let gw_log = std::fs::read_to_string(d.join("gw1.log")).unwrap();
    assert!(
        gw_log.matches("mesh identity renewed").count() >= 10,
        "{gw_log}"
    );
    assert!(sc_proc.log_text().matches("mesh identity renewed").count() >= 10);
    // After the old root left the bundle, a new handshake with a
    // certificate from it is refused.
    renew(d, &old_root, "stale", &sc_spiffe, lifetime);
    let (ok, out, _) = curl_mesh(d, gw.mesh, Some("stale"), &["x-mesh-service: orders"]);
    assert!(!ok && !out.contains("orders"), "{out}");
    // ...and the sidecar's fresh handshakes (its member checks) go on.
    let r = http_get(&url, &[("host", "orders")]).await.unwrap();
    assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
}

/// The fingerprint of the certificate a mesh listener serves now.
fn served_fingerprint(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text.find("-----END CERTIFICATE-----").unwrap() + 25;
    let chain = meshgate_config::tls::parse_chain(&text[start..end]).unwrap();
    meshgate_config::tls::fingerprint(&chain[0])
}

/// etcd stops; a sidecar and a gateway restarted during the outage come
/// back from their snapshot files and their stored identities and go on
/// serving over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_restarted_during_an_etcd_outage_keep_their_identity() {
    let mut m = Mesh::start_with(true).await;
    let seen = served_by(&m.app_url("/x"), &[("host", "orders")], 10).await;
    assert_eq!(seen.values().sum::<usize>(), 10);
    let dir = m.dir.path().to_path_buf();
    wait_until("snapshot files written", Duration::from_secs(10), || {
        let dir = dir.clone();
        async move {
            ["gw-a", "gw-b", "gw-c", "sc-1"]
                .iter()
                .all(|id| dir.join(format!("{id}.snapshot.json")).exists())
        }
    })
    .await;

    m.etcd.stop();
    // Restart a group gateway and the sidecar while etcd is down.
    let gw_a = m.gws[0].1;
    m.gws[0].0.term(Duration::from_secs(10));
    m.gws[0].0.start();
    wait_ready(gw_a.ops).await;
    let sc = m.sidecar.1;
    m.sidecar.0.term(Duration::from_secs(10));
    m.sidecar.0.start();
    wait_for_group_tier(
        "the restarted sidecar serves",
        &m.app_url("/x"),
        Duration::from_secs(20),
    )
    .await;
    let rz = get_json(&format!("http://127.0.0.1:{}/readyz", sc.ops))
        .await
        .unwrap();
    assert_eq!(
        rz["identity"]["id"], "spiffe://mesh.test/group/shop/service/frontend",
        "{rz}"
    );
    assert_eq!(rz["store_connected"], false, "{rz}");
    // Every call goes through, over the group tier (both gateways, one of
    // them restarted), with mutual TLS.
    let mut tiers = std::collections::HashMap::new();
    for _ in 0..40 {
        let r = http_get(&m.app_url("/x"), &[("host", "orders")])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        *tiers
            .entry(r.header("x-mesh-tier").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(tiers.get("group"), Some(&40), "{tiers:?}");
    let ok = "meshgate_tls_handshakes_total{listener=\"mesh\",result=\"ok\"}";
    assert!(
        metric(gw_a.ops, ok).await >= 1.0,
        "the restarted gateway took mTLS handshakes"
    );
}

/// `meshctl ca init` and `meshctl ca issue` make the identities a gateway
/// and a sidecar run the mutual-TLS hop on (leaf and issuer chain to the
/// root in the bundle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_from_meshctl_ca_carry_the_mesh_hop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meshctl = |args: &[&str]| {
        let out = Command::new(bin("meshctl")).args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "meshctl {args:?}: {text}");
        text
    };
    let ca = d.join("ca");
    let ca_s = ca.to_str().unwrap();
    meshctl(&["ca", "init", "--trust-domain", "prod.mesh", "--out", ca_s]);
    let gw_out = d.join("gw1");
    let sc_out = d.join("front");
    let text = meshctl(&[
        "ca",
        "issue",
        "--dir",
        ca_s,
        "--gateway",
        "gw1",
        "--out",
        gw_out.to_str().unwrap(),
    ]);
    assert!(text.contains("spiffe://prod.mesh/gateway/gw1"), "{text}");
    meshctl(&[
        "ca",
        "issue",
        "--dir",
        ca_s,
        "--service",
        "front",
        "--group",
        "shop",
        "--hours",
        "1",
        "--out",
        sc_out.to_str().unwrap(),
    ]);
    let settings = |prefix: &Path| {
        json!({"mesh_tls": {
            "cert_file": format!("{}.crt", prefix.display()),
            "key_file": format!("{}.key", prefix.display()),
            "ca_file": ca.join("bundle.pem"),
        }})
    };

    let etcd = Etcd::start(d).await;
    let (_echo, echo_port) = start_echo(d, "orders");
    shop_calls_orders(&etcd, echo_port).await;
    let (_gw, gw) = start_gateway_with(
        d,
        "gw1",
        &["egress"],
        &["shop"],
        &etcd.endpoint(),
        settings(&gw_out),
    );
    wait_ready(gw.ops).await;
    let (_sc, sc) = start_sidecar_with(
        d,
        "sc1",
        "front",
        "shop",
        &[],
        &etcd.endpoint(),
        settings(&sc_out),
    );
    wait_ready(sc.ops).await;
    let url = format!("http://127.0.0.1:{}/", sc.app);
    wait_until("the group tier over mTLS", Duration::from_secs(15), || {
        let url = url.clone();
        async move {
            matches!(http_get(&url, &[("host", "orders")]).await,
                Ok(r) if r.status == 200 && r.header("x-mesh-tier") == Some("group")
                    && r.json()["headers"]["x-mesh-source"] == "front")
        }
    })
    .await;
    let rz = get_json(&format!("http://127.0.0.1:{}/readyz", gw.ops))
        .await
        .unwrap();
    assert_eq!(
        rz["identity"]["id"], "spiffe://prod.mesh/gateway/gw1",
        "{rz}"
    );
}

/// Puts into etcd directly: group shop, orders (at the echo backend), and
/// front, which calls orders.
async fn shop_calls_orders(etcd: &Etcd, echo_port: u16) {
    let mut c = etcd.client().await;
    for (key, value) in [
        ("groups/shop", json!({})),
        (
            "services/orders",
            json!({"group": "shop", "endpoints": [{"address": addr(echo_port)}]}),
        ),
        (
            "services/front",
            json!({"group": "shop", "destinations": [{"service": "orders"}]}),
        ),
    ] {
        c.put(format!("/meshgate/v1/{key}"), value.to_string(), None)
            .await
            .unwrap();
    }
}

/// Waits until a call of orders through the sidecar at `url` is served by
/// the group tier.
async fn wait_for_group_tier(what: &str, url: &str, deadline: Duration) {
    wait_until(what, deadline, || async move {
        matches!(http_get(url, &[("host", "orders")]).await,
            Ok(r) if r.status == 200 && r.header("x-mesh-tier") == Some("group"))
    })
    .await;
}

/// The gateway → destination hop: a sidecar's inbound listener terminates
/// mutual TLS for its app (on loopback), authorizes the caller, and is
/// what the instance registers; gateways call it with their identity
/// and check that it is an instance of the service they meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_sidecar_inbound_is_mutual_tls_and_authorizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(d).await;
    let (_admin, base, token) = start_admin(d, &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    // The orders app listens on loopback only; its sidecar's inbound is
    // the way in.
    let (_echo, app_port) = start_echo(d, "orders-app");
    let inbound = free_port();
    let orders = json!({"group": "shop", "mtls": "strict",
        "allowed_callers": ["group/shop/service/front"]});
    for (path, body) in [
        ("groups/shop", json!({})),
        ("services/orders", orders.clone()),
        (
            "services/front",
            json!({"group": "shop", "destinations": [{"service": "orders"}]}),
        ),
        // Another service whose only endpoint is, wrongly, orders' inbound.
        (
            "services/payments",
            json!({"group": "shop", "mtls": "strict", "endpoints": [{"address": addr(inbound)}]}),
        ),
    ] {
        let r = admin.put(path, &body).await;
        assert_eq!(r.status, 201, "{path}: {r:?}");
    }
    // mtls and tls together are refused, with the field.
    let r = admin
        .put(
            "services/bad",
            &json!({"mtls": "strict", "tls": {"sni": "bad.example"}}),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["field"], "mtls");

    let ca = TestCa::new("Mesh root");
    let spiffe = |path: &str| format!("spiffe://{TRUST_DOMAIN}/{path}");
    let gw_id = identity(d, &ca, "gw1", &spiffe("gateway/gw1"), "strict");
    let front_id = identity(
        d,
        &ca,
        "front",
        &spiffe("group/shop/service/front"),
        "strict",
    );
    let orders_id = identity(
        d,
        &ca,
        "orders",
        &spiffe("group/shop/service/orders"),
        "strict",
    );
    identity(
        d,
        &ca,
        "intruder",
        &spiffe("group/shop/service/intruder"),
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
    let (_so, so) = start_sidecar_with(
        d,
        "sc-orders",
        "orders",
        "shop",
        &[],
        &etcd.endpoint(),
        json!({
            "mesh_tls": orders_id,
            "app": {"address": addr(app_port)},
            "inbound": {"listen": addr(inbound)},
        }),
    );
    wait_ready(so.ops).await;
    let (_sf, sf) = start_sidecar_with(
        d,
        "sc-front",
        "front",
        "shop",
        &[],
        &etcd.endpoint(),
        json!({"mesh_tls": front_id}),
    );
    wait_ready(sf.ops).await;

    // The instance is registered at the inbound, not at the app.
    wait_until(
        "orders' instance registered at its inbound",
        Duration::from_secs(15),
        || async {
            let mut c = etcd.client().await;
            let r = c
                .get("/meshgate/v1/instances/orders/sc-orders", None)
                .await
                .unwrap();
            r.kvs().first().is_some_and(|kv| {
                serde_json::from_slice::<serde_json::Value>(kv.value()).unwrap()["address"]
                    == addr(inbound)
            })
        },
    )
    .await;
    // front → sidecar → (mTLS) gateway → (mTLS) orders' inbound → app.
    let url = format!("http://127.0.0.1:{}/whoami", sf.app);
    wait_for_group_tier("front calls orders", &url, Duration::from_secs(15)).await;
    let forged = spiffe("group/shop/service/intruder");
    let r = http_get(&url, &[("host", "orders"), ("x-mesh-caller", &forged)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.json();
    assert_eq!(seen["headers"]["x-mesh-source"], "front", "{}", r.body);
    assert_eq!(
        seen["headers"]["x-mesh-caller"],
        spiffe("group/shop/service/front"),
        "the caller the gateway verified, not the forged one: {}",
        r.body
    );
    let ok_inbound = "meshgate_tls_handshakes_total{listener=\"inbound\",result=\"ok\"}";
    assert!(metric(so.ops, ok_inbound).await >= 1.0);

    // At the inbound itself: no certificate, another CA's, or plaintext
    // are refused at the handshake.
    let (ok, out, _) = curl_mesh(d, inbound, None, &[]);
    assert!(!ok && !out.contains("orders-app"), "no certificate: {out}");
    let other = TestCa::new("Another root");
    let other_dir = d.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    identity(
        &other_dir,
        &other,
        "front",
        &spiffe("group/shop/service/front"),
        "strict",
    );
    let (ok, out, _) = curl_mesh(&other_dir, inbound, Some("front"), &[]);
    assert!(!ok && !out.contains("orders-app"), "another CA: {out}");
    let plain = raw_exchange(inbound, b"GET /whoami HTTP/1.1\r\nHost: orders\r\n\r\n").await;
    assert!(!plain.contains("200 OK"), "plaintext was served: {plain:?}");
    // A mesh workload not in the list is refused by the inbound; a
    // gateway vouches for its caller (`x-mesh-caller`), and that caller
    // is what is judged.
    let (ok, out, err) = curl_mesh(
        d,
        inbound,
        Some("intruder"),
        &["x-mesh-caller: spiffe://mesh.test/group/shop/service/front"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"error\":\"forbidden\""), "{out}");
    assert!(
        out.contains("service intruder may not call service orders"),
        "{out}"
    );
    let vouched = format!("x-mesh-caller: {}", spiffe("group/shop/service/front"));
    let (ok, out, err) = curl_mesh(d, inbound, Some("gw1"), &[&vouched]);
    assert!(ok && out.contains("orders-app"), "{out} {err}");
    let (ok, out, _) = curl_mesh(
        d,
        inbound,
        Some("gw1"),
        &["x-mesh-caller: spiffe://mesh.test/group/shop/service/intruder"],
    );
    assert!(ok && out.contains("\"error\":\"forbidden\""), "{out}");
    assert!(metric(so.ops, "meshgate_authz_denied_total{service=\"orders\"}").await >= 2.0);

    // A gateway checks that the instance is one of the service it calls:
    // payments' endpoint presents orders' identity.
    let (ok, out, err) = curl_mesh(d, gw.mesh, Some("front"), &["x-mesh-service: payments"]);
    assert!(ok, "{err}");
    assert!(!out.contains("orders-app"), "{out}");
    assert!(out.contains("not an instance of service payments"), "{out}");

    // Direct mode: front's sidecar calls orders' inbound itself, with its
    // own identity.
    let direct =
        json!({"group": "shop", "destinations": [{"service": "orders", "mode": "direct"}]});
    assert_eq!(
        admin.put("services/front?wait=10s", &direct).await.status,
        200
    );
    wait_until(
        "front calls orders directly",
        Duration::from_secs(15),
        || {
            let url = url.clone();
            async move {
                matches!(http_get(&url, &[("host", "orders")]).await,
                Ok(r) if r.status == 200 && r.header("x-mesh-tier") == Some("direct")
                    && r.json()["headers"]["x-mesh-caller"] == spiffe("group/shop/service/front"))
            }
        },
    )
    .await;

    // Permissive: the inbound takes plaintext too, and counts it.
    let mut open = orders.clone();
    open["mtls"] = json!("permissive");
    open.as_object_mut().unwrap().remove("allowed_callers");
    assert_eq!(
        admin.put("services/orders?wait=10s", &open).await.status,
        200
    );
    let plaintext = "meshgate_tls_handshakes_total{listener=\"inbound\",result=\"plaintext\"}";
    wait_until(
        "the inbound takes plaintext",
        Duration::from_secs(10),
        || async {
            let req = b"GET /whoami HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
            raw_exchange(inbound, req).await.contains("orders-app")
        },
    )
    .await;
    assert!(metric(so.ops, plaintext).await >= 1.0);
    let r = http_get(&url, &[("host", "orders")]).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

/// Identities issued by the admin: `meshctl ca init` lays out the CA, the
/// admin (over TLS) holds the issuer's key, `meshctl token create` makes
/// a join token per node; each node generates its key, obtains its
/// certificate with the token, renews it at half-life with the
/// certificate itself, keeps it beside its snapshot, and comes back with
/// it when restarted while the admin and etcd are down. Deleting an
/// identity's token stops its renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_issues_identities_that_renew_and_outlive_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut etcd = Etcd::start(d).await;
    let (_echo, echo_port) = start_echo(d, "orders");
    shop_calls_orders(&etcd, echo_port).await;
    let ca_dir = d.join("ca");
    let out = Command::new(bin("meshctl"))
        .args(["ca", "init", "--trust-domain", "mesh.test", "--out"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The admin API's own certificate, from another CA.
    let web = TestCa::new("Admin API root");
    let leaf = web.leaf(&["127.0.0.1"]);
    std::fs::write(d.join("admin.crt"), &leaf.cert).unwrap();
    std::fs::write(d.join("admin.key"), &leaf.key).unwrap();
    std::fs::write(d.join("admin-ca.pem"), &web.pem).unwrap();
    let admin_ca = d.join("admin-ca.pem");
    let admin_port = free_port();
    let server = format!("https://127.0.0.1:{admin_port}");
    let start_admin_ca = |lifetime_s: u64| {
        start_admin_with(
            d,
            &etcd.endpoint(),
            json!({
                "listen": addr(admin_port),
                "tls": {"cert_file": d.join("admin.crt"), "key_file": d.join("admin.key")},
                "ca": {"dir": ca_dir, "lifetime_s": lifetime_s},
            }),
        )
    };
    // Certificates of 6 s: renewed every 3 s.
    let (admin, _, token) = start_admin_ca(6);
    let ctl = |args: &[&str]| meshctl(&server, &token, Some(&admin_ca), args);
    wait_until(
        "the admin answers over TLS",
        Duration::from_secs(20),
        || async { ctl(&["token", "list"]).0 },
    )
    .await;
    let join = |name: &str, args: &[&str]| {
        let (ok, out) = ctl(&[&["token", "create"][..], args].concat());
        assert!(ok, "{out}");
        let file = d.join(format!("{name}.token"));
        std::fs::write(&file, out.trim()).unwrap();
        file
    };
    let gw_token = join("gw1", &["--gateway", "gw1"]);
    let front_token = join("front", &["--service", "front", "--group", "shop"]);
    let issued = |name: &str, token: &Path| {
        json!({
            "cert_file": d.join(format!("{name}.identity.crt")),
            "key_file": d.join(format!("{name}.identity.key")),
            "ca_file": d.join(format!("{name}.bundle.pem")),
            "issuer": {"admin": server, "admin_ca_file": admin_ca, "token_file": token},
        })
    };
    // Only the token's hash is kept: no listing shows it.
    let (ok, listed) = ctl(&["-o", "json", "token", "list"]);
    assert!(ok, "{listed}");
    let secret = std::fs::read_to_string(&front_token).unwrap();
    let secret = secret.split_once('.').unwrap().1;
    assert!(
        listed.contains("group/shop/service/front") && !listed.contains(secret),
        "{listed}"
    );
    // A node with a wrong token gets no identity, and says why.
    std::fs::write(d.join("bad.token"), "0123.abcd").unwrap();
    let bad_cfg = json!({"mesh_tls": issued("bad", &d.join("bad.token"))});
    let (mut bad, _) =
        start_gateway_with(d, "bad", &["egress"], &["shop"], &etcd.endpoint(), bad_cfg);
    wait_until(
        "the node without an identity stops",
        Duration::from_secs(20),
        || {
            let stopped = !bad.running();
            async move { stopped }
        },
    )
    .await;
    assert!(
        bad.log_text().contains("unknown or revoked join token"),
        "{}",
        bad.log_tail(10)
    );
    assert!(!d.join("bad.identity.key").exists());

    let (gw_proc, gw) = start_gateway_with(
        d,
        "gw1",
        &["egress"],
        &["shop"],
        &etcd.endpoint(),
        json!({"mesh_tls": issued("gw1", &gw_token)}),
    );
    wait_ready(gw.ops).await;
    let (mut sc_proc, sc) = start_sidecar_with(
        d,
        "sc1",
        "front",
        "shop",
        &[],
        &etcd.endpoint(),
        json!({"mesh_tls": issued("front", &front_token)}),
    );
    wait_ready(sc.ops).await;
    let url = format!("http://127.0.0.1:{}/", sc.app);
    wait_for_group_tier(
        "the group tier over issued identities",
        &url,
        Duration::from_secs(15),
    )
    .await;
    use std::os::unix::fs::PermissionsExt;
    for name in ["gw1", "front"] {
        let key = d.join(format!("{name}.identity.key"));
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let rz = get_json(&format!("http://127.0.0.1:{}/readyz", sc.ops))
        .await
        .unwrap();
    assert_eq!(
        rz["identity"]["id"], "spiffe://mesh.test/group/shop/service/front",
        "{rz}"
    );

    // Renewals under steady load: no request fails.
    let expiry = |ops: u16| async move {
        metric(ops, "meshgate_identity_cert_expiry_timestamp_seconds").await
    };
    let (gw_first, sc_first) = (expiry(gw.ops).await, expiry(sc.ops).await);
    let load = tokio::process::Command::new(bin("meshgate-load"))
        .args([
            "--json",
            "-c",
            "4",
            "-r",
            "100",
            "-d",
            "10",
            "-H",
            "host: orders",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
    assert!(report["ok"].as_u64().unwrap() > 500, "{report}");
    assert_eq!(
        report["errors"],
        json!({}),
        "{report}: {}",
        sc_proc.log_tail(20)
    );
    assert!(
        expiry(gw.ops).await >= gw_first + 6.0,
        "the gateway renewed: {}",
        gw_proc.log_tail(10)
    );
    assert!(
        expiry(sc.ops).await >= sc_first + 6.0,
        "the sidecar renewed: {}",
        sc_proc.log_tail(10)
    );
    assert!(sc_proc
        .log_text()
        .contains("mesh identity renewed by the admin"));

    // Deleting front's token stops its renewals; a new token for the
    // identity lets them go on.
    let old = std::fs::read_to_string(&front_token).unwrap();
    let (ok, out) = ctl(&["token", "delete", old.split_once('.').unwrap().0]);
    assert!(ok, "{out}");
    wait_until(
        "the sidecar's renewal is refused",
        Duration::from_secs(20),
        || {
            let refused = sc_proc.log_text().contains("has no join token any more");
            async move { refused }
        },
    )
    .await;
    join("front", &["--service", "front", "--group", "shop"]);
    wait_until(
        "the sidecar renews again",
        Duration::from_secs(20),
        || async { expiry(sc.ops).await > meshgate_config::tls::now_unix() as f64 + 2.0 },
    )
    .await;

    // Longer certificates from here on; then the admin and etcd go away
    // and the sidecar restarts: it comes back with its stored identity.
    drop(admin);
    let (admin, _, _) = start_admin_ca(3600);
    wait_until(
        "the sidecar holds an hour-long certificate",
        Duration::from_secs(20),
        || async { expiry(sc.ops).await > meshgate_config::tls::now_unix() as f64 + 600.0 },
    )
    .await;
    wait_until(
        "the gateway holds an hour-long certificate",
        Duration::from_secs(20),
        || async { expiry(gw.ops).await > meshgate_config::tls::now_unix() as f64 + 600.0 },
    )
    .await;
    let stored = std::fs::read_to_string(d.join("front.identity.crt")).unwrap();
    drop(admin);
    etcd.stop();
    sc_proc.term(Duration::from_secs(10));
    sc_proc.start();
    wait_for_group_tier(
        "the restarted sidecar serves",
        &url,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(d.join("front.identity.crt")).unwrap(),
        stored
    );
    let rz = get_json(&format!("http://127.0.0.1:{}/readyz", sc.ops))
        .await
        .unwrap();
    assert_eq!(
        rz["identity"]["id"], "spiffe://mesh.test/group/shop/service/front",
        "{rz}"
    );
    assert_eq!(rz["store_connected"], false, "{rz}");
    drop(gw_proc);
}
