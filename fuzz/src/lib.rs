//! qtune's fuzz harness: see `harness.rs` (shared with `tests/fuzz_regressions.rs`).
pub mod harness;

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a fuzzed input may cause. We build without a sanitizer (`-s none`,
/// twice the executions per second), so libFuzzer's `-malloc_limit_mb` has no malloc hook; this
/// allocator is the hook: one request over the limit (a size taken from an untrusted count before
/// it was checked against the file) aborts, and libFuzzer saves the input as a crash.
pub const MAX_ALLOC: usize = 2 << 30;

struct Capped;

// SAFETY: forwards every call to the system allocator unchanged; only refuses (aborts on)
// requests over MAX_ALLOC before they reach it.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        check(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        check(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        check(new);
        System.realloc(p, l, new)
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No allocation here (we are inside the allocator): a fixed message, then abort.
        let msg = b"qtune-fuzz: single allocation over 2 GiB (size from an unchecked count?)\n";
        // SAFETY: writes a static buffer to stderr; no Rust state involved.
        unsafe { libc_write(2, msg.as_ptr(), msg.len()) };
        std::process::abort();
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, n: usize) -> isize;
}

#[global_allocator]
static GLOBAL: Capped = Capped;
