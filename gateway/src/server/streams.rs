//! The streams of a connection served by hyper, run inside the
//! connection's own task.
//!
//! hyper's HTTP/2 server hands every stream (and an HTTP/2 `CONNECT`
//! tunnel) to its executor. With tokio's, each stream is a task of its
//! own: spawned, scheduled, and woken across tasks every time it and its
//! connection hand frames to each other (the connection task reads and
//! writes the socket; the stream task runs the handler and queues the
//! answer). [`ConnExec`] is the executor of one connection instead: the
//! futures it is given are kept in the connection and polled by
//! [`drive`], in the connection's task, next to the connection itself, so
//! a stream's answer is written in the same poll that produced it. Each
//! stream keeps its own waker (a [`FuturesUnordered`]), so only the
//! streams that were woken are polled.
//!
//! All of a connection's streams then run on one thread at a time; the
//! connections themselves still spread over the runtime's workers.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures::stream::{FuturesUnordered, StreamExt};

type Spawned = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection: what it spawns is queued here for
/// [`drive`] (see the module docs).
#[derive(Clone, Default)]
pub(crate) struct ConnExec {
    queued: Arc<Mutex<Vec<Spawned>>>,
}

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::pin(fut));
    }
}

/// The streams [`ConnExec`] was given, being run.
#[derive(Default)]
pub(crate) struct Streams {
    exec: ConnExec,
    running: FuturesUnordered<Spawned>,
}

impl Streams {
    /// The executor to give hyper for this connection.
    pub(crate) fn exec(&self) -> ConnExec {
        self.exec.clone()
    }

    /// Moves what was queued into the running set; whether there was any.
    fn take_queued(&mut self) -> bool {
        let mut queued = self.exec.queued.lock().unwrap_or_else(|e| e.into_inner());
        let any = !queued.is_empty();
        for f in queued.drain(..) {
            self.running.push(f);
        }
        any
    }
}

/// Polls `conn` and the streams it spawned until the connection is done
/// and every stream has finished. Dropped (on shutdown, to call
/// `graceful_shutdown` on the connection) and called again, it carries on
/// with the same streams.
pub(crate) async fn drive<C, T>(streams: &mut Streams, mut conn: Pin<&mut C>) -> T
where
    C: Future<Output = T>,
{
    let mut done = None;
    poll_fn(|cx| loop {
        // The streams first, so the connection, polled next, writes what
        // they produced in this same poll.
        while let Poll::Ready(Some(())) = streams.running.poll_next_unpin(cx) {}
        if done.is_none() {
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                done = Some(out);
            }
        }
        if streams.take_queued() {
            // New streams (or a tunnel): run them at once.
            continue;
        }
        if streams.running.is_empty() {
            if let Some(out) = done.take() {
                return Poll::Ready(out);
            }
        }
        return Poll::Pending;
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor;

    use super::*;

    #[tokio::test]
    async fn spawned_futures_run_inside_the_driving_task_until_all_are_done() {
        let mut streams = Streams::default();
        let exec = streams.exec();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // The "connection": spawns two streams, one of which waits for the
        // other side of a channel, and one that spawns another itself.
        let conn = {
            let (exec, ran) = (exec.clone(), ran.clone());
            async move {
                let r = ran.clone();
                exec.execute(async move {
                    rx.await.unwrap();
                    r.fetch_add(1, Ordering::SeqCst);
                });
                let (r, inner) = (ran.clone(), exec.clone());
                exec.execute(async move {
                    let r2 = r.clone();
                    inner.execute(async move {
                        r2.fetch_add(1, Ordering::SeqCst);
                    });
                    r.fetch_add(1, Ordering::SeqCst);
                });
                "connection done"
            }
        };
        tokio::pin!(conn);
        let driving = drive(&mut streams, conn.as_mut());
        tokio::pin!(driving);
        // The connection is done, but a stream still waits: not finished.
        assert!(futures::poll!(driving.as_mut()).is_pending());
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        tx.send(()).unwrap();
        assert_eq!(driving.await, "connection done");
        assert_eq!(ran.load(Ordering::SeqCst), 3);
    }
}
