//! Quantised matmul in bf16 with f32 accumulation: forward `y = x·Wᵀ` and input gradient
//! `dx = dy·W`, for the `--dtype bf16` step on CPUs with AVX-512 BF16 (`vdpbf16ps`), on Intel
//! AMX (`tdpbf16ps` tiles over the same operands, in `matmul_bf16/amx.rs`) and on aarch64 with
//! FEAT_BF16 (`BFDOT` by element, in `matmul_bf16/neon.rs`: the same layouts in 4-lane vectors).
//!
//! `vdpbf16ps acc, a, b` adds, in each of 16 f32 lanes, the two products of a pair of bf16 values
//! (`acc[i] += a[2i]·b[2i] + a[2i+1]·b[2i+1]`), twice the multiply rate of an f32 FMA on the same
//! vector width. Both operands must hold *pairs along the contraction axis* (ggml and oneDNN call
//! this the VNNI layout). Each kernel picks its lanes so that one operand is a broadcast pair read
//! straight from a row-major buffer and only the other is repacked:
//!
//! - Forward (contraction over K): lanes run over 16 rows of x. x is packed once per call into
//!   blocks of [`MB`] rows, `xp[block][K/2][MB]` (pairs `x[m, 2p], x[m, 2p+1]`); each task owns
//!   [`fwd_rows`] rows of W, dequantises them (rounded to bf16 in the register) into a
//!   row-major bf16 tile whose pairs `W[n, 2p], W[n, 2p+1]` are broadcast. Accumulators hold a
//!   column of y for 48 rows of x and up to 8 rows of W (24 zmm), written out transposed.
//! - Input gradient (contraction over N): lanes run over 16 columns of dx. dy is converted once to
//!   row-major bf16, whose pairs `dy[m, 2q], dy[m, 2q+1]` are broadcast; each task owns a span of
//!   K columns and walks W in chunks of [`BWD_ROWS`] rows, interleaving rows 2q and 2q+1 of the
//!   dequantised chunk into pairs. Accumulators hold 6 rows × 64 columns of dx (24 zmm).
//!
//! Rounding: x, dy and W are rounded to bf16 (nearest even) and every product is exact in f32;
//! sums are f32. [`qmatmul_fwd_bf16_ref`] / [`qmatmul_bwd_input_bf16_ref`] compute the same
//! rounded operands' products in f64: the SIMD kernels agree with them to f32 summation error.
//! Where the CPU lacks AVX-512 BF16 and FEAT_BF16 (or the shape does not fit: K not a multiple of
//! 16, M ≤ [`GEMV_MAX_M`]) the f32 kernels of `matmul` run instead (AVX2, NEON);
//! [`bf16_kernel_name`] says which.
use super::matmul::{
    bwd_input_ref_with, check_operands, fwd_ref_with, qmatmul_bwd_input, qmatmul_fwd,
    with_thread_buffer, GEMV_MAX_M,
};
use super::QMatrix;
use half::bf16;
use rayon::prelude::*;

/// Returns `$body` from the calling function with `$K` the bf16 kernels this CPU has (AMX, else
/// AVX-512 BF16, else FEAT_BF16); falls through where it has none. One order of preference for
/// every entry point.
macro_rules! return_on_bf16_kernels {
    ($K:ident => $body:expr) => {
        #[cfg(target_arch = "x86_64")]
        if $crate::quant::matmul_bf16::has_amx() {
            type $K = $crate::quant::matmul_bf16::amx::Amx;
            return $body;
        }
        #[cfg(target_arch = "x86_64")]
        if $crate::quant::matmul_bf16::has_avx512_bf16() {
            type $K = $crate::quant::matmul_bf16::avx512::Avx512;
            return $body;
        }
        #[cfg(target_arch = "aarch64")]
        if $crate::quant::matmul_bf16::has_neon_bf16() {
            type $K = $crate::quant::matmul_bf16::neon::Neon;
            return $body;
        }
    };
}

/// `$body` with the const `$name` set to the run-time `$x` when it is one of `[$n, ...]`, else to
/// `$last`: the const-generic micro-tiles need their sizes at compile time.
macro_rules! const_dispatch {
    ($x:expr, $name:ident, [$($n:literal),*], $last:literal, $body:expr) => {
        match $x {
            $($n => {
                const $name: usize = $n;
                $body
            })*
            _ => {
                const $name: usize = $last;
                $body
            }
        }
    };
}

/// Rows of x per packed forward block: 3 vectors of 16 lanes.
pub const MB: usize = 48;
/// Rows of W per forward micro-tile (accumulators: 8 × 3 zmm).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FWD_MR: usize = 8;
/// Rows of W dequantised per input-gradient chunk (an even number: pairs of rows).
pub const BWD_ROWS: usize = 128;
/// Rows of dy per input-gradient micro-tile (accumulators: 6 × 4 zmm).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const BWD_MR: usize = 6;

/// Whether this CPU runs the AVX-512 BF16 kernels (checked once; what makes the `unsafe` calls
/// sound).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && std::env::var_os("QTUNE_NO_BF16_KERNELS").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this aarch64 CPU runs the FEAT_BF16 kernels (`BFDOT`; checked once, what makes their
/// `unsafe` calls sound). `QTUNE_NO_BF16_KERNELS` turns them off, as on x86.
pub fn has_neon_bf16() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_aarch64_feature_detected!("neon")
                && std::arch::is_aarch64_feature_detected!("bf16")
                && std::env::var_os("QTUNE_NO_BF16_KERNELS").is_none()
        })
    }
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// Whether [`qmatmul_fwd_bf16`] / [`qmatmul_bwd_input_bf16`] have bf16 products on this CPU
/// (AVX-512 BF16 or FEAT_BF16) for the shapes that fit; else they run the f32 kernels.
pub fn has_bf16_kernels() -> bool {
    has_avx512_bf16() || has_neon_bf16()
}

/// The kernel the bf16 step's quantised matmuls use on this CPU (for reports).
pub fn bf16_kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_amx() {
        return "amx-bf16 (tdpbf16ps; avx512-bf16 at the edges)";
    }
    if has_avx512_bf16() {
        "avx512-bf16 (vdpbf16ps)"
    } else if has_neon_bf16() {
        "neon-bf16 (bfdot)"
    } else if cfg!(target_arch = "aarch64") {
        "f32 (no FEAT_BF16 on this CPU)"
    } else {
        "f32 (no AVX-512 BF16 on this CPU)"
    }
}

/// Flops one [`dp_chains_all`] call does per iteration and thread: 12 `vdpbf16ps` of 16 lanes, or
/// on aarch64 12 `BFDOT` of 4 lanes (2 products and 2 adds a lane).
pub const DP_FLOPS_PER_ITER: usize = if cfg!(target_arch = "aarch64") {
    12 * 16
} else {
    12 * 64
};

/// The bf16 instruction [`dp_chains_all`] and [`measure_bf16_peak`] time (for reports).
pub const DP_INSTRUCTION: &str = if cfg!(target_arch = "aarch64") {
    "bfdot"
} else {
    "vdpbf16ps"
};

/// `iters` rounds of 12 independent `vdpbf16ps` (or `BFDOT` on aarch64) on each rayon thread at
/// once (plain OS threads, so all really run together); `None` without bf16 kernels. The work is
/// `threads × iters × DP_FLOPS_PER_ITER` flops.
pub fn dp_chains_all(iters: usize) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 BF16 checked by has_avx512_bf16 first.
    let chains = has_avx512_bf16().then_some(|t| unsafe { avx512::dp_chains(iters, t) });
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON and BF16 checked by has_neon_bf16 first.
    let chains = has_neon_bf16().then_some(|t| unsafe { neon::dp_chains(iters, t) });
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let chains: Option<fn(f32) -> f32> = {
        let _ = iters;
        None
    };
    let chains = chains?;
    let threads = rayon::current_num_threads().max(1);
    Some(std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| sc.spawn(move || chains(t as f32)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    }))
}

/// The instruction ceiling of the bf16 kernels in GFLOP/s ([`dp_chains_all`], best of 4), or
/// `None` without bf16 kernels. `qtune bench` divides by the larger of this and the f32 GEMM
/// peak, so MFU counts against the best this CPU offers.
pub fn measure_bf16_peak() -> Option<f64> {
    let iters = 1usize << 21;
    let threads = rayon::current_num_threads().max(1);
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t0 = std::time::Instant::now();
        std::hint::black_box(dp_chains_all(iters)?);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Some((threads * iters * DP_FLOPS_PER_ITER) as f64 / best / 1e9)
}

/// Bytes of bf16 scratch one thread keeps for products whose widest input is `k` (the W tile
/// of [`fwd_rows`] rows and its tile of y, or an input-gradient chunk and its pairs) where AMX's
/// larger tiles can pass the f32 kernels' `TILE_BYTES` budget; 0 elsewhere (within that budget).
pub fn amx_scratch_bytes(k: usize) -> usize {
    let fwd = AMX_ROW_UNIT * (k * 2 + AMX_MB * 4);
    match has_amx() {
        true => fwd.max(AMX_BWD_CHUNK * BWD_MAX_COLS * 4),
        false => 0,
    }
}

/// Bytes of the staging block one thread keeps for packing x rows of width up to `k` in the
/// forward (`pack_x`: one block of the active kernels' rows in bf16); 0 where no bf16 kernel runs.
pub fn fwd_stage_bytes(k: usize) -> usize {
    #[cfg(target_arch = "aarch64")]
    let kernel_mb = neon::MBN;
    #[cfg(not(target_arch = "aarch64"))]
    let kernel_mb = MB;
    let mb = match () {
        _ if has_amx() => AMX_MB,
        _ if has_bf16_kernels() => kernel_mb,
        _ => 0,
    };
    mb * k * 2
}

/// Rows of x per packed forward block on AMX (a multiple of 32: whole 2 × 2 tile blocks).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AMX_MB: usize = 64;
/// Rows of W an AMX forward task owns (a multiple of): each packed x block then streams from
/// L3 once per 64 rows of W rather than per 16 or 32 (measured at M = 512, 4096 × 4096 and 11008
/// × 4096: +15–40 % forward, session 11).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AMX_ROW_UNIT: usize = 64;
/// Rows of W per AMX input-gradient chunk: dx's accumulators are loaded and stored once per
/// 256 pairs instead of 64 (+20–50 % at the same shapes, session 11).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AMX_BWD_CHUNK: usize = 512;

/// Whether the bf16 kernels take this shape (else the f32 ones run).
fn fits(w: &QMatrix, m: usize) -> bool {
    m > GEMV_MAX_M && w.cols.is_multiple_of(16) && w.cols >= 16 && w.rows > 0
}

/// Pairs of bf16 in one u32 (the low half is the even element), as `vdpbf16ps` reads them.
#[inline]
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | ((hi.to_bits() as u32) << 16)
}

/// Activation rows as the kernels read them: f32 (rounded to bf16 here) or bf16 (copied).
pub trait Activation: Copy + Send + Sync {
    /// This value rounded to bf16 (nearest even).
    fn to_bf16(self) -> bf16;
    /// Converts a row into bf16 (SIMD where there is one).
    fn row_to_bf16(src: &[Self], dst: &mut [bf16]);
    /// The slice itself when it is f32 (the f32 fallback keeps its exact values).
    fn as_f32(v: &[Self]) -> Option<&[f32]>;
}

impl Activation for f32 {
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
    fn row_to_bf16(src: &[f32], dst: &mut [bf16]) {
        // The converter is looked up once: the lookup checks CPU features (atomic loads each),
        // and the element-wise ops round 64 values a call (0.5 % of the ~100M step's samples
        // were those loads, session 27).
        static CVT: std::sync::OnceLock<super::simd::ToBf16Fn> = std::sync::OnceLock::new();
        CVT.get_or_init(|| super::simd::f32_to_bf16_fn(super::dispatch::active_level()))(src, dst)
    }
    fn as_f32(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
}

impl Activation for bf16 {
    fn to_bf16(self) -> bf16 {
        self
    }
    fn row_to_bf16(src: &[bf16], dst: &mut [bf16]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
}

/// `y (M×N) = x (M×K) · Wᵀ` with bf16 products and f32 sums (see the module docs); the f32 kernel
/// where the bf16 one does not apply. x is f32 or bf16; y is f32.
pub fn qmatmul_fwd_bf16<A: Activation>(x: &[A], m: usize, w: &QMatrix, y: &mut [f32]) {
    let dims = (w.rows, w.cols);
    check_operands("qmatmul_fwd_bf16", ("x", x.len()), ("y", y.len()), m, dims);
    if fits(w, m) {
        return_on_bf16_kernels!(K => fwd_tiled::<K, A>(x, m, w, None, YOut::F32(y.as_mut_ptr())));
    }
    with_f32(x, |x| qmatmul_fwd(x, m, w, y))
}

/// `dx (M×K) = dy (M×N) · W` (or `+=` when `accumulate`) with bf16 products and f32 sums; the f32
/// kernel where the bf16 one does not apply. dy is f32 or bf16; dx is f32.
pub fn qmatmul_bwd_input_bf16<A: Activation>(
    dy: &[A],
    m: usize,
    w: &QMatrix,
    dx: &mut [f32],
    accumulate: bool,
) {
    let dims = (w.rows, w.cols);
    let op = "qmatmul_bwd_input_bf16";
    check_operands(op, ("dx", dx.len()), ("dy", dy.len()), m, dims);
    if fits(w, m) {
        return_on_bf16_kernels!(K => bwd_input_tiled::<K, A>(dy, m, w, dx.as_mut_ptr(), accumulate, None));
    }
    with_f32(dy, |dy| qmatmul_bwd_input(dy, m, w, dx, accumulate))
}

/// Runs `f` on `v` as f32: f32 activations as they are, bf16 ones widened (exactly).
fn with_f32<A: Activation, R>(v: &[A], f: impl FnOnce(&[f32]) -> R) -> R {
    match A::as_f32(v) {
        Some(v32) => f(v32),
        None => f(&v.iter().map(|a| a.to_bf16().to_f32()).collect::<Vec<_>>()),
    }
}

/// Scalar reference for [`qmatmul_fwd_bf16`]: the same bf16-rounded operands, products summed in
/// f64 (what the SIMD kernel computes, up to f32 summation error).
pub fn qmatmul_fwd_bf16_ref<A: Activation>(x: &[A], m: usize, w: &QMatrix, y: &mut [f32]) {
    let xa = |a: &A| a.to_bf16().to_f64();
    fwd_ref_with("qmatmul_fwd_bf16_ref", x, m, w, y, xa, bf16_f64)
}

/// Scalar reference for [`qmatmul_bwd_input_bf16`] (bf16-rounded operands, f64 sums).
pub fn qmatmul_bwd_input_bf16_ref<A: Activation>(
    dy: &[A],
    m: usize,
    w: &QMatrix,
    dx: &mut [f32],
    accumulate: bool,
) {
    let name = "qmatmul_bwd_input_bf16_ref";
    let ga = |g: &A| g.to_bf16().to_f64();
    bwd_input_ref_with(name, dy, m, w, dx, accumulate, ga, bf16_f64)
}

/// A weight rounded to bf16, as f64.
fn bf16_f64(v: f32) -> f64 {
    bf16::from_f32(v).to_f64()
}

/// Rows of W one forward task owns, a multiple of `unit` (the kernels' row block: [`FWD_MR`],
/// or AMX's 64): its bf16 tile (rows × K) fits in half of L2 where one unit does, and there are
/// enough tasks for every thread.
pub fn fwd_rows(n: usize, k: usize, unit: usize) -> usize {
    let fit = (256 * 1024 / (2 * k.max(1))).max(unit) / unit * unit;
    let balance = n.div_ceil(rayon::current_num_threads() * 4).div_ceil(unit) * unit;
    fit.min(balance.max(unit))
}

/// The most columns of dx [`bwd_cols`] gives a task (before rounding to the block size), which
/// [`amx_scratch_bytes`] sizes an input-gradient chunk by.
const BWD_MAX_COLS: usize = 256;

/// Columns of dx one input-gradient task owns: a multiple of the block size and of 16.
fn bwd_cols(w: &QMatrix) -> usize {
    let k = w.cols;
    let step = lcm(w.block_size().max(1), 16);
    let want = k
        .div_ceil(rayon::current_num_threads() * 4)
        .clamp(64, BWD_MAX_COLS);
    (want.div_ceil(step) * step).min(k)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

thread_local! {
    // Reused across calls: a fresh tile per task would fault in fresh pages every time.
    static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch of at least `words` u32 (bf16 pairs).
fn with_scratch<R>(words: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    with_thread_buffer(&SCRATCH, words, usize::MAX, f)
}

thread_local! {
    // The calling thread's packed activations (x in pairs, or dy in bf16), reused across calls:
    // an activation-sized buffer allocated per call faulted in fresh pages every time.
    static PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// u32 words of packed activations a thread keeps between calls (16 MiB: a decoder layer's
/// activations, or a cross-entropy chunk's dlogits); larger packs are allocated per call.
pub const PACK_KEEP_WORDS: usize = 4 << 20;

/// Bytes [`qmatmul_bwd_input_bf16`] packs for `m` rows of an `n`-wide dy where the bf16 kernels
/// run (rows padded to an even length, in bf16).
pub fn bwd_pack_bytes(m: usize, n: usize) -> usize {
    m * (n + n % 2) * 2
}

/// Runs `f` with this thread's pack buffer of at least `words` u32 (contents unspecified); up to
/// [`PACK_KEEP_WORDS`] are kept between calls, larger ones are allocated.
fn with_pack<R>(words: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    with_thread_buffer(&PACK, words, PACK_KEEP_WORDS, f)
}

/// Packs x (M×K) into `xp[block][K/2][mb]` pairs, blocks of `mb` rows (`xp` holds whole blocks;
/// the lanes of rows past M are left as they are: each lane's sums are its own, and those are
/// never written): each block is `pack_transposed`'s `b` operand of its rows, staged in a
/// buffer the thread keeps ([`fwd_stage_bytes`]; a scalar scatter of one pair at a time was 5 %
/// of a ~100M bf16 step, session 17).
fn pack_x<A: Activation>(x: &[A], m: usize, k: usize, mb: usize, xp: &mut [u32]) {
    thread_local! {
        static STAGE: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let half = k / 2;
    xp.par_chunks_mut(half * mb)
        .enumerate()
        .for_each(|(b, dst)| {
            let rows = mb.min(m - b * mb);
            with_thread_buffer(&STAGE, rows * half, usize::MAX, |stage| {
                let x = &x[b * mb * k..];
                dense::pack_transposed_via(x, k, (rows, 2 * half), (dst, mb), false, stage)
            })
        });
}

/// One sweep of an ISA's micro-kernels: `out[r][c] (+)= Σ_q a[r][q] · b[q][c]` for `rows` rows
/// of `a` (bf16 pairs along the contraction axis, broadcast; row stride `a_stride` u32) and all
/// `cols` columns of `b` (pairs along the same axis, row stride `b_stride` u32; `cols` a multiple
/// of 16),
/// over `pairs` pairs; `out` rows at stride `out_stride` f32, added to when `load`. Both products
/// are this one shape: the forward's a is W's bf16 tile and b one packed block of x (`cols` =
/// [`Bf16Kernels::MB`], out a transposed tile of y); the input gradient's a is dy in bf16 and b
/// the interleaved W chunk (out: dx).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Clone, Copy)]
struct Sweep {
    rows: usize,
    pairs: usize,
    a: *const u32,
    a_stride: usize,
    b: *const u32,
    b_stride: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    load: bool,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Sweep {
    /// The micro-tile's accumulators, `R` rows of `C` vectors of f32 lanes (a vector type `V` of
    /// the kernel's ISA): read from `out` where the sweep accumulates, else `zero`.
    ///
    /// # Safety
    /// `out` holds `R` rows of `C` vectors at `out_stride` (as [`Bf16Kernels::sweep`] requires).
    #[inline(always)]
    unsafe fn load_acc<V: Copy, const R: usize, const C: usize>(&self, zero: V) -> [[V; C]; R] {
        let mut acc = [[zero; C]; R];
        if self.load {
            let lanes = std::mem::size_of::<V>() / 4;
            for (r, a) in acc.iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    *av = (self.out.add(r * self.out_stride + lanes * v) as *const V)
                        .read_unaligned();
                }
            }
        }
        acc
    }

    /// Writes the micro-tile's accumulators back to `out`.
    ///
    /// # Safety
    /// As [`Sweep::load_acc`].
    #[inline(always)]
    unsafe fn store_acc<V: Copy, const R: usize, const C: usize>(&self, acc: &[[V; C]; R]) {
        let lanes = std::mem::size_of::<V>() / 4;
        for (r, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                (self.out.add(r * self.out_stride + lanes * v) as *mut V).write_unaligned(*av);
            }
        }
    }
}

/// One ISA's bf16 micro-kernels, as the shared tilings [`fwd_tiled`] and [`bwd_input_tiled`]
/// call them.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
trait Bf16Kernels {
    /// Rows of x per packed forward block (a multiple of 16: the lanes of its accumulators).
    const MB: usize;
    /// Rows of W per forward micro-tile (a divisor of the module's `FWD_MR`, which
    /// [`fwd_rows`] rounds to).
    const FWD_MR: usize;
    /// Rows of dy per input-gradient micro-tile.
    const BWD_MR: usize;
    /// Columns of the widest micro-tile (a multiple of 16).
    const NR: usize;
    /// Rows of W a forward task's count is a multiple of.
    const ROW_UNIT: usize = Self::FWD_MR;
    /// Rows of W dequantised per input-gradient chunk (even).
    const BWD_CHUNK: usize = BWD_ROWS;

    /// One micro-tile of a sweep: `t.rows` rows (1..=max(`FWD_MR`, `BWD_MR`)) and the first
    /// `width` columns of `t.b` (16..=`NR`, a multiple of 16; `t.b_stride` is b's row stride).
    ///
    /// # Safety
    /// The CPU has this ISA's bf16 features; every pointer addresses the elements the tile's
    /// shapes and strides name; no other thread touches them in `t.out`.
    unsafe fn tile(t: &Sweep, width: usize);

    /// A whole sweep: by default micro-tiles of up to `mr` rows ([`sweep`]); AMX overrides it
    /// (tiles over the bulk, AVX-512 micro-tiles over the edges).
    ///
    /// # Safety
    /// As [`Bf16Kernels::tile`], for all of `s`.
    unsafe fn sweep(s: Sweep, mr: usize)
    where
        Self: Sized,
    {
        sweep::<Self>(s, mr)
    }
}

/// Runs the sweep `s` as micro-tiles of up to `mr` rows and `K::NR` columns, rows outer.
///
/// # Safety
/// As [`Bf16Kernels::tile`], for all of `s`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn sweep<K: Bf16Kernels>(s: Sweep, mr: usize) {
    let mut i = 0;
    while i < s.rows {
        let rr = mr.min(s.rows - i);
        let mut c = 0;
        while c < s.cols {
            let width = K::NR.min(s.cols - c);
            let t = Sweep {
                rows: rr,
                a: s.a.add(i * s.a_stride),
                b: s.b.add(c),
                out: s.out.add(i * s.out_stride + c),
                ..s
            };
            K::tile(&t, width);
            c += width;
        }
        i += rr;
    }
}

/// `dx = dy·W` (or `+=`) through one ISA's kernels (the caller checked its features and
/// [`fits`]): dy rounded to bf16 once (rows padded to an even length: pairs along N), then per
/// task a span of [`bwd_cols`] columns of dx, W walked in chunks of `K::BWD_CHUNK` rows
/// dequantised and interleaved into row pairs. `dx`: M×K f32 (the callers checked its length),
/// written only by the tasks, each its own columns; read (loaded) only where `accumulate` or
/// after its first chunk stored it, so without `accumulate` it may start uninitialised. With
/// `lr` one more task multiplies the same bf16 rows of dy by a low-rank term's packed B
/// ([`LowGrad`]): the contraction over N that dx's is, with B's columns beside W's.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn bwd_input_tiled<K: Bf16Kernels, A: Activation>(
    dy: &[A],
    m: usize,
    w: &QMatrix,
    dx: *mut f32,
    accumulate: bool,
    lr: Option<LowGrad<'_>>,
) {
    use crate::quant::matmul::SendPtr;
    let (n, k) = (w.rows, w.cols);
    let n2 = n + n % 2;
    with_pack(m * n2 / 2, |dyw| {
        let dyb: &mut [bf16] = bytemuck::cast_slice_mut(dyw);
        dyb.par_chunks_mut(n2).enumerate().for_each(|(i, row)| {
            A::row_to_bf16(&dy[i * n..(i + 1) * n], &mut row[..n]);
            // The pad of an odd row pairs with W's zero row; it must be a number.
            row[n..].fill(bf16::ZERO);
        });
        let dyp_addr = dyb.as_ptr() as usize;
        let ds = n2 / 2;
        let cols = bwd_cols(w);
        let dxp = SendPtr(dx);
        // the low-rank task first, so that it does not run alone at the end
        let first = usize::from(lr.is_some());
        (0..first + k.div_ceil(cols)).into_par_iter().for_each(|t| {
            let dyp = dyp_addr as *const u32;
            if let (Some(l), 0) = (lr, t) {
                // SAFETY: the ISA's features were checked by the caller; dy holds m rows of ds
                // pairs, l.b ds rows of l.cols pairs and l.out m rows of l.cols f32 that this
                // task alone writes (LowGrad's contract).
                unsafe {
                    let s = Sweep {
                        rows: m,
                        pairs: ds,
                        a: dyp,
                        a_stride: ds,
                        b: l.b.as_ptr(),
                        b_stride: l.cols,
                        cols: l.cols,
                        out: l.out.get(),
                        out_stride: l.cols,
                        load: false,
                    };
                    K::sweep(s, K::BWD_MR)
                };
                return;
            }
            let task = t - first;
            let c0 = task * cols;
            let kc = cols.min(k - c0);
            // The pairs, then the chunk in bf16 (BWD_CHUNK × kc, as u32 words).
            with_scratch(K::BWD_CHUNK * kc, |buf| {
                let (wp, stage) = buf.split_at_mut(K::BWD_CHUNK / 2 * kc);
                let stage: &mut [bf16] = bytemuck::cast_slice_mut(stage);
                let mut r0 = 0;
                while r0 < n {
                    let nr = K::BWD_CHUNK.min(n - r0);
                    w.dequant_tile_bf16(r0, nr, c0, kc, &mut stage[..nr * kc]);
                    interleave_rows(stage, nr, kc, wp);
                    // SAFETY: the ISA's features were checked by the caller; dy pairs of rows
                    // 0..m, pairs r0/2..(r0+nr)/2 rounded up (<= n2/2) lie in dyb; wp has
                    // ceil(nr/2)×kc u32 (kc a multiple of 16); this task alone writes dx columns
                    // c0..c0+kc.
                    unsafe {
                        let s = Sweep {
                            rows: m,
                            pairs: nr.div_ceil(2),
                            a: dyp.add(r0 / 2),
                            a_stride: ds,
                            b: wp.as_ptr(),
                            b_stride: kc,
                            cols: kc,
                            out: dxp.get().add(c0),
                            out_stride: k,
                            load: accumulate || r0 > 0,
                        };
                        K::sweep(s, K::BWD_MR)
                    };
                    r0 += nr;
                }
            });
        });
    });
}

/// `y = x·Wᵀ` through one ISA's kernels (the caller checked its features and [`fits`]): x packed
/// once into blocks of `K::MB` rows, then per task [`fwd_rows`] rows of W dequantised into a bf16
/// tile; for each x block the micro-tiles fill a transposed tile of y (`nr × MB`), written out
/// row by row of y.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn fwd_tiled<K: Bf16Kernels, A: Activation>(
    x: &[A],
    m: usize,
    w: &QMatrix,
    lr: Option<LowRank<'_>>,
    y: YOut,
) {
    let (n, k) = (w.rows, w.cols);
    let (half, mb) = (k / 2, K::MB);
    let x_words = m.div_ceil(mb) * half * mb;
    let lr_words = lr.map_or(0, |l| l.words(m, n, mb));
    with_pack(x_words + lr_words, |buf| {
        let (xp, rest) = buf.split_at_mut(x_words);
        pack_x(x, m, k, mb, xp);
        let xp = &*xp;
        // the low-rank term: h packed as x is, B's rows as W's tile; `lp` pairs each
        let lp = lr.map_or(0, |l| l.pairs());
        let (hp, bp) = match lr {
            Some(l) if lp > 0 => l.pack((m, n, mb), rest),
            _ => (&[][..], &[][..]),
        };
        let rows = fwd_rows(n, k, K::ROW_UNIT);
        (0..n.div_ceil(rows)).into_par_iter().for_each(|task| {
            let r0 = task * rows;
            let nr = rows.min(n - r0);
            // The tile, then yt from the next cache line (both start on one: see with_thread_buffer).
            let tile_words = (nr * half).next_multiple_of(16);
            with_scratch(tile_words + nr * mb, |buf| {
                let (tile, yt) = buf.split_at_mut(tile_words);
                // tile: W[r0..r0+nr, :] in bf16, row-major; as u32 it is pairs along K.
                w.dequant_tile_bf16(
                    r0,
                    nr,
                    0,
                    k,
                    bytemuck::cast_slice_mut(&mut tile[..nr * half]),
                );
                let wt = tile.as_ptr();
                // yt: this task's columns of y for one x block, (nr, MB), written out row by row of y.
                let yt: &mut [f32] = bytemuck::cast_slice_mut(yt);
                for b in 0..m.div_ceil(mb) {
                    let rows_x = mb.min(m - b * mb);
                    // the tile's lines of y on their way (into L2) while the sweep runs: written
                    // cold, the transposed store stalled on them (session 24)
                    y.prefetch((nr, rows_x), b * mb * n + r0, n);
                    let xb = xp[b * half * mb..].as_ptr();
                    // SAFETY: the ISA's features were checked by the caller; wt addresses nr
                    // rows of `half` pairs (`tile`; half a multiple of 8), xb half×MB pairs inside
                    // xp, yt nr rows of MB f32.
                    unsafe {
                        let s = Sweep {
                            rows: nr,
                            pairs: half,
                            a: wt,
                            a_stride: half,
                            b: xb,
                            b_stride: mb,
                            cols: mb,
                            out: yt.as_mut_ptr(),
                            out_stride: mb,
                            load: false,
                        };
                        K::sweep(s, K::FWD_MR)
                    };
                    if lp > 0 {
                        // yt += B[r0..r0+nr]·hᵀ over the term's pairs, in the same accumulators
                        // SAFETY: as above; bp holds n rows of lp pairs, hp each block's lp×MB.
                        unsafe {
                            let s = Sweep {
                                rows: nr,
                                pairs: lp,
                                a: bp[r0 * lp..].as_ptr(),
                                a_stride: lp,
                                b: hp[b * lp * mb..].as_ptr(),
                                b_stride: mb,
                                cols: mb,
                                out: yt.as_mut_ptr(),
                                out_stride: mb,
                                load: true,
                            };
                            K::sweep(s, K::FWD_MR)
                        };
                    }
                    // y[b*MB + l][r0 + r] = yt[r][l]
                    // SAFETY: this task alone owns columns r0..r0+nr of y; rows b*MB..b*MB+rows_x
                    // are < m, so every element written lies inside y; yt holds nr rows of MB.
                    unsafe { y.put_transposed(yt, mb, (nr, rows_x), b * mb * n + r0, n) };
                }
            });
        });
    });
}

mod direct;
pub use direct::{
    low_rank_grad_ref, low_rank_ref, qmatmul_bwd_input_bf16_into, qmatmul_fwd_bf16_into, FwdOut,
    LowRank, LowRankGrad,
};
use direct::{LowGrad, YOut};

mod dense;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use dense::interleave_rows;
pub use dense::{dense_bf16, pack_row_pairs, pack_rows, pack_transposed, padded_pairs, Pairs};

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
pub use amx::{has_amx, measure_amx_peak};

/// Whether the AMX kernels run here: never off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn has_amx() -> bool {
    false
}

/// The AMX instruction ceiling: none off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn measure_amx_peak() -> Option<f64> {
    None
}

#[cfg(target_arch = "x86_64")]
mod avx512;
