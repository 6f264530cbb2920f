//! The attention's block products for one head, in f32 (`gemm`) or, in a bf16 step on a CPU with
//! bf16 kernels, with bf16 products on the AMX / AVX-512 BF16 / FEAT_BF16 micro-kernels
//! ([`crate::quant::matmul_bf16::dense_bf16`]); sums are f32 either way.
//!
//! Notation: `X[i0..i0+rows]` a block of query-side rows (Q or dO), `Y[..kend]` the first `kend`
//! key-side rows (K or V), `M` (rows × ks) a block of probabilities or score gradients whose
//! columns past `kend` are zero. The bf16 products round what the step already holds in bf16 (Q,
//! K, V, dO: exact) and the f32 blocks M (P and dS, as flash attention does in half precision).
use crate::quant::matmul::aligned_slice;
use crate::quant::matmul_bf16::{dense_bf16, pack_row_pairs, pack_rows, pack_transposed, Pairs};

/// Which of a head's matrices an operand is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mat {
    Q,
    K,
    V,
    /// The output's gradient (backward only).
    DO,
}

/// One head's row-major (T × D) f32 matrices; `d_o` in backward only.
#[derive(Clone, Copy)]
pub(super) struct HeadMats<'a> {
    pub(super) q: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    pub(super) d_o: &'a [f32],
    pub(super) t: usize,
    pub(super) d: usize,
}

impl<'a> HeadMats<'a> {
    fn get(&self, m: Mat) -> &'a [f32] {
        match m {
            Mat::Q => self.q,
            Mat::K => self.k,
            Mat::V => self.v,
            Mat::DO => self.d_o,
        }
    }

    /// Rows `i0..i0+rows` of `m`.
    fn block(&self, m: Mat, i0: usize, rows: usize) -> &'a [f32] {
        &self.get(m)[i0 * self.d..(i0 + rows) * self.d]
    }
}

/// A head's block products (see the module docs for the names).
pub(super) trait BlockProducts<'a> {
    /// The same key-side matrices (and their packs) with another query head's Q and dO: the query
    /// heads of a GQA group share K and V.
    fn set_query(&mut self, q: &'a [f32], d_o: &'a [f32]);
    /// The row stride of a score block whose rows see keys `0..kend` (≥ kend).
    fn stride(&self, kend: usize) -> usize;
    /// `s (rows × ks) = X[i0..i0+rows] · Y[..kend]ᵀ` for `blk = (i0, rows, kend)`, unscaled;
    /// columns `kend..ks` are 0.
    fn scores(&mut self, x: Mat, y: Mat, blk: (usize, usize, usize), s: &mut [f32]);
    /// `out (rows × D) = M · Y[..kend]` for `dims = (rows, kend)`.
    fn mix(&mut self, m: &[f32], y: Mat, dims: (usize, usize), out: &mut [f32]);
    /// `out[..kend] (kend × D) += Mᵀ · X[i0..i0+rows]`.
    fn mix_t(&mut self, m: &[f32], x: Mat, blk: (usize, usize, usize), out: &mut [f32]);
}

/// The products for `mats`: bf16 when `bf16` (a bf16 step), this CPU has the kernels and D is a
/// multiple of 16 (the kernels' column unit); f32 otherwise.
pub(super) fn products<'a>(mats: HeadMats<'a>, bf16: bool) -> Box<dyn BlockProducts<'a> + 'a> {
    if takes_bf16(mats.d, bf16) {
        Box::new(Bf16Products::new(mats))
    } else {
        Box::new(F32Products(mats))
    }
}

/// Whether [`products`] gives bf16 products for head size `d` in a step that asks for them
/// (`bf16`): this CPU has the kernels, D is a multiple of 16 (their column unit), and the test
/// switch `F32_ATTENTION_PRODUCTS` is off.
pub(super) fn takes_bf16(d: usize, bf16: bool) -> bool {
    use crate::quant::matmul_bf16::has_bf16_kernels;
    let f32_only = super::F32_ATTENTION_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed);
    bf16 && !f32_only && has_bf16_kernels() && d.is_multiple_of(16) && d > 0
}

/// The row stride of a score block over keys `0..kend`: kend, widened to [`KEY_UNIT`] for bf16
/// products.
pub(super) fn key_stride(kend: usize, bf16: bool) -> usize {
    if bf16 {
        kend.next_multiple_of(KEY_UNIT)
    } else {
        kend
    }
}

/// Bytes [`products`] holds for a head of `t` rows of `d` with bf16 products, beside the caller's
/// blocks of `bq` query rows: the key-side packs (K and V, two layouts each), a block's or M's
/// pack, and [`crate::quant::matmul_bf16::pack_transposed`]'s staging (an upper bound).
pub(super) fn bf16_products_bytes(t: usize, d: usize, bq: usize) -> usize {
    let tp = t.next_multiple_of(KEY_UNIT);
    let packs = 4 * (tp * d / 2 + 16);
    let a = (bq * d / 2).max(bq * tp / 2).max(tp * bq.div_ceil(2)) + 16;
    let b = bq.div_ceil(2) * d + 16;
    let stage = bq.div_ceil(2) * tp + tp;
    (packs + a + b + stage) * 4
}

/// f32 products through `gemm`.
struct F32Products<'a>(HeadMats<'a>);

impl<'a> BlockProducts<'a> for F32Products<'a> {
    fn set_query(&mut self, q: &'a [f32], d_o: &'a [f32]) {
        (self.0.q, self.0.d_o) = (q, d_o);
    }

    fn stride(&self, kend: usize) -> usize {
        key_stride(kend, false)
    }

    fn scores(&mut self, x: Mat, y: Mat, (i0, rows, kend): (usize, usize, usize), s: &mut [f32]) {
        let (h, d) = (&self.0, self.0.d);
        let (x, y) = (
            (h.block(x, i0, rows), d, false),
            (h.block(y, 0, kend), d, true),
        );
        gemm_f32((rows, kend, d), (s, kend, false), x, y);
    }

    fn mix(&mut self, m: &[f32], y: Mat, (rows, kend): (usize, usize), out: &mut [f32]) {
        let d = self.0.d;
        let (m, y) = ((m, kend, false), (self.0.block(y, 0, kend), d, false));
        gemm_f32((rows, d, kend), (out, d, false), m, y);
    }

    fn mix_t(&mut self, m: &[f32], x: Mat, blk: (usize, usize, usize), out: &mut [f32]) {
        let ((i0, rows, kend), d) = (blk, self.0.d);
        let (mt, x) = ((m, kend, true), (self.0.block(x, i0, rows), d, false));
        gemm_f32((kend, d, rows), (out, d, true), mt, x);
    }
}

/// `c (m×n, row stride ldc) = [c +] op(a)·op(b)` for row-major `a` (m×k, or k×m when `ta`)
/// and `b` (k×n, or n×k when `tb`) with row strides `lda`, `ldb`.
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    (c, ldc, acc): (&mut [f32], usize, bool),
    (a, lda, ta): (&[f32], usize, bool),
    (b, ldb, tb): (&[f32], usize, bool),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    use crate::quant::transpose::holds;
    assert!(holds(a.len(), lda, (ar, ac)), "gemm_f32: a out of bounds");
    assert!(holds(b.len(), ldb, (br, bc)), "gemm_f32: b out of bounds");
    assert!(holds(c.len(), ldc, (m, n)), "gemm_f32: c out of bounds");
    let (a_rs, a_cs) = if ta { (1, lda) } else { (lda, 1) };
    let (b_rs, b_cs) = if tb { (1, ldb) } else { (ldb, 1) };
    // SAFETY: the asserts above keep every index of op(a) (m×k), op(b) (k×n) and c (m×n) with the
    // strides below inside its slice; c is borrowed mutably, so nothing aliases it.
    unsafe {
        crate::quant::matmul::gemm_rows(
            (m, n, k),
            (c.as_mut_ptr(), ldc, acc),
            (a.as_ptr(), a_cs as isize, a_rs as isize),
            (b.as_ptr(), b_cs as isize, b_rs as isize),
        );
    }
}

/// Key blocks are widened to this many columns so that M's pairs fill whole AMX tiles (16 pairs).
const KEY_UNIT: usize = 32;

/// bf16 products: each key-side matrix packed once per head in the two layouts its products read
/// (pairs along D, transposed, for `scores`; pairs of rows for `mix`), blocks and M packed per call.
struct Bf16Products<'a> {
    mats: HeadMats<'a>,
    /// T rounded up to [`KEY_UNIT`]: the packs' key extent (rows past T are zero).
    tp: usize,
    /// `Yᵀ` pairs (D/2 × tp) for K and V, built on first use.
    t_pairs: [Option<(Vec<u32>, usize)>; 2],
    /// `Y` row pairs (tp/2 × D) for K and V, built on first use.
    row_pairs: [Option<(Vec<u32>, usize)>; 2],
    /// Per-call packs of a block or of M (kept between calls).
    a_buf: Vec<u32>,
    b_buf: Vec<u32>,
}

impl<'a> Bf16Products<'a> {
    fn new(mats: HeadMats<'a>) -> Self {
        Bf16Products {
            tp: mats.t.next_multiple_of(KEY_UNIT),
            mats,
            t_pairs: [None, None],
            row_pairs: [None, None],
            a_buf: Vec::new(),
            b_buf: Vec::new(),
        }
    }

    /// The slot of a key-side matrix in the pack arrays.
    fn slot(y: Mat) -> usize {
        match y {
            Mat::K => 0,
            Mat::V => 1,
            m => unreachable!("{m:?} is not a key-side matrix"),
        }
    }

    /// `Yᵀ` as pairs along D: `[q][j] = (Y[j][2q], Y[j][2q+1])`, (D/2 × tp).
    fn t_pairs(&mut self, y: Mat) -> &[u32] {
        let (t, d, tp, src) = (self.mats.t, self.mats.d, self.tp, self.mats.get(y));
        pack_once(&mut self.t_pairs[Self::slot(y)], d / 2 * tp, |dst| {
            pack_transposed(src, d, (t, d), (dst, tp), false)
        })
    }

    /// `Y` as pairs of rows: `[p][c] = (Y[2p][c], Y[2p+1][c])`, (tp/2 × D).
    fn row_pairs(&mut self, y: Mat) -> &[u32] {
        let (t, d, tp, src) = (self.mats.t, self.mats.d, self.tp, self.mats.get(y));
        pack_once(&mut self.row_pairs[Self::slot(y)], tp / 2 * d, |dst| {
            pack_row_pairs(src, d, (t, d), dst, d)
        })
    }
}

/// The `len` packed u32 of `slot`, built by `fill` into a zeroed, line-aligned buffer on first use.
fn pack_once(
    slot: &mut Option<(Vec<u32>, usize)>,
    len: usize,
    fill: impl FnOnce(&mut [u32]),
) -> &[u32] {
    let (buf, off) = slot.get_or_insert_with(|| {
        let mut buf = Vec::new();
        let at = aligned_slice(&mut buf, len).as_ptr() as usize;
        let off = (at - buf.as_ptr() as usize) / std::mem::size_of::<u32>();
        fill(&mut buf[off..off + len]);
        (buf, off)
    });
    &buf[*off..*off + len]
}

impl Bf16Products<'_> {
    /// `out (rows × cols, row stride cols) = src (rows × k) · Y` in bf16 products with f32 sums,
    /// for the head matrix `y` packed transposed (`Yᵀ`: k = D, the scores) or by rows (k = keys,
    /// the mix); src is rounded into pairs along k in the kept `a_buf`.
    fn rows_times(
        &mut self,
        src: &[f32],
        (rows, k): (usize, usize),
        (y, transposed): (Mat, bool),
        (out, cols): (&mut [f32], usize),
    ) {
        let mut a_buf = std::mem::take(&mut self.a_buf);
        let a = aligned_slice(&mut a_buf, rows * k / 2);
        pack_rows(src, k, (rows, k), a, k / 2);
        let a = Pairs {
            data: a,
            stride: k / 2,
        };
        let b = match transposed {
            true => (self.tp, self.t_pairs(y)),
            false => (self.mats.d, self.row_pairs(y)),
        };
        let b = Pairs {
            data: b.1,
            stride: b.0,
        };
        let done = dense_bf16(a, b, out, cols, (rows, k / 2, cols), false);
        assert!(done, "attention: bf16 kernels vanished");
        self.a_buf = a_buf;
    }
}

impl<'a> BlockProducts<'a> for Bf16Products<'a> {
    fn set_query(&mut self, q: &'a [f32], d_o: &'a [f32]) {
        (self.mats.q, self.mats.d_o) = (q, d_o);
    }

    fn stride(&self, kend: usize) -> usize {
        key_stride(kend, true)
    }

    fn scores(&mut self, x: Mat, y: Mat, (i0, rows, kend): (usize, usize, usize), s: &mut [f32]) {
        let (d, ks) = (self.mats.d, self.stride(kend));
        let xb = self.mats.block(x, i0, rows);
        self.rows_times(xb, (rows, d), (y, true), (s, ks));
        // keys kend..ks exist in the packs (or are zero past T); the block must not see them
        (0..rows).for_each(|r| s[r * ks + kend..(r + 1) * ks].fill(0.0));
    }

    fn mix(&mut self, m: &[f32], y: Mat, (rows, kend): (usize, usize), out: &mut [f32]) {
        let (d, ks) = (self.mats.d, self.stride(kend));
        self.rows_times(m, (rows, ks), (y, false), (out, d));
    }

    fn mix_t(
        &mut self,
        m: &[f32],
        x: Mat,
        (i0, rows, kend): (usize, usize, usize),
        out: &mut [f32],
    ) {
        let (d, ks, half) = (self.mats.d, self.stride(kend), rows.div_ceil(2));
        let xb = self.mats.block(x, i0, rows);
        let a = aligned_slice(&mut self.a_buf, kend * half);
        pack_transposed(m, ks, (rows, kend), (a, half), true);
        let b = aligned_slice(&mut self.b_buf, half * d);
        pack_row_pairs(xb, d, (rows, d), b, d);
        let done = dense_bf16(
            Pairs {
                data: a,
                stride: half,
            },
            Pairs { data: b, stride: d },
            out,
            d,
            (kend, half, d),
            true,
        );
        assert!(done, "attention: bf16 kernels vanished");
    }
}
