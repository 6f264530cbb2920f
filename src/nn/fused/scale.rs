//! A per-column scale with a residual, `y = u + (u − b) ⊙ g`, in one pass forward and one pass
//! backward: DoRA's `(m / n) ⊙ (W·x + s·B·A·x) + b` written with `g = m / n − 1` (near 0, so a
//! half-precision u keeps its precision), where composite candle ops take six activation-sized
//! passes (and as many bf16 ↔ f32 conversions) per linear and step.
use super::*;
use candle_core::CustomOp2;

/// `y (.., C) = u + (u − b) ⊙ g` for `u (.., C)` (f32, bf16 or f16), `g (C,)` f32 with gradient,
/// and a frozen bias `b (C,)` (none: 0). Sums in f32, one rounding to u's dtype. Backward:
/// `du = dy + dy ⊙ g`, `dg = Σ_rows dy ⊙ (u − b)` (f32, summed over rows in order: deterministic).
pub fn scale_residual(u: &Tensor, g: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check_cpu("scale_residual", &[u, g])?;
    let c = u.dims().last().copied().unwrap_or(0);
    if g.dims() != [c] || g.dtype() != DType::F32 {
        bail!(
            "scale_residual: g must be f32 of shape [{c}] (the last dim of u {:?}), got {:?} {:?}",
            u.dims(),
            g.dtype(),
            g.dims()
        );
    }
    let bias = match bias {
        Some(b) if b.dims() != [c] => bail!(
            "scale_residual: bias of shape {:?}, expected [{c}]",
            b.dims()
        ),
        Some(b) => Some(Arc::new(const_f32(b, "scale_residual")?)),
        None => None,
    };
    tape::apply2(&u.contiguous()?, &g.contiguous()?, ScaleResidualOp { bias })
}

struct ScaleResidualOp {
    bias: Option<Arc<Vec<f32>>>,
}

/// Columns a backward task owns (all rows of them): its gradient sums stay in one thread, in row
/// order, so the result does not depend on the thread count.
const COL_BLOCK: usize = 256;

impl ScaleResidualOp {
    fn bias(&self, j: usize) -> f32 {
        self.bias.as_ref().map_or(0.0, |b| b[j])
    }

    /// y rows: (u − b)·g first, then u + it (the composite ops' order, so f32 agrees bit for bit).
    fn apply<T: Elem>(&self, u: &[T], g: &[f32]) -> Vec<T> {
        let c = g.len();
        let mut y = vec![T::of(0.0); u.len()];
        if c == 0 {
            return y;
        }
        y.par_chunks_mut(c).zip(u.par_chunks(c)).for_each(|(y, u)| {
            for (j, (y, &u)) in y.iter_mut().zip(u).enumerate() {
                let u = u.f();
                *y = T::of(u + (u - self.bias(j)) * g[j]);
            }
        });
        y
    }

    /// (du, dg) for upstream `dy`: du row by row, dg in column blocks (each block's row sums in
    /// one task, in row order).
    fn grads<T: Elem>(&self, u: &[T], dy: &[T], g: &[f32]) -> (Vec<T>, Vec<f32>) {
        let c = g.len();
        let rows = u.len().checked_div(c).unwrap_or(0);
        let mut du = vec![T::of(0.0); u.len()];
        let mut dg = vec![0f32; c];
        if c == 0 {
            return (du, dg);
        }
        du.par_chunks_mut(c)
            .zip(dy.par_chunks(c))
            .for_each(|(du, dy)| {
                for ((du, &d), &g) in du.iter_mut().zip(dy).zip(g) {
                    let d = d.f();
                    *du = T::of(d + d * g);
                }
            });
        dg.par_chunks_mut(COL_BLOCK)
            .enumerate()
            .for_each(|(blk, dg)| {
                let j0 = blk * COL_BLOCK;
                for i in 0..rows {
                    let at = i * c + j0;
                    for (k, dg) in dg.iter_mut().enumerate() {
                        *dg += dy[at + k].f() * (u[at + k].f() - self.bias(j0 + k));
                    }
                }
            });
        (du, dg)
    }
}

impl CustomOp2 for ScaleResidualOp {
    fn name(&self) -> &'static str {
        "qtune-scale-residual"
    }

    fn cpu_fwd(&self, su: &CpuStorage, lu: &Layout, sg: &CpuStorage, lg: &Layout) -> CpuOut {
        let CpuStorage::F32(g) = sg else {
            bail!("{}: g must be f32", self.name());
        };
        let g = slice_of(g, lg, self.name())?;
        let y = match su {
            CpuStorage::F32(u) => CpuStorage::F32(self.apply(slice_of(u, lu, self.name())?, g)),
            CpuStorage::BF16(u) => CpuStorage::BF16(self.apply(slice_of(u, lu, self.name())?, g)),
            CpuStorage::F16(u) => CpuStorage::F16(self.apply(slice_of(u, lu, self.name())?, g)),
            s => bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        };
        Ok((y, lu.shape().clone()))
    }

    fn bwd(&self, u: &Tensor, g: &Tensor, _y: &Tensor, dy: &Tensor) -> Grads2 {
        let dy = dy.to_dtype(u.dtype())?.contiguous()?;
        let gv = g.to_vec1::<f32>()?;
        let (su, lu) = u.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        let (Storage::Cpu(su), Storage::Cpu(sd)) = (&*su, &*sd) else {
            bail!("{}: only the CPU kernels exist", self.name());
        };
        let name = self.name();
        let (du, dg) = match (su, sd) {
            (CpuStorage::F32(u), CpuStorage::F32(d)) => self.bwd_tensor(u, d, lu, ld, &gv)?,
            (CpuStorage::BF16(u), CpuStorage::BF16(d)) => self.bwd_tensor(u, d, lu, ld, &gv)?,
            (CpuStorage::F16(u), CpuStorage::F16(d)) => self.bwd_tensor(u, d, lu, ld, &gv)?,
            _ => bail!("{name}: u and its gradient must share one float dtype"),
        };
        let dg = Tensor::from_vec(dg, g.dims(), &Device::Cpu)?;
        Ok((Some(du), Some(dg)))
    }
}

impl ScaleResidualOp {
    /// [`ScaleResidualOp::grads`] on storage slices, du as a tensor of u's shape.
    fn bwd_tensor<T: Elem>(
        &self,
        u: &[T],
        dy: &[T],
        lu: &Layout,
        ld: &Layout,
        g: &[f32],
    ) -> Result<(Tensor, Vec<f32>)> {
        let name = self.name();
        let (du, dg) = self.grads(slice_of(u, lu, name)?, slice_of(dy, ld, name)?, g);
        Ok((Tensor::from_vec(du, lu.dims(), &Device::Cpu)?, dg))
    }
}
