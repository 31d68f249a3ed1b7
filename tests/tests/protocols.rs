//! End-to-end protocols through a standalone gateway, with real peers:
//! gRPC (Python grpcio client and server: unary, server and bidi streams,
//! trailers, the app's own status, synthetic errors as gRPC statuses),
//! WebSocket (Python `websockets` client and server), TCP routes (a raw
//! echo exchange, connect fail-over, live removal), an HTTP/1.1
//! `Upgrade: h2c` request from curl, and large HTTP/1.1 bodies in both
//! framings (curl uploads, chunked and sized, echoed back).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use meshgate_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_keep_their_streams_trailers_and_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = py_server(dir.path(), "grpc_peer.py", "grpc-server").await;
    let dead = free_port();
    let yaml = format!(
        "services:
  echo:
    protocol: grpc
    endpoints: [{{address: '127.0.0.1:{port}'}}]
  gone:
    protocol: grpc
    endpoints: [{{address: '127.0.0.1:{dead}'}}]
  slow:
    protocol: grpc
    endpoints: [{{address: '127.0.0.1:{port}'}}]
    timeouts: {{request_ms: 300}}
routes:
  echo:
    scope: ingress
    match: {{path: {{prefix: /echo.Echo/}}}}
    backends: [{{service: echo}}]
  gone:
    scope: ingress
    match: {{path: {{prefix: /gone.Svc/}}}}
    backends: [{{service: gone}}]
  slow:
    scope: ingress
    match: {{path: {{prefix: /echo.Echo/Say}}, headers: [{{name: x-slow}}]}}
    priority: 10
    backends: [{{service: slow}}]
"
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let target = format!("127.0.0.1:{}", ports.ingress);
    let t = target.as_str();

    let r = py("grpc_peer.py", &["client", t, "Say", "hi"]).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reply"], serde_json::json!(["echo:hi"]));

    // The app's own status and message pass through untouched.
    let r = py("grpc_peer.py", &["client", t, "Say", "fail"]).await;
    assert_eq!(r["code"], "NOT_FOUND", "{r}");
    assert_eq!(r["details"], "no such thing");

    // Server streaming, with the trailer the server set.
    let r = py("grpc_peer.py", &["client", t, "Count", "5"]).await;
    assert_eq!(
        r["reply"],
        serde_json::json!(["0", "1", "2", "3", "4"]),
        "{r}"
    );
    assert_eq!(r["trailers"]["x-trailer"], "yes");

    // Bidirectional streaming.
    let r = py("grpc_peer.py", &["client", t, "Chat", "a,b,c"]).await;
    assert_eq!(
        r["reply"],
        serde_json::json!(["re:a", "re:b", "re:c"]),
        "{r}"
    );

    // Synthetic errors are gRPC statuses, still marked x-mesh-error.
    let r = py("grpc_peer.py", &["client", t, "/nothing.Here/Call", "x"]).await;
    assert_eq!(r["code"], "UNIMPLEMENTED", "{r}");
    assert_eq!(r["trailers"]["x-mesh-error"], "no_route");
    let r = py("grpc_peer.py", &["client", t, "/gone.Svc/Call", "x"]).await;
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    assert_eq!(r["trailers"]["x-mesh-error"], "upstream_connect_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deadline_exceeded_from_the_route_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = py_server(dir.path(), "grpc_peer.py", "grpc-server").await;
    let yaml = format!(
        "services:
  slow:
    protocol: grpc
    endpoints: [{{address: '127.0.0.1:{port}'}}]
    timeouts: {{request_ms: 300}}
routes:
  slow:
    scope: ingress
    match: {{path: {{prefix: /echo.Echo/}}}}
    backends: [{{service: slow}}]
"
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let target = format!("127.0.0.1:{}", ports.ingress);
    // The client allows 10 s; the gateway's 300 ms route timeout answers.
    let r = py(
        "grpc_peer.py",
        &["client", &target, "Say", "sleep:3000", "10"],
    )
    .await;
    assert_eq!(r["code"], "DEADLINE_EXCEEDED", "{r}");
    assert_eq!(r["trailers"]["x-mesh-error"], "upstream_timeout");
    // A call within the timeout works.
    let r = py("grpc_peer.py", &["client", &target, "Say", "sleep:10"]).await;
    assert_eq!(r["reply"], serde_json::json!(["echo:sleep:10"]), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_proxied_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = py_server(dir.path(), "ws_peer.py", "ws1").await;
    let yaml = format!(
        "services:
  chat:
    endpoints: [{{address: '127.0.0.1:{port}'}}]
routes:
  chat:
    scope: ingress
    match: {{path: {{prefix: /chat}}}}
    backends: [{{service: chat}}]
"
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    let url = format!("ws://127.0.0.1:{}/chat", ports.ingress);
    let r = py("ws_peer.py", &["client", &url, "hello", "world", "again"]).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["replies"],
        serde_json::json!(["ws1:hello", "ws1:world", "ws1:again"])
    );
    // Several at once, each on its own tunnel.
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { py("ws_peer.py", &["client", &url, &format!("m{i}")]).await })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.await.unwrap();
        assert_eq!(
            r["replies"],
            serde_json::json!([format!("ws1:m{i}")]),
            "{r}"
        );
    }
}

fn curl() -> PathBuf {
    which("curl").expect("curl is required (scripts/deps.sh installs it)")
}

/// A standalone gateway with one ingress route (every path) to one backend.
async fn one_service_gateway(dir: &Path) -> (Proc, GatewayPorts, Backend) {
    let b = Backend::start("b").await;
    let yaml = format!(
        "services:\n  s:\n    endpoints: [{{address: {}}}]\nroutes:\n  s:\n    scope: ingress\n    backends: [{{service: s}}]\n",
        b.addr
    );
    let (gw, ports, _) = start_standalone(dir, &yaml).await;
    (gw, ports, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_request_is_answered_over_http1() {
    let curl = curl();
    let dir = tempfile::tempdir().unwrap();
    let (_gw, ports, b) = one_service_gateway(dir.path()).await;
    let url = format!("http://127.0.0.1:{}/x", ports.ingress);
    // curl --http2 on http:// sends `Upgrade: h2c`; the gateway declines
    // the upgrade (RFC 9113 deprecates it) and answers over HTTP/1.1.
    let version_and_status = |flag: &'static str| {
        let (curl, url) = (curl.clone(), url.clone());
        async move {
            let out = tokio::process::Command::new(&curl)
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version} %{http_code}",
                    flag,
                    &url,
                ])
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    assert_eq!(version_and_status("--http2").await, "1.1 200");
    // Prior knowledge is how h2c is spoken.
    assert_eq!(version_and_status("--http2-prior-knowledge").await, "2 200");
    assert_eq!(b.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_bodies_pass_whole_in_every_framing() {
    let curl = curl();
    let dir = tempfile::tempdir().unwrap();
    let (_gw, ports, b) = one_service_gateway(dir.path()).await;
    // Larger than the replay buffer (64 KiB), so the gateway streams it
    // instead of buffering, and not a multiple of any buffer size.
    let body: Vec<u8> = (0..300_001u32).map(|i| b'a' + (i % 23) as u8).collect();
    let file = dir.path().join("body");
    std::fs::write(&file, &body).unwrap();
    let upload = format!("@{}", file.display());
    let curl_body = |extra: &'static [&'static str], path: &'static str| {
        let (curl, upload) = (curl.clone(), upload.clone());
        let url = format!("http://127.0.0.1:{}{path}", ports.ingress);
        async move {
            let out = tokio::process::Command::new(&curl)
                .args(["-sS", "--fail", "--data-binary", &upload])
                .args(extra)
                .arg(&url)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    };
    // Chunked upload, chunked answer: the body comes back byte for byte.
    let echoed = curl_body(&["-H", "Transfer-Encoding: chunked"], "/echo").await;
    assert!(
        echoed == body,
        "chunked echo differs ({} bytes back)",
        echoed.len()
    );
    // Sized upload (content-length): streamed through, whole.
    let echoed = curl_body(&[], "/echo").await;
    assert!(
        echoed == body,
        "sized echo differs ({} bytes back)",
        echoed.len()
    );
    // The backend saw both POST bodies whole.
    let posts = b.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 2);
    assert!(posts.iter().all(|p| p.as_bytes() == body));
}

/// HTTP/2 flow control: bodies far larger than every window (the
/// client's, the gateway's, the upstream's), several at once on one
/// client connection, both ways, to an HTTP/1.1 upstream and to an
/// HTTP/2 one (whose streams share one connection and its window). The
/// client is hyper's (curl 7.88 cannot run parallel prior-knowledge
/// transfers: its first one fails even against a plain hyper server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_bodies_larger_than_every_window_pass_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let yaml = format!(
        "services:\n  one:\n    endpoints: [{{address: {a}}}]\n  two:\n    protocol: http2\n    endpoints: [{{address: {a}}}]\n\
         routes:\n  one:\n    scope: ingress\n    match: {{hosts: [one.test]}}\n    backends: [{{service: one}}]\n\
         \x20 two:\n    scope: ingress\n    match: {{hosts: [two.test]}}\n    backends: [{{service: two}}]\n",
        a = b.addr
    );
    let (_gw, ports, _) = start_standalone(dir.path(), &yaml).await;
    // 3 MB each, not a multiple of any frame or window size, sent in
    // 100 KB frames.
    const UPLOADS: usize = 4;
    let bodies: Vec<Bytes> = (0..UPLOADS)
        .map(|n| {
            (0..3_000_017u32)
                .map(|i| b'a' + ((i as usize + n * 7) % 26) as u8)
                .collect::<Vec<u8>>()
                .into()
        })
        .collect();
    for host in ["one.test", "two.test"] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ports.ingress))
            .await
            .unwrap();
        let (tx, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let exchanges = bodies.iter().map(|body| {
            let mut tx = tx.clone();
            let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = body
                .chunks(100_000)
                .map(|c| Ok(hyper::body::Frame::data(body.slice_ref(c))))
                .collect();
            let req = http::Request::post(format!("http://{host}/echo"))
                .body(http_body_util::StreamBody::new(futures::stream::iter(
                    frames,
                )))
                .unwrap();
            async move {
                let resp = tx.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200, "{host}");
                resp.into_body().collect().await.unwrap().to_bytes()
            }
        });
        let got = tokio::time::timeout(
            Duration::from_secs(60),
            futures::future::join_all(exchanges),
        )
        .await
        .expect("the uploads finish");
        for (i, (sent, back)) in bodies.iter().zip(got).enumerate() {
            assert!(
                back == *sent,
                "{host}: upload {i} came back as {} bytes, not the {} sent",
                back.len(),
                sent.len()
            );
        }
        drop(tx);
        conn.abort();
    }
    let posts = b.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 2 * UPLOADS);
    for body in &bodies {
        let body = String::from_utf8_lossy(body);
        assert_eq!(posts.iter().filter(|p| **p == body).count(), 2);
    }
}

/// A TCP server answering every read with `<name>:<bytes read>`.
async fn tcp_echo(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            conns.push(tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            }));
        }
        for c in conns {
            c.abort();
        }
    });
    (addr, task)
}

async fn exchange(s: &mut tokio::net::TcpStream, msg: &str) -> String {
    s.write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_balance_fail_over_and_follow_config() {
    let dir = tempfile::tempdir().unwrap();
    let (e1, t1) = tcp_echo("e1").await;
    let (e2, _t2) = tcp_echo("e2").await;
    let dead = free_port();
    let port = free_port();
    let yaml = |with_route: bool| {
        let route = if with_route {
            format!("tcp_routes:\n  db:\n    port: {port}\n    service: db\n")
        } else {
            String::new()
        };
        format!(
            "services:\n  db:\n    protocol: tcp\n    endpoints: [{{address: '127.0.0.1:{dead}'}}, {{address: '{e1}'}}, {{address: '{e2}'}}]\n{route}"
        )
    };
    let (_gw, _ports, file) = start_standalone(dir.path(), &yaml(true)).await;
    wait_until("tcp route listening", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;

    // Every connection is served (the dead endpoint costs a refused
    // connect, then is ejected), by both live endpoints in turn.
    let mut seen = std::collections::HashMap::new();
    for i in 0..10 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let reply = exchange(&mut s, &format!("ping{i}")).await;
        let (who, echoed) = reply.split_once(':').expect("name:bytes");
        assert_eq!(echoed, format!("ping{i}"));
        *seen.entry(who.to_string()).or_insert(0) += 1;
    }
    assert!(
        seen.get("e1") >= Some(&3) && seen.get("e2") >= Some(&3),
        "{seen:?}"
    );

    // A long-lived connection keeps going across a config change.
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let first = exchange(&mut open, "a").await;

    // e1 goes away (its listener closed once the aborted task is gone):
    // new connections all land on e2, none fails.
    t1.abort();
    let _ = t1.await;
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let reply = exchange(&mut s, "x").await;
        assert_eq!(reply, "e2:x");
    }

    // The route is removed from the config: the port stops accepting; the
    // open connection (if it was on e2) still works.
    std::fs::write(&file, yaml(false)).unwrap();
    wait_until("tcp route closed", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    if first.starts_with("e2:") {
        assert_eq!(exchange(&mut open, "b").await, "e2:b");
    }
}

/// The sidecar's local ports: an HTTP port and a WebSocket port that name
/// their destination, and a plain-TCP port tunnelled through the group
/// gateways (HTTP `CONNECT`), through the central tier when the group is
/// down, and straight to the endpoint in direct mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_local_ports_carry_http_websocket_and_tcp() {
    let mut m = Mesh::start().await;
    let d = m.dir.path().to_path_buf();
    let (_ws, ws_port) = py_server(&d, "ws_peer.py", "ws1").await;
    let (e1, _t1) = tcp_echo("e1").await;
    let put = |path: &'static str, v: serde_json::Value| {
        let admin = &m.admin;
        async move {
            let r = admin.put(path, &v).await;
            assert!(r.status == 200 || r.status == 201, "{r:?}");
        }
    };
    put(
        "services/echo",
        serde_json::json!({"group": "shop", "protocol": "tcp", "endpoints": [{"address": e1.to_string()}]}),
    )
    .await;
    put(
        "services/chat",
        serde_json::json!({"group": "shop", "endpoints": [{"address": addr(ws_port)}]}),
    )
    .await;
    let dests = |echo_mode: &str| {
        serde_json::json!({"group": "shop", "destinations": [
            {"service": "orders"}, {"service": "chat"}, {"service": "echo", "mode": echo_mode}]})
    };
    put("services/frontend", dests("gateway")).await;
    let (http_port, tcp_port, ws_local) = (free_port(), free_port(), free_port());
    let central = vec![addr(m.gws[2].1.mesh)];
    let (_sc, p) = start_sidecar_with(
        &d,
        "sc-ports",
        "frontend",
        "shop",
        &central,
        &m.etcd.endpoint(),
        serde_json::json!({"local_ports": [
            {"listen": addr(http_port), "service": "orders"},
            {"listen": addr(tcp_port), "service": "echo", "protocol": "tcp"},
            {"listen": addr(ws_local), "service": "chat"},
        ]}),
    );
    wait_ready(p.ops).await;
    let config = format!("http://127.0.0.1:{}/config", p.ops);
    wait_until(
        "the sidecar sees its group and destinations",
        Duration::from_secs(15),
        || async {
            get_json(&config).await.is_some_and(|c| {
                c["tiers"]["group"].as_array().map(Vec::len) == Some(2)
                    && c["destinations"]["echo"] == "gateway"
            })
        },
    )
    .await;

    // HTTP: no Host or header needed, the port names the destination.
    let r = http_get(&format!("http://127.0.0.1:{http_port}/x"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-mesh-tier"), Some("group"), "{r:?}");
    assert!(
        matches!(r.header("x-served-by"), Some("b1" | "b2")),
        "{r:?}"
    );

    // WebSocket through the sidecar and the group gateways.
    let ws_url = format!("ws://127.0.0.1:{ws_local}/room");
    let r = py("ws_peer.py", &["client", &ws_url, "hello", "again"]).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["replies"], serde_json::json!(["ws1:hello", "ws1:again"]));

    // Plain TCP, counted per tier once each connection ends.
    let tcp_served = |tier: &'static str| {
        let ops = p.ops;
        async move {
            let sample = format!(
                "meshgate_sidecar_tcp_connections_total{{destination=\"echo\",result=\"ok\",tier=\"{tier}\"}}"
            );
            metric(ops, &sample).await
        }
    };
    let tcp_round = |msg: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
            .await
            .unwrap();
        assert_eq!(exchange(&mut s, msg).await, format!("e1:{msg}"));
        assert_eq!(exchange(&mut s, "again").await, "e1:again");
    };
    tcp_round("via-group").await;
    wait_until(
        "tcp counted on the group tier",
        Duration::from_secs(10),
        || async { tcp_served("group").await == 1.0 },
    )
    .await;

    // The group's gateways die: TCP and WebSocket go through the central tier.
    m.gws[0].0.kill();
    m.gws[1].0.kill();
    tcp_round("via-central").await;
    wait_until(
        "tcp counted on the central tier",
        Duration::from_secs(10),
        || async { tcp_served("central").await == 1.0 },
    )
    .await;
    let r = py("ws_peer.py", &["client", &ws_url, "still"]).await;
    assert_eq!(r["replies"], serde_json::json!(["ws1:still"]), "{r}");

    // Direct mode: the sidecar connects to the endpoint itself.
    put("services/frontend", dests("direct")).await;
    wait_until(
        "echo compiled for direct mode",
        Duration::from_secs(15),
        || async {
            get_json(&config)
                .await
                .is_some_and(|c| c["direct"].to_string().contains("services/echo"))
        },
    )
    .await;
    tcp_round("direct").await;
    wait_until(
        "tcp counted on the direct tier",
        Duration::from_secs(10),
        || async { tcp_served("direct").await == 1.0 },
    )
    .await;
    assert_eq!(tcp_served("group").await, 1.0);
    assert_eq!(tcp_served("central").await, 1.0);
}

/// A gRPC client only changes its target to the sidecar: unary, streaming
/// and trailers pass through the group gateways (h2c), and through the
/// sidecar's own balancing in direct mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_the_sidecar_in_gateway_and_direct_mode() {
    let m = Mesh::start().await;
    let d = m.dir.path().to_path_buf();
    let (_server, port) = py_server(&d, "grpc_peer.py", "grpc-server").await;
    let svc = serde_json::json!({"group": "shop", "protocol": "grpc", "endpoints": [{"address": addr(port)}]});
    assert_eq!(m.admin.put("services/echo", &svc).await.status, 201);
    let dests = |mode: &str| serde_json::json!({"group": "shop", "destinations": [{"service": "orders"}, {"service": "echo", "mode": mode}]});
    assert_eq!(
        m.admin
            .put("services/frontend", &dests("gateway"))
            .await
            .status,
        200
    );
    let local = free_port();
    let central = vec![addr(m.gws[2].1.mesh)];
    let (_sc, p) = start_sidecar_with(
        &d,
        "sc-grpc",
        "frontend",
        "shop",
        &central,
        &m.etcd.endpoint(),
        serde_json::json!({"local_ports": [{"listen": addr(local), "service": "echo"}]}),
    );
    wait_ready(p.ops).await;
    let config = format!("http://127.0.0.1:{}/config", p.ops);
    wait_until(
        "the sidecar covers echo",
        Duration::from_secs(15),
        || async {
            get_json(&config).await.is_some_and(|c| {
                c["destinations"]["echo"] == "gateway"
                    && c["tiers"]["group"].as_array().map(Vec::len) == Some(2)
            })
        },
    )
    .await;
    let target = addr(local);
    let grpc_ok = |tier: &'static str| {
        let ops = p.ops;
        async move {
            let sample = format!(
                "meshgate_sidecar_requests_total{{class=\"2xx\",destination=\"echo\",tier=\"{tier}\"}}"
            );
            metric(ops, &sample).await
        }
    };
    for mode in ["gateway", "direct"] {
        if mode == "direct" {
            assert_eq!(
                m.admin
                    .put("services/frontend", &dests("direct"))
                    .await
                    .status,
                200
            );
            wait_until(
                "echo compiled for direct mode",
                Duration::from_secs(15),
                || async {
                    get_json(&config)
                        .await
                        .is_some_and(|c| c["direct"].to_string().contains("services/echo"))
                },
            )
            .await;
        }
        let r = py("grpc_peer.py", &["client", &target, "Say", mode]).await;
        assert_eq!(
            r["reply"],
            serde_json::json!([format!("echo:{mode}")]),
            "{r}"
        );
        let r = py("grpc_peer.py", &["client", &target, "Count", "3"]).await;
        assert_eq!(r["reply"], serde_json::json!(["0", "1", "2"]), "{r}");
        assert_eq!(r["trailers"]["x-trailer"], "yes", "{r}");
        let r = py("grpc_peer.py", &["client", &target, "Say", "fail"]).await;
        assert_eq!(r["code"], "NOT_FOUND", "{r}");
    }
    assert_eq!(grpc_ok("group").await, 3.0);
    assert_eq!(grpc_ok("direct").await, 3.0);
}
