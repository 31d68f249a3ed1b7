//! `explain`: which route a request would match on this gateway's applied
//! config (with the same router the data plane runs), which backends and
//! policies would apply, and why every other route of the scope did not
//! match. Served on the ops port (`POST /explain`) and used by the admin
//! API's `POST /api/v1/explain`.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use meshgate_config::model::{ExplainRequest, Scope};
use serde_json::{json, Value};

use crate::routing::RequestView;
use crate::snapshot::Snapshot;

/// A field of the request that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadField {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> BadField {
    BadField {
        field: field.into(),
        message: message.into(),
    }
}

fn scope_str(s: Scope) -> &'static str {
    match s {
        Scope::Mesh => "mesh",
        Scope::Ingress => "ingress",
    }
}

/// Explains `req` against `snap`.
pub fn explain(snap: &Snapshot, req: &ExplainRequest) -> Result<Value, BadField> {
    let method = Method::from_bytes(req.method.as_bytes())
        .map_err(|_| bad("method", format!("{:?} is not an HTTP method", req.method)))?;
    if !req.path.starts_with('/') {
        return Err(bad("path", "must start with '/'"));
    }
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| bad(format!("headers.{k}"), "not a valid header name"))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| bad(format!("headers.{k}"), "not a valid header value"))?;
        headers.append(name, value);
    }
    if !headers.contains_key(http::header::HOST) {
        let host = HeaderValue::from_str(&req.host).map_err(|_| bad("host", "not a valid host"))?;
        headers.insert(http::header::HOST, host);
    }
    let (router, host) = match req.scope {
        Scope::Mesh => (
            &snap.mesh,
            crate::http::headers::destination(&headers, None),
        ),
        Scope::Ingress => (
            &snap.ingress,
            crate::http::headers::request_host(&headers, None),
        ),
    };
    let host = host.unwrap_or_default();
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path.as_str(), None),
    };
    let view = RequestView {
        method: &method,
        path,
        query,
        headers: &headers,
    };
    let winner = router.find(&host, &view).cloned();
    let mut routes: Vec<_> = snap
        .routes
        .values()
        .filter(|r| r.scope == req.scope)
        .collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    let candidates: Vec<Value> = routes
        .iter()
        .map(|r| {
            let reasons = r.mismatches(&host, &view);
            let verdict = match &winner {
                Some(w) if Arc::ptr_eq(w, r) => "matched",
                _ if reasons.is_empty() => "matches, but a better route wins",
                _ => "no match",
            };
            json!({"route": &*r.name, "version": r.version, "priority": r.rank(),
                   "verdict": verdict, "reasons": reasons})
        })
        .collect();
    let backends = |list: Vec<(Arc<str>, u32)>| -> Vec<Value> {
        let total: u32 = list.iter().map(|(_, w)| *w).sum();
        list.into_iter()
            .map(|(name, w)| {
                let svc = snap.services.get(&*name);
                json!({
                    "service": &*name,
                    "weight": w,
                    "share_percent": if total > 0 { f64::from(w) * 100.0 / f64::from(total) } else { 0.0 },
                    "configured": svc.is_some(),
                    "endpoints": svc.map(|s| s.balancer.endpoints().map(|e| json!({
                        "address": e.address,
                        "available": !e.is_ejected(),
                    })).collect::<Vec<_>>()),
                    "policies": svc.map(|s| &s.spec),
                })
            })
            .collect()
    };
    let result = match &winner {
        Some(r) if r.direct.is_some() => json!({
            "route": &*r.name,
            "version": r.version,
            "direct_response": r.direct.as_ref().map(|d| d.0.as_u16()),
        }),
        Some(r) => {
            let (rule, list) = r.backend_choice(&view);
            json!({
                "route": &*r.name,
                "version": r.version,
                "backend_rule": rule,
                "timeouts": r.timeouts,
                "backends": backends(list),
            })
        }
        None if req.scope == Scope::Mesh && snap.services.contains_key(&*host) => json!({
            "route": null,
            "implicit": true,
            "why": format!("no mesh route matches; the request names service {host:?}, which gets its implicit route"),
            "backends": backends(vec![(Arc::from(&*host), 1)]),
        }),
        None => json!({
            "route": null,
            "why": format!("no {} route matches: the answer is 404 no_route", scope_str(req.scope)),
        }),
    };
    Ok(json!({
        "scope": scope_str(req.scope),
        "host": host,
        "method": method.as_str(),
        "path": path,
        "revision": snap.revision,
        "result": result,
        "candidates": candidates,
    }))
}
