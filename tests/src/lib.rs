//! Test harness for Meshgate's end-to-end tests: starts a real etcd, the
//! real `meshgate-gateway`, `lite-sidecar` and `meshgate-admin` binaries,
//! and HTTP backends on real sockets, all on 127.0.0.1 with free ports.
//! Waits are conditions with deadlines, never bare sleeps. Process logs go
//! to files, and their tails are printed when a test fails.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The workspace's target dir for the current profile (where the binaries are).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary, building the binaries once per test process
/// so tests never run stale ones.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root).args(["build", "--bins", "-q"]);
        if bin_dir().ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build --bins failed");
    });
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --bins` first",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1, never one handed out before in this test
/// process. The port is released before the process under test binds it,
/// so the kernel may offer it again meanwhile: two gateways of one test
/// were once given the same port.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

pub fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Waits until `f` returns true, polling every 50 ms; panics with `what`
/// after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === processes ===

/// A child process, killed when dropped. Its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Proc {
        Self::spawn_env(name, program, args, dir, &[])
    }

    /// [`Proc::spawn`] with more environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Proc {
        let mut p = Proc {
            name: name.to_string(),
            child: None,
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: dir.join(format!("{name}.log")),
        };
        p.start();
        p
    }

    /// (Re)starts the process with its original arguments.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.program)
            .args(&self.args)
            .env(
                "MESHGATE_LOG",
                "info,meshgate_gateway=debug,lite_sidecar=debug",
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            // The test's own directory (beside its log), never the repo.
            .current_dir(self.log.parent().expect("the log is in a directory"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// The exit status if the process has exited (then reaped).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(st)
    }

    /// SIGTERM and wait (bounded; SIGKILL after `timeout`). Returns the exit status.
    pub fn term(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Waits (bounded) for the process to exit by itself; its status, or
    /// `None` if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last `n` lines of the process's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("----- last lines of {} -----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A real etcd cluster of several members on loopback, each with its own
/// data dir and ports.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    pub async fn start(dir: &Path, n: usize) -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let etcd = which("etcd")
            .expect("etcd not installed: run scripts/test.sh (it installs etcd-server)");
        let members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let args: Vec<String> = [
                    "--name".to_string(),
                    format!("m{i}"),
                    "--data-dir".into(),
                    dir.join(format!("etcd-m{i}")).to_string_lossy().into(),
                    "--listen-client-urls".into(),
                    format!("http://127.0.0.1:{client}"),
                    "--advertise-client-urls".into(),
                    format!("http://127.0.0.1:{client}"),
                    "--listen-peer-urls".into(),
                    format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster".into(),
                    initial.join(","),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--log-level".into(),
                    "warn".into(),
                ]
                .into();
                Etcd {
                    proc: Proc::spawn(&format!("etcd-m{i}"), &etcd, &args, dir),
                    client_port: *client,
                    tls_ca: None,
                }
            })
            .collect();
        // Each is healthy once the cluster has a leader.
        for m in &members {
            m.wait_healthy().await;
        }
        EtcdCluster { members }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// The index of the current leader, as the members that answer see it.
    pub async fn leader(&self) -> usize {
        let mut ids = Vec::new();
        let mut leader = None;
        for m in &self.members {
            let Ok(mut c) = m.client_as(None).await else {
                ids.push(None);
                continue;
            };
            match c.status().await {
                Ok(st) => {
                    ids.push(st.header().map(|h| h.member_id()));
                    leader = Some(st.leader());
                }
                Err(_) => ids.push(None),
            }
        }
        let leader = leader.expect("a member answers");
        ids.iter()
            .position(|id| *id == Some(leader))
            .expect("the leader is a member")
    }
}

/// A real etcd server with its own data dir and ports.
pub struct Etcd {
    pub proc: Proc,
    pub client_port: u16,
    /// Served over TLS: the CA its certificate chains to (PEM).
    pub tls_ca: Option<String>,
}

impl Etcd {
    pub async fn start(dir: &Path) -> Etcd {
        Self::start_with(dir, None, &[]).await
    }

    /// etcd serving its clients over TLS with `cert` (for 127.0.0.1),
    /// signed by `ca`; `extra` flags are passed on (e.g.
    /// `--auth-token-ttl`).
    pub async fn start_tls(dir: &Path, ca: &TestCa, extra: &[&str]) -> Etcd {
        let leaf = ca.leaf(&["127.0.0.1", "localhost"]);
        std::fs::write(dir.join("etcd.crt"), &leaf.cert).unwrap();
        std::fs::write(dir.join("etcd.key"), &leaf.key).unwrap();
        let mut args = vec![
            "--cert-file".to_string(),
            dir.join("etcd.crt").to_string_lossy().into(),
            "--key-file".into(),
            dir.join("etcd.key").to_string_lossy().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(dir, Some(ca.pem.clone()), &args).await
    }

    async fn start_with(dir: &Path, tls_ca: Option<String>, extra: &[String]) -> Etcd {
        let scheme = if tls_ca.is_some() { "https" } else { "http" };
        let client_port = free_port();
        let peer_port = free_port();
        let data = Etcd::data_dir(dir);
        let args: Vec<String> = [
            "--name",
            "test",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &format!("{scheme}://127.0.0.1:{client_port}"),
            "--advertise-client-urls",
            &format!("{scheme}://127.0.0.1:{client_port}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer_port}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer_port}"),
            "--initial-cluster",
            &format!("test=http://127.0.0.1:{peer_port}"),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect();
        let etcd = which("etcd")
            .expect("etcd not installed: run scripts/test.sh (it installs etcd-server)");
        let e = Etcd {
            proc: Proc::spawn("etcd", &etcd, &args, dir),
            client_port,
            tls_ca,
        };
        e.wait_healthy().await;
        e
    }

    /// The data directory (`start`'s).
    pub fn data_dir(dir: &Path) -> PathBuf {
        dir.join("etcd-data")
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub async fn wait_healthy(&self) {
        if self.tls_ca.is_some() {
            wait_until("etcd healthy (TLS)", Duration::from_secs(20), || async {
                let Ok(mut c) = self.client_as(None).await else {
                    return false;
                };
                c.status().await.is_ok()
            })
            .await;
            return;
        }
        let url = format!("{}/health", self.endpoint());
        wait_until("etcd healthy", Duration::from_secs(20), || async {
            matches!(http_get(&url, &[]).await, Ok(r) if r.status == 200 && r.body.contains("true"))
        })
        .await;
    }

    /// Stops etcd (SIGTERM, like an operator would).
    pub fn stop(&mut self) {
        self.proc.term(Duration::from_secs(10));
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.proc.start();
        self.wait_healthy().await;
    }

    pub async fn client(&self) -> etcd_client::Client {
        self.client_as(None).await.expect("etcd client")
    }

    /// A client over TLS when etcd serves it, as `user` (name, password)
    /// when given.
    pub async fn client_as(
        &self,
        user: Option<(&str, &str)>,
    ) -> Result<etcd_client::Client, etcd_client::Error> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.tls_ca {
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(ca.as_bytes())),
            );
        }
        if let Some((name, password)) = user {
            opts = opts.with_user(name, password);
        }
        etcd_client::Client::connect([self.endpoint()], Some(opts)).await
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

// === HTTP client ===

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static C: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    C.get_or_init(|| {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build_http()
    })
}

/// Sends a request; errors are transport errors only.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Resp, String> {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let fut = client().request(req);
    let resp = tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("{e} ({e:?})"))?
        .to_bytes();
    Ok(Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends `bytes` as they are on a new connection to `port` and returns
/// everything the server writes; the server must close the connection
/// within 10 s (a test of malformed input wants it closed).
pub async fn raw_exchange(port: u16, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("server closed the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<Resp, String> {
    http("GET", url, headers, "").await
}

// === backends ===

/// An HTTP backend on a real socket, answering `x-served-by: <name>` and
/// counting the requests it served (`/healthz` requests are counted apart).
///
/// Paths: `/status/<code>` answers that status, `/delay/<ms>` waits first,
/// `/stall` sends its headers and one chunk and then nothing more, `/echo`
/// answers the request body, chunked.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Health-check requests (`/healthz`) received.
    pub health_hits: Arc<AtomicU64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    /// Bodies of POST requests received, in order.
    pub posts: Arc<Mutex<Vec<String>>>,
    /// When non-zero, every request (but `/healthz`) gets this status.
    pub fail: Arc<std::sync::atomic::AtomicU16>,
    /// When non-zero, `/healthz` answers this status (else 200).
    pub health: Arc<std::sync::atomic::AtomicU16>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Connections being served now.
    open: Arc<AtomicU64>,
}

/// Counts a served connection until dropped.
struct OpenConn(Arc<AtomicU64>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_on(name, 0).await
    }

    pub async fn start_on(name: &str, port: u16) -> Backend {
        Self::start_with(name, port, Duration::ZERO).await
    }

    /// A backend that waits `delay` before every answer.
    pub async fn start_slow(name: &str, delay: Duration) -> Backend {
        Self::start_with(name, 0, delay).await
    }

    async fn start_with(name: &str, port: u16, delay: Duration) -> Backend {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let health_hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let health = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let open = Arc::new(AtomicU64::new(0));
        let live = open.clone();
        let n: Arc<str> = Arc::from(name);
        let (h, p) = (hits.clone(), posts.clone());
        let (hh, cc, fl, hl) = (
            health_hits.clone(),
            conns.clone(),
            fail.clone(),
            health.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                cc.fetch_add(1, Ordering::SeqCst);
                live.fetch_add(1, Ordering::SeqCst);
                let served = OpenConn(live.clone());
                let (n, h, p) = (n.clone(), h.clone(), p.clone());
                let (hh, fl, hl) = (hh.clone(), fl.clone(), hl.clone());
                let mut stop_rx = stop_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (n, h, p) = (n.clone(), h.clone(), p.clone());
                        let (hh, fl, hl) = (hh.clone(), fl.clone(), hl.clone());
                        async move {
                            if req.uri().path() == "/healthz" {
                                hh.fetch_add(1, Ordering::SeqCst);
                                let s = match hl.load(Ordering::SeqCst) {
                                    0 => 200,
                                    s => s,
                                };
                                return Ok::<_, BackendError>(
                                    http::Response::builder()
                                        .status(s)
                                        .body(TestBody::Full(Full::new(Bytes::new())))
                                        .unwrap(),
                                );
                            }
                            h.fetch_add(1, Ordering::SeqCst);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let method = req.method().clone();
                            let path = req.uri().path().to_string();
                            // `?cc=<cache-control>&vary=<header>&sleep_ms=<ms>`:
                            // the answer's caching headers (the body then
                            // names the varying header's value).
                            let (mut cache_control, mut vary) = (None, None);
                            for (k, v) in
                                form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                            {
                                match &*k {
                                    "cc" => cache_control = Some(v.into_owned()),
                                    "vary" => vary = Some(v.into_owned()),
                                    "sleep_ms" => {
                                        let ms = v.parse().unwrap_or(0);
                                        tokio::time::sleep(Duration::from_millis(ms)).await;
                                    }
                                    _ => {}
                                }
                            }
                            let varied = vary.as_deref().map(|h| {
                                req.headers()
                                    .get(h)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("-")
                                    .to_string()
                            });
                            let src = req
                                .headers()
                                .get("x-mesh-source")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            if method == http::Method::POST {
                                p.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&body).into_owned());
                            }
                            let status = match fl.load(Ordering::SeqCst) {
                                RESET => {
                                    return Err(std::io::Error::other("reset by test backend"))
                                }
                                0 => path
                                    .strip_prefix("/status/")
                                    .and_then(|c| c.parse().ok())
                                    .unwrap_or(200),
                                s => s,
                            };
                            if path == "/echo" {
                                // The request body back, framed chunked
                                // (a stream of unknown length).
                                let chunks = futures::stream::iter([Ok::<_, Infallible>(
                                    hyper::body::Frame::data(body),
                                )]);
                                return Ok(http::Response::builder()
                                    .status(status)
                                    .header("x-served-by", &*n)
                                    .body(TestBody::Stream(Box::pin(
                                        http_body_util::StreamBody::new(chunks),
                                    )))
                                    .unwrap());
                            }
                            if path == "/stall" {
                                // One chunk, then silence (the stream never ends).
                                let chunks = futures::stream::iter([Ok::<_, Infallible>(
                                    hyper::body::Frame::data(Bytes::from_static(b"partial")),
                                )])
                                .chain(futures::stream::pending());

                                return Ok(http::Response::builder()
                                    .header("x-served-by", &*n)
                                    .body(TestBody::Stream(Box::pin(
                                        http_body_util::StreamBody::new(chunks),
                                    )))
                                    .unwrap());
                            }
                            if let Some(ms) = path
                                .strip_prefix("/delay/")
                                .and_then(|v| v.parse::<u64>().ok())
                            {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let mut resp = http::Response::builder()
                                .status(status)
                                .header("x-served-by", &*n)
                                .header("x-seen-source", src);
                            if let Some(cc) = &cache_control {
                                resp = resp.header("cache-control", cc.as_str());
                            }
                            if let Some(v) = &vary {
                                resp = resp.header("vary", v.as_str());
                            }
                            let text = match &varied {
                                Some(v) => format!("{n} {v}\n"),
                                None => format!("{n}\n"),
                            };
                            let resp = resp
                                .body(TestBody::Full(Full::new(Bytes::from(text))))
                                .unwrap();
                            Ok::<_, BackendError>(resp)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop_rx.wait_for(|s| *s) => {}
                    }
                    drop(served);
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            hits,
            health_hits,
            conns,
            posts,
            fail,
            health,
            stop,
            task,
            open,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Answer every request (but `/healthz`) with `status` (0: normally;
    /// [`RESET`]: close the connection without an answer).
    pub fn set_fail(&self, status: u16) {
        self.fail.store(status, Ordering::SeqCst);
    }

    /// Answer `/healthz` with `status` (0: 200).
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    /// Stops listening and closes every open connection; returns once
    /// connects are refused and no connection is open.
    pub async fn stop(&self) {
        self.halt();
        wait_until(
            &format!("backend {} stopped", self.name),
            Duration::from_secs(10),
            || async {
                self.open.load(Ordering::SeqCst) == 0
                    && tokio::net::TcpStream::connect(self.addr).await.is_err()
            },
        )
        .await;
    }

    /// Starts stopping (the listener and connections close when their
    /// tasks next run).
    fn halt(&self) {
        self.task.abort();
        let _ = self.stop.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `Backend::set_fail(RESET)`: requests get their connection closed, no answer.
pub const RESET: u16 = 1;

type BackendError = std::io::Error;

/// A backend response body: whole, or streamed.
pub enum TestBody {
    Full(Full<Bytes>),
    Stream(
        std::pin::Pin<
            Box<dyn hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static>,
        >,
    ),
}

impl hyper::body::Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            TestBody::Full(b) => std::pin::Pin::new(b).poll_frame(cx),
            TestBody::Stream(s) => s.as_mut().poll_frame(cx),
        }
    }
}

// === mesh processes ===

/// Ports of a gateway.
#[derive(Debug, Clone, Copy)]
pub struct GatewayPorts {
    pub mesh: u16,
    pub ingress: u16,
    pub ops: u16,
}

/// Writes `model` (config-model YAML) to `mesh.yaml` in `dir` and starts a
/// standalone gateway on it; returns once it is ready.
pub async fn start_standalone(dir: &Path, model: &str) -> (Proc, GatewayPorts, PathBuf) {
    start_standalone_with(dir, model, &[]).await
}

/// [`start_standalone`] with extra gateway arguments (e.g. `--zone z1`).
pub async fn start_standalone_with(
    dir: &Path,
    model: &str,
    extra: &[&str],
) -> (Proc, GatewayPorts, PathBuf) {
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, model).unwrap();
    let ports = GatewayPorts {
        mesh: free_port(),
        ingress: free_port(),
        ops: free_port(),
    };
    let mut args: Vec<String> = vec![
        "--standalone".into(),
        file.to_string_lossy().into(),
        "--listen".into(),
        addr(ports.mesh),
        "--ingress-listen".into(),
        addr(ports.ingress),
        "--admin-listen".into(),
        addr(ports.ops),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = Proc::spawn("gateway", &bin("meshgate-gateway"), &args, dir);
    wait_ready(ports.ops).await;
    (p, ports, file)
}

/// Writes a gateway node config and starts the gateway.
pub fn start_gateway(
    dir: &Path,
    id: &str,
    roles: &[&str],
    groups: &[&str],
    etcd: &str,
) -> (Proc, GatewayPorts) {
    start_gateway_with(dir, id, roles, groups, etcd, serde_json::json!({}))
}

/// [`start_gateway`] with more node-config fields (`extra`, an object).
pub fn start_gateway_with(
    dir: &Path,
    id: &str,
    roles: &[&str],
    groups: &[&str],
    etcd: &str,
    extra: serde_json::Value,
) -> (Proc, GatewayPorts) {
    let ports = GatewayPorts {
        mesh: free_port(),
        ingress: free_port(),
        ops: free_port(),
    };
    let mut cfg = serde_json::json!({
        "id": id,
        "roles": roles,
        "groups": groups,
        "listen": addr(ports.mesh),
        "ingress_listen": addr(ports.ingress),
        "admin_listen": addr(ports.ops),
        "store": {"etcd": {"endpoints": [etcd], "timeout_ms": 1000}},
        "snapshot_file": dir.join(format!("{id}.snapshot.json")),
        "lease_ttl_s": 5,
        "shutdown_grace_ms": 3000,
    });
    overlay(&mut cfg, extra);
    let p = spawn_with_config(dir, id, "meshgate-gateway", &cfg);
    (p, ports)
}

/// Writes `cfg` as `<name>.yaml` in `dir` and starts `binary --config` on it.
/// Sets every top-level field of `extra` (an object) on `cfg`.
fn overlay(cfg: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(cfg), serde_json::Value::Object(extra)) = (cfg.as_object_mut(), extra) {
        cfg.extend(extra);
    }
}

fn spawn_with_config(dir: &Path, name: &str, binary: &str, cfg: &serde_json::Value) -> Proc {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(cfg).unwrap()).unwrap();
    Proc::spawn(
        name,
        &bin(binary),
        &["--config".into(), path.to_string_lossy().into()],
        dir,
    )
}

/// Ports of a sidecar.
#[derive(Debug, Clone, Copy)]
pub struct SidecarPorts {
    pub app: u16,
    pub ops: u16,
}

/// Writes a sidecar node config and starts the sidecar.
pub fn start_sidecar(
    dir: &Path,
    id: &str,
    service: &str,
    group: &str,
    central: &[String],
    etcd: &str,
) -> (Proc, SidecarPorts) {
    start_sidecar_with(
        dir,
        id,
        service,
        group,
        central,
        etcd,
        serde_json::json!({}),
    )
}

/// [`start_sidecar`] with more node-config fields (`extra`, an object,
/// overrides the defaults).
pub fn start_sidecar_with(
    dir: &Path,
    id: &str,
    service: &str,
    group: &str,
    central: &[String],
    etcd: &str,
    extra: serde_json::Value,
) -> (Proc, SidecarPorts) {
    let ports = SidecarPorts {
        app: free_port(),
        ops: free_port(),
    };
    let mut cfg = serde_json::json!({
        "id": id,
        "service": service,
        "group": group,
        "listen": addr(ports.app),
        "admin_listen": addr(ports.ops),
        "central": central,
        "store": {"etcd": {"endpoints": [etcd], "timeout_ms": 1000}},
        "snapshot_file": dir.join(format!("{id}.snapshot.json")),
        "lease_ttl_s": 5,
    });
    overlay(&mut cfg, extra);
    let p = spawn_with_config(dir, id, "lite-sidecar", &cfg);
    (p, ports)
}

/// Runs `meshctl` against `server` with `token` (and `--cacert`);
/// returns (success, stdout and stderr).
pub fn meshctl(server: &str, token: &str, cacert: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(bin("meshctl"));
    cmd.args(["--server", server, "--token", token]);
    if let Some(ca) = cacert {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd.args(args).output().expect("run meshctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Starts `meshgate-admin` with a token; returns (proc, base url, token).
pub fn start_admin(dir: &Path, etcd: &str) -> (Proc, String, String) {
    start_admin_with(dir, etcd, serde_json::json!({}))
}

/// [`start_admin`] with more config fields (`extra`, an object).
pub fn start_admin_with(
    dir: &Path,
    etcd: &str,
    extra: serde_json::Value,
) -> (Proc, String, String) {
    let port = free_port();
    let token = "test-token-0123456789abcdef".to_string();
    let tokens = dir.join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - name: tests\n    token: {token}\n    role: admin\n  - name: reader\n    token: viewer-token-0123456789\n    role: viewer\n"),
    )
    .unwrap();
    let mut cfg = serde_json::json!({
        "listen": addr(port),
        "store": {"etcd": {"endpoints": [etcd], "timeout_ms": 1000}},
        "token_file": tokens,
    });
    overlay(&mut cfg, extra);
    let p = spawn_with_config(dir, "admin", "meshgate-admin", &cfg);
    (p, format!("http://127.0.0.1:{port}"), token)
}

/// A client of the admin API.
#[derive(Clone)]
pub struct Admin {
    pub base: String,
    pub token: String,
}

impl Admin {
    /// Waits (15 s at most) until exactly `n` nodes are registered.
    pub async fn wait_nodes(&self, n: usize) {
        wait_until(
            &format!("{n} node(s) registered"),
            Duration::from_secs(15),
            || async {
                self.get("nodes").await.json()["items"]
                    .as_array()
                    .map(Vec::len)
                    == Some(n)
            },
        )
        .await;
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Resp {
        let auth = self.auth();
        http(
            "PUT",
            &format!("{}/api/v1/{path}", self.base),
            &[("authorization", &auth)],
            &body.to_string(),
        )
        .await
        .expect("admin reachable")
    }

    /// Any call: `method` on `/api/v1/<path>` with a raw body and extra headers.
    pub async fn call(&self, method: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
        let auth = self.auth();
        let mut h = vec![("authorization", auth.as_str())];
        h.extend_from_slice(extra);
        http(method, &format!("{}/api/v1/{path}", self.base), &h, body)
            .await
            .expect("admin reachable")
    }

    pub async fn put_raw(&self, path: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
        let auth = self.auth();
        let mut h = vec![("authorization", auth.as_str())];
        h.extend_from_slice(extra);
        http("PUT", &format!("{}/api/v1/{path}", self.base), &h, body)
            .await
            .expect("admin reachable")
    }

    pub async fn get(&self, path: &str) -> Resp {
        let auth = self.auth();
        http_get(
            &format!("{}/api/v1/{path}", self.base),
            &[("authorization", &auth)],
        )
        .await
        .expect("admin reachable")
    }

    pub async fn delete(&self, path: &str) -> Resp {
        let auth = self.auth();
        http(
            "DELETE",
            &format!("{}/api/v1/{path}", self.base),
            &[("authorization", &auth)],
            "",
        )
        .await
        .expect("admin reachable")
    }

    /// Waits until the admin API answers.
    pub async fn wait_up(&self) {
        let url = format!("{}/healthz", self.base);
        wait_until("admin API up", Duration::from_secs(20), || async {
            matches!(http_get(&url, &[]).await, Ok(r) if r.status == 200)
        })
        .await;
    }
}

/// GETs `url` as JSON, `None` on any failure.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    let r = http_get(url, &[]).await.ok()?;
    serde_json::from_str(&r.body).ok()
}

/// Waits for a process's `/readyz` to say ready.
pub async fn wait_ready(ops_port: u16) {
    let url = format!("http://127.0.0.1:{ops_port}/readyz");
    wait_until(&format!("{url} ready"), Duration::from_secs(30), || async {
        matches!(http_get(&url, &[]).await, Ok(r) if r.status == 200)
    })
    .await;
}

/// Counts responses by `x-served-by` over `n` requests.
pub async fn served_by(url: &str, headers: &[(&str, &str)], n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let r = http_get(url, headers).await.expect("request");
        assert_eq!(r.status, 200, "unexpected response: {r:?}");
        *m.entry(r.header("x-served-by").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    m
}

/// Counts responses by `x-served-by` over `n` requests, whatever their
/// status.
pub async fn served_by_any(url: &str, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let r = http_get(url, &[]).await.expect("request");
        *m.entry(r.header("x-served-by").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    m
}

// === a whole mesh ===

/// etcd, admin, egress gateways `gw-a` and `gw-b` for group `shop`, central
/// gateway `gw-c`, sidecar `sc-1` (service `frontend` in `shop`), backends
/// `b1` and `b2` of service `orders`, and a mesh route for `orders`.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub etcd: Etcd,
    pub admin_proc: Proc,
    pub admin: Admin,
    pub gws: Vec<(Proc, GatewayPorts)>,
    pub sidecar: (Proc, SidecarPorts),
    pub b1: Backend,
    pub b2: Backend,
    /// With mutual TLS: the sidecars of `b1` and `b2` (service `orders`),
    /// whose inbound listeners are the service's instances.
    pub backend_sidecars: Vec<(Proc, SidecarPorts)>,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with(false).await
    }

    /// The mesh with mutual TLS on every hop when `mtls` (each process
    /// with a SPIFFE identity from one test CA, kept in files beside its
    /// snapshot, as a restarted process finds them): `orders` is then
    /// `mtls: strict`, its instances the inbound listeners of `b1`'s and
    /// `b2`'s sidecars.
    pub async fn start_with(mtls: bool) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path()).await;
        let ep = etcd.endpoint();
        let (admin_proc, base, token) = start_admin(dir.path(), &ep);
        let admin = Admin { base, token };
        admin.wait_up().await;
        let b1 = Backend::start("b1").await;
        let b2 = Backend::start("b2").await;
        assert_eq!(
            admin
                .put("groups/shop", &serde_json::json!({"description": "shop"}))
                .await
                .status,
            201
        );
        let svc = match mtls {
            true => serde_json::json!({"group": "shop", "mtls": "strict"}),
            false => {
                serde_json::json!({"group": "shop", "endpoints": [{"address": b1.addr.to_string()}, {"address": b2.addr.to_string()}]})
            }
        };
        let r = admin.put("services/orders", &svc).await;
        assert_eq!(r.status, 201, "{r:?}");
        let route = serde_json::json!({"scope": "mesh", "match": {"hosts": ["orders"]}, "backends": [{"service": "orders"}]});
        let r = admin.put("routes/orders", &route).await;
        assert_eq!(r.status, 201, "{r:?}");
        // The sidecar's service: its policy covers the calls to orders.
        let frontend =
            serde_json::json!({"group": "shop", "destinations": [{"service": "orders"}]});
        let r = admin.put("services/frontend", &frontend).await;
        assert_eq!(r.status, 201, "{r:?}");

        let d = dir.path();
        let ca = mtls.then(|| TestCa::new("Mesh root"));
        if let Some(ca) = &ca {
            // Written once, before any process reads it.
            std::fs::write(d.join("mesh-ca.pem"), &ca.pem).unwrap();
        }
        let identity = |name: &str, spiffe: &str| -> serde_json::Value {
            let Some(ca) = &ca else {
                return serde_json::json!({});
            };
            let leaf = ca.leaf(&[spiffe]);
            std::fs::write(d.join(format!("{name}.crt")), &leaf.cert).unwrap();
            std::fs::write(d.join(format!("{name}.key")), &leaf.key).unwrap();
            serde_json::json!({"mesh_tls": {
                "cert_file": d.join(format!("{name}.crt")),
                "key_file": d.join(format!("{name}.key")),
                "ca_file": d.join("mesh-ca.pem"),
            }})
        };
        let gateway = |id: &str, roles: &[&str], groups: &[&str]| {
            let extra = identity(id, &format!("spiffe://mesh.test/gateway/{id}"));
            start_gateway_with(d, id, roles, groups, &ep, extra)
        };
        let gws = vec![
            gateway("gw-a", &["egress"], &["shop"]),
            gateway("gw-b", &["egress"], &["shop"]),
            gateway("gw-c", &["central"], &[]),
        ];
        let central = vec![addr(gws[2].1.mesh)];
        let extra = identity("sc-1", "spiffe://mesh.test/group/shop/service/frontend");
        let sidecar = start_sidecar_with(d, "sc-1", "frontend", "shop", &central, &ep, extra);
        let mut backend_sidecars = Vec::new();
        for (id, b) in [("sc-b1", &b1), ("sc-b2", &b2)]
            .into_iter()
            .filter(|_| mtls)
        {
            let mut extra = identity(id, "spiffe://mesh.test/group/shop/service/orders");
            extra["app"] = serde_json::json!({"address": b.addr.to_string()});
            extra["inbound"] = serde_json::json!({"listen": addr(free_port())});
            backend_sidecars.push(start_sidecar_with(d, id, "orders", "shop", &[], &ep, extra));
        }
        for (_, p) in &gws {
            wait_ready(p.ops).await;
        }
        wait_ready(sidecar.1.ops).await;
        for (_, p) in &backend_sidecars {
            wait_ready(p.ops).await;
        }
        let m = Mesh {
            dir,
            etcd,
            admin_proc,
            admin,
            gws,
            sidecar,
            b1,
            b2,
            backend_sidecars,
        };
        m.wait_group_members(2).await;
        if mtls {
            // Every gateway has both instances.
            for (_, p) in &m.gws {
                let url = format!("http://127.0.0.1:{}/config", p.ops);
                wait_until(
                    "a gateway has both instances of orders",
                    Duration::from_secs(20),
                    || {
                        let url = url.clone();
                        async move {
                            let cfg = get_json(&url).await.unwrap_or_default();
                            cfg["objects"]["instances"].as_object().map(|o| o.len()) == Some(2)
                        }
                    },
                )
                .await;
            }
        }
        m
    }

    /// The sidecar's app URL for `path`.
    pub fn app_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.sidecar.1.app)
    }

    /// The sidecar's `/config` dump.
    pub async fn sidecar_config(&self) -> serde_json::Value {
        get_json(&format!("http://127.0.0.1:{}/config", self.sidecar.1.ops))
            .await
            .unwrap_or_default()
    }

    /// Waits until the sidecar's group tier has `n` members. On timeout,
    /// prints what the sidecar sees and the processes' logs.
    pub async fn wait_group_members(&self, n: usize) {
        let url = format!("http://127.0.0.1:{}/config", self.sidecar.1.ops);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let cfg = get_json(&url).await;
            if cfg
                .as_ref()
                .is_some_and(|v| v["tiers"]["group"].as_array().map(|a| a.len()) == Some(n))
            {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("sidecar /config: {cfg:?}");
                for p in self.gws.iter().map(|g| &g.0).chain([&self.sidecar.0]) {
                    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                    eprintln!("--- {} log ---\n{log}", p.name);
                }
                panic!("timed out after 20s waiting for: sidecar sees {n} group gateways");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The value of one Prometheus sample on an ops port, e.g.
/// `meshgate_resilience_events_total{event="retry",service="orders"}`
/// (labels in the order the exposition prints them: sorted by name);
/// 0 when the sample is not there yet.
/// The objects named in a JSON document's `rejected` list (a process's
/// `/config` or `/readyz`, a node of the admin's `/status`).
pub fn rejected_objects(v: &serde_json::Value) -> Vec<String> {
    v["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["object"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A standalone model: service `orders` on `backend`, routed from every
/// ingress path.
pub fn orders_everywhere(backend: std::net::SocketAddr) -> String {
    format!(
        "services:\n  orders:\n    endpoints: [{{address: {backend}}}]\nroutes:\n  orders:\n    scope: ingress\n    match: {{path: {{prefix: /}}}}\n    backends: [{{service: orders}}]\n"
    )
}

pub async fn metric(ops_port: u16, sample: &str) -> f64 {
    let Ok(r) = http_get(&format!("http://127.0.0.1:{ops_port}/metrics"), &[]).await else {
        return 0.0;
    };
    metric_in(&r.body, sample)
}

/// The sum of the samples in the exposition `text` that `sample` names:
/// every sample of its metric whose labels include all of `sample`'s
/// (`name{a="x"}` sums over the other labels; `name` alone, over all).
pub fn metric_in(text: &str, sample: &str) -> f64 {
    let (name, want) = split_sample(sample);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = split_sample(series);
            let all = want.iter().all(|w| labels.contains(w));
            (n == name && all).then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// A sample's metric name and its `k="v"` label pairs.
fn split_sample(s: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = s.split_once('{') else {
        return (s.trim(), Vec::new());
    };
    let mut labels = Vec::new();
    let mut rest = rest.trim_end_matches('}');
    while let Some((k, v)) = rest.split_once("=\"") {
        let Some((value, after)) = v.split_once('"') else {
            break;
        };
        labels.push((k.trim_matches(',').trim().to_string(), value.to_string()));
        rest = after;
    }
    (name, labels)
}

/// Starts `meshgate-echo` (answers every request with what it received,
/// as JSON) on a free port, as `name`.
pub fn start_echo(dir: &Path, name: &str) -> (Proc, u16) {
    let port = free_port();
    let p = Proc::spawn(
        &format!("echo-{name}"),
        &bin("meshgate-echo"),
        &["--listen".into(), addr(port), "--name".into(), name.into()],
        dir,
    );
    (p, port)
}

// === test peers (tests/peers) ===

/// A test peer script in `tests/peers/`.
pub fn peer(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(script)
}

/// Runs a peer script's client mode and parses its JSON line.
pub async fn py(script: &str, args: &[&str]) -> serde_json::Value {
    py_env(script, args, &[]).await
}

/// [`py`] with environment variables set.
pub async fn py_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = tokio::process::Command::new("python3")
        .arg(peer(script))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{script} {args:?}: no JSON ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts a peer script's server mode on a free port; returns once it
/// accepts connections.
pub async fn py_server(dir: &Path, script: &str, name: &str) -> (Proc, u16) {
    let port = free_port();
    let p = Proc::spawn(
        name,
        Path::new("python3"),
        &[
            peer(script).to_string_lossy().into(),
            "server".into(),
            port.to_string(),
            name.into(),
        ],
        dir,
    );
    wait_until(
        &format!("{name} listening"),
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    (p, port)
}

// === TLS ===

/// A test certificate authority: signs leaf certificates for names.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM (what clients trust).
    pub pem: String,
}

/// A leaf certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names, IP addresses, or `spiffe://` URIs),
    /// valid for a day.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_for(names, Duration::from_secs(86_400))
    }

    /// [`TestCa::leaf`] valid for `lifetime` from now (and from 5 s
    /// before).
    pub fn leaf_for(&self, names: &[&str], lifetime: Duration) -> Leaf {
        self.leaf_valid(names, -5, lifetime.as_secs() as i64)
    }

    /// [`TestCa::leaf`] valid from `from_s` to `to_s` seconds from now
    /// (negative: in the past), for expired or not-yet-valid ones.
    pub fn leaf_valid(&self, names: &[&str], from_s: i64, to_s: i64) -> Leaf {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for n in names {
            params
                .subject_alt_names
                .push(if let Ok(ip) = n.parse::<std::net::IpAddr>() {
                    rcgen::SanType::IpAddress(ip)
                } else if n.contains("://") {
                    rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*n).unwrap())
                } else {
                    rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*n).unwrap())
                });
        }
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("leaf"),
        );
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from_s);
        params.not_after = now + time::Duration::seconds(to_s);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A rustls client config trusting `ca_pem`, offering ALPN `alpn`.
pub fn tls_client(ca_pem: &str, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in meshgate_config::tls::parse_chain(ca_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(meshgate_config::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// Opens a TLS connection to 127.0.0.1:`port` asking for `sni`.
pub async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// The SHA-256 fingerprint (as `CertInfo` shows it) of the certificate a
/// TLS connection's server presented.
pub fn peer_fingerprint(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let certs = s
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate");
    meshgate_config::tls::fingerprint(&certs[0])
}
