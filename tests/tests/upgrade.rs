//! End-to-end: operating a running mesh. A hot upgrade (a new binary
//! takes over the listening sockets over the upgrade socket) under steady
//! load — HTTP/1.1 on kept-alive and new connections, HTTP/2 cleartext,
//! GET and POST — fails no request and refuses no connection, for the
//! gateway and for the sidecar; and SIGTERM drains in the order load
//! balancers need: readiness first, listeners still accepting for the
//! drain delay, then closed, with requests in flight finished.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meshgate_loadtest::{run, LoadConfig, Progress, Report};
use meshgate_tests::*;

/// Kills a process the test did not spawn itself (the successor a
/// running process started) when dropped.
struct Successor(i32);

impl Drop for Successor {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.0);
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..500 {
            if kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// Runs `binary upgrade --socket <socket>`; the new process's pid.
async fn upgrade(binary: &str, socket: &Path) -> i32 {
    let out = tokio::process::Command::new(bin(binary))
        .arg("upgrade")
        .arg("--socket")
        .arg(socket)
        .output()
        .await
        .expect("run the upgrade command");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "upgrade failed: {text}");
    text.split_whitespace()
        .skip_while(|w| *w != "process")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"))
}

/// The steady load: HTTP/1.1 on kept-alive connections and on a new
/// connection per request, HTTP/2 cleartext with concurrent streams; GET
/// and POST each; open loop, `rate` per second each, for `duration`.
fn loads(port: u16, host: &str, rate: f64, duration: Duration) -> Vec<(String, LoadConfig)> {
    let mut out = Vec::new();
    for (proto, http2, fresh) in [
        ("http/1.1 kept alive", false, false),
        ("http/1.1 new connections", false, true),
        ("h2c", true, false),
    ] {
        for method in [http::Method::GET, http::Method::POST] {
            let mut c = LoadConfig::new("127.0.0.1", port, "/load");
            c.headers
                .insert(http::header::HOST, host.parse().expect("host"));
            c.method = method.clone();
            if method == http::Method::POST {
                c.body = bytes::Bytes::from_static(b"{\"order\": 1}");
                c.headers.insert(
                    http::header::CONTENT_TYPE,
                    "application/json".parse().unwrap(),
                );
            }
            c.http2 = http2;
            c.streams = 4;
            c.connections = 2;
            c.new_connections = fresh;
            c.rate = Some(rate);
            c.duration = duration;
            c.timeout = Duration::from_secs(15);
            out.push((format!("{proto} {method}"), c));
        }
    }
    out
}

/// Runs `loads` while `during` runs; the reports once both are done.
async fn under_load<F: std::future::Future<Output = ()>>(
    loads: Vec<(String, LoadConfig)>,
    during: impl FnOnce(Vec<Arc<Progress>>) -> F,
) -> Vec<(String, Report)> {
    let mut tasks = Vec::new();
    let mut progress = Vec::new();
    for (name, cfg) in loads {
        let p = Arc::new(Progress::default());
        progress.push(p.clone());
        tasks.push((name, tokio::spawn(run(cfg, p))));
    }
    during(progress).await;
    let mut reports = Vec::new();
    for (name, t) in tasks {
        reports.push((name, t.await.expect("load task")));
    }
    reports
}

/// Waits until every load has had `n` more answers than it had when
/// called: traffic flows through whatever serves now.
async fn flowing(progress: &[Arc<Progress>], n: u64, what: &str) {
    let from: Vec<u64> = progress
        .iter()
        .map(|p| p.done.load(Ordering::Relaxed))
        .collect();
    let progress = progress.to_vec();
    wait_until(what, Duration::from_secs(30), || {
        let (progress, from) = (progress.clone(), from.clone());
        async move {
            progress
                .iter()
                .zip(&from)
                .all(|(p, f)| p.done.load(Ordering::Relaxed) >= f + n)
        }
    })
    .await;
}

/// Every load answered every request: none failed (a refused connection
/// counts as `connect`), and each sent some.
fn assert_nothing_failed(reports: &[(String, Report)]) -> u64 {
    for (name, r) in reports {
        assert_eq!(
            r.error_count(),
            0,
            "{name}: {}\n{:?}",
            r.table(),
            r.failures
        );
        assert!(r.requests > 100, "{name}: too little load: {}", r.table());
        assert_eq!(r.unsent, 0, "{name}: {}", r.table());
    }
    reports.iter().map(|(_, r)| r.ok).sum()
}

/// A standalone gateway routing everything to `b`, with an upgrade socket
/// in `dir`; returned once the socket answers.
async fn upgradable_gateway(dir: &Path, b: &Backend) -> (Proc, GatewayPorts, std::path::PathBuf) {
    let socket = dir.join("gateway.sock");
    let (gw, ports, _) = start_standalone_with(
        dir,
        &orders_everywhere(b.addr),
        &["--upgrade-socket", socket.to_str().unwrap()],
    )
    .await;
    let s = socket.clone();
    wait_until("the upgrade socket is up", Duration::from_secs(10), || {
        let s = s.clone();
        async move { std::os::unix::net::UnixStream::connect(&s).is_ok() }
    })
    .await;
    (gw, ports, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_upgrade_under_load_fails_no_request_and_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let (mut old, ports, socket) = upgradable_gateway(dir.path(), &b).await;
    let old_pid = old.pid();
    let work = loads(ports.ingress, "a.example", 60.0, Duration::from_secs(12));
    let mut successor = None;
    let reports = under_load(work, |progress| {
        let successor = &mut successor;
        let old = &mut old;
        let socket = &socket;
        async move {
            flowing(&progress, 30, "load flows through the old process").await;
            let pid = upgrade("meshgate-gateway", socket).await;
            *successor = Some(Successor(pid));
            assert_ne!(pid, old_pid);
            let st = old.wait_exit(Duration::from_secs(30)).await;
            assert!(
                st.is_some_and(|s| s.success()),
                "the old process drains and exits cleanly: {st:?}"
            );
            flowing(&progress, 30, "load flows through the new process").await;
        }
    })
    .await;
    let ok = assert_nothing_failed(&reports);
    // Each request reached the backend once: none lost, none repeated.
    assert_eq!(b.hits(), ok);
    // The new process serves the ops port and is ready.
    let ready = get_json(&format!("http://127.0.0.1:{}/readyz", ports.ops))
        .await
        .expect("the new process answers on the ops port");
    assert_eq!(ready["ready"], true, "{ready}");
    // It can be upgraded in turn: it answers on the same socket.
    let again = upgrade("meshgate-gateway", &socket).await;
    let _again = Successor(again);
    drop(successor);
    let r = http_get(
        &format!("http://127.0.0.1:{}/x", ports.ingress),
        &[("host", "a.example")],
    )
    .await
    .expect("the third process serves");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_running_gateway_serving() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let (mut gw, ports, socket) = upgradable_gateway(dir.path(), &b).await;
    // A second gateway on the same ports without --takeover is refused
    // at start, naming the socket.
    let out = std::process::Command::new(bin("meshgate-gateway"))
        .args([
            "--standalone",
            dir.path().join("mesh.yaml").to_str().unwrap(),
            "--listen",
            &addr(free_port()),
            "--ingress-listen",
            &addr(free_port()),
            "--admin-listen",
            &addr(free_port()),
            "--upgrade-socket",
            socket.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("upgrade_socket: another process serves"),
        "{err}"
    );
    // A successor that dies before serving (its ingress port is taken by
    // someone else: it cannot bind a listener the old one does not have)
    // leaves the old process serving, its registrations untouched.
    let takeover = std::process::Command::new(bin("meshgate-gateway"))
        .args([
            "--standalone",
            dir.path().join("mesh.yaml").to_str().unwrap(),
            "--listen",
            &addr(ports.mesh),
            "--ingress-listen",
            &addr(ports.ingress),
            "--admin-listen",
            &addr(ports.ops),
            "--ingress-tls-listen",
            &addr(b.addr.port()),
            "--takeover",
            socket.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!takeover.status.success());
    let err = String::from_utf8_lossy(&takeover.stderr);
    assert!(err.contains("ingress_tls.listen: cannot bind"), "{err}");
    wait_until(
        "the old process logs the failed upgrade",
        Duration::from_secs(10),
        || {
            let log = gw.log_text();
            async move { log.contains("the successor went away before serving; still serving") }
        },
    )
    .await;
    assert!(gw.running());
    let r = http_get(
        &format!("http://127.0.0.1:{}/x", ports.ingress),
        &[("host", "a.example")],
    )
    .await
    .expect("the old process still serves");
    assert_eq!(r.status, 200);
    // And a later upgrade works.
    let pid = upgrade("meshgate-gateway", &socket).await;
    let _s = Successor(pid);
    assert!(gw.wait_exit(Duration::from_secs(30)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_upgrade_while_its_app_sends_traffic_fails_nothing() {
    let m = Mesh::start().await;
    let d = m.dir.path();
    let socket = d.join("sidecar.sock");
    let central = vec![addr(m.gws[2].1.mesh)];
    let (mut old, ports) = start_sidecar_with(
        d,
        "sc-up",
        "frontend",
        "shop",
        &central,
        &m.etcd.endpoint(),
        serde_json::json!({"upgrade_socket": socket}),
    );
    wait_ready(ports.ops).await;
    let s = socket.clone();
    wait_until("the upgrade socket is up", Duration::from_secs(10), || {
        let s = s.clone();
        async move { std::os::unix::net::UnixStream::connect(&s).is_ok() }
    })
    .await;
    // The sidecar's node record, under the old process's lease.
    let key = "/meshgate/v1/nodes/sidecar/sc-up";
    let mut etcd = m.etcd.client().await;
    let lease_of = |kvs: &[etcd_client::KeyValue]| kvs.first().map(|kv| kv.lease());
    let old_lease = lease_of(etcd.get(key, None).await.unwrap().kvs()).expect("registered");
    let before = m.b1.hits() + m.b2.hits();
    let work = loads(ports.app, "orders", 40.0, Duration::from_secs(12));
    let mut successor = None;
    let reports = under_load(work, |progress| {
        let successor = &mut successor;
        let old = &mut old;
        let socket = &socket;
        async move {
            flowing(&progress, 20, "the app's traffic flows").await;
            *successor = Some(Successor(upgrade("lite-sidecar", socket).await));
            let st = old.wait_exit(Duration::from_secs(30)).await;
            assert!(st.is_some_and(|s| s.success()), "{st:?}");
            flowing(
                &progress,
                20,
                "the app's traffic flows through the new sidecar",
            )
            .await;
        }
    })
    .await;
    let ok = assert_nothing_failed(&reports);
    assert_eq!(m.b1.hits() + m.b2.hits() - before, ok);
    // The node record is the successor's, under its own lease: the old
    // process wrote nothing once it handed over, so the end of its lease
    // cannot take the record away.
    wait_until(
        "the record is under the successor's lease",
        Duration::from_secs(10),
        || {
            let mut etcd = etcd.clone();
            async move {
                let kvs = etcd.get(key, None).await.map(|r| r.kvs().to_vec());
                kvs.ok()
                    .and_then(|k| lease_of(&k))
                    .is_some_and(|l| l != old_lease && l != 0)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_takes_readiness_down_first_accepts_for_the_drain_delay_then_closes() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Backend::start("slow").await;
    let (mut gw, ports, _) = start_standalone_with(
        dir.path(),
        &orders_everywhere(slow.addr),
        &["--drain-delay-ms", "6000"],
    )
    .await;
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", ports.ingress);
    // A request that takes 8 s is in flight at SIGTERM: longer than the
    // drain delay, within the grace time after it.
    let long = url("/delay/8000");
    let in_flight = tokio::spawn(async move { http_get(&long, &[("host", "a.example")]).await });
    let hits = slow.hits.clone();
    wait_until(
        "the request reached the backend",
        Duration::from_secs(10),
        || {
            let hits = hits.clone();
            async move { hits.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    gw.sigterm();
    // Readiness goes down first...
    let readyz = format!("http://127.0.0.1:{}/readyz", ports.ops);
    wait_until("readiness goes false", Duration::from_secs(5), || {
        let readyz = readyz.clone();
        async move {
            get_json(&readyz)
                .await
                .is_some_and(|v| v["ready"] == false && v["draining"] == true)
        }
    })
    .await;
    // ...while new connections are still accepted and served.
    let r = http_get(&url("/after"), &[("host", "a.example")])
        .await
        .expect("a new connection during the drain delay is served");
    assert_eq!(r.status, 200);
    assert!(!in_flight.is_finished());
    // Then the listeners close.
    let port = ports.ingress;
    wait_until(
        "the listener closes",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        },
    )
    .await;
    // The request in flight finished, and the process exited cleanly.
    let r = in_flight
        .await
        .unwrap()
        .expect("the request in flight completed");
    assert_eq!(r.status, 200);
    let st = gw.wait_exit(Duration::from_secs(20)).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
}

/// The service manager's side of `sd_notify`: the datagrams a process
/// sends to `NOTIFY_SOCKET`.
struct Manager(std::os::unix::net::UnixDatagram);

impl Manager {
    fn bind(path: &Path) -> Manager {
        let s = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Manager(s)
    }

    /// The next message (blocking, bounded).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_manager_hears_ready_the_successors_pid_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start("b").await;
    let notify = dir.path().join("notify.sock");
    let manager = Manager::bind(&notify);
    let socket = dir.path().join("gateway.sock");
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, orders_everywhere(b.addr)).unwrap();
    let ops = free_port();
    let args: Vec<String> = [
        "--standalone",
        file.to_str().unwrap(),
        "--listen",
        &addr(free_port()),
        "--ingress-listen",
        &addr(free_port()),
        "--admin-listen",
        &addr(ops),
        "--upgrade-socket",
        socket.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut old = Proc::spawn_env(
        "gateway",
        &bin("meshgate-gateway"),
        &args,
        dir.path(),
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    // Ready once the config is applied (the ops port then says so too).
    let m = tokio::task::spawn_blocking(move || (manager.next(), manager))
        .await
        .unwrap();
    let (first, manager) = m;
    assert_eq!(first, "READY=1");
    wait_ready(ops).await;
    // An upgrade: the old process hands the main pid to its successor,
    // which reports ready.
    let pid = upgrade("meshgate-gateway", &socket).await;
    let _s = Successor(pid);
    let (msgs, manager) = tokio::task::spawn_blocking(move || {
        let msgs = vec![manager.next(), manager.next()];
        (msgs, manager)
    })
    .await
    .unwrap();
    assert!(msgs.contains(&format!("MAINPID={pid}")), "{msgs:?}");
    assert!(msgs.contains(&"READY=1".to_string()), "{msgs:?}");
    assert!(old.wait_exit(Duration::from_secs(30)).await.is_some());
    // SIGTERM to the successor: stopping.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let last = tokio::task::spawn_blocking(move || manager.next())
        .await
        .unwrap();
    assert_eq!(last, "STOPPING=1");
}
