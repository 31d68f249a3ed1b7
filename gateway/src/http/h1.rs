//! The HTTP/1.1 client side of an upstream exchange, driven from the
//! request's own task.
//!
//! hyper's client connection runs as a task of its own: every request
//! crosses a channel to it and its response comes back on a oneshot, its
//! body through another channel, and the connection's state machine is
//! polled apart from the request. On the gateway's hot path that was about
//! a third of the user-space instructions per proxied request (callgrind).
//! Here the request's task writes the request and parses the response on
//! the socket itself, and the response body reads straight from it, so an
//! exchange is a write, a read and no hand-off.
//!
//! What it does, per RFC 9112:
//! - the request head from the [`http::Request`] parts, with framing
//!   chosen from the body: `content-length` when the size is known (an
//!   in-memory body goes out in the same write as the head), otherwise
//!   `transfer-encoding: chunked` (with trailers);
//! - while a body streams, the response is watched for: an early final
//!   answer (a 413, a 401) stops the upload and the connection is not
//!   reused; `1xx` interim answers are skipped;
//! - the response head parsed by `httparse` (at most 100 headers and
//!   64 KiB), values sliced from the read buffer without copies;
//! - the response body framed by status, `transfer-encoding` (chunked,
//!   with trailers) or `content-length`, else read to the connection's end;
//!   conflicting lengths are refused; `connection: close`, HTTP/1.0
//!   without keep-alive, a close-delimited body or bytes past the body's
//!   end make the connection single-use.
//!
//! Over TLS (a service's `tls`, [`ClientTls`]) the same exchange runs on
//! the TLS stream; plaintext stays on the bare socket.
//!
//! Upgrades and `CONNECT` tunnels still use hyper's client (one exchange
//! per connection, see [`crate::upstream::attempt::upgrade`]).

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::http::body::ProxyBody;
use crate::http::headers::ConnectionTokens;
use crate::http::limit::ConnSlot;
use crate::http::wire::{write_field, write_last_chunk, ChunkSize, Span};
use crate::tls::ClientTls;

/// Most response headers accepted (as hyper's client).
const MAX_HEADERS: usize = 100;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line or trailer section accepted.
const MAX_CHUNK_META: usize = 64 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// In-memory request bodies up to this size go out in the head's write.
const COALESCE: usize = 64 * 1024;

/// An upstream socket, plain or TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

/// One upstream HTTP/1.1 connection.
pub(crate) struct Conn {
    io: Io,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The request head (and small bodies) being written; kept for reuse.
    wbuf: Vec<u8>,
    /// The connection's place under the service's connection limit,
    /// released when the connection is dropped.
    _slot: Option<ConnSlot>,
    /// Bounds waiting for a response head. Aimed lazily: an exchange moves
    /// it only to an earlier deadline, and one that fires before the
    /// current exchange's deadline is re-aimed then. A connection's
    /// deadlines mostly only grow, so the timer is registered about once
    /// per timeout span instead of once per request.
    timer: Pin<Box<Sleep>>,
}

/// The error (inside an [`io::ErrorKind::TimedOut`]) of an exchange whose
/// response head did not arrive by its deadline.
#[derive(Debug, thiserror::Error)]
#[error("no response head by the deadline")]
pub(crate) struct DeadlinePassed;

impl DeadlinePassed {
    /// Whether `e` is this.
    pub(crate) fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|i| i.is::<DeadlinePassed>())
    }
}

/// The error (inside an [`io::Error`]) of an exchange whose request body
/// failed while it was being sent: the client's malformed or abandoned
/// upload, not the upstream's fault.
#[derive(Debug, thiserror::Error)]
#[error("request body: {message}")]
pub(crate) struct RequestBodyFailed {
    pub message: String,
    /// The client went away, rather than sent something malformed.
    pub went_away: bool,
}

impl RequestBodyFailed {
    fn of(e: &(dyn std::error::Error + Send + Sync + 'static)) -> RequestBodyFailed {
        RequestBodyFailed {
            message: e.to_string(),
            went_away: crate::http::error::client_went_away(e),
        }
    }

    /// `e` as this, if it is.
    pub(crate) fn of_io(e: &io::Error) -> Option<&RequestBodyFailed> {
        e.get_ref()?.downcast_ref::<RequestBodyFailed>()
    }
}

/// Runs `fut` until `deadline` on `timer` (see [`Conn::timer`]).
async fn within<F: Future<Output = io::Result<T>>, T>(
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    fut: F,
) -> io::Result<T> {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    let mut fut = std::pin::pin!(fut);
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, DeadlinePassed)));
            }
            // Aimed at an earlier exchange's deadline: aim it at this one.
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.io.tcp().peer_addr().ok())
            .finish()
    }
}

/// How a response body is delimited.
#[derive(Debug)]
pub(crate) enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// Until the connection ends.
    Eof,
    /// Complete.
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes remaining.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

/// Room for the next read: a step of [`READ_CHUNK`] when less than half
/// of one is free.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn closed_early(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed before {what}"),
    )
}

impl Conn {
    /// Connects to `address` (`host:port`) within `timeout`, and runs the
    /// TLS handshake within it too when `tls` is given.
    pub(crate) async fn connect(
        address: &str,
        timeout: Duration,
        slot: Option<ConnSlot>,
        tls: Option<&ClientTls>,
    ) -> io::Result<Conn> {
        let connect = async {
            let tcp = TcpStream::connect(address).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, io::Error>(match tls {
                None => Io::Plain(tcp),
                Some(tls) => Io::Tls(Box::new(tls.connect(tcp, address).await?)),
            })
        };
        let io = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {} ms", timeout.as_millis()),
            )
        })??;
        // Not registered until first polled.
        let idle = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        Ok(Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            _slot: slot,
            timer: Box::pin(tokio::time::sleep_until(idle)),
        })
    }

    /// Whether an idle connection can carry another request: the peer has
    /// not closed it and sent nothing unasked. Costs a syscall only when
    /// the socket has signalled something since the last read.
    pub(crate) fn usable_when_idle(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => match &mut self.io {
                Io::Plain(tcp) => {
                    let mut probe = [0u8; 1];
                    matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
                // TLS records may come unasked (TLS 1.3 session tickets):
                // usable while they hold no data and no close.
                Io::Tls(tls) => {
                    let mut probe = [0u8; 1];
                    let mut buf = ReadBuf::new(&mut probe);
                    Pin::new(&mut **tls)
                        .poll_read(&mut cx, &mut buf)
                        .is_pending()
                }
            },
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the connection's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        make_room(&mut self.rbuf);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// Sends `req` (origin-form target, `Host` set) and reads the response
    /// head, which must arrive by `deadline` (else a [`DeadlinePassed`]
    /// error). The returned [`Exchange`] reads the body.
    pub(crate) async fn send(
        mut self,
        req: Request<ProxyBody>,
        deadline: Instant,
    ) -> io::Result<(http::response::Parts, Exchange)> {
        let head_only = req.method() == Method::HEAD;
        let (parts, body) = req.into_parts();
        let length = body.size_hint().exact();
        let chunked = length.is_none() && !body.is_end_stream();
        self.wbuf.clear();
        encode_head(&mut self.wbuf, &parts, length, chunked);

        // An in-memory body goes out with the head, in one write.
        let rest = match body {
            ProxyBody::Full(full) if length.is_some_and(|n| n as usize <= COALESCE) => {
                if let Some(data) = full_data(full) {
                    self.wbuf.extend_from_slice(&data);
                }
                None
            }
            b if b.is_end_stream() => None,
            b => Some(b),
        };
        let Conn {
            io,
            rbuf,
            wbuf,
            timer,
            ..
        } = &mut self;
        let (head, body_sent) = match io {
            Io::Plain(tcp) => {
                let (rd, wr) = tcp.split();
                let exchange = exchange(rd, wr, rbuf, wbuf, rest, chunked, head_only);
                within(timer.as_mut(), deadline, exchange).await?
            }
            // A body in memory: write, then read, on the stream itself
            // (no split, so nothing is allocated per request).
            Io::Tls(tls) if rest.is_none() => {
                let exchange = async {
                    tls.write_all(wbuf).await?;
                    Ok((read_head(&mut **tls, rbuf, head_only).await?, true))
                };
                within(timer.as_mut(), deadline, exchange).await?
            }
            // A streamed body is written while the answer is watched for:
            // the stream is split. Boxed: the rare path's future would
            // otherwise widen the others'.
            Io::Tls(tls) => {
                let (rd, wr) = tokio::io::split(&mut **tls);
                let exchange = exchange(rd, wr, rbuf, wbuf, rest, chunked, head_only);
                within(timer.as_mut(), deadline, Box::pin(exchange)).await?
            }
        };
        let Head {
            parts,
            framing,
            keep_alive,
        } = head;
        let mut ex = Exchange {
            conn: Some(self),
            framing,
            reusable: keep_alive && body_sent,
        };
        ex.check_done();
        Ok((parts, ex))
    }
}

/// The bytes of an in-memory body (it is always ready).
fn full_data(mut full: http_body_util::Full<Bytes>) -> Option<Bytes> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(&mut full).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
        _ => None,
    }
}

/// Writes the request (the head in `wbuf`, with a small body, or `rest`
/// streamed) and reads the answer's head. Returns it, and whether the
/// whole body was sent.
async fn exchange<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut wr: W,
    rbuf: &mut BytesMut,
    wbuf: &[u8],
    rest: Option<ProxyBody>,
    chunked: bool,
    head_only: bool,
) -> io::Result<(Head, bool)> {
    match rest {
        None => {
            wr.write_all(wbuf).await?;
            Ok((read_head(&mut rd, rbuf, head_only).await?, true))
        }
        // Boxed: streaming is the rare path, and its future would
        // otherwise widen every exchange's.
        Some(body) => {
            Box::pin(stream_body(
                &mut rd, &mut wr, rbuf, wbuf, body, chunked, head_only,
            ))
            .await
        }
    }
}

/// Writes the head and streams `body` while watching for an early answer.
/// Returns the answer's head, and whether the whole body was sent.
async fn stream_body<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    rbuf: &mut BytesMut,
    wbuf: &[u8],
    body: ProxyBody,
    chunked: bool,
    head_only: bool,
) -> io::Result<(Head, bool)> {
    let send = write_streamed(wr, wbuf, body, chunked);
    let recv = read_head(rd, rbuf, head_only);
    tokio::pin!(send, recv);
    tokio::select! {
        biased;
        sent = &mut send => {
            sent?;
            Ok((recv.await?, true))
        }
        head = &mut recv => Ok((head?, false)),
    }
}

/// Writes `method target HTTP/1.1`, the headers (less any framing
/// headers), and the framing for the body.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    length: Option<u64>,
    chunked: bool,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            write_field(out, name, value);
        }
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if let Some(n) = length {
        // An empty body is announced only where a body is expected.
        if n > 0 || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head in `wbuf`, then the body frame by frame.
async fn write_streamed<W: AsyncWrite + Unpin>(
    wr: &mut W,
    wbuf: &[u8],
    mut body: ProxyBody,
    chunked: bool,
) -> io::Result<()> {
    wr.write_all(wbuf).await?;
    let mut trailers = None;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| io::Error::other(RequestBodyFailed::of(&*e)))?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if chunked => {
                // Size line, data and CRLF in one (vectored) write.
                let size = ChunkSize::new(data.len());
                let mut chunk = size.as_ref().chain(&data[..]).chain(&b"\r\n"[..]);
                wr.write_all_buf(&mut chunk).await?;
            }
            Ok(data) => wr.write_all(&data).await?,
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    if chunked {
        let mut end = Vec::new();
        write_last_chunk(&mut end, trailers.as_ref());
        wr.write_all(&end).await?;
    }
    Ok(())
}

/// A parsed final response head.
pub(crate) struct Head {
    pub(crate) parts: http::response::Parts,
    pub(crate) framing: Framing,
    pub(crate) keep_alive: bool,
}

/// Reads until a final (non-1xx) response head is complete and parses it.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    head_only: bool,
) -> io::Result<Head> {
    use tokio::io::AsyncReadExt;
    loop {
        if !rbuf.is_empty() {
            if let Some(head) = parse_head(rbuf, head_only)? {
                return Ok(head);
            }
            if rbuf.len() >= MAX_HEAD {
                return Err(invalid(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
        }
        make_room(rbuf);
        if rd.read_buf(rbuf).await? == 0 {
            return Err(closed_early("the response head"));
        }
    }
}

/// Parses one response head from the start of `rbuf`: `None` when more
/// bytes are needed. Interim (1xx) heads are consumed and skipped.
pub(crate) fn parse_head(rbuf: &mut BytesMut, head_only: bool) -> io::Result<Option<Head>> {
    loop {
        // (name start, name end, value start, value end) in the head.
        let mut spans = [Span::EMPTY; MAX_HEADERS];
        let (len, code, minor, count) = {
            let mut headers =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            let status = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut resp, rbuf, &mut headers)
                .map_err(|e| invalid(format!("invalid response head: {e}")))?;
            let httparse::Status::Complete(len) = status else {
                return Ok(None);
            };
            let base = rbuf.as_ptr() as usize;
            for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
                *span = Span::of(base, h);
            }
            (
                len,
                resp.code.unwrap_or_default(),
                resp.version.unwrap_or(1),
                resp.headers.len(),
            )
        };
        let head = rbuf.split_to(len).freeze();
        let status =
            StatusCode::from_u16(code).map_err(|_| invalid(format!("invalid status {code}")))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(invalid("unexpected 101 Switching Protocols"));
            }
            continue;
        }
        let mut headers = HeaderMap::with_capacity(count);
        let mut seen = Seen::default();
        for span in &spans[..count] {
            let name = HeaderName::from_bytes(&head[span.name()])
                .map_err(|_| invalid("invalid response header name"))?;
            if !seen.note(&name, &head[span.value()]) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(span.value()))
                .map_err(|_| invalid(format!("invalid value of response header {name}")))?;
            headers.append(name, value);
        }
        let version = if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let (framing, mut keep_alive) = framing(&headers, &seen, status, head_only)?;
        keep_alive &= !seen.close && (version == Version::HTTP_11 || seen.keep_alive);
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
        }));
    }
}

/// Which framing-related headers a response head has, noted while it is
/// parsed (a `HeaderMap` lookup hashes; most answers have few of these).
#[derive(Default)]
struct Seen {
    content_length: bool,
    transfer_encoding: bool,
    /// `connection: close`.
    close: bool,
    /// `connection: keep-alive`.
    keep_alive: bool,
}

impl Seen {
    /// Notes a header; false when it is not worth keeping: a `connection`
    /// header naming only `close` or `keep-alive` has said all it has to
    /// say here, and would only be stripped again (it is hop-by-hop).
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        if name == header::CONTENT_LENGTH {
            self.content_length = true;
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == header::CONNECTION {
            let t = ConnectionTokens::of(value);
            self.close |= t.close;
            self.keep_alive |= t.keep_alive;
            return !t.only_persistence();
        }
        true
    }
}

/// The body framing of a response (RFC 9112 §6.3), and whether the
/// connection can be reused after it as far as framing goes.
fn framing(
    h: &HeaderMap,
    seen: &Seen,
    status: StatusCode,
    head_only: bool,
) -> io::Result<(Framing, bool)> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, true));
    }
    if seen.transfer_encoding {
        if !crate::http::headers::only_chunked(h) {
            // Re-framed, the body would lose its coding.
            return Err(invalid(
                "a transfer coding other than chunked in the response",
            ));
        }
        // With a content-length too, the message is suspect: decode by
        // transfer-encoding and do not reuse the connection.
        let alone = !seen.content_length;
        return Ok((Framing::Chunked(Chunk::Size), alone));
    }
    if !seen.content_length {
        return Ok((Framing::Eof, false));
    }
    let mut length = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| invalid("invalid content-length in the response"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting content-length values in the response"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Eof, false),
    })
}

/// The response body of an exchange, read from its connection. When the
/// body is complete and the connection reusable, [`Exchange::take_idle`]
/// hands the connection back.
#[derive(Debug)]
pub(crate) struct Exchange {
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
}

impl Exchange {
    /// Whether the body has been read to its end.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    /// The exact number of body bytes left, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    /// The connection, once the body is complete and nothing forbids
    /// reusing it.
    pub(crate) fn take_idle(&mut self) -> Option<Conn> {
        if self.is_done() && self.reusable {
            self.conn.take()
        } else {
            None
        }
    }

    /// Marks the body complete when nothing (more) is to be read.
    fn check_done(&mut self) {
        if matches!(self.framing, Framing::Length(0)) {
            self.framing = Framing::Done;
        }
        if self.is_done() {
            // Bytes past the end of the body: the peer is out of step.
            if self.conn.as_ref().is_some_and(|c| !c.rbuf.is_empty()) {
                self.reusable = false;
            }
        }
    }

    /// The next frame of the body.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Decode what is buffered.
            match decode(&mut self.framing, &mut conn.rbuf) {
                Ok(Some(frame)) => {
                    self.check_done();
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) if matches!(self.framing, Framing::Done) => {
                    self.check_done();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    self.fail();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            // Need more bytes.
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if matches!(self.framing, Framing::Eof) {
                        self.framing = Framing::Done;
                        self.reusable = false;
                        return Poll::Ready(None);
                    }
                    self.fail();
                    return Poll::Ready(Some(Err(closed_early("the end of the response body"))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.fail();
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn fail(&mut self) {
        self.framing = Framing::Done;
        self.reusable = false;
        self.conn = None;
    }
}

/// Takes the next frame out of `buf`, or `None` when more bytes are
/// needed (or the body is done).
pub(crate) fn decode(
    framing: &mut Framing,
    buf: &mut BytesMut,
) -> io::Result<Option<Frame<Bytes>>> {
    loop {
        match framing {
            Framing::Done => return Ok(None),
            Framing::Length(0) => {
                *framing = Framing::Done;
                return Ok(None);
            }
            Framing::Length(n) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = (*n).min(buf.len() as u64);
                *n -= take;
                let data = buf.split_to(take as usize).freeze();
                if *n == 0 {
                    *framing = Framing::Done;
                }
                return Ok(Some(Frame::data(data)));
            }
            Framing::Eof => {
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Frame::data(buf.split().freeze())));
            }
            Framing::Chunked(state) => match *state {
                Chunk::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META => return Ok(None),
                    _ => return Err(invalid("invalid chunk size line in the response body")),
                },
                Chunk::Data(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = n.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    *state = if take == n {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(n - take)
                    };
                    return Ok(Some(Frame::data(data)));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("missing CRLF after a chunk of the response body"));
                    }
                    buf.advance(2);
                    *state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::new();
                            for f in fields.iter() {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| invalid("invalid trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| invalid("invalid trailer value"))?;
                                trailers.append(name, value);
                            }
                            buf.advance(used);
                            *framing = Framing::Done;
                            if !trailers.is_empty() {
                                return Ok(Some(Frame::trailers(trailers)));
                            }
                            return Ok(None);
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META => {
                            return Ok(None)
                        }
                        _ => return Err(invalid("invalid trailers in the response body")),
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::http::wire::test_util::take_message;

    /// A server running `f` on every accepted connection.
    async fn server<F, Fut>(f: F) -> String
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(f(s));
            }
        });
        addr
    }

    /// Reads one request (head, and a content-length body) off `s`.
    async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        loop {
            if let Some(msg) = take_message(buf) {
                return Some(msg);
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A server answering every request on a connection with `answer`,
    /// written in pieces of `piece` bytes, recording the requests.
    async fn scripted(answer: &'static [u8], piece: usize) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let addr = server(move |mut s| {
            let log = log.clone();
            async move {
                let mut buf = Vec::new();
                while let Some(req) = read_request(&mut s, &mut buf).await {
                    log.lock().unwrap().push(req);
                    for part in answer.chunks(piece) {
                        if s.write_all(part).await.is_err() {
                            return;
                        }
                        s.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                }
            }
        })
        .await;
        (addr, seen)
    }

    /// A server that reads one request per connection, writes `pieces`
    /// (as separate writes) and closes the connection.
    async fn answer_once(pieces: &'static [&'static [u8]]) -> String {
        server(move |mut s| async move {
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf).await;
            for piece in pieces {
                s.write_all(piece).await.unwrap();
            }
        })
        .await
    }

    fn request(method: Method, body: impl Into<Bytes>) -> Request<ProxyBody> {
        let mut r = Request::new(crate::http::body::full(Full::new(body.into())));
        *r.method_mut() = method;
        *r.uri_mut() = "/p?q=1".parse().unwrap();
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("svc"));
        r
    }

    /// Sends `req` on `conn`; the response parts, body bytes, trailers, and
    /// the connection when it may be reused.
    async fn exchange(
        conn: Conn,
        req: Request<ProxyBody>,
    ) -> io::Result<(
        http::response::Parts,
        Bytes,
        Option<HeaderMap>,
        Option<Conn>,
    )> {
        let (parts, mut ex) = conn.send(req, far()).await?;
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = poll_fn(|cx| ex.poll_frame(cx)).await {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert!(ex.is_done());
        Ok((parts, data.into(), trailers, ex.take_idle()))
    }

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    async fn connect(addr: &str) -> Conn {
        Conn::connect(addr, Duration::from_secs(2), None, None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn writes_the_head_and_a_sized_body_in_one_request() {
        let (addr, seen) = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 1024).await;
        let mut req = request(Method::POST, "hello");
        // A stale length and framing from the client are replaced.
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        req.headers_mut()
            .append("x-multi", HeaderValue::from_static("a"));
        req.headers_mut()
            .append("x-multi", HeaderValue::from_static("b"));
        let (parts, body, _, idle) = exchange(connect(&addr).await, req).await.unwrap();
        assert_eq!((parts.status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert!(idle.is_some(), "keep-alive connection comes back");
        let sent = String::from_utf8(seen.lock().unwrap()[0].clone()).unwrap();
        assert_eq!(
            sent,
            "POST /p?q=1 HTTP/1.1\r\nhost: svc\r\nx-multi: a\r\nx-multi: b\r\ncontent-length: 5\r\n\r\nhello"
        );
        // A GET without a body announces no length; a POST announces 0.
        let (addr, seen) = scripted(b"HTTP/1.1 204 No Content\r\n\r\n", 1024).await;
        let conn = connect(&addr).await;
        let (_, _, _, conn) = exchange(conn, request(Method::GET, "")).await.unwrap();
        exchange(conn.unwrap(), request(Method::POST, ""))
            .await
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], b"GET /p?q=1 HTTP/1.1\r\nhost: svc\r\n\r\n");
        assert_eq!(
            seen[1],
            b"POST /p?q=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn decodes_chunked_bodies_with_trailers_arriving_byte_by_byte() {
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n\
            5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 42\r\n\r\n";
        let (addr, _) = scripted(answer, 1).await;
        let conn = connect(&addr).await;
        let (parts, body, trailers, conn) = exchange(conn, request(Method::GET, "")).await.unwrap();
        assert_eq!(parts.headers["x-a"], "1");
        assert_eq!(&body[..], b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "42");
        // Read to the end: the connection carries the next exchange.
        let (_, body, _, _) = exchange(conn.expect("reusable"), request(Method::GET, ""))
            .await
            .unwrap();
        assert_eq!(&body[..], b"hello world");
    }

    #[tokio::test]
    async fn a_sized_body_split_across_reads_is_whole_and_the_connection_reused() {
        let (addr, _) = scripted(
            b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
            3,
        )
        .await;
        let mut conn = connect(&addr).await;
        for _ in 0..3 {
            let (_, body, _, idle) = exchange(conn, request(Method::GET, "")).await.unwrap();
            assert_eq!(&body[..], b"hello world");
            conn = idle.expect("reusable");
            assert!(conn.usable_when_idle());
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
            HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n";
        let (addr, _) = scripted(answer, 7).await;
        let (parts, body, _, idle) = exchange(connect(&addr).await, request(Method::POST, "x"))
            .await
            .unwrap();
        assert_eq!(parts.status, StatusCode::CREATED);
        assert!(body.is_empty() && idle.is_some());
        assert!(!parts.headers.contains_key("link"));
    }

    #[tokio::test]
    async fn head_answers_and_204_have_no_body() {
        let (addr, _) = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n", 1024).await;
        let (parts, body, _, idle) = exchange(connect(&addr).await, request(Method::HEAD, ""))
            .await
            .unwrap();
        assert_eq!(parts.headers["content-length"], "1234");
        assert!(body.is_empty() && idle.is_some());
    }

    #[tokio::test]
    async fn a_close_delimited_body_is_read_to_the_end_and_the_connection_dropped() {
        let addr = answer_once(&[b"HTTP/1.1 200 OK\r\n\r\nall of ", b"this"]).await;
        let (_, body, _, idle) = exchange(connect(&addr).await, request(Method::GET, ""))
            .await
            .unwrap();
        assert_eq!(&body[..], b"all of this");
        assert!(idle.is_none());
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_make_a_connection_single_use() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            &b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
        ] {
            let (addr, _) = scripted(answer, 1024).await;
            let (_, body, _, idle) = exchange(connect(&addr).await, request(Method::GET, ""))
                .await
                .unwrap();
            assert_eq!(&body[..], b"ok");
            assert!(idle.is_none(), "{}", String::from_utf8_lossy(answer));
        }
        // HTTP/1.0 with keep-alive is reusable.
        let (addr, _) = scripted(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            1024,
        )
        .await;
        let (_, _, _, idle) = exchange(connect(&addr).await, request(Method::GET, ""))
            .await
            .unwrap();
        assert!(idle.is_some());
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        for (answer, what) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
                "conflicting",
            ),
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"[..],
                "invalid content-length",
            ),
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
                "chunk size",
            ),
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX"[..],
                "CRLF",
            ),
            (&b"NOT HTTP\r\n\r\n"[..], "invalid response head"),
            (&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..], "101"),
        ] {
            let (addr, _) = scripted(answer, 1024).await;
            let err = exchange(connect(&addr).await, request(Method::GET, ""))
                .await
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        // A body cut short by the peer is an error, not a short body.
        let addr = answer_once(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]).await;
        let err = exchange(connect(&addr).await, request(Method::GET, ""))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("before the end of the response body"),
            "{err}"
        );
        // No answer at all.
        let addr = answer_once(&[]).await;
        let err = exchange(connect(&addr).await, request(Method::GET, ""))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("before the response head"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_early_answer_stops_a_large_upload() {
        // The server answers after the head and never reads the body.
        let addr = server(|mut s| async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            // Then drain whatever else comes until the client goes, so the
            // close is clean (no reset racing the answer).
            let _ = s.read_to_end(&mut Vec::new()).await;
        })
        .await;
        // Far more than the socket buffers hold, so the answer arrives
        // while the upload is under way: without watching for it, the
        // whole body would be sent first and the connection kept.
        let big = vec![b'x'; 32 << 20];
        let sent = exchange(connect(&addr).await, request(Method::POST, big));
        let (parts, _, _, idle) = tokio::time::timeout(Duration::from_secs(30), sent)
            .await
            .expect("the early answer was not noticed")
            .unwrap();
        assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            idle.is_none(),
            "the unsent rest of the body spoils the connection"
        );
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_usable() {
        // The answer, then a close without saying so.
        let addr = answer_once(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]).await;
        let (_, _, _, idle) = exchange(connect(&addr).await, request(Method::GET, ""))
            .await
            .unwrap();
        let mut conn = idle.expect("looked reusable when the answer ended");
        // The peer's close makes the socket readable: wait for that event,
        // then the idle check must see the end.
        tokio::time::timeout(Duration::from_secs(5), conn.io.tcp().readable())
            .await
            .expect("the close never arrived")
            .unwrap();
        assert!(!conn.usable_when_idle());
    }

    #[tokio::test]
    async fn a_head_late_for_its_deadline_fails_and_an_earlier_deadline_cuts_no_later_exchange() {
        // Answers each request after as many milliseconds as its body says.
        let addr = server(|mut s| async move {
            let mut buf = Vec::new();
            while let Some(req) = read_request(&mut s, &mut buf).await {
                let end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let ms: u64 = String::from_utf8_lossy(&req[end + 4..]).parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let after = |ms: u64| Instant::now() + Duration::from_millis(ms);
        // A quick answer well within a short deadline: the connection's
        // timer is now aimed at that deadline.
        let conn = connect(&addr).await;
        let (_, mut ex) = conn
            .send(request(Method::POST, "0"), after(200))
            .await
            .unwrap();
        while poll_fn(|cx| ex.poll_frame(cx)).await.is_some() {}
        let conn = ex.take_idle().expect("reusable");
        // The timer fires during this exchange, before its own deadline:
        // it is re-aimed, and the answer arrives.
        let (parts, mut ex) = conn
            .send(request(Method::POST, "600"), after(5_000))
            .await
            .unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        while poll_fn(|cx| ex.poll_frame(cx)).await.is_some() {}
        let conn = ex.take_idle().expect("reusable");
        // An answer later than the deadline: the exchange fails with
        // DeadlinePassed.
        let err = conn
            .send(request(Method::POST, "3000"), after(100))
            .await
            .unwrap_err();
        assert!(DeadlinePassed::is(&err), "{err}");
    }

    #[test]
    fn chunk_size_lines_are_lower_case_hex() {
        for (len, line) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (255, "ff\r\n"),
            (1 << 20, "100000\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            assert_eq!(ChunkSize::new(len).as_ref(), line.as_bytes(), "{len}");
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("42"));
        let mut out = Vec::new();
        write_last_chunk(&mut out, Some(&trailers));
        assert_eq!(out, b"0\r\nx-sum: 42\r\n\r\n");
    }
}
