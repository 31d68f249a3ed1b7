//! The sync engine: keeps a process's view of its slice of the store up to
//! date, whatever the store does.
//!
//! It loads every watched prefix, then watches each from the next revision.
//! After a disconnect it resumes each watch from the last revision it saw; on
//! compaction it re-reads everything and applies only the difference. When
//! the store cannot be reached at start it applies the last-known-good
//! snapshot file, and it rewrites that file (debounced) after every change.
//! It runs in its own task and hands changes to an [`Apply`] implementation,
//! so readers of the data plane are never blocked by it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{select_all, StreamExt};
use tokio::sync::watch;

use crate::key::Key;
use crate::model::{now_ms, Rejection};
use crate::snapshot_file;
use crate::store::{ConfigStore, Entry, Event, StoreError};

/// One change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Entry),
    Delete(Key),
}

/// Receives the changes, in order. Implemented by the gateway's and the
/// sidecar's config compilers.
pub trait Apply: Send + 'static {
    /// Applies `changes`; afterwards the view reflects the store at `revision`.
    fn apply(&mut self, changes: Vec<Change>, revision: i64);
}

/// Where the applied config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing applied yet.
    None,
    /// The last-known-good snapshot file (the store was unreachable).
    SnapshotFile,
    /// The store.
    Store,
}

/// The state of the sync, published on a watch channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    pub source: Source,
    /// Whether the watch on the store is currently established.
    pub connected: bool,
    /// The store revision the applied view reflects.
    pub revision: i64,
    /// Unix ms of the last moment the view was known to be in sync with the
    /// store (now, while connected; the snapshot's time for a snapshot).
    pub last_sync_ms: u64,
    /// A short description of the last store error, if disconnected.
    pub last_error: Option<String>,
    /// What the store refused of its own source
    /// ([`crate::store::ConfigStore::source_errors`]), refreshed every
    /// second.
    pub source_errors: Vec<Rejection>,
    /// The last time the store's revision was found lower than the one
    /// the view reflected (etcd wiped, or restored from an older backup):
    /// the view was re-read and replaced by the store's.
    pub store_reset: Option<StoreReset>,
}

/// A store found at a lower revision than the view reflected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreReset {
    /// The revision the view reflected.
    pub from: i64,
    /// The store's revision when found.
    pub to: i64,
    /// Unix ms.
    pub at_ms: u64,
}

impl SyncStatus {
    /// Whether any config has been applied (from the store or the file).
    pub fn ready(&self) -> bool {
        self.source != Source::None
    }
}

/// What to sync and where the last-known-good file lives.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Relative prefixes to load and watch (e.g. `services/`, `groups/shop`).
    /// A prefix ending in `/` covers every key under it; any other is one
    /// exact key (`services/orders` does not cover `services/orders-v2`).
    pub prefixes: Vec<String>,
    /// The snapshot file and the scope written into it (e.g. `gateway:gw-1`).
    pub snapshot: Option<(PathBuf, String)>,
    /// Smallest and largest pause between reconnection attempts.
    pub backoff: (Duration, Duration),
    /// When set, the prefixes follow this channel: on every change the
    /// sync re-reads the new set, applies the difference (objects no
    /// longer covered are deleted) and watches the new set. A sidecar uses
    /// it to follow the destinations its service calls.
    pub rescope: Option<watch::Receiver<Vec<String>>>,
}

impl SyncOptions {
    pub fn new(prefixes: Vec<String>) -> Self {
        SyncOptions {
            prefixes,
            snapshot: None,
            backoff: (Duration::from_millis(100), Duration::from_secs(3)),
            rescope: None,
        }
    }
}

/// Starts the sync task. Returns its status channel.
pub fn spawn(
    store: Arc<dyn ConfigStore>,
    opts: SyncOptions,
    applier: impl Apply,
) -> watch::Receiver<SyncStatus> {
    let (tx, rx) = watch::channel(SyncStatus {
        source: Source::None,
        connected: false,
        revision: 0,
        last_sync_ms: 0,
        last_error: None,
        source_errors: Vec::new(),
        store_reset: None,
    });
    tokio::spawn(Syncer::new(store, opts, applier, tx).run());
    rx
}

// === impl Syncer ===

struct Syncer<A> {
    store: Arc<dyn ConfigStore>,
    opts: SyncOptions,
    applier: A,
    status: watch::Sender<SyncStatus>,
    mirror: BTreeMap<Key, Entry>,
    /// Last revision seen per prefix.
    revs: Vec<i64>,
    dirty: bool,
    rescope: Option<watch::Receiver<Vec<String>>>,
}

/// Whether `prefix` (see [`SyncOptions::prefixes`]) covers `key`. The
/// store already filters; this guards against a store that does not.
fn covers(prefix: &str, key: &Key) -> bool {
    crate::store::covers(prefix, &key.to_string())
}

impl<A: Apply> Syncer<A> {
    fn new(
        store: Arc<dyn ConfigStore>,
        mut opts: SyncOptions,
        applier: A,
        status: watch::Sender<SyncStatus>,
    ) -> Self {
        let n = opts.prefixes.len();
        let rescope = opts.rescope.take();
        Syncer {
            store,
            opts,
            applier,
            status,
            mirror: BTreeMap::new(),
            revs: vec![0; n],
            dirty: false,
            rescope,
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new(self.opts.backoff);
        let mut need_load = true;
        let mut tried_snapshot = false;
        loop {
            if need_load {
                match self.load().await {
                    Ok(()) => need_load = false,
                    Err(e) => {
                        self.disconnected(&e);
                        if !tried_snapshot {
                            tried_snapshot = true;
                            self.load_snapshot_file();
                        }
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                }
            }
            match self.watch().await {
                WatchEnd::Compacted | WatchEnd::Rescoped => need_load = true,
                WatchEnd::Reset { from, to } => {
                    tracing::warn!(
                        applied_revision = from,
                        store_revision = to,
                        "the store is at a lower revision than the applied config: etcd was wiped or restored from an older backup; re-reading it and applying the difference"
                    );
                    self.status.send_modify(|s| {
                        s.store_reset = Some(StoreReset {
                            from,
                            to,
                            at_ms: now_ms(),
                        })
                    });
                    need_load = true;
                }
                WatchEnd::Error(e) => {
                    self.disconnected(&e);
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            }
            backoff.reset();
        }
    }

    /// Reads every prefix and applies the difference with the current view.
    async fn load(&mut self) -> Result<(), StoreError> {
        if let Some(rx) = &mut self.rescope {
            let mut p = rx.borrow_and_update().clone();
            p.sort();
            p.dedup();
            self.opts.prefixes = p;
        }
        let mut fresh = BTreeMap::new();
        let mut revs = Vec::with_capacity(self.opts.prefixes.len());
        for p in &self.opts.prefixes {
            let r = self.store.range(p).await?;
            revs.push(r.revision);
            for e in r.entries.into_iter().filter(|e| covers(p, &e.key)) {
                fresh.insert(e.key.clone(), e);
            }
        }
        let revision = revs.iter().copied().max().unwrap_or(0);
        let changes = diff(&self.mirror, &fresh);
        tracing::info!(
            store = %self.store.describe(),
            revision,
            objects = fresh.len(),
            changes = changes.len(),
            "config loaded from store"
        );
        self.mirror = fresh;
        self.revs = revs;
        self.applier.apply(changes, revision);
        // The status follows the applied view at once: writing the
        // snapshot file awaits, and in between a reader of both (a
        // sidecar's freshness) would see the store's config with a status
        // that has none.
        let source_errors = self.source_errors();
        self.status.send_modify(|s| {
            s.source = Source::Store;
            s.connected = true;
            s.revision = revision;
            s.last_sync_ms = now_ms();
            s.last_error = None;
            s.source_errors = source_errors;
        });
        self.dirty = true;
        self.flush_snapshot().await;
        Ok(())
    }

    /// Watches every prefix until the store goes away or compacts, or the
    /// prefixes change.
    async fn watch(&mut self) -> WatchEnd {
        let mut rescope = self.rescope.take();
        let end = self.watch_prefixes(&mut rescope).await;
        self.rescope = rescope;
        end
    }

    async fn watch_prefixes(
        &mut self,
        rescope: &mut Option<watch::Receiver<Vec<String>>>,
    ) -> WatchEnd {
        // A store behind the view (wiped, or restored from an older
        // backup) would hold watches at a revision it has not reached.
        let seen = self.revs.iter().copied().max().unwrap_or(0);
        match self.store.revision().await {
            Ok(Some(now)) if now < seen => {
                return WatchEnd::Reset {
                    from: seen,
                    to: now,
                }
            }
            Ok(_) => {}
            Err(e) => return WatchEnd::Error(e),
        }
        let mut streams = Vec::with_capacity(self.opts.prefixes.len());
        for (i, p) in self.opts.prefixes.iter().enumerate() {
            match self.store.watch(p, self.revs[i] + 1).await {
                Ok(s) => streams.push(s.map(move |item| (i, item)).boxed()),
                Err(StoreError::Compacted(_)) => return WatchEnd::Compacted,
                Err(e) => return WatchEnd::Error(e),
            }
        }
        let was_connected = self.status.borrow().connected;
        if !was_connected {
            tracing::info!(store = %self.store.describe(), "config store watch established");
        }
        self.status.send_modify(|s| {
            s.source = Source::Store;
            s.connected = true;
            s.last_sync_ms = now_ms();
            s.last_error = None;
        });
        let mut merged = select_all(streams);
        let mut flush = tokio::time::interval(Duration::from_millis(500));
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                item = merged.next() => match item {
                    Some((i, Ok(batch))) => self.on_batch(i, batch.revision, batch.events),
                    Some((_, Err(StoreError::Compacted(rev)))) => {
                        tracing::warn!(compact_revision = rev, "watch compacted; re-reading the store");
                        self.flush_snapshot().await;
                        return WatchEnd::Compacted;
                    }
                    Some((_, Err(e))) => {
                        self.flush_snapshot().await;
                        return WatchEnd::Error(e);
                    }
                    None => return WatchEnd::Error(StoreError::Unavailable("watch ended".into())),
                },
                _ = flush.tick() => self.flush_snapshot().await,
                _ = heartbeat.tick() => {
                    let source_errors = self.source_errors();
                    self.status.send_modify(|s| {
                        s.last_sync_ms = now_ms();
                        s.source_errors = source_errors;
                    });
                }
                Some(()) = prefixes_changed(rescope) => {
                    tracing::debug!("watched prefixes changed; re-reading the store");
                    return WatchEnd::Rescoped;
                }
            }
        }
    }

    /// The store's refusals of its own source, as rejections of the
    /// source (version 0: it has none).
    fn source_errors(&self) -> Vec<Rejection> {
        self.store
            .source_errors()
            .into_iter()
            .map(|error| Rejection {
                object: self.store.describe(),
                version: 0,
                error,
            })
            .collect()
    }

    fn on_batch(&mut self, prefix: usize, revision: i64, events: Vec<Event>) {
        if revision <= self.revs[prefix] && events.is_empty() {
            return;
        }
        let mut changes = Vec::with_capacity(events.len());
        let p = &self.opts.prefixes[prefix];
        for ev in events {
            match ev {
                Event::Put(e) if !covers(p, &e.key) => {}
                Event::Put(e) => {
                    if self
                        .mirror
                        .get(&e.key)
                        .is_some_and(|old| old.mod_revision >= e.mod_revision)
                    {
                        continue;
                    }
                    self.mirror.insert(e.key.clone(), e.clone());
                    changes.push(Change::Put(e));
                }
                Event::Delete { key, .. } => {
                    if self.mirror.remove(&key).is_some() {
                        changes.push(Change::Delete(key));
                    }
                }
            }
        }
        self.revs[prefix] = self.revs[prefix].max(revision);
        let revision = self.revs.iter().copied().max().unwrap_or(revision);
        if !changes.is_empty() {
            self.dirty = true;
        }
        self.applier.apply(changes, revision);
        self.status.send_modify(|s| {
            s.revision = revision;
            s.last_sync_ms = now_ms();
        });
    }

    fn disconnected(&self, e: &StoreError) {
        let was = self.status.borrow().connected;
        if was {
            tracing::warn!(store = %self.store.describe(), error = %e, "config store unreachable; serving the last applied config");
        } else {
            tracing::debug!(store = %self.store.describe(), error = %e, "config store still unreachable");
        }
        self.status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(e.to_string());
        });
    }

    fn load_snapshot_file(&mut self) {
        let Some((path, scope)) = &self.opts.snapshot else {
            return;
        };
        match snapshot_file::read(path, scope) {
            Ok(snap) => {
                tracing::warn!(
                    file = %path.display(),
                    revision = snap.revision,
                    objects = snap.entries.len(),
                    "config store unreachable at start; serving the last-known-good snapshot"
                );
                let fresh: BTreeMap<Key, Entry> = snap
                    .entries
                    .into_iter()
                    .map(|e| (e.key.clone(), e))
                    .collect();
                let changes = diff(&self.mirror, &fresh);
                self.mirror = fresh;
                self.revs.iter_mut().for_each(|r| *r = snap.revision);
                self.applier.apply(changes, snap.revision);
                self.status.send_modify(|s| {
                    s.source = Source::SnapshotFile;
                    s.revision = snap.revision;
                    s.last_sync_ms = snap.written_at_ms;
                });
            }
            Err(snapshot_file::SnapshotError::Missing) => {
                tracing::warn!(file = %path.display(), "config store unreachable at start and no snapshot file yet")
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "ignoring the snapshot file")
            }
        }
    }

    async fn flush_snapshot(&mut self) {
        if !self.dirty {
            return;
        }
        let Some((path, scope)) = self.opts.snapshot.clone() else {
            self.dirty = false;
            return;
        };
        self.dirty = false;
        let entries: Vec<Entry> = self.mirror.values().cloned().collect();
        let revision = self.revs.iter().copied().max().unwrap_or(0);
        let res = tokio::task::spawn_blocking(move || {
            snapshot_file::write(&path, &scope, revision, entries).map_err(|e| (path, e))
        })
        .await;
        if let Ok(Err((path, e))) = res {
            tracing::error!(file = %path.display(), error = %e, "cannot write the snapshot file");
            self.dirty = true;
        }
    }
}

enum WatchEnd {
    Compacted,
    Rescoped,
    /// The store is at revision `to`, below the view's `from`.
    Reset {
        from: i64,
        to: i64,
    },
    Error(StoreError),
}

/// Pauses between reconnection attempts: the bound doubles from the
/// smallest to the largest, and each pause is drawn at random below it
/// ("full jitter"), so the thousands of sidecars that lost the store
/// together do not all come back in the same instant when it returns.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    bound: Duration,
}

impl Backoff {
    fn new((min, max): (Duration, Duration)) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            bound: min,
        }
    }

    fn next(&mut self) -> Duration {
        use rand::Rng;
        let ms = self.bound.as_millis() as u64;
        let pause = Duration::from_millis(rand::thread_rng().gen_range(0..=ms));
        self.bound = (self.bound * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.bound = self.min;
    }
}

/// Resolves when the watched prefixes change; never without a channel or
/// once its sender is gone.
async fn prefixes_changed(rx: &mut Option<watch::Receiver<Vec<String>>>) -> Option<()> {
    match rx {
        Some(r) => match r.changed().await {
            Ok(()) => Some(()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The changes that turn `old` into `new`.
pub fn diff(old: &BTreeMap<Key, Entry>, new: &BTreeMap<Key, Entry>) -> Vec<Change> {
    let mut out = Vec::new();
    for (k, e) in new {
        match old.get(k) {
            Some(o) if o.value == e.value && o.mod_revision == e.mod_revision => {}
            _ => out.push(Change::Put(e.clone())),
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(Change::Delete(k.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Kind;

    fn e(name: &str, v: &str, rev: i64) -> (Key, Entry) {
        let key = Key::new(Kind::Routes, name);
        (
            key.clone(),
            Entry {
                key,
                value: v.as_bytes().to_vec(),
                mod_revision: rev,
            },
        )
    }

    #[test]
    fn exact_prefixes_cover_one_key() {
        let k = Key::new(Kind::Services, "orders");
        assert!(covers("services/orders", &k));
        assert!(covers("services/", &k));
        assert!(!covers(
            "services/orders",
            &Key::new(Kind::Services, "orders-v2")
        ));
        assert!(!covers("services/order", &k));
        assert!(!covers(
            "routes/orders",
            &Key::new(Kind::Services, "orders")
        ));
    }

    #[test]
    fn backoff_pauses_are_jittered_below_a_doubling_bound() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(3000));
        let mut b = Backoff::new((min, max));
        let mut bound = min;
        for _ in 0..8 {
            assert!(b.next() <= bound);
            bound = (bound * 2).min(max);
        }
        // At the largest bound the pauses spread over it rather than
        // coinciding (a draw of 200 from 3001 values being all equal, or
        // all in one tenth of the range, is practically impossible).
        let pauses: Vec<Duration> = (0..200).map(|_| b.next()).collect();
        assert!(pauses.iter().all(|p| *p <= max));
        assert!(pauses.iter().any(|p| *p < max / 10));
        assert!(pauses.iter().any(|p| *p > max * 9 / 10));
        b.reset();
        assert!(b.next() <= min);
    }

    #[test]
    fn diff_reports_puts_and_deletes_only() {
        let old: BTreeMap<_, _> = [e("a", "1", 1), e("b", "1", 1), e("c", "1", 1)].into();
        let new: BTreeMap<_, _> = [e("a", "1", 1), e("b", "2", 5), e("d", "1", 5)].into();
        let d = diff(&old, &new);
        assert_eq!(
            d,
            vec![
                Change::Put(e("b", "2", 5).1),
                Change::Put(e("d", "1", 5).1),
                Change::Delete(Key::new(Kind::Routes, "c")),
            ]
        );
    }
}
