//! The AVX-512 BF16 micro-kernels.
use super::*;
use std::arch::x86_64::*;

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
    // twelve independent chains: one `vdpbf16ps` into each accumulator per iteration
    macro_rules! chains {
        ($($c:ident),*) => { $($c = _mm512_dpbf16_ps($c, a, b);)* };
    }
    for _ in 0..iters {
        chains!(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11);
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

/// The micro-kernel of both products: `out[r][c] (+)= Σ_q a[r][q] · b[q][c]` for `R` rows of
/// `s.a` and `V` vectors of 16 columns of `s.b` (the first 16·V of the sweep's columns).
///
/// # Safety
/// The CPU has AVX-512 F and BF16; as [`Bf16Kernels::sweep`], with `s.rows == R`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const R: usize, const V: usize>(s: &Sweep) {
    // SAFETY: the caller's contract (`s` as `sweep` requires)
    let mut acc: [[__m512; V]; R] = unsafe { s.load_acc(_mm512_setzero_ps()) };
    for q in 0..s.pairs {
        let mut b = [_mm512_setzero_ps(); V];
        for (v, bv) in b.iter_mut().enumerate() {
            *bv = _mm512_loadu_ps(s.b.add(q * s.b_stride + 16 * v) as *const f32);
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let p: __m512bh =
                std::mem::transmute(_mm512_set1_epi32(*s.a.add(r * s.a_stride + q) as i32));
            for (av, bv) in a.iter_mut().zip(&b) {
                *av = _mm512_dpbf16_ps(*av, p, std::mem::transmute::<__m512, __m512bh>(*bv));
            }
        }
    }
    // SAFETY: as the load above
    unsafe { s.store_acc(&acc) };
}

/// The AVX-512 BF16 kernels.
pub(super) struct Avx512;

impl Bf16Kernels for Avx512 {
    const MB: usize = MB;
    const FWD_MR: usize = FWD_MR;
    const BWD_MR: usize = BWD_MR;
    const NR: usize = 64;

    /// `tile::<R, V>` for the run-time `(t.rows, width / 16)`: 8 × 3 accumulators for the
    /// forward's 48 columns, 6 × 4 for the input gradient.
    unsafe fn tile(t: &Sweep, width: usize) {
        const_dispatch!(t.rows, R, [8, 7, 6, 5, 4, 3, 2], 1, {
            const_dispatch!(width / 16, V, [4, 3, 2], 1, tile::<R, V>(t))
        })
    }
}
