//! A client connection's socket, as every server path uses it (the fast
//! path, hyper, upgrades and tunnels), plain or TLS: with a write timeout,
//! and a lingering close.
//!
//! **Write timeout.** A client that takes no byte of what we write for
//! [`Limits::write_timeout`](crate::server::Limits) is cut off: the write
//! fails with `TimedOut`, and the connection and its task end. Without it,
//! a client that stops reading would hold its connection (and the
//! upstream's answer) forever. The timer exists only while a write is
//! stalled, so a client that reads keeps no timer.
//!
//! **Lingering close** (RFC 9112 §9.6). Closing a socket whose receive
//! buffer still holds unread bytes (pipelined requests after a
//! `connection: close` answer or a 400) makes the kernel send a reset,
//! which can destroy the answer before the client reads it. So when the
//! connection is dropped, its write side is shut (the client sees the end
//! of the answer), and what the client still sends is read and discarded
//! until it closes, for at most [`LINGER`]; then the socket is closed. A
//! client that has already closed costs nothing more. (A TLS connection
//! that ends cleanly has sent its `close_notify` by then, through
//! `shutdown`; the lingering reads the TCP socket under it.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;

/// Longest a closed connection lingers to drain what the client still
/// sends (nginx's `lingering_timeout` default).
pub(crate) const LINGER: Duration = Duration::from_secs(5);

/// A client socket, plain or TLS.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    #[cfg(test)]
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    fn into_tcp(self) -> TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.into_inner().0,
        }
    }
}

/// Forwards each call to the plain or the TLS stream.
macro_rules! either {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => s.poll_shutdown(cx))
    }
}

/// See the module docs.
pub(crate) struct ClientIo {
    /// `None` once handed to the lingering close.
    stream: Option<Stream>,
    write_timeout: Duration,
    /// Armed while a write is stalled.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl ClientIo {
    pub(crate) fn new(stream: Stream, write_timeout: Duration) -> ClientIo {
        #[cfg(test)]
        tests_only::count(stream.tcp(), 1);
        ClientIo {
            stream: Some(stream),
            write_timeout,
            stalled: None,
        }
    }

    /// Whether [`ClientIo::poll_readable`] can tell when the client sends:
    /// on a plaintext socket. Not over TLS, whose session may hold
    /// decrypted bytes not yet read (and keeps its own buffers).
    pub(crate) fn can_wait_unbuffered(&self) -> bool {
        matches!(self.stream, Some(Stream::Plain(_)))
    }

    /// Counts, for tests, a release of the connection's buffers.
    pub(crate) fn note_released(&self) {
        #[cfg(test)]
        if let Some(s) = &self.stream {
            tests_only::note_released(s.tcp());
        }
    }

    /// Ready once the client has sent something or closed, without
    /// reading; `None` where [`ClientIo::can_wait_unbuffered`] is false.
    pub(crate) fn poll_readable(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        match self.stream.as_ref()? {
            Stream::Plain(s) => Some(s.poll_read_ready(cx)),
            Stream::Tls(_) => None,
        }
    }

    fn stream(&mut self) -> Pin<&mut Stream> {
        Pin::new(self.stream.as_mut().expect("open until dropped"))
    }

    /// A write made progress (or failed): the stall, if any, is over.
    fn progressed<T>(&mut self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.stalled = None;
        r
    }

    /// A write is stalled: pending until the write timeout, then an error.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.write_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no bytes for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream().poll_write(cx, buf) {
            Poll::Pending => self.stall(cx),
            done => self.progressed(done),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream().poll_write_vectored(cx, bufs) {
            Poll::Pending => self.stall(cx),
            done => self.progressed(done),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream().poll_flush(cx) {
            Poll::Pending => self.stall(cx),
            done => self.progressed(done),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        #[cfg(test)]
        tests_only::count(stream.tcp(), -1);
        let stream = stream.into_tcp();
        // Most clients have closed by now: their end is already read.
        let mut scratch = [0u8; 512];
        for _ in 0..8 {
            match stream.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(linger(stream));
        }
    }
}

/// Shuts the write side, then reads and discards until the client closes
/// or [`LINGER`] passes.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut scratch = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Client connections open per listening port, for tests that wait for a
/// server to give a connection up (tests of different servers run at once,
/// each on its own port).
#[cfg(test)]
pub(crate) fn open(port: u16) -> usize {
    let open = tests_only::OPEN.lock().unwrap();
    open.as_ref()
        .and_then(|m| m.get(&port).copied())
        .unwrap_or(0)
}

/// Times a connection to `port` released its buffers while idle.
#[cfg(test)]
pub(crate) fn released(port: u16) -> usize {
    let released = tests_only::RELEASED.lock().unwrap();
    released
        .as_ref()
        .and_then(|m| m.get(&port).copied())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests_only {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use tokio::net::TcpStream;

    pub(super) static OPEN: Mutex<Option<HashMap<u16, usize>>> = Mutex::new(None);
    pub(super) static RELEASED: Mutex<Option<HashMap<u16, usize>>> = Mutex::new(None);

    pub(super) fn note_released(stream: &TcpStream) {
        if let Ok(port) = stream.local_addr().map(|a| a.port()) {
            let mut released = RELEASED.lock().unwrap();
            *released
                .get_or_insert_with(HashMap::new)
                .entry(port)
                .or_default() += 1;
        }
    }

    pub(super) fn count(stream: &TcpStream, by: isize) {
        let Ok(port) = stream.local_addr().map(|a| a.port()) else {
            return;
        };
        let mut open = OPEN.lock().unwrap();
        let n = open
            .get_or_insert_with(HashMap::new)
            .entry(port)
            .or_default();
        *n = n.checked_add_signed(by).unwrap_or(0);
    }
}
