//! Listening sockets across a hot upgrade: every listener of a process is
//! bound through [`bind`], which first takes a socket inherited from the
//! process this one took over from ([`inherit`]) when one listens on the
//! same address, so the socket (and the connections queued on it)
//! carries on across the upgrade instead of being closed and bound again.
//! Each [`Listener`] is registered while it lives, and [`listening`]
//! lists them for a successor.
//!
//! Both sets are process-wide: a process has one predecessor and at most
//! one successor, and its listeners are bound from many places (its own,
//! a TCP route's as the config brings it).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tokio::net::TcpListener;

fn inherited() -> MutexGuard<'static, HashMap<SocketAddr, std::net::TcpListener>> {
    static INHERITED: OnceLock<Mutex<HashMap<SocketAddr, std::net::TcpListener>>> = OnceLock::new();
    lock(INHERITED.get_or_init(Default::default))
}

/// The live listeners, by id: a duplicate of each socket.
fn live() -> MutexGuard<'static, HashMap<u64, OwnedFd>> {
    static LIVE: OnceLock<Mutex<HashMap<u64, OwnedFd>>> = OnceLock::new();
    lock(LIVE.get_or_init(Default::default))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listening socket, listed for a successor while it lives.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    id: Option<u64>,
}

impl std::ops::Deref for Listener {
    type Target = TcpListener;
    fn deref(&self) -> &TcpListener {
        &self.inner
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            live().remove(&id);
        }
    }
}

/// A listener bound elsewhere (tests): served, but never handed over.
impl From<TcpListener> for Listener {
    fn from(inner: TcpListener) -> Listener {
        Listener { inner, id: None }
    }
}

/// Keeps `listeners` (handed over by the predecessor) for [`bind`] to take.
pub fn inherit(listeners: Vec<std::net::TcpListener>) {
    let mut held = inherited();
    for l in listeners {
        match l.local_addr() {
            Ok(a) => {
                held.insert(a, l);
            }
            Err(e) => tracing::warn!(error = %e, "an inherited socket has no address; closed"),
        }
    }
}

/// A listener on `addr`: the inherited one when there is one, else bound
/// now.
pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
    let taken = inherited().remove(&addr);
    let inner = match taken {
        Some(l) => {
            tracing::info!(%addr, "listening on the socket inherited from the previous process");
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => TcpListener::bind(addr).await?,
    };
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    live().insert(id, inner.as_fd().try_clone_to_owned()?);
    Ok(Listener {
        inner,
        id: Some(id),
    })
}

/// Closes the inherited sockets no listener took (the new config no
/// longer listens there); returns their addresses.
pub fn release_unclaimed() -> Vec<SocketAddr> {
    inherited().drain().map(|(a, _)| a).collect()
}

/// Every socket this process listens on, duplicated (the process keeps
/// its own): what a successor takes over.
pub fn listening() -> io::Result<Vec<std::net::TcpListener>> {
    live()
        .values()
        .map(|fd| Ok(std::net::TcpListener::from(fd.try_clone()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_live_listeners_and_binds_the_inherited_socket() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let listed = |addr| {
            listening()
                .unwrap()
                .into_iter()
                .find(|d| d.local_addr().unwrap() == addr)
        };
        let dup = listed(addr).expect("the listener is listed");
        // A connection queued on the socket before the hand-over.
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        drop(l);
        assert!(listed(addr).is_none(), "a dropped listener is not listed");
        // Handed over: the duplicate is what `bind` returns for its
        // address, and it is the same socket: the queued connection is
        // accepted through it.
        inherit(vec![dup]);
        let again = bind(addr).await.unwrap();
        let (accepted, _) = again.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        assert!(!release_unclaimed().contains(&addr));
    }
}
