//! A route's response cache (`cache`): GET and HEAD answers kept by what
//! the upstream allows (RFC 9111 for a shared cache: `s-maxage`, then
//! `max-age`, then `Expires`; never `no-store`, `private`, `no-cache` or
//! a `Set-Cookie`; `Vary` honoured, `Vary: *` never stored), bounded by
//! total body bytes (moka, weighed by size) with a per-object limit.
//!
//! Misses are coalesced: the first request for a key goes upstream, the
//! others wait for it and are answered from what it stored (or go
//! upstream themselves if it stored nothing), so a burst of misses sends
//! one request. A storable answer is read whole before the client gets
//! it, up to `max_object_bytes`: one that proves larger (or has trailers)
//! is not kept, and goes on with what was read put back in front.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use meshgate_config::model::Cache;
use tokio::sync::watch;

use crate::http::body::{empty, full, Prefixed, ProxyBody};

/// The answer header saying what the cache did.
pub const X_MESH_CACHE: &str = "x-mesh-cache";
/// Variants kept per key (by `Vary`).
const MAX_VARIANTS: usize = 8;
/// Longest a request waits for another one's answer to the same key.
const COALESCE_WAIT: Duration = Duration::from_secs(30);

/// One stored answer.
#[derive(Debug)]
struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// The request headers `Vary` names, as the stored answer's request had them.
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    stored_at: Instant,
    /// Age it already had when it arrived (`Age`).
    initial_age: u64,
    fresh_until: Instant,
    /// May answer requests with `Authorization` (`public` or `s-maxage`).
    shared_ok: bool,
}

impl Stored {
    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 128
    }

    fn fits(&self, req: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, want)| req.get(name) == want.as_ref())
    }
}

type Variants = Arc<Vec<Arc<Stored>>>;

/// A route's cache, kept across config changes that leave `cache` as it
/// was.
pub struct RouteCache {
    spec: Cache,
    entries: moka::sync::Cache<String, Variants>,
    /// Keys being fetched now, for coalescing.
    inflight: Inflight,
}

type Inflight = Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>;

/// A route's cache as the request path uses it.
pub trait ResponseCache: Send + Sync + std::fmt::Debug {
    /// Looks `key` up for a request with `method` and `headers`; waits
    /// for a fetch of the same key in progress.
    fn lookup<'a>(
        &'a self,
        method: &'a Method,
        headers: &'a HeaderMap,
        key: &'a str,
    ) -> BoxFuture<'a, Lookup>;
    /// Stores `resp`, the answer to the fetch's request (whose headers
    /// are `req`), when it may be; the answer for the client.
    fn store<'a>(
        &'a self,
        fetch: Fetch,
        req: &'a HeaderMap,
        resp: Response<ProxyBody>,
    ) -> BoxFuture<'a, Result<Response<ProxyBody>, String>>;
    /// Drops every stored answer, or those of one key; how many keys.
    fn purge(&self, key: Option<&str>) -> u64;
}

impl ResponseCache for RouteCache {
    fn lookup<'a>(
        &'a self,
        method: &'a Method,
        headers: &'a HeaderMap,
        key: &'a str,
    ) -> BoxFuture<'a, Lookup> {
        Box::pin(RouteCache::lookup(self, method, headers, key))
    }

    fn store<'a>(
        &'a self,
        fetch: Fetch,
        req: &'a HeaderMap,
        resp: Response<ProxyBody>,
    ) -> BoxFuture<'a, Result<Response<ProxyBody>, String>> {
        Box::pin(RouteCache::store(self, fetch, req, resp))
    }

    fn purge(&self, key: Option<&str>) -> u64 {
        RouteCache::purge(self, key)
    }
}

impl std::fmt::Debug for RouteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCache")
            .field("spec", &self.spec)
            .finish()
    }
}

/// What the cache says about a request.
pub enum Lookup {
    /// Answered from the cache.
    Hit(Box<Response<ProxyBody>>),
    /// Not stored: go upstream; [`RouteCache::store`] the answer with the
    /// `Fetch` when there is one (this request leads the key's fetch).
    Miss(Option<Fetch>),
    /// Not for the cache (a method other than GET and HEAD, or
    /// `Cache-Control: no-store` on the request).
    Bypass,
}

/// The leader of a key's fetch: when dropped (stored or not), the
/// requests waiting for it look again.
pub struct Fetch {
    key: String,
    done: watch::Sender<bool>,
    inflight: Inflight,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        inflight.remove(&self.key);
        let _ = self.done.send(true);
    }
}

/// The cache key of a request: host and target (HEAD shares GET's).
pub fn key(host: &str, pq: &str) -> String {
    format!("{host}{pq}")
}

impl RouteCache {
    pub fn new(spec: &Cache) -> RouteCache {
        RouteCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(spec.max_bytes)
                .weigher(|_k: &String, v: &Variants| {
                    let w: usize = v.iter().map(|s| s.weight()).sum();
                    u32::try_from(w).unwrap_or(u32::MAX)
                })
                .build(),
            spec: spec.clone(),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Looks `key` up for a request with `method` and `headers`; waits for
    /// a fetch of the same key in progress.
    pub async fn lookup(&self, method: &Method, headers: &HeaderMap, key: &str) -> Lookup {
        if !matches!(*method, Method::GET | Method::HEAD) || directive(headers, "no-store") {
            return Lookup::Bypass;
        }
        let revalidate = directive(headers, "no-cache");
        let head = *method == Method::HEAD;
        for waited in [false, true] {
            if !revalidate {
                if let Some(hit) = self.find(key, headers, head) {
                    return Lookup::Hit(Box::new(hit));
                }
            }
            if head {
                // A HEAD answer has no body to store.
                return Lookup::Miss(None);
            }
            let waiting = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                match inflight.get(key) {
                    Some(rx) if !waited && !revalidate => Some(rx.clone()),
                    Some(_) => None,
                    None => {
                        let (tx, rx) = watch::channel(false);
                        inflight.insert(key.to_string(), rx);
                        return Lookup::Miss(Some(Fetch {
                            key: key.to_string(),
                            done: tx,
                            inflight: self.inflight.clone(),
                        }));
                    }
                }
            };
            match waiting {
                Some(mut rx) => {
                    let _ = tokio::time::timeout(COALESCE_WAIT, rx.wait_for(|d| *d)).await;
                }
                None => return Lookup::Miss(None),
            }
        }
        Lookup::Miss(None)
    }

    fn find(&self, key: &str, headers: &HeaderMap, head: bool) -> Option<Response<ProxyBody>> {
        let variants = self.entries.get(key)?;
        let now = Instant::now();
        let auth = headers.contains_key(header::AUTHORIZATION);
        let s = variants
            .iter()
            .find(|s| s.fits(headers) && now < s.fresh_until && (!auth || s.shared_ok))?;
        let mut resp = Response::new(match head {
            true => empty(),
            false => full(Full::new(s.body.clone())),
        });
        *resp.status_mut() = s.status;
        *resp.headers_mut() = s.headers.clone();
        let age = s.initial_age + now.duration_since(s.stored_at).as_secs();
        let h = resp.headers_mut();
        h.insert(header::AGE, HeaderValue::from(age));
        h.insert(X_MESH_CACHE, HeaderValue::from_static("hit"));
        Some(resp)
    }

    /// Stores `resp` (the answer to the fetch's request, whose headers are
    /// `req`) when it may be, and returns the answer for the client. An
    /// answer that is not stored streams through untouched.
    pub async fn store(
        &self,
        fetch: Fetch,
        req: &HeaderMap,
        resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, String> {
        let Some((fresh_for, shared_ok)) = self.storable(req, &resp) else {
            return Ok(mark(resp, "miss"));
        };
        let (parts, mut body) = resp.into_parts();
        // Read it whole, up to the object limit; beyond it, or with
        // trailers, it is not kept and goes on as it came.
        let limit = self.spec.max_object_bytes as usize;
        let mut read = VecDeque::new();
        let mut size = 0usize;
        let whole = loop {
            match body.frame().await {
                None => break true,
                Some(Err(e)) => return Err(format!("reading the answer to cache it: {e}")),
                Some(Ok(f)) => {
                    size += f.data_ref().map_or(0, Bytes::len);
                    let trailers = f.is_trailers();
                    read.push_back(f);
                    if trailers || size > limit {
                        break false;
                    }
                }
            }
        };
        if !whole {
            return Ok(mark(
                Response::from_parts(parts, Prefixed::wrap(read, body)),
                "miss",
            ));
        }
        let mut bytes = bytes::BytesMut::with_capacity(size);
        for f in read {
            if let Ok(d) = f.into_data() {
                bytes.extend_from_slice(&d);
            }
        }
        let body = bytes.freeze();
        let vary = vary_names(&parts.headers)
            .into_iter()
            .map(|n| {
                let v = req.get(&n).cloned();
                (n, v)
            })
            .collect();
        let mut headers = parts.headers.clone();
        crate::http::headers::strip_hop_by_hop(&mut headers);
        headers.remove(header::AGE);
        let now = Instant::now();
        let stored = Arc::new(Stored {
            status: parts.status,
            headers,
            body: body.clone(),
            vary,
            stored_at: now,
            initial_age: age_of(&parts.headers),
            fresh_until: now + fresh_for,
            shared_ok,
        });
        let mut variants: Vec<Arc<Stored>> = self
            .entries
            .get(&fetch.key)
            .map(|v| {
                v.iter()
                    .filter(|s| s.vary != stored.vary)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        variants.truncate(MAX_VARIANTS - 1);
        variants.insert(0, stored);
        self.entries.insert(fetch.key.clone(), Arc::new(variants));
        drop(fetch);
        let mut resp = Response::from_parts(parts, full(Full::new(body)));
        resp.headers_mut()
            .insert(X_MESH_CACHE, HeaderValue::from_static("miss"));
        Ok(resp)
    }

    /// How long `resp` stays fresh, and whether it may answer requests
    /// with credentials; `None` when it may not be stored.
    fn storable(&self, req: &HeaderMap, resp: &Response<ProxyBody>) -> Option<(Duration, bool)> {
        const STATUSES: [u16; 10] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414];
        if !STATUSES.contains(&resp.status().as_u16()) {
            return None;
        }
        let h = resp.headers();
        if ["no-store", "private", "no-cache"]
            .iter()
            .any(|d| directive(h, d))
            || h.contains_key(header::SET_COOKIE)
            || vary_names(h).iter().any(|n| n.as_str() == "*")
            || h.get_all(header::VARY)
                .iter()
                .any(|v| v.as_bytes().contains(&b'*'))
        {
            return None;
        }
        let len = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if len.is_some_and(|n| n > self.spec.max_object_bytes) {
            return None;
        }
        let s_maxage = seconds(h, "s-maxage");
        let shared_ok = s_maxage.is_some() || directive(h, "public");
        if req.contains_key(header::AUTHORIZATION) && !shared_ok {
            return None;
        }
        let lifetime = match s_maxage.or_else(|| seconds(h, "max-age")) {
            Some(s) => s,
            None => expires_in(h)?,
        };
        let fresh = lifetime.checked_sub(age_of(h))?;
        (fresh > 0).then(|| (Duration::from_secs(fresh), shared_ok))
    }

    /// Drops every stored answer, or those of one key (`host` + target, or
    /// a target alone for every host). The number of keys dropped.
    pub fn purge(&self, key: Option<&str>) -> u64 {
        let mut n = 0;
        let keys: Vec<Arc<String>> = self.entries.iter().map(|(k, _)| k).collect();
        for k in keys {
            let hit = match key {
                None => true,
                Some(want) => {
                    *k == want
                        || (want.starts_with('/') && k.ends_with(want) && {
                            // `host/target`: the host part holds no '/'.
                            !k[..k.len() - want.len()].contains('/')
                        })
                }
            };
            if hit {
                self.entries.invalidate(&*k);
                n += 1;
            }
        }
        n
    }
}

/// Marks an answer with what the cache did.
pub fn mark(mut resp: Response<ProxyBody>, what: &'static str) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(X_MESH_CACHE, HeaderValue::from_static(what));
    resp
}

/// Whether `Cache-Control` holds `name` (as a directive, any case).
fn directive(h: &HeaderMap, name: &str) -> bool {
    cache_control(h).any(|(k, _)| k.eq_ignore_ascii_case(name))
}

/// A `Cache-Control` directive's value in seconds.
fn seconds(h: &HeaderMap, name: &str) -> Option<u64> {
    cache_control(h)
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v?.trim_matches('"').parse().ok())
}

fn cache_control(h: &HeaderMap) -> impl Iterator<Item = (&str, Option<&str>)> {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            let d = d.trim();
            match d.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (d, None),
            }
        })
}

fn vary_names(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

fn age_of(h: &HeaderMap) -> u64 {
    h.get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `Expires` less `Date` (or now), in seconds; an invalid `Expires` is in
/// the past (RFC 9111 §5.3).
fn expires_in(h: &HeaderMap) -> Option<u64> {
    let date = |name| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
    };
    let expires = match h.get(header::EXPIRES) {
        Some(_) => date(header::EXPIRES).unwrap_or(SystemTime::UNIX_EPOCH),
        None => return None,
    };
    let now = date(header::DATE).unwrap_or_else(SystemTime::now);
    expires.duration_since(now).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Cache {
        Cache {
            max_bytes: 1 << 20,
            max_object_bytes: 1 << 10,
        }
    }

    fn answer(cc: &str, body: &'static str, extra: &[(&str, &str)]) -> Response<ProxyBody> {
        let mut r = Response::new(full(Full::new(Bytes::from_static(body.as_bytes()))));
        r.headers_mut()
            .insert(header::CACHE_CONTROL, cc.parse().unwrap());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, body.len().into());
        for (k, v) in extra {
            r.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        r
    }

    async fn fill(c: &Arc<RouteCache>, req: &HeaderMap, resp: Response<ProxyBody>) -> String {
        let Lookup::Miss(Some(f)) = c.lookup(&Method::GET, req, "h/x").await else {
            panic!("expected a miss that leads");
        };
        let r = c.store(f, req, resp).await.unwrap();
        r.headers()[X_MESH_CACHE].to_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn fresh_answers_are_kept_and_the_others_not() {
        let c = Arc::new(RouteCache::new(&spec()));
        let req = HeaderMap::new();
        assert_eq!(fill(&c, &req, answer("max-age=60", "a", &[])).await, "miss");
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Hit(_)
        ));
        assert!(matches!(
            c.lookup(&Method::HEAD, &req, "h/x").await,
            Lookup::Hit(_)
        ));
        assert!(matches!(
            c.lookup(&Method::POST, &req, "h/x").await,
            Lookup::Bypass
        ));
        assert_eq!(c.purge(Some("/x")), 1);
        for cc in ["no-store", "private, max-age=60", "no-cache", "max-age=0"] {
            fill(&c, &req, answer(cc, "a", &[])).await;
            assert!(
                matches!(c.lookup(&Method::GET, &req, "h/x").await, Lookup::Miss(_)),
                "{cc} was stored"
            );
        }
        // Too large for one object.
        let big: &'static str = Box::leak("x".repeat(2000).into_boxed_str());
        fill(&c, &req, answer("max-age=60", big, &[])).await;
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Miss(_)
        ));
    }

    #[tokio::test]
    async fn an_answer_of_unknown_length_too_large_to_keep_goes_on_whole() {
        let c = Arc::new(RouteCache::new(&spec()));
        let req = HeaderMap::new();
        let body = Bytes::from("y".repeat(3000));
        let mut resp = Response::new(full(Full::new(body.clone())));
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, "max-age=60".parse().unwrap());
        let Lookup::Miss(Some(f)) = c.lookup(&Method::GET, &req, "h/x").await else {
            panic!("expected a miss that leads");
        };
        let out = c.store(f, &req, resp).await.unwrap();
        assert_eq!(out.into_body().collect().await.unwrap().to_bytes(), body);
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Miss(_)
        ));
        // Small enough: read whole and kept, even without a length.
        let mut resp = Response::new(full(Full::new(Bytes::from_static(b"small"))));
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, "max-age=60".parse().unwrap());
        let Lookup::Miss(Some(f)) = c.lookup(&Method::GET, &req, "h/x").await else {
            panic!("expected a miss that leads");
        };
        c.store(f, &req, resp).await.unwrap();
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Hit(_)
        ));
    }

    #[tokio::test]
    async fn expires_and_age_set_the_freshness() {
        let c = Arc::new(RouteCache::new(&spec()));
        let req = HeaderMap::new();
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let in_a_minute = httpdate::fmt_http_date(now + Duration::from_secs(60));
        let resp = |cc: &str, extra: &[(&str, &str)]| {
            let mut r = answer(cc, "e", extra);
            if cc.is_empty() {
                r.headers_mut().remove(header::CACHE_CONTROL);
            }
            r
        };
        // Expires a minute after Date: fresh.
        fill(
            &c,
            &req,
            resp("", &[("date", &date), ("expires", &in_a_minute)]),
        )
        .await;
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Hit(_)
        ));
        c.purge(None);
        // An invalid Expires is in the past; max-age wins over Expires.
        fill(&c, &req, resp("", &[("expires", "0")])).await;
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Miss(_)
        ));
        fill(&c, &req, resp("max-age=0", &[("expires", &in_a_minute)])).await;
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Miss(_)
        ));
        // Already older than its max-age when it arrived: not kept.
        fill(&c, &req, resp("max-age=60", &[("age", "120")])).await;
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Miss(_)
        ));
        // No freshness information at all: not kept.
        fill(&c, &req, resp("", &[])).await;
        assert!(matches!(
            c.lookup(&Method::GET, &req, "h/x").await,
            Lookup::Miss(_)
        ));
    }

    #[tokio::test]
    async fn vary_keeps_one_answer_per_value() {
        let c = Arc::new(RouteCache::new(&spec()));
        let mut en = HeaderMap::new();
        en.insert("accept-language", "en".parse().unwrap());
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", "fr".parse().unwrap());
        fill(
            &c,
            &en,
            answer("max-age=60", "hello", &[("vary", "Accept-Language")]),
        )
        .await;
        assert!(matches!(
            c.lookup(&Method::GET, &en, "h/x").await,
            Lookup::Hit(_)
        ));
        let Lookup::Miss(Some(f)) = c.lookup(&Method::GET, &fr, "h/x").await else {
            panic!("fr is another variant");
        };
        c.store(
            f,
            &fr,
            answer("max-age=60", "bonjour", &[("vary", "accept-language")]),
        )
        .await
        .unwrap();
        for (h, want) in [(&en, "hello"), (&fr, "bonjour")] {
            let Lookup::Hit(r) = c.lookup(&Method::GET, h, "h/x").await else {
                panic!("both kept");
            };
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, want);
        }
    }
}
