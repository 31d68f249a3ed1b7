//! The control plane over TLS with authentication: a real etcd serving
//! TLS with its authentication on (a `meshgate` user allowed the
//! `/meshgate/` prefix only), the admin API serving TLS, `meshctl
//! --cacert` and curl as its clients, and a gateway reading its config
//! from that etcd. etcd's auth tokens expire within seconds here, so the
//! processes must authenticate again to go on.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshgate_tests::*;
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";

/// Turns etcd's authentication on, with a `meshgate` user that may read
/// and write `/meshgate/` and nothing else.
async fn enable_auth(etcd: &Etcd) {
    let mut c = etcd.client().await;
    c.user_add("root", "root-password", None).await.unwrap();
    let _ = c.role_add("root").await;
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("meshgate").await.unwrap();
    c.role_grant_permission(
        "meshgate",
        etcd_client::Permission::read_write("/meshgate/").with_prefix(),
    )
    .await
    .unwrap();
    c.user_add("meshgate", PASSWORD, None).await.unwrap();
    c.user_grant_role("meshgate", "meshgate").await.unwrap();
    c.auth_enable().await.unwrap();
}

/// The `store` section that reaches `etcd` over TLS as the meshgate user.
fn store(dir: &Path, etcd: &Etcd) -> serde_json::Value {
    std::fs::write(dir.join("ca.pem"), etcd.tls_ca.as_ref().unwrap()).unwrap();
    std::fs::write(dir.join("etcd-password"), format!("{PASSWORD}\n")).unwrap();
    json!({"etcd": {
        "endpoints": [etcd.endpoint()],
        "timeout_ms": 2000,
        "tls": {"ca_file": dir.join("ca.pem")},
        "user": "meshgate",
        "password_file": dir.join("etcd-password"),
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_etcd_over_tls_with_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("Control plane CA");
    // Tokens live 2 s: the processes outlive several.
    let etcd = Etcd::start_tls(d, &ca, &["--auth-token-ttl", "2"]).await;
    enable_auth(&etcd).await;

    // Without credentials etcd refuses; with the meshgate user, only its
    // prefix.
    let mut anonymous = etcd.client().await;
    assert!(anonymous
        .get("/meshgate/v1/services/x", None)
        .await
        .is_err());
    let mut user = etcd.client_as(Some(("meshgate", PASSWORD))).await.unwrap();
    assert!(user.get("/meshgate/v1/services/x", None).await.is_ok());
    assert!(user.put("/elsewhere", "x", None).await.is_err());

    // The admin API over TLS, on etcd over TLS with the user.
    let admin_leaf = ca.leaf(&["127.0.0.1"]);
    std::fs::write(d.join("admin.crt"), &admin_leaf.cert).unwrap();
    std::fs::write(d.join("admin.key"), &admin_leaf.key).unwrap();
    let (admin, base, token) = start_admin_with(
        d,
        &etcd.endpoint(),
        json!({
            "store": store(d, &etcd),
            "tls": {"cert_file": d.join("admin.crt"), "key_file": d.join("admin.key")},
        }),
    );
    let server = base.replace("http://", "https://");
    let ca_file = d.join("ca.pem");
    wait_until(
        "the admin API answers over TLS",
        Duration::from_secs(20),
        || {
            let (server, token, ca_file) = (server.clone(), token.clone(), ca_file.clone());
            async move { meshctl(&server, &token, Some(&ca_file), &["get", "services"]).0 }
        },
    )
    .await;

    // meshctl writes through it (into etcd over TLS, as the user).
    let backend = Backend::start("b1").await;
    let model = d.join("model.yaml");
    std::fs::write(
        &model,
        format!(
            "services:\n  web:\n    endpoints: [{{address: '{}'}}]\nroutes:\n  web:\n    scope: ingress\n    backends: [{{service: web}}]\n",
            backend.addr
        ),
    )
    .unwrap();
    let (ok, out) = meshctl(
        &server,
        &token,
        Some(&ca_file),
        &["apply", "-f", model.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    let (ok, out) = meshctl(
        &server,
        &token,
        Some(&ca_file),
        &["-o", "json", "get", "services", "web"],
    );
    assert!(ok && out.contains(&backend.addr.to_string()), "{out}");

    // A client that does not trust the CA is refused, and says why.
    let (ok, out) = meshctl(&server, &token, None, &["get", "services"]);
    assert!(!ok, "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    // curl, verifying against the CA.
    let curl = Command::new("curl")
        .args(["-sS", "--cacert", ca_file.to_str().unwrap(), "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .arg(format!("{server}/api/v1/services/web"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(
        body.contains("\"name\":\"web\""),
        "{body} {:?}",
        curl.stderr
    );

    // A gateway reads the config from etcd over TLS as the user.
    let (_gw, ports) = start_gateway_with(
        d,
        "gw-tls",
        &["ingress"],
        &[],
        &etcd.endpoint(),
        json!({"store": store(d, &etcd)}),
    );
    wait_ready(ports.ops).await;
    let url = format!("http://127.0.0.1:{}/", ports.ingress);
    let r = http_get(&url, &[]).await.unwrap();
    assert_eq!(r.header("x-served-by"), Some("b1"), "{r:?}");

    // Tokens expire every 2 s: later writes still reach the gateway
    // (each process authenticates again when etcd refuses its token).
    let before = metric(ports.ops, "meshgate_config_revision").await;
    // etcd drops an idle token within TTL + its 1 s sweep: wait past both.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (ok, out) = meshctl(
        &server,
        &token,
        Some(&ca_file),
        &["apply", "-f", model.to_str().unwrap(), "--wait", "10s"],
    );
    assert!(ok, "{out}");
    std::fs::write(
        &model,
        format!(
            "services:\n  web:\n    endpoints: [{{address: '{}'}}]\n    labels: {{after: expiry}}\n",
            backend.addr
        ),
    )
    .unwrap();
    let (ok, out) = meshctl(
        &server,
        &token,
        Some(&ca_file),
        &["apply", "-f", model.to_str().unwrap()],
    );
    assert!(ok, "a write after the admin's token expired: {out}");
    wait_until(
        "the gateway applies the write made after token expiry",
        Duration::from_secs(15),
        || async { metric(ports.ops, "meshgate_config_revision").await > before },
    )
    .await;
    let r = http_get(&url, &[]).await.unwrap();
    assert_eq!(r.header("x-served-by"), Some("b1"), "{r:?}");
    assert!(
        admin
            .log_text()
            .contains("etcd refused the auth token; authenticating again"),
        "the admin's token expired and it authenticated again"
    );
}
