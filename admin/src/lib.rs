//! The Meshgate admin REST API: an axum router over any
//! [`meshgate_config::store::ConfigStore`], served by the `meshgate-admin`
//! process (etcd) or embedded in a standalone gateway (YAML file).
//!
//! Module map: [`api`] (the handlers), [`auth`] (bearer tokens and roles),
//! [`error`] (the one JSON error shape), [`issuer`] (the online mesh CA:
//! join tokens and workload certificates), [`ca`] (the CA on files, for
//! `meshctl ca`), [`tls`] (the API over TLS), [`openapi`], [`client`],
//! [`topology`] (the live service graph); `console/index.html`, the web
//! console served at `/console/`.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod ca;
pub mod client;
pub mod error;
pub mod issuer;
pub mod openapi;
pub mod tls;
pub mod topology;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use api::AdminState;
pub use auth::{Role, Tokens};
use error::ApiError;

/// The `/api/v1` router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/api/v1/nodes", get(api::nodes))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/metrics", get(api::metrics))
        .route("/api/v1/topology", get(api::topology))
        .route(
            "/api/v1/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .route("/api/v1/batch", post(api::batch))
        .route("/api/v1/validate", post(api::validate))
        .route("/api/v1/explain", post(api::explain))
        .route("/api/v1/cache/purge", post(api::cache_purge))
        .route("/api/v1/history", get(api::history))
        .route("/api/v1/rollback", post(api::rollback))
        .route(
            "/api/v1/join-tokens",
            get(issuer::list_tokens).post(issuer::create_token),
        )
        .route(
            "/api/v1/join-tokens/{name}",
            axum::routing::delete(issuer::delete_token),
        )
        .route("/api/v1/{kind}", get(api::list))
        .route(
            "/api/v1/{kind}/{name}",
            get(api::get)
                .put(api::put)
                .patch(api::patch)
                .delete(api::delete),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint").into_response()
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method (see /api/v1/openapi.json)",
            )
            .into_response()
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        // Nodes asking for their identity authenticate with a join token
        // or their certificate, not an admin token.
        .merge(Router::new().route("/api/v1/identity", post(issuer::sign)))
        // The console's page holds no data: it asks for a token and calls
        // the API with it.
        .merge(
            Router::new()
                .route(
                    "/console",
                    get(|| async { axum::response::Redirect::permanent("/console/") }),
                )
                .route("/console/", get(console)),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            state.limits.max_body_bytes,
        ))
        .with_state(state)
}

/// The web console: one page embedded in the binary (no network access
/// at run time), which works through `/api/v1` with the token it is given.
async fn console() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Its own script and styles only; no frames, no other origin.
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (axum::http::header::REFERRER_POLICY, "no-referrer"),
        ],
        include_str!("console/index.html"),
    )
        .into_response()
}

async fn authenticate(State(st): State<AdminState>, mut req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let Some(caller) = st.tokens.check(auth) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
        .into_response();
    };
    // Dry runs write nothing: viewers may run them.
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || matches!(req.uri().path(), "/api/v1/validate" | "/api/v1/explain");
    if caller.role == Role::Viewer && !read_only {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read",
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Refuses to expose an unauthenticated admin API beyond loopback.
pub fn check_listen(addr: SocketAddr, tokens: &Tokens) -> anyhow::Result<()> {
    if tokens.is_empty() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve the admin API on {addr} without a token: configure a token file, or listen on 127.0.0.1"
        );
    }
    Ok(())
}

/// Builds the state for a store and tokens.
pub fn state(store: Arc<dyn meshgate_config::store::ConfigStore>, tokens: Tokens) -> AdminState {
    AdminState {
        store,
        tokens: Arc::new(tokens),
        explainer: None,
        purger: None,
        history_limit: api::HISTORY_LIMIT,
        limits: api::Limits::default(),
        issuer: None,
        topology: None,
    }
}
