//! LoRA's branch `y + s·(drop(x)·Aᵀ)·Bᵀ` as two ops with hand-written backward passes (CPU):
//! [`lora_down`] `h = s·drop(x)·Aᵀ` and [`lora_up_add`] `y + h·Bᵀ`, or, where the adapter runs
//! the frozen base's product itself, [`lora_linear_up`] `base(x) + h·Bᵀ` (`lora/linear.rs`: no
//! separate `y`).
//!
//! Why: candle runs the branch as two bf16 matmuls (each widening both operands to f32), a scale,
//! a cast and an add, and its backward as four more widening matmuls; with dropout it also stores
//! the mask and the masked input. Here every product reads its bf16 rows once, sums in f32 with
//! FMA (rank r is small: the products are r dot products or r axpys a row), h stays f32, and the
//! dropout mask is drawn again from its counter-based key in the backward instead of being stored.
//! Gradient sums over rows run in row order inside one task per column block, so the result does
//! not depend on the thread count (`--resume` stays bit-identical). The f32 row products are in
//! `lora/rows.rs`; a bf16 step's products run on the bf16 kernels instead (`lora/bf16.rs`), and
//! inside the step's backward the weight gradients skip candle's `zeros + g` (`lora/sink.rs`).
//!
//! Shapes: M rows (tokens), I in-features, O out-features, R rank.
use super::*;
use crate::rng::SplitMix64;
use candle_core::{CustomOp2, CustomOp3};

/// `$body` on the f32, bf16 or f16 slice `$x` of the CPU storage `$s` (contiguous per layout
/// `$l`), its `Vec` the storage of the same dtype; other dtypes are an error of op `$name`.
macro_rules! map_float_storage {
    ($s:expr, $l:expr, $name:expr, |$x:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $x = slice_of(v, $l, $name)?;
                CpuStorage::F32($body)
            }
            CpuStorage::BF16(v) => {
                let $x = slice_of(v, $l, $name)?;
                CpuStorage::BF16($body)
            }
            CpuStorage::F16(v) => {
                let $x = slice_of(v, $l, $name)?;
                CpuStorage::F16($body)
            }
            s => bail!("{}: unsupported dtype {:?}", $name, s.dtype()),
        }
    };
}

mod bf16;
mod linear;
mod rows;
mod sink;
pub(crate) use bf16::scratch_bytes as lora_bf16_scratch_bytes;
pub use linear::lora_linear_up;
use rows::{prims, Prims};
pub use sink::{backward_collecting, backward_tape};

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
    tape::apply2(&x.contiguous()?, &a.contiguous()?, op)
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
    tape::apply3(&y.contiguous()?, &h.contiguous()?, &b.contiguous()?, op)
}

/// Columns a gradient task owns (of every row): its row sums stay in one thread, in order.
const COL_BLOCK: usize = 256;
/// Rows of x a gradient task converts at a time (64 KiB of f32 at `COL_BLOCK` columns).
const SLAB: usize = 64;

/// The adapter's input `x (M, n)` as its products read it: `drop(x)`, the dropout factors (when
/// there is a mask) applied row by row as rows are loaded, never stored.
#[derive(Clone, Copy)]
struct Dropped<'a, T> {
    /// The rows, row-major.
    x: &'a [T],
    /// Row length.
    n: usize,
    /// The mask; `None` in evaluation, without dropout, and for the up projection's `d`.
    drop: Option<DropoutMask>,
}

impl<T: Elem> Dropped<'_, T> {
    /// Rows M.
    fn rows(&self) -> usize {
        self.x.len() / self.n.max(1)
    }

    /// Columns `cols` of row `i` of `drop(x)` in f32 into `dst`.
    #[inline]
    fn load_row(&self, i: usize, cols: std::ops::Range<usize>, dst: &mut [f32]) {
        let at = i * self.n + cols.start;
        for (d, &v) in dst.iter_mut().zip(&self.x[at..at + cols.len()]) {
            *d = v.f();
        }
        if let Some(m) = self.drop {
            m.apply(at as u64, dst);
        }
    }
}

/// `s · drop(x) · matᵀ` (M, R) for `x (M, n)` in its element type and `mat (R, n)` f32, one row
/// of x per task: the down projection `h = s·drop(x)·Aᵀ`, and the up projection's `dh = d·B`
/// (`mat` = Bᵀ).
fn rows_dot<T: Elem>(x: Dropped<T>, mat: &[f32], s: f32) -> Vec<f32> {
    let (p, n) = (prims(), x.n);
    let r = mat.len() / n.max(1);
    let m = x.rows();
    let mut out = vec![0f32; m * r];
    out.par_chunks_mut((p.xb * r).max(1))
        .enumerate()
        .for_each_init(
            || vec![0f32; p.xb * n],
            |rows, (c, out)| {
                let nx = out.len() / r.max(1);
                for (j, row) in rows.chunks_exact_mut(n.max(1)).take(nx).enumerate() {
                    x.load_row(c * p.xb + j, 0..n, row);
                }
                (p.dots)(&rows[..nx * n], n, mat, s, out);
            },
        );
    out
}

/// `Σ_i coef_iᵀ·rows_i` over all rows: `out (R, n)` with `out_k = Σ_i coef[i, k]·row_i`, for
/// `coef (M, R)` f32 and rows `(M, n)` of `x` (dropout applied); parallel over column blocks.
fn outer_sum<T: Elem>(p: Prims, coef: &[f32], r: usize, x: Dropped<T>) -> Vec<f32> {
    let (m, n) = (coef.len() / r.max(1), x.n);
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
                    x.load_row(i0 + j, cols.clone(), row);
                }
                let coef = &coef[i0 * r..(i0 + rows) * r];
                (p.rank_update)(&mut acc, w, coef, r, &panel[..rows * w]);
            }
            acc
        })
        .collect();
    gather_column_blocks(&blocks, r, n, COL_BLOCK)
}

/// `out (R, n)` from its column blocks of `block` columns (the last partial), block j holding R
/// rows of its columns at the stride its length gives (`len / R`, at least its width).
fn gather_column_blocks(blocks: &[Vec<f32>], r: usize, n: usize, block: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * n];
    for (blk, acc) in blocks.iter().enumerate() {
        let (c0, stride) = (blk * block, acc.len() / r.max(1));
        let w = block.min(n - c0);
        for k in 0..r {
            out[k * n + c0..][..w].copy_from_slice(&acc[k * stride..][..w]);
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
    /// `drop(x)` for x `(M, i)`.
    fn dropped<'a, T>(&self, x: &'a [T], i: usize) -> Dropped<'a, T> {
        Dropped {
            x,
            n: i,
            drop: self.dropout,
        }
    }

    /// h (M, R) = s·drop(x)·Aᵀ.
    fn forward<T: Elem>(&self, x: &[T], a: &[f32], i: usize) -> Vec<f32> {
        if self.bf16 {
            let r = a.len() / i.max(1);
            let w = bf16::Operand::for_dot(a, r, i, false);
            return bf16::rows_dot(self.dropped(x, i), &w, r, self.scale);
        }
        rows_dot(self.dropped(x, i), a, self.scale)
    }

    /// dA (R, I) = s·dhᵀ·drop(x).
    fn weight_grad<T: Elem>(&self, dh: &[f32], r: usize, x: &[T], i: usize) -> Vec<f32> {
        let mut da = match self.bf16 {
            true => bf16::outer_sum(dh, r, self.dropped(x, i)),
            false => outer_sum(prims(), dh, r, self.dropped(x, i)),
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
        if self.bf16 {
            let w = bf16::Operand::for_expand(a, r, i, false);
            return bf16::expand(dh, (m, r), &w, i, T::of(0.0), |t, acc, dx| {
                acc.iter_mut().for_each(|v| *v *= self.scale);
                if let Some(mask) = self.dropout {
                    mask.apply((t * i) as u64, acc);
                }
                T::put_row(dx, acc);
            });
        }
        let p = prims();
        par_spans_init(
            m * i,
            (i, 1),
            T::of(0.0),
            || (vec![0f32; i], vec![0f32; r]),
            |(acc, c), t, dx| {
                acc.fill(0.0);
                for (c, &d) in c.iter_mut().zip(&dh[t * r..(t + 1) * r]) {
                    *c = self.scale * d;
                }
                (p.axpys)(acc, c, a);
                if let Some(mask) = self.dropout {
                    mask.apply((t * i) as u64, acc);
                }
                T::put_row(dx, acc);
            },
        )
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

    fn bwd(&self, x: &Tensor, a: &Tensor, _h: &Tensor, dh: &Tensor) -> Grads2 {
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
        let da = sink::weight_grad(a, da)?;
        Ok((Some(dx), da))
    }
}

/// `(dh, dB)` of an up projection ([`UpOp::grads`]).
type GradsUp = Result<(Tensor, Option<Tensor>)>;

struct UpOp {
    /// bf16 products ([`bf16`]).
    bf16: bool,
}

impl UpOp {
    /// y + h·Bᵀ with `b (O, R)` f32, rounded once to T (y: f32, or already T).
    fn forward<Y: Elem, T: Elem>(&self, y: &[Y], h: &[f32], b: &[f32], o: usize) -> Vec<T> {
        let r = b.len() / o.max(1);
        if self.bf16 {
            let w = bf16::Operand::for_expand(b, r, o, true);
            let m = y.len() / o.max(1);
            return bf16::expand(h, (m, r), &w, o, T::of(0.0), |t, z, out| {
                for (zv, &yv) in z.iter_mut().zip(&y[t * o..(t + 1) * o]) {
                    *zv += yv.f();
                }
                T::put_row(out, z);
            });
        }
        let bt = transpose(b, o, r);
        let p = prims();
        par_spans_init(
            y.len(),
            (o, 1),
            T::of(0.0),
            || vec![0f32; o],
            |z, t, out| {
                z.fill(0.0);
                (p.axpys)(z, &h[t * r..(t + 1) * r], &bt);
                let y = &y[t * o..(t + 1) * o];
                out.put_with(o, |j| T::of(y[j].f() + z[j]));
            },
        )
    }
}

impl UpOp {
    /// `(dh, dB)` of `h·Bᵀ` for the output gradient `d (.., O)`: `dh (M, R) = d·B` f32 (or
    /// `dh_done`, computed already) and `dB = dᵀ·h` in b's dtype (None where [`sink`] holds it
    /// aside). `op` names the op asking, for its errors.
    fn grads(
        &self,
        op: &str,
        (h, b): (&Tensor, &Tensor),
        d: &Tensor,
        dh_done: Option<Vec<f32>>,
    ) -> GradsUp {
        let (_, o) = rows_of(d.dims())?;
        let (_, r) = b.dims2()?;
        let h32 = h.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (dh, db) = with_elem!(d, op, |ds| {
            let d = Dropped {
                x: ds,
                n: o,
                drop: None,
            };
            // dh (M, R) = d·B (B widened to f32 only here: a caller's dh needs no B); dBᵀ (R, O)
            // = hᵀ·d, then (O, R)
            let dh = match (dh_done, self.bf16) {
                (Some(dh), _) => dh,
                (None, true) => {
                    let bt = bf16::Operand::for_dot(&const_f32(b, op)?, r, o, true);
                    bf16::rows_dot(d, &bt, r, 1.0)
                }
                (None, false) => rows_dot(d, &transpose(&const_f32(b, op)?, o, r), 1.0),
            };
            let dbt = match self.bf16 {
                true => bf16::outer_sum(&h32, r, d),
                false => outer_sum(prims(), &h32, r, d),
            };
            (dh, transpose(&dbt, r, o))
        });
        let dh = Tensor::from_vec(dh, h.dims(), &Device::Cpu)?;
        Ok((dh, sink::weight_grad(b, db)?))
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
        let out = map_float_storage!(sy, ly, name, |y| self.forward(y, &h, &b, o));
        Ok((out, ly.shape().clone()))
    }

    fn bwd(&self, y: &Tensor, h: &Tensor, b: &Tensor, _out: &Tensor, d: &Tensor) -> Grads3 {
        let d = d.to_dtype(y.dtype())?.contiguous()?;
        let (dh, db) = self.grads(self.name(), (h, b), &d, None)?;
        Ok((Some(d), Some(dh), db))
    }
}
