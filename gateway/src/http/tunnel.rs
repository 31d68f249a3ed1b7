//! The byte tunnel: what a TCP route, an upgraded HTTP connection
//! (WebSocket) and an HTTP `CONNECT` tunnel run on once both ends stand.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Idle timeout of tunnels whose service sets none.
pub const DEFAULT_TUNNEL_IDLE: Duration = Duration::from_secs(3600);
/// Copies bytes both ways until both sides are done, or until no byte has
/// moved either way for `idle` (then fails with `TimedOut`).
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Activity {
        io: a,
        start,
        last: last.clone(),
    };
    let mut b = Activity {
        io: b,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            r = &mut copy => return r,
            _ = tokio::time::sleep_until(due.into()) => {
                let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if Instant::now() >= due {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no data for {idle:?}"),
                    ));
                }
            }
        }
    }
}

/// Joins the client's side of a switched connection (an upgrade, a
/// `CONNECT`) to `upstream` in a task of its own, once hyper hands the
/// client's side over; `hold` (a connection slot) lives as long as the
/// tunnel. `what` names it in the log.
pub fn spawn<U, H>(client: OnUpgrade, mut upstream: U, idle: Duration, what: Arc<str>, hold: H)
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Send + 'static,
{
    tokio::spawn(async move {
        let _hold = hold;
        let Ok(client) = client.await else {
            return;
        };
        let mut client = TokioIo::new(client);
        if let Err(e) = tunnel(&mut client, &mut upstream, idle).await {
            tracing::debug!(to = %what, error = %e, "tunnel ended");
        }
    });
}

/// An I/O object that records when it last read anything.
struct Activity<'a, T: ?Sized> {
    io: &'a mut T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Activity<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tunnel_copies_both_ways_and_closes_when_idle() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(64);
        let (mut b_inner, mut b_outer) = tokio::io::duplex(64);
        let t = tokio::spawn(async move {
            tunnel(&mut a_inner, &mut b_inner, Duration::from_millis(200)).await
        });
        a_outer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b_outer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        b_outer.write_all(b"pong").await.unwrap();
        a_outer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Nothing more is sent: the tunnel gives up with TimedOut.
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
