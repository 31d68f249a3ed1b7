//! TLS at the edge, with real clients: certificates put through the admin
//! API into a real etcd and served by a gateway's TLS ingress, chosen by
//! SNI (exact, wildcard, default) as `openssl s_client` and curl see them;
//! ALPN h2 and http/1.1; a certificate replaced live while a keep-alive
//! connection opened before it keeps working; certificates that are
//! malformed or do not fit their key refused on write; TLS clients that
//! send garbage, stall in the handshake or offer only TLS 1.1 dropped
//! without harm to others; and Python grpcio over TLS.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use meshgate_tests::*;
use serde_json::json;
use tokio::io::AsyncReadExt;

fn cert_spec(leaf: &Leaf) -> serde_json::Value {
    json!({"certificate": leaf.cert, "private_key": leaf.key})
}

/// The SHA-256 fingerprint of the certificate `openssl s_client` is
/// served for `sni` (`None`: no SNI sent); `None` when the handshake fails.
fn served_fingerprint(port: u16, sni: Option<&str>) -> Option<String> {
    let mut args = vec![
        "s_client".to_string(),
        "-connect".into(),
        format!("127.0.0.1:{port}"),
    ];
    match sni {
        Some(name) => args.extend(["-servername".into(), name.into()]),
        None => args.push("-noservername".into()),
    }
    let out = Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let pem_start = text.find("-----BEGIN CERTIFICATE-----")?;
    let pem_end = text.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    let chain = meshgate_config::tls::parse_chain(&text[pem_start..pem_end]).ok()?;
    Some(meshgate_config::tls::fingerprint(&chain[0]))
}

/// curl's `http_version` and `x-served-by` for `https://<host>:<port>/`.
fn curl_https(ca: &Path, host: &str, port: u16, proto: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            proto,
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-w",
            "version=%{http_version}",
            &format!("https://{host}:{port}/"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text
        .rsplit_once("version=")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let served = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-served-by: ")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| {
            format!(
                "(none; curl said {text:?} {:?})",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (version, served)
}

fn fingerprint_of(got: &Resp) -> String {
    got.json()["info"]["fingerprint_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no fingerprint in {got:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_tls_by_sni_with_live_rotation_and_bad_input_refused() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin_proc, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let backend = Backend::start("b1").await;

    let ca = TestCa::new("Meshgate test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let apex = ca.leaf(&["example.com", "api.example.com"]);
    let wild = ca.leaf(&["*.example.com"]);
    let fallback = ca.leaf(&["fallback.test"]);
    for (name, leaf) in [("apex", &apex), ("wild", &wild), ("fallback", &fallback)] {
        let r = admin.put(&format!("certs/{name}"), &cert_spec(leaf)).await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let web = json!({"endpoints": [{"address": backend.addr.to_string()}]});
    assert_eq!(admin.put("services/web", &web).await.status, 201);
    let route = json!({"scope": "ingress", "backends": [{"service": "web"}]});
    assert_eq!(admin.put("routes/web", &route).await.status, 201);

    let tls_port = free_port();
    let (gw, ports) = start_gateway_with(
        dir.path(),
        "gw1",
        &["ingress"],
        &[],
        &etcd.endpoint(),
        json!({"ingress_tls": {
            "listen": addr(tls_port),
            "default_cert": "fallback",
            "handshake_timeout_ms": 1000,
        }}),
    );
    wait_ready(ports.ops).await;

    // GET shows the certificate, never its key; nor do the change log and
    // the gateway's /config.
    let got = admin.get("certs/apex").await;
    assert_eq!(got.status, 200);
    let info = &got.json()["info"];
    assert_eq!(
        info["sans"],
        json!(["DNS:example.com", "DNS:api.example.com"]),
        "{got:?}"
    );
    assert!(info["not_after"].as_str().is_some_and(|t| t.ends_with('Z')));
    let fp_apex = fingerprint_of(&got);
    let fp_wild = fingerprint_of(&admin.get("certs/wild").await);
    let fp_fallback = fingerprint_of(&admin.get("certs/fallback").await);
    for (what, body) in [
        ("GET", got.body.clone()),
        ("history", admin.get("history").await.body),
        (
            "/config",
            http_get(&format!("http://127.0.0.1:{}/config", ports.ops), &[])
                .await
                .unwrap()
                .body,
        ),
    ] {
        assert!(body.contains(&fp_apex) || what != "GET");
        assert!(
            !body.contains("PRIVATE KEY"),
            "{what} shows a private key: {body}"
        );
    }

    // SNI: exact, wildcard, default (unknown name, and no SNI at all).
    assert_eq!(
        served_fingerprint(tls_port, Some("example.com")),
        Some(fp_apex.clone())
    );
    assert_eq!(
        served_fingerprint(tls_port, Some("api.example.com")),
        Some(fp_apex.clone())
    );
    assert_eq!(
        served_fingerprint(tls_port, Some("www.example.com")),
        Some(fp_wild.clone())
    );
    assert_eq!(
        served_fingerprint(tls_port, Some("other.test")),
        Some(fp_fallback.clone())
    );
    assert_eq!(
        served_fingerprint(tls_port, None),
        Some(fp_fallback.clone())
    );

    // curl, verifying against the CA: HTTP/2 by ALPN, and HTTP/1.1.
    let (v, served) = curl_https(&ca_file, "example.com", tls_port, "--http2");
    assert_eq!((v.as_str(), served.as_str()), ("2", "b1"));
    let (v, served) = curl_https(&ca_file, "www.example.com", tls_port, "--http1.1");
    assert_eq!((v.as_str(), served.as_str()), ("1.1", "b1"));

    // A keep-alive connection opened before the rotation.
    let client = tls_client(&ca.pem, &["http/1.1"]);
    let stream = tls_connect(client.clone(), tls_port, "example.com")
        .await
        .unwrap();
    assert_eq!(peer_fingerprint(&stream), fp_apex);
    let (mut old_conn, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = || {
        http::Request::get("/")
            .header("host", "example.com")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let r = old_conn.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    // Rotation: a new certificate and key for the same names.
    let renewed = ca.leaf(&["example.com", "api.example.com"]);
    let r = admin.put("certs/apex", &cert_spec(&renewed)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let fp_renewed = fingerprint_of(&r);
    assert_ne!(fp_renewed, fp_apex);
    wait_until(
        "the next handshake serves the renewed certificate",
        Duration::from_secs(10),
        || {
            let fp = fp_renewed.clone();
            async move { served_fingerprint(tls_port, Some("example.com")) == Some(fp) }
        },
    )
    .await;
    let r = old_conn.send_request(get()).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the connection opened before the rotation still works"
    );
    r.into_body().collect().await.unwrap();
    let (v, served) = curl_https(&ca_file, "example.com", tls_port, "--http2");
    assert_eq!((v.as_str(), served.as_str()), ("2", "b1"));

    // A PUT without the key keeps the stored one (a label edit of what GET
    // showed); a new certificate without its key does not fit the old key.
    let mut edited = admin.get("certs/apex").await.json();
    edited["spec"]["labels"] = json!({"team": "edge"});
    let r = admin.put_raw("certs/apex", &edited.to_string(), &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = admin
        .put(
            "certs/apex",
            &json!({"certificate": ca.leaf(&["example.com"]).cert}),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["field"], "private_key", "{r:?}");

    // Malformed or mismatched certificates are refused with the field,
    // and change nothing.
    // What the certs are (not the store revision: the gateways' node
    // records, written as they apply the edit above, move it).
    let certs = || async {
        let list = admin.get("certs").await.json();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["name"].clone(), i["version"].clone()))
            .collect::<Vec<_>>()
    };
    let before = certs().await;
    for (body, field) in [
        (
            json!({"certificate": "not a PEM", "private_key": apex.key}),
            "certificate",
        ),
        (
            json!({"certificate": apex.cert, "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}),
            "private_key",
        ),
        (
            json!({"certificate": apex.cert, "private_key": wild.key}),
            "private_key",
        ),
        (json!({"certificate": apex.cert}), "private_key"),
    ] {
        let r = admin.put("certs/bad", &body).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert_eq!(r.json()["field"], field, "{r:?}");
        assert!(
            !r.body.contains("PRIVATE KEY"),
            "an error quotes a key: {r:?}"
        );
    }
    assert_eq!(admin.get("certs/bad").await.status, 404);
    assert_eq!(certs().await, before);

    // Bad TLS clients: plaintext HTTP, a stalled handshake, TLS 1.1 only.
    // Each loses its own connection only.
    let answer = raw_exchange(tls_port, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert!(
        !answer.contains("HTTP/1.1 200"),
        "plaintext was served: {answer:?}"
    );
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(15), stalled.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "a stalled handshake is cut off at the handshake timeout"
    );
    let old = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{tls_port}"),
            "-servername",
            "example.com",
            "-tls1_1",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&old.stdout).contains("BEGIN CERTIFICATE"),
        "TLS 1.1 got a certificate"
    );
    let r = old_conn.send_request(get()).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the keep-alive connection outlived the bad clients"
    );
    let handshakes = |result: &str| {
        format!("meshgate_tls_handshakes_total{{listener=\"ingress_tls\",result=\"{result}\"}}")
    };
    assert!(metric(ports.ops, &handshakes("ok")).await >= 8.0);
    assert!(
        metric(ports.ops, &handshakes("failed")).await >= 2.0,
        "plaintext and TLS 1.1 counted"
    );
    assert!(
        metric(ports.ops, &handshakes("timeout")).await >= 1.0,
        "the stall counted"
    );
    let expiry = metric(
        ports.ops,
        "meshgate_tls_cert_expiry_timestamp_seconds{cert=\"apex\"}",
    )
    .await;
    assert!(expiry > meshgate_config::tls::now_unix() as f64);

    // Deleting the default: an unknown name has no certificate now.
    assert_eq!(admin.delete("certs/fallback").await.status, 200);
    wait_until("the default is gone", Duration::from_secs(10), || async {
        served_fingerprint(tls_port, Some("other.test")).is_none()
    })
    .await;
    assert_eq!(
        served_fingerprint(tls_port, Some("www.example.com")),
        Some(fp_wild)
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_through_the_ingress() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = py_server(dir.path(), "grpc_peer.py", "grpc-server").await;
    let ca = TestCa::new("Meshgate test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let leaf = ca.leaf(&["grpc.example.com"]);
    // The standalone file holds the certificate too (JSON is YAML).
    let model = json!({
        "certs": {"grpc": cert_spec(&leaf)},
        "services": {"echo": {"protocol": "grpc", "endpoints": [{"address": addr(port)}]}},
        "routes": {"echo": {"scope": "ingress", "match": {"path": {"prefix": "/echo.Echo/"}}, "backends": [{"service": "echo"}]}},
    });
    let tls_port = free_port();
    let (_gw, _ports, _) = start_standalone_with(
        dir.path(),
        &model.to_string(),
        &["--ingress-tls-listen", &addr(tls_port)],
    )
    .await;
    let target = format!("127.0.0.1:{tls_port}");
    let env = [
        ("GRPC_CA_FILE", ca_file.to_str().unwrap()),
        ("GRPC_SERVER_NAME", "grpc.example.com"),
    ];
    let r = py_env("grpc_peer.py", &["client", &target, "Say", "hi"], &env).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reply"], json!(["echo:hi"]));
    let r = py_env("grpc_peer.py", &["client", &target, "Count", "3"], &env).await;
    assert_eq!(r["reply"], json!(["0", "1", "2"]), "{r}");
    assert_eq!(r["trailers"]["x-trailer"], "yes");
    let r = py_env("grpc_peer.py", &["client", &target, "Chat", "a,b"], &env).await;
    assert_eq!(r["reply"], json!(["re:a", "re:b"]), "{r}");
    // A client that does not trust the CA fails its handshake.
    let other = TestCa::new("another CA");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, &other.pem).unwrap();
    let r = py_env(
        "grpc_peer.py",
        &["client", &target, "Say", "hi", "3"],
        &[
            ("GRPC_CA_FILE", other_file.to_str().unwrap()),
            ("GRPC_SERVER_NAME", "grpc.example.com"),
        ],
    )
    .await;
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
}

/// Writes `leaf` as `<name>.crt` and `<name>.key` in `dir` (where the
/// Python peers look for their certificate).
fn write_peer_cert(dir: &Path, name: &str, leaf: &Leaf) {
    std::fs::write(dir.join(format!("{name}.crt")), &leaf.cert).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &leaf.key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_to_https_and_grpc_backends_verifies_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Backend CA");
    let other = TestCa::new("Unrelated CA");
    write_peer_cert(dir.path(), "https-peer", &ca.leaf(&["backend.test"]));
    write_peer_cert(dir.path(), "grpc-tls", &ca.leaf(&["grpc-backend.test"]));
    let (_https, https_port) = py_server(dir.path(), "https_peer.py", "https-peer").await;
    let (_grpc, grpc_port) = py_server(dir.path(), "grpc_peer.py", "grpc-tls").await;
    let https = addr(https_port);
    let tls = |sni: Option<&str>, ca_pem: &str| {
        let mut t = json!({"ca": ca_pem});
        if let Some(s) = sni {
            t["sni"] = json!(s);
        }
        t
    };
    let service = |tls: serde_json::Value| json!({"endpoints": [{"address": https}], "tls": tls});
    let route = |prefix: &str, service: &str| json!({"scope": "ingress", "match": {"path": {"prefix": prefix}}, "backends": [{"service": service}]});
    let mut checked = service(tls(Some("backend.test"), &ca.pem));
    checked["health_check"] =
        json!({"interval_ms": 500, "timeout_ms": 400, "http": {"path": "/healthz"}});
    let model = json!({
        "services": {
            "secure": checked,
            "wrong-ca": service(tls(Some("backend.test"), &other.pem)),
            "wrong-name": service(tls(Some("other.test"), &ca.pem)),
            "unverified": service(json!({"verify": false})),
            "plaintext": {"endpoints": [{"address": https}]},
            "grpc": {"protocol": "grpc", "endpoints": [{"address": addr(grpc_port)}],
                     "tls": tls(Some("grpc-backend.test"), &ca.pem)},
        },
        "routes": {
            "secure": route("/secure", "secure"),
            "wrong-ca": route("/wrong-ca", "wrong-ca"),
            "wrong-name": route("/wrong-name", "wrong-name"),
            "unverified": route("/unverified", "unverified"),
            "plaintext": route("/plaintext", "plaintext"),
            "grpc": route("/echo.Echo/", "grpc"),
        },
    });
    let (_gw, ports, _) = start_standalone(dir.path(), &model.to_string()).await;
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", ports.ingress);
    let config = get_json(&format!("http://127.0.0.1:{}/config", ports.ops))
        .await
        .unwrap();
    assert_eq!(rejected_objects(&config), Vec::<String>::new(), "{config}");

    // Verified against the service's CA, with its SNI; twice, so the
    // second request may take the pooled TLS connection.
    for _ in 0..2 {
        let r = http_get(&url("/secure/a"), &[]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-served-by"), Some("https-peer"));
        let seen = r.json();
        assert_eq!(seen["path"], "/secure/a");
        assert_eq!(seen["sni"], "backend.test");
        assert!(
            seen["tls"]
                .as_str()
                .is_some_and(|v| v.starts_with("TLSv1.")),
            "{seen}"
        );
    }
    // Another CA, or a name the certificate does not have: refused, as a
    // connect failure (nothing was sent).
    for path in ["/wrong-ca", "/wrong-name"] {
        let r = http_get(&url(path), &[]).await.unwrap();
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert!(r.body.contains("certificate"), "{path}: {r:?}");
        assert_eq!(
            r.header("x-mesh-error"),
            Some("upstream_connect_failed"),
            "{path}"
        );
    }
    // verify: false takes any certificate (no SNI for an IP address).
    let r = http_get(&url("/unverified"), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["sni"], serde_json::Value::Null);
    // Plaintext to a TLS port fails as the exchange it is.
    let r = http_get(&url("/plaintext"), &[]).await.unwrap();
    assert!(r.status >= 500, "{r:?}");

    // The health check of a TLS service speaks TLS too.
    let passes = format!("meshgate_health_checks_total{{endpoint=\"{https}\",result=\"pass\"}}");
    wait_until("a TLS health check passes", Duration::from_secs(10), || {
        let passes = passes.clone();
        async move { metric(ports.ops, &passes).await >= 1.0 }
    })
    .await;

    // gRPC over TLS upstream (ALPN h2), from a plaintext client.
    let target = format!("127.0.0.1:{}", ports.ingress);
    let r = py("grpc_peer.py", &["client", &target, "Say", "hi"]).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reply"], json!(["echo:hi"]));
    let r = py("grpc_peer.py", &["client", &target, "Count", "3"]).await;
    assert_eq!(r["reply"], json!(["0", "1", "2"]), "{r}");
}
