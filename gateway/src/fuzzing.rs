//! Entry points for the fuzz targets in `fuzz/` (built only with the
//! `fuzzing` feature; never part of a shipped build).
//!
//! This module owns no behaviour of its own: each function takes bytes,
//! drives one of the engine's private parsers with them and asserts what
//! must hold for any input, panicking when it does not:
//! - [`server_head`]: the server fast path's request head parser
//!   ([`crate::server`]'s `h1::parse`), its `content-length` reader and its
//!   response framing;
//! - [`client_response`]: the upstream response head parser and body
//!   decoder ([`crate::http`]'s `h1::parse_head` and `h1::decode`), fed
//!   whole and in two pieces, and a chunked round trip through the
//!   crate's own chunk writer;
//! - [`route_match`]: [`crate::routing::Router::find`] on a small fixed
//!   table, checked against each route's own `mismatches`.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use meshgate_config::{Key, Kind, Object};

use crate::http::h1 as client;
use crate::http::headers::{destination, request_host, ConnectionTokens};
use crate::http::wire::{write_last_chunk, ChunkSize};
use crate::routing::{CompiledRoute, RequestView, Router};
use crate::server::h1 as srv;

// === server_head ===

/// Parses `data` as a client connection's first bytes, the way the server
/// fast path does: heads one after another, each body taken whole. Also
/// checks `content_length` and the response framing on values drawn from
/// `data`.
pub fn server_head(data: &[u8]) {
    check_content_length(data);
    check_content_length(&data[..data.len().min(20)]);
    check_response_framing(data);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match srv::parse(&mut buf) {
            srv::Parse::Partial | srv::Parse::HandOff => {
                assert_eq!(
                    buf, before,
                    "a head not served here leaves the buffer as it was"
                );
                return;
            }
            srv::Parse::Head(head) => {
                assert!(buf.len() < before.len(), "a served head consumes bytes");
                let used = before.len() - buf.len();
                assert_eq!(&before[used..], &buf[..], "only the head is consumed");
                check_request_head(&before[..used], &head);
                if buf.len() < head.body_len {
                    return;
                }
                let _body = buf.split_to(head.body_len);
            }
        }
    }
}

/// What a head served here must be: it came from `raw`.
fn check_request_head(raw: &[u8], head: &srv::Head) {
    let p = &head.parts;
    assert_ne!(p.method, Method::CONNECT, "CONNECT goes to hyper");
    // (Empty lines before the request line are skipped, RFC 9112 §2.2.)
    let start = raw.iter().position(|b| !b"\r\n".contains(b));
    let raw = &raw[start.unwrap_or(raw.len())..];
    let m = p.method.as_str().as_bytes();
    assert!(
        raw.starts_with(m) && raw.get(m.len()) == Some(&b' '),
        "the method is the request line's first word"
    );
    assert_eq!(p.version, Version::HTTP_11);
    let target = p.uri.to_string();
    let again: Uri = target
        .parse()
        .unwrap_or_else(|e| panic!("the accepted target {target:?} does not parse again: {e}"));
    assert_eq!(again, p.uri, "the target parses again to itself");
    assert!(p.headers.len() <= srv::MAX_HEADERS);
    for name in [header::TRANSFER_ENCODING, header::EXPECT, header::UPGRADE] {
        assert!(!p.headers.contains_key(&name), "{name} goes to hyper");
    }
    for v in p.headers.get_all(header::CONNECTION) {
        let t = ConnectionTokens::of(v.as_bytes());
        assert!(!t.upgrade, "an upgrade goes to hyper");
        assert!(head.close || !t.close, "connection: close is noted");
    }
    assert!(head.body_len <= srv::MAX_BODY);
    let lengths: Vec<&HeaderValue> = p.headers.get_all(header::CONTENT_LENGTH).iter().collect();
    match lengths[..] {
        [] => assert_eq!(head.body_len, 0, "no content-length, no body"),
        [v] => {
            let digits = v.as_bytes();
            assert!(digits.iter().all(u8::is_ascii_digit), "{v:?}");
            assert_eq!(
                std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok()),
                Some(head.body_len),
                "the body length is the digits given"
            );
            check_content_length(digits);
        }
        _ => panic!("more than one content-length served: {lengths:?}"),
    }
}

/// `content_length` against the standard library's integer parser.
fn check_content_length(v: &[u8]) {
    let want = if !v.is_empty() && v.len() <= 18 && v.iter().all(u8::is_ascii_digit) {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
    } else {
        None
    };
    assert_eq!(srv::content_length(v), want, "content-length {v:?}");
}

/// The server's response framing on a status, method, announced length
/// and size hint drawn from `data`.
fn check_response_framing(data: &[u8]) {
    let b = |i: usize| data.get(i).copied().unwrap_or(0);
    let code = 100 + u16::from_le_bytes([b(0), b(1)]) % 900;
    let status = StatusCode::from_u16(code).expect("100..=999 is a status");
    let head_only = b(2) & 1 == 1;
    let hint = (b(2) & 2 == 2).then(|| u64::from_le_bytes(std::array::from_fn(|i| b(3 + i))));
    let mut h = HeaderMap::new();
    let announced = data.get(11..data.len().min(35)).unwrap_or_default();
    if b(2) & 4 == 4 {
        if let Ok(v) = HeaderValue::from_bytes(announced) {
            h.insert(header::CONTENT_LENGTH, v);
        }
    }
    let length = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| srv::content_length(v.as_bytes()));
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (framing, keep_length) = srv::framing(status, head_only, &h, hint);
    let why = format!("{status} head_only={head_only} hint={hint:?} {h:?}");
    if bodiless {
        assert_eq!(framing, srv::Framing::None, "{why}");
    }
    if keep_length {
        assert_eq!(framing, srv::Framing::None, "{why}");
        assert!(head_only || status == StatusCode::NOT_MODIFIED, "{why}");
    }
    match framing {
        srv::Framing::Length(n) => assert!(
            hint == Some(n) || (hint.is_none() && length == Some(n as usize)),
            "a length is the body's size or the one announced: {why}"
        ),
        srv::Framing::Chunked => assert!(
            !bodiless && !head_only && hint.is_none() && length.is_none(),
            "{why}"
        ),
        srv::Framing::None => assert!(bodiless || head_only, "{why}"),
    }
    if let (false, false, Some(n)) = (bodiless, head_only, hint) {
        assert_eq!(framing, srv::Framing::Length(n), "{why}");
    }
}

// === client_response ===

/// Parses `data[1..]` as an upstream's answer: its head, then its body
/// decoded to the end. `data[0]` chooses whether the request was a `HEAD`
/// (bit 0) and where the bytes are split in two reads (the other bits);
/// reading them whole and in two pieces must give the same answer. Then
/// `data[1..]` goes through a chunked body and back.
pub fn client_response(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let head_only = ctl & 1 == 1;
    let split = usize::from(ctl >> 1) * rest.len() / 127;
    let whole = read_response(rest, rest.len(), head_only);
    let pieces = read_response(rest, split, head_only);
    assert_eq!(whole, pieces, "read whole and split at {split}");
    check_chunk_size_line(rest);
    chunked_round_trip(ctl, rest);
}

/// What reading an answer ended with.
// Two of these per input, compared and dropped: no boxing needed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
enum Answer {
    /// The head is refused.
    BadHead,
    /// The bytes end inside a head.
    NoHead,
    Read {
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        keep_alive: bool,
        framing: String,
        body: Vec<u8>,
        trailers: Option<HeaderMap>,
        /// The body's framing was refused.
        failed: bool,
        /// The body came to its end.
        done: bool,
        /// Bytes past the end of a complete body.
        left: usize,
    },
}

/// Reads an answer from `bytes`, given `bytes[..split]` first and the
/// rest when that is not enough.
fn read_response(bytes: &[u8], split: usize, head_only: bool) -> Answer {
    let mut buf = BytesMut::from(&bytes[..split]);
    let mut unread = &bytes[split..];
    let head = loop {
        match client::parse_head(&mut buf, head_only) {
            Ok(Some(head)) => break head,
            Ok(None) if feed(&mut buf, &mut unread) => {}
            Ok(None) => return Answer::NoHead,
            Err(_) => return Answer::BadHead,
        }
    };
    let status = head.parts.status;
    assert!(!status.is_informational(), "interim answers are skipped");
    let framing_given = format!("{:?}", head.framing);
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        assert!(matches!(head.framing, client::Framing::Done), "no body");
    }
    if matches!(head.framing, client::Framing::Chunked(_)) {
        assert!(head.parts.headers.contains_key(header::TRANSFER_ENCODING));
    }
    let length = match head.framing {
        client::Framing::Length(n) => {
            assert!(head.parts.headers.contains_key(header::CONTENT_LENGTH));
            Some(n)
        }
        _ => None,
    };
    let eof = matches!(head.framing, client::Framing::Eof);
    let body_start = buf.len() + unread.len();
    let mut framing = head.framing;
    let mut body = Vec::new();
    let mut trailers = None;
    let mut failed = false;
    loop {
        let before = buf.len();
        match client::decode(&mut framing, &mut buf) {
            Ok(Some(frame)) => match frame.into_data() {
                Ok(d) => {
                    assert!(!d.is_empty(), "no empty data frames");
                    assert!(
                        d.len() <= before - buf.len(),
                        "data is taken from the buffer"
                    );
                    assert!(trailers.is_none(), "no data after the trailers");
                    body.extend_from_slice(&d);
                }
                Err(frame) => {
                    let t = frame.into_trailers().expect("data or trailers");
                    assert!(!t.is_empty(), "no empty trailers frame");
                    assert!(trailers.replace(t).is_none(), "one trailers frame");
                    assert!(matches!(framing, client::Framing::Done));
                }
            },
            Ok(None) if matches!(framing, client::Framing::Done) => break,
            Ok(None) if feed(&mut buf, &mut unread) => {}
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    let done = matches!(framing, client::Framing::Done);
    if done {
        assert!(
            matches!(client::decode(&mut framing, &mut buf), Ok(None)),
            "a finished body stays finished"
        );
    }
    feed(&mut buf, &mut unread);
    if let Some(n) = length {
        assert!(body.len() as u64 <= n, "no more than the content-length");
        assert_eq!(done, body.len() as u64 == n, "done when the length is read");
        assert_eq!(
            body.len() + buf.len(),
            body_start,
            "a sized body is only taken"
        );
    }
    if eof {
        assert_eq!(
            body.len(),
            body_start,
            "a close-delimited body is all the rest"
        );
    }
    Answer::Read {
        status,
        version: head.parts.version,
        headers: head.parts.headers,
        keep_alive: head.keep_alive,
        framing: framing_given,
        body,
        trailers,
        failed,
        done,
        left: if done && !failed { buf.len() } else { 0 },
    }
}

/// Moves the bytes not yet read into `buf`, all at once; false when there
/// were none.
fn feed(buf: &mut BytesMut, unread: &mut &[u8]) -> bool {
    let more = !unread.is_empty();
    buf.extend_from_slice(unread);
    *unread = &[];
    more
}

/// A chunk-size line of the crate's writer reads back as its size.
fn check_chunk_size_line(data: &[u8]) {
    let b = |i: usize| data.get(i).copied().unwrap_or(0);
    let n = u64::from_le_bytes(std::array::from_fn(b));
    let line = ChunkSize::new(n as usize);
    assert_eq!(
        httparse::parse_chunk_size(line.as_ref()),
        Ok(httparse::Status::Complete((line.as_ref().len(), n))),
        "chunk size line {:?}",
        line.as_ref()
    );
}

/// `data` written as chunks by the crate's writer (chunk sizes drawn from
/// `data`, trailers when `ctl` says), followed by the start of a next
/// answer, decodes to exactly `data` and those trailers, in one read or in
/// two.
fn chunked_round_trip(ctl: u8, data: &[u8]) {
    const NEXT: &[u8] = b"HTTP/1.1 200 OK\r\n";
    let scale = usize::from(ctl % 4) + 1;
    let mut wire = Vec::with_capacity(data.len() * 2 + 64);
    let mut at = 0;
    while at < data.len() {
        let len = (1 + usize::from(data[at]) * scale).min(data.len() - at);
        wire.extend_from_slice(ChunkSize::new(len).as_ref());
        wire.extend_from_slice(&data[at..at + len]);
        wire.extend_from_slice(b"\r\n");
        at += len;
    }
    let trailers = (ctl & 0x80 == 0x80).then(|| {
        let mut t = HeaderMap::new();
        t.insert("x-fuzz-len", HeaderValue::from(data.len()));
        if ctl & 0x40 == 0x40 {
            t.append(
                HeaderName::from_static("x-fuzz-ctl"),
                HeaderValue::from(u16::from(ctl)),
            );
        }
        t
    });
    write_last_chunk(&mut wire, trailers.as_ref());
    wire.extend_from_slice(NEXT);
    for split in [wire.len(), usize::from(ctl >> 1) * wire.len() / 127] {
        let mut framing = client::Framing::Chunked(client::Chunk::Size);
        let mut buf = BytesMut::from(&wire[..split]);
        let mut rest = Some(&wire[split..]);
        let mut body = Vec::new();
        let mut got = None;
        loop {
            match client::decode(&mut framing, &mut buf) {
                Ok(Some(frame)) => match frame.into_data() {
                    Ok(d) => body.extend_from_slice(&d),
                    Err(frame) => got = frame.into_trailers().ok(),
                },
                Ok(None) if matches!(framing, client::Framing::Done) => break,
                Ok(None) => match rest.take() {
                    Some(r) => buf.extend_from_slice(r),
                    None => panic!("the chunked body ends early (split at {split})"),
                },
                Err(e) => panic!("the crate's own chunked body is refused: {e}"),
            }
        }
        if let Some(r) = rest {
            buf.extend_from_slice(r);
        }
        assert_eq!(body, data, "the body round-trips (split at {split})");
        assert_eq!(got, trailers, "the trailers round-trip");
        assert_eq!(&buf[..], NEXT, "the next answer is left in the buffer");
    }
}

// === route_match ===

/// The fixed table: (name, route JSON).
const ROUTES: &[(&str, &str)] = &[
    ("catch-all", r#"{"backends":[{"service":"a"}]}"#),
    (
        "shop",
        r#"{"match":{"hosts":["shop.io"]},"backends":[{"service":"shop"}]}"#,
    ),
    (
        "shop-api",
        r#"{"match":{"hosts":["shop.io"],"path":{"prefix":"/api"}},
            "rewrite":{"path_prefix":"/","host":"api.internal",
                       "request_headers":{"set":{"x-from":"gw"},"remove":["x-drop"]}},
            "backends":[{"service":"api","weight":3},{"service":"api-v2","weight":1}]}"#,
    ),
    (
        "shop-api-v1",
        r#"{"match":{"hosts":["shop.io"],"path":{"exact":"/api/v1"}},"backends":[{"service":"v1"}]}"#,
    ),
    (
        "shop-write",
        r#"{"match":{"hosts":["shop.io"],"path":{"prefix":"/api/"},"methods":["POST","PUT"]},
            "backends":[{"service":"writer"}]}"#,
    ),
    (
        "beta",
        r#"{"match":{"hosts":["shop.io"],"path":{"prefix":"/api"},
                     "headers":[{"name":"x-beta","exact":"1"},{"name":"x-block","present":false}]},
            "backend_rules":[{"match":{"headers":[{"name":"user-agent","regex":".*iPhone.*"}]},
                              "backends":[{"service":"mobile"}]}],
            "backends":[{"service":"beta"}]}"#,
    ),
    (
        "users",
        r#"{"match":{"hosts":["shop.io","*.shop.io"],"path":{"regex":"/users/[0-9]+(/.*)?"}},
            "sticky":{"header":"x-user"},
            "backends":[{"service":"u1"},{"service":"u2","weight":2}]}"#,
    ),
    (
        "wild",
        r#"{"match":{"hosts":["*.shop.io"]},"backends":[{"service":"wild"}]}"#,
    ),
    (
        "wild-eu",
        r#"{"match":{"hosts":["*.eu.shop.io"]},"priority":5,"backends":[{"service":"eu"}]}"#,
    ),
    (
        "static",
        r#"{"match":{"path":{"prefix":"/static/"}},"backends":[{"service":"cdn"}]}"#,
    ),
    (
        "search",
        r#"{"match":{"path":{"exact":"/search"},"query":[{"name":"q"},{"name":"lang","regex":"en|de"}]},
            "backends":[{"service":"search"}]}"#,
    ),
    (
        "urgent",
        r#"{"match":{"hosts":["urgent.io"],"headers":[{"name":"x-debug","regex":"on|yes"}]},
            "priority":10,"backends":[{"service":"debug"}]}"#,
    ),
    (
        "canary",
        r#"{"match":{"hosts":["orders"],"headers":[{"name":"x-canary"}]},"priority":10,
            "backends":[{"service":"orders-v2"}]}"#,
    ),
    (
        "orders",
        r#"{"match":{"hosts":["orders"]},"backends":[{"service":"orders"}]}"#,
    ),
    (
        "teapot",
        r#"{"match":{"hosts":["tea.io"],"path":{"exact":"/"}},
            "direct_response":{"status":418,"body":"short and stout"}}"#,
    ),
];

/// The table's routes, compiled, and two routers built from them in
/// opposite orders.
struct Table {
    routes: Vec<Arc<CompiledRoute>>,
    forward: Router,
    backward: Router,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let routes: Vec<Arc<CompiledRoute>> = ROUTES
            .iter()
            .map(|(name, json)| {
                let key = Key::new(Kind::Routes, *name);
                match Object::decode(&key, json.as_bytes()) {
                    Ok(Object::Route(r)) => Arc::new(CompiledRoute::new(name, 1, &r)),
                    other => panic!("route {name} of the fuzz table: {other:?}"),
                }
            })
            .collect();
        Table {
            forward: Router::build(&routes),
            backward: Router::build(routes.iter().rev()),
            routes,
        }
    })
}

/// Matches a request drawn from `data` against the fixed table. `data` is
/// lines: the `Host` header, the method, the path and query, then
/// `name: value` headers. Both the ingress host and the mesh destination
/// are tried.
pub fn route_match(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let host = lines.next().unwrap_or_default();
    let method = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let method = Method::from_bytes(method).unwrap_or(Method::GET);
    let Ok(pq) = http::uri::PathAndQuery::try_from(target) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(host) {
        headers.insert(header::HOST, v);
    }
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let view = RequestView {
        method: &method,
        path: pq.path(),
        query: pq.query(),
        headers: &headers,
    };
    let ingress = request_host(&headers, None).unwrap_or_default();
    let mesh = destination(&headers, None).unwrap_or_default();
    check_match(&ingress, &view, &pq, data.len());
    if mesh != ingress {
        check_match(&mesh, &view, &pq, data.len());
    }
}

fn check_match(host: &str, view: &RequestView<'_>, pq: &http::uri::PathAndQuery, salt: usize) {
    let t = table();
    let found = t.forward.find(host, view);
    let name = |r: Option<&Arc<CompiledRoute>>| r.map(|r| r.name.clone());
    let why = format!("host {host:?} {} {pq} {:?}", view.method, view.headers);
    assert_eq!(
        found.map(Arc::as_ptr),
        t.forward.find(host, view).map(Arc::as_ptr),
        "matching twice gives one answer: {why}"
    );
    assert_eq!(
        name(found),
        name(t.backward.find(host, view)),
        "the order routes were added in does not matter: {why}"
    );
    // Each route's own account of why it does not match agrees.
    let matching: Vec<&Arc<CompiledRoute>> = t
        .routes
        .iter()
        .filter(|r| r.mismatches(host, view).is_empty())
        .collect();
    match found {
        None => assert!(
            matching.is_empty(),
            "no route found, yet {:?} match: {why}",
            matching.iter().map(|r| &r.name).collect::<Vec<_>>()
        ),
        Some(w) => {
            assert!(
                matching.iter().any(|r| Arc::ptr_eq(r, w)),
                "the route found ({}) does not match by its own account: {why}: {:?}",
                w.name,
                w.mismatches(host, view)
            );
            for r in &matching {
                assert!(
                    r.rank() <= w.rank(),
                    "{} outranks the route found ({}): {why}",
                    r.name,
                    w.name
                );
            }
        }
    }
    // Taking another route out does not change the answer; taking the
    // winner out gives one of the others.
    let out = &t.routes[salt % t.routes.len()];
    let mut less = t.forward.clone();
    less.remove(out);
    assert_eq!(less.len(), t.forward.len() - 1);
    let again = less.find(host, view);
    match found {
        Some(w) if Arc::ptr_eq(w, out) => {
            if let Some(r) = again {
                assert!(!Arc::ptr_eq(r, out), "a removed route is not found: {why}");
                assert!(matching.iter().any(|m| Arc::ptr_eq(m, r)), "{why}");
            }
        }
        _ => assert_eq!(
            name(again),
            name(found),
            "removing {} changed the answer: {why}",
            out.name
        ),
    }
    let Some(w) = found else { return };
    if w.direct.is_none() {
        let (i, backend) = w
            .pick_backend(view)
            .unwrap_or_else(|| panic!("{} picks no backend: {why}", w.name));
        assert_eq!(&w.backends[i], backend);
        let (_, split) = w.backend_choice(view);
        assert!(
            split.iter().any(|(s, _)| s == backend),
            "the backend picked ({backend}) is one of the choice {split:?}: {why}"
        );
    }
    if let Some(rw) = &w.rewrite {
        if let Some(p) = rw.path(pq) {
            assert_eq!(p.query(), pq.query(), "a rewrite keeps the query: {why}");
        }
        let mut h = view.headers.clone();
        rw.request_headers(&mut h);
        rw.response_headers(&mut h);
    }
}

#[cfg(test)]
mod tests {
    /// Runs `check` on every seed of `target` in `fuzz/corpus/`.
    fn seeds(target: &str, check: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            check(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", dir.display());
    }

    #[test]
    fn the_seeds_hold_every_invariant() {
        seeds("server_head", super::server_head);
        seeds("client_response", super::client_response);
        seeds("route_match", super::route_match);
    }
}
