//! The ops port of gateways and sidecars: `/healthz` (the process is up),
//! `/readyz` (config is loaded and the process is not draining), `/metrics`
//! (Prometheus), `/config` (what the process has applied) and
//! `/config/revision` (the applied store revision; with `?at_least=N` it
//! waits up to `wait_ms` for that revision to be applied, which is how
//! benchmarks and operators time propagation without polling). A
//! standalone gateway also mounts the admin API here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use meshgate_config::sync::SyncStatus;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::node::explain::BadField;
use meshgate_config::model::ExplainRequest;

/// What the ops endpoints read.
#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    /// (ready, details) for `/readyz`.
    pub readiness: Arc<dyn Fn() -> (bool, Value) + Send + Sync>,
    /// The applied config for `/config`.
    pub config_dump: Arc<dyn Fn() -> Value + Send + Sync>,
    /// The config sync's status (its `revision` is the applied revision).
    pub status: watch::Receiver<SyncStatus>,
    /// `POST /explain` (gateways): a request explained against the
    /// applied config.
    pub explain: Option<ExplainFn>,
}

/// Explains a request against the applied config.
pub type ExplainFn = Arc<dyn Fn(&ExplainRequest) -> Result<Value, BadField> + Send + Sync>;

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .route("/config/revision", get(revision))
        .route("/explain", axum::routing::post(explain))
        .with_state(state)
}

async fn explain(State(st): State<OpsState>, body: axum::body::Bytes) -> Response {
    let Some(f) = &st.explain else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "not_found", "message": "this process does not route"})),
        )
            .into_response();
    };
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let req: ExplainRequest = match serde_path_to_error::deserialize(de) {
        Ok(r) => r,
        Err(e) => {
            let field = e.path().to_string();
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_request", "message": format!("{field}: {}", e.inner()), "field": field})),
            )
                .into_response();
        }
    };
    match f(&req) {
        Ok(v) => Json(v).into_response(),
        Err(b) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request", "message": format!("{}: {}", b.field, b.message), "field": b.field})),
        )
            .into_response(),
    }
}

async fn readyz(State(st): State<OpsState>) -> Response {
    let (ready, details) = (st.readiness)();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(details)).into_response()
}

async fn metrics(State(st): State<OpsState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn config(State(st): State<OpsState>) -> Json<Value> {
    Json((st.config_dump)())
}

#[derive(Debug, Deserialize)]
struct RevisionQuery {
    at_least: Option<i64>,
    #[serde(default)]
    wait_ms: u64,
}

/// Longest wait a `/config/revision` call may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// `{"revision": N}`; with `at_least`, 200 once the applied revision
/// reaches it, or 408 with the current revision when `wait_ms` runs out.
async fn revision(State(st): State<OpsState>, Query(q): Query<RevisionQuery>) -> Response {
    let mut rx = st.status.clone();
    let Some(want) = q.at_least else {
        let rev = rx.borrow().revision;
        return Json(json!({ "revision": rev })).into_response();
    };
    let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    let reached = tokio::time::timeout(wait, rx.wait_for(|s| s.revision >= want))
        .await
        .is_ok_and(|r| r.is_ok());
    let rev = rx.borrow().revision;
    match reached {
        true => Json(json!({ "revision": rev })).into_response(),
        false => (
            StatusCode::REQUEST_TIMEOUT,
            Json(json!({
                "error": "not_yet_applied",
                "message": format!("revision {want} not applied within {} ms", wait.as_millis()),
                "revision": rev,
            })),
        )
            .into_response(),
    }
}

/// Serves an axum router until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            crate::server::wait_true(&mut shutdown).await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "ops server failed");
    }
}
