//! The `/api/v1` handlers: list, get, create-or-replace, delete of config
//! objects with versions, `If-Match`, validation with field paths and
//! referential integrity enforced inside the store transaction; and the
//! list of live nodes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use meshgate_config::model::Node;
use meshgate_config::store::{Cond, ConfigStore, Entry, Op, TxnOutcome};
use meshgate_config::validate::decode_json;
use meshgate_config::{Key, Kind, Object};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;

/// Shared state of the admin API.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn ConfigStore>,
    pub tokens: Arc<crate::auth::Tokens>,
}

fn config_kind(kind: &str) -> Result<Kind, ApiError> {
    match Kind::parse(kind) {
        Some(k) if k.is_config() => Ok(k),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_kind",
            format!("unknown config kind {kind:?}; expected one of services, routes, groups"),
        )),
    }
}

fn object_key(kind: &str, name: &str) -> Result<Key, ApiError> {
    let kind = config_kind(kind)?;
    if !meshgate_config::key::valid_name(name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("{name:?}: names are 1-128 characters of a-z, 0-9, '-', '_', '.', starting and ending with a letter or digit"),
        )
        .field("name"));
    }
    Ok(Key::new(kind, name))
}

/// The representation of a stored object.
fn render(e: &Entry) -> Value {
    let spec: Value = serde_json::from_slice(&e.value).unwrap_or(Value::Null);
    json!({
        "kind": e.key.kind.as_str(),
        "name": e.key.name,
        "version": e.mod_revision,
        "spec": spec,
    })
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

/// Parses `If-Match`: `"12"`, `12` or `W/"12"`; `*` means "must exist".
fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    let Some(v) = headers.get("if-match") else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(Some(IfMatch::Any));
    }
    let s = s.trim_start_matches("W/").trim_matches('"');
    s.parse::<i64>()
        .map(|v| Some(IfMatch::Version(v)))
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_if_match",
                "If-Match must be a version such as \"12\"",
            )
            .field("If-Match")
        })
}

#[derive(Debug, Clone, Copy)]
enum IfMatch {
    Any,
    Version(i64),
}

pub async fn list(
    State(st): State<AdminState>,
    Path(kind): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let kind = config_kind(&kind)?;
    let r = st.store.range(&kind.prefix()).await?;
    let items: Vec<Value> = r.entries.iter().map(render).collect();
    Ok(Json(json!({ "items": items, "revision": r.revision })))
}

pub async fn get(
    State(st): State<AdminState>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let key = object_key(&kind, &name)?;
    let e = st
        .store
        .get(&key)
        .await?
        .ok_or_else(|| ApiError::not_found(&key))?;
    let mut resp = Json(render(&e)).into_response();
    resp.headers_mut().insert("etag", etag(e.mod_revision));
    Ok(resp)
}

pub async fn put(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let key = object_key(&kind, &name)?;
    let expect = if_match(&headers)?;
    let spec = spec_from_body(&key, &body)?;
    let obj = Object::decode(&key, &spec).map_err(ApiError::invalid)?;
    let value = obj.to_json();
    let refs = obj.references();
    for (field, r) in &refs {
        if st.store.get(r).await?.is_none() {
            return Err(missing_ref(&key, field, r));
        }
    }
    let current = st.store.get(&key).await?;
    let current_version = current.as_ref().map(|e| e.mod_revision).unwrap_or(0);
    let version_cond = match expect {
        Some(IfMatch::Version(v)) => {
            if v != current_version {
                return Err(precondition_failed(&key, v, current_version));
            }
            v
        }
        Some(IfMatch::Any) if current.is_none() => return Err(precondition_failed(&key, -1, 0)),
        _ => current_version,
    };
    let mut conds = vec![Cond::Version {
        key: key.clone(),
        version: version_cond,
    }];
    conds.extend(refs.iter().map(|(_, r)| Cond::Exists(r.clone())));
    let op = Op::Put {
        key: key.clone(),
        value: value.clone(),
        lease: None,
    };
    match st.store.txn(conds, vec![op]).await? {
        TxnOutcome::Committed { revision } => {
            tracing::info!(object = %key, version = revision, by = %caller.name, "object written");
            let e = Entry {
                key,
                value,
                mod_revision: revision,
            };
            let status = if current.is_some() {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let mut resp = (status, Json(render(&e))).into_response();
            resp.headers_mut().insert("etag", etag(revision));
            Ok(resp)
        }
        TxnOutcome::ConditionFailed => {
            // Find out which condition failed, for a precise answer.
            for (field, r) in &refs {
                if st.store.get(r).await?.is_none() {
                    return Err(missing_ref(&key, field, r));
                }
            }
            let now = st
                .store
                .get(&key)
                .await?
                .map(|e| e.mod_revision)
                .unwrap_or(0);
            if expect.is_some() {
                Err(precondition_failed(&key, version_cond, now))
            } else {
                Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("{key} was changed concurrently (now version {now}); retry"),
                ))
            }
        }
    }
}

pub async fn delete(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = object_key(&kind, &name)?;
    let expect = if_match(&headers)?;
    let current = st
        .store
        .get(&key)
        .await?
        .ok_or_else(|| ApiError::not_found(&key))?;
    if let Some(IfMatch::Version(v)) = expect {
        if v != current.mod_revision {
            return Err(precondition_failed(&key, v, current.mod_revision));
        }
    }
    // Referrers, read at one revision per kind; the transaction checks
    // that no object of those kinds changed since.
    let mut conds = vec![Cond::Version {
        key: key.clone(),
        version: current.mod_revision,
    }];
    let mut referrers = Vec::new();
    for kind in referring_kinds(key.kind) {
        let r = st.store.range(&kind.prefix()).await?;
        for e in &r.entries {
            if let Ok(obj) = Object::decode(&e.key, &e.value) {
                if obj.references().iter().any(|(_, k)| *k == key) {
                    referrers.push(e.key.to_string());
                }
            }
        }
        conds.push(Cond::KindUnchangedSince {
            kind: *kind,
            revision: r.revision,
        });
    }
    if !referrers.is_empty() {
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("{key} is still referenced by {}", referrers.join(", ")),
        );
        e.referrers = referrers;
        return Err(e);
    }
    match st
        .store
        .txn(conds, vec![Op::Delete { key: key.clone() }])
        .await?
    {
        TxnOutcome::Committed { revision } => {
            tracing::info!(object = %key, revision, by = %caller.name, "object deleted");
            Ok(Json(json!({ "deleted": key.to_string(), "revision": revision })).into_response())
        }
        TxnOutcome::ConditionFailed => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{key} or an object referring to it changed concurrently; retry"),
        )),
    }
}

/// Kinds whose objects may refer to an object of `kind`.
fn referring_kinds(kind: Kind) -> &'static [Kind] {
    match kind {
        Kind::Services => &[Kind::Routes, Kind::TcpRoutes, Kind::Services],
        Kind::Groups => &[Kind::Services],
        _ => &[],
    }
}

pub async fn nodes(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let r = st.store.range(&Kind::Nodes.prefix()).await?;
    let items: Vec<Value> = r
        .entries
        .iter()
        .filter_map(|e| {
            let node: Node = decode_json(&e.key, &e.value).ok()?;
            let mut v = serde_json::to_value(node).ok()?;
            let id = e
                .key
                .name
                .split_once('/')
                .map_or(&*e.key.name, |(_, id)| id);
            v["id"] = Value::String(id.to_string());
            Some(v)
        })
        .collect();
    Ok(Json(json!({ "items": items, "revision": r.revision })))
}

/// The object's spec from a request body: either the spec itself, or the
/// envelope that GET returns (`{"kind", "name", "version", "spec"}`).
fn spec_from_body(key: &Key, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut map) = v else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "request body must be a JSON object",
        ));
    };
    if map.contains_key("spec") {
        for (field, want) in [("kind", key.kind.as_str()), ("name", key.name.as_str())] {
            if let Some(got) = map.get(field) {
                if got.as_str() != Some(want) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_config",
                        format!("{key}: {field}: must be {want:?} to match the URL"),
                    )
                    .field(field));
                }
            }
        }
        if let Some(extra) = map
            .keys()
            .find(|k| !["kind", "name", "version", "spec"].contains(&k.as_str()))
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_config",
                format!("{key}: unknown field `{extra}` beside `spec`"),
            )
            .field(extra.clone()));
        }
        let spec = map.remove("spec").unwrap_or(Value::Null);
        return Ok(serde_json::to_vec(&spec).expect("json encodes"));
    }
    Ok(body.to_vec())
}

fn missing_ref(key: &Key, field: &str, target: &Key) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "missing_reference",
        format!("{key}: {field}: {target} does not exist"),
    )
    .field(field)
}

fn precondition_failed(key: &Key, expected: i64, current: i64) -> ApiError {
    let msg = if current == 0 {
        format!("{key} does not exist (If-Match {expected})")
    } else {
        format!("{key} is at version {current}, not {expected}")
    };
    ApiError::new(StatusCode::PRECONDITION_FAILED, "version_mismatch", msg)
}
