//! The ops port of gateways and sidecars: `/healthz` (the process is up),
//! `/readyz` (config is loaded and the process is not draining), `/metrics`
//! (Prometheus), `/calls` (the calls counted by caller and destination,
//! as JSON, for the admin's topology), `/config` (what the process has applied),
//! `/config/revision` (the applied store revision; with `?at_least=N` it
//! waits up to `wait_ms` for that revision to be applied, which is how
//! benchmarks and operators time propagation without polling) and
//! `POST /explain` (gateways). Anything else goes to the process's extra
//! routes when it has some (a standalone gateway's admin API, mounted by
//! the gateway binary), else 404.
//!
//! **Who may read config.** `/config`, `POST /explain` and the list of
//! refused objects in `/readyz` reveal the config. Without a token file
//! they answer loopback clients only (403 for others, as Envoy's admin
//! port is meant to be reached); with one (`ops_token_file`, or a
//! standalone gateway's admin tokens) every caller needs a viewer or admin
//! `Bearer` token (401 without one). `/healthz`, `/readyz` (with a count
//! of refusals instead of the list), `/metrics`, `/calls` and
//! `/config/revision` stay open to probes and scrapers: they carry no
//! config. `POST /cache/purge` (a route's cached answers dropped) follows
//! the same rule, but with tokens it needs an admin's.
//!
//! Served by the engine's own listener ([`crate::server`]), so the library
//! (and the sidecar) needs no web framework.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use meshgate_config::model::ExplainRequest;
use meshgate_config::sync::SyncStatus;
use meshgate_config::tokens::{Role, Tokens};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::http::body::{full, ProxyBody, RequestBody};
use crate::metrics::Metrics;
use crate::node::explain::BadField;
use crate::server::Peer;

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
    /// `POST /cache/purge` (gateways): drops a route's cached answers.
    pub purge: Option<PurgeFn>,
    /// Routes served after the ops endpoints (the embedded admin API).
    pub extra: Option<OpsExtra>,
    /// Who may read config here (see the module docs); empty: loopback
    /// clients only.
    pub tokens: Arc<Tokens>,
}

/// Explains a request against the applied config.
pub(crate) type ExplainFn = Arc<dyn Fn(&ExplainRequest) -> Result<Value, BadField> + Send + Sync>;

/// Drops a route's cached answers (all, or one key's): how many keys.
pub type PurgeFn = Arc<dyn Fn(&str, Option<&str>) -> Result<u64, String> + Send + Sync>;

/// A future answer of the extra routes.
pub(crate) type OpsFuture = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// Routes served on the ops port after the ops endpoints.
pub type OpsExtra = Arc<dyn Fn(Request<RequestBody>) -> OpsFuture + Send + Sync>;

/// Largest `POST /explain` body read (the admin API's limit).
const MAX_BODY: usize = 2 * 1024 * 1024;
/// Longest wait a `/config/revision` call may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Answers one ops request.
pub async fn handle(st: &OpsState, peer: &Peer, req: Request<RequestBody>) -> Response<ProxyBody> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let reveals_config = matches!(req.uri().path(), "/config" | "/explain" | "/cache/purge");
    if reveals_config {
        if let Some(refused) = config_read_refused(st, peer, &req) {
            return refused;
        }
    }
    // A purge changes what the gateway serves: with tokens, an admin's.
    if req.uri().path() == "/cache/purge" && !st.tokens.is_empty() {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if st.tokens.check(authorization).map(|c| c.role) != Some(Role::Admin) {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "purging a cache needs an admin token",
            );
        }
    }
    match (req.uri().path(), get) {
        ("/healthz", true) => {
            let mut r = text(StatusCode::OK, "ok\n");
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        ("/readyz", true) => {
            let (ready, mut details) = (st.readiness)();
            // The refusals name config objects: their count for anyone,
            // the list for those who may read config.
            let refused = details["rejected"].as_array().map_or(0, Vec::len);
            details["rejected_count"] = refused.into();
            if config_read_refused(st, peer, &req).is_some() {
                if let Some(d) = details.as_object_mut() {
                    d.remove("rejected");
                }
            }
            let status = match ready {
                true => StatusCode::OK,
                false => StatusCode::SERVICE_UNAVAILABLE,
            };
            json_response(status, &details)
        }
        ("/metrics", true) => {
            let mut r = text(StatusCode::OK, st.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ("/config", true) => json_response(StatusCode::OK, &(st.config_dump)()),
        // The same numbers as /metrics (anyone may read them), as JSON.
        ("/calls", true) => json_response(StatusCode::OK, &st.metrics.calls_json()),
        ("/config/revision", true) => revision(st, req.uri().query().unwrap_or("")).await,
        ("/explain", false) if req.method() == Method::POST => explain(st, req).await,
        ("/cache/purge", false) if req.method() == Method::POST => purge(st, &req),
        (
            "/healthz" | "/readyz" | "/metrics" | "/calls" | "/config" | "/config/revision"
            | "/explain" | "/cache/purge",
            _,
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this ops endpoint does not take that method",
        ),
        _ => match &st.extra {
            Some(extra) => extra(req).await,
            None => error(StatusCode::NOT_FOUND, "not_found", "no such ops endpoint"),
        },
    }
}

/// The ops port's access rule for what reveals config (see the module
/// docs): the answer to send instead when this caller may not read it.
fn config_read_refused(
    st: &OpsState,
    peer: &Peer,
    req: &Request<RequestBody>,
) -> Option<Response<ProxyBody>> {
    if st.tokens.is_empty() {
        if peer.addr.ip().to_canonical().is_loopback() {
            return None;
        }
        return Some(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this ops endpoint reveals the config: it answers loopback clients only, unless ops_token_file is set (then any client with a viewer token)",
        ));
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match st.tokens.check(authorization) {
        Some(_) => None,
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this ops endpoint reveals the config: it needs a viewer or admin bearer token",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(r)
        }
    }
}

/// `POST /cache/purge?route=<name>[&key=<host/target or target>]`:
/// `{"purged": <keys>}`.
fn purge(st: &OpsState, req: &Request<RequestBody>) -> Response<ProxyBody> {
    let Some(f) = &st.purge else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this process caches nothing",
        );
    };
    let (mut route, mut key) = (None, None);
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "route" => route = Some(v.into_owned()),
            "key" => key = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(route) = route else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "route: give the route whose cache to purge",
        );
    };
    match f(&route, key.as_deref()) {
        Ok(n) => json_response(StatusCode::OK, &json!({"purged": n})),
        Err(e) => error(StatusCode::NOT_FOUND, "not_found", &e),
    }
}

async fn explain(st: &OpsState, req: Request<RequestBody>) -> Response<ProxyBody> {
    let Some(f) = &st.explain else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this process does not route",
        );
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!("the body is larger than {MAX_BODY} bytes");
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &msg);
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_body", &e.to_string()),
    };
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let invalid = |field: String, message: String| {
        let body = json!({"error": "invalid_request", "message": format!("{field}: {message}"), "field": field});
        json_response(StatusCode::BAD_REQUEST, &body)
    };
    let req: ExplainRequest = match serde_path_to_error::deserialize(de) {
        Ok(r) => r,
        Err(e) => return invalid(e.path().to_string(), e.inner().to_string()),
    };
    match f(&req) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(b) => invalid(b.field, b.message),
    }
}

/// `{"revision": N}`; with `at_least`, 200 once the applied revision
/// reaches it, or 408 with the current revision when `wait_ms` runs out.
async fn revision(st: &OpsState, query: &str) -> Response<ProxyBody> {
    let mut at_least = None;
    let mut wait_ms = 0u64;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let bad = |what: &str| {
            let msg = format!("{k}: {what}");
            error(StatusCode::BAD_REQUEST, "invalid_query", &msg)
        };
        match &*k {
            "at_least" => match v.parse::<i64>() {
                Ok(n) => at_least = Some(n),
                Err(_) => return bad("not a revision number"),
            },
            "wait_ms" => match v.parse::<u64>() {
                Ok(n) => wait_ms = n,
                Err(_) => return bad("not a number of milliseconds"),
            },
            _ => {}
        }
    }
    let mut rx = st.status.clone();
    let Some(want) = at_least else {
        let rev = rx.borrow().revision;
        return json_response(StatusCode::OK, &json!({ "revision": rev }));
    };
    let wait = Duration::from_millis(wait_ms).min(MAX_WAIT);
    let reached = tokio::time::timeout(wait, rx.wait_for(|s| s.revision >= want))
        .await
        .is_ok_and(|r| r.is_ok());
    let rev = rx.borrow().revision;
    match reached {
        true => json_response(StatusCode::OK, &json!({ "revision": rev })),
        false => json_response(
            StatusCode::REQUEST_TIMEOUT,
            &json!({
                "error": "not_yet_applied",
                "message": format!("revision {want} not applied within {} ms", wait.as_millis()),
                "revision": rev,
            }),
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(full(Full::new(body.into())));
    *r.status_mut() = status;
    r
}

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<ProxyBody> {
    let mut r = text(status, v.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    json_response(status, &json!({"error": code, "message": message}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (OpsState, watch::Sender<SyncStatus>) {
        let (tx, rx) = watch::channel(SyncStatus {
            source: meshgate_config::sync::Source::None,
            connected: false,
            revision: 0,
            last_sync_ms: 0,
            last_error: None,
            source_errors: Vec::new(),
            store_reset: None,
        });
        let st = OpsState {
            metrics: Arc::new(Metrics::new("test")),
            readiness: Arc::new(|| (false, json!({"ready": false}))),
            config_dump: Arc::new(|| json!({"x": 1})),
            status: rx,
            explain: None,
            purge: None,
            extra: None,
            tokens: Arc::new(Tokens::default()),
        };
        (st, tx)
    }

    fn local() -> Peer {
        Peer::new("127.0.0.1:40000".parse().unwrap())
    }

    fn get(path: &str) -> Request<RequestBody> {
        let mut r = Request::new(RequestBody::empty());
        *r.uri_mut() = path.parse().unwrap();
        r
    }

    async fn body(r: Response<ProxyBody>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_answer_and_revision_waits() {
        let (st, tx) = state();
        assert_eq!(
            body(handle(&st, &local(), get("/healthz")).await).await,
            "ok\n"
        );
        assert_eq!(handle(&st, &local(), get("/readyz")).await.status(), 503);
        assert_eq!(handle(&st, &local(), get("/nope")).await.status(), 404);
        let mut post = get("/readyz");
        *post.method_mut() = Method::POST;
        assert_eq!(handle(&st, &local(), post).await.status(), 405);
        assert_eq!(handle(&st, &local(), get("/explain")).await.status(), 405);
        let r = handle(&st, &local(), get("/config/revision?at_least=x")).await;
        assert_eq!(r.status(), 400);
        // Not applied within the wait: 408 with the current revision.
        let r = handle(
            &st,
            &local(),
            get("/config/revision?at_least=5&wait_ms=100"),
        )
        .await;
        assert_eq!(r.status(), 408);
        // Applied while waiting: 200.
        let peer = local();
        let waiting = handle(&st, &peer, get("/config/revision?at_least=5&wait_ms=1000"));
        let apply = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send_modify(|s| s.revision = 7);
        };
        let (r, ()) = tokio::join!(waiting, apply);
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, r#"{"revision":7}"#);
    }

    /// `/config`, `/explain` and the refusals in `/readyz` reveal config:
    /// loopback clients only without tokens, a viewer token with them. The
    /// probes and the scrape stay open.
    #[tokio::test]
    async fn config_is_read_by_loopback_or_a_token_only() {
        let (mut st, _tx) = state();
        st.readiness = Arc::new(|| {
            let rejected = json!([{"object": "services/x", "version": 3, "error": "bad"}]);
            (true, json!({"ready": true, "rejected": rejected}))
        });
        let remote = Peer::new("192.0.2.7:40000".parse().unwrap());
        let mapped = Peer::new("[::ffff:127.0.0.1]:40000".parse().unwrap());
        let with = |path: &str, auth: &str| {
            let mut r = get(path);
            r.headers_mut()
                .insert(header::AUTHORIZATION, auth.parse().unwrap());
            r
        };
        let readyz = |r: Response<ProxyBody>| async {
            serde_json::from_str::<Value>(&body(r).await).unwrap()
        };

        // No tokens: loopback (also IPv4-mapped) reads, others get 403.
        assert_eq!(handle(&st, &local(), get("/config")).await.status(), 200);
        assert_eq!(handle(&st, &mapped, get("/config")).await.status(), 200);
        assert_eq!(handle(&st, &remote, get("/config")).await.status(), 403);
        let mut explain = get("/explain");
        *explain.method_mut() = Method::POST;
        assert_eq!(handle(&st, &remote, explain).await.status(), 403);
        let v = readyz(handle(&st, &remote, get("/readyz")).await).await;
        assert_eq!(
            (v.get("rejected"), &v["rejected_count"]),
            (None, &json!(1)),
            "{v}"
        );
        let v = readyz(handle(&st, &local(), get("/readyz")).await).await;
        assert_eq!(v["rejected"][0]["object"], "services/x", "{v}");
        for open in ["/healthz", "/metrics", "/config/revision"] {
            assert_eq!(
                handle(&st, &remote, get(open)).await.status(),
                200,
                "{open}"
            );
        }

        // Tokens: every caller needs one, loopback too; a viewer's will do.
        let mut tokens = Tokens::default();
        tokens.add(
            "dash".into(),
            "viewer-token-0123456789",
            meshgate_config::tokens::Role::Viewer,
        );
        st.tokens = Arc::new(tokens);
        let r = handle(&st, &local(), get("/config")).await;
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let r = handle(
            &st,
            &remote,
            with("/config", "Bearer wrong-token-0123456789"),
        )
        .await;
        assert_eq!(r.status(), 401);
        let r = handle(
            &st,
            &remote,
            with("/config", "bearer viewer-token-0123456789"),
        )
        .await;
        assert_eq!(r.status(), 200);
        let v = readyz(handle(&st, &local(), get("/readyz")).await).await;
        assert_eq!(v.get("rejected"), None, "{v}");
        let r = handle(
            &st,
            &remote,
            with("/readyz", "Bearer viewer-token-0123456789"),
        )
        .await;
        assert_eq!(readyz(r).await["rejected_count"], 1);
        assert_eq!(handle(&st, &remote, get("/metrics")).await.status(), 200);
        // A purge changes what is served: a viewer's token is not enough.
        let mut purge = with("/cache/purge?route=r", "Bearer viewer-token-0123456789");
        *purge.method_mut() = Method::POST;
        assert_eq!(handle(&st, &local(), purge).await.status(), 403);
    }
}
