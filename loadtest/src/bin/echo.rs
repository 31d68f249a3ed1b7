//! `meshgate-echo`: a small HTTP/1.1 + h2c backend for the demo, the tests
//! and the benchmarks. Every response carries `x-served-by: <name>`; the
//! body is a JSON description of the request (or `--fixed-body` bytes).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;

/// HTTP echo backend.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18081")]
    listen: SocketAddr,
    /// Name reported in `x-served-by` and the body.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Answer every request with this many bytes instead of the JSON echo.
    #[arg(long)]
    fixed_body: Option<usize>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("meshgate-echo: cannot bind {}: {e}", args.listen);
            std::process::exit(2);
        }
    };
    eprintln!(
        "meshgate-echo {} listening on {}",
        args.name,
        listener.local_addr().unwrap()
    );
    let name: &'static str = Box::leak(args.name.into_boxed_str());
    let fixed: Option<Bytes> = args.fixed_body.map(|n| Bytes::from(vec![b'x'; n]));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let fixed = fixed.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(name, fixed.clone(), req));
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    name: &'static str,
    fixed: Option<Bytes>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match fixed {
        Some(b) => b,
        None => {
            let (parts, body) = req.into_parts();
            let got = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let desc = serde_json::json!({
                "server": name,
                "method": parts.method.as_str(),
                "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body": String::from_utf8_lossy(&got),
            });
            Bytes::from(desc.to_string())
        }
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert("x-served-by", http::HeaderValue::from_static(name));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
