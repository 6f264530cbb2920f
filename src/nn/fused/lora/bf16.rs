//! LoRA's products with bf16 operands and f32 sums, on the dense bf16 kernels of the quantised
//! products ([`crate::quant::matmul_bf16::dense_bf16`]: AMX tiles, AVX-512 BF16, FEAT_BF16), for a
//! bf16 step: the parent module's three forms, each one kernel call a task against a weight
//! operand ([`Operand`]) packed once a call, straight from A or B in either orientation (no
//! transposed f32 copy).
//!
//! - [`rows_dot`] `s·drop(x)·Wᵀ` (M, R), W (R, n): the down projection (W = A) and the up
//!   projection's `dh = d·B` (W = Bᵀ); contraction over I or O.
//! - [`outer_sum`] `coefᵀ·drop(x)` (R, n): dA and dBᵀ; contraction over the M tokens.
//! - [`expand`] `coef·W` (M, n), finished a row at a time by the caller: the up projection's
//!   `h·Bᵀ` (W = Bᵀ) and dx (W = A); contraction over R, padded to a whole AMX tile (16 pairs)
//!   where the CPU has AMX, whose kernel takes whole tiles only.
//!
//! Rounding: x, the gradient rows and the f32 master copies of A and B are rounded to bf16
//! (nearest even; exact for a bf16 step's bf16 tensors), as are h and dh where they are operands,
//! as PyTorch's bf16 LoRA holds them; products are exact in f32 and summed in f32. The blocking is
//! fixed (rows of [`ROWS`], columns of [`COLS`], token slabs of [`SLAB`]) and every output element
//! is summed inside one task, so the results do not depend on the thread count.
use super::{gather_column_blocks, Dropped, Elem};
use crate::quant::matmul::{par_spans_init, with_thread_buffer, Span};
use crate::quant::matmul_bf16::{
    dense_bf16, has_bf16_kernels, pack_row_pairs, pack_rows, pack_transposed, padded_pairs, Pairs,
};
use half::bf16;
use rayon::prelude::*;

/// The kernels' column unit: outputs are computed this many columns at a time (padded with zero).
const UNIT: usize = 16;
/// Rows (tokens) a task of [`rows_dot`] and [`expand`] owns (16 in [`expand`] for wide rows): a
/// multiple of the AMX tile's 16 rows.
const ROWS: usize = 32;
/// f32 of a task's output block in [`expand`] below which it takes [`ROWS`] rows (it stays in L2).
const EXPAND_BLOCK: usize = 1 << 16;
/// Columns a task of [`outer_sum`] owns (a multiple of [`UNIT`]).
const COLS: usize = 256;
/// Tokens [`outer_sum`] packs at a time (even: the packs pair tokens).
const SLAB: usize = 128;

/// Elements a thread keeps of each task buffer between calls (a 7B MLP row block's products fit).
const KEEP: usize = 4 << 20;

std::thread_local! {
    /// A task's x rows in pairs ([`rows_dot`]): reused, so not zero-filled per task.
    static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's products before scaling or finishing ([`rows_dot`], [`expand`]).
    static PRODUCTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether LoRA's products run here: the step asks for bf16 products and this CPU has the kernels.
pub(crate) fn takes_bf16(asked: bool) -> bool {
    asked && has_bf16_kernels()
}

/// Bytes the bf16 products hold at once for rows of up to `n` and rank `r` (0 where this CPU has
/// no bf16 kernels): one call's weight operand and each thread's task buffers, the largest of the
/// three forms (the memory plan's kernel scratch counts them in a bf16 step).
pub(crate) fn scratch_bytes(n: usize, r: usize) -> usize {
    if !has_bf16_kernels() {
        return 0;
    }
    let (np, rp, half) = (
        n.next_multiple_of(UNIT),
        r.next_multiple_of(UNIT),
        n.div_ceil(2),
    );
    let rh = padded_pairs(r.div_ceil(2));
    let operand = (half * rp).max(rh * np);
    let dot = n + ROWS * half + ROWS * rp;
    let outer = SLAB * COLS + SLAB / 2 * COLS + r * COLS;
    let expand = ROWS * np + ROWS * rh;
    4 * (operand + rayon::current_num_threads() * dot.max(outer).max(expand))
}

/// The kernel call every product makes (bounds are checked inside).
fn product(
    a: Pairs,
    b: Pairs,
    out: &mut [f32],
    out_stride: usize,
    dims: (usize, usize, usize),
    accumulate: bool,
) {
    let done = dense_bf16(a, b, out, out_stride, dims, accumulate);
    assert!(
        done,
        "LoRA: the bf16 kernels vanished (takes_bf16 was checked)"
    );
}

/// A weight matrix W (R × n, f32) as a product's packed `b` operand.
pub(super) struct Operand {
    data: Vec<u32>,
    /// Rows of pairs (the contraction).
    pairs: usize,
    /// Columns, a multiple of [`UNIT`] (zero past the matrix).
    cols: usize,
}

impl Operand {
    fn pairs(&self) -> Pairs<'_> {
        Pairs {
            data: &self.data,
            stride: self.cols,
        }
    }

    /// For [`rows_dot`], contracting over n: `b[q][k] = (W[k][2q], W[k][2q+1])` (n/2 × R), from W
    /// (`w_t` false) or from Wᵀ (n × R, `w_t` true).
    pub(super) fn for_dot(w: &[f32], r: usize, n: usize, w_t: bool) -> Self {
        let (pairs, cols) = (n.div_ceil(2), r.next_multiple_of(UNIT));
        let mut data = vec![0u32; pairs * cols];
        match w_t {
            false => pack_transposed(w, n, (r, n), (&mut data, cols), false),
            true => pack_row_pairs(w, r, (n, r), &mut data, cols),
        }
        Operand { data, pairs, cols }
    }

    /// For [`expand`], contracting over R: `b[q][c] = (W[2q][c], W[2q+1][c])` (R/2 × n), from W
    /// (`w_t` false) or from Wᵀ (n × R, `w_t` true); pairs padded with zero rows as the kernels
    /// prefer ([`padded_pairs`]).
    pub(super) fn for_expand(w: &[f32], r: usize, n: usize, w_t: bool) -> Self {
        let pairs = padded_pairs(r.div_ceil(2));
        let cols = n.next_multiple_of(UNIT);
        let mut data = vec![0u32; pairs * cols];
        match w_t {
            false => pack_row_pairs(w, n, (r, n), &mut data, cols),
            true => pack_transposed(w, r, (n, r), (&mut data, cols), false),
        }
        Operand { data, pairs, cols }
    }
}

/// Rows `t0..t0+rows` of `drop(x)` (x: M × n) into `a` as pairs along n (rows × n/2 at stride
/// `half`): straight from x's f32 or bf16 where there is no dropout, else through `row`.
fn pack_x_rows<T: Elem>(x: Dropped<T>, (t0, rows): (usize, usize), row: &mut [f32], a: &mut [u32]) {
    let (drop, n) = (x.drop, x.n);
    let half = n.div_ceil(2);
    if let (None, Some(xf)) = (drop, T::as_f32(x.x)) {
        return pack_rows(&xf[t0 * n..], n, (rows, n), a, half);
    }
    if let (None, Some(xb)) = (drop, T::as_bf16(x.x)) {
        // bf16 rows are already the operand's elements, pair by pair (widening and rounding
        // them again would give the same bits).
        for j in 0..rows {
            let d: &mut [bf16] = bytemuck::cast_slice_mut(&mut a[j * half..][..half]);
            d[..n].copy_from_slice(&xb[(t0 + j) * n..][..n]);
            d[n..].fill(bf16::ZERO);
        }
        return;
    }
    for j in 0..rows {
        x.load_row(t0 + j, 0..n, row);
        pack_rows(row, n, (1, n), &mut a[j * half..], half);
    }
}

/// `out (M, R) = s·drop(x)·Wᵀ` for `x (M, n)` in its element type and W packed by
/// [`Operand::for_dot`].
pub(super) fn rows_dot<T: Elem>(x: Dropped<T>, w: &Operand, r: usize, s: f32) -> Vec<f32> {
    let n = x.n;
    let (m, half, rp) = (x.rows(), n.div_ceil(2), w.cols);
    let mut out = vec![0f32; m * r];
    if r == 0 || m == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS * r).enumerate().for_each_init(
        || vec![0f32; n],
        |row, (c, out)| {
            let rows = out.len() / r;
            // a: this task's rows of drop(x) in pairs along n (rows × half), each element written
            with_thread_buffer(&PAIRS, rows * half, KEEP, |a| {
                pack_x_rows(x, (c * ROWS, rows), row, a);
                // the products (rows × rp), each written (no accumulation)
                with_thread_buffer(&PRODUCTS, rows * rp, KEEP, |y| {
                    let a = Pairs {
                        data: a,
                        stride: half,
                    };
                    product(a, w.pairs(), y, rp, (rows, half, rp), false);
                    for (o, y) in out.chunks_exact_mut(r).zip(y.chunks_exact(rp)) {
                        for (o, &v) in o.iter_mut().zip(y) {
                            *o = s * v;
                        }
                    }
                })
            })
        },
    );
    out
}

/// `out (R, n) = coefᵀ·drop(x)`: `out_k = Σ_t coef[t, k]·drop(x)_t` for `coef (M, R)` f32 and
/// `x (M, n)`; parallel over column blocks, each summing its tokens in order.
pub(super) fn outer_sum<T: Elem>(coef: &[f32], r: usize, x: Dropped<T>) -> Vec<f32> {
    let n = x.n;
    let m = coef.len() / r.max(1);
    let mh = m.div_ceil(2);
    if r == 0 || n == 0 {
        return vec![0f32; r * n];
    }
    // a: coefᵀ in pairs along the tokens, a[k][q] = (coef[2q][k], coef[2q+1][k]) (R × mh)
    let mut a = vec![0u32; r * mh];
    pack_transposed(coef, r, (m, r), (&mut a, mh), true);
    let direct = x.drop.is_none().then(|| T::as_f32(x.x)).flatten();
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(COLS))
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(panel, b), blk| {
                let c0 = blk * COLS;
                let w = COLS.min(n - c0);
                let wp = w.next_multiple_of(UNIT);
                // acc (R × wp): this block of every out_k
                let mut acc = vec![0f32; r * wp];
                for i0 in (0..m).step_by(SLAB) {
                    let rows = SLAB.min(m - i0);
                    // b: the slab's rows in pairs of tokens (rows/2 × wp), columns ≥ w zero
                    let ph = rows.div_ceil(2);
                    b.clear();
                    b.resize(ph * wp, 0u32);
                    match direct {
                        Some(xf) => pack_row_pairs(&xf[i0 * n + c0..], n, (rows, w), b, wp),
                        None => {
                            panel.resize(rows * w, 0.0);
                            for (j, row) in panel.chunks_exact_mut(w).enumerate() {
                                x.load_row(i0 + j, c0..c0 + w, row);
                            }
                            pack_row_pairs(panel, w, (rows, w), b, wp);
                        }
                    }
                    let a = Pairs {
                        data: &a[i0 / 2..],
                        stride: mh,
                    };
                    let b = Pairs {
                        data: b,
                        stride: wp,
                    };
                    product(a, b, &mut acc, wp, (r, ph, wp), i0 > 0);
                }
                acc
            },
        )
        .collect();
    gather_column_blocks(&blocks, r, n, COLS)
}

/// `z_t = coef_t·W` (a row of n) for every row t of `coef (M, R)` f32 and W packed by
/// [`Operand::for_expand`], handed to `finish(t, z_t, out)` to write row t of the output `(M, n)`
/// next into `out`; the output is returned. Parallel over blocks of rows.
pub(super) fn expand<T: Copy + Send + Sync>(
    coef: &[f32],
    (m, r): (usize, usize),
    w: &Operand,
    n: usize,
    zero: T,
    finish: impl Fn(usize, &mut [f32], &mut Span<'_, T>) + Sync,
) -> Vec<T> {
    let (np, rh) = (w.cols, w.pairs);
    if n == 0 || r == 0 {
        return vec![zero; m * n];
    }
    let task_rows = if EXPAND_BLOCK / np >= ROWS { ROWS } else { 16 };
    par_spans_init(m * n, (task_rows * n, 1), zero, Vec::new, |a, _, out| {
        let (t0, rows) = (out.range().start / n, out.range().len() / n);
        // a: this task's rows of coef in pairs along R (rows × rh), pairs past R zero
        a.clear();
        a.resize(rows * rh, 0u32);
        pack_rows(&coef[t0 * r..], r, (rows, r), a, rh);
        let a = Pairs {
            data: a,
            stride: rh,
        };
        // the products (rows × np), each written (no accumulation)
        with_thread_buffer(&PRODUCTS, rows * np, KEEP, |z| {
            product(a, w.pairs(), z, np, (rows, rh, np), false);
            for (j, z) in z.chunks_exact_mut(np).take(rows).enumerate() {
                finish(t0 + j, &mut z[..n], out);
            }
        })
    })
}
