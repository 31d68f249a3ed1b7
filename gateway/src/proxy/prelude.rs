//! The request prelude: what every mesh hop (a gateway listener, the
//! sidecar) does to a request before it is routed, and the request target
//! sent upstream.

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::Uri;

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
    fn target_defaults_to_the_root() {
        assert_eq!(target(&"http://a/b?c=1".parse().unwrap()), "/b?c=1");
        assert_eq!(target(&"orders:0".parse().unwrap()), "/");
    }
}
