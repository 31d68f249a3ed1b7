//! The allocator's purger ([`meshgate_gateway::alloc::spawn_purger`]) in
//! a process of its own, so that no other test's memory moves the
//! resident size it watches. Only the blocks the test allocates go
//! through mimalloc (this binary keeps the system allocator), as in a
//! gateway whose connections all went idle: nothing else allocates or
//! frees mimalloc pages, which would run the purge as a side effect.

// mimalloc's C API is called directly, to keep everything else off it.
#![allow(unsafe_code)]

use std::time::Duration;

/// This process's resident set, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[test]
fn memory_freed_before_the_process_idles_goes_back_to_the_kernel() {
    const BLOCK: usize = 16 * 1024;
    const BLOCKS: usize = 4096; // 64 MiB
    const RETURNED: usize = 48 * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // SAFETY: blocks from mi_malloc, written within their size, freed
        // once.
        let blocks: Vec<usize> = (0..BLOCKS)
            .map(|_| unsafe {
                let p = libmimalloc_sys::mi_malloc(BLOCK) as *mut u8;
                assert!(!p.is_null());
                p.write_bytes(1, BLOCK);
                p as usize
            })
            .collect();
        let peak = rss();
        for p in blocks {
            unsafe { libmimalloc_sys::mi_free(p as *mut std::ffi::c_void) }
        }
        let _purger = meshgate_gateway::alloc::spawn_purger();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now = rss();
            if now + RETURNED < peak {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "20 s after 64 MiB were freed, resident {now} bytes (peak {peak})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
