//! Lease-based registration of runtime objects (`nodes/<id>`,
//! `instances/<service>/<id>`): the object lives while its process renews the
//! lease, and disappears by itself when the process or its host dies.
//!
//! The task survives store outages: it keeps renewing, and when the lease has
//! expired meanwhile it grants a new one and writes the object again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::key::Key;
use crate::store::{ConfigStore, Op};

/// Whether this process is handing its registrations over to a successor
/// (a hot upgrade): while set, no registration writes its object, so the
/// successor's writes, bound to its own leases, are the last. Cleared if
/// the upgrade fails, and every registration writes again.
fn handing_over() -> &'static watch::Sender<bool> {
    static PAUSED: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();
    PAUSED.get_or_init(|| watch::channel(false).0)
}

/// Stops (`true`) or resumes (`false`) every registration's writes of this
/// process; leases are still renewed. See [`handing_over`].
pub fn hand_over(paused: bool) {
    handing_over().send_if_modified(|p| std::mem::replace(p, paused) != paused);
}

/// A live registration. Update its value with [`Registration::update`];
/// remove it at once with [`Registration::deregister`].
pub struct Registration {
    value: watch::Sender<Vec<u8>>,
    stop: std::sync::Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
}

impl Registration {
    /// Starts registering `value` at `key` under a lease of `ttl`.
    pub fn spawn(store: Arc<dyn ConfigStore>, key: Key, value: Vec<u8>, ttl: Duration) -> Self {
        let (vtx, vrx) = watch::channel(value);
        let (stx, srx) = oneshot::channel();
        tokio::spawn(run(store, key, vrx, srx, ttl));
        Registration {
            value: vtx,
            stop: std::sync::Mutex::new(Some(stx)),
        }
    }

    /// Replaces the registered value (written as soon as the store allows).
    pub fn update(&self, value: Vec<u8>) {
        self.value.send_if_modified(|v| {
            if *v == value {
                false
            } else {
                *v = value;
                true
            }
        });
    }

    /// Revokes the lease so the object disappears now; waits (bounded) for
    /// the store to confirm. Later updates are not written.
    pub async fn deregister(&self) {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(stop) = stop {
            let (done_tx, done_rx) = oneshot::channel();
            if stop.send(done_tx).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(3), done_rx).await;
            }
        }
    }
}

async fn run(
    store: Arc<dyn ConfigStore>,
    key: Key,
    mut value: watch::Receiver<Vec<u8>>,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
    ttl: Duration,
) {
    let ttl_s = ttl.as_secs().max(1) as i64;
    let renew_every = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(200));
    let mut lease: Option<i64> = None;
    let mut written = false;
    let mut tick = tokio::time::interval(renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = handing_over().subscribe();
    loop {
        tokio::select! {
            r = paused.changed() => {
                if r.is_err() {
                    return;
                }
                // Resumed after a failed hand-over: the successor may have
                // written the object under its lease; write it again.
                written = false;
            }
            done = &mut stop => {
                if let Some(l) = lease {
                    if let Err(e) = store.revoke(l).await {
                        tracing::warn!(%key, error = %e, "could not revoke lease; it will expire by itself");
                    }
                }
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return;
            }
            changed = value.changed() => {
                if changed.is_err() {
                    // The Registration was dropped without deregistering:
                    // leave the lease to expire.
                    return;
                }
                written = false;
            }
            _ = tick.tick() => {
                if let Some(l) = lease {
                    match store.keep_alive(l).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(%key, "lease expired; registering again");
                            lease = None;
                        }
                        Err(e) => tracing::debug!(%key, error = %e, "lease keep-alive failed"),
                    }
                }
            }
        }
        if *paused.borrow() {
            continue;
        }
        if lease.is_none() {
            written = false;
            match store.grant_lease(ttl_s).await {
                Ok(l) => lease = Some(l),
                Err(e) => {
                    tracing::debug!(%key, error = %e, "cannot grant lease yet");
                    continue;
                }
            }
        }
        if !written {
            let v = value.borrow_and_update().clone();
            let op = Op::Put {
                key: key.clone(),
                value: v,
                lease,
            };
            match store.txn(vec![], vec![op]).await {
                Ok(_) => written = true,
                Err(e) => tracing::debug!(%key, error = %e, "cannot write registration yet"),
            }
        }
    }
}
