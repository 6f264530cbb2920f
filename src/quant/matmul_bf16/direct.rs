//! The tiled bf16 products written straight into an op's output, once, so the output may be
//! uninitialised memory: no zero fill, no product buffer to copy or round from (a fresh output's
//! first writes are most of what such a pass costs). The forward can carry a rank-R term `h·Bᵀ`
//! (LoRA's up projection beside its frozen base): the concatenation `[x | h]·[W | B]ᵀ`, run as one
//! more sweep of R's pairs over each y tile while the tile is still in the task's scratch. Apart,
//! the term was a product of its own at rank 16 (pairs too few for the AMX tiles: the AVX-512 edge
//! kernels), a row buffer written and read back, and an add: 9.5 % of a ~100M bf16 step at batch
//! 1 (session 24).
use super::dense::{pack_row_pairs, pack_rows, pack_transposed};
use super::{bwd_input_tiled, check_operands, fits, fwd_tiled, Activation, QMatrix};
use crate::quant::matmul::SendPtr;
use crate::quant::transpose::transpose32;
use half::bf16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `y = x·Wᵀ (+ h·Bᵀ)` as [`super::qmatmul_fwd_bf16`], with an optional low-rank term summed in
/// the same f32 accumulators ([`LowRank`]), each y tile written straight into `y` (f32, or
/// rounded to bf16): every element once, so `y` may be uninitialised. Returns false, y
/// untouched, where the tiled bf16 kernels do not run (no bf16 kernels, M ≤
/// [`crate::quant::matmul::GEMV_MAX_M`], K not a multiple of 16): the caller computes it
/// otherwise.
pub fn qmatmul_fwd_bf16_into<A: Activation>(
    x: &[A],
    m: usize,
    w: &QMatrix,
    lr: Option<LowRank<'_>>,
    y: FwdOut<'_>,
) -> bool {
    let dims = (w.rows, w.cols);
    let (len, out) = match y {
        FwdOut::F32(y) => (y.len(), YOut::F32(y.as_mut_ptr().cast())),
        FwdOut::Bf16(y) => (y.len(), YOut::Bf16(y.as_mut_ptr().cast())),
    };
    check_operands("qmatmul_fwd_bf16_into", ("x", x.len()), ("y", len), m, dims);
    if let Some(lr) = lr {
        lr.check(m, w.rows);
    }
    if fits(w, m) {
        return_on_bf16_kernels!(K => {
            fwd_tiled::<K, A>(x, m, w, lr, out);
            true
        });
    }
    false
}

/// `dx = dy·W` as [`super::qmatmul_bwd_input_bf16`] (not accumulating) into `dx` that may be
/// uninitialised: the tiled kernels write every element once; with `lr`, also the rank-R term's
/// `dh = dy·B` from the same bf16 rows of dy ([`LowRankGrad`]). Returns false, dx and dh
/// untouched, where they do not run (as [`qmatmul_fwd_bf16_into`]).
pub fn qmatmul_bwd_input_bf16_into<A: Activation>(
    dy: &[A],
    m: usize,
    w: &QMatrix,
    dx: &mut [MaybeUninit<f32>],
    lr: Option<LowRankGrad<'_>>,
) -> bool {
    let dims = (w.rows, w.cols);
    let op = "qmatmul_bwd_input_bf16_into";
    check_operands(op, ("dx", dx.len()), ("dy", dy.len()), m, dims);
    if let Some(l) = &lr {
        l.check(m, w.rows);
    }
    if !fits(w, m) || !super::has_bf16_kernels() {
        return false;
    }
    // Not accumulating, the first chunk of W's rows (W has rows: fits) stores every element of
    // dx without loading it, and later chunks load only what it stored.
    let dx = dx.as_mut_ptr().cast::<f32>();
    // The rank-R side: B by row pairs (pairs along N, as dy's rows are), R padded to whole
    // 16-column units; dh written straight into its rows where R is whole units, else through
    // `staged`'s rows of the padded width.
    let mut lr = lr.filter(|l| l.r > 0);
    let (mut bp, mut staged) = (Vec::new(), Vec::new());
    let side = lr.as_mut().map(|l| {
        let cols = l.r.next_multiple_of(16);
        bp = vec![0u32; w.rows.div_ceil(2) * cols];
        pack_row_pairs(l.b, l.r, (w.rows, l.r), &mut bp, cols);
        let out = match l.r == cols {
            true => l.dh.as_mut_ptr(),
            false => {
                staged = vec![0f32; m * cols];
                staged.as_mut_ptr()
            }
        };
        (cols, SendPtr(out))
    });
    let lg = side.map(|(cols, out)| LowGrad { b: &bp, cols, out });
    let tiled = || -> bool {
        return_on_bf16_kernels!(K => {
            bwd_input_tiled::<K, A>(dy, m, w, dx, false, lg);
            true
        });
        false
    };
    let ran = tiled();
    if let (true, Some(l)) = (ran && !staged.is_empty(), lr) {
        let cols = staged.len() / m;
        for (d, s) in l.dh.chunks_exact_mut(l.r).zip(staged.chunks_exact(cols)) {
            d.copy_from_slice(&s[..l.r]);
        }
    }
    ran
}

/// The rank-R side of [`super::bwd_input_tiled`]: `out (M × cols) = dy·B` for B packed by row pairs
/// (`b[q][c] = (B[2q][c], B[2q+1][c])`, N.div_ceil(2) rows of `cols` pairs, a multiple of 16,
/// zero past R); `out` holds M rows of `cols` f32 that nothing else touches during the call.
#[derive(Clone, Copy)]
pub(super) struct LowGrad<'a> {
    pub(super) b: &'a [u32],
    pub(super) cols: usize,
    pub(super) out: SendPtr,
}

/// The rank-R side of an input gradient for [`qmatmul_bwd_input_bf16_into`]: `dh = dy·B` (M×R,
/// written whole) for B (N×R, f32, row-major, rounded to bf16 as an operand, nearest even), f32
/// sums of the bf16 products as LoRA's bf16 products take them. Why: LoRA's up projection needs
/// `dh = d·B` of the same gradient d whose `d·W` the frozen linear needs; apart, it converted d
/// to bf16 again for a product of its own (session 25).
pub struct LowRankGrad<'a> {
    /// B: N rows of R.
    pub b: &'a [f32],
    /// The rank R.
    pub r: usize,
    /// dh: M rows of R.
    pub dh: &'a mut [f32],
}

impl LowRankGrad<'_> {
    /// Checks dh and B against `m` and `n` rows (a caller bug otherwise).
    fn check(&self, m: usize, n: usize) {
        let op = "qmatmul_bwd_input_bf16_into";
        check_rank(op, ("dh", self.dh.len(), m), ("B", self.b.len(), n), self.r);
    }
}

/// Asserts that the two operands of a rank-`r` term, `(name, length, rows)` each, hold their
/// rows of `r` (a caller bug otherwise), naming `op`.
fn check_rank(
    op: &str,
    (a, la, ma): (&str, usize, usize),
    (b, lb, mb): (&str, usize, usize),
    r: usize,
) {
    assert!(
        la == ma * r && lb == mb * r,
        "{op}: {a} ({la}) and {b} ({lb}) are not {ma} and {mb} rows of rank {r}"
    );
}

/// Scalar reference of [`LowRankGrad`]'s product: `dh[i][q] = Σ_j bf16(dy[i][j])·bf16(B[j][q])`,
/// f64 sums (the tests' check of [`qmatmul_bwd_input_bf16_into`]).
pub fn low_rank_grad_ref(dy: &[f32], (m, n): (usize, usize), b: &[f32], r: usize) -> Vec<f32> {
    let h = |v: f32| half::bf16::from_f32(v).to_f64();
    let mut dh = vec![0f32; m * r];
    for i in 0..m {
        for q in 0..r {
            let s: f64 = (0..n).map(|j| h(dy[i * n + j]) * h(b[j * r + q])).sum();
            dh[i * r + q] = s as f32;
        }
    }
    dh
}

/// `h·Bᵀ` for [`qmatmul_fwd_bf16_into`]: h (M×R) and B (N×R), f32, row-major, both
/// rounded to bf16 as operands (nearest even), as LoRA's bf16 products round them.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// h: M rows of R.
    pub h: &'a [f32],
    /// B: N rows of R.
    pub b: &'a [f32],
    /// The rank R.
    pub r: usize,
}

impl LowRank<'_> {
    /// Pairs of the term's contraction in the packed operands: R rounded up to whole rounds of
    /// 16 pairs (an AMX tile's depth; the zero pairs past R add nothing), 0 for R = 0.
    pub(super) fn pairs(&self) -> usize {
        self.r.div_ceil(32) * 16
    }

    /// u32 words [`LowRank::pack`] fills for `m` rows of h in blocks of `mb` and `n` rows of B.
    pub(super) fn words(&self, m: usize, n: usize, mb: usize) -> usize {
        self.pairs() * (m.div_ceil(mb) * mb + n)
    }

    /// Packs h as x is packed (`hp[block][pairs][mb]`, pairs along R) and B as W's tile is read
    /// (`bp[n][pairs]`), zeros past R; `buf` holds [`LowRank::words`]. Returns `(hp, bp)`.
    pub(super) fn pack<'b>(
        &self,
        (m, n, mb): (usize, usize, usize),
        buf: &'b mut [u32],
    ) -> (&'b [u32], &'b [u32]) {
        let (p, r) = (self.pairs(), self.r);
        let (hp, bp) = buf.split_at_mut(m.div_ceil(mb) * p * mb);
        hp.par_chunks_mut(p * mb).enumerate().for_each(|(i, dst)| {
            let rows = mb.min(m - i * mb);
            dst.fill(0);
            pack_transposed(&self.h[i * mb * r..], r, (rows, r), (dst, mb), false);
        });
        let bp = &mut bp[..n * p];
        bp.par_chunks_mut(64 * p).enumerate().for_each(|(i, dst)| {
            let rows = dst.len() / p;
            dst.fill(0);
            pack_rows(&self.b[i * 64 * r..], r, (rows, r), dst, p);
        });
        (hp, bp)
    }

    /// Checks h and B against `m` and `n` rows (a caller bug otherwise).
    pub(super) fn check(&self, m: usize, n: usize) {
        let op = "qmatmul_fwd_bf16_into";
        check_rank(op, ("h", self.h.len(), m), ("B", self.b.len(), n), self.r);
    }
}

/// Scalar reference of the term: `y[i][j] += Σ_q bf16(h[i][q])·bf16(B[j][q])`, f64 sums (the
/// tests' check of [`qmatmul_fwd_bf16_into`] beside [`super::qmatmul_fwd_bf16_ref`]).
pub fn low_rank_ref(lr: LowRank<'_>, m: usize, n: usize, y: &mut [f32]) {
    lr.check(m, n);
    let r = lr.r;
    let h = |v: f32| half::bf16::from_f32(v).to_f64();
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..r)
                .map(|q| h(lr.h[i * r + q]) * h(lr.b[j * r + q]))
                .sum();
            y[i * n + j] = (y[i * n + j] as f64 + s) as f32;
        }
    }
}

/// Where [`qmatmul_fwd_bf16_into`] writes y (M×N, row-major): f32, or each value rounded
/// to bf16 (nearest even, the SIMD rounding of activations) as it is written. Every element is
/// written once, so the memory may be uninitialised (a fresh output, no zero fill).
pub enum FwdOut<'a> {
    /// f32 values.
    F32(&'a mut [MaybeUninit<f32>]),
    /// bf16 values.
    Bf16(&'a mut [MaybeUninit<bf16>]),
}

/// [`FwdOut`] as the forward's tasks share it (each writes its own columns).
#[derive(Clone, Copy)]
pub(super) enum YOut {
    F32(*mut f32),
    Bf16(*mut bf16),
}

// SAFETY: tasks write disjoint elements through the pointer (see `put_transposed`).
unsafe impl Send for YOut {}
// SAFETY: as above.
unsafe impl Sync for YOut {}

impl YOut {
    /// Asks for the lines [`YOut::put_transposed`] with the same arguments will write, into L2,
    /// before the sweep that computes them (a hint: it never faults, writes nothing); a no-op off
    /// x86.
    pub(super) fn prefetch(self, (rows, cols): (usize, usize), at: usize, ds: usize) {
        let (p, size) = match self {
            YOut::F32(y) => (y as *const u8, 4),
            YOut::Bf16(y) => (y as *const u8, 2),
        };
        #[cfg(target_arch = "x86_64")]
        for c in 0..cols {
            let row = p.wrapping_add((at + c * ds) * size);
            for o in (0..rows * size).step_by(64) {
                // SAFETY: `prefetcht1` needs only SSE (every x86_64 CPU) and never faults.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(o) as *const i8)
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (p, size, rows, cols, at, ds);
    }

    /// `y[at + c·ds + r] = src[r·ss + c]` for `r < rows`, `c < cols`: a transposed tile of f32
    /// sums written out, rounded to bf16 for a bf16 y (transposed 64 rows at a time through the
    /// stack, then rounded row by row).
    ///
    /// # Safety
    /// Those elements lie inside y and no other thread writes them; `src` holds `rows` rows of
    /// `ss` with `cols ≤ ss`.
    pub(super) unsafe fn put_transposed(
        self,
        src: &[f32],
        ss: usize,
        (rows, cols): (usize, usize),
        at: usize,
        ds: usize,
    ) {
        let src = src.as_ptr() as *const u32;
        match self {
            YOut::F32(y) => transpose32(src, ss, (rows, cols), y.add(at) as *mut u32, ds),
            YOut::Bf16(y) => {
                const R: usize = 64;
                let mut t = [0f32; 16 * R];
                let mut row = [bf16::ZERO; R];
                for c0 in (0..cols).step_by(16) {
                    let cc = 16.min(cols - c0);
                    for r0 in (0..rows).step_by(R) {
                        let rr = R.min(rows - r0);
                        let tp = t.as_mut_ptr() as *mut u32;
                        transpose32(src.add(r0 * ss + c0), ss, (rr, cc), tp, R);
                        for (c, tc) in t.chunks_exact(R).take(cc).enumerate() {
                            <f32 as super::Activation>::row_to_bf16(&tc[..rr], &mut row[..rr]);
                            let d = y.add(at + (c0 + c) * ds + r0);
                            std::ptr::copy_nonoverlapping(row.as_ptr(), d, rr);
                        }
                    }
                }
            }
        }
    }
}
