//! The `ConfigStore` trait: the few primitives every process needs from the
//! config store, implemented by [`EtcdStore`] (cluster mode) and
//! [`FileStore`] (standalone mode, one YAML file).
//!
//! The trait is deliberately small (range, watch, conditional transaction,
//! leases); resilience (resume, resync, backoff, last-known-good) is built
//! once on top of it in [`crate::sync`] and [`crate::registration`].

mod etcd;
mod file;

use std::fmt;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use etcd::{EtcdOptions, EtcdStore};
pub use file::FileStore;

use crate::key::{Key, Kind};

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    /// The object's JSON encoding.
    pub value: Vec<u8>,
    /// The store revision of its last change: the object's `version`.
    pub mod_revision: i64,
}

/// The result of a range read: entries and the store revision read at.
#[derive(Debug, Clone, Default)]
pub struct Range {
    pub entries: Vec<Entry>,
    pub revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Entry),
    Delete { key: Key, mod_revision: i64 },
}

/// Changes of one store revision (or a progress notification with no
/// events), in revision order.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    pub revision: i64,
    pub events: Vec<Event>,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The object's version equals this; 0 means it must not exist.
    Version { key: Key, version: i64 },
    /// The object exists.
    Exists(Key),
    /// No object of this kind changed after `revision`.
    KindUnchangedSince { kind: Kind, revision: i64 },
}

/// An operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Key,
        value: Vec<u8>,
        /// Attach to this lease: the object disappears when it expires.
        lease: Option<i64>,
    },
    Delete {
        key: Key,
    },
}

/// What happened to a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// All conditions held and the operations were applied at `revision`.
    Committed { revision: i64 },
    /// A condition did not hold; nothing changed.
    ConditionFailed,
}

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (or did not answer in time).
    #[error("config store unavailable: {0}")]
    Unavailable(String),
    /// The watch start revision was compacted away: re-read everything.
    #[error("watch revision compacted (oldest available {0})")]
    Compacted(i64),
    /// The store holds something that cannot be used (e.g. a YAML syntax
    /// error in the standalone file).
    #[error("{0}")]
    Invalid(String),
}

pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// Whether a range or watch `prefix` covers the key `rel`: everything
/// under an empty prefix or one ending in `/`; otherwise only the key
/// itself (`services/orders` does not cover `services/orders-v2`).
pub fn covers(prefix: &str, rel: &str) -> bool {
    if prefix.is_empty() || prefix.ends_with('/') {
        rel.starts_with(prefix)
    } else {
        rel == prefix
    }
}

/// Whether `prefix` is a whole-prefix range (not one key).
pub fn is_prefix(prefix: &str) -> bool {
    prefix.is_empty() || prefix.ends_with('/')
}

/// The primitives a config store offers. Keys are relative (`routes/x`).
#[async_trait]
pub trait ConfigStore: Send + Sync + 'static {
    /// A short description for logs, e.g. `etcd http://127.0.0.1:2379 /meshgate/v1`.
    fn describe(&self) -> String;

    /// Reads every object under `prefix` (e.g. `services/`, or `` for
    /// all). A prefix that is neither empty nor ends in `/` names one key
    /// (see [`covers`]).
    async fn range(&self, prefix: &str) -> Result<Range, StoreError>;

    /// Reads one object.
    async fn get(&self, key: &Key) -> Result<Option<Entry>, StoreError>;

    /// Streams the changes under `prefix` (as in [`ConfigStore::range`])
    /// from `from_revision` on. The
    /// stream ends with an error when the store goes away.
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError>;

    /// Applies `ops` atomically if every condition holds.
    async fn txn(&self, conds: Vec<Cond>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;

    /// Grants a lease of `ttl_s` seconds and returns its id.
    async fn grant_lease(&self, ttl_s: i64) -> Result<i64, StoreError>;

    /// Renews a lease; `Ok(false)` when it has already expired.
    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError>;

    /// Revokes a lease, deleting its objects.
    async fn revoke(&self, lease: i64) -> Result<(), StoreError>;

    /// The store's current revision, where it can go back (an etcd wiped,
    /// or restored from an older backup, and started again); `None` for a
    /// store whose revision never goes back (the standalone file).
    async fn revision(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }

    /// The newest `mod_revision` among the objects under `prefix` (0 when
    /// there are none), without reading them all where the store can.
    async fn newest_revision(&self, prefix: &str) -> Result<i64, StoreError> {
        let r = self.range(prefix).await?;
        Ok(r.entries.iter().map(|e| e.mod_revision).max().unwrap_or(0))
    }

    /// What the store refused of its own source, while the previous config
    /// stays in force: the standalone file that does not parse, an object
    /// name in it that is not valid. Empty for etcd (whose objects are
    /// checked one by one by the processes that apply them).
    fn source_errors(&self) -> Vec<String> {
        Vec::new()
    }
}

impl fmt::Debug for dyn ConfigStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}
