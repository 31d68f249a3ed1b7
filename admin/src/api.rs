//! The `/api/v1` handlers: list, get, create-or-replace, delete of config
//! objects with versions, `If-Match`, validation with field paths and
//! referential integrity enforced inside the store transaction; and the
//! list of live nodes.

use std::sync::Arc;

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use meshgate_config::key::node_prefix;
use meshgate_config::model::{ExplainRequest, Node, NodeKind, Role, Scope};
use meshgate_config::store::{Cond, ConfigStore, Entry, Op, TxnOutcome};
use meshgate_config::validate::decode_json;
use meshgate_config::FieldError;
use meshgate_config::{Key, Kind, Object};
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;

use crate::auth::Caller;
use crate::error::{ApiError, Body, Path, Query};

/// Answers an explain request; a standalone gateway explains in process.
pub type Explainer = Arc<
    dyn Fn(ExplainRequest) -> Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send>>
        + Send
        + Sync,
>;

/// Drops a route's cached answers in process (a standalone gateway): how
/// many keys, or why not.
pub type Purger = Arc<dyn Fn(&str, Option<&str>) -> Result<u64, String> + Send + Sync>;

/// Shared state of the admin API.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn ConfigStore>,
    pub tokens: Arc<crate::auth::Tokens>,
    /// `None`: explain requests go to a live gateway's ops port.
    pub explainer: Option<Explainer>,
    /// `None`: cache purges go to every live gateway's ops port.
    pub purger: Option<Purger>,
    /// Change-log entries kept (default [`HISTORY_LIMIT`]).
    pub history_limit: usize,
    pub limits: Limits,
    /// The mesh CA, when this admin issues identities.
    pub issuer: Option<Arc<crate::issuer::MeshIssuer>>,
    /// The live service graph, polled from the nodes.
    pub topology: Option<Arc<crate::topology::Topology>>,
}

/// The admin API's request limits (see docs/operations.md).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Most items in a batch.
    pub max_batch_items: usize,
    /// Most operations, and most conditions, in one store transaction:
    /// etcd's `--max-txn-ops`.
    pub max_txn_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_batch_items: 100,
            max_txn_ops: 128,
        }
    }
}

fn config_kind(kind: &str) -> Result<Kind, ApiError> {
    match Kind::parse(kind) {
        Some(k) if k.is_config() => Ok(k),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_kind",
            format!(
                "unknown config kind {kind:?}; expected one of {}",
                Kind::CONFIG.map(Kind::as_str).join(", ")
            ),
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

/// The representation of a stored object. An object that does not pass
/// validation (written into the store directly) says so: `invalid` lists
/// its problems with their field paths (every gateway refuses it and keeps
/// its previous version), and a value that is not JSON at all is shown as
/// `raw` text, with `spec` null.
///
/// A certificate's private key is never shown: its spec goes out without
/// it, with `info` describing the leaf (subject, SANs, issuer, validity,
/// fingerprint).
fn render(e: &Entry) -> Value {
    let mut spec: Option<Value> = serde_json::from_slice(&e.value).ok();
    let info = spec
        .as_mut()
        .and_then(|s| meshgate_config::validate::public_spec(e.key.kind, s));
    let mut v = json!({
        "kind": e.key.kind.as_str(),
        "name": e.key.name,
        "version": e.mod_revision,
        "spec": spec,
    });
    if let Some(info) = info {
        v["info"] = json!(info);
    }
    if spec.is_none() && e.key.kind != Kind::Certs {
        v["raw"] = String::from_utf8_lossy(&e.value).into();
    }
    if e.key.kind.is_config() {
        if let Err(problems) = Object::decode(&e.key, &e.value) {
            v["invalid"] = json!(problems.errors);
        }
    }
    v
}

/// What a write takes from the stored version: a certificate written
/// without its `private_key` keeps the stored one (GET never shows it, so
/// a spec read, edited and put back has none); a consumer's JWT key
/// written without its `secret` keeps the stored secret of the same
/// `kid`. (A consumer's API keys are hashed after validation, in
/// [`plan_put_over`].)
fn keep_stored_key<'a>(key: &Key, spec: &'a [u8], before: Option<&Entry>) -> Cow<'a, [u8]> {
    if !matches!(key.kind, Kind::Certs | Kind::Consumers) {
        return Cow::Borrowed(spec);
    }
    let Ok(Value::Object(mut new)) = serde_json::from_slice::<Value>(spec) else {
        return Cow::Borrowed(spec);
    };
    let old = before.and_then(|b| match serde_json::from_slice::<Value>(&b.value) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    });
    if key.kind == Kind::Consumers {
        let mut v = Value::Object(new);
        if let Some(old) = old {
            keep_jwt_secrets(&mut v, &Value::Object(old));
        }
        return Cow::Owned(serde_json::to_vec(&v).expect("json encodes"));
    }
    if new.get("private_key").is_some_and(|k| k != "") {
        return Cow::Borrowed(spec);
    }
    match old.as_ref().and_then(|o| o.get("private_key")) {
        Some(k) => {
            new.insert("private_key".into(), k.clone());
            Cow::Owned(serde_json::to_vec(&new).expect("json encodes"))
        }
        None => Cow::Borrowed(spec),
    }
}

/// Gives every JWT key of `new` without a `secret` the stored secret of
/// the key with the same `kid` (or, without kids, at the same place).
fn keep_jwt_secrets(new: &mut Value, old: &Value) {
    let Some(old_keys) = old.pointer("/jwt/keys").and_then(Value::as_array) else {
        return;
    };
    let Some(keys) = new.pointer_mut("/jwt/keys").and_then(Value::as_array_mut) else {
        return;
    };
    for (i, k) in keys.iter_mut().enumerate() {
        let Some(k) = k.as_object_mut() else { continue };
        if k.contains_key("secret") {
            continue;
        }
        let stored = match k.get("kid") {
            Some(kid) => old_keys.iter().find(|o| o.get("kid") == Some(kid)),
            None => old_keys.get(i).filter(|o| o.get("kid").is_none()),
        };
        if let Some(secret) = stored.and_then(|o| o.get("secret")) {
            k.insert("secret".into(), secret.clone());
        }
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

/// Parses `If-Match`: `"12"`, `12` or `W/"12"`; `*` means "must exist".
fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    let Some(v) = headers.get("if-match") else {
        return Ok(None);
    };
    parse_if_match(v.to_str().unwrap_or("")).map(Some)
}

fn parse_if_match(s: &str) -> Result<IfMatch, ApiError> {
    let s = s.trim();
    if s == "*" {
        return Ok(IfMatch::Any);
    }
    let s = s.trim_start_matches("W/").trim_matches('"');
    s.parse::<i64>().map(IfMatch::Version).map_err(|_| {
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

#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    /// Page size (1-1000, default 500).
    limit: Option<usize>,
    /// Start after this name (the `next` of the previous page).
    after: Option<String>,
    /// Label selector: `k=v,k2=v2` (every pair must match the spec's `labels`).
    selector: Option<String>,
}

/// Most items a page may hold.
const MAX_PAGE: usize = 1000;

/// The `limit` parameter: `default` when absent, 1 to [`MAX_PAGE`].
fn page_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("limit must be from 1 to {MAX_PAGE}"),
        )
        .field("limit"));
    }
    Ok(limit)
}

/// `GET /api/v1/{kind}`: objects in name order, a page at a time, read at
/// one store revision.
pub async fn list(
    State(st): State<AdminState>,
    Path(kind): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let kind = config_kind(&kind)?;
    let limit = page_limit(params.limit, 500)?;
    let mut selector = Vec::new();
    for pair in params.selector.iter().flat_map(|s| s.split(',')) {
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => selector.push((k.trim(), v.trim())),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_parameter",
                    format!("selector: {pair:?} is not key=value"),
                )
                .field("selector"))
            }
        }
    }
    let r = st.store.range(&kind.prefix()).await?;
    let mut items = Vec::new();
    let mut next = None;
    for e in &r.entries {
        if params
            .after
            .as_deref()
            .is_some_and(|a| e.key.name.as_str() <= a)
        {
            continue;
        }
        let v = render(e);
        let labels = &v["spec"]["labels"];
        if !selector
            .iter()
            .all(|(k, want)| labels[*k].as_str() == Some(*want))
        {
            continue;
        }
        if items.len() == limit {
            next = items.last().map(|i: &Value| i["name"].clone());
            break;
        }
        items.push(v);
    }
    Ok(Json(
        json!({ "items": items, "revision": r.revision, "next": next }),
    ))
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

/// Objects put (`Some`) or deleted (`None`) by earlier items of the same
/// batch: later items see them, as the transaction will.
type Overlay = HashMap<Key, Option<Object>>;

/// One write, checked and ready for the store transaction.
struct Plan {
    key: Key,
    conds: Vec<Cond>,
    op: Op,
    /// The object before the write (`None`: created).
    before: Option<Entry>,
    /// The new object (`None`: deleted).
    after: Option<Object>,
}

impl Plan {
    fn result(&self) -> &'static str {
        match (&self.before, &self.after) {
            (_, None) => "deleted",
            (None, Some(_)) => "created",
            (Some(_), Some(_)) => "replaced",
        }
    }
}

/// Checks a create-or-replace: the object is valid, every object it
/// refers to exists (in the store or earlier in the batch), and its
/// version matches `expect`. The conditions make the transaction fail if
/// any of that changes before it commits.
async fn plan_put(
    st: &AdminState,
    key: Key,
    spec: &[u8],
    expect: Option<IfMatch>,
    overlay: &Overlay,
) -> Result<Plan, ApiError> {
    let before = st.store.get(&key).await?;
    plan_put_over(st, key, spec, expect, before, overlay).await
}

/// [`plan_put`] over the version of the object the caller has read
/// (`before`): the transaction commits only if it is still that version.
async fn plan_put_over(
    st: &AdminState,
    key: Key,
    spec: &[u8],
    expect: Option<IfMatch>,
    before: Option<Entry>,
    overlay: &Overlay,
) -> Result<Plan, ApiError> {
    let spec = keep_stored_key(&key, spec, before.as_ref());
    let mut obj = Object::decode(&key, &spec).map_err(ApiError::invalid)?;
    if key.kind == Kind::Consumers {
        // The API keys, checked as written, are stored as hashes only.
        let mut v: Value = serde_json::from_slice(&obj.to_json()).expect("config objects are JSON");
        meshgate_config::validate::hash_api_keys(&mut v);
        let hashed = serde_json::to_vec(&v).expect("json encodes");
        obj = Object::decode(&key, &hashed).map_err(ApiError::invalid)?;
    }
    let value = obj.to_json();
    let mut conds = Vec::new();
    for (field, r) in obj.references() {
        match overlay.get(&r) {
            Some(Some(_)) => {}
            Some(None) => return Err(missing_ref(&key, &field, &r)),
            None => {
                if st.store.get(&r).await?.is_none() {
                    return Err(missing_ref(&key, &field, &r));
                }
                conds.push(Cond::Exists(r));
            }
        }
    }
    let current_version = before.as_ref().map(|e| e.mod_revision).unwrap_or(0);
    match expect {
        Some(IfMatch::Version(v)) if v != current_version => {
            return Err(precondition_failed(&key, v, current_version))
        }
        Some(IfMatch::Any) if before.is_none() => {
            return Err(precondition_failed(&key, -1, 0));
        }
        _ => {}
    }
    conds.push(Cond::Version {
        key: key.clone(),
        version: current_version,
    });
    Ok(Plan {
        op: Op::Put {
            key: key.clone(),
            value,
            lease: None,
        },
        key,
        conds,
        before,
        after: Some(obj),
    })
}

/// Checks a delete: the object exists at the expected version and, unless
/// `force`, nothing refers to it (in the store or in the batch).
async fn plan_delete(
    st: &AdminState,
    key: Key,
    expect: Option<IfMatch>,
    force: bool,
    overlay: &Overlay,
) -> Result<Plan, ApiError> {
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
    let mut conds = vec![Cond::Version {
        key: key.clone(),
        version: current.mod_revision,
    }];
    if !force {
        // Referrers, read at one revision per kind; the transaction checks
        // that no object of those kinds changed since.
        let mut referrers = Vec::new();
        for kind in referring_kinds(key.kind) {
            let r = st.store.range(&kind.prefix()).await?;
            for e in r.entries.iter().filter(|e| !overlay.contains_key(&e.key)) {
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
        for (k, obj) in overlay {
            if let Some(obj) = obj {
                if obj.references().iter().any(|(_, r)| *r == key) {
                    referrers.push(k.to_string());
                }
            }
        }
        if !referrers.is_empty() {
            referrers.sort();
            let mut e = ApiError::new(
                StatusCode::CONFLICT,
                "in_use",
                format!(
                    "{key} is still referenced by {} (delete with ?force=true to override)",
                    referrers.join(", ")
                ),
            );
            e.referrers = referrers;
            return Err(e);
        }
    }
    Ok(Plan {
        op: Op::Delete { key: key.clone() },
        key,
        conds,
        before: Some(current),
        after: None,
    })
}

/// Commits plans in one transaction. `Ok(None)`: a condition failed
/// (something changed meanwhile); nothing was written.
async fn commit(st: &AdminState, caller: &Caller, plans: &[Plan]) -> Result<Option<i64>, ApiError> {
    // Each condition once (many routes may check the same service).
    let mut conds: Vec<Cond> = Vec::new();
    for c in plans.iter().flat_map(|p| p.conds.iter()) {
        if !conds.contains(c) {
            conds.push(c.clone());
        }
    }
    let mut ops: Vec<Op> = plans.iter().map(|p| p.op.clone()).collect();
    // The change log entry commits with the change, or not at all.
    ops.push(history_record(caller, plans));
    let most = st.limits.max_txn_ops;
    if ops.len() > most || conds.len() > most {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_batch",
            format!(
                "this write is one transaction of {} operations and {} conditions; the store allows {most} of each (etcd's --max-txn-ops, max_txn_ops here): split it",
                ops.len(),
                conds.len()
            ),
        )
        .field("items"));
    }
    match st.store.txn(conds, ops).await? {
        TxnOutcome::Committed { revision } => {
            for p in plans {
                tracing::info!(object = %p.key, result = p.result(), version = revision, by = %caller.name, "config written");
            }
            // Trimming reads the whole log: every few commits only (at
            // most a twentieth of the limit, so the excess stays small).
            static COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let every = (st.history_limit as u64 / 20).clamp(1, TRIM_EVERY);
            if COMMITS
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(every)
            {
                let st = st.clone();
                tokio::spawn(async move { trim_history(&st).await });
            }
            Ok(Some(revision))
        }
        TxnOutcome::ConditionFailed => Ok(None),
    }
}

/// Change-log entries kept by default (the oldest go first). The log is
/// trimmed every few commits (at most [`TRIM_EVERY`]) of an admin process,
/// so it may briefly hold that many more per process.
pub const HISTORY_LIMIT: usize = 1000;
const TRIM_EVERY: u64 = 50;

/// The change-log entry of a commit: who, when, and each object before and
/// after. Its version (the store revision) is the version each changed
/// object got.
fn history_record(caller: &Caller, plans: &[Plan]) -> Op {
    let now = meshgate_config::model::now_ms();
    let id = format!("{now:013}-{:08x}", rand_u32());
    let changes: Vec<Value> = plans
        .iter()
        .map(|p| {
            let spec = |v: &[u8]| {
                let mut v = serde_json::from_slice::<Value>(v).unwrap_or(Value::Null);
                meshgate_config::validate::public_spec(p.key.kind, &mut v);
                v
            };
            let after = match &p.op {
                Op::Put { value, .. } => spec(value),
                Op::Delete { .. } => Value::Null,
            };
            json!({
                "kind": p.key.kind.as_str(),
                "name": p.key.name,
                "op": p.result(),
                "before_version": p.before.as_ref().map(|e| e.mod_revision),
                "before": p.before.as_ref().map(|e| spec(&e.value)),
                "after": after,
            })
        })
        .collect();
    let value = json!({ "at_ms": now, "by": caller.name, "changes": changes });
    Op::Put {
        key: Key::new(Kind::History, id),
        value: serde_json::to_vec(&value).expect("json encodes"),
        lease: None,
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// Deletes the oldest change-log entries beyond the state's limit.
async fn trim_history(st: &AdminState) {
    let Ok(r) = st.store.range(&Kind::History.prefix()).await else {
        return;
    };
    if r.entries.len() <= st.history_limit {
        return;
    }
    let extra = r.entries.len() - st.history_limit;
    let ops = r.entries[..extra]
        .iter()
        .map(|e| Op::Delete { key: e.key.clone() })
        .collect();
    if let Err(e) = st.store.txn(vec![], ops).await {
        tracing::warn!(error = %e, "could not trim the change log");
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct HistoryParams {
    kind: Option<String>,
    name: Option<String>,
    /// Newest first, at most this many (1-1000, default 100).
    limit: Option<usize>,
}

/// `GET /api/v1/history`: the change log, newest first, optionally of one
/// object (`?kind=routes&name=checkout`).
pub async fn history(
    State(st): State<AdminState>,
    Query(p): Query<HistoryParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(p.limit, 100)?;
    if let Some(k) = &p.kind {
        config_kind(k)?;
    }
    let r = st.store.range(&Kind::History.prefix()).await?;
    let mut items = Vec::new();
    for e in r.entries.iter().rev() {
        let Ok(mut v) = serde_json::from_slice::<Value>(&e.value) else {
            continue;
        };
        if let Some(Value::Array(changes)) = v.get_mut("changes") {
            changes.retain(|c| {
                p.kind.as_deref().is_none_or(|k| c["kind"] == k)
                    && p.name.as_deref().is_none_or(|n| c["name"] == n)
            });
            if changes.is_empty() {
                continue;
            }
        }
        v["id"] = Value::String(e.key.name.clone());
        v["version"] = e.mod_revision.into();
        items.push(v);
        if items.len() == limit {
            break;
        }
    }
    Ok(Json(json!({ "items": items, "revision": r.revision })))
}

/// `POST /api/v1/rollback`: `{"kind", "name", "version"}` puts the object
/// back as it was at that recorded version (or deletes it, if that version
/// was its deletion), through the same checks as any write.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub kind: String,
    pub name: String,
    pub version: i64,
}

pub async fn rollback(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: RollbackRequest = decode_body(&body)?;
    let key = object_key(&req.kind, &req.name)?;
    let expect = if_match(&headers)?;
    let wait = wait_param(&params)?;
    let r = st.store.range(&Kind::History.prefix()).await?;
    let recorded = r
        .entries
        .iter()
        .filter(|e| e.mod_revision == req.version)
        .filter_map(|e| serde_json::from_slice::<Value>(&e.value).ok())
        .flat_map(|v| match v.get("changes") {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        })
        .find(|c| c["kind"] == key.kind.as_str() && c["name"] == key.name.as_str());
    let Some(change) = recorded else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no recorded change of {key} at version {} (see GET /api/v1/history)",
                req.version
            ),
        )
        .field("version"));
    };
    let plan = match &change["after"] {
        Value::Null => plan_delete(&st, key, expect, false, &Overlay::new()).await?,
        spec => {
            let spec = serde_json::to_vec(spec).expect("json encodes");
            let certs = key.kind == Kind::Certs;
            plan_put(&st, key, &spec, expect, &Overlay::new())
                .await
                .map_err(|e| match certs {
                    // The change log keeps no private keys: the stored key
                    // is used, and must fit the certificate rolled back to.
                    true => e.hint("the change log keeps no private keys; a certificate rolls back only to a version with the stored key, else PUT it again with its key"),
                    false => e,
                })?
        }
    };
    commit_one(&st, &caller, &plan, expect, wait).await
}

/// Commits one planned write and answers it (or says what changed
/// meanwhile).
async fn commit_one(
    st: &AdminState,
    caller: &Caller,
    plan: &Plan,
    expect: Option<IfMatch>,
    wait: Option<Duration>,
) -> Result<Response, ApiError> {
    match commit(st, caller, std::slice::from_ref(plan)).await? {
        Some(revision) => Ok(written(st, plan, revision, wait).await),
        None => Err(conflict(st, plan, expect).await),
    }
}

/// The answer to a precondition that failed at commit time: which one,
/// as precisely as a re-read can tell.
async fn conflict(st: &AdminState, plan: &Plan, expect: Option<IfMatch>) -> ApiError {
    let now = match st.store.get(&plan.key).await {
        Ok(e) => e.map(|e| e.mod_revision).unwrap_or(0),
        Err(e) => return e.into(),
    };
    let was = plan.before.as_ref().map(|e| e.mod_revision).unwrap_or(0);
    if now != was && expect.is_some() {
        return precondition_failed(&plan.key, was, now);
    }
    if let Some(obj) = &plan.after {
        for (field, r) in obj.references() {
            if let Ok(None) = st.store.get(&r).await {
                return missing_ref(&plan.key, &field, &r);
            }
        }
    }
    ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!(
            "{} or an object it depends on changed concurrently (now version {now}); nothing was changed, retry",
            plan.key
        ),
    )
}

/// The response to one committed write, with `ETag` and, when the caller
/// asked to wait, how far it has spread.
async fn written(st: &AdminState, plan: &Plan, revision: i64, wait: Option<Duration>) -> Response {
    let status = match plan.result() {
        "created" => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let mut body = match &plan.op {
        Op::Put { key, value, .. } => render(&Entry {
            key: key.clone(),
            value: value.clone(),
            mod_revision: revision,
        }),
        Op::Delete { key } => json!({ "deleted": key.to_string(), "revision": revision }),
    };
    if let Some(wait) = wait {
        body["propagation"] = propagation(st, revision, wait).await;
    }
    let mut resp = (status, Json(body)).into_response();
    if plan.after.is_some() {
        resp.headers_mut().insert("etag", etag(revision));
    }
    resp
}

#[derive(Debug, Default, Deserialize)]
pub struct WriteParams {
    /// Wait until every live gateway has applied the write, at most this
    /// long (`500ms`, `5s`, `1m`; a bare number is seconds).
    wait: Option<String>,
    /// Delete even when other objects still refer to it.
    #[serde(default)]
    force: bool,
}

fn wait_param(p: &WriteParams) -> Result<Option<Duration>, ApiError> {
    p.wait.as_deref().map(parse_duration).transpose()
}

/// `500ms`, `5s`, `2m`, or a bare number of seconds; at most 5 minutes.
pub fn parse_duration(s: &str) -> Result<Duration, ApiError> {
    match parse_span(s) {
        Some(d) if d <= Duration::from_secs(300) => Ok(d),
        _ => Err(bad_wait(s.trim())),
    }
}

/// A duration written `<number><unit>` with unit `ms`, `s` (the default),
/// `m`, `h` or `d`; `None` when it is not one.
pub fn parse_span(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn bad_wait(s: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        format!("wait={s:?}: expected a duration such as 500ms, 5s or 1m (at most 5m)"),
    )
    .field("wait")
}

/// Waits until every live gateway reports `revision` applied, or the
/// deadline; says which have and which have not.
async fn propagation(st: &AdminState, revision: i64, wait: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (applied, pending) = match gateway_revisions(st).await {
            Ok(gws) => {
                let (a, p): (Vec<_>, Vec<_>) = gws.into_iter().partition(|(_, r)| *r >= revision);
                (
                    a.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
                    p.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
                )
            }
            Err(_) => (Vec::new(), vec!["(store unreachable)".to_string()]),
        };
        let complete = pending.is_empty();
        if complete || tokio::time::Instant::now() >= deadline {
            return json!({
                "revision": revision,
                "complete": complete,
                "applied": applied,
                "pending": pending,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every live gateway's id and applied revision.
async fn gateway_revisions(st: &AdminState) -> Result<Vec<(String, i64)>, ApiError> {
    let r = st.store.range(&node_prefix(NodeKind::Gateway)).await?;
    Ok(r.entries
        .iter()
        .filter_map(|e| {
            let n: Node = decode_json(&e.key, &e.value).ok()?;
            let id = e.key.node_id();
            Some((id.to_string(), n.applied_revision))
        })
        .collect())
}

pub async fn put(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let key = object_key(&kind, &name)?;
    let expect = if_match(&headers)?;
    let wait = wait_param(&params)?;
    let spec = spec_from_body(&key, &body)?;
    let plan = plan_put(&st, key, &spec, expect, &Overlay::new()).await?;
    commit_one(&st, &caller, &plan, expect, wait).await
}

/// JSON merge patch (RFC 7396) of an object's spec. The patch applies to
/// the version read; when another write lands in between, it is applied
/// again to the new version (or, with `If-Match`, refused with 412), so no
/// update is lost. Under contention the retries back off with jitter, for
/// at most [`PATCH_RETRY_FOR`].
pub async fn patch(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let key = object_key(&kind, &name)?;
    let expect = if_match(&headers)?;
    let wait = wait_param(&params)?;
    let patch: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let deadline = tokio::time::Instant::now() + PATCH_RETRY_FOR;
    for round in 0u32.. {
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
        let mut doc: Value = serde_json::from_slice(&current.value).unwrap_or(Value::Null);
        merge_patch(&mut doc, &patch);
        let spec = serde_json::to_vec(&doc).expect("json encodes");
        // Planned over the version just read (not re-read), so a write in
        // between fails the commit and this loop patches the new version.
        let plan = plan_put_over(
            &st,
            key.clone(),
            &spec,
            None,
            Some(current),
            &Overlay::new(),
        )
        .await?;
        match commit(&st, &caller, std::slice::from_ref(&plan)).await? {
            Some(revision) => return Ok(written(&st, &plan, revision, wait).await),
            None if expect.is_some() => return Err(conflict(&st, &plan, expect).await),
            None if tokio::time::Instant::now() >= deadline => break,
            // Changed meanwhile: back off (1 ms doubling to 64 ms, with
            // jitter, so colliding writers spread out) and patch anew.
            None => {
                let cap = 1u64 << round.min(6);
                let ms = 1 + u64::from(rand_u32()) % cap;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!(
            "{key} kept changing concurrently for {PATCH_RETRY_FOR:?}; nothing was changed, retry"
        ),
    ))
}

/// How long an unconditional patch keeps re-applying itself while other
/// writers win the race.
pub const PATCH_RETRY_FOR: Duration = Duration::from_secs(10);

/// RFC 7396: objects merge member by member, `null` removes a member, and
/// anything else replaces the target.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

pub async fn delete(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = object_key(&kind, &name)?;
    let expect = if_match(&headers)?;
    let wait = wait_param(&params)?;
    let plan = plan_delete(&st, key, expect, params.force, &Overlay::new()).await?;
    commit_one(&st, &caller, &plan, expect, wait).await
}

/// One item of a batch (or of a validation).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    pub op: BatchOp,
    pub kind: String,
    pub name: String,
    /// The spec, for `put`.
    #[serde(default)]
    #[schemars(schema_with = "crate::openapi::any_spec")]
    pub spec: Option<Value>,
    /// The version the object must be at (`"12"` or `12`; `"*"`: must exist).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub if_match: Option<Value>,
    /// `delete`: even when still referenced.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BatchOp {
    Put,
    Delete,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub items: Vec<BatchItem>,
}

/// Plans every item in order, each seeing the earlier ones. Every
/// problem is collected, with its item's index in the field path.
async fn plan_batch(st: &AdminState, body: &[u8]) -> Result<Vec<Plan>, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let batch: Batch = serde_path_to_error::deserialize(de).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_batch",
            format!("{}: {}", e.path(), e.inner()),
        )
        .field(e.path().to_string())
    })?;
    let most = st.limits.max_batch_items;
    if batch.items.is_empty() || batch.items.len() > most {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_batch",
            format!(
                "a batch holds 1 to {most} items, this one {} (max_batch_items)",
                batch.items.len()
            ),
        )
        .field("items"));
    }
    let mut overlay = Overlay::new();
    let mut plans = Vec::new();
    let mut problems: Vec<FieldError> = Vec::new();
    let mut first: Option<ApiError> = None;
    for (i, item) in batch.items.into_iter().enumerate() {
        let base = format!("items[{i}]");
        let planned = async {
            let key = object_key(&item.kind, &item.name)?;
            if overlay.contains_key(&key) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_batch",
                    format!("{key} appears twice in the batch"),
                ));
            }
            let expect = item
                .if_match
                .as_ref()
                .map(|v| parse_if_match(&v.to_string().replace('"', "")))
                .transpose()?;
            match item.op {
                BatchOp::Put => {
                    let spec = item.spec.as_ref().ok_or_else(|| {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_batch", "put needs a spec")
                            .field("spec")
                    })?;
                    let spec = serde_json::to_vec(spec).expect("json encodes");
                    plan_put(st, key, &spec, expect, &overlay).await
                }
                BatchOp::Delete => plan_delete(st, key, expect, item.force, &overlay).await,
            }
        }
        .await;
        match planned {
            Ok(plan) => {
                overlay.insert(plan.key.clone(), plan.after.clone());
                plans.push(plan);
            }
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => return Err(e),
            Err(e) => {
                let inner = if e.errors.is_empty() {
                    vec![FieldError {
                        field: e.field.clone().unwrap_or_default(),
                        message: e.message.clone(),
                    }]
                } else {
                    e.errors.clone()
                };
                for fe in inner {
                    let field = if fe.field.is_empty() {
                        base.clone()
                    } else {
                        format!("{base}.{}", fe.field)
                    };
                    problems.push(FieldError {
                        field,
                        message: fe.message,
                    });
                }
                first.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first {
        // The status of the first problem (412, 409, 404 or 400), every
        // problem listed.
        let msg = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ApiError {
            status: e.status,
            error: e.error,
            message: format!("batch refused, nothing changed: {msg}"),
            field: problems.first().map(|p| p.field.clone()),
            errors: problems,
            referrers: e.referrers,
        });
    }
    Ok(plans)
}

fn batch_results(plans: &[Plan], revision: Option<i64>) -> Vec<Value> {
    plans
        .iter()
        .map(|p| {
            json!({
                "kind": p.key.kind.as_str(),
                "name": p.key.name,
                "result": p.result(),
                "version": revision,
            })
        })
        .collect()
}

/// `POST /api/v1/batch`: every item in one store transaction, all or
/// nothing.
pub async fn batch(
    State(st): State<AdminState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(params): Query<WriteParams>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let wait = wait_param(&params)?;
    let plans = plan_batch(&st, &body).await?;
    match commit(&st, &caller, &plans).await? {
        Some(revision) => {
            let mut body = json!({
                "revision": revision,
                "items": batch_results(&plans, Some(revision)),
            });
            if let Some(wait) = wait {
                body["propagation"] = propagation(&st, revision, wait).await;
            }
            Ok(Json(body).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "an object of the batch, or one it depends on, changed concurrently; nothing was changed, retry",
        )),
    }
}

/// `POST /api/v1/validate`: a batch checked as it would be applied now
/// (validity, references, versions), without writing anything.
pub async fn validate(
    State(st): State<AdminState>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let plans = plan_batch(&st, &body).await?;
    Ok(Json(
        json!({ "valid": true, "items": batch_results(&plans, None) }),
    ))
}

/// `GET /api/v1/status`: the store's revision and every live process's
/// applied revision and freshness. A gateway is `in_sync` once it has
/// applied the newest config object's version (deletions leave no
/// version behind; `?wait` on a write tracks those exactly).
pub async fn status(
    State(st): State<AdminState>,
    Query(p): Query<NodeListParams>,
) -> Result<Json<Value>, ApiError> {
    let mut v = status_view(&st).await?;
    let all = match v["nodes"].take() {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    let count = |kind: Option<&str>, in_sync: Option<bool>| {
        all.iter()
            .filter(|n| kind.is_none_or(|k| n["kind"] == k))
            .filter(|n| in_sync.is_none_or(|s| n["in_sync"] == s))
            .count()
    };
    v["counts"] = json!({
        "nodes": all.len(),
        "gateways": count(Some("gateway"), None),
        "sidecars": count(Some("sidecar"), None),
        "in_sync": count(None, Some(true)),
        "not_in_sync": count(None, Some(false)),
    });
    let (page, next) = node_page(all, &p)?;
    v["nodes"] = Value::Array(page);
    v["next"] = json!(next);
    Ok(Json(v))
}

/// `GET /api/v1/nodes` and `/status` parameters: a page of the nodes,
/// in id order.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeListParams {
    /// Page size (1-1000, default 1000).
    limit: Option<usize>,
    /// Start after this node (`<kind>/<id>`: the `next` of the previous
    /// page).
    after: Option<String>,
    /// Only nodes of this kind: `gateway` or `sidecar`.
    kind: Option<String>,
}

/// The page of `nodes` (in the order of their keys, `<kind>/<id>`; each
/// has its `id` and `kind`) that `p` asks for, and the cursor to continue
/// after when more follow.
fn node_page(
    nodes: Vec<Value>,
    p: &NodeListParams,
) -> Result<(Vec<Value>, Option<String>), ApiError> {
    let limit = page_limit(p.limit, MAX_PAGE)?;
    if let Some(k) = p.kind.as_deref() {
        if !matches!(k, "gateway" | "sidecar") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "kind: give gateway or sidecar",
            )
            .field("kind"));
        }
    }
    // The cursor is `<kind>/<id>`: the order of the nodes' keys.
    let cursor = |n: &Value| {
        format!(
            "{}/{}",
            n["kind"].as_str().unwrap_or(""),
            n["id"].as_str().unwrap_or("")
        )
    };
    let mut rest = nodes
        .into_iter()
        .filter(|n| p.kind.as_deref().is_none_or(|k| n["kind"] == k))
        .filter(|n| p.after.as_deref().is_none_or(|a| cursor(n).as_str() > a));
    let page: Vec<Value> = rest.by_ref().take(limit).collect();
    let next = match rest.next() {
        Some(_) => page.last().map(cursor),
        None => None,
    };
    Ok((page, next))
}

/// `GET /api/v1/metrics`: the cluster as `/status` sees it, in the
/// Prometheus text format, for the dashboards and alerts in `deploy/`:
/// the config revision, and per live node its lag, whether it is in sync,
/// its policy state (sidecars) and its identity's expiry. One series per
/// node (a mesh of 10,000 sidecars is 10,000 series per metric).
pub async fn metrics(State(st): State<AdminState>) -> Result<Response, ApiError> {
    use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry};
    let v = status_view(&st).await?;
    let reg = Registry::new_custom(Some("meshgate".into()), None).expect("registry");
    let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("metric");
    let vec = |name: &str, help: &str, labels: &[&str]| {
        IntGaugeVec::new(Opts::new(name, help), labels).expect("metric")
    };
    let revision = gauge(
        "admin_config_revision",
        "Newest config object's revision in the store",
    );
    revision.set(v["config_revision"].as_i64().unwrap_or(0));
    let lag = vec(
        "node_lag_revisions",
        "Store revisions a live node is behind the newest config",
        &["node", "kind"],
    );
    let in_sync = vec(
        "node_in_sync",
        "1 when a live node has applied the newest config and refuses none of it",
        &["node", "kind"],
    );
    let expiry = vec(
        "node_identity_expiry_timestamp_seconds",
        "When a live node's mesh identity expires (Unix time)",
        &["node", "kind"],
    );
    let policy = vec(
        "node_policy_fresh",
        "1 when a sidecar's local policy is fresh",
        &["node"],
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let (id, kind) = (
            n["id"].as_str().unwrap_or(""),
            n["kind"].as_str().unwrap_or(""),
        );
        lag.with_label_values(&[id, kind])
            .set(n["lag_revisions"].as_i64().unwrap_or(0));
        in_sync
            .with_label_values(&[id, kind])
            .set(i64::from(n["in_sync"] == true));
        if let Some(ms) = n["identity"]["expires_at_ms"].as_i64() {
            expiry.with_label_values(&[id, kind]).set(ms / 1000);
        }
        if let Some(state) = n["policy"].as_str() {
            policy
                .with_label_values(&[id])
                .set(i64::from(state == "fresh"));
        }
    }
    for c in [
        Box::new(revision) as Box<dyn prometheus::core::Collector>,
        Box::new(lag),
        Box::new(in_sync),
        Box::new(expiry),
        Box::new(policy),
    ] {
        reg.register(c).expect("unique metric");
    }
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&reg.gather(), &mut buf)
        .expect("text encoding");
    Ok((
        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        buf,
    )
        .into_response())
}

/// `GET /api/v1/topology` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyParams {
    /// Seconds (1-600, default 60).
    window_s: Option<u64>,
}

/// `GET /api/v1/topology?window_s=N`: the service graph over the last N
/// seconds (default 60, at most 600), from the nodes' counters.
pub async fn topology(
    State(st): State<AdminState>,
    Query(p): Query<TopologyParams>,
) -> Result<Json<Value>, ApiError> {
    let keep = crate::topology::KEEP.as_secs();
    let window = p.window_s.unwrap_or(60);
    if !(1..=keep).contains(&window) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("window_s: must be from 1 to {keep}"),
        )
        .field("window_s"));
    }
    let Some(t) = &st.topology else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this admin does not poll the nodes",
        ));
    };
    let services = st.store.range(&Kind::Services.prefix()).await?;
    let declared: std::collections::BTreeMap<String, Vec<String>> = services
        .entries
        .iter()
        .filter_map(|e| {
            let s: meshgate_config::model::Service = serde_json::from_slice(&e.value).ok()?;
            let d = s.destinations.into_iter().map(|d| d.service).collect();
            Some((e.key.name.clone(), d))
        })
        .collect();
    Ok(Json(t.view(Duration::from_secs(window), &declared)))
}

/// What `/status` answers.
async fn status_view(st: &AdminState) -> Result<Value, ApiError> {
    let mut config_revision = 0;
    for kind in Kind::CONFIG {
        config_revision = config_revision.max(st.store.newest_revision(&kind.prefix()).await?);
    }
    let r = st.store.range(&Kind::Nodes.prefix()).await?;
    let now = meshgate_config::model::now_ms();
    let nodes: Vec<Value> = r
        .entries
        .iter()
        .filter_map(|e| {
            let n: Node = decode_json(&e.key, &e.value).ok()?;
            let id = e.key.node_id();
            // In sync: has applied the newest config (gateways; a sidecar
            // applies only its slice) and refuses none of it.
            let in_sync = (n.kind != NodeKind::Gateway || n.applied_revision >= config_revision)
                && n.rejected.is_empty();
            Some(json!({
                "id": id,
                "kind": n.kind.as_str(),
                "roles": n.roles,
                "groups": n.groups,
                "applied_revision": n.applied_revision,
                "lag_revisions": (config_revision - n.applied_revision).max(0),
                "in_sync": in_sync,
                "policy": n.policy,
                "rejected": n.rejected,
                "updated_ms_ago": now.saturating_sub(n.updated_at_ms),
                "identity": n.identity.as_ref().map(|i| json!({
                    "id": i.id,
                    "expires_at_ms": i.expires_at_ms,
                    "expires_in_s": (i.expires_at_ms as i64 - now as i64) / 1000,
                })),
            }))
        })
        .collect();
    let all_in_sync = nodes.iter().all(|n| n["in_sync"] == true);
    Ok(json!({
        "store": { "reachable": true, "revision": r.revision },
        "config_revision": config_revision,
        "in_sync": all_in_sync,
        "nodes": nodes,
    }))
}

/// Kinds whose objects may refer to an object of `kind`.
fn referring_kinds(kind: Kind) -> &'static [Kind] {
    match kind {
        Kind::Services => &[Kind::Routes, Kind::TcpRoutes, Kind::Services],
        Kind::Groups => &[Kind::Services],
        Kind::Consumers => &[Kind::Routes],
        _ => &[],
    }
}

/// `GET /api/v1/nodes`: a page of the live gateways and sidecars.
pub async fn nodes(
    State(st): State<AdminState>,
    Query(p): Query<NodeListParams>,
) -> Result<Json<Value>, ApiError> {
    let r = st.store.range(&Kind::Nodes.prefix()).await?;
    let items: Vec<Value> = r
        .entries
        .iter()
        .filter_map(|e| {
            let node: Node = decode_json(&e.key, &e.value).ok()?;
            let mut v = serde_json::to_value(node).ok()?;
            let id = e.key.node_id();
            v["id"] = Value::String(id.to_string());
            Some(v)
        })
        .collect();
    let (items, next) = node_page(items, &p)?;
    Ok(Json(
        json!({ "items": items, "revision": r.revision, "next": next }),
    ))
}

/// The object's spec from a request body: either the spec itself, or the
/// envelope that GET returns (`{"kind", "name", "version", "spec"}`, and a
/// certificate's `info`, which is ignored).
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
            .find(|k| !["kind", "name", "version", "spec", "info"].contains(&k.as_str()))
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

/// `POST /api/v1/explain`: which route a request would match, which
/// backends and policies apply, and why the other routes did not. It is
/// answered by a gateway's own router over the config it has applied (the
/// live gateway serving the scope with the newest applied revision), so
/// the answer is what the data plane does, not a re-implementation.
pub async fn explain(
    State(st): State<AdminState>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let req: ExplainRequest = decode_body(&body)?;
    if let Some(f) = &st.explainer {
        return f(req).await.map(Json);
    }
    let r = st.store.range(&node_prefix(NodeKind::Gateway)).await?;
    let wanted = match req.scope {
        Scope::Ingress => &[Role::Ingress][..],
        Scope::Mesh => &[Role::Egress, Role::Central][..],
    };
    let gateway = r
        .entries
        .iter()
        .filter_map(|e| {
            let n: Node = decode_json(&e.key, &e.value).ok()?;
            let ops = n.admin_address.clone()?;
            n.roles.iter().any(|r| wanted.contains(r)).then(|| {
                let id = e.key.node_id();
                (n.applied_revision, id.to_string(), ops)
            })
        })
        .max();
    let Some((_, id, ops)) = gateway else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_gateway",
            "no live gateway serves this scope: explain runs on a gateway's router",
        ));
    };
    let body = serde_json::to_vec(&req).expect("json encodes");
    let (status, answer) = crate::client::post_json(&format!("http://{ops}/explain"), body)
        .await
        .map_err(|e| {
            tracing::warn!(gateway = %id, error = %e, "explain: gateway unreachable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_gateway",
                format!("gateway {id} did not answer the explain request"),
            )
        })?;
    let mut v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    if status != StatusCode::OK {
        let msg = v["message"]
            .as_str()
            .unwrap_or("explain failed")
            .to_string();
        let mut e = ApiError::new(status, "invalid_request", msg);
        if let Some(f) = v["field"].as_str() {
            e = e.field(f);
        }
        return Err(e);
    }
    v["gateway"] = Value::String(id);
    Ok(Json(v))
}

/// `POST /api/v1/cache/purge` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// The route whose cache to purge.
    pub route: String,
    /// One key: `host` + target (`shop.example.com/items?page=2`), or a
    /// target for every host (`/items?page=2`); absent: every answer.
    #[serde(default)]
    pub key: Option<String>,
}

/// `POST /api/v1/cache/purge`: drops a route's cached answers on every
/// live gateway (in process on a standalone one). Answers how many keys
/// each dropped; a gateway that did not answer is named with its error.
pub async fn cache_purge(
    State(st): State<AdminState>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let req: PurgeRequest = decode_body(&body)?;
    let key = Key::new(Kind::Routes, &req.route);
    if !meshgate_config::key::valid_name(&req.route) || st.store.get(&key).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{key} does not exist"),
        )
        .field("route"));
    }
    if let Some(f) = &st.purger {
        let n = f(&req.route, req.key.as_deref())
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "no_cache", e).field("route"))?;
        return Ok(Json(json!({"gateways": {"standalone": {"purged": n}}})));
    }
    let r = st.store.range(&node_prefix(NodeKind::Gateway)).await?;
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("route", &req.route);
        if let Some(k) = &req.key {
            q.append_pair("key", k);
        }
        q.finish()
    };
    let mut out = serde_json::Map::new();
    for e in &r.entries {
        let Ok(n) = decode_json::<Node>(&e.key, &e.value) else {
            continue;
        };
        let Some(ops) = n.admin_address else { continue };
        let url = format!("http://{ops}/cache/purge?{query}");
        let answer = match crate::client::post_json(&url, Vec::new()).await {
            Ok((status, body)) => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                match status {
                    StatusCode::OK => v,
                    _ => json!({"error": v["message"].as_str().unwrap_or("refused")}),
                }
            }
            Err(e) => json!({"error": e.to_string()}),
        };
        out.insert(e.key.node_id().to_string(), answer);
    }
    Ok(Json(json!({"gateways": out})))
}

/// Decodes a JSON request body; a problem names its field.
pub(crate) fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {}", e.inner()),
        )
        .field(field)
    })
}
