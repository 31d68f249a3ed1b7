//! One attempt of a request on one endpoint, over either wire: the
//! endpoint's HTTP/1.1 pool ([`crate::http::pool`]) or the shared HTTP/2
//! client; an upgrade or `CONNECT` on a fresh connection; a plain TCP
//! connect. Each returns a typed [`AttemptError`] saying how far the
//! request got, for the attempt loop ([`crate::proxy`]) to judge.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::http::body::{ProxyBody, Watched};
use crate::http::error::{client_went_away, root_cause, Failure, MeshError, Side};
use crate::http::h1::RequestBodyFailed;
use crate::http::h2::{HttpClient, Wire};
use crate::http::limit::{ConnLimit, Overflow};
use crate::http::pool::SendError;
use crate::upstream::endpoint::EndpointState;

/// How one attempt on an endpoint failed.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection could be made: nothing was sent. HTTP/1.1 hands the
    /// request back, so even a streamed body can move on.
    Connect(String, Option<Box<Request<ProxyBody>>>),
    /// The service's connection limit refused it: nothing was sent.
    Overflow(Overflow),
    /// The request's own body failed while it was sent: the client's
    /// malformed or abandoned upload, not the endpoint's fault. The flag:
    /// the client went away (abandoned).
    RequestBody(String, bool),
    /// Failed after the request was (or may have been) sent.
    Exchange(String),
    /// No response headers within the timeout.
    Timeout(Duration),
}

impl AttemptError {
    /// The failure this is, on `service`'s endpoint `ep` (the request
    /// handed back by a refused connect is the caller's to take first).
    pub fn into_failure(self, service: &str, ep: &EndpointState) -> Failure {
        match self {
            AttemptError::Connect(e, _) => Failure::new(
                MeshError::UpstreamConnectFailed,
                format!("cannot connect to {service} at {}: {e}", ep.address),
            ),
            AttemptError::Overflow(o) => Failure::new(
                MeshError::CircuitOpen,
                format!("service {service}: {} reached", o.as_str()),
            ),
            AttemptError::RequestBody(e, went_away) => {
                let reason = match went_away {
                    true => MeshError::ClientAborted,
                    false => MeshError::BadRequest,
                };
                Failure::new(reason, e).on(Side::Downstream).sent(true)
            }
            AttemptError::Exchange(e) => Failure::new(
                MeshError::UpstreamReset,
                format!("upstream {service} failed: {e}"),
            ),
            AttemptError::Timeout(t) => Failure::new(
                MeshError::UpstreamTimeout,
                format!("no response from {service} within {} ms", t.as_millis()),
            ),
        }
    }
}

/// An answer to an upgrade or `CONNECT`, and the upstream side of the
/// connection when it switched to a tunnel.
pub type Switched = (Response<ProxyBody>, Option<hyper::upgrade::Upgraded>);

/// The wire and limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptOpts<'a> {
    pub wire: Wire,
    /// The HTTP/2 client (HTTP/1.1 uses the endpoint's own pool).
    pub h2: &'a HttpClient,
    pub connect_timeout: Duration,
    /// Time allowed for response headers.
    pub timeout: Duration,
    /// Count requests in flight and time answers on the endpoint (for
    /// load-aware balancing).
    pub track_load: bool,
    /// The service's connection limit (HTTP/1.1).
    pub conn_limit: Option<ConnLimit<'a>>,
}

/// Sends `req` to `ep`: sets the request target for the wire (origin-form
/// through the endpoint's HTTP/1.1 pool, absolute-form through the HTTP/2
/// client), waits for response headers, and marks the endpoint's success.
/// Failures are for the caller to judge (eject, retry, move on).
pub async fn attempt(
    ep: &Arc<EndpointState>,
    opts: AttemptOpts<'_>,
    pq: &PathAndQuery,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, AttemptError> {
    match opts.wire {
        Wire::Http1 => {
            *req.uri_mut() = Uri::from(pq.clone());
            *req.version_mut() = Version::HTTP_11;
        }
        Wire::Http2 => {
            let Some(auth) = &ep.authority else {
                return Err(AttemptError::Connect(
                    format!("{} is not a valid address", ep.address),
                    Some(Box::new(req)),
                ));
            };
            let scheme = match ep.tls {
                Some(_) => Scheme::HTTPS,
                None => Scheme::HTTP,
            };
            // The caller's host travels as `:authority`, and no `Host`
            // beside it (RFC 9113 §8.3.1: servers such as nginx refuse a
            // `Host` that differs); the endpoint's address only picks the
            // connection.
            let host = req
                .headers_mut()
                .remove(http::header::HOST)
                .and_then(|v| http::uri::Authority::try_from(v.as_bytes()).ok())
                .unwrap_or_else(|| auth.clone());
            *req.uri_mut() = Uri::builder()
                .scheme(scheme)
                .authority(host)
                .path_and_query(pq.clone())
                .build()
                .expect("valid uri parts");
            *req.version_mut() = Version::HTTP_2;
        }
    }
    let in_flight = opts.track_load.then(|| ep.start());
    let sent_at = Instant::now();
    let result = match opts.wire {
        Wire::Http1 => {
            // The pool's connections carry their own timers (see
            // `h1::Conn`): no timer is armed per request.
            let deadline = tokio::time::Instant::from_std(sent_at) + opts.timeout;
            let sent = ep.h1.send(
                &ep.address,
                ep.tls.as_deref(),
                opts.connect_timeout,
                opts.conn_limit,
                req,
                deadline,
            );
            match sent.await {
                Ok(resp) => Ok(resp.map(ProxyBody::Upstream)),
                Err(SendError::Connect(e, back)) => {
                    Err(AttemptError::Connect(e.to_string(), Some(back)))
                }
                Err(SendError::Overflow(o)) => Err(AttemptError::Overflow(o)),
                Err(SendError::RequestBody(e)) => {
                    let went_away = RequestBodyFailed::of_io(&e).is_some_and(|f| f.went_away);
                    Err(AttemptError::RequestBody(e.to_string(), went_away))
                }
                Err(SendError::Exchange(e)) => Err(AttemptError::Exchange(e.to_string())),
                Err(SendError::Timeout) => Err(AttemptError::Timeout(opts.timeout)),
            }
        }
        Wire::Http2 => {
            // The body streams on the client's own task: watch it, so a
            // client's broken upload is not taken for the upstream's reset.
            let (parts, body) = req.into_parts();
            let (body, body_failed) = Watched::wrap(body);
            let req = Request::from_parts(parts, body);
            let client_body = || {
                body_failed
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::Acquire))
            };
            let sent = opts.h2.request(&ep.address, req);
            match tokio::time::timeout(opts.timeout, Box::pin(sent)).await {
                Ok(Ok(resp)) => Ok(resp.map(ProxyBody::H2)),
                Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(root_cause(&e), None)),
                Ok(Err(e)) if client_body() => Err(AttemptError::RequestBody(
                    root_cause(&e),
                    client_went_away(&e),
                )),
                Ok(Err(e)) => Err(AttemptError::Exchange(root_cause(&e))),
                Err(_) => Err(AttemptError::Timeout(opts.timeout)),
            }
        }
    };
    drop(in_flight);
    if result.is_ok() {
        ep.on_success();
        if opts.track_load {
            ep.observe_rtt(sent_at.elapsed());
        }
    }
    result
}

/// Sends an upgrade request (`Connection: upgrade`, e.g. WebSocket) to
/// `ep` on a fresh connection of its own. On `101 Switching Protocols`
/// returns the upstream side of the upgraded connection with the (empty)
/// response; any other answer is returned as is, with its body.
pub async fn upgrade(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    timeout: Duration,
    pq: &PathAndQuery,
    parts: &http::request::Parts,
) -> Result<Switched, AttemptError> {
    let mut req = Request::new(crate::http::body::empty());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = Uri::from(pq.clone());
    *req.headers_mut() = parts.headers.clone();
    let switched = |s: http::StatusCode| s == http::StatusCode::SWITCHING_PROTOCOLS;
    switch(ep, connect_timeout, timeout, req, switched).await
}

/// Sends `CONNECT <authority>` with `headers` to `ep` on a fresh
/// connection. On a 2xx answer the connection becomes a byte tunnel and is
/// returned with the response; any other answer is returned alone.
pub async fn connect_tunnel(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    timeout: Duration,
    authority: &str,
    headers: http::HeaderMap,
) -> Result<Switched, AttemptError> {
    let uri = Uri::try_from(authority).map_err(|e| {
        AttemptError::Exchange(format!("invalid CONNECT authority {authority:?}: {e}"))
    })?;
    let mut req = Request::new(crate::http::body::empty());
    *req.method_mut() = http::Method::CONNECT;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    switch(ep, connect_timeout, timeout, req, |s| s.is_success()).await
}

/// Sends `req` on a fresh HTTP/1.1 connection to `ep`; when the answer's
/// status passes `switched`, takes the connection over as a tunnel.
async fn switch(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    timeout: Duration,
    req: Request<ProxyBody>,
    switched: impl Fn(http::StatusCode) -> bool,
) -> Result<Switched, AttemptError> {
    let stream = connect_tcp(ep, connect_timeout).await?;
    let stream = match &ep.tls {
        None => tokio_util::either::Either::Left(stream),
        Some(tls) => {
            let handshake = tls.connect(stream, &ep.address);
            match tokio::time::timeout(connect_timeout, handshake).await {
                Ok(Ok(s)) => tokio_util::either::Either::Right(s),
                Ok(Err(e)) => return Err(AttemptError::Connect(format!("TLS: {e}"), None)),
                Err(_) => {
                    return Err(AttemptError::Connect(
                        "TLS handshake timed out".into(),
                        None,
                    ))
                }
            }
        }
    };
    let (mut tx, conn) = http1::Builder::new()
        .handshake::<_, ProxyBody>(TokioIo::new(stream))
        .await
        .map_err(|e| AttemptError::Connect(root_cause(&e), None))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended with error");
        }
    });
    let mut resp = match tokio::time::timeout(timeout, tx.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(AttemptError::Exchange(root_cause(&e))),
        Err(_) => return Err(AttemptError::Timeout(timeout)),
    };
    ep.on_success();
    if !switched(resp.status()) {
        return Ok((resp.map(ProxyBody::Incoming), None));
    }
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| AttemptError::Exchange(root_cause(&e)))?;
    Ok((resp.map(|_| crate::http::body::empty()), Some(upgraded)))
}

/// A TCP connection to `ep` within `connect_timeout` (a TCP route, a
/// `CONNECT` tunnel, an upgrade). The caller marks the endpoint's success
/// when what it needed of the connection worked.
pub(crate) async fn connect_tcp(
    ep: &EndpointState,
    connect_timeout: Duration,
) -> Result<tokio::net::TcpStream, AttemptError> {
    let connect = tokio::net::TcpStream::connect(ep.address.as_str());
    match tokio::time::timeout(connect_timeout, connect).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(AttemptError::Connect(e.to_string(), None)),
        Err(_) => Err(AttemptError::Connect("connect timed out".into(), None)),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::h2::HttpClient;

    /// An HTTP/2 upstream that reads each request body whole, then answers.
    async fn h2_upstream() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::new())))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// An HTTP/2 attempt through `h2`, 5 s for the answer.
    fn h2_opts(h2: &HttpClient) -> AttemptOpts<'_> {
        AttemptOpts {
            wire: Wire::Http2,
            h2,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            track_load: false,
            conn_limit: None,
        }
    }

    /// The host a request is for reaches an HTTP/2 upstream as
    /// `:authority`, with no `Host` field beside it (nginx refuses a
    /// request whose `Host` differs from `:authority` with 400).
    #[tokio::test]
    async fn an_h2_upstream_gets_the_host_as_authority_and_no_host_field() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let svc = service_fn(|req: Request<Incoming>| async move {
                let seen = format!(
                    "{} {:?} {}",
                    req.uri().authority().map_or("-", |a| a.as_str()),
                    req.headers().get(http::header::HOST),
                    req.uri().path()
                );
                Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from(seen))))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
        let ep = Arc::new(EndpointState::new(addr));
        let h2 = HttpClient::plain(Duration::from_secs(1));
        let opts = h2_opts(&h2);
        let mut req = Request::new(crate::http::body::empty());
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("orders.example:8080"),
        );
        let pq = PathAndQuery::from_static("/v1/x");
        let resp = attempt(&ep, opts, &pq, req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "orders.example:8080 None /v1/x");
    }

    /// A client that abandons its upload mid-body, through an HTTP/1.1
    /// front whose handler sends the request on to an HTTP/2 upstream:
    /// the attempt fails on the client's side, not the upstream's.
    #[tokio::test]
    async fn a_clients_abandoned_upload_to_an_h2_upstream_is_the_clients_failure() {
        let upstream = h2_upstream().await;
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let tx = Arc::new(tx);
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            let svc = service_fn(move |req: Request<Incoming>| {
                let (upstream, tx) = (upstream.clone(), tx.clone());
                async move {
                    let ep = Arc::new(EndpointState::new(upstream));
                    let h2 = HttpClient::plain(Duration::from_secs(1));
                    let opts = h2_opts(&h2);
                    let pq = PathAndQuery::from_static("/up");
                    let sent = attempt(&ep, opts, &pq, req.map(ProxyBody::Incoming)).await;
                    let verdict = match sent {
                        Ok(_) => "answered".to_string(),
                        Err(e) => format!("{e:?}"),
                    };
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(verdict);
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::new())))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        client
            .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
            .await
            .unwrap();
        client.flush().await.unwrap();
        // Let the upload start before the client walks away.
        tokio::task::yield_now().await;
        drop(client);
        let verdict = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the attempt ended")
            .unwrap();
        assert!(verdict.starts_with("RequestBody("), "{verdict}");
    }
}
