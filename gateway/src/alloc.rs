//! The process allocator of the gateway and the sidecar: mimalloc, called
//! the way its C API is fastest.
//!
//! mimalloc rather than glibc's malloc: glibc returns freed pages to the
//! kernel and faults them back in under steady request load (measured: one
//! page fault per ~5 proxied requests); mimalloc keeps per-thread free
//! lists and does not.
//!
//! Transparent huge pages are turned off for the process
//! ([`no_huge_pages`]): mimalloc asks the kernel for them on its arenas,
//! and with THP in `madvise` mode (Debian's default) every touched 2 MiB
//! region became resident whole. Measured on the sidecar: 17.1 MB RSS idle
//! and 19.1 MB after load with them, 9.6 and 12.4 MB without.
//!
//! Called directly rather than through the `mimalloc` crate's allocator,
//! which sends every allocation through `mi_malloc_aligned`: that takes
//! mimalloc's generic, over-allocating path for any block over 1 KiB
//! (callgrind: about five per proxied request, ~3% of the gateway's
//! instructions). Rust's usual alignments (≤ 16, and no larger than the
//! size) are what plain `mi_malloc` guarantees, so only rarer layouts use
//! the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment `mi_malloc` guarantees for blocks at least this large.
const MI_MAX_ALIGN: usize = 16;

/// mimalloc as the global allocator: `#[global_allocator] static A: MeshAlloc = MeshAlloc;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeshAlloc;

/// Whether plain `mi_malloc` (or `mi_realloc`) to `size` bytes already
/// gives `align`.
#[inline(always)]
fn plain(align: usize, size: usize) -> bool {
    align <= MI_MAX_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc, which honours the layout's
// alignment (plain calls only where it guarantees it, see `plain`), and
// `mi_free` releases blocks from either kind of call.
unsafe impl GlobalAlloc for MeshAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_t`, which
/// `libmimalloc-sys` does not name; a test checks it against its default).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// How often [`spawn_purger`] lets mimalloc return freed memory.
pub const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

extern "C" {
    fn mi_option_set(option: i32, value: std::ffi::c_long);
    fn mi_collect(force: bool);
    #[cfg(test)]
    fn mi_option_get(option: i32) -> std::ffi::c_long;
}

/// Has mimalloc (v3) return freed memory to the kernel at once rather
/// than after its default delay of a second, for a process whose footprint matters more than its last
/// few percent of speed (the sidecar). Measured on the sidecar under load
/// with mutual TLS: 3.4 MB of its own memory instead of 4.2, and no
/// change in CPU per request (BENCHMARKS.md).
pub fn purge_at_once() {
    // SAFETY: setting an option is thread-safe in mimalloc and takes
    // effect at the next purge.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// Returns the memory that idle connections gave back to the allocator
/// to the kernel within about two seconds, for the gateway, which keeps
/// mimalloc's default purge delay for its speed under load.
///
/// mimalloc returns freed pages to the kernel lazily: an emptied page
/// goes back to its arena with a purge due a second later (`purge_delay`),
/// and the purge runs only when some thread next allocates or frees a
/// page after that. A gateway whose 10,000 connections just went idle
/// (and gave back their buffers, see `server::client_io`) does neither,
/// so the memory stayed resident: 63 MB per 10,000 idle connections,
/// against 33 MB with an immediate purge (BENCHMARKS.md). An immediate
/// purge ([`purge_at_once`]) is no choice for the gateway: under load it
/// faulted 1.4 pages back in per request and cost 25% more CPU per
/// request. Instead, a task runs `mi_collect` every [`PURGE_EVERY`]: that
/// runs the purges that fell due (the arenas are process-wide, so which
/// worker runs it does not matter) and frees the pages its own thread
/// emptied. Measured: 33 MB per 10,000 idle connections, as with the
/// immediate purge.
///
/// The task ends with the runtime.
pub fn spawn_purger() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut every = tokio::time::interval(PURGE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // SAFETY: collecting is thread-safe; `false`: no forced purge
            // of what is not yet due.
            unsafe { mi_collect(false) }
        }
    })
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`),
/// from the next page fault on. Call early in `main` (once logging is up).
/// Failure (an old kernel) only costs memory, so it is logged and ignored.
pub fn no_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        // Its default in mimalloc v3 is 1000 (ms); no other option has
        // that default.
        // SAFETY: reading an option.
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
    }

    #[test]
    fn honours_every_alignment() {
        let a = MeshAlloc;
        for align in [1, 2, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 16, 100, 1024, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                    assert_eq!(*q.add(size - 1), 0xab, "realloc keeps the contents");
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
