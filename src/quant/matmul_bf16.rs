//! Quantised matmul in bf16 with f32 accumulation: forward `y = x·Wᵀ` and input gradient
//! `dx = dy·W`, for the `--dtype bf16` step on CPUs with AVX-512 BF16 (`vdpbf16ps`) and on aarch64
//! with FEAT_BF16 (`BFDOT` by element, in `matmul_bf16/neon.rs`: the same layouts in 4-lane
//! vectors).
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
use super::matmul::{bwd_input_ref_with, fwd_ref_with, qmatmul_bwd_input, qmatmul_fwd, GEMV_MAX_M};
use super::QMatrix;
use half::bf16;
use rayon::prelude::*;

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
        super::simd::f32_to_bf16_fn(super::dispatch::active_level())(src, dst)
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
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "qmatmul_fwd_bf16: x is not {m}×{k}");
    assert_eq!(y.len(), m * n, "qmatmul_fwd_bf16: y is not {m}×{n}");
    if fits(w, m) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            return avx512::fwd(x, m, w, y);
        }
        #[cfg(target_arch = "aarch64")]
        if has_neon_bf16() {
            return neon::fwd(x, m, w, y);
        }
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
    let (n, k) = (w.rows, w.cols);
    assert_eq!(dy.len(), m * n, "qmatmul_bwd_input_bf16: dy is not {m}×{n}");
    assert_eq!(dx.len(), m * k, "qmatmul_bwd_input_bf16: dx is not {m}×{k}");
    if fits(w, m) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            return bwd_input_tiled::<avx512::Avx512, A>(dy, m, w, dx, accumulate);
        }
        #[cfg(target_arch = "aarch64")]
        if has_neon_bf16() {
            return bwd_input_tiled::<neon::Neon, A>(dy, m, w, dx, accumulate);
        }
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

/// Rows of W one forward task owns: its bf16 tile (rows × K) fits in half of L2, at least one
/// micro-tile, and enough tasks for every thread.
pub fn fwd_rows(n: usize, k: usize) -> usize {
    let fit = (256 * 1024 / (2 * k.max(1))).max(FWD_MR) / FWD_MR * FWD_MR;
    let balance = n
        .div_ceil(rayon::current_num_threads() * 4)
        .div_ceil(FWD_MR)
        * FWD_MR;
    fit.min(balance.max(FWD_MR))
}

/// Columns of dx one input-gradient task owns: a multiple of the block size and of 16.
fn bwd_cols(w: &QMatrix) -> usize {
    let k = w.cols;
    let step = lcm(w.block_size().max(1), 16);
    let want = k.div_ceil(rayon::current_num_threads() * 4).clamp(64, 256);
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
    static SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's scratch: at least `words` u32 (bf16 pairs) and `floats` f32.
fn with_scratch<R>(words: usize, floats: usize, f: impl FnOnce(&mut [u32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            let (u, v) = &mut *s;
            if u.len() < words {
                u.resize(words, 0);
            }
            if v.len() < floats {
                v.resize(floats, 0.0);
            }
            f(&mut u[..words], &mut v[..floats])
        }
        // Re-entered on this thread: private buffers.
        Err(_) => f(&mut vec![0; words], &mut vec![0.0; floats]),
    })
}

thread_local! {
    // The calling thread's packed activations (x in pairs, or dy in bf16), reused across calls:
    // an activation-sized buffer allocated per call faulted in fresh pages every time.
    static PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's pack buffer of at least `words` u32 (contents unspecified); up to
/// 16 MiB are kept between calls (a decoder layer's activations), larger ones are allocated.
fn with_pack<R>(words: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    PACK.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) if words <= 4 << 20 => {
            if v.len() < words {
                v.resize(words, 0);
            }
            f(&mut v[..words])
        }
        _ => f(&mut vec![0; words]),
    })
}

/// Packs x (M×K) into `xp[block][K/2][B]` pairs, blocks of `B` rows (`xp` holds whole blocks;
/// the lanes of rows past M are left as they are: each lane's sums are its own, and those are
/// never written).
fn pack_x<A: Activation, const B: usize>(x: &[A], m: usize, k: usize, xp: &mut [u32]) {
    let half = k / 2;
    xp.par_chunks_mut(half * B)
        .enumerate()
        .for_each(|(b, dst)| {
            let mut row = vec![bf16::ZERO; k];
            for l in 0..B.min(m - b * B) {
                let i = b * B + l;
                A::row_to_bf16(&x[i * k..(i + 1) * k], &mut row);
                for p in 0..half {
                    dst[p * B + l] = pair(row[2 * p], row[2 * p + 1]);
                }
            }
        });
}

/// One ISA's input-gradient micro-kernels, as the shared tiling [`bwd_input_tiled`] calls them.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
trait BwdKernels {
    /// Rows of dy per micro-tile.
    const MR: usize;
    /// f32 lanes [`BwdKernels::pair_lanes`] converts at once (a divisor of 16).
    const LANES: usize;

    /// `out[i] = pair(bf16(lo[i]), bf16(hi[i]))` for `LANES` lanes (nearest even).
    ///
    /// # Safety
    /// The CPU has this ISA's bf16 features (the caller checked); every slice has `LANES` elements.
    unsafe fn pair_lanes(lo: &[f32], hi: &[f32], out: &mut [u32]);

    /// `dx[r][c] (+)= Σ_q dyp[r][q] · wp[q][c]` for `rr` (1..=`MR`) rows of dy (pairs, row stride
    /// `ds` u32) and all `kc` columns of the interleaved W chunk `wp` (row stride `kc` u32, `kc` a
    /// multiple of 16), `pairs` pairs; dx rows at stride `xs` f32; `load` adds to dx.
    ///
    /// # Safety
    /// The CPU has this ISA's bf16 features; every pointer addresses the elements these shapes and
    /// strides name; no other thread touches them in dx.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows(
        rr: usize,
        pairs: usize,
        dyp: *const u32,
        ds: usize,
        wp: *const u32,
        kc: usize,
        dx: *mut f32,
        xs: usize,
        load: bool,
    );
}

/// Interleaves rows 2q and 2q+1 of the f32 chunk `src` (`nr` rows × `kc`, kc a multiple of 16)
/// into bf16 pairs `dst[q][c]` (an odd last row is paired with zero).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn interleave_rows<K: BwdKernels>(src: &[f32], nr: usize, kc: usize, dst: &mut [u32]) {
    let zeros = [0f32; 16];
    let l = K::LANES;
    for q in 0..nr.div_ceil(2) {
        let a = &src[2 * q * kc..][..kc];
        let b = (2 * q + 1 < nr).then(|| &src[(2 * q + 1) * kc..][..kc]);
        let out = &mut dst[q * kc..][..kc];
        for c in (0..kc).step_by(l) {
            let hi = b.map_or(&zeros[..l], |b| &b[c..c + l]);
            // SAFETY: the ISA's features were checked by the caller of the kernels
            // (has_avx512_bf16 / has_neon_bf16); each slice holds the LANES elements read or written.
            unsafe { K::pair_lanes(&a[c..c + l], hi, &mut out[c..c + l]) };
        }
    }
}

/// `dx = dy·W` (or `+=`) through one ISA's kernels (the caller checked its features and
/// [`fits`]): dy rounded to bf16 once (rows padded to an even length: pairs along N), then per
/// task a span of [`bwd_cols`] columns of dx, W walked in chunks of [`BWD_ROWS`] rows
/// dequantised and interleaved into row pairs.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn bwd_input_tiled<K: BwdKernels, A: Activation>(
    dy: &[A],
    m: usize,
    w: &QMatrix,
    dx: &mut [f32],
    accumulate: bool,
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
        let dxp = SendPtr(dx.as_mut_ptr());
        (0..k.div_ceil(cols)).into_par_iter().for_each(|task| {
            let dyp = dyp_addr as *const u32;
            let c0 = task * cols;
            let kc = cols.min(k - c0);
            with_scratch(BWD_ROWS / 2 * kc, BWD_ROWS * kc, |wp, stage| {
                let mut r0 = 0;
                while r0 < n {
                    let nr = BWD_ROWS.min(n - r0);
                    w.dequant_tile(r0, nr, c0, kc, &mut stage[..nr * kc]);
                    interleave_rows::<K>(stage, nr, kc, wp);
                    let pairs = nr.div_ceil(2);
                    let load = accumulate || r0 > 0;
                    let mut i = 0;
                    while i < m {
                        let rr = K::MR.min(m - i);
                        // SAFETY: the ISA's features were checked by the caller; dy pairs of rows
                        // i..i+rr, pairs r0/2..r0/2+pairs (<= n2/2) lie in dyb; wp has pairs×kc
                        // u32 (kc a multiple of 16); this task alone writes dx columns c0..c0+kc,
                        // rows i..i+rr < m.
                        unsafe {
                            K::rows(
                                rr,
                                pairs,
                                dyp.add(i * ds + r0 / 2),
                                ds,
                                wp.as_ptr(),
                                kc,
                                dxp.get().add(i * k + c0),
                                k,
                                load,
                            )
                        };
                        i += rr;
                    }
                    r0 += nr;
                }
            });
        });
    });
}

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 BF16 micro-kernels and the tiling around them.
    use super::*;
    use std::arch::x86_64::*;

    use crate::quant::matmul::SendPtr;

    /// `iters` rounds of 12 independent `vdpbf16ps` (the instruction's throughput).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn dp_chains(iters: usize, seed: f32) -> f32 {
        let a: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let b: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(2e-3));
        let x = _mm512_set1_ps(seed);
        // Named accumulators: an array may be kept on the stack.
        let (mut c0, mut c1, mut c2, mut c3, mut c4, mut c5) = (x, x, x, x, x, x);
        let (mut c6, mut c7, mut c8, mut c9, mut c10, mut c11) = (x, x, x, x, x, x);
        for _ in 0..iters {
            c0 = _mm512_dpbf16_ps(c0, a, b);
            c1 = _mm512_dpbf16_ps(c1, a, b);
            c2 = _mm512_dpbf16_ps(c2, a, b);
            c3 = _mm512_dpbf16_ps(c3, a, b);
            c4 = _mm512_dpbf16_ps(c4, a, b);
            c5 = _mm512_dpbf16_ps(c5, a, b);
            c6 = _mm512_dpbf16_ps(c6, a, b);
            c7 = _mm512_dpbf16_ps(c7, a, b);
            c8 = _mm512_dpbf16_ps(c8, a, b);
            c9 = _mm512_dpbf16_ps(c9, a, b);
            c10 = _mm512_dpbf16_ps(c10, a, b);
            c11 = _mm512_dpbf16_ps(c11, a, b);
        }
        let s = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
            _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)),
        );
        let s = _mm512_add_ps(
            s,
            _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
        );
        _mm512_reduce_add_ps(s)
    }

    /// Forward micro-kernel: `out[r][l] = Σ_p wt[r][p] · xb[p][l]` over `pairs` pairs, for
    /// `R` rows of the bf16 W tile (row stride `ws` pairs) and the `MB` rows of one x block.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `wt` addresses `R` rows of `pairs` u32 at stride `ws`;
    /// `xb` addresses `pairs × MB` u32.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn fwd_tile<const R: usize>(
        pairs: usize,
        wt: *const u32,
        ws: usize,
        xb: *const u32,
        out: &mut [[f32; MB]; FWD_MR],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for p in 0..pairs {
            let xq = xb.add(p * MB);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(xq as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(xq.add(16) as *const _));
            let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(xq.add(32) as *const _));
            for (r, a) in acc.iter_mut().enumerate() {
                let s: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*wt.add(r * ws + p) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], s, b0);
                a[1] = _mm512_dpbf16_ps(a[1], s, b1);
                a[2] = _mm512_dpbf16_ps(a[2], s, b2);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                _mm512_storeu_ps(out[r].as_mut_ptr().add(16 * v), *av);
            }
        }
    }

    /// Calls [`fwd_tile`] for `rows` (1..=8) rows.
    ///
    /// # Safety
    /// As [`fwd_tile`].
    unsafe fn fwd_tile_n(
        rows: usize,
        pairs: usize,
        wt: *const u32,
        ws: usize,
        xb: *const u32,
        out: &mut [[f32; MB]; FWD_MR],
    ) {
        const_dispatch!(
            rows,
            R,
            [8, 7, 6, 5, 4, 3, 2],
            1,
            fwd_tile::<R>(pairs, wt, ws, xb, out)
        )
    }

    pub(super) fn fwd<A: Activation>(x: &[A], m: usize, w: &QMatrix, y: &mut [f32]) {
        let (n, k) = (w.rows, w.cols);
        let half = k / 2;
        with_pack(m.div_ceil(MB) * half * MB, |xp| {
            pack_x::<A, MB>(x, m, k, xp);
            let xp = &*xp;
            let rows = fwd_rows(n, k);
            let yp = SendPtr(y.as_mut_ptr());
            (0..n.div_ceil(rows)).into_par_iter().for_each(|task| {
                let r0 = task * rows;
                let nr = rows.min(n - r0);
                with_scratch(nr * half, 0, |tile, _| {
                    // tile: W[r0..r0+nr, :] in bf16, row-major; as u32 it is pairs along K.
                    w.dequant_tile_bf16(r0, nr, 0, k, bytemuck::cast_slice_mut(tile));
                    let wt = tile.as_ptr();
                    let mut out = [[0f32; MB]; FWD_MR];
                    // yt: this task's columns of y for one x block, (nr, MB), written out row by row of y.
                    let mut yt = vec![0f32; nr * MB];
                    for b in 0..m.div_ceil(MB) {
                        let rows_x = MB.min(m - b * MB);
                        let xb = xp[b * half * MB..].as_ptr();
                        let mut g = 0;
                        while g < nr {
                            let gr = FWD_MR.min(nr - g);
                            // SAFETY: the CPU has AVX-512 BF16 (checked by the caller through
                            // has_avx512_bf16); wt + g*half addresses gr rows of `half` pairs inside
                            // `tile`, xb addresses half×MB pairs inside xp.
                            unsafe { fwd_tile_n(gr, half, wt.add(g * half), half, xb, &mut out) };
                            for (r, o) in out[..gr].iter().enumerate() {
                                yt[(g + r) * MB..][..MB].copy_from_slice(o);
                            }
                            g += gr;
                        }
                        for l in 0..rows_x {
                            // SAFETY: this task alone owns columns r0..r0+nr of y; row b*MB+l < m, so
                            // the nr elements from (b*MB+l)*n + r0 lie inside y.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    yp.get().add((b * MB + l) * n + r0),
                                    nr,
                                )
                            };
                            for (r, d) in dst.iter_mut().enumerate() {
                                *d = yt[r * MB + l];
                            }
                        }
                    }
                });
            });
        });
    }

    /// Input-gradient micro-kernel: `dx[r][c] (+)= Σ_q dyp[r][q] · wp[q][c]` for `R` rows of dy
    /// (pairs, row stride `ds` u32) and `V` vectors of 16 columns of the interleaved W chunk (row
    /// stride `wsp` u32), `pairs` pairs; dx rows at stride `xs` f32.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; every pointer addresses the elements these shapes and
    /// strides name; no other thread touches them in dx.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bwd_tile<const R: usize, const V: usize>(
        pairs: usize,
        dyp: *const u32,
        ds: usize,
        wp: *const u32,
        wsp: usize,
        dx: *mut f32,
        xs: usize,
        load: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if load {
            for (r, a) in acc.iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    *av = _mm512_loadu_ps(dx.add(r * xs + 16 * v));
                }
            }
        }
        for q in 0..pairs {
            let mut b = [_mm512_setzero_ps(); V];
            for (v, bv) in b.iter_mut().enumerate() {
                *bv = _mm512_loadu_ps(wp.add(q * wsp + 16 * v) as *const f32);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let s: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*dyp.add(r * ds + q) as i32));
                for (av, bv) in a.iter_mut().zip(&b) {
                    *av = _mm512_dpbf16_ps(*av, s, std::mem::transmute::<__m512, __m512bh>(*bv));
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                _mm512_storeu_ps(dx.add(r * xs + 16 * v), *av);
            }
        }
    }

    /// `bwd_tile::<R, V>` for the run-time tile `(r, v)`: r rows in 1..=6 ([`BWD_MR`]), v
    /// 16-lane vectors in 1..=4 (the kernels need both at compile time).
    macro_rules! bwd_dispatch {
        ($r:expr, $v:expr, $($args:expr),*) => {
            const_dispatch!($r, R, [6, 5, 4, 3, 2], 1, {
                const_dispatch!($v, V, [4, 3, 2], 1, bwd_tile::<R, V>($($args),*))
            })
        };
    }

    /// `out[i] = pair(bf16(lo[i]), bf16(hi[i]))` for 16 lanes (nearest even rounding).
    ///
    /// # Safety
    /// The CPU has AVX-512 BW and BF16; every slice has 16 elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pair16(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        // Word j of the result takes word IDX[j] of [lo0..lo15, hi0..hi15]: lo_i, hi_i, ...
        const IDX: [u16; 32] = {
            let mut t = [0u16; 32];
            let mut i = 0;
            while i < 16 {
                t[2 * i] = i as u16;
                t[2 * i + 1] = 16 + i as u16;
                i += 1;
            }
            t
        };
        let both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi.as_ptr()), _mm512_loadu_ps(lo.as_ptr()));
        let idx = _mm512_loadu_si512(IDX.as_ptr() as *const _);
        let v = _mm512_permutexvar_epi16(idx, std::mem::transmute::<__m512bh, __m512i>(both));
        _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v);
    }

    /// The AVX-512 BF16 input-gradient kernels.
    pub(super) struct Avx512;

    impl BwdKernels for Avx512 {
        const MR: usize = BWD_MR;
        const LANES: usize = 16;

        unsafe fn pair_lanes(lo: &[f32], hi: &[f32], out: &mut [u32]) {
            pair16(lo, hi, out)
        }

        /// Micro-tiles of `rr` rows and up to 4 vectors (64 columns) across the chunk.
        unsafe fn rows(
            rr: usize,
            pairs: usize,
            dyp: *const u32,
            ds: usize,
            wp: *const u32,
            kc: usize,
            dx: *mut f32,
            xs: usize,
            load: bool,
        ) {
            let mut c = 0;
            while c < kc {
                let v = (kc - c).min(64) / 16;
                bwd_dispatch!(rr, v, pairs, dyp, ds, wp.add(c), kc, dx.add(c), xs, load);
                c += 16 * v;
            }
        }
    }
}
