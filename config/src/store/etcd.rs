//! `EtcdStore`: the config store on etcd, one JSON object per key under a
//! configurable prefix (default `/meshgate/v1`).
//!
//! The client connects lazily and reconnects by itself; every call is bounded
//! by a timeout so a dead etcd never blocks a caller for long. Watches report
//! compaction as [`StoreError::Compacted`] so that [`crate::sync`] re-reads.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use super::*;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/meshgate/v1`.
    pub prefix: String,
    /// Bound on each call (and on connecting).
    pub timeout: Duration,
}

/// The etcd-backed [`ConfigStore`].
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl EtcdStore {
    /// Creates the store. Does not contact etcd (the connection is made on
    /// first use and re-made whenever it breaks).
    pub async fn connect(opts: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(opts.timeout)
            .with_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(5), opts.timeout)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&opts.endpoints, Some(connect))
            .await
            .map_err(|e| StoreError::Invalid(format!("etcd endpoints: {e}")))?;
        let mut prefix = opts.prefix.trim_end_matches('/').to_string();
        prefix.push('/');
        Ok(EtcdStore {
            client,
            prefix,
            endpoints: opts.endpoints,
            timeout: opts.timeout,
        })
    }

    fn abs(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Option<Entry> {
        let key = self.rel_key(kv.key())?;
        Some(Entry {
            key,
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        })
    }

    fn rel_key(&self, raw: &[u8]) -> Option<Key> {
        let s = std::str::from_utf8(raw).ok()?;
        let key = s.strip_prefix(&self.prefix).and_then(Key::parse);
        if key.is_none() {
            tracing::debug!(key = s, "ignoring key that is not a meshgate object");
        }
        key
    }

    async fn bounded<T, F>(&self, what: &str, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("etcd {what}: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what}: no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

#[async_trait]
impl ConfigStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} {}", self.endpoints.join(","), self.prefix)
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded(
                "range",
                kv.get(
                    self.abs(prefix),
                    super::is_prefix(prefix).then(|| GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let entries = resp.kvs().iter().filter_map(|kv| self.entry(kv)).collect();
        Ok(Range { entries, revision })
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("get", kv.get(self.abs(&key.to_string()), None))
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.entry(kv)))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let mut wc = self.client.watch_client();
        let mut opts = WatchOptions::new()
            .with_start_revision(from_revision)
            .with_progress_notify();
        if super::is_prefix(prefix) {
            opts = opts.with_prefix();
        }
        let (watcher, stream) = self
            .bounded("watch", wc.watch(self.abs(prefix), Some(opts)))
            .await?;
        let prefix = self.prefix.clone();
        let rel = move |raw: &[u8]| -> Option<Key> {
            std::str::from_utf8(raw)
                .ok()?
                .strip_prefix(&prefix)
                .and_then(Key::parse)
        };
        // The watcher is kept alive with the stream: dropping it would end the watch.
        let s = futures::stream::unfold(Some((watcher, stream, rel)), |state| async move {
            let (watcher, mut stream, rel) = state?;
            let msg = stream.message().await;
            let item = match msg {
                Ok(Some(resp)) if resp.compact_revision() > 0 => {
                    Err(StoreError::Compacted(resp.compact_revision()))
                }
                Ok(Some(resp)) if resp.canceled() => Err(StoreError::Unavailable(format!(
                    "etcd watch canceled: {}",
                    resp.cancel_reason()
                ))),
                Ok(Some(resp)) => {
                    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                    let mut events = Vec::with_capacity(resp.events().len());
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some(key) = rel(kv.key()) else { continue };
                        events.push(match ev.event_type() {
                            etcd_client::EventType::Put => Event::Put(Entry {
                                key,
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                            }),
                            etcd_client::EventType::Delete => Event::Delete {
                                key,
                                mod_revision: kv.mod_revision(),
                            },
                        });
                    }
                    Ok(WatchBatch { revision, events })
                }
                Ok(None) => Err(StoreError::Unavailable("etcd watch stream ended".into())),
                Err(e) => Err(StoreError::Unavailable(format!("etcd watch: {e}"))),
            };
            // After an error the stream is over.
            let next = item.is_ok().then_some((watcher, stream, rel));
            Some((item, next))
        });
        Ok(s.boxed())
    }

    async fn txn(&self, conds: Vec<Cond>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<Compare> = conds
            .iter()
            .map(|c| match c {
                Cond::Version { key, version: 0 } => {
                    Compare::version(self.abs(&key.to_string()), CompareOp::Equal, 0)
                }
                Cond::Version { key, version } => {
                    Compare::mod_revision(self.abs(&key.to_string()), CompareOp::Equal, *version)
                }
                Cond::Exists(key) => {
                    Compare::version(self.abs(&key.to_string()), CompareOp::Greater, 0)
                }
                Cond::KindUnchangedSince { kind, revision } => {
                    Compare::mod_revision(self.abs(&kind.prefix()), CompareOp::Less, revision + 1)
                        .with_prefix()
                }
            })
            .collect();
        let txn_ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    self.abs(&key.to_string()),
                    value,
                    lease.map(|l| PutOptions::new().with_lease(l)),
                ),
                Op::Delete { key } => TxnOp::delete(self.abs(&key.to_string()), None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("txn", kv.txn(Txn::new().when(compares).and_then(txn_ops)))
            .await?;
        if resp.succeeded() {
            Ok(TxnOutcome::Committed {
                revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            })
        } else {
            Ok(TxnOutcome::ConditionFailed)
        }
    }

    async fn grant_lease(&self, ttl_s: i64) -> Result<i64, StoreError> {
        let mut lc = self.client.lease_client();
        let resp = self.bounded("lease grant", lc.grant(ttl_s, None)).await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let mut lc = self.client.lease_client();
        match tokio::time::timeout(self.timeout, lc.keep_alive(lease)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Ok(false),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("etcd keep-alive: {e}"))),
            Err(_) => Err(StoreError::Unavailable("etcd keep-alive: timed out".into())),
        }
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let mut lc = self.client.lease_client();
        self.bounded("lease revoke", lc.revoke(lease)).await?;
        Ok(())
    }
}
