//! `meshgate-uringproto`: the measurement behind the decision on io_uring
//! (issue 20). The same minimal HTTP/1.1 keep-alive reverse proxy twice,
//! once on tokio's epoll reactor and once on io_uring (tokio-uring):
//! read a request head from the client, parse it (httparse, as the
//! gateway's fast path does), send it on a pooled upstream connection,
//! read and parse the answer (head and `content-length` body), write it
//! back. Requests without a body only. One thread each, so the CPU per
//! request of the two data paths compares like for like: whatever
//! io_uring saves in the kernel (one submission instead of a read and a
//! write syscall each, no readiness round trip) shows here at its largest,
//! since this proxy does almost nothing in user space.
//!
//! ```text
//! meshgate-uringproto --mode epoll|uring --listen 127.0.0.1:P --upstream 127.0.0.1:Q
//! ```
//!
//! Not a product path: `loadtest/bench.py --only uring` runs both under
//! wrk against the nginx backend and reports the ratio.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "epoll vs io_uring: one minimal HTTP/1.1 proxy, both ways")]
struct Args {
    #[arg(long)]
    mode: String,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
}

const BUF: usize = 16 * 1024;

/// Where a complete message ends in `buf` (head and `content-length`
/// body), if it is complete; `Err` when it is malformed.
fn message_end(buf: &[u8], response: bool) -> Result<Option<usize>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let (head, hs) = if response {
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => (n, r.headers.to_vec()),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(()),
        }
    } else {
        let mut r = httparse::Request::new(&mut headers);
        match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => (n, r.headers.to_vec()),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(()),
        }
    };
    let len = hs
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    Ok((buf.len() >= head + len).then_some(head + len))
}

fn main() {
    let args = Args::parse();
    match args.mode.as_str() {
        "epoll" => epoll::run(args.listen, args.upstream),
        "uring" => uring::run(args.listen, args.upstream),
        m => {
            eprintln!("meshgate-uringproto: --mode is epoll or uring, not {m}");
            std::process::exit(2);
        }
    }
}

mod epoll {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    type Pool = Rc<RefCell<Vec<TcpStream>>>;

    pub fn run(listen: SocketAddr, upstream: SocketAddr) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let l = TcpListener::bind(listen).await.expect("bind");
            let pool: Pool = Rc::default();
            loop {
                let Ok((c, _)) = l.accept().await else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                tokio::task::spawn_local(serve(c, upstream, pool.clone()));
            }
        });
    }

    /// Reads into `buf` until a whole message is in; its length.
    async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, response: bool) -> Option<usize> {
        buf.clear();
        loop {
            if let Some(n) = message_end(buf, response).ok()? {
                return Some(n);
            }
            let start = buf.len();
            buf.resize(start + BUF, 0);
            let n = s.read(&mut buf[start..]).await.ok()?;
            buf.truncate(start + n);
            if n == 0 {
                return None;
            }
        }
    }

    async fn serve(mut c: TcpStream, upstream: SocketAddr, pool: Pool) {
        let mut req = Vec::with_capacity(BUF);
        let mut resp = Vec::with_capacity(BUF);
        while let Some(n) = read_message(&mut c, &mut req, false).await {
            // Not borrowed across the connect's await.
            let pooled = pool.borrow_mut().pop();
            let mut up = match pooled {
                Some(u) => u,
                None => match TcpStream::connect(upstream).await {
                    Ok(u) => {
                        let _ = u.set_nodelay(true);
                        u
                    }
                    Err(_) => return,
                },
            };
            if up.write_all(&req[..n]).await.is_err() {
                return;
            }
            let Some(m) = read_message(&mut up, &mut resp, true).await else {
                return;
            };
            pool.borrow_mut().push(up);
            if c.write_all(&resp[..m]).await.is_err() {
                return;
            }
        }
    }
}

mod uring {
    use super::*;
    use tokio_uring::buf::BoundedBuf;
    use tokio_uring::net::{TcpListener, TcpStream};

    type Pool = Rc<RefCell<Vec<TcpStream>>>;

    pub fn run(listen: SocketAddr, upstream: SocketAddr) {
        tokio_uring::start(async move {
            let l = TcpListener::bind(listen).expect("bind");
            let pool: Pool = Rc::default();
            loop {
                let Ok((c, _)) = l.accept().await else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                tokio_uring::spawn(serve(c, upstream, pool.clone()));
            }
        });
    }

    /// Reads into `buf` until a whole message is in; the buffer and the
    /// message's length (io_uring owns the buffer while it reads).
    async fn read_message(
        s: &TcpStream,
        mut buf: Vec<u8>,
        response: bool,
    ) -> (Vec<u8>, Option<usize>) {
        buf.clear();
        loop {
            match message_end(&buf, response) {
                Ok(Some(n)) => return (buf, Some(n)),
                Ok(None) => {}
                Err(()) => return (buf, None),
            }
            if buf.capacity() - buf.len() < BUF / 2 {
                buf.reserve(BUF);
            }
            // Read into the free tail (a slice from the length on).
            let start = buf.len();
            let (r, tail) = s.read(buf.slice(start..)).await;
            buf = tail.into_inner();
            match r {
                Ok(n) if n > 0 => {}
                _ => return (buf, None),
            }
        }
    }

    async fn serve(c: TcpStream, upstream: SocketAddr, pool: Pool) {
        let mut req = Vec::with_capacity(BUF);
        let mut resp = Vec::with_capacity(BUF);
        loop {
            let (b, n) = read_message(&c, req, false).await;
            req = b;
            let Some(n) = n else { return };
            // Not borrowed across the connect's await.
            let pooled = pool.borrow_mut().pop();
            let up = match pooled {
                Some(u) => u,
                None => match TcpStream::connect(upstream).await {
                    Ok(u) => {
                        let _ = u.set_nodelay(true);
                        u
                    }
                    Err(_) => return,
                },
            };
            req.truncate(n);
            let (r, b) = up.write_all(req).await;
            req = b;
            if r.is_err() {
                return;
            }
            let (b, m) = read_message(&up, resp, true).await;
            resp = b;
            let Some(m) = m else { return };
            pool.borrow_mut().push(up);
            resp.truncate(m);
            let (r, b) = c.write_all(resp).await;
            resp = b;
            if r.is_err() {
                return;
            }
        }
    }
}
