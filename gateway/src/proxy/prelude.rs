//! The request prelude: what every mesh hop (a gateway listener, the
//! sidecar) does to a request before it is routed, and the request target
//! sent upstream.

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Uri, Version};

use crate::http::error::{Failure, MeshError};
use crate::http::headers;

/// Counts this hop (`x-mesh-hops` + 1: a value that is not a number is
/// refused, a count over `max_hops` is a forwarding loop) and creates
/// `x-request-id` and `traceparent` when missing.
pub fn stamp(h: &mut HeaderMap, max_hops: u32) -> Result<(), Failure> {
    match headers::bump_hops(h) {
        None => {
            return Err(Failure::new(
                MeshError::BadRequest,
                "x-mesh-hops is not a number",
            ))
        }
        Some(n) if n > max_hops => {
            return Err(Failure::new(
                MeshError::LoopDetected,
                format!("more than {max_hops} mesh hops"),
            ))
        }
        Some(_) => {}
    }
    headers::ensure_ids(h);
    Ok(())
}

/// What every hop refuses before anything else: an ambiguous `Host`
/// ([`check_host`]) and a transfer coding it cannot forward faithfully
/// ([`check_codings`]).
pub fn check<B>(req: &http::Request<B>) -> Result<(), Failure> {
    check_host(req.method(), req.version(), req.uri(), req.headers())?;
    check_codings(req.headers())
}

/// The `Host` rule of RFC 9112 §3.2, as strictly as HAProxy applies it:
/// an HTTP/1.1 request needs exactly one `Host`; none may carry two
/// (equal or not); a `Host` must be a valid authority (host and optional
/// numeric port, no user info, not empty); and an HTTP/1 absolute-form
/// target must name the same authority as the `Host`. Anything else is
/// ambiguous about where the request goes: 400, and the connection is
/// closed. (HTTP/2's `:authority` is not held to the `Host`: RFC 9113
/// §8.3.1 makes that a SHOULD, and the mesh's own HTTP/2 hops carry the
/// endpoint's address there and the caller's host in `Host`, because
/// the HTTP/2 client connects to the URI's authority.)
/// (A `CONNECT`'s authority-form target names a port the `Host` need not
/// repeat: only one `Host`, and a valid one, is required of it.)
pub fn check_host(
    method: &Method,
    version: Version,
    uri: &Uri,
    h: &HeaderMap,
) -> Result<(), Failure> {
    let bad = |why: &str| Err(Failure::new(MeshError::BadRequest, why.to_string()));
    let mut hosts = h.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return bad("more than one Host header"),
        (Some(v), None) => v,
        (None, None) if version == Version::HTTP_11 && uri.authority().is_none() => {
            return bad("an HTTP/1.1 request needs a Host header")
        }
        (None, None) => return Ok(()),
    };
    if !valid_host(host.as_bytes()) {
        return bad("invalid Host header");
    }
    match uri.authority() {
        _ if method == Method::CONNECT || version == Version::HTTP_2 => Ok(()),
        Some(a) if !a.as_str().eq_ignore_ascii_case(host.to_str().unwrap_or("")) => {
            bad("the Host header and the request target name different hosts")
        }
        _ => Ok(()),
    }
}

/// A request body in a transfer coding other than `chunked` (`gzip,
/// chunked`) cannot be forwarded without changing what it means (the
/// re-framed body would lose the coding): 501, as RFC 9112 §6.1 allows
/// and nginx and Envoy answer.
pub fn check_codings(h: &HeaderMap) -> Result<(), Failure> {
    if headers::only_chunked(h) {
        return Ok(());
    }
    Err(Failure::new(
        MeshError::NotImplemented,
        "transfer codings other than chunked are not forwarded",
    ))
}

/// Whether `v` is `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2):
/// a non-empty reg-name or IPv4 address, or a bracketed IPv6 literal, and
/// a port of digits up to 65535. Checked byte by byte, without parsing
/// into an `Authority` (which copies the value): this runs on every
/// request.
fn valid_host(v: &[u8]) -> bool {
    let (host_ok, rest) = match v.first() {
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) => {
                let inner = &v[1..end];
                let ok = !inner.is_empty()
                    && inner
                        .iter()
                        .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                (ok, &v[end + 1..])
            }
            None => return false,
        },
        _ => {
            let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
            let name = &v[..end];
            let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b);
            (!name.is_empty() && name.iter().all(reg_name), &v[end..])
        }
    };
    let port_ok = match rest {
        [] => true,
        [b':', digits @ ..] => {
            !digits.is_empty()
                && digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= 65535
        }
        _ => false,
    };
    host_ok && port_ok
}

/// Keeps the caller's host for the upstream: an HTTP/2 request carries it
/// in the URI's authority, an HTTP/1.1 upstream needs a `Host` header.
pub fn keep_host(h: &mut HeaderMap, authority: Option<&Authority>) {
    if h.contains_key(header::HOST) {
        return;
    }
    if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        h.insert(header::HOST, v);
    }
}

/// The request target sent upstream: the path and query, `/` when the
/// request has none (an authority-form or absolute `*` target).
pub fn target(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// Sets `x-forwarded-proto` to the scheme the client used (on ingress
/// listeners, the edge: what a client sent is replaced).
pub(crate) fn forwarded_proto(h: &mut HeaderMap, tls: bool) {
    const XFP: header::HeaderName = header::HeaderName::from_static("x-forwarded-proto");
    let proto = if tls { "https" } else { "http" };
    h.insert(XFP, HeaderValue::from_static(proto));
}

/// `x-mesh-source` and `x-mesh-caller` from a mesh client's verified
/// identity: a sidecar's service and SPIFFE ID, whatever the request
/// says; a gateway forwards its own caller's (it set or checked them);
/// any other identity names no service the mesh knows, so
/// `x-mesh-source` goes. Without a verified identity (plaintext on a
/// permissive listener) `x-mesh-caller` goes: nothing vouches for it.
pub(crate) fn source_from_identity(h: &mut HeaderMap, tls: Option<&crate::tls::TlsInfo>) {
    let Some((id, tls)) = tls.and_then(|t| Some((t.peer_identity.as_ref()?, t))) else {
        h.remove(&headers::X_MESH_CALLER);
        return;
    };
    if id.is_gateway() {
        return;
    }
    match &tls.peer_service {
        Some(v) => {
            h.insert(headers::X_MESH_SOURCE, v.clone());
        }
        None => {
            h.remove(&headers::X_MESH_SOURCE);
        }
    }
    match &tls.peer_caller {
        Some(v) => {
            h.insert(headers::X_MESH_CALLER, v.clone());
        }
        None => {
            h.remove(&headers::X_MESH_CALLER);
        }
    }
}

/// Appends the client's address to `x-forwarded-for`.
pub(crate) fn forwarded_for(h: &mut HeaderMap, ip: &HeaderValue) {
    const XFF: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
    match h.entry(XFF) {
        header::Entry::Vacant(e) => {
            e.insert(ip.clone());
        }
        header::Entry::Occupied(mut e) => {
            let Ok(prev) = e.get().to_str() else { return };
            let joined = format!("{prev}, {}", ip.to_str().unwrap_or(""));
            if let Ok(v) = HeaderValue::from_str(&joined) {
                e.insert(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_are_counted_and_bounded() {
        let mut h = HeaderMap::new();
        stamp(&mut h, 2).unwrap();
        assert_eq!(h[&headers::X_MESH_HOPS], "1");
        assert!(h.contains_key(&headers::X_REQUEST_ID));
        assert!(h.contains_key(&headers::TRACEPARENT));
        stamp(&mut h, 2).unwrap();
        let f = stamp(&mut h, 2).unwrap_err();
        assert_eq!(f.reason, MeshError::LoopDetected);
        h.insert(&headers::X_MESH_HOPS, HeaderValue::from_static("x"));
        assert_eq!(stamp(&mut h, 2).unwrap_err().reason, MeshError::BadRequest);
    }

    #[test]
    fn host_rules() {
        let check = |version, uri: &str, hosts: &[&str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(header::HOST, HeaderValue::from_str(v).unwrap());
            }
            check_host(&Method::GET, version, &uri.parse().unwrap(), &h).is_ok()
        };
        let v11 = Version::HTTP_11;
        assert!(check(v11, "/a", &["example.com"]));
        assert!(check(v11, "/a", &["Example.com:8080"]));
        assert!(check(v11, "/a", &["[::1]:80"]));
        assert!(!check(v11, "/a", &[]), "HTTP/1.1 without Host");
        assert!(check(Version::HTTP_10, "/a", &[]), "HTTP/1.0 may omit it");
        assert!(!check(v11, "/a", &["a", "a"]), "two equal Hosts");
        assert!(!check(v11, "/a", &["a", "b"]), "two different Hosts");
        for invalid in [
            "", "a b", "user@a", "a:1:2", "a:port", "a/b", "a:", ":80", "a:99999", "[::1", "[]",
            "[::1]x",
        ] {
            assert!(!check(v11, "/a", &[invalid]), "{invalid:?}");
        }
        // Absolute form: the two must agree.
        assert!(check(v11, "http://a.example:81/x", &["A.example:81"]));
        assert!(!check(v11, "http://a.example/x", &["b.example"]));
        assert!(check(v11, "http://a.example/x", &[]));
        assert!(check(Version::HTTP_2, "http://a.example/x", &[]));
        // HTTP/2: a mesh hop's :authority is the endpoint's address.
        assert!(check(Version::HTTP_2, "http://10.0.0.1:80/x", &["orders"]));
        assert!(!check(Version::HTTP_2, "http://10.0.0.1:80/x", &["a", "b"]));
        // CONNECT: one valid Host, whatever port the target names.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("orders"));
        let target = "orders:0".parse().unwrap();
        assert!(check_host(&Method::CONNECT, v11, &target, &h).is_ok());
    }

    #[test]
    fn target_defaults_to_the_root() {
        assert_eq!(target(&"http://a/b?c=1".parse().unwrap()), "/b?c=1");
        assert_eq!(target(&"orders:0".parse().unwrap()), "/");
    }
}
