//! `meshgate-load`'s engine against real sockets: it must count exactly,
//! pace open-loop runs at the asked rate, and say which requests failed,
//! why and when (the fail-over figures rely on this).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_loadtest::{run, LoadConfig, Progress};
use meshgate_tests::{http_get, start_echo, wait_until, Backend};

fn config(port: u16, path: &str) -> LoadConfig {
    let mut c = LoadConfig::new("127.0.0.1", port, path);
    c.headers.insert(
        http::header::HOST,
        format!("127.0.0.1:{port}").parse().unwrap(),
    );
    c.connections = 4;
    c.duration = Duration::from_millis(1000);
    c
}

#[tokio::test]
async fn open_loop_sends_exactly_the_rate_and_counts_every_answer() {
    let b = Backend::start("load-a").await;
    let mut c = config(b.addr.port(), "/");
    c.rate = Some(300.0);
    let r = run(c, Arc::new(Progress::default())).await;
    // 300/s for 1 s: slots 0..300, every one sent and answered.
    assert_eq!(r.requests, 300, "{}", r.table());
    assert_eq!(r.ok, 300);
    assert_eq!(r.unsent, 0);
    assert_eq!(r.error_count(), 0);
    assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 300);
    assert_eq!(r.timeline.iter().map(|s| s.ok).sum::<u64>(), 300);
}

#[tokio::test]
async fn failures_are_reported_by_kind_with_their_sequence_numbers() {
    let b = Backend::start("load-b").await;
    let mut c = config(b.addr.port(), "/status/503");
    c.rate = Some(100.0);
    c.duration = Duration::from_millis(500);
    let r = run(c, Arc::new(Progress::default())).await;
    assert_eq!(r.requests, 50);
    assert_eq!(r.errors.get("status:5xx"), Some(&50), "{:?}", r.errors);
    let seqs: Vec<u64> = r.failures.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());
    assert!(r.failures.iter().all(|f| f.status == Some(503)));
    // Slot n is due at n * 10 ms.
    assert!(
        (r.failures[49].at_ms - 490.0).abs() < 1.0,
        "{}",
        r.failures[49].at_ms
    );
}

#[tokio::test]
async fn a_backend_killed_mid_run_is_timed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut echo, port) = start_echo(dir.path(), "echo");
    let url = format!("http://127.0.0.1:{port}/");
    wait_until("echo up", Duration::from_secs(10), || async {
        http_get(&url, &[]).await.is_ok()
    })
    .await;
    let mut c = config(port, "/");
    c.rate = Some(200.0);
    c.duration = Duration::from_millis(1500);
    c.timeout = Duration::from_millis(500);
    let start = Instant::now();
    let progress = Arc::new(Progress::default());
    let load = tokio::spawn(run(c, progress.clone()));
    // Kill once traffic is flowing (100 answers: half a second at 200/s).
    wait_until("100 answers", Duration::from_secs(10), || {
        let p = progress.clone();
        async move { p.done.load(std::sync::atomic::Ordering::Relaxed) >= 100 }
    })
    .await;
    let killed_at = start.elapsed().as_secs_f64() * 1000.0;
    echo.kill();
    let r = load.await.unwrap();
    assert_eq!(r.requests, 300, "{}", r.table());
    assert!(r.ok > 0 && r.error_count() > 0, "{}", r.table());
    // The first failure was due no earlier than the kill (give or take a
    // slot in flight), and from then on every request failed.
    let first = r.failures.first().unwrap();
    assert!(
        first.at_ms >= killed_at - 10.0,
        "first failure at {} ms, killed at {killed_at} ms",
        first.at_ms
    );
    assert_eq!(r.error_count(), 300 - first.seq, "{}", r.table());
    assert!(
        r.errors.keys().all(|k| k == "connect" || k == "io"),
        "{:?}",
        r.errors
    );
}
