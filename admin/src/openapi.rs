//! The OpenAPI 3 document of `/api/v1`, served at `/api/v1/openapi.json`.
//!
//! Every request and object schema is generated from the Rust types the
//! server decodes (`schemars` over the config model and the batch,
//! rollback and explain bodies), so the document cannot drift from what
//! the server accepts; the paths are listed once in [`paths`], and a test
//! probes the router for every path and method of the document, and for
//! the methods it does not list.

use schemars::gen::SchemaSettings;
use serde_json::{json, Map, Value};

use meshgate_config::model::{Cert, Consumer, ExplainRequest, Group, Route, Service, TcpRoute};

use crate::api::{Batch, RollbackRequest};

/// The config kinds and the schema of their specs.
const KINDS: [(&str, &str); 6] = [
    ("certs", "Cert"),
    ("groups", "Group"),
    ("consumers", "Consumer"),
    ("services", "Service"),
    ("routes", "Route"),
    ("tcp_routes", "TcpRoute"),
];

/// The whole document.
pub fn document() -> Value {
    let mut gen = SchemaSettings::openapi3().into_generator();
    // Each top-level type lands in the definitions, with what it uses.
    gen.subschema_for::<Cert>();
    gen.subschema_for::<Service>();
    gen.subschema_for::<Route>();
    gen.subschema_for::<TcpRoute>();
    gen.subschema_for::<Group>();
    gen.subschema_for::<Consumer>();
    gen.subschema_for::<Batch>();
    gen.subschema_for::<RollbackRequest>();
    gen.subschema_for::<ExplainRequest>();
    gen.subschema_for::<crate::api::PurgeRequest>();
    gen.subschema_for::<crate::issuer::NewToken>();
    gen.subschema_for::<crate::issuer::SignRequest>();
    let mut schemas: Map<String, Value> = gen
        .take_definitions()
        .into_iter()
        .map(|(name, schema)| (name, serde_json::to_value(schema).unwrap_or_default()))
        .collect();
    schemas.insert("Error".into(), error_schema());
    schemas.insert("Propagation".into(), propagation_schema());
    for (kind, spec) in KINDS {
        schemas.insert(envelope_name(spec), envelope(kind, spec));
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Meshgate admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Config objects with versions (etcd mod_revision) and ETags, \
                atomic batches, dry runs, propagation status and a change log. \
                Errors share one JSON shape.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": paths(),
    })
}

/// The schema of a batch item's spec: any config kind's.
pub fn any_spec(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
    let mut s = schemars::schema::SchemaObject::default();
    s.subschemas().any_of = Some(vec![
        gen.subschema_for::<Service>(),
        gen.subschema_for::<Route>(),
        gen.subschema_for::<TcpRoute>(),
        gen.subschema_for::<Group>(),
    ]);
    s.into()
}

fn envelope_name(spec: &str) -> String {
    format!("{spec}Object")
}

/// `{"kind", "name", "version", "spec"}` as GET returns it.
fn envelope(kind: &str, spec: &str) -> Value {
    json!({
        "type": "object",
        "required": ["kind", "name", "version", "spec"],
        "properties": {
            "kind": {"type": "string", "enum": [kind]},
            "name": {"type": "string"},
            "version": {"type": "integer", "format": "int64"},
            "spec": {"$ref": format!("#/components/schemas/{spec}")},
            "propagation": {"$ref": "#/components/schemas/Propagation"},
            "invalid": {
                "description": "present when the stored object does not pass validation (written into the store directly): its problems; every process refuses it and keeps the previous version",
                "type": "array",
                "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}},
            },
            "raw": {"type": "string", "description": "the stored value as text, when it is not JSON (then spec is null)"},
        },
    })
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string"},
            "message": {"type": "string"},
            "field": {"type": "string"},
            "errors": {"type": "array", "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            }},
            "referrers": {"type": "array", "items": {"type": "string"}},
        },
    })
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_body(schema: Value) -> Value {
    json!({"content": {"application/json": {"schema": schema}}})
}

/// An operation: its success answers, and the error shape for the rest.
fn op(summary: &str, params: Vec<Value>, body: Option<Value>, ok: &[(u16, Value)]) -> Value {
    let mut responses = Map::new();
    for (status, schema) in ok {
        let mut r = json_body(schema.clone());
        r["description"] = json!("success");
        responses.insert(status.to_string(), r);
    }
    let mut err = json_body(reference("Error"));
    err["description"] = json!("an error: 400 invalid input (every problem with its field path), 401/403 auth, 404, 409 conflict or in use, 412 stale If-Match, 413 body over 2 MiB, 503 store unreachable");
    responses.insert("default".into(), err);
    let mut o = json!({"summary": summary, "parameters": params, "responses": responses});
    if let Some(b) = body {
        let mut rb = json_body(b);
        rb["required"] = json!(true);
        o["requestBody"] = rb;
    }
    o
}

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {
        "type": "string", "minLength": 1, "maxLength": 128,
        "pattern": "^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$",
    }, "description": "1-128 characters of a-z 0-9 - _ ., starting and ending with a letter or digit"})
}

fn if_match() -> Value {
    json!({"name": "If-Match", "in": "header", "required": false, "schema": {"type": "string"},
           "description": "the version the object must be at (\"12\"), or * (must exist)"})
}

fn wait() -> Value {
    query(
        "wait",
        json!({"type": "string"}),
        "answer once every live gateway has applied the write, at most this long (500ms, 5s, 1m)",
    )
}

fn any_object() -> Value {
    json!({"type": "object"})
}

/// Every path and method of `/api/v1`.
pub fn paths() -> Value {
    let mut p = Map::new();
    for (kind, spec) in KINDS {
        let obj = reference(&envelope_name(spec));
        let list = json!({
            "type": "object",
            "required": ["items", "revision"],
            "properties": {
                "items": {"type": "array", "items": obj},
                "revision": {"type": "integer", "format": "int64"},
                "next": {"type": "string", "nullable": true},
            },
        });
        p.insert(
            format!("/api/v1/{kind}"),
            json!({"get": op(
                &format!("list {kind}, in name order, a page at a time"),
                vec![
                    query("limit", json!({"type": "integer", "minimum": 1, "maximum": 1000}), "page size (default 500)"),
                    query("after", json!({"type": "string"}), "start after this name (the previous page's next)"),
                    query("selector", json!({"type": "string"}), "labels k=v,k2=v2 that must all match"),
                ],
                None,
                &[(200, list)],
            )}),
        );
        let name = path_param("name");
        let deleted = json!({"type": "object", "required": ["deleted", "revision"], "properties": {
            "deleted": {"type": "string"}, "revision": {"type": "integer", "format": "int64"},
            "propagation": reference("Propagation")}});
        p.insert(
            format!("/api/v1/{kind}/{{name}}"),
            json!({
                "get": op(&format!("one of the {kind}, with its ETag"), vec![name.clone()], None, &[(200, obj.clone())]),
                "put": op(
                    "create (201) or replace (200)",
                    vec![name.clone(), if_match(), wait()],
                    Some(reference(spec)),
                    &[(200, obj.clone()), (201, obj.clone())],
                ),
                "patch": op(
                    "JSON merge patch (RFC 7396) of the spec: any of its fields; null removes one",
                    vec![name.clone(), if_match(), wait()],
                    Some(reference(spec)),
                    &[(200, obj.clone())],
                ),
                "delete": op(
                    "delete; 409 while referenced unless force",
                    vec![name, if_match(), wait(), query("force", json!({"type": "boolean"}), "delete even when referenced")],
                    None,
                    &[(200, deleted)],
                ),
            }),
        );
    }
    let revision = json!({"type": "integer", "format": "int64"});
    let items = json!({"type": "array", "items": any_object()});
    p.insert(
        "/api/v1/batch".into(),
        json!({"post": op(
            "apply puts and deletes in one transaction, all or nothing",
            vec![wait()],
            Some(reference("Batch")),
            &[(200, json!({"type": "object", "required": ["revision", "items"], "properties": {
                "revision": revision, "items": items, "propagation": reference("Propagation")}}))],
        )}),
    );
    p.insert(
        "/api/v1/validate".into(),
        json!({"post": op(
            "check a batch as it would apply now, writing nothing",
            vec![],
            Some(reference("Batch")),
            &[(200, json!({"type": "object", "required": ["valid", "items"], "properties": {
                "valid": {"type": "boolean"}, "items": items}}))],
        )}),
    );
    p.insert("/api/v1/explain".into(), json!({"post": op(
        "which route a request would match on a live gateway, its backends, and why other routes did not",
        vec![],
        Some(reference("ExplainRequest")),
        &[(200, json!({"type": "object", "required": ["result", "candidates"], "properties": {
            "result": any_object(), "candidates": items}}))],
    )}));
    p.insert(
        "/api/v1/cache/purge".into(),
        json!({"post": op(
            "drop a route's cached answers (all, or one key's) on every live gateway",
            vec![],
            Some(reference("PurgeRequest")),
            &[(200, json!({"type": "object", "required": ["gateways"], "properties": {
                "gateways": any_object()}}))],
        )}),
    );
    let node_params = || {
        vec![
            query(
                "limit",
                json!({"type": "integer", "minimum": 1, "maximum": 1000}),
                "page size (default 1000)",
            ),
            query(
                "after",
                json!({"type": "string"}),
                "start after this node, <kind>/<id> (the previous page's next)",
            ),
            query(
                "kind",
                json!({"type": "string", "enum": ["gateway", "sidecar"]}),
                "only nodes of this kind",
            ),
        ]
    };
    let next = json!({"type": ["string", "null"], "description": "what to give as after for the next page; null on the last"});
    p.insert("/api/v1/status".into(), json!({"get": op(
        "every live node's applied revision, lag, freshness and refused objects (a node that refuses an object is not in sync), a page at a time; counts and in_sync cover every node",
        node_params(),
        None,
        &[(200, json!({"type": "object", "required": ["config_revision", "nodes", "in_sync", "counts", "next"], "properties": {
            "config_revision": revision, "in_sync": {"type": "boolean"}, "nodes": items,
            "counts": any_object(), "next": next,
            "store": any_object()}}))],
    )}));
    let mut metrics = op(
        "the cluster as /status sees it, in the Prometheus text format (config revision; per node lag, sync, policy freshness, identity expiry)",
        vec![],
        None,
        &[],
    );
    metrics["responses"]["200"] = json!({"description": "success",
        "content": {"text/plain": {"schema": {"type": "string"}}}});
    p.insert("/api/v1/metrics".into(), json!({ "get": metrics }));
    p.insert("/api/v1/topology".into(), json!({"get": op(
        "the service dependency graph over a recent window, from the nodes' counters: per caller -> destination edge its rate, error rate, p50/p99 and the tiers that carried it; declared destinations never called (unused) and calls not declared (undeclared) flagged",
        vec![query("window_s", json!({"type": "integer", "minimum": 1, "maximum": 600}), "seconds (default 60)")],
        None,
        &[(200, json!({"type": "object", "required": ["window_s", "services", "edges", "unused"], "properties": {
            "window_s": {"type": "integer"}, "observed_s": {"type": "integer"}, "nodes_polled": {"type": "integer"},
            "services": {"type": "array", "items": {"type": "string"}},
            "edges": items, "unused": items}}))],
    )}));
    p.insert(
        "/api/v1/nodes".into(),
        json!({"get": op(
            "live gateways and sidecars, a page at a time (gateways, then sidecars, each in id order)",
            node_params(),
            None,
            &[(200, json!({"type": "object", "required": ["items", "revision", "next"], "properties": {
                "items": items, "revision": revision, "next": next}}))],
        )}),
    );
    p.insert("/api/v1/history".into(), json!({"get": op(
        "the change log, newest first",
        vec![
            query("kind", json!({"type": "string"}), "only changes of this kind"),
            query("name", json!({"type": "string"}), "only changes of objects with this name"),
            query("limit", json!({"type": "integer", "minimum": 1, "maximum": 1000}), "at most this many entries (default 100)"),
        ],
        None,
        &[(200, json!({"type": "object", "required": ["items", "revision"], "properties": {
            "items": items, "revision": revision}}))],
    )}));
    p.insert(
        "/api/v1/rollback".into(),
        json!({"post": op(
            "put an object back as it was at a recorded version",
            vec![if_match(), wait()],
            Some(reference("RollbackRequest")),
            &[(200, any_object()), (201, any_object())],
        )}),
    );
    let token = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "identity": {"type": "string"},
        "expires_at_ms": {"type": "integer", "format": "int64"},
        "created_at_ms": {"type": "integer", "format": "int64"},
        "created_by": {"type": "string"}}});
    p.insert(
        "/api/v1/join-tokens".into(),
        json!({
            "get": op(
                "join tokens of the mesh CA (never their secrets); 404 without a CA",
                vec![],
                None,
                &[(200, json!({"type": "object", "required": ["items"], "properties": {
                    "items": {"type": "array", "items": token}}}))],
            ),
            "post": op(
                "a join token for one identity; the answer holds its only copy (`token`)",
                vec![],
                Some(reference("NewToken")),
                &[(201, json!({"type": "object", "required": ["name", "token", "identity", "expires_at_ms"],
                    "properties": {"name": {"type": "string"}, "token": {"type": "string"},
                    "identity": {"type": "string"}, "expires_at_ms": {"type": "integer", "format": "int64"}}}))],
            ),
        }),
    );
    p.insert(
        "/api/v1/join-tokens/{name}".into(),
        json!({"delete": op(
            "revoke a join token (with an identity's last token, its renewals stop)",
            vec![path_param("name")],
            None,
            &[(200, json!({"type": "object", "required": ["deleted"], "properties": {
                "deleted": {"type": "string"}}}))],
        )}),
    );
    let mut sign = op(
        "a workload certificate for the CSR's key: for the identity of the join token \
         (`authorization: JoinToken <token>`), or of the mesh certificate presented on the \
         TLS connection (a renewal). No admin token.",
        vec![],
        Some(reference("SignRequest")),
        &[(
            200,
            json!({"type": "object", "required": ["identity", "certificate", "bundle", "not_after"],
            "properties": {"identity": {"type": "string"}, "certificate": {"type": "string"},
            "bundle": {"type": "string"}, "not_after": {"type": "string"}}}),
        )],
    );
    sign["security"] = json!([]);
    p.insert("/api/v1/identity".into(), json!({ "post": sign }));
    p.insert(
        "/api/v1/openapi.json".into(),
        json!({"get": op(
        "this document", vec![], None, &[(200, any_object())])}),
    );
    Value::Object(p)
}

/// The propagation report of a write with `?wait`.
pub fn propagation_schema() -> Value {
    json!({"type": "object", "required": ["revision", "complete", "applied", "pending"], "properties": {
        "revision": {"type": "integer", "format": "int64"},
        "complete": {"type": "boolean"},
        "applied": {"type": "array", "items": {"type": "string"}},
        "pending": {"type": "array", "items": {"type": "string"}},
    }})
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

    /// A standalone config file holding one empty `groups` map.
    fn config_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, "groups: {}\n").unwrap();
        (dir, file)
    }

    /// A body over the 2 MiB limit gets the documented JSON error shape
    /// (in process: over a socket the server's early answer races the
    /// client's upload), and nothing is written.
    #[tokio::test]
    async fn an_oversized_body_is_refused_in_the_error_shape() {
        let (_dir, file) = config_file();
        let store = meshgate_config::store::FileStore::open(&file)
            .await
            .unwrap();
        let mut tokens = crate::Tokens::default();
        tokens.add(
            "t".into(),
            "test-token-0123456789",
            crate::auth::Role::Admin,
        );
        let app = crate::router(crate::state(store, tokens));
        let huge = format!(r#"{{"description": "{}"}}"#, "a".repeat(3 << 20));
        for method in ["PUT", "PATCH"] {
            let req = http::Request::builder()
                .method(method)
                .uri("/api/v1/groups/g")
                .header("authorization", "Bearer test-token-0123456789")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(huge.clone()))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(
                resp.status(),
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "{method}"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).expect("a JSON error");
            assert_eq!(v["error"], "body_too_large", "{method}: {v}");
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "groups: {}\n");
    }

    /// The router serves exactly the documented methods of every
    /// documented path (405 for the others), and every schema reference
    /// resolves.
    #[tokio::test]
    async fn the_document_and_the_router_agree() {
        let (_dir, file) = config_file();
        let store = meshgate_config::store::FileStore::open(&file)
            .await
            .unwrap();
        let app = crate::router(crate::state(store, crate::Tokens::default()));
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 14, "{paths:?}");
        for (path, item) in paths {
            let uri = path.replace("{name}", "x");
            for m in METHODS {
                let documented = item.get(m).is_some();
                let req = http::Request::builder()
                    .method(m.to_uppercase().as_str())
                    .uri(&uri)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from("{}"))
                    .unwrap();
                let resp = app.clone().oneshot(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let served = status != http::StatusCode::METHOD_NOT_ALLOWED;
                assert_eq!(
                    served, documented,
                    "{m} {uri}: documented {documented}, router answered {status} {body:?}"
                );
                if documented {
                    let not_found_endpoint = status == http::StatusCode::NOT_FOUND
                        && body.windows(15).any(|w| w == b"no such endpoin");
                    assert!(
                        !not_found_endpoint,
                        "{m} {uri} is documented but not routed"
                    );
                }
            }
        }
        // Every $ref points at a schema of the document.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        // The spec schemas are the model's: unknown fields are refused.
        assert_eq!(schemas["Service"]["additionalProperties"], false);
        assert!(schemas["Route"]["properties"]["match"].is_object());
    }
}
