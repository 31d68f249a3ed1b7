//! Hot upgrade: a new binary takes over the listening sockets of the
//! running process, which stops accepting, finishes what it has in flight
//! and exits. No connection is refused meanwhile: the sockets themselves
//! (and the connections queued on them) pass from one process to the
//! other, never closed and bound again.
//!
//! The running process answers on its `upgrade_socket` (a Unix socket,
//! mode 0600), in JSON lines:
//!
//! - `{"op":"takeover","pid":P}` from a successor (started with
//!   `--takeover <socket>`): the running process stops writing its
//!   registrations (the successor's, under its own leases, must be the
//!   last) and answers `{"pid":…,"listeners":[…],"more":false}` with the
//!   listening sockets attached (`SCM_RIGHTS`);
//! - `{"op":"ready"}` from the successor once its config is applied and it
//!   accepts: answered `{"ok":true}`; the running process then stops
//!   accepting, drains within its grace time and exits, holding the
//!   connection until it does (so the successor learns when, and closes
//!   the inherited sockets its config no longer listens on). If the
//!   successor goes away before `ready` (it failed to start), the running
//!   process writes its registrations again and serves on: a failed
//!   upgrade costs nothing;
//! - `{"op":"upgrade"}` (the `upgrade` command; SIGUSR2 does the same
//!   without an answer): the running process starts its own binary again,
//!   by the path it was started from (a package upgrade has replaced the
//!   file there), with its arguments and `--takeover <socket>`, and
//!   answers `{"ok":true,"pid":P}` once that process has taken over, or
//!   `{"ok":false,"error":…}`.
//!
//! Under systemd the old process tells the manager the successor's pid
//! (`MAINPID=`), which then tells it `READY=1`.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use meshgate_config::node::{notify, Notify};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::server::listeners;

/// How long a successor may take from asking for the sockets to serving
/// (loading its config from the store or its snapshot file included).
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a request line may take to arrive.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sockets per message (the kernel passes at most 253).
const FDS_PER_MESSAGE: usize = 200;

/// This process's command line as it started: what an upgrade starts
/// again. The path is resolved at start-up, so a package upgrade that
/// replaces the file there is what runs next.
#[derive(Debug, Clone)]
pub struct Relaunch {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Relaunch {
    /// This process's binary and arguments, without `--takeover <socket>`.
    pub fn of_this_process() -> io::Result<Relaunch> {
        let exe = std::env::current_exe()?;
        let mut args = Vec::new();
        let mut it = std::env::args_os().skip(1);
        while let Some(a) = it.next() {
            if a == "--takeover" {
                it.next();
            } else if !a.to_string_lossy().starts_with("--takeover=") {
                args.push(a);
            }
        }
        Ok(Relaunch { exe, args })
    }
}

/// A connection on the upgrade socket: JSON lines, and descriptors along
/// with them.
struct Channel {
    io: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Channel {
    fn new(io: UnixStream) -> Channel {
        Channel {
            io,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    async fn send(&mut self, v: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(v).expect("a JSON value encodes");
        line.push(b'\n');
        self.io.write_all(&line).await
    }

    /// Sends `v` with `fds` attached to its first byte.
    async fn send_fds(&mut self, v: &Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut line = serde_json::to_vec(v).expect("a JSON value encodes");
        line.push(b'\n');
        let sent = loop {
            self.io.writable().await?;
            let r = self.io.try_io(Interest::WRITABLE, || {
                let mut space =
                    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                control.push(SendAncillaryMessage::ScmRights(fds));
                sendmsg(
                    self.io.as_fd(),
                    &[IoSlice::new(&line)],
                    &mut control,
                    SendFlags::empty(),
                )
                .map_err(io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        self.io.write_all(&line[sent..]).await
    }

    /// The next line (with the descriptors that came before its end);
    /// `None` when the peer closed.
    async fn recv(&mut self) -> io::Result<Option<(Value, Vec<OwnedFd>)>> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let v = serde_json::from_slice(&line)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                return Ok(Some((v, std::mem::take(&mut self.fds))));
            }
            self.io.readable().await?;
            let mut chunk = [0u8; 16 * 1024];
            let r = self.io.try_io(Interest::READABLE, || {
                let mut space =
                    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = recvmsg(
                    self.io.as_fd(),
                    &mut [IoSliceMut::new(&mut chunk)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(got) = m {
                        fds.extend(got);
                    }
                }
                if msg.flags.contains(ReturnFlags::CTRUNC) {
                    return Err(io::Error::other("descriptors were truncated"));
                }
                Ok((msg.bytes, fds))
            });
            match r {
                Ok((0, _)) => return Ok(None),
                Ok((n, fds)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.fds.extend(fds);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn recv_within(&mut self, t: Duration) -> io::Result<Option<(Value, Vec<OwnedFd>)>> {
        tokio::time::timeout(t, self.recv())
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
    }
}

/// A process taking over from the one on an upgrade socket: it holds that
/// process's sockets (taken by [`listeners::bind`]) until it serves.
pub struct Takeover {
    chan: Channel,
    path: PathBuf,
    predecessor: u64,
}

impl std::fmt::Debug for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Takeover")
            .field("path", &self.path)
            .field("predecessor", &self.predecessor)
            .finish()
    }
}

impl Takeover {
    /// Asks the process on `path` for its listening sockets.
    pub async fn start(path: &Path) -> anyhow::Result<Takeover> {
        let what = || format!("--takeover {}", path.display());
        let io = UnixStream::connect(path)
            .await
            .with_context(|| format!("{}: cannot reach the running process", what()))?;
        let mut chan = Channel::new(io);
        chan.send(&json!({"op": "takeover", "pid": std::process::id()}))
            .await
            .with_context(what)?;
        let mut inherited = Vec::new();
        let mut predecessor = 0;
        loop {
            let Some((v, fds)) = chan.recv_within(LINE_TIMEOUT).await.with_context(what)? else {
                anyhow::bail!("{}: the running process closed the connection", what());
            };
            if let Some(e) = v["error"].as_str() {
                anyhow::bail!("{}: refused: {e}", what());
            }
            predecessor = v["pid"].as_u64().unwrap_or(predecessor);
            inherited.extend(fds.into_iter().map(std::net::TcpListener::from));
            if v["more"] != json!(true) {
                break;
            }
        }
        tracing::info!(
            predecessor,
            sockets = inherited.len(),
            "took over the listening sockets of the running process"
        );
        listeners::inherit(inherited);
        Ok(Takeover {
            chan,
            path: path.to_path_buf(),
            predecessor,
        })
    }

    /// Tells the predecessor this process now serves: it stops accepting
    /// and drains. Once it has exited, the inherited sockets no listener
    /// took are closed.
    async fn serving(mut self) -> anyhow::Result<PathBuf> {
        self.chan.send(&json!({"op": "ready"})).await?;
        match self.chan.recv_within(LINE_TIMEOUT).await? {
            Some((v, _)) if v["ok"] == json!(true) => {}
            other => anyhow::bail!("the previous process did not acknowledge: {other:?}"),
        }
        tracing::info!(
            predecessor = self.predecessor,
            "serving; the previous process is draining"
        );
        let mut chan = self.chan;
        let predecessor = self.predecessor;
        tokio::spawn(async move {
            while let Ok(Some(_)) = chan.recv().await {}
            let unclaimed = listeners::release_unclaimed();
            tracing::info!(
                predecessor,
                closed = ?unclaimed,
                "the previous process has exited; sockets no listener took are closed"
            );
        });
        Ok(self.path)
    }
}

/// The upgrade side of a process: its upgrade socket (if configured) and a
/// takeover to complete (if it started with one).
#[derive(Debug, Default)]
pub struct Upgrades {
    pub socket: Option<PathBuf>,
    pub takeover: Option<Takeover>,
}

impl Upgrades {
    /// Checks the upgrade socket can be served: no other live process
    /// answers on it (unless this one is taking over from it). Run at
    /// start-up, so a conflict fails it naming `field`.
    pub fn check(&self, field: &str) -> anyhow::Result<()> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let ours = self.takeover.as_ref().is_some_and(|t| t.path == *path);
        if !ours && std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{field}: another process serves {} (start with --takeover {} to replace it)",
                path.display(),
                path.display()
            );
        }
        Ok(())
    }

    /// Once the process serves: completes the takeover (the predecessor
    /// drains) and answers successors on the upgrade socket. `taken` turns
    /// to a successor's pid once one serves.
    pub(crate) async fn serving(self, taken: watch::Sender<Option<u32>>) {
        if let Some(t) = self.takeover {
            if let Err(e) = t.serving().await {
                tracing::error!(error = %e, "upgrade: the previous process was not told to stop; both serve until it does");
            }
        }
        notify(Notify::Ready);
        let Some(path) = self.socket else { return };
        let relaunch = match Relaunch::of_this_process() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "upgrade_socket: this process's binary cannot be found; hot upgrades are off");
                return;
            }
        };
        match bind_socket(&path) {
            Ok(l) => {
                tracing::info!(path = %path.display(), "upgrade socket listening");
                let shared = Arc::new(Shared {
                    path,
                    relaunch,
                    successor: watch::channel(None).0,
                    taken,
                    busy: AtomicBool::new(false),
                    starting: AtomicBool::new(false),
                });
                tokio::spawn(on_signal(shared.clone()));
                accept(l, shared).await;
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "upgrade_socket: cannot listen; hot upgrades are off")
            }
        }
    }
}

/// Binds `path` (mode 0600) in place of whatever is there: a stale file,
/// or the socket of the process this one took over from.
fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("new-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    l.set_nonblocking(true)?;
    UnixListener::from_std(l)
}

struct Shared {
    path: PathBuf,
    relaunch: Relaunch,
    /// The successor's pid once it serves.
    successor: watch::Sender<Option<u32>>,
    /// The same, for the process to stop on: set once the `upgrade`
    /// command that started the successor (if any) has its answer, so the
    /// process does not exit before giving it.
    taken: watch::Sender<Option<u32>>,
    /// A successor holds the sockets and has not yet said it serves.
    busy: AtomicBool,
    /// This process is starting a successor.
    starting: AtomicBool,
}

async fn accept(l: UnixListener, shared: Arc<Shared>) {
    loop {
        match l.accept().await {
            Ok((io, _)) => {
                tokio::spawn(answer(Channel::new(io), shared.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// SIGUSR2 starts a successor, as the `upgrade` command does.
async fn on_signal(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        return;
    };
    while usr2.recv().await.is_some() {
        tracing::info!("SIGUSR2: upgrading");
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = start_successor(&shared, |_| async {}).await {
                tracing::error!(error = %e, "upgrade failed; still serving");
            }
        });
    }
}

async fn answer(mut chan: Channel, shared: Arc<Shared>) {
    let req = match chan.recv_within(LINE_TIMEOUT).await {
        Ok(Some((v, _))) => v,
        _ => return,
    };
    match req["op"].as_str() {
        Some("takeover") => {
            let pid = req["pid"].as_u64().unwrap_or(0) as u32;
            hand_over(chan, pid, &shared).await;
        }
        Some("upgrade") => {
            // The answer is given before the process may stop.
            let outcome = start_successor(&shared, |outcome: &anyhow::Result<u32>| {
                let reply = match outcome {
                    Ok(pid) => json!({"ok": true, "pid": pid}),
                    Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
                };
                let chan = &mut chan;
                async move {
                    let _ = chan.send(&reply).await;
                }
            })
            .await;
            if let Err(e) = outcome {
                tracing::error!(error = %e, "upgrade failed; still serving");
            }
        }
        _ => {
            let _ = chan
                .send(&json!({"error": "unknown op: give takeover, ready or upgrade"}))
                .await;
        }
    }
}

/// Hands this process's sockets to the successor `pid` on `chan`, and
/// stops once it serves.
async fn hand_over(mut chan: Channel, pid: u32, shared: &Shared) {
    if shared.busy.swap(true, Ordering::AcqRel) || shared.successor.borrow().is_some() {
        let _ = chan
            .send(&json!({"error": "another process is taking over"}))
            .await;
        return;
    }
    tracing::info!(
        successor = pid,
        "upgrade: handing the listening sockets over"
    );
    meshgate_config::registration::hand_over(true);
    match give_sockets(&mut chan).await {
        Ok(()) => match chan.recv_within(TAKEOVER_TIMEOUT).await {
            Ok(Some((v, _))) if v["op"] == "ready" => {
                if chan.send(&json!({"ok": true})).await.is_ok() {
                    tracing::info!(
                        successor = pid,
                        "upgrade: the successor serves; stopping accepting and draining"
                    );
                    notify(Notify::MainPid(pid));
                    shared.successor.send_replace(Some(pid));
                    // An `upgrade` command that started it gets its answer
                    // first (bounded).
                    for _ in 0..500 {
                        if !shared.starting.load(Ordering::Acquire) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    shared.taken.send_replace(Some(pid));
                    // Held until this process exits: its end tells the
                    // successor so.
                    std::mem::forget(chan);
                    return;
                }
            }
            Ok(other) => {
                tracing::error!(successor = pid, message = ?other.map(|o| o.0), "upgrade: the successor went away before serving; still serving")
            }
            Err(e) => {
                tracing::error!(successor = pid, error = %e, "upgrade: the successor did not serve; still serving")
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "upgrade: cannot hand the sockets over; still serving")
        }
    }
    meshgate_config::registration::hand_over(false);
    shared.busy.store(false, Ordering::Release);
}

async fn give_sockets(chan: &mut Channel) -> io::Result<()> {
    let sockets = listeners::listening()?;
    let mut chunks: Vec<&[std::net::TcpListener]> = sockets.chunks(FDS_PER_MESSAGE).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let addrs: Vec<String> = chunk
            .iter()
            .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|l| l.as_fd()).collect();
        let msg = json!({"pid": std::process::id(), "listeners": addrs, "more": i < last});
        chan.send_fds(&msg, &fds).await?;
    }
    Ok(())
}

/// Starts this process's binary again to take over from it; its pid once
/// it serves. `answer` is given the outcome before the process may stop.
async fn start_successor<F, Fut>(shared: &Shared, answer: F) -> anyhow::Result<u32>
where
    F: FnOnce(&anyhow::Result<u32>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if shared.starting.swap(true, Ordering::AcqRel) {
        let busy = Err(anyhow::anyhow!("an upgrade is already under way"));
        answer(&busy).await;
        return busy;
    }
    let r = start_successor_once(shared).await;
    answer(&r).await;
    shared.starting.store(false, Ordering::Release);
    r
}

async fn start_successor_once(shared: &Shared) -> anyhow::Result<u32> {
    if shared.successor.borrow().is_some() {
        anyhow::bail!("this process has already been taken over");
    }
    let mut child = tokio::process::Command::new(&shared.relaunch.exe)
        .args(&shared.relaunch.args)
        .arg("--takeover")
        .arg(&shared.path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", shared.relaunch.exe.display()))?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, exe = %shared.relaunch.exe.display(), "upgrade: started the new binary");
    let mut taken = shared.successor.subscribe();
    let outcome = tokio::select! {
        r = taken.wait_for(|t| *t == Some(pid)) => match r {
            Ok(_) => Ok(pid),
            Err(_) => Err(anyhow::anyhow!("this process is stopping")),
        },
        st = child.wait() => Err(anyhow::anyhow!("the new process exited before serving ({})", st.map_or_else(|e| e.to_string(), |s| s.to_string()))),
        _ = tokio::time::sleep(TAKEOVER_TIMEOUT) => {
            let _ = child.start_kill();
            Err(anyhow::anyhow!("the new process did not serve within {} s; stopped it", TAKEOVER_TIMEOUT.as_secs()))
        }
    };
    // Reap the child whenever it ends (it outlives this process if it
    // took over).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    outcome
}

/// The `upgrade` command: asks the process serving `socket` to start its
/// binary again and take over; the new process's pid once it serves.
pub fn request(socket: &Path) -> anyhow::Result<u32> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the running process on {} (is upgrade_socket set, and the process running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(TAKEOVER_TIMEOUT + LINE_TIMEOUT))?;
    s.write_all(b"{\"op\":\"upgrade\"}\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line)
        .with_context(|| format!("the running process answered {line:?}"))?;
    match (v["ok"].as_bool(), v["pid"].as_u64()) {
        (Some(true), Some(pid)) => Ok(pid as u32),
        _ => anyhow::bail!(
            "upgrade failed: {}",
            v["error"].as_str().unwrap_or("no reason given")
        ),
    }
}

/// Runs the `upgrade` command of `program` on `socket` and exits: 0 once
/// the new process serves, 1 with the reason otherwise.
pub fn command(program: &str, socket: anyhow::Result<PathBuf>) -> ! {
    match socket.and_then(|s| request(&s)) {
        Ok(pid) => {
            println!("{program}: upgraded; process {pid} serves");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::exit(1)
        }
    }
}
