//! LoRA's branch `y + s·(drop(x)·Aᵀ)·Bᵀ` as two ops with hand-written backward passes (CPU):
//! [`lora_down`] `h = s·drop(x)·Aᵀ` and [`lora_up_add`] `y + h·Bᵀ`.
//!
//! Why: candle runs the branch as two bf16 matmuls (each widening both operands to f32), a scale,
//! a cast and an add, and its backward as four more widening matmuls; with dropout it also stores
//! the mask and the masked input. Here every product reads its bf16 rows once, sums in f32 with
//! FMA (rank r is small: the products are r dot products or r axpys a row), h stays f32, and the
//! dropout mask is drawn again from its counter-based key in the backward instead of being stored.
//! Gradient sums over rows run in row order inside one task per column block, so the result does
//! not depend on the thread count (`--resume` stays bit-identical).
//!
//! Shapes: M rows (tokens), I in-features, O out-features, R rank.
use super::*;
use crate::rng::SplitMix64;
use candle_core::{CustomOp2, CustomOp3};

mod bf16;
mod sink;
pub(crate) use bf16::scratch_bytes as lora_bf16_scratch_bytes;
pub use sink::backward_collecting;

/// The inverted-dropout factor of element `i` of a mask: 0 with probability p, else 1/(1-p),
/// drawn from `(key, i)` alone (counter-based, so a backward or a recompute redraws it).
#[derive(Clone, Copy, Debug)]
pub struct DropoutMask {
    /// The mask's key (from the adapter's seed and the call's dropout key).
    pub key: u64,
    /// The drop probability p in (0, 1).
    pub p: f64,
}

impl DropoutMask {
    /// Element `i`'s factor.
    #[inline]
    pub fn factor(&self, i: u64) -> f32 {
        let z = SplitMix64::mix(self.key.wrapping_add(i.wrapping_mul(SplitMix64::GOLDEN)));
        if SplitMix64::unit(z) < self.p {
            0.0
        } else {
            (1.0 / (1.0 - self.p)) as f32
        }
    }

    /// Multiplies `row` (elements `first..` of the mask) by its factors.
    fn apply(&self, first: u64, row: &mut [f32]) {
        for (j, v) in row.iter_mut().enumerate() {
            *v *= self.factor(first + j as u64);
        }
    }
}

/// `(M, last)` of a tensor `(.., last)`: every leading dim flattened into rows, as the ops take
/// them (no reshape node in the graph: in candle's backward each one is a zero-filled tensor
/// plus an add of the whole gradient).
fn rows_of(dims: &[usize]) -> Result<(usize, usize)> {
    match dims.last() {
        Some(&c) => Ok((dims.iter().product::<usize>() / c.max(1), c)),
        None => bail!("a LoRA product's operand is a scalar"),
    }
}

/// `h (M, R) = s·drop(x)·Aᵀ` in f32, for `x (.., I)` (M rows; f32, bf16 or f16) and `a (R, I)`.
/// Backward: `dx = drop'(s·dh·A)` in x's dtype, `dA = s·dhᵀ·drop(x)` in a's dtype.
/// `bf16_products`: forward and backward multiply bf16-rounded operands on the bf16 kernels (a
/// bf16 step, also in its f32 recompute), where this CPU has them; bf16 x always does.
pub fn lora_down(
    x: &Tensor,
    a: &Tensor,
    scale: f64,
    dropout: Option<DropoutMask>,
    bf16_products: bool,
) -> Result<Tensor> {
    check_cpu("lora_down", &[x, a])?;
    let (_m, i) = rows_of(x.dims())?;
    let (_r, ia) = a.dims2()?;
    if i != ia {
        bail!(
            "lora_down: x {:?} and A {:?} differ in I",
            x.dims(),
            a.dims()
        );
    }
    let op = DownOp {
        scale: scale as f32,
        dropout,
        bf16: bf16::takes_bf16(bf16_products || x.dtype() == DType::BF16),
    };
    x.contiguous()?.apply_op2(&a.contiguous()?, op)
}

/// `y (.., O) + h·Bᵀ` in y's dtype and shape (f32 sums, one rounding), for y's M rows, `h (M, R)`
/// f32 and `b (O, R)`.
/// Backward: `dy = d`, `dh = d·B` (f32), `dB = dᵀ·h` in b's dtype. `bf16_products` as for
/// [`lora_down`] (h rounded to bf16 as an operand).
pub fn lora_up_add(y: &Tensor, h: &Tensor, b: &Tensor, bf16_products: bool) -> Result<Tensor> {
    check_cpu("lora_up_add", &[y, h, b])?;
    let ((m, o), (mh, r), (ob, rb)) = (rows_of(y.dims())?, h.dims2()?, b.dims2()?);
    if m != mh || o != ob || r != rb || h.dtype() != DType::F32 {
        bail!(
            "lora_up_add: y {:?}, h {:?} ({:?}, must be f32) and B {:?} do not fit (.., O), (M, R), (O, R)",
            y.dims(),
            h.dims(),
            h.dtype(),
            b.dims()
        );
    }
    let op = UpOp {
        bf16: bf16::takes_bf16(bf16_products || y.dtype() == DType::BF16),
    };
    y.contiguous()?
        .apply_op3(&h.contiguous()?, &b.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------------
// Row primitives, compiled for AVX-512, for AVX2+FMA and portably; the callers pick one set per
// call. Each keeps a block of sums in registers across the loop that feeds it (the plain loops
// loaded and stored every sum once per product, and read each row of A once per row of x), but
// every sum takes its FMAs in the plain loop's order, so the results are bit for bit the same on
// every instruction set (tested below against the plain loops).

/// Lanes of a dot product's partial sums: lane l sums elements l, l+32, ... of the full chunks.
const DOT_LANES: usize = 32;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// A dot product from its lanes and the elements past the last full chunk: the lanes summed in
/// order, plus the tail's products (the one summation order every `dots` keeps).
#[inline(always)]
fn lane_sum(lanes: &[f32; DOT_LANES], a_tail: &[f32], b_tail: &[f32]) -> f32 {
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `a·b` of one pair of rows.
#[inline(always)]
fn dot_rows<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; DOT_LANES];
    let full = a.len() / DOT_LANES * DOT_LANES;
    for c in (0..full).step_by(DOT_LANES) {
        for l in 0..DOT_LANES {
            acc[l] = madd::<FMA>(a[c + l], b[c + l], acc[l]);
        }
    }
    lane_sum(&acc, &a[full..], &b[full..])
}

/// `out[t·R + k] = s·(x_t·rows_k)` for the rows of `xs` (`out.len() / R` rows of `n`) and the R
/// rows of `rows`, one row of x at a time.
#[inline(always)]
fn dots<const FMA: bool>(xs: &[f32], n: usize, rows: &[f32], s: f32, out: &mut [f32]) {
    let r = rows.len() / n.max(1);
    for (x, out) in xs
        .chunks_exact(n.max(1))
        .zip(out.chunks_exact_mut(r.max(1)))
    {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(n.max(1))) {
            *o = s * dot_rows::<FMA>(x, row);
        }
    }
}

/// `acc += Σ_k coef[k]·rows_k` (rows of `acc.len()`), 64 columns of acc held across all k.
#[inline(always)]
fn axpys<const FMA: bool>(acc: &mut [f32], coef: &[f32], rows: &[f32]) {
    const CW: usize = 64;
    let n = acc.len();
    let full = n / CW * CW;
    for c0 in (0..full).step_by(CW) {
        let mut a: [f32; CW] = acc[c0..c0 + CW].try_into().expect("chunk");
        for (&c, row) in coef.iter().zip(rows.chunks_exact(n)) {
            let v: &[f32; CW] = row[c0..c0 + CW].try_into().expect("chunk");
            for l in 0..CW {
                a[l] = madd::<FMA>(c, v[l], a[l]);
            }
        }
        acc[c0..c0 + CW].copy_from_slice(&a);
    }
    for (&c, row) in coef.iter().zip(rows.chunks_exact(n.max(1))) {
        for (a, &v) in acc[full..].iter_mut().zip(&row[full..]) {
            *a = madd::<FMA>(c, v, *a);
        }
    }
}

/// `acc (R, w) += coefᵀ·panel`: `acc[k][c] += Σ_i coef[i·R + k]·panel[i·w + c]` over the panel's
/// rows in order, a block of 8 k × `CW` columns held in registers across the rows.
#[inline(always)]
fn rank_update<const FMA: bool, const CW: usize>(
    acc: &mut [f32],
    w: usize,
    coef: &[f32],
    r: usize,
    panel: &[f32],
) {
    const KB: usize = 8;
    let rows = panel.len() / w.max(1);
    for k0 in (0..r).step_by(KB) {
        let kb = KB.min(r - k0);
        for c0 in (0..w).step_by(CW) {
            let cw = CW.min(w - c0);
            if kb == KB && cw == CW {
                let mut a = [[0f32; CW]; KB];
                for (kk, a_k) in a.iter_mut().enumerate() {
                    a_k.copy_from_slice(&acc[(k0 + kk) * w + c0..][..CW]);
                }
                for i in 0..rows {
                    let v: &[f32; CW] = panel[i * w + c0..][..CW].try_into().expect("chunk");
                    for (kk, a_k) in a.iter_mut().enumerate() {
                        let cf = coef[i * r + k0 + kk];
                        for l in 0..CW {
                            a_k[l] = madd::<FMA>(cf, v[l], a_k[l]);
                        }
                    }
                }
                for (kk, a_k) in a.iter().enumerate() {
                    acc[(k0 + kk) * w + c0..][..CW].copy_from_slice(a_k);
                }
            } else {
                for k in k0..k0 + kb {
                    let acc_k = &mut acc[k * w + c0..][..cw];
                    for i in 0..rows {
                        let cf = coef[i * r + k];
                        for (a, &v) in acc_k.iter_mut().zip(&panel[i * w + c0..][..cw]) {
                            *a = madd::<FMA>(cf, v, *a);
                        }
                    }
                }
            }
        }
    }
}

/// The row primitives of one instruction set.
#[derive(Clone, Copy)]
struct Prims {
    /// [`dots`] with this set's row block.
    dots: fn(&[f32], usize, &[f32], f32, &mut [f32]),
    axpys: fn(&mut [f32], &[f32], &[f32]),
    /// [`rank_update`] with this set's column block.
    rank_update: fn(&mut [f32], usize, &[f32], usize, &[f32]),
    /// Rows of x a `dots` call should get at once (its row block).
    xb: usize,
}

/// One instruction set's primitives: the generic bodies compiled with its features enabled.
macro_rules! isa_prims {
    ($name:ident, $features:literal, dots = $dots:path, xb = $xb:literal, cw = $cw:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[target_feature(enable = $features)]
            unsafe fn dots(xs: &[f32], n: usize, rows: &[f32], s: f32, out: &mut [f32]) {
                $dots(xs, n, rows, s, out)
            }

            #[target_feature(enable = $features)]
            unsafe fn axpys(acc: &mut [f32], coef: &[f32], rows: &[f32]) {
                super::axpys::<true>(acc, coef, rows)
            }

            #[target_feature(enable = $features)]
            unsafe fn rank_update(acc: &mut [f32], w: usize, coef: &[f32], r: usize, p: &[f32]) {
                super::rank_update::<true, $cw>(acc, w, coef, r, p)
            }

            /// These primitives; `None` where the CPU lacks the features.
            pub(super) fn prims() -> Option<super::Prims> {
                let has = $features.split(',').all(|f| match f {
                    "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                    "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                    "fma" => std::arch::is_x86_feature_detected!("fma"),
                    _ => false,
                });
                has.then_some(super::Prims {
                    // SAFETY: returned only where `has` saw every feature these are compiled for.
                    dots: |xs, n, rows, s, out| unsafe { dots(xs, n, rows, s, out) },
                    // SAFETY: as for `dots`.
                    axpys: |acc, coef, rows| unsafe { axpys(acc, coef, rows) },
                    // SAFETY: as for `dots`.
                    rank_update: |acc, w, coef, r, p| unsafe { rank_update(acc, w, coef, r, p) },
                    xb: $xb,
                })
            }
        }
    };
}

// AVX-512: 4 rows' dot lanes in 8 zmm, 8 × 16 sums in 8 zmm; AVX2: one row, 8 × 8 sums in 8 ymm.
isa_prims!(
    avx512,
    "avx512f,avx2,fma",
    dots = super::dots_avx512,
    xb = 4,
    cw = 16
);
isa_prims!(avx2, "avx2,fma", dots = super::dots::<true>, xb = 1, cw = 8);

/// [`dots`] on AVX-512, four rows of x at a time (each chunk of row k loaded once for the four),
/// each dot's 32 lanes in two zmm, finished by [`lane_sum`]. (A generic four-row block loop
/// stayed scalar: LLVM kept its 4 × 32 sums on the stack.)
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots_avx512(xs: &[f32], n: usize, rows: &[f32], s: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const XB: usize = 4;
    let r = rows.len() / n.max(1);
    let nx = out.len() / r.max(1);
    let full = n / DOT_LANES * DOT_LANES;
    let mut t0 = 0;
    while t0 + XB <= nx {
        // Row t of this block of x; every read below stays inside xs[.. nx·n] and rows[.. r·n]
        // (c + 32 <= full <= n).
        let x = |t: usize| xs.as_ptr().add((t0 + t) * n);
        for k in 0..r {
            let row = rows.as_ptr().add(k * n);
            let mut acc = [[_mm512_setzero_ps(); 2]; XB];
            for c in (0..full).step_by(DOT_LANES) {
                let (b0, b1) = (
                    _mm512_loadu_ps(row.add(c)),
                    _mm512_loadu_ps(row.add(c + 16)),
                );
                for (t, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x(t).add(c)), b0, a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(x(t).add(c + 16)), b1, a[1]);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; DOT_LANES];
                _mm512_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16), a[1]);
                let xt = &xs[(t0 + t) * n + full..(t0 + t + 1) * n];
                let dot = lane_sum(&lanes, xt, &rows[k * n + full..(k + 1) * n]);
                out[(t0 + t) * r + k] = s * dot;
            }
        }
        t0 += XB;
    }
    dots::<true>(&xs[t0 * n..nx * n], n, rows, s, &mut out[t0 * r..nx * r]);
}

/// The best primitives this CPU runs.
fn prims() -> Prims {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = avx512::prims().or_else(avx2::prims) {
        return p;
    }
    Prims {
        dots: dots::<false>,
        axpys: axpys::<false>,
        rank_update: rank_update::<false, 8>,
        xb: 1,
    }
}

/// Columns a gradient task owns (of every row): its row sums stay in one thread, in order.
const COL_BLOCK: usize = 256;
/// Rows of x a gradient task converts at a time (64 KiB of f32 at `COL_BLOCK` columns).
const SLAB: usize = 64;

/// Row `i` of `x (·, n)` in f32, with its dropout factors applied.
#[inline]
fn load_row<T: Elem>(
    x: &[T],
    i: usize,
    cols: std::ops::Range<usize>,
    n: usize,
    drop: Option<DropoutMask>,
    dst: &mut [f32],
) {
    let src = &x[i * n + cols.start..i * n + cols.end];
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = v.f();
    }
    if let Some(m) = drop {
        m.apply((i * n + cols.start) as u64, dst);
    }
}

/// `s · drop(x) · matᵀ` (M, R) for `x (M, n)` in its element type and `mat (R, n)` f32, one row
/// of x per task: the down projection `h = s·drop(x)·Aᵀ`, and the up projection's `dh = d·B`
/// (`mat` = Bᵀ).
fn rows_dot<T: Elem>(
    x: &[T],
    mat: &[f32],
    n: usize,
    drop: Option<DropoutMask>,
    s: f32,
) -> Vec<f32> {
    let p = prims();
    let r = mat.len() / n.max(1);
    let m = x.len() / n.max(1);
    let mut out = vec![0f32; m * r];
    out.par_chunks_mut((p.xb * r).max(1))
        .enumerate()
        .for_each_init(
            || vec![0f32; p.xb * n],
            |rows, (c, out)| {
                let nx = out.len() / r.max(1);
                for (j, row) in rows.chunks_exact_mut(n.max(1)).take(nx).enumerate() {
                    load_row(x, c * p.xb + j, 0..n, n, drop, row);
                }
                (p.dots)(&rows[..nx * n], n, mat, s, out);
            },
        );
    out
}

/// `Σ_i coef_iᵀ·rows_i` over all rows: `out (R, n)` with `out_k = Σ_i coef[i, k]·row_i`, for
/// `coef (M, R)` f32 and rows `(M, n)` of `x` (dropout applied); parallel over column blocks.
fn outer_sum<T: Elem>(
    p: Prims,
    coef: &[f32],
    r: usize,
    x: &[T],
    n: usize,
    drop: Option<DropoutMask>,
) -> Vec<f32> {
    let m = coef.len() / r.max(1);
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(COL_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let cols = blk * COL_BLOCK..((blk + 1) * COL_BLOCK).min(n);
            let w = cols.len();
            // acc: (R, w), row k the block of out_k; panel: up to SLAB rows of x's block
            let mut acc = vec![0f32; r * w];
            let mut panel = vec![0f32; SLAB * w];
            for i0 in (0..m).step_by(SLAB) {
                let rows = SLAB.min(m - i0);
                for (j, row) in panel.chunks_exact_mut(w).take(rows).enumerate() {
                    load_row(x, i0 + j, cols.clone(), n, drop, row);
                }
                let coef = &coef[i0 * r..(i0 + rows) * r];
                (p.rank_update)(&mut acc, w, coef, r, &panel[..rows * w]);
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; r * n];
    for (blk, acc) in blocks.iter().enumerate() {
        let (c0, w) = (blk * COL_BLOCK, acc.len() / r.max(1));
        for k in 0..r {
            out[k * n + c0..k * n + c0 + w].copy_from_slice(&acc[k * w..(k + 1) * w]);
        }
    }
    out
}

/// `(R, n)` → `(n, R)`.
fn transpose(v: &[f32], r: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    let (src, dst) = (bytemuck::cast_slice(v), bytemuck::cast_slice_mut(&mut t));
    crate::quant::transpose::transpose(src, n, (r, n), dst, r);
    t
}

/// The typed contiguous slice of a CPU tensor.
macro_rules! with_elem {
    ($t:expr, $name:expr, |$s:ident| $body:expr) => {{
        let t = $t.contiguous()?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*st else {
            bail!("{}: only the CPU kernels exist", $name);
        };
        match cpu {
            CpuStorage::F32(v) => {
                let $s = slice_of(v, l, $name)?;
                $body
            }
            CpuStorage::BF16(v) => {
                let $s = slice_of(v, l, $name)?;
                $body
            }
            CpuStorage::F16(v) => {
                let $s = slice_of(v, l, $name)?;
                $body
            }
            s => bail!("{}: unsupported dtype {:?}", $name, s.dtype()),
        }
    }};
}

// ---------------------------------------------------------------------------------------------

struct DownOp {
    scale: f32,
    dropout: Option<DropoutMask>,
    /// bf16 products ([`bf16`]).
    bf16: bool,
}

impl DownOp {
    /// h (M, R) = s·drop(x)·Aᵀ.
    fn forward<T: Elem>(&self, x: &[T], a: &[f32], i: usize) -> Vec<f32> {
        if self.bf16 {
            let r = a.len() / i.max(1);
            let w = bf16::Operand::for_dot(a, r, i, false);
            return bf16::rows_dot(x, i, &w, r, self.dropout, self.scale);
        }
        rows_dot(x, a, i, self.dropout, self.scale)
    }

    /// dA (R, I) = s·dhᵀ·drop(x).
    fn weight_grad<T: Elem>(&self, dh: &[f32], r: usize, x: &[T], i: usize) -> Vec<f32> {
        let mut da = match self.bf16 {
            true => bf16::outer_sum(dh, r, x, i, self.dropout),
            false => outer_sum(prims(), dh, r, x, i, self.dropout),
        };
        for v in da.iter_mut() {
            *v *= self.scale;
        }
        da
    }

    /// dx (M, I) in x's element type T: `drop'(s·dh·A)`.
    fn input_grad<T: Elem>(&self, _x: &[T], dh: &[f32], a: &[f32], i: usize) -> Vec<T> {
        let r = a.len() / i.max(1);
        let m = dh.len() / r.max(1);
        let mut dx = vec![T::of(0.0); m * i];
        if self.bf16 {
            let w = bf16::Operand::for_expand(a, r, i, false);
            bf16::expand(dh, r, &w, i, &mut dx, |t, acc, dx| {
                acc.iter_mut().for_each(|v| *v *= self.scale);
                if let Some(mask) = self.dropout {
                    mask.apply((t * i) as u64, acc);
                }
                T::row_of(acc, dx);
            });
            return dx;
        }
        let p = prims();
        dx.par_chunks_mut(i.max(1)).enumerate().for_each_init(
            || (vec![0f32; i], vec![0f32; r]),
            |(acc, c), (t, dx)| {
                acc.fill(0.0);
                for (c, &d) in c.iter_mut().zip(&dh[t * r..(t + 1) * r]) {
                    *c = self.scale * d;
                }
                (p.axpys)(acc, c, a);
                if let Some(mask) = self.dropout {
                    mask.apply((t * i) as u64, acc);
                }
                for (d, &v) in dx.iter_mut().zip(acc.iter()) {
                    *d = T::of(v);
                }
            },
        );
        dx
    }
}

impl CustomOp2 for DownOp {
    fn name(&self) -> &'static str {
        "qtune-lora-down"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sa: &CpuStorage, la: &Layout) -> CpuOut {
        let (m, i) = rows_of(lx.dims())?;
        let (r, _) = la.shape().dims2()?;
        let a = f32_of(sa, la, self.name())?;
        let name = self.name();
        let h = match sx {
            CpuStorage::F32(x) => self.forward(slice_of(x, lx, name)?, &a, i),
            CpuStorage::BF16(x) => self.forward(slice_of(x, lx, name)?, &a, i),
            CpuStorage::F16(x) => self.forward(slice_of(x, lx, name)?, &a, i),
            s => bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        };
        Ok((CpuStorage::F32(h), Shape::from((m, r))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, i) = rows_of(x.dims())?;
        let (r, _) = a.dims2()?;
        let dh = dh
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let a32 = const_f32(a, self.name())?;
        let dx = with_elem!(x, self.name(), |xs| {
            let dx = self.input_grad(xs, &dh, &a32, i);
            let da = self.weight_grad(&dh, r, xs, i);
            (Tensor::from_vec(dx, x.dims(), &Device::Cpu)?, da)
        });
        let (dx, da) = dx;
        let da = sink::weight_grad(a, tensor_of(da, a.dims(), a.dtype())?);
        Ok((Some(dx), da))
    }
}

struct UpOp {
    /// bf16 products ([`bf16`]).
    bf16: bool,
}

impl UpOp {
    /// y + h·Bᵀ with `b (O, R)` f32.
    fn forward<T: Elem>(&self, y: &[T], h: &[f32], b: &[f32], o: usize) -> Vec<T> {
        let r = b.len() / o.max(1);
        let mut out = vec![T::of(0.0); y.len()];
        if self.bf16 {
            let w = bf16::Operand::for_expand(b, r, o, true);
            bf16::expand(h, r, &w, o, &mut out, |t, z, out| {
                for (zv, &yv) in z.iter_mut().zip(&y[t * o..(t + 1) * o]) {
                    *zv += yv.f();
                }
                T::row_of(z, out);
            });
            return out;
        }
        let bt = transpose(b, o, r);
        let p = prims();
        out.par_chunks_mut(o.max(1)).enumerate().for_each_init(
            || vec![0f32; o],
            |z, (t, out)| {
                z.fill(0.0);
                (p.axpys)(z, &h[t * r..(t + 1) * r], &bt);
                for ((d, &yv), &zv) in out.iter_mut().zip(&y[t * o..(t + 1) * o]).zip(z.iter()) {
                    *d = T::of(yv.f() + zv);
                }
            },
        );
        out
    }
}

impl CustomOp3 for UpOp {
    fn name(&self) -> &'static str {
        "qtune-lora-up-add"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sh: &CpuStorage,
        lh: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CpuOut {
        let (_, o) = rows_of(ly.dims())?;
        let h = f32_of(sh, lh, self.name())?;
        let b = f32_of(sb, lb, self.name())?;
        let name = self.name();
        let out = match sy {
            CpuStorage::F32(y) => CpuStorage::F32(self.forward(slice_of(y, ly, name)?, &h, &b, o)),
            CpuStorage::BF16(y) => {
                CpuStorage::BF16(self.forward(slice_of(y, ly, name)?, &h, &b, o))
            }
            CpuStorage::F16(y) => CpuStorage::F16(self.forward(slice_of(y, ly, name)?, &h, &b, o)),
            s => bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        };
        Ok((out, ly.shape().clone()))
    }

    fn bwd(&self, y: &Tensor, h: &Tensor, b: &Tensor, _out: &Tensor, d: &Tensor) -> Grads3 {
        let (_, o) = rows_of(y.dims())?;
        let (_, r) = b.dims2()?;
        let d = d.to_dtype(y.dtype())?.contiguous()?;
        let h32 = h.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let b32 = const_f32(b, self.name())?;
        let (dh, db) = with_elem!(d, self.name(), |ds| {
            // dh (M, R) = d·B; dBᵀ (R, O) = hᵀ·d, then (O, R)
            let (dh, dbt) = match self.bf16 {
                true => (
                    bf16::rows_dot(
                        ds,
                        o,
                        &bf16::Operand::for_dot(&b32, r, o, true),
                        r,
                        None,
                        1.0,
                    ),
                    bf16::outer_sum(&h32, r, ds, o, None),
                ),
                false => (
                    rows_dot(ds, &transpose(&b32, o, r), o, None, 1.0),
                    outer_sum(prims(), &h32, r, ds, o, None),
                ),
            };
            (dh, transpose(&dbt, r, o))
        });
        let dh = Tensor::from_vec(dh, h.dims(), &Device::Cpu)?;
        let db = sink::weight_grad(b, tensor_of(db, b.dims(), b.dtype())?);
        Ok((Some(d), Some(dh), db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain loops the blocked primitives replace (one product of one row at a time).
    fn plain_dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
        let full = a.len() / DOT_LANES * DOT_LANES;
        let tail: f32 = a[full..].iter().zip(&b[full..]).map(|(x, y)| x * y).sum();
        let mut acc = [0f32; DOT_LANES];
        for c in (0..full).step_by(DOT_LANES) {
            for l in 0..DOT_LANES {
                acc[l] = madd::<FMA>(a[c + l], b[c + l], acc[l]);
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    fn plain_axpy<const FMA: bool>(acc: &mut [f32], c: f32, row: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = madd::<FMA>(c, v, *a);
        }
    }

    fn check<const FMA: bool>(p: Prims, name: &str) {
        let mut rng = crate::rng::SplitMix64(7);
        let mut vec = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
                .collect()
        };
        // n past a multiple of the lanes and of 64; r past a multiple of 8; rows past xb and SLAB.
        for (m, n, r) in [(7, 203, 13), (9, 256, 16), (70, 96, 8), (3, 40, 1)] {
            let (x, mat, coef) = (vec(m * n), vec(r * n), vec(m * r));
            let mut got = vec![0f32; m * r];
            (p.dots)(&x, n, &mat, 0.5, &mut got);
            for t in 0..m {
                for k in 0..r {
                    let want = 0.5 * plain_dot::<FMA>(&x[t * n..][..n], &mat[k * n..][..n]);
                    assert_eq!(
                        got[t * r + k].to_bits(),
                        want.to_bits(),
                        "{name} dots {m}x{n}x{r}"
                    );
                }
            }
            let mut got = vec(n);
            let mut want = got.clone();
            (p.axpys)(&mut got, &coef[..r], &mat);
            for k in 0..r {
                plain_axpy::<FMA>(&mut want, coef[k], &mat[k * n..][..n]);
            }
            assert_eq!(got, want, "{name} axpys {n}x{r}");
            let mut got = vec(r * n);
            let mut want = got.clone();
            // Slabs of 5 rows: the sums run on across calls, as outer_sum's do across SLABs.
            for i0 in (0..m).step_by(5) {
                let rows = 5.min(m - i0);
                let panel = &x[i0 * n..(i0 + rows) * n];
                (p.rank_update)(&mut got, n, &coef[i0 * r..(i0 + rows) * r], r, panel);
                for i in i0..i0 + rows {
                    for k in 0..r {
                        plain_axpy::<FMA>(
                            &mut want[k * n..][..n],
                            coef[i * r + k],
                            &x[i * n..][..n],
                        );
                    }
                }
            }
            assert_eq!(got, want, "{name} rank_update {m}x{n}x{r}");
        }
    }

    #[test]
    fn blocked_primitives_equal_the_plain_loops_bit_for_bit() {
        check::<false>(
            Prims {
                dots: dots::<false>,
                axpys: axpys::<false>,
                rank_update: rank_update::<false, 8>,
                xb: 1,
            },
            "portable",
        );
        #[cfg(target_arch = "x86_64")]
        for (p, name) in [(avx512::prims(), "avx512"), (avx2::prims(), "avx2")] {
            if let Some(p) = p {
                check::<true>(p, name);
            }
        }
    }
}
