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
//! Both are one micro-kernel ([`tile`]) over a [`Sweep`]; the tilings around it are the x86 ones
//! (`fwd_tiled`, `bwd_input_tiled`).
//!
//! The BF16 intrinsics (`vbfdotq_laneq_f32`) are unstable in Rust 1.95, hence `asm!` inside
//! `#[target_feature(enable = "bf16")]` functions (the assembler needs the feature there).
//! Without FEAT_EBF16, BFDOT rounds its sums to odd and flushes subnormals (Arm ARM, BFDotAdd):
//! the result differs from the f64 reference by f32 summation error, as `vdpbf16ps` does.
use super::*;
use std::arch::aarch64::*;

/// Rows of x per packed forward block: 4 vectors of 4 lanes.
pub(super) const MBN: usize = 16;
/// Rows of W per forward micro-tile, and of dy per input-gradient one (accumulators: 4 × 4
/// vectors).
const MR: usize = 4;

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

/// The micro-kernel of both products: `out[r][c] (+)= Σ_q a[r][q] · b[q][c]` for `R` rows of
/// `s.a` and the first 16 columns of `s.b`.
///
/// # Safety
/// The CPU has NEON and BF16; as [`Bf16Kernels::sweep`], with `s.rows == R`.
#[target_feature(enable = "neon,bf16")]
unsafe fn tile<const R: usize>(s: &Sweep) {
    let (pairs, ap, ast, bp) = (s.pairs, s.a, s.a_stride, s.b);
    // SAFETY: the caller's contract (`s` as `sweep` requires)
    let mut acc: [[float32x4_t; 4]; R] = unsafe { s.load_acc(vdupq_n_f32(0.0)) };
    let wrow = |q: usize| {
        let p = bp.add(q * s.b_stride);
        [
            vld1q_u32(p),
            vld1q_u32(p.add(4)),
            vld1q_u32(p.add(8)),
            vld1q_u32(p.add(12)),
        ]
    };
    let mut q = 0;
    while q + 4 <= pairs {
        // Pairs q..q+4 of each row of a: lane j is pair q + j.
        let mut dv = [vdupq_n_u32(0); R];
        for (r, v) in dv.iter_mut().enumerate() {
            *v = vld1q_u32(ap.add(r * ast + q));
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
            let d = vdupq_n_u32(*ap.add(r * ast + q));
            for (av, bv) in a.iter_mut().zip(&b) {
                bfdot_lane!(*av, *bv, d, 0);
            }
        }
        q += 1;
    }
    // SAFETY: as the load above
    unsafe { s.store_acc(&acc) };
}

/// The FEAT_BF16 kernels.
pub(super) struct Neon;

impl Bf16Kernels for Neon {
    const MB: usize = MBN;
    const FWD_MR: usize = MR;
    const BWD_MR: usize = MR;
    const NR: usize = 16;

    /// `tile::<R>` for the run-time `t.rows` (16 columns).
    unsafe fn tile(t: &Sweep, _width: usize) {
        const_dispatch!(t.rows, R, [4, 3, 2], 1, tile::<R>(t))
    }
}
