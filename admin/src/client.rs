//! A small HTTP/1.1 client for the admin process's own calls (explain
//! requests forwarded to a gateway's ops port) and for `meshctl`, over
//! plain HTTP or TLS (`https://` URLs, verified with the given client
//! config).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Sends one request and reads the whole answer (10 s limit); an
/// `https://` URL is verified with `tls` (default: the system's roots).
pub async fn request(
    tls: Option<&rustls::ClientConfig>,
    method: http::Method,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(http::StatusCode, Vec<u8>), String> {
    let tls = match tls {
        Some(t) => t.clone(),
        None => crate::tls::client_config(None)?,
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    if !body.is_empty() {
        b = b.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer within 10 s"))?
        .map_err(|e| format!("{url}: {}", chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

/// POSTs a JSON body.
pub async fn post_json(url: &str, body: Vec<u8>) -> Result<(http::StatusCode, Vec<u8>), String> {
    request(None, http::Method::POST, url, &[], body).await
}

/// An error with its causes (`client error (Connect): invalid peer
/// certificate: UnknownIssuer`): hyper's own message names only the stage.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
