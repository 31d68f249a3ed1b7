//! `EtcdStore`: the config store on etcd, one JSON object per key under a
//! configurable prefix (default `/meshgate/v1`).
//!
//! The client connects lazily and reconnects by itself; every call is bounded
//! by a timeout so a dead etcd never blocks a caller for long. Watches report
//! compaction as [`StoreError::Compacted`] so that [`crate::sync`] re-reads.
//!
//! **TLS and authentication.** `https://` endpoints with the roots (and,
//! for etcd's client-certificate auth, a client certificate) of
//! [`EtcdOptions::tls`]; a user and password ([`EtcdOptions::user`]). With a
//! user, making a client authenticates, which needs etcd to answer: the
//! client is made at the first call that needs it, not at start-up (a
//! process started while etcd is down starts from its snapshot as
//! always), and made again when etcd refuses its token (tokens expire).

use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// TLS to etcd (needs `https://` endpoints).
    pub tls: Option<etcd_client::TlsOptions>,
    /// User and password, for etcd's authentication.
    pub user: Option<(String, String)>,
}

/// The etcd-backed [`ConfigStore`].
pub struct EtcdStore {
    /// A client per endpoint, once made (see the module docs); `None`
    /// again after etcd refused its token.
    clients: tokio::sync::Mutex<Vec<Option<Client>>>,
    /// The endpoint calls go to, until it cannot be reached.
    pinned: AtomicUsize,
    options: EtcdOptions,
    prefix: String,
}

impl EtcdStore {
    /// Creates the store. Does not contact etcd (the connection is made on
    /// first use and re-made whenever it breaks). Without a user the
    /// client is made here, so bad endpoints are reported at once.
    pub async fn connect(opts: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let mut prefix = opts.prefix.trim_end_matches('/').to_string();
        prefix.push('/');
        if opts.endpoints.is_empty() {
            return Err(StoreError::Invalid("etcd: no endpoints".into()));
        }
        let store = EtcdStore {
            clients: tokio::sync::Mutex::new(vec![None; opts.endpoints.len()]),
            pinned: AtomicUsize::new(0),
            options: opts,
            prefix,
        };
        if store.options.user.is_none() {
            for i in 0..store.options.endpoints.len() {
                let client = store.make_client(i).await.map_err(|e| match e {
                    StoreError::Unavailable(m) => StoreError::Invalid(m),
                    e => e,
                })?;
                store.clients.lock().await[i] = Some(client);
            }
        }
        Ok(store)
    }

    /// A client of the endpoint `i` alone.
    async fn make_client(&self, i: usize) -> Result<Client, StoreError> {
        let o = &self.options;
        let endpoint = &o.endpoints[i];
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(o.timeout)
            .with_timeout(o.timeout)
            .with_keep_alive(Duration::from_secs(5), o.timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &o.tls {
            connect = connect.with_tls(tls.clone());
        }
        if let Some((user, password)) = &o.user {
            connect = connect.with_user(user.clone(), password.clone());
        }
        match tokio::time::timeout(o.timeout, Client::connect([endpoint], Some(connect))).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "etcd connect {endpoint}: {e}"
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd connect {endpoint}: no answer within {:?}",
                o.timeout
            ))),
        }
    }

    /// The client of endpoint `i`, made first if there is none.
    async fn client(&self, i: usize) -> Result<Client, StoreError> {
        let mut slots = self.clients.lock().await;
        if let Some(c) = &slots[i] {
            return Ok(c.clone());
        }
        let c = self.make_client(i).await?;
        slots[i] = Some(c.clone());
        Ok(c)
    }

    /// Whether etcd refused the client's auth token (it expired, or the
    /// user's password changed); if so, the client is dropped so that the
    /// next call authenticates again.
    async fn token_refused(&self, i: usize, e: &etcd_client::Error) -> bool {
        if self.options.user.is_none() || !refused_token(e) {
            return false;
        }
        tracing::info!(error = %e, "etcd refused the auth token; authenticating again");
        self.clients.lock().await[i].take();
        true
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

    /// Runs `call` on the pinned member's client within the timeout; when
    /// etcd refused the auth token, once more with a client that
    /// authenticated again. When the member cannot be reached, the next
    /// one is pinned and the call made there — always for a read, a watch
    /// or a lease call; for a write (`retry` false) only when it cannot
    /// have been sent (the connection could not be made), never after an
    /// answer could have been lost.
    async fn call_on<T, F, Fut>(&self, what: &str, retry: bool, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.options.endpoints.len();
        let mut reauthenticated = false;
        let mut tried = 0;
        loop {
            let i = self.pinned.load(Ordering::Relaxed) % n;
            tried += 1;
            let failed = match self.client(i).await {
                Err(e) => e,
                Ok(client) => {
                    match tokio::time::timeout(self.options.timeout, call(client)).await {
                        Ok(Ok(v)) => return Ok(v),
                        Ok(Err(e)) if !reauthenticated && self.token_refused(i, &e).await => {
                            reauthenticated = true;
                            tried -= 1;
                            continue;
                        }
                        Ok(Err(e)) if retry || not_sent(&e) => {
                            StoreError::Unavailable(format!("etcd {what}: {e}"))
                        }
                        Ok(Err(e)) => {
                            return Err(StoreError::Unavailable(format!("etcd {what}: {e}")))
                        }
                        Err(_) if retry => StoreError::Unavailable(format!(
                            "etcd {what}: no answer within {:?}",
                            self.options.timeout
                        )),
                        Err(_) => {
                            return Err(StoreError::Unavailable(format!(
                                "etcd {what}: no answer within {:?}",
                                self.options.timeout
                            )))
                        }
                    }
                }
            };
            if tried >= n {
                return Err(failed);
            }
            // Pin the next member (unless another call already moved on).
            let next = (i + 1) % n;
            if self
                .pinned
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::warn!(
                    from = %self.options.endpoints[i],
                    to = %self.options.endpoints[next],
                    error = %failed,
                    "etcd member unreachable; failing over"
                );
            }
        }
    }

    /// [`EtcdStore::call_on`] for a read, a watch or a lease call.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(what, true, call).await
    }
}

/// Whether a call failed before anything reached etcd (no connection
/// could be made), so that making it elsewhere cannot apply it twice.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

/// Whether etcd refused the request's auth token.
fn refused_token(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.message().contains("auth token") || format!("{:?}", s.code()) == "Unauthenticated"
        }
        _ => false,
    }
}

#[async_trait]
impl ConfigStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} {}", self.options.endpoints.join(","), self.prefix)
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let key = self.abs(prefix);
        let opts = super::is_prefix(prefix).then(|| GetOptions::new().with_prefix());
        let resp = self
            .call("range", |c| {
                let (key, opts) = (key.clone(), opts.clone());
                async move { c.kv_client().get(key, opts).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let entries = resp.kvs().iter().filter_map(|kv| self.entry(kv)).collect();
        Ok(Range { entries, revision })
    }

    async fn revision(&self) -> Result<Option<i64>, StoreError> {
        // Any read answers with the store's revision: the cheapest is one
        // key (the prefix itself, which holds nothing). A count over the
        // prefix would visit every key, from every process at every
        // reconnect.
        let key = self.abs("");
        let resp = self
            .call("revision", |c| {
                let key = key.clone();
                async move {
                    let opts = GetOptions::new().with_count_only();
                    c.kv_client().get(key, Some(opts)).await
                }
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()))
    }

    async fn newest_revision(&self, prefix: &str) -> Result<i64, StoreError> {
        use etcd_client::{SortOrder, SortTarget};
        let key = self.abs(prefix);
        let resp = self
            .call("newest revision", |c| {
                let key = key.clone();
                async move {
                    let opts = GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Mod, SortOrder::Descend)
                        .with_limit(1)
                        .with_keys_only();
                    c.kv_client().get(key, Some(opts)).await
                }
            })
            .await?;
        Ok(resp.kvs().first().map_or(0, |kv| kv.mod_revision()))
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, StoreError> {
        let key = self.abs(&key.to_string());
        let resp = self
            .call("get", |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.entry(kv)))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let mut opts = WatchOptions::new()
            .with_start_revision(from_revision)
            .with_progress_notify();
        if super::is_prefix(prefix) {
            opts = opts.with_prefix();
        }
        let key = self.abs(prefix);
        let (watcher, stream) = self
            .call("watch", |c| {
                let (key, opts) = (key.clone(), opts.clone());
                async move { c.watch_client().watch(key, Some(opts)).await }
            })
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
        let resp = self
            .call_on("txn", false, |c| {
                let txn = Txn::new().when(compares.clone()).and_then(txn_ops.clone());
                async move { c.kv_client().txn(txn).await }
            })
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
        let resp = self
            .call("lease grant", |c| async move {
                c.lease_client().grant(ttl_s, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let kept = self
            .call("keep-alive", |c| async move {
                match c.lease_client().keep_alive(lease).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(kept)
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.call("lease revoke", |c| async move {
            c.lease_client().revoke(lease).await
        })
        .await?;
        Ok(())
    }
}
