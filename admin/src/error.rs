//! The admin API's one error shape: `{"error": code, "message", "field"?,
//! "errors"?, "referrers"?}` with the matching status. Internals never leak.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use meshgate_config::store::StoreError;
use meshgate_config::{FieldError, Invalid};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            message: message.into(),
            field: None,
            errors: Vec::new(),
            referrers: Vec::new(),
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Adds a sentence to the message (what to do about it).
    pub fn hint(mut self, hint: &str) -> Self {
        self.message = format!("{} ({hint})", self.message);
        self
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn invalid(inv: Invalid) -> Self {
        let field = inv.errors.first().map(|e| e.field.clone());
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_config",
            message: inv.to_string(),
            field,
            errors: inv.errors,
            referrers: Vec::new(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "admin request failed: store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the config store cannot be reached; nothing was changed",
                )
            }
            other => {
                tracing::error!(error = %other, "admin request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the admin log",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

/// `Query<T>` whose rejection is the API's JSON error (400, `field` naming
/// the parameter when serde says which).
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for Query<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", e.body_text()))
    }
}

/// `Path<T>` whose rejection is the API's JSON error.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for Path<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.body_text()))
    }
}

/// The request body as bytes, whose rejection (larger than the
/// `max_body_bytes` limit, unreadable) is the API's JSON error rather than
/// axum's text.
#[derive(Debug)]
pub struct Body(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    "body_too_large"
                } else {
                    "invalid_body"
                };
                ApiError::new(e.status(), code, e.body_text())
            })
    }
}
