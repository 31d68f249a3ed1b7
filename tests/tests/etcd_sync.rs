//! The sync engine against a real etcd: it resumes its watch after a
//! disconnect without losing events, and when the revisions it missed were
//! compacted away it re-reads the store and applies exactly the difference.
//! The disconnect is made by cutting a TCP relay between it and etcd.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate_config::store::{ConfigStore, EtcdOptions, EtcdStore};
use meshgate_config::sync::{self, Apply, Change, SyncOptions};
use meshgate_tests::*;

/// A TCP relay to etcd that can be cut (closing every connection and
/// refusing new ones) and restored.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (u, c) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed at once
                }
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = c.notified() => {}
                    }
                });
            }
        });
        Relay { port, up, cut }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Records the applied state.
#[derive(Clone, Default)]
struct Recorder {
    state: Arc<Mutex<BTreeMap<String, String>>>,
    deletes: Arc<Mutex<Vec<String>>>,
}

impl Apply for Recorder {
    fn apply(&mut self, changes: Vec<Change>, _revision: i64) {
        let mut st = self.state.lock().unwrap();
        for c in changes {
            match c {
                Change::Put(e) => {
                    st.insert(e.key.to_string(), String::from_utf8(e.value).unwrap());
                }
                Change::Delete(k) => {
                    st.remove(&k.to_string());
                    self.deletes.lock().unwrap().push(k.to_string());
                }
            }
        }
    }
}

async fn etcd_state(client: &mut etcd_client::Client) -> BTreeMap<String, String> {
    let r = client
        .get(
            "/meshgate/v1/routes/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str()
                    .unwrap()
                    .trim_start_matches("/meshgate/v1/")
                    .to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn wait_same(rec: &Recorder, client: &mut etcd_client::Client, what: &str) {
    let want = etcd_state(client).await;
    let state = rec.state.clone();
    wait_until(what, Duration::from_secs(20), || {
        let (state, want) = (state.clone(), want.clone());
        async move { *state.lock().unwrap() == want }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_disconnect_and_resyncs_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let mut client = etcd.client().await;
    let relay = Relay::start(etcd.client_port).await;
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: vec![format!("http://127.0.0.1:{}", relay.port)],
        prefix: "/meshgate/v1".into(),
        timeout: Duration::from_millis(500),
        tls: None,
        user: None,
    })
    .await
    .unwrap();
    let store: Arc<dyn ConfigStore> = Arc::new(store);
    for i in 0..5 {
        client
            .put(
                format!("/meshgate/v1/routes/r{i}"),
                format!("{{\"n\":{i}}}"),
                None,
            )
            .await
            .unwrap();
    }
    let rec = Recorder::default();
    let status = sync::spawn(store, SyncOptions::new(vec!["routes/".into()]), rec.clone());
    wait_same(&rec, &mut client, "initial load").await;

    // 1. Disconnect, change things, reconnect: the watch resumes from the
    //    last revision and every event arrives.
    relay.cut();
    let mut st = status.clone();
    tokio::time::timeout(Duration::from_secs(20), st.wait_for(|s| !s.connected))
        .await
        .unwrap()
        .unwrap();
    client
        .put("/meshgate/v1/routes/r1", "{\"n\":101}", None)
        .await
        .unwrap();
    client.delete("/meshgate/v1/routes/r2", None).await.unwrap();
    client
        .put("/meshgate/v1/routes/r9", "{\"n\":9}", None)
        .await
        .unwrap();
    relay.restore();
    wait_same(
        &rec,
        &mut client,
        "resumed watch delivers the missed events",
    )
    .await;
    assert_eq!(*rec.deletes.lock().unwrap(), vec!["routes/r2".to_string()]);

    // 2. Disconnect, change things, compact past them, reconnect: the
    //    missed revisions are gone, so the engine re-reads and diffs.
    relay.cut();
    tokio::time::timeout(Duration::from_secs(20), st.wait_for(|s| !s.connected))
        .await
        .unwrap()
        .unwrap();
    client
        .put("/meshgate/v1/routes/r3", "{\"n\":103}", None)
        .await
        .unwrap();
    client.delete("/meshgate/v1/routes/r4", None).await.unwrap();
    let r = client
        .put("/meshgate/v1/routes/r10", "{\"n\":10}", None)
        .await
        .unwrap();
    let rev = r.header().unwrap().revision();
    client.compact(rev, None).await.unwrap();
    relay.restore();
    wait_same(&rec, &mut client, "re-read after compaction").await;
    let deletes = rec.deletes.lock().unwrap().clone();
    assert_eq!(
        deletes,
        vec!["routes/r2".to_string(), "routes/r4".to_string()],
        "exactly the missing deletes"
    );
    let s = status.borrow().clone();
    assert!(s.connected && s.revision >= rev, "{s:?}");
}
