//! The mesh wire conventions on request and response headers: hop counting,
//! request ids, trace context, caller identity, hop-by-hop header removal,
//! and naming the destination service.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

pub const X_MESH_SERVICE: HeaderName = HeaderName::from_static("x-mesh-service");
pub const X_MESH_SOURCE: HeaderName = HeaderName::from_static("x-mesh-source");
/// The SPIFFE ID of the caller a gateway verified (set by the gateway that
/// took the call from a sidecar; trusted only from a gateway's identity).
pub const X_MESH_CALLER: HeaderName = HeaderName::from_static("x-mesh-caller");
/// The consumer an ingress gateway authenticated (removed from every
/// request an ingress listener takes, set again by the route's `auth`).
pub const X_MESH_CONSUMER: HeaderName = HeaderName::from_static("x-mesh-consumer");
pub(crate) const X_MESH_HOPS: HeaderName = HeaderName::from_static("x-mesh-hops");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Which tier answered (set by the sidecar on responses, for operators).
pub const X_MESH_TIER: HeaderName = HeaderName::from_static("x-mesh-tier");

/// Marks a non-idempotent request as safe to send again.
pub(crate) const X_MESH_RETRYABLE: HeaderName = HeaderName::from_static("x-mesh-retryable");

/// Whether the request is marked `x-mesh-retryable: true`.
pub fn marked_retryable(h: &HeaderMap) -> bool {
    h.get(&X_MESH_RETRYABLE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// Headers that apply to one connection only and are never forwarded
/// (`te` is judged by its value: `te: trailers` is kept, gRPC needs it end
/// to end).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

/// Removes hop-by-hop headers, including those named by `Connection`.
///
/// Runs on every request and every response, and most carry none or only
/// `Connection`: one pass over the names decides, and only the headers
/// present are removed (a `HeaderMap::remove` hashes its name even when
/// the header is absent).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut connection = false;
    let mut present = [false; 8];
    let mut te = false;
    for name in h.keys() {
        match hop_index(name.as_str()) {
            Some(i) => {
                present[i] = true;
                connection |= i == 0;
            }
            None => te |= name == header::TE,
        }
    }
    if connection {
        // Other headers `Connection` names (the fixed ones go below).
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            for token in v.to_str().unwrap_or_default().split(',') {
                let token = token.trim();
                let fixed = HOP_BY_HOP
                    .iter()
                    .any(|n| n.as_str().eq_ignore_ascii_case(token));
                if token.is_empty() || fixed {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(n);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        h.remove(name);
    }
    if te && h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// The index in [`HOP_BY_HOP`] of a (lower-case) header name. A string
/// match (length, then bytes) costs a few instructions; comparing
/// `HeaderName`s one by one does not.
fn hop_index(name: &str) -> Option<usize> {
    let i = match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "trailer" => 7,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i], name);
    Some(i)
}

/// [`strip_hop_by_hop`] for an upgrade request: `Connection: upgrade` and
/// `Upgrade` stay (they are the request).
pub fn strip_hop_by_hop_keep_upgrade(h: &mut HeaderMap) {
    let upgrade = h.get(header::UPGRADE).cloned();
    strip_hop_by_hop(h);
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and the
/// like). `h2c` is not one of them: that upgrade is deprecated (RFC 9113
/// §3.1) and such a request is answered over HTTP/1.1.
pub fn is_upgrade(h: &HeaderMap) -> bool {
    let Some(up) = h.get(header::UPGRADE) else {
        return false;
    };
    if up.as_bytes().eq_ignore_ascii_case(b"h2c") {
        return false;
    }
    h.get_all(header::CONNECTION)
        .iter()
        .any(|v| ConnectionTokens::of(v.as_bytes()).upgrade)
}

/// What a `Connection` value says (RFC 9110 §7.6.1), read in one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// It names other (hop-by-hop) headers.
    pub others: bool,
}

impl ConnectionTokens {
    pub(crate) fn of(value: &[u8]) -> ConnectionTokens {
        let mut t = ConnectionTokens::default();
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                t.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                t.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                t.upgrade = true;
            } else if !token.is_empty() {
                t.others = true;
            }
        }
        t
    }

    /// Whether the header says only `close` / `keep-alive`: a parser that
    /// has read that has no reason to keep the header (it is hop-by-hop
    /// and would be stripped again).
    pub(crate) fn only_persistence(&self) -> bool {
        !self.upgrade && !self.others
    }
}

/// Whether the message's transfer coding is nothing or `chunked` alone:
/// the only one the mesh forwards. Any other (`gzip, chunked`, `chunked,
/// chunked`...) would be undone by re-framing and change what the body
/// means.
pub(crate) fn only_chunked(h: &HeaderMap) -> bool {
    let mut codings = 0;
    for v in h.get_all(header::TRANSFER_ENCODING) {
        let Ok(v) = v.to_str() else { return false };
        for c in v.split(',') {
            codings += 1;
            if !c.trim().eq_ignore_ascii_case("chunked") {
                return false;
            }
        }
    }
    codings <= 1
}

/// Whether a request is a gRPC call (`content-type: application/grpc...`).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The caller's deadline from `grpc-timeout` (`<digits><unit>`, units
/// H M S m u n; at most 8 digits).
pub fn grpc_timeout(h: &HeaderMap) -> Option<std::time::Duration> {
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    use std::time::Duration as D;
    Some(match unit {
        "H" => D::from_secs(n.saturating_mul(3600)),
        "M" => D::from_secs(n.saturating_mul(60)),
        "S" => D::from_secs(n),
        "m" => D::from_millis(n),
        "u" => D::from_micros(n),
        "n" => D::from_nanos(n),
        _ => return None,
    })
}

/// Increments `x-mesh-hops`; returns the new count, or `None` when the
/// header is not a number.
pub(crate) fn bump_hops(h: &mut HeaderMap) -> Option<u32> {
    let hops = match h.get(&X_MESH_HOPS) {
        None => 0,
        Some(v) => v.to_str().ok()?.trim().parse::<u32>().ok()?,
    };
    let next = hops.saturating_add(1);
    // Small counts (all but looping requests) without an allocation.
    static SMALL: [HeaderValue; 10] = {
        const fn v(s: &'static str) -> HeaderValue {
            HeaderValue::from_static(s)
        }
        [
            v("0"),
            v("1"),
            v("2"),
            v("3"),
            v("4"),
            v("5"),
            v("6"),
            v("7"),
            v("8"),
            v("9"),
        ]
    };
    let value = match SMALL.get(next as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(next),
    };
    h.insert(X_MESH_HOPS, value);
    Some(next)
}

/// Ensures `x-request-id` and `traceparent` exist.
///
/// The ids come from a per-thread xoshiro256++ generator seeded from the OS
/// (through `rand`'s thread generator): ids must be unique and
/// unpredictable enough to not collide, not secret, and ChaCha costs more
/// than the rest of this function.
pub(crate) fn ensure_ids(h: &mut HeaderMap) {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    thread_local! {
        static RNG: std::cell::RefCell<SmallRng> =
            std::cell::RefCell::new(SmallRng::from_rng(rand::thread_rng()).expect("seeded"));
    }
    RNG.with_borrow_mut(|rng| {
        if let header::Entry::Vacant(e) = h.entry(X_REQUEST_ID) {
            let mut buf = [0u8; 32];
            hex(&mut buf, &rng.gen::<u128>().to_be_bytes());
            e.insert(hex_value(&buf));
        }
        if let header::Entry::Vacant(e) = h.entry(TRACEPARENT) {
            // 00-<32 hex trace id>-<16 hex span id>-01; ids must not be all zero.
            let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
            hex(&mut buf[3..35], &(rng.gen::<u128>() | 1).to_be_bytes());
            hex(&mut buf[36..52], &(rng.gen::<u64>() | 1).to_be_bytes());
            e.insert(hex_value(&buf));
        }
    })
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn hex_value(s: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(s).expect("hex is a valid header value")
}

/// The service a mesh request is for: `x-mesh-service`, else the host
/// (from `Host` or the URI authority) without port and `.mesh` suffix,
/// lower-cased. Borrowed from the request unless it had to be lowered.
pub fn destination<'a>(h: &'a HeaderMap, uri_host: Option<&'a str>) -> Option<Cow<'a, str>> {
    if let Some(v) = h.get(&X_MESH_SERVICE).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some(lower(v));
        }
    }
    let unmeshed = |s: &str| -> Option<usize> {
        let s = s.strip_suffix(".mesh").unwrap_or(s);
        (!s.is_empty()).then_some(s.len())
    };
    Some(match request_host(h, uri_host)? {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..unmeshed(b)?]),
        Cow::Owned(mut o) => {
            o.truncate(unmeshed(&o)?);
            Cow::Owned(o)
        }
    })
}

/// The request's host without port, lower-cased. Borrowed from the
/// request unless it had to be lowered.
pub(crate) fn request_host<'a>(
    h: &'a HeaderMap,
    uri_host: Option<&'a str>,
) -> Option<Cow<'a, str>> {
    let raw = match h.get(header::HOST).and_then(|v| v.to_str().ok()) {
        Some(v) => v,
        None => uri_host?,
    };
    let host = strip_port(raw.trim());
    (!host.is_empty()).then(|| lower(host))
}

/// `s` in lower case, copied only when it has upper-case letters.
fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        // [v6]:port
        return match h.find(']') {
            Some(i) => &h[..=i],
            None => h,
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|c| c.is_ascii_digit()) => host,
        _ => h,
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Whether a method is idempotent (RFC 9110 §9.2.2), so safe to replay.
pub fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chunked_is_forwarded() {
        let te = |vals: &[&str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            only_chunked(&h)
        };
        assert!(te(&[]));
        assert!(te(&["chunked"]));
        assert!(te(&["Chunked "]));
        assert!(!te(&["gzip, chunked"]));
        assert!(!te(&["gzip", "chunked"]));
        assert!(!te(&["chunked, chunked"]));
        assert!(!te(&["identity"]));
        assert!(!te(&[""]));
    }

    #[test]
    fn connection_tokens_are_read_in_one_pass() {
        let t = |v: &str| ConnectionTokens::of(v.as_bytes());
        assert_eq!(
            t(" Keep-Alive , CLOSE"),
            ConnectionTokens {
                close: true,
                keep_alive: true,
                ..Default::default()
            }
        );
        assert!(t("keep-alive").only_persistence());
        assert!(t("Upgrade").upgrade && !t("Upgrade").only_persistence());
        let named = t("close, x-secret");
        assert!(named.close && named.others && !named.only_persistence());
        assert_eq!(t(" , "), ConnectionTokens::default());
    }

    #[test]
    fn hops_and_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(bump_hops(&mut h), Some(1));
        assert_eq!(bump_hops(&mut h), Some(2));
        h.insert(X_MESH_HOPS, HeaderValue::from_static("x"));
        assert_eq!(bump_hops(&mut h), None);
        ensure_ids(&mut h);
        let tp = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert_eq!(tp.len(), 55);
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert!(parts[1..3].iter().all(|p| p
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())));
        assert!(parts[1].bytes().any(|c| c != b'0') && parts[2].len() == 16);
        assert_eq!(h[&X_REQUEST_ID].len(), 32);
        // Existing ids are kept.
        ensure_ids(&mut h);
        assert_eq!(h[&TRACEPARENT], tp.as_str());
        // Fresh ids differ, here and on another thread.
        let ids = |h: &HeaderMap| (h[&X_REQUEST_ID].clone(), h[&TRACEPARENT].clone());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut h = HeaderMap::new();
            ensure_ids(&mut h);
            assert!(seen.insert(ids(&h)));
        }
        let other = std::thread::spawn(move || {
            let mut h = HeaderMap::new();
            ensure_ids(&mut h);
            ids(&h)
        });
        assert!(seen.insert(other.join().unwrap()));
    }

    #[test]
    fn destinations() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("Orders.mesh:8080"));
        assert_eq!(destination(&h, None).as_deref(), Some("orders"));
        h.insert(X_MESH_SERVICE, HeaderValue::from_static("billing"));
        assert_eq!(destination(&h, None).as_deref(), Some("billing"));
        let h = HeaderMap::new();
        assert_eq!(destination(&h, Some("cart")).as_deref(), Some("cart"));
        assert_eq!(destination(&h, None), None);
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"]);

        // Nothing hop-by-hop: nothing changes; `te: trailers` stays.
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        // Only proxy headers, no `Connection`.
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
