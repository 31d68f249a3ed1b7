//! End-to-end: bad input changes nothing. Invalid bodies get 400/409 naming
//! the field and leave etcd as it was; malformed HTTP gets 400 and a closed
//! connection, and the gateway keeps serving.

use meshgate_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_refused_with_the_field_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_admin_proc, base, token) = start_admin(dir.path(), &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let b = Backend::start("b").await;
    assert_eq!(
        admin
            .put(
                "services/orders",
                &json!({"endpoints": [{"address": b.addr.to_string()}]})
            )
            .await
            .status,
        201
    );
    assert_eq!(
        admin
            .put(
                "routes/orders",
                &json!({"match": {"hosts": ["orders"]}, "backends": [{"service": "orders"}]})
            )
            .await
            .status,
        201
    );
    let before = (
        admin.get("services").await.json()["items"].clone(),
        admin.get("routes").await.json()["items"].clone(),
    );

    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "routes/r1",
            json!({"match": {"path": {"prefix": "no-slash"}}, "backends": [{"service": "orders"}]})
                .to_string(),
            400,
            "match.path.prefix",
        ),
        (
            "routes/r1",
            json!({"backends": [{"service": "orders", "weight": "heavy"}]}).to_string(),
            400,
            "backends[0].weight",
        ),
        (
            "routes/r1",
            json!({"backends": [{"service": "orders"}], "retries": 3}).to_string(),
            400,
            "retries",
        ),
        (
            "routes/r1",
            json!({"backends": [{"service": "missing"}]}).to_string(),
            400,
            "backends[0].service",
        ),
        (
            "services/s1",
            json!({"endpoints": [{"address": "no-port"}]}).to_string(),
            400,
            "endpoints[0].address",
        ),
        (
            "services/s1",
            json!({"endpoints": [{"address": "127.0.0.1:1", "weight": -1}]}).to_string(),
            400,
            "endpoints[0].weight",
        ),
        (
            "services/s1",
            json!({"group": "nope", "endpoints": []}).to_string(),
            400,
            "group",
        ),
        ("services/s1", "{not json".to_string(), 400, ""),
        (
            "routes/Bad_Name",
            json!({"backends": [{"service": "orders"}]}).to_string(),
            400,
            "name",
        ),
    ];
    for (path, body, status, field) in cases {
        let r = admin.put_raw(path, &body, &[]).await;
        assert_eq!(r.status, status, "{path} {body}: {r:?}");
        let v = r.json();
        assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
        if !field.is_empty() {
            assert_eq!(v["field"], field, "{path} {body}: {v}");
        }
    }
    // Deleting a service in use: 409 naming the route.
    let r = admin.delete("services/orders").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["referrers"], json!(["routes/orders"]));
    // A stale If-Match: 412.
    let r = admin
        .put_raw(
            "routes/orders",
            &json!({"backends": [{"service": "orders"}]}).to_string(),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, 412, "{r:?}");
    // No token / read-only token.
    let r = http("PUT", &format!("{}/api/v1/routes/x", admin.base), &[], "{}")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = http(
        "DELETE",
        &format!("{}/api/v1/routes/orders", admin.base),
        &[("authorization", "Bearer viewer-token-0123456789")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);

    let after = (
        admin.get("services").await.json()["items"].clone(),
        admin.get("routes").await.json()["items"].clone(),
    );
    assert_eq!(before, after, "the store changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_400_and_the_gateway_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (mut gw, ports) = start_gateway(dir.path(), "gw", &["central"], &[], &etcd.endpoint());
    wait_ready(ports.ops).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /\x01\x02 HTTP/1.1\r\n\r\n",
    ] {
        let out = raw_exchange(ports.mesh, garbage).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{garbage:?} -> {out:?}");
    }
    // A non-numeric hop count is refused by the mesh, with its marker.
    let r = http_get(
        &format!("http://127.0.0.1:{}/", ports.mesh),
        &[("x-mesh-hops", "lots")],
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-error")),
        (400, Some("bad_request"))
    );
    // Too many hops: 508.
    let r = http_get(
        &format!("http://127.0.0.1:{}/", ports.mesh),
        &[("x-mesh-hops", "8")],
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-error")),
        (508, Some("loop_detected"))
    );
    // Still alive and answering.
    assert!(gw.running());
    let r = http_get(
        &format!("http://127.0.0.1:{}/", ports.mesh),
        &[("x-mesh-service", "nothing")],
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-error")),
        (404, Some("no_route"))
    );
}

/// Requests whose `Host` is missing (HTTP/1.1), doubled, invalid, or
/// disagrees with an absolute-form target, in raw bytes.
const AMBIGUOUS_HOSTS: [&[u8]; 6] = [
    b"GET /h HTTP/1.1\r\n\r\n",
    b"GET /h HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    b"GET /h HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n",
    b"GET /h HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /h HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
    b"GET http://a.example/h HTTP/1.1\r\nHost: b.example\r\n\r\n",
];

/// Each ambiguous request gets 400 `bad_request` and a closed connection
/// on `port`, and reaches no backend.
async fn refuses_ambiguous_hosts(port: u16, extra: &str, backends: &[&Backend]) {
    let before: u64 = backends.iter().map(|b| b.hits()).sum();
    for raw in AMBIGUOUS_HOSTS {
        // The extra header (a destination for the mesh listeners) goes
        // right after the request line.
        let text = String::from_utf8_lossy(raw);
        let (line, rest) = text.split_once("\r\n").unwrap();
        let req = format!("{line}\r\n{extra}{rest}");
        let out = raw_exchange(port, req.as_bytes()).await;
        assert!(
            out.starts_with("HTTP/1.1 400") && out.contains("x-mesh-error: bad_request"),
            "{req:?} -> {out:?}"
        );
    }
    let after: u64 = backends.iter().map(|b| b.hits()).sum();
    assert_eq!(after, before, "an ambiguous request reached a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_doubled_invalid_or_disagreeing_host_is_refused_on_every_listener() {
    // Gateway listeners: ingress and mesh.
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let yaml = orders_everywhere(b.addr);
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    refuses_ambiguous_hosts(ports.ingress, "", &[&b]).await;
    refuses_ambiguous_hosts(ports.mesh, "x-mesh-service: orders\r\n", &[&b]).await;
    // The rules let good requests through: one Host, an absolute-form
    // target that agrees with it, HTTP/1.0 without one.
    for ok in [
        &b"GET /h HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"[..],
        b"GET http://a.example/h HTTP/1.1\r\nHost: A.example\r\nConnection: close\r\n\r\n",
        b"GET /h HTTP/1.0\r\n\r\n",
    ] {
        let out = raw_exchange(ports.ingress, ok).await;
        // (hyper answers an HTTP/1.0 request in HTTP/1.0.)
        assert!(
            out.starts_with("HTTP/1.") && out[8..].starts_with(" 200"),
            "{ok:?} -> {out:?}"
        );
    }
    assert_eq!(b.hits(), 3);

    // The sidecar's app listener.
    let mesh = Mesh::start().await;
    refuses_ambiguous_hosts(
        mesh.sidecar.1.app,
        "x-mesh-service: orders\r\n",
        &[&mesh.b1, &mesh.b2],
    )
    .await;
}

/// A transfer coding other than `chunked` is never forwarded re-framed
/// (which would drop the coding and change what the body means): a
/// request gets 501, an upstream answer 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    // An upstream that answers in `gzip, chunked`.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = raw.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                    .await;
            });
        }
    });
    let yaml = format!(
        "services:\n  b:\n    endpoints: [{{address: {}}}]\n  coded:\n    endpoints: [{{address: '{raw_addr}'}}]\nroutes:\n  coded:\n    scope: ingress\n    match: {{path: {{prefix: /coded}}}}\n    backends: [{{service: coded}}]\n  b:\n    scope: ingress\n    match: {{path: {{prefix: /}}}}\n    backends: [{{service: b}}]\n",
        b.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    for coding in ["gzip, chunked", "chunked, chunked"] {
        let req = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        let out = raw_exchange(ports.ingress, req.as_bytes()).await;
        let refused_501 =
            out.starts_with("HTTP/1.1 501") && out.contains("x-mesh-error: not_implemented");
        // hyper itself refuses a doubled chunked with 400.
        let refused_400 = coding == "chunked, chunked" && out.starts_with("HTTP/1.1 400");
        assert!(refused_501 || refused_400, "{coding}: {out:?}");
    }
    assert_eq!(b.hits(), 0, "a coded body reached the backend");
    // Plain chunked still goes through.
    let ok = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let out = raw_exchange(ports.ingress, ok).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    // An upstream answer in `gzip, chunked` is not passed on as chunked.
    let r = http_get(&format!("http://127.0.0.1:{}/coded", ports.ingress), &[])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-mesh-error")),
        (502, Some("upstream_reset")),
        "{r:?}"
    );
}

/// The largest request head is 32 KiB by default on every listener a
/// client reaches (nginx's total; Envoy allows 60 KiB): a head of exactly
/// that size is served, one byte more gets 431 and a closed connection and
/// reaches no backend. The mesh listener, whose clients are mesh hops,
/// allows 4 KiB more for the headers the hops add: a head at the limit
/// through the sidecar and a gateway is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_32_kib_gets_431_on_every_listener() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let yaml = orders_everywhere(b.addr);
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let mesh = Mesh::start().await;
    let limit = 32 * 1024;
    for (port, extra, limit, hits) in [
        (ports.ingress, "", limit, &[&b][..]),
        (
            ports.mesh,
            "x-mesh-service: orders\r\n",
            limit + 4096,
            &[&b][..],
        ),
        (
            mesh.sidecar.1.app,
            "x-mesh-service: orders\r\n",
            limit,
            &[&mesh.b1, &mesh.b2][..],
        ),
    ] {
        let head = |len: usize| {
            let start =
                format!("GET /h HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n{extra}x-pad: ");
            format!("{start}{}\r\n\r\n", "p".repeat(len - start.len() - 4))
        };
        let before: u64 = hits.iter().map(|b| b.hits()).sum();
        let out = raw_exchange(port, head(limit).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{port}: {out}");
        let out = raw_exchange(port, head(limit + 1).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{port}: {out}");
        let after: u64 = hits.iter().map(|b| b.hits()).sum();
        assert_eq!(
            after,
            before + 1,
            "{port}: only the head that fits was forwarded"
        );
    }
}
