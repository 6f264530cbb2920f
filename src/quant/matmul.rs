//! Fused quantised matmul: forward `y = x·Wᵀ` and the frozen linear's input gradient `dx = dy·W`.
//!
//! W (N×K, quantised along K) is only ever read through [`QMatrix::dequant_tile`]: each rayon task
//! dequantises one tile of W into a per-thread scratch buffer that fits in L2 ([`TILE_BYTES`]) and
//! multiplies it with the `gemm` crate (run-time AVX-512/AVX2/NEON dispatch). No more than one tile
//! of W per thread ever exists in f32, so memory stays at the quantised size of the model.
//!
//! - Forward: tasks own tiles of output rows of W (columns of y), so they write disjoint parts of y.
//! - Input gradient: tasks own tiles of K columns (columns of dx), and loop over all rows of W.
//! - Small M (decode, GEMV): a row chunk of W is dequantised into L1 and dotted with each x row
//!   (forward) or added, scaled by dy, into a per-split partial dx (input gradient).
use super::dispatch::active_level;
#[cfg(target_arch = "x86_64")]
use super::dispatch::SimdLevel;
use super::QMatrix;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Scratch budget for one dequantised W tile per thread, in bytes: half of this CPU's 1 MiB L2
/// per core, leaving the other half to the activation panels `gemm` packs beside it.
pub const TILE_BYTES: usize = 512 * 1024;

/// K span of one forward tile (elements; a multiple of every block size). Short and wide tiles
/// (256 rows × 512) amortise gemm's repacking of the activation panel over many rows of W; on this
/// machine 32×4096, 256×512, 512×256 and 128×1024 measured within noise of each other and of dense
/// f32 gemm at M = 512.
pub const MAX_TILE_K: usize = 512;

/// Up to this many activation rows, the forward and input-gradient use the dot/axpy (GEMV) path
/// instead of `gemm` (gemm's packing does not pay off for a handful of rows).
pub const GEMV_MAX_M: usize = 4;
/// Bands of W's rows (each with its own partial dx) the small-M input gradient sums in order.
const GEMV_BWD_BANDS: usize = 16;

/// K elements per GEMV row chunk: one f32 row chunk (4 KiB) plus that chunk of up to
/// [`GEMV_MAX_M`] x rows stay in the 32 KiB L1.
pub const GEMV_CHUNK_K: usize = 1024;

/// Shape of the W tile one task dequantises at a time (`rows` of W × `cols` along K).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Rows of W (output features) per tile.
    pub rows: usize,
    /// Columns of W (input features, the quantised axis) per tile; a multiple of the block size
    /// unless it reaches the end of the row.
    pub cols: usize,
}

impl Tiling {
    /// f32 scratch bytes one thread holds for this tiling (an upper bound on the GEMV paths, which
    /// hold one row chunk at a time).
    pub fn scratch_bytes(&self) -> usize {
        self.rows * self.cols * std::mem::size_of::<f32>()
    }
}

/// Largest multiple of `bs` that is <= `n`, but at least `bs`.
fn floor_to(n: usize, bs: usize) -> usize {
    (n / bs).max(1) * bs
}

/// Panics (a caller bug) unless `m` rows of the product of an N×K weight, `(n, k)`, fit its
/// operands: the K-wide one (`x`, or the input gradient `dx`) and the N-wide one (`y` or `dy`),
/// each given as (name, length); `op` names the product in the message.
pub(crate) fn check_operands(
    op: &str,
    (kname, klen): (&str, usize),
    (nname, nlen): (&str, usize),
    m: usize,
    (n, k): (usize, usize),
) {
    assert_eq!(klen, m * k, "{op}: {kname} is not {m}×{k}");
    assert_eq!(nlen, m * n, "{op}: {nname} is not {m}×{n}");
}

/// Whether a product into `out` whose sums run over `inner` terms needs no kernel: `out` is empty,
/// or the sums are empty (then `out` is zeroed, unless the product `accumulate`s into it).
pub(crate) fn no_work(out: &mut [f32], inner: usize, accumulate: bool) -> bool {
    if inner == 0 && !accumulate {
        out.fill(0.0);
    }
    out.is_empty() || inner == 0
}

fn check_shape(w: &QMatrix) {
    let bs = w.block_size();
    assert!(
        w.cols.is_multiple_of(bs),
        "qmatmul: W has {} columns, not a multiple of its {} block size {bs}",
        w.cols,
        w.qtype().name()
    );
}

/// The tiling [`qmatmul_fwd`] uses for `w` and `m` activation rows.
pub fn fwd_tiling(w: &QMatrix, m: usize) -> Tiling {
    let (n, k, bs) = (w.rows.max(1), w.cols.max(1), w.block_size());
    if m <= GEMV_MAX_M {
        // Scratch is one row chunk in L1; `rows` (<= 64) is the rows of W per task.
        let cols = k.min(floor_to(GEMV_CHUNK_K, bs));
        let rows = n.div_ceil(rayon::current_num_threads() * 8).clamp(1, 64);
        return Tiling { rows, cols };
    }
    let cols = k.min(floor_to(MAX_TILE_K, bs));
    let mut rows = (TILE_BYTES / 4 / cols).max(1);
    // Keep at least ~4 tasks per thread so rayon can balance them.
    rows = rows
        .min(n.div_ceil(rayon::current_num_threads() * 4))
        .max(1);
    Tiling {
        rows: rows.min(n),
        cols,
    }
}

/// The tiling [`qmatmul_bwd_input`] uses for `w` and `m` activation rows (`cols` is the dx column
/// span each task owns).
pub fn bwd_tiling(w: &QMatrix, m: usize) -> Tiling {
    let (n, k, bs) = (w.rows.max(1), w.cols.max(1), w.block_size());
    let threads = rayon::current_num_threads();
    // Enough column tiles for every thread, but wide enough that each row slice is a few blocks.
    let want = k.div_ceil(threads * 4);
    if m <= GEMV_MAX_M {
        // Row chunks of 256..1024 columns; scratch is one chunk (plus an (M, K) partial dx per
        // band of W's rows, `GEMV_BWD_BANDS` at most: M ≤ 4 rows each).
        let cols = k.min(floor_to(want.clamp(256, GEMV_CHUNK_K), bs));
        return Tiling { rows: 1, cols };
    }
    let cols = k.min(floor_to(want.clamp(256, 1024), bs));
    let rows = (TILE_BYTES / 4 / cols).clamp(1, n);
    Tiling { rows, cols }
}

thread_local! {
    // Reused across calls: allocating a fresh tile per task would fault in fresh pages each time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

// Largest scratch any thread has held, in bytes (for tests and benches).
static PEAK_SCRATCH: AtomicUsize = AtomicUsize::new(0);

/// The largest f32 scratch buffer (bytes) any thread has held for these kernels so far.
pub fn peak_scratch_bytes() -> usize {
    PEAK_SCRATCH.load(Ordering::Relaxed)
}

/// Runs `f` with this thread's scratch buffer of at least `len` f32.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    PEAK_SCRATCH.fetch_max(len * std::mem::size_of::<f32>(), Ordering::Relaxed);
    with_thread_buffer(&SCRATCH, len, usize::MAX, f)
}

/// Runs `f` with `len` elements of the thread-local buffer `key` (grown as needed, kept between
/// calls, contents unspecified), or of a private zeroed buffer where that one is taken
/// (re-entered on this thread: a task calling a kernel) or `len` is over `keep`, the most this
/// thread should hold on to between calls. The slice starts on a 64-byte cache line.
pub(crate) fn with_thread_buffer<T: Copy + Default + 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    keep: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) if len <= keep => f(aligned_slice(&mut buf, len)),
        _ => f(aligned_slice(&mut Vec::new(), len)),
    })
}

mod spans;
pub(crate) use spans::{par_spans, par_spans_init, Span};

/// `n` copies of `zero`, written by the thread pool where `n` is activation-sized: `vec![z; n]`
/// zeroes on the calling thread alone (a reused heap block is memset, 3.4 % of a ~100M bf16
/// step's samples on one core while the other waited, session 16).
pub(crate) fn zeroed<T: Copy + Send + Sync>(n: usize, zero: T) -> Vec<T> {
    if n < 1 << 16 {
        return vec![zero; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(zero, n));
    v
}

/// A fresh `n`-element vector that `write` fills whole (when it returns true; None when it
/// returns false, having written nothing that is read): outputs that kernels write once, without
/// the zero fill of [`zeroed`].
pub(crate) fn written<T>(
    n: usize,
    write: impl FnOnce(&mut [std::mem::MaybeUninit<T>]) -> bool,
) -> Option<Vec<T>> {
    let mut v = Vec::with_capacity(n);
    if !write(&mut v.spare_capacity_mut()[..n]) {
        return None;
    }
    // SAFETY: `write` initialised all n elements (its contract, returning true).
    unsafe { v.set_len(n) };
    Some(v)
}

/// `len` elements of `buf` (grown as needed) from its first 64-byte boundary: glibc hands large
/// blocks out 16 bytes past a page, and an AMX tile row that straddles two cache lines loads at a
/// third of the speed (measured with `tileloadd` alone on the Intel Xeon, session 13); the
/// AVX-512 kernels' 64-byte loads split the same way. The same `len` gives the same slice while
/// the buffer is not grown.
pub(crate) fn aligned_slice<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let pad = LINE / std::mem::size_of::<T>().max(1);
    if buf.len() < len + pad {
        buf.resize(len + pad, T::default());
    }
    // align_offset may decline (usize::MAX); then the buffer's own alignment serves.
    let off = Some(buf.as_ptr().align_offset(LINE)).filter(|&o| o <= pad);
    let off = off.unwrap_or(0);
    &mut buf[off..off + len]
}

/// A cache line's bytes.
const LINE: usize = 64;

/// A raw pointer tasks share to write disjoint parts of one output.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: every task writes a disjoint set of elements (documented at each use).
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: shared only to write disjoint elements, never read across tasks.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method (not `.0`) so closures capture the whole Send wrapper, not the raw pointer field.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One-thread f32 GEMM, `(m, n, k)`: `dst` (m×n, row stride `dst_rs`) `= lhs · rhs`, or `+=`
/// when `accumulate`; `lhs` (m×k) and `rhs` (k×n) each with its column and row stride (a
/// transposed operand swaps the two).
///
/// # Safety
/// Every element those shapes and strides address lies inside its buffer, and no other thread
/// touches the part of `dst` addressed.
pub(crate) unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `y (M×N) = x (M×K) · Wᵀ` with W (N×K) quantised along K, dequantised tile by tile.
///
/// Panics if the slice lengths do not match `m`, `w.rows` and `w.cols` (caller bug), or if
/// `w.cols` is not a multiple of the block size.
pub fn qmatmul_fwd(x: &[f32], m: usize, w: &QMatrix, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    check_operands("qmatmul_fwd", ("x", x.len()), ("y", y.len()), m, (n, k));
    check_shape(w);
    if no_work(y, k, false) {
        return;
    }
    let t = fwd_tiling(w, m);
    let yp = SendPtr(y.as_mut_ptr());
    let tasks = n.div_ceil(t.rows);
    if m <= GEMV_MAX_M {
        let dot = dot_fn();
        (0..tasks).into_par_iter().for_each(|task| {
            let r0 = task * t.rows;
            let r1 = (r0 + t.rows).min(n);
            with_scratch(t.cols, |row| {
                // acc: (task rows <= 64, M) partial sums over the K chunks.
                let mut acc = [[0f32; GEMV_MAX_M]; 64];
                let mut k0 = 0;
                while k0 < k {
                    let kc = t.cols.min(k - k0);
                    for r in r0..r1 {
                        w.dequant_tile(r, 1, k0, kc, &mut row[..kc]);
                        for (i, a) in acc[r - r0][..m].iter_mut().enumerate() {
                            *a += dot(&x[i * k + k0..][..kc], &row[..kc]);
                        }
                    }
                    k0 += kc;
                }
                for r in r0..r1 {
                    for (i, a) in acc[r - r0][..m].iter().enumerate() {
                        // SAFETY: this task alone owns columns r0..r1 of y; i*n+r < m*n.
                        unsafe { *yp.get().add(i * n + r) = *a };
                    }
                }
            });
        });
        return;
    }
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * t.rows..((task + 1) * t.rows).min(n);
        for_each_tile(w, rows, 0..k, (t.rows, t.cols), |r0, nr, k0, kc, tile| {
            // y[:, r0..r0+nr] (+)= x[:, k0..k0+kc] · tileᵀ
            // SAFETY: this task alone writes columns r0..r0+nr of y (rows stride n); x and
            // tile are read within their bounds: x rows stride k, tile (kc, nr) seen
            // transposed with row stride 1 and column stride kc.
            unsafe {
                gemm_rows(
                    (m, nr, kc),
                    (yp.get().add(r0), n, k0 > 0),
                    (x.as_ptr().add(k0), 1, k as isize),
                    (tile.as_ptr(), kc as isize, 1),
                );
            }
        });
    });
}

/// Dequantises `W[rows, cols]` tile by tile into this thread's scratch, tiles of at most `tr`
/// rows by `tc` columns walked row band by row band, and calls `f(r0, nr, c0, kc, tile)` for
/// each: `tile` (nr, kc) row-major is `W[r0..r0+nr, c0..c0+kc]`.
fn for_each_tile(
    w: &QMatrix,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    (tr, tc): (usize, usize),
    mut f: impl FnMut(usize, usize, usize, usize, &[f32]),
) {
    with_scratch(tr * tc, |tile| {
        for r0 in rows.clone().step_by(tr) {
            let nr = tr.min(rows.end - r0);
            for c0 in cols.clone().step_by(tc) {
                let kc = tc.min(cols.end - c0);
                let tile = &mut tile[..nr * kc];
                w.dequant_tile(r0, nr, c0, kc, tile);
                f(r0, nr, c0, kc, tile);
            }
        }
    })
}

/// `dx (M×K) = dy (M×N) · W` (or `+=` when `accumulate`), the input gradient of a frozen linear
/// `y = x·Wᵀ`; W is dequantised tile by tile and never gets a gradient.
///
/// Panics if the slice lengths do not match `m`, `w.rows` and `w.cols` (caller bug), or if
/// `w.cols` is not a multiple of the block size.
pub fn qmatmul_bwd_input(dy: &[f32], m: usize, w: &QMatrix, dx: &mut [f32], accumulate: bool) {
    let (n, k) = (w.rows, w.cols);
    check_operands(
        "qmatmul_bwd_input",
        ("dx", dx.len()),
        ("dy", dy.len()),
        m,
        (n, k),
    );
    check_shape(w);
    if no_work(dx, n, accumulate) {
        return;
    }
    let t = bwd_tiling(w, m);
    let dxp = SendPtr(dx.as_mut_ptr());
    let tasks = k.div_ceil(t.cols);
    if m <= GEMV_MAX_M {
        // Small M: tasks own contiguous bands of W's rows (streamed whole, like the forward GEMV),
        // each summing into its own (M, K) partial dx, added up in band order at the end; this
        // measured 2-3× faster than K-column tiles, whose tasks each read a short strided slice of
        // every row. A fixed band count (not rayon's splits, which follow its work stealing) keeps
        // the sums the same from run to run and thread count to thread count.
        let axpy = axpy_fn();
        let kc = t.cols;
        let rows = n.div_ceil(GEMV_BWD_BANDS).max(1);
        let parts: Vec<Vec<f32>> = (0..n.div_ceil(rows))
            .into_par_iter()
            .map(|task| {
                let mut acc = vec![0f32; m * k];
                let band = task * rows..((task + 1) * rows).min(n);
                for_each_tile(w, band, 0..k, (1, kc), |r, _, k0, c, row| {
                    for i in 0..m {
                        axpy(dy[i * n + r], row, &mut acc[i * k + k0..][..c]);
                    }
                });
                acc
            })
            .collect();
        let part = (parts.into_iter())
            .reduce(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            })
            .expect("n > 0: one band at least");
        if accumulate {
            dx.iter_mut().zip(&part).for_each(|(o, v)| *o += v);
        } else {
            dx.copy_from_slice(&part);
        }
        return;
    }
    (0..tasks).into_par_iter().for_each(|task| {
        let cols = task * t.cols..((task + 1) * t.cols).min(k);
        for_each_tile(w, 0..n, cols, (t.rows, t.cols), |r0, nr, c0, kc, tile| {
            // dx[:, c0..c0+kc] (+)= dy[:, r0..r0+nr] · tile
            // SAFETY: this task alone writes columns c0..c0+kc of dx (row stride k); dy rows
            // stride n, tile rows stride kc, all within bounds.
            unsafe {
                gemm_rows(
                    (m, kc, nr),
                    (dxp.get().add(c0), k, accumulate || r0 > 0),
                    (dy.as_ptr().add(r0), 1, n as isize),
                    (tile.as_ptr(), 1, kc as isize),
                );
            }
        });
    });
}

/// Scalar reference for [`qmatmul_fwd`]: dequantises one row of W at a time, accumulates in f64.
pub fn qmatmul_fwd_ref(x: &[f32], m: usize, w: &QMatrix, y: &mut [f32]) {
    fwd_ref_with("qmatmul_fwd_ref", x, m, w, y, |a| *a as f64, |v| v as f64)
}

/// Scalar reference for [`qmatmul_bwd_input`]: dequantises one row of W at a time, accumulates in
/// f64.
pub fn qmatmul_bwd_input_ref(dy: &[f32], m: usize, w: &QMatrix, dx: &mut [f32], accumulate: bool) {
    let name = "qmatmul_bwd_input_ref";
    bwd_input_ref_with(name, dy, m, w, dx, accumulate, |g| *g as f64, |v| v as f64)
}

/// The scalar references' forward: `y = x · Wᵀ` with W dequantised one row at a time, each
/// activation mapped to f64 by `xa` and each weight by `wa` (exact, or rounded to bf16 first), the
/// products summed in f64.
pub(super) fn fwd_ref_with<A>(
    name: &str,
    x: &[A],
    m: usize,
    w: &QMatrix,
    y: &mut [f32],
    xa: impl Fn(&A) -> f64,
    wa: impl Fn(f32) -> f64,
) {
    let (n, k) = (w.rows, w.cols);
    check_operands(name, ("x", x.len()), ("y", y.len()), m, (n, k));
    let mut row = vec![0f32; k];
    for r in 0..n {
        w.dequant_tile(r, 1, 0, k, &mut row);
        for i in 0..m {
            let s: f64 = x[i * k..(i + 1) * k]
                .iter()
                .zip(&row)
                .map(|(a, b)| xa(a) * wa(*b))
                .sum();
            y[i * n + r] = s as f32;
        }
    }
}

/// The scalar references' input gradient: `dx (+)= dy · W`, operands mapped to f64 by `ga` and
/// `wa` as in [`fwd_ref_with`], summed in f64.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd_input_ref_with<A>(
    name: &str,
    dy: &[A],
    m: usize,
    w: &QMatrix,
    dx: &mut [f32],
    accumulate: bool,
    ga: impl Fn(&A) -> f64,
    wa: impl Fn(f32) -> f64,
) {
    let (n, k) = (w.rows, w.cols);
    check_operands(name, ("dx", dx.len()), ("dy", dy.len()), m, (n, k));
    let mut acc = vec![0f64; m * k];
    let mut row = vec![0f32; k];
    for r in 0..n {
        w.dequant_tile(r, 1, 0, k, &mut row);
        for i in 0..m {
            let g = ga(&dy[i * n + r]);
            for (a, v) in acc[i * k..(i + 1) * k].iter_mut().zip(&row) {
                *a += g * wa(*v);
            }
        }
    }
    for (d, a) in dx.iter_mut().zip(&acc) {
        *d = if accumulate {
            (*d as f64 + a) as f32
        } else {
            *a as f32
        };
    }
}

// ---- SIMD dot / axpy for the GEMV paths, chosen at run time ----

type DotFn = fn(&[f32], &[f32]) -> f32;
type AxpyFn = fn(f32, &[f32], &mut [f32]);

fn dot_fn() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    match active_level() {
        SimdLevel::Avx512 => return x86::dot_avx512,
        SimdLevel::Avx2 => return x86::dot_avx2,
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = active_level();
    dot_portable
}

fn axpy_fn() -> AxpyFn {
    #[cfg(target_arch = "x86_64")]
    match active_level() {
        SimdLevel::Avx512 => return x86::axpy_avx512,
        SimdLevel::Avx2 => return x86::axpy_avx2,
        _ => {}
    }
    axpy_portable
}

/// Portable dot product with 16 independent lanes (so LLVM vectorises it, NEON included).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; 16];
    let (ac, bc) = (a[..n].chunks_exact(16), b[..n].chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Portable `y += a·x`.
fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only returned by `dot_fn` after run-time detection of AVX-512F.
        unsafe { dot512(a, b) }
    }
    pub fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only returned by `dot_fn` after run-time detection of AVX2+FMA.
        unsafe { dot256(a, b) }
    }
    pub fn axpy_avx512(s: f32, x: &[f32], y: &mut [f32]) {
        // SAFETY: as above.
        unsafe { axpy512(s, x, y) }
    }
    pub fn axpy_avx2(s: f32, x: &[f32], y: &mut [f32]) {
        // SAFETY: as above.
        unsafe { axpy256(s, x, y) }
    }

    /// `dot` and `axpy` at one vector width: `$w` f32 lanes, with that width's zero, load, store,
    /// FMA, add, splat and horizontal sum. The same loops at every width (four accumulators hide
    /// the FMA latency), so the AVX2 and AVX-512 paths cannot drift apart.
    macro_rules! lanes {
        ($feat:literal, $dot:ident, $axpy:ident, $w:literal, $zero:ident, $load:ident,
         $store:ident, $fma:ident, $add:ident, $set1:ident, $hsum:ident) => {
            #[target_feature(enable = $feat)]
            unsafe fn $dot(a: &[f32], b: &[f32]) -> f32 {
                let n = a.len().min(b.len());
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let mut s = [$zero(); 4];
                let mut i = 0;
                while i + 4 * $w <= n {
                    for (j, acc) in s.iter_mut().enumerate() {
                        let o = i + $w * j;
                        *acc = $fma($load(pa.add(o)), $load(pb.add(o)), *acc);
                    }
                    i += 4 * $w;
                }
                while i + $w <= n {
                    s[0] = $fma($load(pa.add(i)), $load(pb.add(i)), s[0]);
                    i += $w;
                }
                let mut t = $hsum($add($add(s[0], s[1]), $add(s[2], s[3])));
                while i < n {
                    t += *pa.add(i) * *pb.add(i);
                    i += 1;
                }
                t
            }

            #[target_feature(enable = $feat)]
            unsafe fn $axpy(s: f32, x: &[f32], y: &mut [f32]) {
                let n = x.len().min(y.len());
                let (px, py) = (x.as_ptr(), y.as_mut_ptr());
                let a = $set1(s);
                let mut i = 0;
                while i + $w <= n {
                    $store(py.add(i), $fma(a, $load(px.add(i)), $load(py.add(i))));
                    i += $w;
                }
                while i < n {
                    *py.add(i) += s * *px.add(i);
                    i += 1;
                }
            }
        };
    }

    lanes!(
        "avx512f",
        dot512,
        axpy512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_set1_ps,
        _mm512_reduce_add_ps
    );
    lanes!(
        "avx2,fma",
        dot256,
        axpy256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_set1_ps,
        hsum256
    );

    /// The sum of the 8 lanes of `v`: upper half onto lower, then pairs.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        _mm_cvtss_f32(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QData, QType};

    thread_local! {
        static TEST_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn thread_buffers_start_on_a_cache_line() {
        // Kept, re-entered (a private buffer) and over `keep`: every path aligned, every length.
        for len in [1, 17, 1000, 300_000] {
            with_thread_buffer(&TEST_BUF, len, 1 << 20, |a| {
                assert_eq!((a.len(), a.as_ptr() as usize % LINE), (len, 0));
                with_thread_buffer(&TEST_BUF, len, 1 << 20, |b| {
                    assert_eq!((b.len(), b.as_ptr() as usize % LINE), (len, 0));
                });
            });
            with_thread_buffer(&TEST_BUF, len, 0, |c| {
                assert_eq!((c.len(), c.as_ptr() as usize % LINE), (len, 0));
            });
        }
    }

    #[test]
    fn simd_dot_axpy_match_portable() {
        let a: Vec<f32> = (0..203).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..203).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_fn()(&a, &b) as f64 - exact).abs() < 1e-4);
        assert!((dot_portable(&a, &b) as f64 - exact).abs() < 1e-4);
        let mut y1 = b.clone();
        let mut y2 = b.clone();
        axpy_fn()(0.5, &a, &mut y1);
        axpy_portable(0.5, &a, &mut y2);
        for (p, q) in y1.iter().zip(&y2) {
            assert!((p - q).abs() < 1e-6);
        }
    }

    #[test]
    fn tiles_respect_block_size() {
        let bytes = vec![0u8; 11008 / 256 * 144 * 4];
        let w = QMatrix {
            rows: 4,
            cols: 11008,
            data: QData::Ggml {
                qtype: QType::Q4_K,
                bytes: &bytes,
            },
        };
        for m in [1, 64] {
            for t in [fwd_tiling(&w, m), bwd_tiling(&w, m)] {
                assert!(t.cols % 256 == 0 || t.cols == w.cols, "{t:?}");
            }
        }
    }
}
