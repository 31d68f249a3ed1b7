//! The ops port of gateways and sidecars: `/healthz` (the process is up),
//! `/readyz` (config is loaded and the process is not draining), `/metrics`
//! (Prometheus) and `/config` (what the process has applied). A standalone
//! gateway also mounts the admin API here.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use crate::metrics::Metrics;

/// What the ops endpoints read.
#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    /// (ready, details) for `/readyz`.
    pub readiness: Arc<dyn Fn() -> (bool, Value) + Send + Sync>,
    /// The applied config for `/config`.
    pub config_dump: Arc<dyn Fn() -> Value + Send + Sync>,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .with_state(state)
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
