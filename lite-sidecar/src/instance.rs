//! Registration of the local app as an instance of its service.
//!
//! The sidecar checks the app (HTTP or TCP, as configured) and keeps
//! `instances/<service>/<node id>` registered under a lease only while the
//! app passes: gateways add the instance to the service's endpoints and
//! drop it when the key goes, whether the sidecar removes it (app
//! unhealthy, graceful stop) or the lease expires (the host died). The
//! instance's address is the sidecar's inbound listener when it has one
//! (the app itself is then on loopback), else the app's.
//!
//! Graceful stop deregisters first, then waits (bounded) until every
//! gateway the sidecar knows has applied the deletion, and only then lets
//! the listeners drain.

use std::sync::Arc;
use std::time::Duration;

use meshgate_config::model::Instance;
use meshgate_config::registration::Registration;
use meshgate_config::store::ConfigStore;
use meshgate_config::{Key, Kind};
use tokio::sync::watch;

use crate::config::{AppInstance, SidecarConfig};
use crate::policy::SharedPolicy;

/// Checks the app and registers it while healthy, until `stop` turns true;
/// then deregisters and waits for the gateways to see it.
pub async fn run(
    store: Arc<dyn ConfigStore>,
    cfg: SidecarConfig,
    app: AppInstance,
    policy: SharedPolicy,
    mut stop: watch::Receiver<bool>,
) {
    let node_id = cfg.id.clone();
    let key = Key::new(Kind::Instances, format!("{}/{node_id}", cfg.service));
    let address = cfg
        .inbound
        .as_ref()
        .map_or(app.address.clone(), |i| i.address());
    let lease_ttl = Duration::from_secs(cfg.lease_ttl_s);
    let record = Instance {
        address: address.clone(),
        weight: app.weight,
        zone: app.zone.clone(),
        labels: app.labels.clone(),
        node: node_id.clone(),
    };
    let value = serde_json::to_vec(&record).expect("instance encodes");
    let check = &app.health_check;
    let interval = Duration::from_millis(check.interval_ms);
    let timeout = Duration::from_millis(check.timeout_ms);
    let mut registration: Option<Registration> = None;
    let mut verdict = meshgate_gateway::upstream::health::Verdict::default();
    let mut healthy: Option<bool> = None;
    loop {
        let ok = matches!(
            tokio::time::timeout(
                timeout,
                meshgate_gateway::upstream::health::probe(check, &app.address, None)
            )
            .await,
            Ok(Ok(()))
        );
        let now = verdict.record(ok, check);
        if healthy != Some(now) {
            healthy = Some(now);
            if now {
                tracing::info!(instance = %key, %address, app = %app.address, "app healthy: registered as an instance");
                registration = Some(Registration::spawn(
                    store.clone(),
                    key.clone(),
                    value.clone(),
                    lease_ttl,
                ));
            } else {
                tracing::warn!(instance = %key, address = %app.address, "app failing its health check: deregistered");
                if let Some(r) = registration.take() {
                    r.deregister().await;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = meshgate_gateway::server::wait_true(&mut stop) => break,
        }
    }
    if let Some(r) = registration.take() {
        r.deregister().await;
        wait_for_gateways(
            &store,
            &policy,
            Duration::from_millis(app.deregister_wait_ms),
        )
        .await;
        tracing::info!(instance = %key, "deregistered; gateways have applied it");
    }
}

/// Waits until every gateway known to the policy reports an applied
/// revision at least the store's current one, or `limit` passes.
async fn wait_for_gateways(store: &Arc<dyn ConfigStore>, policy: &SharedPolicy, limit: Duration) {
    let Ok(now) = store.range("instances/~none/").await else {
        return;
    };
    let target = now.revision;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let behind = policy.load().gateways_behind(target);
        if behind.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?behind,
                target,
                "gateways have not applied the deregistration in time; draining anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
