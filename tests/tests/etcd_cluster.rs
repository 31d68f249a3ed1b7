//! End-to-end: etcd as a real cluster. Every process is given all three
//! members of a real 3-member etcd cluster on loopback; SIGKILLing the
//! leader during a stream of admin writes and under traffic loses no
//! acknowledged write, fails no request, and every gateway converges to
//! the same revision. And an etcd wiped and started again (its revision
//! back at the beginning) is detected, re-read and applied, and said so
//! in `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use meshgate_loadtest::{run, LoadConfig, Progress};
use meshgate_tests::*;
use serde_json::json;

/// The node-config `store` for all of `endpoints`.
fn store(endpoints: &[String]) -> serde_json::Value {
    json!({"store": {"etcd": {"endpoints": endpoints, "timeout_ms": 1000}}})
}

async fn revision(ops: u16) -> i64 {
    get_json(&format!("http://127.0.0.1:{ops}/config/revision"))
        .await
        .and_then(|v| v["revision"].as_i64())
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_loses_no_acknowledged_write_and_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cluster = EtcdCluster::start(d, 3).await;
    let endpoints = cluster.endpoints();
    let (_admin_proc, base, token) = start_admin_with(d, &endpoints[0], store(&endpoints));
    let admin = Admin { base, token };
    admin.wait_up().await;
    let b = Backend::start("b").await;
    let r = admin
        .put(
            "services/web",
            &json!({"endpoints": [{"address": b.addr.to_string()}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = admin
        .put(
            "routes/web",
            &json!({"scope": "ingress", "match": {"path": {"prefix": "/"}}, "backends": [{"service": "web"}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let mut gws = Vec::new();
    for id in ["gw-1", "gw-2"] {
        gws.push(start_gateway_with(
            d,
            id,
            &["ingress"],
            &[],
            &endpoints[0],
            store(&endpoints),
        ));
    }
    for (_, p) in &gws {
        wait_ready(p.ops).await;
    }

    // Traffic through both gateways for the whole run.
    let mut loads = Vec::new();
    for (_, p) in &gws {
        let mut c = LoadConfig::new("127.0.0.1", p.ingress, "/");
        c.headers
            .insert(http::header::HOST, "web.example".parse().unwrap());
        c.connections = 2;
        c.rate = Some(50.0);
        c.duration = Duration::from_secs(20);
        c.timeout = Duration::from_secs(10);
        loads.push(tokio::spawn(run(c, Arc::new(Progress::default()))));
    }

    // A stream of admin writes; the leader is SIGKILLed after the 20th is
    // acknowledged.
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut refused = 0;
    let mut killed = None;
    let mut i = 0;
    while acked.len() < 60 {
        i += 1;
        let name = format!("svc-{i}");
        let r = admin
            .put(
                &format!("services/{name}"),
                &json!({"endpoints": [{"address": "127.0.0.1:9"}], "labels": {"n": i.to_string()}}),
            )
            .await;
        match r.status {
            200 | 201 => acked.push((name, r.json()["version"].as_i64().expect("version"))),
            // Not acknowledged (the cluster was electing a leader): the
            // client knows it must retry.
            _ => refused += 1,
        }
        if acked.len() == 20 && killed.is_none() {
            let leader = cluster.leader().await;
            cluster.members[leader].proc.kill();
            killed = Some(leader);
        }
        assert!(i < 2000, "writes never resumed after the leader died");
    }
    let last = acked.last().unwrap().1;

    // Every acknowledged write is there, with what was written.
    for (name, version) in &acked {
        let r = admin.get(&format!("services/{name}")).await;
        assert_eq!(r.status, 200, "acknowledged {name} lost: {r:?}");
        assert!(r.json()["version"].as_i64().unwrap() >= *version);
    }
    // Both gateways converge to the same revision, the last write's or
    // later.
    wait_until(
        "the gateways converge to the same revision",
        Duration::from_secs(20),
        || {
            let ops: Vec<u16> = gws.iter().map(|(_, p)| p.ops).collect();
            async move {
                let a = revision(ops[0]).await;
                a >= last && a == revision(ops[1]).await
            }
        },
    )
    .await;
    for l in loads {
        let r = l.await.unwrap();
        assert_eq!(r.error_count(), 0, "{}\n{:?}", r.table(), r.failures);
        assert!(r.requests > 500, "{}", r.table());
    }
    eprintln!(
        "leader m{} killed; {} writes acknowledged, {refused} refused meanwhile",
        killed.unwrap(),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_wiped_and_restarted_at_a_lower_revision_is_detected_and_reread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut etcd = Etcd::start(d).await;
    let (_admin_proc, base, token) = start_admin(d, &etcd.endpoint());
    let admin = Admin { base, token };
    admin.wait_up().await;
    let b = Backend::start("b").await;
    let web = json!({"endpoints": [{"address": b.addr.to_string()}]});
    let route = json!({"scope": "ingress", "match": {"path": {"prefix": "/"}}, "backends": [{"service": "web"}]});
    assert_eq!(admin.put("services/web", &web).await.status, 201);
    assert_eq!(admin.put("routes/web", &route).await.status, 201);
    // Push the revision up.
    let mut last = 0;
    for i in 0..30 {
        let r = admin
            .put(
                &format!("services/filler-{i}"),
                &json!({"endpoints": [{"address": "127.0.0.1:9"}]}),
            )
            .await;
        assert_eq!(r.status, 201);
        last = r.json()["version"].as_i64().unwrap();
    }
    let (_gw, ports) = start_gateway(d, "gw", &["ingress"], &[], &etcd.endpoint());
    wait_ready(ports.ops).await;
    wait_until(
        "the gateway is at the last revision",
        Duration::from_secs(10),
        || async move { revision(ports.ops).await >= last },
    )
    .await;

    // etcd is wiped and started again: its revision starts over.
    etcd.stop();
    std::fs::remove_dir_all(Etcd::data_dir(d)).unwrap();
    etcd.restart().await;
    // The operator restores what matters (not the fillers).
    assert_eq!(admin.put("services/web", &web).await.status, 201);
    let r = admin.put("routes/web", &route).await;
    assert_eq!(r.status, 201);
    let restored = r.json()["version"].as_i64().unwrap();
    assert!(restored < last, "{restored} < {last}");

    let readyz = format!("http://127.0.0.1:{}/readyz", ports.ops);
    wait_until(
        "the gateway reports the reset",
        Duration::from_secs(20),
        || {
            let readyz = readyz.clone();
            async move {
                get_json(&readyz)
                    .await
                    .is_some_and(|v| !v["store_reset"].is_null())
            }
        },
    )
    .await;
    let v = get_json(&readyz).await.unwrap();
    let reset = &v["store_reset"];
    assert!(reset["from_revision"].as_i64().unwrap() >= last, "{v}");
    assert!(reset["to_revision"].as_i64().unwrap() < last, "{v}");
    // The store's view replaced the old one: the fillers are gone, the
    // restored route serves, at the store's (lower) revision.
    wait_until(
        "the gateway applies the restored store",
        Duration::from_secs(20),
        || async move {
            let cfg = get_json(&format!("http://127.0.0.1:{}/config", ports.ops))
                .await
                .unwrap_or_default();
            let services = cfg["objects"]["services"].as_object().map(|o| o.len());
            services == Some(1) && revision(ports.ops).await >= restored
        },
    )
    .await;
    let r = http_get(
        &format!("http://127.0.0.1:{}/x", ports.ingress),
        &[("host", "web.example")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(revision(ports.ops).await < last);
    let log = std::fs::read_to_string(d.join("gw.log")).unwrap();
    assert!(log.contains("etcd was wiped or restored from an older backup"));
}
