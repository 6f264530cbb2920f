//! The aarch64 BF16 (FEAT_BF16) micro-kernels and the tiling around them.
//!
//! `BFDOT Vd.4S, Vn.8H, Vm.2H[j]` adds, in each of 4 f32 lanes, the two products of a pair of bf16
//! values of `Vn` with pair `j` of `Vm` (`d[i] += n[2i]·m[2j] + n[2i+1]·m[2j+1]`): the by-element
//! form broadcasts a pair, as the x86 kernels' `vpbroadcastd` does, so the layouts are the x86 ones
//! with 4-lane vectors:
//!
//! - Forward: x packed into blocks of [`MBN`] rows, `xp[block][K/2][MBN]` pairs (lanes over rows
//!   of x); W's bf16 tile row-major, four pairs of a row loaded at once and used by lane. 4 rows of
//!   W × 16 rows of x = 16 accumulators.
//! - Input gradient: W's chunk interleaved into pairs of rows `wp[q][c] = (W[2q, c], W[2q+1, c])`
//!   (lanes over columns of dx); dy row-major bf16, four pairs at once, used by lane. 4 rows of
//!   dy × 16 columns of dx = 16 accumulators.
//!
//! The BF16 intrinsics (`vbfdotq_laneq_f32`) are unstable in Rust 1.95, hence `asm!` inside
//! `#[target_feature(enable = "bf16")]` functions (the assembler needs the feature there).
//! Without FEAT_EBF16, BFDOT rounds its sums to odd and flushes subnormals (Arm ARM, BFDotAdd):
//! the result differs from the f64 reference by f32 summation error, as `vdpbf16ps` does.
use super::*;
use crate::quant::matmul::SendPtr;
use crate::quant::simd::neon::bf16x4;
use std::arch::aarch64::*;

/// Rows of x per packed forward block: 4 vectors of 4 lanes.
pub(super) const MBN: usize = 16;
/// Rows of W per forward micro-tile (accumulators: 4 × 4 vectors).
const FWD_MR: usize = 4;
/// Rows of dy per input-gradient micro-tile (accumulators: 4 × 4 vectors of 4 columns).
const BWD_MR: usize = 4;
/// Columns of dx per input-gradient micro-tile (4 vectors; every task's span is a multiple of 16).
const BWD_COLS: usize = 16;

/// `$acc += BFDOT($a, pair $lane of $b)`, lane-wise (`$acc`: float32x4_t, `$a`, `$b`: 8 bf16 as
/// uint32x4_t). Only inside a function with the `bf16` target feature.
macro_rules! bfdot_lane {
    ($acc:expr, $a:expr, $b:expr, $lane:literal) => {
        std::arch::asm!(
            concat!("bfdot {acc:v}.4s, {a:v}.8h, {b:v}.2h[", $lane, "]"),
            acc = inout(vreg) $acc,
            a = in(vreg) $a,
            b = in(vreg) $b,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
}

/// `iters` rounds of 12 independent vector `BFDOT`s (the instruction's throughput).
///
/// # Safety
/// The CPU has NEON and BF16.
#[target_feature(enable = "neon,bf16")]
pub(super) unsafe fn dp_chains(iters: usize, seed: f32) -> f32 {
    // bf16 pairs (0.5, 0.25) and (1e-3, 2e-3), rounded.
    let a = vdupq_n_u32(0x3e80_3f00);
    let b = vdupq_n_u32(0x3b03_3a83);
    let mut acc = [vdupq_n_f32(seed); 12];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            std::arch::asm!(
                "bfdot {acc:v}.4s, {a:v}.8h, {b:v}.8h",
                acc = inout(vreg) *c,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
    }
    acc.iter().map(|v| vaddvq_f32(*v)).sum()
}

/// Forward micro-kernel: `out[r][l] = Σ_p wt[r][p] · xb[p][l]` over `pairs` pairs (a multiple of
/// 4), for `R` rows of the bf16 W tile (row stride `ws` pairs) and the `MBN` rows of one x block.
///
/// # Safety
/// The CPU has NEON and BF16; `wt` addresses `R` rows of `pairs` u32 at stride `ws`; `xb`
/// addresses `pairs × MBN` u32.
#[target_feature(enable = "neon,bf16")]
unsafe fn fwd_tile<const R: usize>(
    pairs: usize,
    wt: *const u32,
    ws: usize,
    xb: *const u32,
    out: &mut [[f32; MBN]; FWD_MR],
) {
    let mut acc = [[vdupq_n_f32(0.0); 4]; R];
    let mut p = 0;
    while p < pairs {
        // Pairs p..p+4 of each W row: lane j is pair p + j.
        let mut wv = [vdupq_n_u32(0); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = vld1q_u32(wt.add(r * ws + p));
        }
        macro_rules! step {
            ($j:literal) => {{
                let xq = xb.add((p + $j) * MBN);
                let xv = [
                    vld1q_u32(xq),
                    vld1q_u32(xq.add(4)),
                    vld1q_u32(xq.add(8)),
                    vld1q_u32(xq.add(12)),
                ];
                for (a, w) in acc.iter_mut().zip(&wv) {
                    for (av, xv) in a.iter_mut().zip(&xv) {
                        bfdot_lane!(*av, *xv, *w, $j);
                    }
                }
            }};
        }
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        p += 4;
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            vst1q_f32(out[r].as_mut_ptr().add(4 * v), *av);
        }
    }
}

/// Calls [`fwd_tile`] for `rows` (1..=4) rows.
///
/// # Safety
/// As [`fwd_tile`].
unsafe fn fwd_tile_n(
    rows: usize,
    pairs: usize,
    wt: *const u32,
    ws: usize,
    xb: *const u32,
    out: &mut [[f32; MBN]; FWD_MR],
) {
    const_dispatch!(rows, R, [4, 3, 2], 1, fwd_tile::<R>(pairs, wt, ws, xb, out))
}

/// `y = x·Wᵀ` on FEAT_BF16 (the caller checked [`has_neon_bf16`] and [`fits`]: K a multiple of 16).
pub(super) fn fwd<A: Activation>(x: &[A], m: usize, w: &QMatrix, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let half = k / 2;
    with_pack(m.div_ceil(MBN) * half * MBN, |xp| {
        pack_x::<A, MBN>(x, m, k, xp);
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
                let mut out = [[0f32; MBN]; FWD_MR];
                for b in 0..m.div_ceil(MBN) {
                    let rows_x = MBN.min(m - b * MBN);
                    let xb = xp[b * half * MBN..].as_ptr();
                    let mut g = 0;
                    while g < nr {
                        let gr = FWD_MR.min(nr - g);
                        // SAFETY: the CPU has NEON and BF16 (the caller checked has_neon_bf16);
                        // wt + g*half addresses gr rows of `half` pairs inside `tile`, xb
                        // addresses half×MBN pairs inside xp; half is a multiple of 8.
                        unsafe { fwd_tile_n(gr, half, wt.add(g * half), half, xb, &mut out) };
                        for l in 0..rows_x {
                            // SAFETY: this task alone owns columns r0..r0+nr of y; row b*MBN+l
                            // < m, so the gr elements from (b*MBN+l)*n + r0+g lie inside y.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    yp.get().add((b * MBN + l) * n + r0 + g),
                                    gr,
                                )
                            };
                            for (r, d) in dst.iter_mut().enumerate() {
                                *d = out[r][l];
                            }
                        }
                        g += gr;
                    }
                }
            });
        });
    });
}

/// Input-gradient micro-kernel: `dx[r][c] (+)= Σ_q dyp[r][q] · wp[q][c]` for `R` rows of dy
/// (pairs, row stride `ds` u32) and 16 columns of the interleaved W chunk (row stride `wsp` u32),
/// `pairs` pairs; dx rows at stride `xs` f32.
///
/// # Safety
/// The CPU has NEON and BF16; every pointer addresses the elements these shapes and strides
/// name; no other thread touches them in dx.
#[target_feature(enable = "neon,bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn bwd_tile<const R: usize>(
    pairs: usize,
    dyp: *const u32,
    ds: usize,
    wp: *const u32,
    wsp: usize,
    dx: *mut f32,
    xs: usize,
    load: bool,
) {
    let mut acc = [[vdupq_n_f32(0.0); 4]; R];
    if load {
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, av) in a.iter_mut().enumerate() {
                *av = vld1q_f32(dx.add(r * xs + 4 * v));
            }
        }
    }
    let wrow = |q: usize| {
        let p = wp.add(q * wsp);
        [
            vld1q_u32(p),
            vld1q_u32(p.add(4)),
            vld1q_u32(p.add(8)),
            vld1q_u32(p.add(12)),
        ]
    };
    let mut q = 0;
    while q + 4 <= pairs {
        // Pairs q..q+4 of each dy row: lane j is pair q + j.
        let mut dv = [vdupq_n_u32(0); R];
        for (r, v) in dv.iter_mut().enumerate() {
            *v = vld1q_u32(dyp.add(r * ds + q));
        }
        macro_rules! step {
            ($j:literal) => {{
                let b = wrow(q + $j);
                for (a, d) in acc.iter_mut().zip(&dv) {
                    for (av, bv) in a.iter_mut().zip(&b) {
                        bfdot_lane!(*av, *bv, *d, $j);
                    }
                }
            }};
        }
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        q += 4;
    }
    // The last (pairs mod 4) pairs, one at a time.
    while q < pairs {
        let b = wrow(q);
        for (r, a) in acc.iter_mut().enumerate() {
            let d = vdupq_n_u32(*dyp.add(r * ds + q));
            for (av, bv) in a.iter_mut().zip(&b) {
                bfdot_lane!(*av, *bv, d, 0);
            }
        }
        q += 1;
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, av) in a.iter().enumerate() {
            vst1q_f32(dx.add(r * xs + 4 * v), *av);
        }
    }
}

/// `out[i] = pair(bf16(lo[i]), bf16(hi[i]))` for 4 lanes (nearest even, as `half`).
///
/// # Safety
/// The CPU has NEON; every slice has 4 elements.
#[target_feature(enable = "neon")]
unsafe fn pair4(lo: &[f32], hi: &[f32], out: &mut [u32]) {
    let l = bf16x4(vld1q_f32(lo.as_ptr()));
    let h = bf16x4(vld1q_f32(hi.as_ptr()));
    // lo0, hi0, lo1, hi1 | lo2, hi2, lo3, hi3: as u32 (little-endian), pair i has lo in its low half.
    let v = vcombine_u16(vzip1_u16(l, h), vzip2_u16(l, h));
    vst1q_u32(out.as_mut_ptr(), vreinterpretq_u32_u16(v));
}

/// The FEAT_BF16 input-gradient kernels.
pub(super) struct Neon;

impl BwdKernels for Neon {
    const MR: usize = BWD_MR;
    const LANES: usize = 4;

    unsafe fn pair_lanes(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        pair4(lo, hi, out)
    }

    /// Micro-tiles of `rr` rows and [`BWD_COLS`] columns across the chunk.
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
        for c in (0..kc).step_by(BWD_COLS) {
            const_dispatch!(rr, R, [4, 3, 2], 1, {
                bwd_tile::<R>(pairs, dyp, ds, wp.add(c), kc, dx.add(c), xs, load)
            })
        }
    }
}
