//! `FileStore`: the config model in one YAML file, for standalone mode.
//!
//! The file holds the config kinds (`groups`, `services`, `routes`) as maps of
//! name to object, plus the store `revision`. It is polled for changes and
//! hot-reloaded: objects whose content changed get a new revision, so the
//! data plane sees exactly the same events as from etcd. Writes from the
//! embedded admin API rewrite the file atomically (temp file + rename).
//! Runtime kinds (nodes, instances) and leases live in memory only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, Mutex};

use super::*;
use crate::snapshot_file::write_atomically;

const HISTORY: usize = 1024;
const POLL: Duration = Duration::from_millis(250);
const FULL_CHECK_EVERY: u32 = 20;

/// The standalone-mode [`ConfigStore`].
pub struct FileStore {
    path: PathBuf,
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<WatchBatch>>,
    /// What the last read of the file refused (see
    /// [`ConfigStore::source_errors`]).
    refused: std::sync::Mutex<Vec<String>>,
}

struct State {
    revision: i64,
    entries: BTreeMap<Key, Entry>,
    /// Runtime entries attached to a lease.
    leased: HashMap<Key, i64>,
    /// Lease id → (deadline, ttl).
    leases: HashMap<i64, (Instant, Duration)>,
    next_lease: i64,
    history: VecDeque<Arc<WatchBatch>>,
    file_sig: Option<FileSig>,
    file_hash: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileSig {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

/// The file's layout.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    /// Maintained by the store; monotonically increasing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revision: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    certs: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    groups: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    consumers: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    services: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    routes: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tcp_routes: BTreeMap<String, serde_json::Value>,
}

impl FileDoc {
    fn kinds(&self) -> [(Kind, &BTreeMap<String, serde_json::Value>); 6] {
        [
            (Kind::Certs, &self.certs),
            (Kind::Groups, &self.groups),
            (Kind::Consumers, &self.consumers),
            (Kind::Services, &self.services),
            (Kind::Routes, &self.routes),
            (Kind::TcpRoutes, &self.tcp_routes),
        ]
    }
}

impl FileStore {
    /// Opens the file (which must exist and parse) and starts watching it.
    pub async fn open(path: impl AsRef<Path>) -> Result<Arc<FileStore>, StoreError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
        let doc = parse_doc(&path, &bytes)?;
        let revision = doc.revision.unwrap_or(0) + 1;
        let mut entries = BTreeMap::new();
        let (objects, refused) = doc_entries(&path, &doc);
        for (key, value) in objects {
            entries.insert(
                key.clone(),
                Entry {
                    key,
                    value,
                    mod_revision: revision,
                },
            );
        }
        let (tx, _) = broadcast::channel(HISTORY);
        let store = Arc::new(FileStore {
            state: Mutex::new(State {
                revision,
                entries,
                leased: HashMap::new(),
                leases: HashMap::new(),
                next_lease: 1,
                history: VecDeque::new(),
                file_sig: file_sig(&path),
                file_hash: Sha256::digest(&bytes).into(),
            }),
            path,
            tx,
            refused: std::sync::Mutex::new(refused),
        });
        tokio::spawn(poll_loop(Arc::downgrade(&store)));
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if it changed; applies the difference.
    async fn check_file(&self, force: bool) {
        let sig = file_sig(&self.path);
        let mut st = self.state.lock().await;
        if !force && sig == st.file_sig {
            return;
        }
        st.file_sig = sig;
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot read config file; keeping the current config");
                self.refuse(vec![format!("{}: {e}", self.path.display())]);
                // Read again in full once it is readable, even unchanged.
                st.file_hash = [0; 32];
                return;
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if hash == st.file_hash {
            return;
        }
        st.file_hash = hash;
        let doc = match parse_doc(&self.path, &bytes) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "config file rejected; keeping the current config");
                self.refuse(vec![e.to_string()]);
                return;
            }
        };
        let (objects, refused) = doc_entries(&self.path, &doc);
        self.refuse(refused);
        let new: BTreeMap<Key, Vec<u8>> = objects.into_iter().collect();
        let revision = st.revision + 1;
        let mut events = Vec::new();
        for (key, value) in &new {
            let same = st
                .entries
                .get(key)
                .is_some_and(|e| same_json(&e.value, value));
            if !same {
                events.push(Event::Put(Entry {
                    key: key.clone(),
                    value: value.clone(),
                    mod_revision: revision,
                }));
            }
        }
        for key in st.entries.keys() {
            if key.kind.is_config() && !new.contains_key(key) {
                events.push(Event::Delete {
                    key: key.clone(),
                    mod_revision: revision,
                });
            }
        }
        if events.is_empty() {
            return;
        }
        tracing::info!(file = %self.path.display(), changes = events.len(), revision, "config file changed");
        self.commit(&mut st, revision, events);
    }

    fn refuse(&self, problems: Vec<String>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = problems;
    }

    /// Applies events at `revision` to the state and publishes them.
    fn commit(&self, st: &mut State, revision: i64, events: Vec<Event>) {
        st.revision = revision;
        for ev in &events {
            match ev {
                Event::Put(e) => {
                    st.entries.insert(e.key.clone(), e.clone());
                }
                Event::Delete { key, .. } => {
                    st.entries.remove(key);
                    st.leased.remove(key);
                }
            }
        }
        let batch = Arc::new(WatchBatch { revision, events });
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(batch.clone());
        let _ = self.tx.send(batch);
    }

    /// Writes the config kinds of `entries` to the file, atomically.
    fn write_file(
        &self,
        st: &mut State,
        entries: &BTreeMap<Key, Entry>,
        revision: i64,
    ) -> Result<(), StoreError> {
        let mut doc = FileDoc {
            revision: Some(revision),
            ..FileDoc::default()
        };
        for e in entries.values() {
            let map = match e.key.kind {
                Kind::Certs => &mut doc.certs,
                Kind::Groups => &mut doc.groups,
                Kind::Consumers => &mut doc.consumers,
                Kind::Services => &mut doc.services,
                Kind::Routes => &mut doc.routes,
                Kind::TcpRoutes => &mut doc.tcp_routes,
                _ => continue,
            };
            let v: serde_json::Value = serde_json::from_slice(&e.value)
                .map_err(|err| StoreError::Invalid(format!("{}: {err}", e.key)))?;
            map.insert(e.key.name.clone(), v);
        }
        let body = serde_yaml::to_string(&doc)
            .map_err(|e| StoreError::Invalid(format!("encoding {}: {e}", self.path.display())))?;
        let text = format!(
            "# Meshgate standalone config. Hot-reloaded on change; rewritten by the admin API\n\
             # (comments are not kept then). `revision` is maintained by Meshgate.\n{body}"
        );
        write_atomically(&self.path, text.as_bytes()).map_err(|e| {
            StoreError::Unavailable(format!("writing {}: {e}", self.path.display()))
        })?;
        st.file_hash = Sha256::digest(text.as_bytes()).into();
        st.file_sig = file_sig(&self.path);
        Ok(())
    }

    async fn expire_leases(&self) {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let expired: Vec<i64> = st
            .leases
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            drop_leases(self, &mut st, &expired);
        }
    }
}

fn drop_leases(store: &FileStore, st: &mut State, ids: &[i64]) {
    for id in ids {
        st.leases.remove(id);
    }
    let keys: Vec<Key> = st
        .leased
        .iter()
        .filter(|(_, l)| ids.contains(l))
        .map(|(k, _)| k.clone())
        .collect();
    if keys.is_empty() {
        return;
    }
    let revision = st.revision + 1;
    let events = keys
        .into_iter()
        .map(|key| Event::Delete {
            key,
            mod_revision: revision,
        })
        .collect();
    store.commit(st, revision, events);
}

async fn poll_loop(store: Weak<FileStore>) {
    let mut tick = 0u32;
    loop {
        tokio::time::sleep(POLL).await;
        let Some(store) = store.upgrade() else { return };
        tick = tick.wrapping_add(1);
        store
            .check_file(tick.is_multiple_of(FULL_CHECK_EVERY))
            .await;
        store.expire_leases().await;
    }
}

fn file_sig(path: &Path) -> Option<FileSig> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileSig {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
    })
}

fn parse_doc(path: &Path, bytes: &[u8]) -> Result<FileDoc, StoreError> {
    crate::node::parse_yaml(path, bytes).map_err(StoreError::Invalid)
}

/// The objects of a document as (key, JSON), and the problems of the ones
/// skipped for an invalid name (logged, and reported as refused).
fn doc_entries(path: &Path, doc: &FileDoc) -> (Vec<(Key, Vec<u8>)>, Vec<String>) {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for (kind, map) in doc.kinds() {
        for (name, value) in map {
            match Key::parse(&format!("{kind}/{name}")) {
                Some(key) => {
                    out.push((key, serde_json::to_vec(value).expect("json value encodes")))
                }
                None => {
                    let problem = format!(
                        "{}: {kind}.{name}: invalid name (use a-z, 0-9, '-', '_', '.'); object ignored",
                        path.display()
                    );
                    tracing::error!("{problem}");
                    refused.push(problem);
                }
            }
        }
    }
    (out, refused)
}

fn same_json(a: &[u8], b: &[u8]) -> bool {
    a == b
        || matches!(
            (serde_json::from_slice::<serde_json::Value>(a), serde_json::from_slice::<serde_json::Value>(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

fn check(st: &State, cond: &Cond) -> bool {
    match cond {
        Cond::Version { key, version } => {
            st.entries.get(key).map(|e| e.mod_revision).unwrap_or(0) == *version
        }
        Cond::Exists(key) => st.entries.contains_key(key),
        Cond::KindUnchangedSince { kind, revision } => st
            .entries
            .values()
            .filter(|e| e.key.kind == *kind)
            .all(|e| e.mod_revision <= *revision),
    }
}

#[async_trait]
impl ConfigStore for FileStore {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn source_errors(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let st = self.state.lock().await;
        let entries = st
            .entries
            .values()
            .filter(|e| super::covers(prefix, &e.key.to_string()))
            .cloned()
            .collect();
        Ok(Range {
            entries,
            revision: st.revision,
        })
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, StoreError> {
        Ok(self.state.lock().await.entries.get(key).cloned())
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let st = self.state.lock().await;
        let oldest = st.history.front().map(|b| b.revision);
        if from_revision <= st.revision && oldest.is_none_or(|o| o > from_revision) {
            return Err(StoreError::Compacted(oldest.unwrap_or(st.revision + 1)));
        }
        let replay: Vec<Arc<WatchBatch>> = st
            .history
            .iter()
            .filter(|b| b.revision >= from_revision)
            .cloned()
            .collect();
        let rx = self.tx.subscribe();
        drop(st);
        let prefix = prefix.to_string();
        let filter = move |b: &WatchBatch| WatchBatch {
            revision: b.revision,
            events: b
                .events
                .iter()
                .filter(|ev| {
                    let key = match ev {
                        Event::Put(e) => &e.key,
                        Event::Delete { key, .. } => key,
                    };
                    super::covers(&prefix, &key.to_string())
                })
                .cloned()
                .collect(),
        };
        let filter2 = filter.clone();
        let replayed = futures::stream::iter(
            replay
                .into_iter()
                .map(move |b| filter(&b))
                .filter(|b| !b.events.is_empty())
                .map(Ok)
                .collect::<Vec<_>>(),
        );
        // Like etcd, a watch only sees batches with events under its prefix.
        let live = futures::stream::unfold(Some(rx), move |rx| {
            let filter = filter2.clone();
            async move {
                let mut rx = rx?;
                loop {
                    match rx.recv().await {
                        Ok(b) if b.revision >= from_revision => {
                            let f = filter(&b);
                            if !f.events.is_empty() {
                                return Some((Ok(f), Some(rx)));
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            return Some((Err(StoreError::Compacted(0)), None))
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(replayed.chain(live).boxed())
    }

    async fn txn(&self, conds: Vec<Cond>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let mut st = self.state.lock().await;
        if !conds.iter().all(|c| check(&st, c)) {
            return Ok(TxnOutcome::ConditionFailed);
        }
        let revision = st.revision + 1;
        let mut next = st.entries.clone();
        let mut events = Vec::with_capacity(ops.len());
        let mut touches_file = false;
        for op in &ops {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(l) = lease {
                        if !st.leases.contains_key(l) {
                            return Err(StoreError::Invalid(format!("lease {l} not found")));
                        }
                    }
                    touches_file |= key.kind.is_config();
                    let e = Entry {
                        key: key.clone(),
                        value: value.clone(),
                        mod_revision: revision,
                    };
                    next.insert(key.clone(), e.clone());
                    events.push(Event::Put(e));
                }
                Op::Delete { key } => {
                    if next.remove(key).is_some() {
                        touches_file |= key.kind.is_config();
                        events.push(Event::Delete {
                            key: key.clone(),
                            mod_revision: revision,
                        });
                    }
                }
            }
        }
        if touches_file {
            self.write_file(&mut st, &next, revision)?;
        }
        for op in &ops {
            if let Op::Put { key, lease, .. } = op {
                match lease {
                    Some(l) => st.leased.insert(key.clone(), *l),
                    None => st.leased.remove(key),
                };
            }
        }
        self.commit(&mut st, revision, events);
        Ok(TxnOutcome::Committed { revision })
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<i64, StoreError> {
        let mut st = self.state.lock().await;
        let id = st.next_lease;
        st.next_lease += 1;
        let ttl = Duration::from_secs(ttl_s.max(1) as u64);
        st.leases.insert(id, (Instant::now() + ttl, ttl));
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let mut st = self.state.lock().await;
        match st.leases.get_mut(&lease) {
            Some((deadline, ttl)) => {
                *deadline = Instant::now() + *ttl;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let mut st = self.state.lock().await;
        drop_leases(self, &mut st, &[lease]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_writes_the_file_and_watch_sees_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            "services:\n  a:\n    endpoints: [{address: '127.0.0.1:1'}]\n",
        )
        .unwrap();
        let store = FileStore::open(&path).await.unwrap();
        let r = store.range("").await.unwrap();
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.revision, 1);
        let mut w = store.watch("services/", r.revision + 1).await.unwrap();

        let key = Key::new(Kind::Services, "b");
        let out = store
            .txn(
                vec![Cond::Version {
                    key: key.clone(),
                    version: 0,
                }],
                vec![Op::Put {
                    key: key.clone(),
                    value: br#"{"endpoints":[]}"#.to_vec(),
                    lease: None,
                }],
            )
            .await
            .unwrap();
        assert_eq!(out, TxnOutcome::Committed { revision: 2 });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("revision: 2"), "{text}");
        assert!(text.contains("  b:"), "{text}");
        let b = w.next().await.unwrap().unwrap();
        assert_eq!(b.revision, 2);

        // A second create of the same key fails its condition.
        let out = store
            .txn(
                vec![Cond::Version {
                    key: key.clone(),
                    version: 0,
                }],
                vec![Op::Delete { key: key.clone() }],
            )
            .await
            .unwrap();
        assert_eq!(out, TxnOutcome::ConditionFailed);

        // A hand edit is picked up; only the changed object gets an event.
        let edited = text.replace("127.0.0.1:1", "127.0.0.1:2");
        std::fs::write(&path, edited).unwrap();
        let b = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(b.revision, 3);
        assert_eq!(b.events.len(), 1);
        let Event::Put(e) = &b.events[0] else {
            panic!()
        };
        assert_eq!(e.key, Key::new(Kind::Services, "a"));

        // A broken edit is refused and changes nothing.
        std::fs::write(&path, "services: [").unwrap();
        store.check_file(true).await;
        assert_eq!(store.range("").await.unwrap().revision, 3);
    }

    #[tokio::test]
    async fn leases_expire_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "{}\n").unwrap();
        let store = FileStore::open(&path).await.unwrap();
        let lease = store.grant_lease(1).await.unwrap();
        let key = Key::new(Kind::Nodes, "gateway/gw-1");
        store
            .txn(
                vec![],
                vec![Op::Put {
                    key: key.clone(),
                    value: b"{}".to_vec(),
                    lease: Some(lease),
                }],
            )
            .await
            .unwrap();
        assert!(store.get(&key).await.unwrap().is_some());
        // Runtime objects are not written to the file.
        assert!(!std::fs::read_to_string(&path).unwrap().contains("gw-1"));
        store.revoke(lease).await.unwrap();
        assert!(store.get(&key).await.unwrap().is_none());
        assert!(!store.keep_alive(lease).await.unwrap());
    }
}
