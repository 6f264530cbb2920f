//! RMSNorm with a frozen weight: forward and hand-written backward (CPU; CUDA through kernels/).
use super::*;

/// `y (.., C) = x / sqrt(mean(x²) + eps) · w` over the last dim, as transformers' LlamaRMSNorm
/// computes it (statistics in f32; for bf16/f16 x, its two roundings to x's dtype); `w (C)` is
/// frozen (no gradient, not a graph node). The graph keeps x only.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    check_cpu_or_cuda("rms_norm", &[x])?;
    let c = x.dims().last().copied().unwrap_or(0);
    if w.dims() != [c] {
        bail!(
            "rms_norm: weight of shape {:?} does not match the last dim of x {:?}",
            w.dims(),
            x.dims()
        );
    }
    let op = RmsNormOp {
        w: Arc::new(const_f32(w, "rms_norm")?),
        eps,
    };
    tape::apply1(&x.contiguous()?, op)
}

struct RmsNormOp {
    w: Arc<Vec<f32>>,
    eps: f64,
}

impl RmsNormOp {
    /// 1 / sqrt(mean(x²) + eps) of one row (an f32 sum in eight lanes, as torch sums in f32).
    fn rstd(&self, row: &[f32]) -> f32 {
        let ss = dot(row, row) as f64;
        (1.0 / (ss / row.len() as f64 + self.eps).sqrt()) as f32
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "qtune-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        let x = f32_of(s, l, self.name())?;
        let c = self.w.len();
        // transformers rounds x·rstd to the activation dtype, multiplies by the weight in that
        // dtype and rounds again; `round` reproduces both roundings (identity for f32)
        let round: fn(f32) -> f32 = match s.dtype() {
            DType::BF16 => |v| bf16_f(bf16_of(v)),
            DType::F16 => |v| f16::from_f32(v).to_f32(),
            _ => |v| v,
        };
        let w: Vec<f32> = self.w.iter().map(|&w| round(w)).collect();
        let dtype = s.dtype();
        // x, y: (rows, C)
        let y = match c {
            0 => Vec::new(),
            _ => par_spans(x.len(), c, 0f32, |_, y| {
                let x = &x[y.range()];
                let r = self.rstd(x);
                // a loop per dtype, each rounding inlined, so that they vectorise
                match dtype {
                    DType::F32 => y.put_with(c, |j| w[j] * (x[j] * r)),
                    DType::BF16 => y.put_with(c, |j| w[j] * bf16_f(bf16_of(x[j] * r))),
                    _ => y.put_with(c, |j| w[j] * round(x[j] * r)),
                }
            }),
        };
        Ok((storage_of(y, s.dtype()), l.shape().clone()))
    }

    /// kernels/ops.cu `qt_rmsnorm_fwd` (one thread block per row).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CudaOut {
        let y = crate::cuda::ops::rms_norm_fwd((s, l), &self.w, self.eps)?;
        Ok((y, l.shape().clone()))
    }

    /// With g = dy·w and r = rstd: dx = r·g - x·r³·mean(g·x). No gradient for w.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = RmsNormBwdCuda {
                w: self.w.clone(),
                eps: self.eps,
            };
            return Ok(Some(
                x.contiguous()?
                    .apply_op2_no_bwd(&dy.to_dtype(x.dtype())?.contiguous()?, &op)?,
            ));
        }
        let c = self.w.len();
        let dx = with_f32(x, self.name(), |x| {
            with_f32(dy, self.name(), |dy| {
                if c == 0 {
                    return Vec::new();
                }
                par_spans(x.len(), c, 0f32, |_, dx| {
                    let (x, dy) = (&x[dx.range()], &dy[dx.range()]);
                    let r = self.rstd(x);
                    let gx = dot3(dy, &self.w, x) as f64;
                    let k = (r as f64).powi(3) * gx / c as f64;
                    let k = k as f32;
                    let w = &self.w[..c];
                    dx.put_with(c, |j| r * dy[j] * w[j] - k * x[j]);
                })
            })
        })??;
        Ok(Some(tensor_of(dx, x.dims(), x.dtype())?))
    }
}

/// RMSNorm's input gradient on the GPU, as an op over (x, dy) so that it returns a tensor on the
/// device (the CPU backward above computes it inline).
#[cfg(feature = "cuda")]
struct RmsNormBwdCuda {
    w: Arc<Vec<f32>>,
    eps: f64,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for RmsNormBwdCuda {
    fn name(&self) -> &'static str {
        "qtune-rms-norm-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CpuOut {
        bail!("qtune-rms-norm-bwd: the CPU backward is RmsNormOp::bwd")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, dy: &CudaStorage, dyl: &Layout) -> CudaOut {
        let dx = crate::cuda::ops::rms_norm_bwd((x, xl), (dy, dyl), &self.w, self.eps)?;
        Ok((dx, xl.shape().clone()))
    }
}
