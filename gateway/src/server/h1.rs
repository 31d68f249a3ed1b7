//! The HTTP/1.1 server side of a client connection, for the requests that
//! make up nearly all mesh traffic. Everything else goes to hyper.
//!
//! hyper's server connection is a general state machine: per request it
//! arms a header-read timer, builds the request through its dispatcher,
//! gives the body a channel, moves the request's future into a boxed slot
//! and encodes the response through generic buffers. On the proxy's hot
//! path that was about a third of the user-space instructions per request.
//! Here the connection's own task parses the head with `httparse` into an
//! [`http::Request`], reads a small body whole, awaits the handler in place
//! and writes the response itself, usually head and body in one write.
//!
//! **Served here:** HTTP/1.1 requests (not `CONNECT`) with no body or a
//! `content-length` of at most [`MAX_BODY`] bytes, and no
//! `transfer-encoding`, `expect` or upgrade; pipelined requests, in order;
//! `connection: close`.
//!
//! **Handed to hyper:** anything else ends the fast path. That covers:
//! - a chunked or larger upload, and `Expect: 100-continue`;
//! - upgrades (WebSocket, h2c) and HTTP/1.0;
//! - the HTTP/2 preface;
//! - more than [`MAX_HEADERS`] headers;
//! - a `connection` value that is not visible ASCII (hyper reads no token
//!   from it);
//! - any head that hyper would refuse with 400 or 431.
//!
//! [`serve`] then returns the bytes it has read and not served, and the
//! listener ([`crate::server`]) gives the connection to hyper for the rest
//! of its life, those bytes first (to hyper's HTTP/1 alone once a request
//! was served here). Hyper's behaviour, including its
//! answers to malformed input, is kept for all of them.
//!
//! **Timeouts:** a request's head, and a body read here, must arrive whole
//! within [`Limits::request_read`] once its first byte is in. A keep-alive
//! connection idle for [`Limits::keep_alive_idle`] is closed. Each
//! connection has one timer, moved forward lazily rather than re-armed per
//! request.
//!
//! **Idle connections hold no buffers.** A plaintext keep-alive connection
//! idle for [`RELEASE_IDLE`] gives its read and write buffers back and
//! waits for the socket to become readable without one (as nginx and
//! HAProxy do); they are allocated again when the client sends. A busy
//! connection keeps them (the release point rides on the same lazy
//! timer, so it costs nothing per request). Over TLS they are kept: the
//! session may hold decrypted bytes the socket's readiness cannot show.
//! The request's future is boxed, so the connection's task is small
//! while it waits (inline, the whole proxy path sized every task).
//!
//! **Response framing** (RFC 9112 §6):
//! - no body for `HEAD`, 1xx, 204 and 304;
//! - `content-length` when the body's size is known;
//! - otherwise chunked, with trailers.
//!
//! A `date` header is added when the response has none. It is formatted
//! once a second per thread.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Body;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::http::body::{ProxyBody, RequestBody};
use crate::http::headers::ConnectionTokens;
use crate::http::wire::{write_field, write_last_chunk, ChunkSize, Span};
use crate::server::client_io::ClientIo;
use crate::server::{wait_true, Peer};

/// Most request headers parsed here; a request with more goes to hyper
/// (which takes 100).
pub(crate) const MAX_HEADERS: usize = 64;
/// Request bodies with a `content-length` up to this size are read whole
/// here (the proxy buffers them for replay anyway); larger ones stream
/// through hyper.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// Headers the proxy adds to a request on its way (`x-mesh-hops`,
/// `x-request-id`, `traceparent`, `x-forwarded-for`, and a few more).
const ADDED_HEADERS: usize = 6;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Response data up to this size is gathered into one write.
const COALESCE: usize = 64 * 1024;
/// A plaintext keep-alive connection idle this long releases its buffers.
pub(crate) const RELEASE_IDLE: Duration = Duration::from_secs(1);
/// How late the keep-alive deadline may fire: the timer is moved at most
/// once per this much time instead of once per request.
const TIMER_SLACK: Duration = Duration::from_secs(1);

/// While stopping, how long an idle keep-alive connection is kept open
/// for a request its client may have sent already: answered (with
/// `connection: close`), where closing would fail it.
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// The limits of client connections (every listener: the fast path,
/// hyper's HTTP/1.1 and HTTP/2).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's head (and a body read here) must arrive whole within
    /// this, counted from when its first byte is in.
    pub request_read: Duration,
    /// An idle keep-alive connection is closed after this. Longer than
    /// the upstream pool's idle time (60 s), so a pooled client closes
    /// first.
    pub keep_alive_idle: Duration,
    /// Largest request head (request line, headers and the blank line);
    /// a larger one gets 431 and a closed connection. HTTP/2: the largest
    /// header list (RFC 9113's size: names, values and 32 per field).
    pub max_head: usize,
    /// A client that takes no byte of an answer for this long is cut off
    /// ([`crate::server::client_io`]).
    pub write_timeout: Duration,
    /// `false`: every connection goes to hyper (the differential test of
    /// the fast path against hyper).
    pub(crate) fast_path: bool,
}

/// [`Limits::max_head`] by default: nginx's total (4 buffers of 8 KiB),
/// below Envoy's 60 KiB.
pub const DEFAULT_MAX_HEAD: usize = 32 * 1024;
/// Smallest [`Limits::max_head`] (hyper's smallest read buffer).
pub const MIN_MAX_HEAD: usize = 8 * 1024;
/// [`Limits::write_timeout`] by default (nginx's `send_timeout`).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_read: Duration::from_secs(10),
            keep_alive_idle: Duration::from_secs(75),
            max_head: DEFAULT_MAX_HEAD,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            fast_path: true,
        }
    }
}

/// How a connection's fast path ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Closed, or to be closed.
    Closed,
    /// The rest of the connection is hyper's: these bytes were read and not
    /// served, and come first. `served`: a request was served here first,
    /// so the connection is HTTP/1.1 for good (an HTTP/2 preface now is
    /// not one).
    HandOff { read: BytesMut, served: bool },
}

/// Serves requests on `io` with `handler` until the connection ends,
/// shutdown is signalled while it is idle, or a request needs hyper.
pub(crate) async fn serve<H, F>(
    io: &mut ClientIo,
    peer: &Peer,
    handler: &H,
    shutdown: &mut watch::Receiver<bool>,
    limits: Limits,
) -> End
where
    H: Fn(Peer, Request<RequestBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = Vec::with_capacity(READ_CHUNK);
    let timer = tokio::time::sleep(limits.keep_alive_idle);
    let shut = wait_true(shutdown);
    tokio::pin!(timer, shut);
    let mut stopping = false;
    // Once stopping: how long an idle connection is kept for a request its
    // client may already be sending (answered, then closed) rather than
    // cut under it.
    let mut drain_until = None;
    let mut served = false;
    loop {
        let mut head_deadline = None;
        let head = loop {
            if !rbuf.is_empty() {
                let before = rbuf.len();
                match parse(&mut rbuf) {
                    // The head's length is what parsing consumed.
                    Parse::Head(_) if before - rbuf.len() > limits.max_head => {
                        return head_too_large(io, &mut wbuf).await
                    }
                    Parse::Head(h) => break h,
                    Parse::HandOff => return End::HandOff { read: rbuf, served },
                    Parse::Partial if rbuf.len() > limits.max_head => {
                        return head_too_large(io, &mut wbuf).await
                    }
                    Parse::Partial => {}
                }
            }
            let idle = rbuf.is_empty();
            // One clock read for both of an idle wait's points.
            let idle_since = idle.then(Instant::now);
            let deadline = if let Some(now) = idle_since {
                match drain_until {
                    Some(t) => t,
                    None => now + limits.keep_alive_idle,
                }
            } else {
                *head_deadline.get_or_insert_with(|| Instant::now() + limits.request_read)
            };
            let shut = (!stopping).then_some(shut.as_mut());
            let filled = if rbuf.capacity() == 0 {
                // Released while idle: wait for the client without a buffer.
                let r = readable(io, timer.as_mut(), deadline, shut).await;
                rbuf.reserve(READ_CHUNK);
                wbuf.reserve(READ_CHUNK);
                r
            } else {
                // Idle: first until the release point (see the module docs).
                let release = idle_since
                    .filter(|_| io.can_wait_unbuffered())
                    .map(|now| now + RELEASE_IDLE)
                    .filter(|at| *at < deadline);
                match fill(
                    io,
                    &mut rbuf,
                    timer.as_mut(),
                    release.unwrap_or(deadline),
                    shut,
                )
                .await
                {
                    Fill::TimedOut if release.is_some() && Instant::now() < deadline => {
                        rbuf = BytesMut::new();
                        wbuf = Vec::new();
                        io.note_released();
                        Fill::Data
                    }
                    r => r,
                }
            };
            match filled {
                Fill::Data => {}
                Fill::Stopping => {
                    stopping = true;
                    drain_until = Some(Instant::now() + DRAIN_IDLE.min(limits.keep_alive_idle));
                }
                Fill::Closed | Fill::TimedOut => return End::Closed,
            }
        };
        let Head {
            parts,
            body_len,
            close,
        } = head;
        let body = if body_len == 0 {
            RequestBody::empty()
        } else {
            let deadline = head_deadline.unwrap_or_else(|| Instant::now() + limits.request_read);
            while rbuf.len() < body_len {
                match fill(
                    io,
                    &mut rbuf,
                    timer.as_mut(),
                    deadline,
                    None::<Pin<&mut std::future::Ready<()>>>,
                )
                .await
                {
                    Fill::Data => {}
                    _ => return End::Closed,
                }
            }
            RequestBody::Whole(Some(rbuf.split_to(body_len).freeze()))
        };
        let head_only = parts.method == Method::HEAD;
        // Boxed: held inline, the request's future (the whole proxy path)
        // would size the connection's task, idle or not (see the module
        // docs on idle connections).
        let resp = super::boxed(|| handler(peer.clone(), Request::from_parts(parts, body))).await;
        // The handler may close the connection (a malformed request).
        let closes = resp
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| ConnectionTokens::of(v.as_bytes()).close);
        let keep_alive = !close && !stopping && !closes;
        match write_response(io, &mut wbuf, resp, head_only, !keep_alive).await {
            Ok(()) if keep_alive => served = true,
            Ok(()) => return End::Closed,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e, "response not written whole; closing");
                return End::Closed;
            }
        }
    }
}

/// The answer to a request head over [`Limits::max_head`]: 431 and a
/// closed connection, as hyper gives it on the paths it serves.
async fn head_too_large(io: &mut ClientIo, wbuf: &mut Vec<u8>) -> End {
    wbuf.clear();
    wbuf.extend_from_slice(
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n",
    );
    write_date(wbuf);
    wbuf.extend_from_slice(b"\r\n");
    let _ = io.write_all(wbuf).await;
    End::Closed
}

/// What waiting for bytes ended with.
enum Fill {
    Data,
    /// The peer closed (or the socket failed).
    Closed,
    TimedOut,
    /// Shutdown was signalled.
    Stopping,
}

/// Reads more bytes into `rbuf`, until `deadline` or (when given) until
/// `shut` completes. The timer is moved only when the deadline is earlier
/// or more than [`TIMER_SLACK`] later than where it stands.
async fn fill<S: Future<Output = ()>>(
    io: &mut ClientIo,
    rbuf: &mut BytesMut,
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    mut shut: Option<Pin<&mut S>>,
) -> Fill {
    let at = timer.deadline();
    if deadline < at || deadline > at + TIMER_SLACK {
        timer.as_mut().reset(deadline);
    }
    if rbuf.capacity() - rbuf.len() < READ_CHUNK / 2 {
        rbuf.reserve(READ_CHUNK);
    }
    poll_fn(
        |cx| match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Fill::Closed),
            Poll::Ready(Ok(_)) => Poll::Ready(Fill::Data),
            Poll::Pending => poll_stop(cx, &mut shut, timer.as_mut(), deadline),
        },
    )
    .await
}

/// While waiting for bytes: `Stopping` once `shut` completes, `TimedOut`
/// at `deadline`. The timer may stand up to [`TIMER_SLACK`] before the
/// deadline: when it fires early it is re-aimed, and only the deadline
/// times out.
fn poll_stop<S: Future<Output = ()>>(
    cx: &mut std::task::Context<'_>,
    shut: &mut Option<Pin<&mut S>>,
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
) -> Poll<Fill> {
    if let Some(s) = shut.as_mut() {
        if s.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Fill::Stopping);
        }
    }
    while timer.as_mut().poll(cx).is_ready() {
        if Instant::now() >= deadline {
            return Poll::Ready(Fill::TimedOut);
        }
        timer.as_mut().reset(deadline);
    }
    Poll::Pending
}

/// [`fill`] without a buffer: until the client has sent something (or
/// closed: the read that follows tells), `deadline`, or `shut`. Only for a
/// connection that [`ClientIo::can_wait_unbuffered`].
async fn readable<S: Future<Output = ()>>(
    io: &mut ClientIo,
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    mut shut: Option<Pin<&mut S>>,
) -> Fill {
    if deadline < timer.deadline() {
        timer.as_mut().reset(deadline);
    }
    poll_fn(|cx| match io.poll_readable(cx) {
        Some(Poll::Ready(Ok(()))) => Poll::Ready(Fill::Data),
        Some(Poll::Ready(Err(_))) | None => Poll::Ready(Fill::Closed),
        Some(Poll::Pending) => poll_stop(cx, &mut shut, timer.as_mut(), deadline),
    })
    .await
}

/// The span of a header left out of the request's map (no header starts
/// at offset 0: the request line does).
const SKIP: Span = Span::EMPTY;

/// A request head served here.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) parts: http::request::Parts,
    /// The body's `content-length` (at most [`MAX_BODY`]).
    pub(crate) body_len: usize,
    /// `connection: close`.
    pub(crate) close: bool,
}

// Not boxed: a head is parsed for every request, and a box would be an
// allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Parse {
    Head(Head),
    /// More bytes are needed.
    Partial,
    /// Not served here; `rbuf` is left as it was.
    HandOff,
}

/// Parses one request head from the start of `rbuf` and consumes it when
/// it is served here.
pub(crate) fn parse(rbuf: &mut BytesMut) -> Parse {
    // (name start, name end, value start, value end) in the head.
    let mut spans = [Span::EMPTY; MAX_HEADERS];
    let (len, method, path, count, body_len, close) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            rbuf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Parse::Partial,
            Err(_) => return Parse::HandOff,
        };
        if req.version != Some(1) {
            return Parse::HandOff;
        }
        let method = match Method::from_bytes(req.method.unwrap_or_default().as_bytes()) {
            Ok(m) if m != Method::CONNECT => m,
            _ => return Parse::HandOff,
        };
        let base = rbuf.as_ptr() as usize;
        let target = req.path.unwrap_or_default();
        let ps = target.as_ptr() as usize - base;
        let path = (ps, ps + target.len());
        let mut length: Option<usize> = None;
        let mut close = false;
        for (span, h) in spans.iter_mut().zip(req.headers.iter()) {
            let name = h.name.as_bytes();
            let value = h.value;
            match name.len() {
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    match (length, content_length(value)) {
                        (None, Some(n)) if n <= MAX_BODY => length = Some(n),
                        _ => return Parse::HandOff,
                    }
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => return Parse::HandOff,
                6 if name.eq_ignore_ascii_case(b"expect") => return Parse::HandOff,
                7 if name.eq_ignore_ascii_case(b"upgrade") => return Parse::HandOff,
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    // A value hyper reads no token from (not visible
                    // ASCII) is its to judge, as on every other path.
                    if !value
                        .iter()
                        .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
                    {
                        return Parse::HandOff;
                    }
                    let t = ConnectionTokens::of(value);
                    if t.upgrade {
                        return Parse::HandOff;
                    }
                    close |= t.close;
                    if t.only_persistence() {
                        // Said all it has to say here; named headers stay
                        // for the proxy to strip.
                        *span = SKIP;
                        continue;
                    }
                }
                _ => {}
            }
            *span = Span::of(base, h);
        }
        (
            len,
            method,
            path,
            req.headers.len(),
            length.unwrap_or(0),
            close,
        )
    };
    let head = rbuf.split_to(len).freeze();
    // What httparse lets through and `http` refuses goes to hyper, with
    // the buffer as it was.
    let give_back = |rbuf: &mut BytesMut| {
        let mut whole = BytesMut::with_capacity(head.len() + rbuf.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(rbuf);
        *rbuf = whole;
        Parse::HandOff
    };
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0..path.1)) else {
        return give_back(rbuf);
    };
    // Room for the headers the request path adds (hops, ids, forwarded-for)
    // without growing the table: each growth rehashes it.
    let mut headers = HeaderMap::with_capacity(count + ADDED_HEADERS);
    for span in &spans[..count] {
        if *span == SKIP {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(&head[span.name()]) else {
            return give_back(rbuf);
        };
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(span.value())) else {
            return give_back(rbuf);
        };
        headers.append(name, value);
    }
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Parse::Head(Head {
        parts,
        body_len,
        close,
    })
}

/// A `content-length` value of digits only (no sign, no list).
pub(crate) fn content_length(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0')))
}

/// How a response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body is sent (`HEAD`, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// The framing of a response, and whether a `content-length` header it
/// carries is written as it is (else it is left out, and the framing
/// writes its own).
pub(crate) fn framing(
    status: StatusCode,
    head_only: bool,
    h: &HeaderMap,
    hint: Option<u64>,
) -> (Framing, bool) {
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        return (Framing::None, false);
    }
    if status == StatusCode::NOT_MODIFIED {
        return (Framing::None, true);
    }
    let announced = h.get(header::CONTENT_LENGTH);
    if head_only {
        // The headers describe the body a GET would get.
        return match (announced, hint) {
            (None, Some(n)) => (Framing::Length(n), false),
            _ => (Framing::None, true),
        };
    }
    if let Some(n) = hint {
        return (Framing::Length(n), false);
    }
    match announced.and_then(|v| content_length(v.as_bytes())) {
        Some(n) => (Framing::Length(n as u64), false),
        None => (Framing::Chunked, false),
    }
}

/// Writes the status line and headers, with the framing's own headers.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    framing: Framing,
    keep_length: bool,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || (name == header::CONTENT_LENGTH && !keep_length)
        {
            continue;
        }
        has_date |= name == header::DATE;
        write_field(out, name, value);
    }
    if !has_date {
        write_date(out);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a response: head and body, gathered into as few writes as the
/// body's pace allows (a frame that is not ready flushes what is waiting).
async fn write_response(
    io: &mut ClientIo,
    wbuf: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let (parts, mut body) = resp.into_parts();
    let (framing, keep_length) = framing(
        parts.status,
        head_only,
        &parts.headers,
        body.size_hint().exact(),
    );
    wbuf.clear();
    encode_head(wbuf, &parts, framing, keep_length, close);
    if head_only || framing == Framing::None {
        drop(body);
        return io.write_all(wbuf).await;
    }
    let chunked = framing == Framing::Chunked;
    let mut left = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    let mut trailers = None;
    loop {
        let step = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending if !wbuf.is_empty() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
        })
        .await;
        let frame = match step {
            // The body is not ready: send what is waiting meanwhile.
            None => {
                io.write_all(wbuf).await?;
                wbuf.clear();
                continue;
            }
            Some(None) => break,
            Some(Some(Ok(frame))) => frame,
            Some(Some(Err(e))) => {
                io.write_all(wbuf).await?;
                return Err(io::Error::other(format!("response body: {e}")));
            }
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if let Some(left) = &mut left {
            if data.len() as u64 > *left {
                io.write_all(wbuf).await?;
                return Err(io::Error::other("response body longer than its length"));
            }
            *left -= data.len() as u64;
        }
        if chunked {
            wbuf.extend_from_slice(ChunkSize::new(data.len()).as_ref());
        }
        if wbuf.len() + data.len() <= COALESCE {
            wbuf.extend_from_slice(&data);
        } else {
            io.write_all_buf(&mut (&wbuf[..]).chain(data)).await?;
            wbuf.clear();
        }
        if chunked {
            wbuf.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        write_last_chunk(wbuf, trailers.as_ref());
    }
    io.write_all(wbuf).await?;
    wbuf.clear();
    match left {
        Some(n) if n > 0 => Err(io::Error::other(format!(
            "response body ended {n} bytes short of its length"
        ))),
        _ => Ok(()),
    }
}

/// Writes a `date` header with the current time, formatted at most once a
/// second per thread.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Notify;

    use super::*;
    use crate::http::body::full;
    use crate::http::wire::test_util::take_message;

    /// Answers `METHOD target body` (the body it received), with the
    /// number of request headers in `x-headers`; `/204` answers 204,
    /// `/wait` signals `entered` and waits for `release` first, `/big`
    /// answers [`BIG`] bytes.
    async fn echo(req: Request<RequestBody>, gate: Arc<(Notify, Notify)>) -> Response<ProxyBody> {
        if req.uri().path() == "/wait" {
            gate.0.notify_one();
            gate.1.notified().await;
        }
        if req.uri().path() == "/big" {
            return Response::new(full(Full::new(Bytes::from(vec![b'x'; BIG]))));
        }
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let text = format!(
            "{} {} {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        );
        let mut resp = Response::new(full(Full::new(Bytes::from(text))));
        resp.headers_mut()
            .insert("x-headers", HeaderValue::from(parts.headers.len()));
        if parts.uri.path() == "/204" {
            *resp.status_mut() = StatusCode::NO_CONTENT;
        }
        resp
    }

    /// More than the socket buffers on both sides hold.
    const BIG: usize = 64 << 20;

    struct Server {
        port: u16,
        stop: watch::Sender<bool>,
        /// (entered, release) for `/wait`.
        gate: Arc<(Notify, Notify)>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn server(limits: Limits) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (stop, rx) = watch::channel(false);
        let gate = Arc::new((Notify::new(), Notify::new()));
        let r = gate.clone();
        let handler = move |_peer, req| echo(req, r.clone());
        let task = tokio::spawn(crate::server::serve(
            "test",
            l,
            handler,
            rx,
            Duration::from_secs(10),
            limits,
            None,
        ));
        Server {
            port,
            stop,
            gate,
            task,
        }
    }

    async fn connect(port: u16) -> TcpStream {
        TcpStream::connect(("127.0.0.1", port)).await.unwrap()
    }

    /// Everything the server writes until it closes (bounded wait).
    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads until `n` complete responses (heads with content-length
    /// bodies, or bodiless) are in; returns them.
    async fn read_responses(s: &mut TcpStream, n: usize) -> Vec<String> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            if let Some(msg) = take_message(&mut buf) {
                out.push(String::from_utf8_lossy(&msg).into_owned());
                continue;
            }
            let mut chunk = [0u8; 4096];
            let got = tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .expect("responses arrive")
                .unwrap();
            assert!(got > 0, "closed after {} responses: {out:?}", out.len());
            buf.extend_from_slice(&chunk[..got]);
        }
        assert!(buf.is_empty(), "stray bytes after the responses: {buf:?}");
        out
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n").unwrap().1
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_then_close_is_honoured() {
        let srv = server(Limits::default()).await;
        let mut s = connect(srv.port).await;
        s.write_all(
            b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let out = read_to_close(&mut s).await;
        let parts: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(parts.len(), 3, "{out}");
        assert!(parts[0].starts_with("200 OK\r\n"), "{out}");
        assert!(parts[0].ends_with("\r\n\r\nGET /a?x=1 "), "{out}");
        assert!(parts[1].ends_with("\r\n\r\nPOST /b hello"), "{out}");
        assert!(parts[2].contains("connection: close\r\n"), "{out}");
        assert!(parts[2].ends_with("\r\n\r\nGET /c "), "{out}");
        for p in &parts {
            assert!(p.contains("\r\ndate: "), "a date is added: {p}");
            assert!(p.contains("\r\nx-headers: "), "{p}");
        }
    }

    #[tokio::test]
    async fn a_request_arriving_byte_by_byte_is_served() {
        let srv = server(Limits::default()).await;
        let mut s = connect(srv.port).await;
        let req = b"PUT /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc";
        for b in req {
            s.write_all(&[*b]).await.unwrap();
            s.flush().await.unwrap();
        }
        let out = read_responses(&mut s, 1).await;
        assert_eq!(body(&out[0]), "PUT /slow abc");
        assert!(out[0].contains("content-length: 13\r\n"), "{}", out[0]);
    }

    #[tokio::test]
    async fn head_and_204_answers_carry_no_body_and_the_connection_goes_on() {
        let srv = server(Limits::default()).await;
        let mut s = connect(srv.port).await;
        s.write_all(
            b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n\
              GET /204 HTTP/1.1\r\nHost: h\r\n\r\n\
              GET /after HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        .await
        .unwrap();
        // (read_responses would wait for the HEAD answer's announced body.)
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&buf).contains("GET /after ") {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .expect("answers arrive")
                .unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let out = String::from_utf8_lossy(&buf).into_owned();
        let parts: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(parts.len(), 3, "{out}");
        // HEAD: the length a GET would get, and no body.
        assert!(parts[0].starts_with("200 OK\r\n"), "{out}");
        assert!(parts[0].contains("content-length: 8\r\n"), "{out}");
        assert!(parts[0].ends_with("\r\n\r\n"), "{out}");
        // 204: neither a length nor a body.
        assert!(parts[1].starts_with("204 No Content\r\n"), "{out}");
        assert!(!parts[1].contains("content-length"), "{out}");
        assert!(parts[1].ends_with("\r\n\r\n"), "{out}");
        assert!(parts[2].ends_with("\r\n\r\nGET /after "), "{out}");
    }

    #[tokio::test]
    async fn requests_left_to_hyper_are_served_on_the_same_connection() {
        let srv = server(Limits::default()).await;
        let mut s = connect(srv.port).await;
        // Fast path, then a chunked upload (hyper from here on), then a
        // plain request hyper serves too.
        s.write_all(
            b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n\
              POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
              GET /third HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        .await
        .unwrap();
        let out = read_responses(&mut s, 3).await;
        assert_eq!(body(&out[0]), "GET /first ");
        assert_eq!(body(&out[1]), "POST /chunked abcde");
        assert_eq!(body(&out[2]), "GET /third ");
        // Malformed input after a request served here: hyper's 400, closed.
        let mut s = connect(srv.port).await;
        s.write_all(
            b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        )
        .await
        .unwrap();
        let out = read_to_close(&mut s).await;
        let parts: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(parts.len(), 2, "{out}");
        assert!(parts[0].ends_with("GET /ok "), "{out}");
        assert!(parts[1].starts_with("400"), "{out}");
    }

    #[tokio::test]
    async fn http2_by_prior_knowledge_goes_to_hyper() {
        let srv = server(Limits::default()).await;
        let io = hyper_util::rt::TokioIo::new(connect(srv.port).await);
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post(format!("http://127.0.0.1:{}/h2", srv.port))
            .body(Full::new(Bytes::from_static(b"over h2")))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &got[..],
            format!("POST http://127.0.0.1:{}/h2 over h2", srv.port).as_bytes()
        );
    }

    #[tokio::test]
    async fn an_idle_connection_gives_its_buffers_back_and_serves_on() {
        let srv = server(Limits::default()).await;
        let released = || crate::server::client_io::released(srv.port);
        let mut s = connect(srv.port).await;
        s.write_all(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(body(&read_responses(&mut s, 1).await[0]), "GET /one ");
        crate::testing::eventually("the idle connection releases its buffers", || {
            released() == 1
        })
        .await;
        // Served on: a head longer than a read step, with a second request
        // pipelined behind it, and a body read whole.
        let long = "x".repeat(3 * READ_CHUNK);
        s.write_all(
            format!(
                "GET /two HTTP/1.1\r\nHost: h\r\nx-long: {long}\r\n\r\n\
                 POST /three HTTP/1.1\r\nHost: h\r\ncontent-length: 5\r\n\r\nabcde"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let out = read_responses(&mut s, 2).await;
        assert_eq!(body(&out[0]), "GET /two ");
        assert_eq!(body(&out[1]), "POST /three abcde");
        // Released again; then the client goes away and the connection ends.
        crate::testing::eventually("released a second time", || released() == 2).await;
        drop(s);
        crate::testing::eventually("the connection ends", || {
            crate::server::client_io::open(srv.port) == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_slow_head_and_an_idle_connection_are_closed() {
        let srv = server(Limits {
            request_read: Duration::from_millis(200),
            keep_alive_idle: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        // Half a head, never finished: closed without an answer.
        let mut s = connect(srv.port).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        assert_eq!(read_to_close(&mut s).await, "");
        // One request, then nothing: answered, then closed.
        let mut s = connect(srv.port).await;
        s.write_all(b"GET /once HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let out = read_to_close(&mut s).await;
        assert!(out.ends_with("\r\n\r\nGET /once "), "{out}");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_finishes_requests_in_flight() {
        let srv = server(Limits::default()).await;
        let mut idle = connect(srv.port).await;
        idle.write_all(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        read_responses(&mut idle, 1).await;
        let mut late = connect(srv.port).await;
        late.write_all(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        read_responses(&mut late, 1).await;
        let mut busy = connect(srv.port).await;
        busy.write_all(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), srv.gate.0.notified())
            .await
            .expect("the request reaches the handler");
        // The idle connection closes once shutdown is signalled (after
        // `DRAIN_IDLE`), while the request in flight is still held; a
        // request sent on an idle connection meanwhile is answered, then
        // the connection closes.
        srv.stop.send(true).unwrap();
        late.write_all(b"GET /late HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let out = read_to_close(&mut late).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nGET /late "), "{out}");
        assert_eq!(read_to_close(&mut idle).await, "");
        srv.gate.1.notify_one();
        let out = read_to_close(&mut busy).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nGET /wait "), "{out}");
        tokio::time::timeout(Duration::from_secs(10), srv.task)
            .await
            .expect("the listener finishes draining")
            .unwrap();
    }

    #[test]
    fn requests_outside_the_fast_path_are_handed_off_untouched() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT svc:80 HTTP/1.1\r\nHost: svc\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        ];
        for case in cases {
            let mut buf = BytesMut::from(&case[..]);
            assert!(matches!(parse(&mut buf), Parse::HandOff), "{case:?}");
            assert_eq!(&buf[..], &case[..], "left as it was");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert!(matches!(parse(&mut buf), Parse::HandOff));
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a"[..]);
        assert!(matches!(parse(&mut buf), Parse::Partial));
    }

    #[test]
    fn a_served_head_is_parsed_and_consumed() {
        let mut buf = BytesMut::from(
            &b"DELETE /x/y?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\nConnection: Close\r\n\r\nokNEXT"[..],
        );
        let Parse::Head(head) = parse(&mut buf) else {
            panic!("served here")
        };
        assert_eq!(&buf[..], b"okNEXT");
        assert_eq!(head.parts.method, Method::DELETE);
        assert_eq!(head.parts.uri, "/x/y?q=1");
        assert_eq!(head.parts.headers.get_all("x-a").iter().count(), 2);
        assert_eq!((head.body_len, head.close), (2, true));
    }

    #[test]
    fn response_framing_follows_status_method_and_size() {
        let none = HeaderMap::new();
        let mut sized = HeaderMap::new();
        sized.insert(header::CONTENT_LENGTH, HeaderValue::from(10));
        let ok = StatusCode::OK;
        let cases = [
            // (status, HEAD, headers, exact size) -> (framing, keep its length)
            ((ok, false, &none, Some(5)), (Framing::Length(5), false)),
            ((ok, false, &none, None), (Framing::Chunked, false)),
            ((ok, false, &sized, None), (Framing::Length(10), false)),
            ((ok, false, &sized, Some(10)), (Framing::Length(10), false)),
            ((ok, true, &sized, Some(0)), (Framing::None, true)),
            ((ok, true, &none, Some(3)), (Framing::Length(3), false)),
            (
                (StatusCode::NO_CONTENT, false, &sized, Some(0)),
                (Framing::None, false),
            ),
            (
                (StatusCode::NOT_MODIFIED, false, &sized, Some(0)),
                (Framing::None, true),
            ),
        ];
        for ((status, head, h, hint), want) in cases {
            assert_eq!(
                framing(status, head, h, hint),
                want,
                "{status} head={head} {h:?} {hint:?}"
            );
        }
    }

    /// The largest request head is `max_head` bytes, on the fast path and
    /// on hyper's (an HTTP/1.0 request goes there): one byte more gets 431
    /// and a closed connection.
    #[tokio::test]
    async fn a_head_over_the_limit_gets_431() {
        let srv = server(Limits::default()).await;
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let head = |len: usize| {
                let start = format!("GET / {version}\r\nhost: a\r\nconnection: close\r\nx-pad: ");
                let pad = len - start.len() - 4;
                format!("{start}{}\r\n\r\n", "p".repeat(pad))
            };
            let fits = head(DEFAULT_MAX_HEAD);
            assert_eq!(fits.len(), DEFAULT_MAX_HEAD);
            let mut s = connect(srv.port).await;
            s.write_all(fits.as_bytes()).await.unwrap();
            let answer = read_to_close(&mut s).await;
            assert!(
                answer.starts_with(&format!("{version} 200")) || answer.starts_with("HTTP/1.1 200"),
                "{version}: {answer}"
            );
            let mut s = connect(srv.port).await;
            s.write_all(head(DEFAULT_MAX_HEAD + 1).as_bytes())
                .await
                .unwrap();
            let answer = read_to_close(&mut s).await;
            assert!(answer.starts_with("HTTP/1.1 431"), "{version}: {answer}");
        }
        // Sent in small pieces, a head over the limit is refused once the
        // limit is passed, without waiting for its end.
        let mut s = connect(srv.port).await;
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n").await.unwrap();
        for _ in 0..=DEFAULT_MAX_HEAD / 1024 {
            if s.write_all(&[b'x'; 1024]).await.is_err() {
                break;
            }
        }
        assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 431"));
    }

    /// A client that stops reading an answer is cut off after the write
    /// timeout, on the fast path and on hyper's.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        let srv = server(Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let mut s = connect(srv.port).await;
            s.write_all(format!("GET /big {version}\r\nhost: a\r\n\r\n").as_bytes())
                .await
                .unwrap();
            // Not reading: the server's writes stall, then it gives up and
            // drops the connection (it cannot have written the answer whole).
            let open = || crate::server::client_io::open(srv.port);
            let gave_up = async {
                // Accepted (it stays open at least the write timeout)...
                while open() == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // ...then dropped.
                while open() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(30), gave_up)
                .await
                .unwrap_or_else(|_| panic!("{version}: the server still writes after 30 s"));
            // Reading now finds the end (or a reset) well before all of it.
            let mut got = 0usize;
            let mut chunk = vec![0u8; 1 << 16];
            let ended = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "{version}: the connection stays open");
            assert!(
                got < BIG,
                "{version}: the whole answer arrived ({got} bytes)"
            );
        }
    }

    /// After an answer that closes the connection, bytes the client
    /// pipelined behind its request are drained rather than left unread:
    /// closing with unread bytes makes the kernel reset the connection,
    /// and a reset discards what is still in the send buffer (the tail of
    /// a large answer). The client reads the whole answer.
    #[tokio::test]
    async fn a_closing_answer_survives_pipelined_bytes() {
        let srv = server(Limits::default()).await;
        for _ in 0..5 {
            let mut s = connect(srv.port).await;
            let mut req = b"GET /big HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n".to_vec();
            // Pipelined after it: more than the server reads with the head.
            req.extend(std::iter::repeat_n(b'z', 256 * 1024));
            let (mut rd, mut wr) = s.split();
            let write = async {
                let _ = wr.write_all(&req).await;
            };
            let read = async {
                let mut out = Vec::new();
                let r = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut out))
                    .await
                    .expect("closed in time");
                (r.map_err(|e| e.to_string()), out)
            };
            let ((), (r, answer)) = tokio::join!(write, read);
            let head_end = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |p| p + 4);
            assert_eq!(
                (r.map(|_| ()), answer.len() - head_end),
                (Ok(()), BIG),
                "the whole answer, then the end"
            );
        }
    }
}
