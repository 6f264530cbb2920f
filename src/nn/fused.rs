//! Fused training ops with hand-written backward passes (CPU): RMSNorm, rotary embeddings, causal
//! GQA attention and a chunked cross-entropy through a frozen lm_head.
//!
//! Why: candle's fused ops (`rms_norm`, `softmax_last_dim`, `rope`) have no backward, and the
//! composite versions keep every intermediate alive and store an activation-sized gradient for each
//! constant operand (cos/sin tables, norm weights). Here each op is one candle custom op whose
//! graph node keeps only what its backward needs; constants live inside the op (never graph nodes,
//! so never a gradient); math is f32 with bf16/f16 converted at the boundary.
//!
//! Every function takes and returns candle tensors (errors are `candle_core::Error`, as for any
//! tensor op), works on the CPU only so far, and is differentiable in its activation arguments
//! (once: the gradients they return are plain tensors, except rope's, which is rope again).
use crate::lora::QLinear;
use crate::quant::matmul::{qmatmul_bwd_input, qmatmul_fwd};
use crate::store::StoredTensor;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// Boundary helpers: f32 views of CPU storage, f32 results back in the activation dtype.

/// The contiguous f32 data of a storage slice (borrowed for f32, converted for bf16/f16).
fn f32_of<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: argument must be contiguous (call .contiguous() first)");
    };
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        s => bail!(
            "{op}: unsupported dtype {:?}; use f32, bf16 or f16",
            s.dtype()
        ),
    })
}

/// The same for a whole tensor (used in backward passes, which get tensors, not storages).
fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: only the CPU kernels exist so far; move the tensors to the CPU");
    };
    let v = f32_of(cpu, layout, op)?;
    Ok(f(&v))
}

/// A small constant tensor (weights, tables, masks) as an owned f32 vector (copied from the GPU
/// when it lives there: these are built once per op).
fn const_f32(t: &Tensor, op: &str) -> Result<Vec<f32>> {
    let supported = t.device().is_cpu() || (cfg!(feature = "cuda") && t.device().is_cuda());
    if !supported {
        bail!("{op}: only the CPU and CUDA kernels exist; move the tensors to the CPU");
    }
    t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// The activation arguments of an op with CUDA kernels (`--features cuda`) may live on the GPU.
fn check_cpu_or_cuda(op: &str, ts: &[&Tensor]) -> Result<()> {
    if cfg!(feature = "cuda") && ts.iter().all(|t| t.device().is_cuda()) {
        return Ok(());
    }
    check_cpu(op, ts)
}

/// f32 results as a storage of `dtype`.
fn storage_of(v: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// f32 results as a (gradient) tensor of `dtype`.
fn tensor_of(v: Vec<f32>, dims: &[usize], dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::BF16 => Tensor::from_vec(
            v.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            dims,
            &Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(
            v.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            dims,
            &Device::Cpu,
        ),
        _ => Tensor::from_vec(v, dims, &Device::Cpu),
    }
}

fn check_cpu(op: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| !matches!(t.device(), Device::Cpu)) {
        bail!("{op}: only the CPU kernels exist so far; move the tensors to the CPU");
    }
    Ok(())
}

/// Σ a·b·c with eight independent accumulators.
#[inline]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let mut acc = [0f32; 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: f32 = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .map(|((x, y), z)| x * y * z)
    .sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b with eight independent accumulators, so that LLVM vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

// ---------------------------------------------------------------------------------------------
// 1. RMSNorm with a frozen weight.

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
    x.contiguous()?.apply_op1(op)
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

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(s, l, self.name())?;
        let c = self.w.len();
        // transformers rounds x·rstd to the activation dtype, multiplies by the weight in that
        // dtype and rounds again; `round` reproduces both roundings (identity for f32)
        let round: fn(f32) -> f32 = match s.dtype() {
            DType::BF16 => |v| bf16::from_f32(v).to_f32(),
            DType::F16 => |v| f16::from_f32(v).to_f32(),
            _ => |v| v,
        };
        let w: Vec<f32> = self.w.iter().map(|&w| round(w)).collect();
        let is_f32 = s.dtype() == DType::F32;
        // x, y: (rows, C)
        let mut y = vec![0f32; x.len()];
        if c > 0 {
            y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| {
                let r = self.rstd(x);
                let it = y.iter_mut().zip(x).zip(&w);
                if is_f32 {
                    // separate loop without the rounding call, so that it vectorises
                    it.for_each(|((y, &x), &w)| *y = w * (x * r));
                } else {
                    it.for_each(|((y, &x), &w)| *y = w * round(x * r));
                }
            });
        }
        Ok((storage_of(y, s.dtype()), l.shape().clone()))
    }

    /// kernels/ops.cu `qt_rmsnorm_fwd` (one thread block per row).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
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
                let mut dx = vec![0f32; x.len()];
                if c > 0 {
                    dx.par_chunks_mut(c)
                        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
                        .for_each(|(dx, (x, dy))| {
                            let r = self.rstd(x);
                            let gx = dot3(dy, &self.w, x) as f64;
                            let k = (r as f64).powi(3) * gx / c as f64;
                            let k = k as f32;
                            for (((dx, &d), &w), &x) in
                                dx.iter_mut().zip(dy).zip(self.w.iter()).zip(x)
                            {
                                *dx = r * d * w - k * x;
                            }
                        });
                }
                dx
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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("qtune-rms-norm-bwd: the CPU backward is RmsNormOp::bwd")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = crate::cuda::ops::rms_norm_bwd((x, xl), (dy, dyl), &self.w, self.eps)?;
        Ok((dx, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Rotary position embeddings.

/// `(cos, sin)`, each `(T, D/2)`, for positions `0..T`, head dim `D` and base `theta`, as
/// transformers' LlamaRotaryEmbedding computes them in f32 (inv_freq and p·inv_freq rounded to
/// f32; its `(T, D)` tables are these halves repeated twice), then cast to `dtype`.
pub fn rope_tables(t: usize, d: usize, theta: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
    if d == 0 || !d.is_multiple_of(2) {
        bail!("rope_tables: head dim {d} must be even and non-zero");
    }
    let half = d / 2;
    // inv_freq[i] = 1 / theta^((2i as f32) / D as f32); the power is correctly rounded to f32
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let e = (2 * i) as f32 / d as f32;
            1.0f32 / (theta.powf(e as f64) as f32)
        })
        .collect();
    let mut cos = vec![0f32; t * half];
    let mut sin = vec![0f32; t * half];
    for p in 0..t {
        for (i, &f) in inv_freq.iter().enumerate() {
            // the angle is an f32 product, as in transformers' f32 matmul with an inner dim of 1
            let a = (p as f32 * f) as f64;
            cos[p * half + i] = a.cos() as f32;
            sin[p * half + i] = a.sin() as f32;
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), &Device::Cpu)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (t, half), &Device::Cpu)?.to_dtype(dtype)?,
    ))
}

/// Rotary embedding in the HF half-rotation layout: for `x (B, H, T, D)` with `x1 = x[.., :D/2]`,
/// `x2 = x[.., D/2:]`, `out = [x1·cos - x2·sin, x2·cos + x1·sin]`; `cos, sin (T, D/2)` are frozen.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_impl(x, cos, sin, false)
}

/// Rotary embedding on adjacent pairs `(x[2i], x[2i+1])` (GGUF / Meta layout); otherwise as [`rope`].
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_impl(x, cos, sin, true)
}

fn rope_impl(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    check_cpu_or_cuda("rope", &[x])?;
    let (_b, _h, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        bail!(
            "rope: x {:?} (B, H, T, D) needs cos and sin of shape [{t}, {}], got {:?} and {:?}",
            x.dims(),
            d / 2,
            cos.dims(),
            sin.dims()
        );
    }
    let op = RopeOp {
        cos: Arc::new(const_f32(cos, "rope")?),
        sin: Arc::new(const_f32(sin, "rope")?),
        t,
        half: d / 2,
        interleaved,
        inverse: false,
    };
    x.contiguous()?.apply_op1(op)
}

#[derive(Clone)]
struct RopeOp {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    t: usize,
    half: usize,
    interleaved: bool,
    /// Rotate by -theta (the backward of the forward rotation, and vice versa).
    inverse: bool,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "qtune-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(s, l, self.name())?;
        let (t, half) = (self.t, self.half);
        let d = 2 * half;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        // x, y: (B·H, T, D); each (b, h) slab rotated position by position
        let mut y = vec![0f32; x.len()];
        if t * d > 0 {
            y.par_chunks_mut(t * d)
                .zip(x.par_chunks(t * d))
                .for_each(|(y, x)| {
                    for p in 0..t {
                        let (xr, yr) = (&x[p * d..(p + 1) * d], &mut y[p * d..(p + 1) * d]);
                        for i in 0..half {
                            let c = self.cos[p * half + i];
                            let sn = sign * self.sin[p * half + i];
                            let (i1, i2) = if self.interleaved {
                                (2 * i, 2 * i + 1)
                            } else {
                                (i, i + half)
                            };
                            let (a, b) = (xr[i1], xr[i2]);
                            yr[i1] = a * c - b * sn;
                            yr[i2] = b * c + a * sn;
                        }
                    }
                });
        }
        Ok((storage_of(y, s.dtype()), l.shape().clone()))
    }

    /// kernels/ops.cu `qt_rope` (one thread per rotated pair; the backward is this op inverted).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::ops::rope(
            (s, l),
            &self.cos,
            &self.sin,
            self.t,
            self.half,
            self.interleaved,
            self.inverse,
        )?;
        Ok((y, l.shape().clone()))
    }

    /// The rotation is orthogonal: dx = R(-theta)·dy. Nothing is needed from the forward.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let mut inv = self.clone();
        inv.inverse = !self.inverse;
        Ok(Some(dy.contiguous()?.apply_op1(inv)?))
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Causal attention with GQA and a key padding mask.

/// Keys whose additive bias is at or below this are masked (transformers uses `f32::MIN`).
const MASKED: f32 = f32::MIN / 2.0;

/// Query rows per block: S and P of a block are (BQ × T) scratch, never kept.
const BQ: usize = 64;

/// `softmax(q·kᵀ/sqrt(D) + causal + padding) · v` for `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)`
/// (query head h reads kv head `h / (Hq/Hkv)`), `key_mask (B, T)` 1 = attend, 0 = padding;
/// returns `(B, Hq, T, D)`. The graph keeps q, k, v, the output and a per-row logsumexp (B·Hq·T);
/// probabilities are recomputed in backward, block by block, so no (T×T) matrix outlives the call.
/// A query row that sees no key at all (left padding) averages v over all T keys, as transformers'
/// additive `finfo.min` mask gives on CPU; its backward is that uniform softmax's (as torch's eager
/// autograd; torch's CPU SDPA backward gives T times that on such rows).
pub fn causal_attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t) = (q.dim(0)?, q.dim(2)?);
    let mask = match key_mask {
        None => AttnMask::Causal(None),
        Some(m) => {
            check_cpu("causal_attention", &[m])?;
            if m.dims() != [b, t] {
                bail!(
                    "causal_attention: key_mask of shape {:?}, expected [{b}, {t}]",
                    m.dims()
                );
            }
            let m = const_f32(m, "causal_attention")?;
            AttnMask::Causal(Some(m.iter().map(|&v| v != 0.0).collect()))
        }
    };
    attention_impl(q, k, v, mask)
}

/// [`causal_attention_masked`] with the mask given as transformers' additive bias
/// `(B or 1, 1, T, T)` (0 = attend, `f32::MIN` = masked; see `nn::attention_bias`): the same
/// signature as the composite `nn::causal_attention`. Entries at or below `f32::MIN / 2` are
/// skipped; others are added to the scaled scores. The bias is a constant (no gradient).
/// On the GPU (`--features cuda`) this is [`super::generic::causal_attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let generic = GENERIC_ATTENTION.load(std::sync::atomic::Ordering::Relaxed);
    if generic || (cfg!(feature = "cuda") && q.device().is_cuda()) {
        return super::generic::causal_attention(q, k, v, bias);
    }
    check_cpu("causal_attention", &[bias])?;
    let (b, t) = (q.dim(0)?, q.dim(2)?);
    let bb = bias_rows(bias, b, t)?;
    // shares the caller's storage when the bias is already f32 and contiguous (the usual case):
    // one bias serves every layer, and no op holds a copy of it
    let t_bias = bias.detach().to_dtype(DType::F32)?.contiguous()?;
    attention_impl(
        q,
        k,
        v,
        AttnMask::Bias {
            t: t_bias,
            batched: bb == b && b > 1,
        },
    )
}

/// When set (tests), [`causal_attention`] takes the device-generic path on the CPU too, so that a
/// whole training step can be checked with the attention the GPU runs.
pub static GENERIC_ATTENTION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Batch rows (B or 1) of an additive attention bias `(B or 1, 1, T, T)`, checked.
pub(super) fn bias_rows(bias: &Tensor, b: usize, t: usize) -> Result<usize> {
    match bias.dims() {
        [bb, 1, t1, t2] if (*bb == b || *bb == 1) && *t1 == t && *t2 == t => Ok(*bb),
        d => bail!("causal_attention: bias of shape {d:?}, expected [{b}, 1, {t}, {t}]"),
    }
}

/// `(B, Hq, Hkv, T, D)` of attention operands `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)`, checked
/// to fit together (Hq a multiple of Hkv).
pub(super) fn attention_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnDims> {
    let (b, hq, t, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if (bk, tk, dk) != (b, t, d) || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 {
        bail!(
            "causal_attention: q {:?} (B, Hq, T, D), k {:?} and v {:?} (B, Hkv, T, D) do not fit \
             (Hq must be a multiple of Hkv)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    Ok(AttnDims { b, hq, hkv, t, d })
}

fn attention_impl(q: &Tensor, k: &Tensor, v: &Tensor, mask: AttnMask) -> Result<Tensor> {
    check_cpu("causal_attention", &[q, k, v])?;
    let AttnDims { b, hq, hkv, t, d } = attention_dims(q, k, v)?;
    let op = AttentionOp {
        dims: AttnDims { b, hq, hkv, t, d },
        mask,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone, Copy)]
pub(super) struct AttnDims {
    pub(super) b: usize,
    pub(super) hq: usize,
    pub(super) hkv: usize,
    pub(super) t: usize,
    pub(super) d: usize,
}

/// Which keys a query row sees, and what is added to their scores.
enum AttnMask {
    /// Keys `j <= i`, restricted to `mask[b·T + j]` when given; nothing added.
    Causal(Option<Vec<bool>>),
    /// Additive bias (B or 1, 1, T, T) f32, contiguous: keys whose bias is above [`MASKED`].
    Bias { t: Tensor, batched: bool },
}

impl AttnMask {
    /// Runs `f` with a borrowed view of the mask (the bias tensor's storage is read-locked).
    fn with_view<R>(&self, f: impl FnOnce(&MaskView) -> R) -> Result<R> {
        match self {
            AttnMask::Causal(m) => Ok(f(&MaskView::Causal(m.as_deref()))),
            AttnMask::Bias { t, batched } => {
                let (guard, layout) = t.storage_and_layout();
                let (Storage::Cpu(CpuStorage::F32(v)), Some((s, e))) =
                    (&*guard, layout.contiguous_offsets())
                else {
                    bail!("causal_attention: the bias must be a contiguous f32 CPU tensor");
                };
                Ok(f(&MaskView::Bias(&v[s..e], *batched)))
            }
        }
    }
}

/// [`AttnMask`] borrowed for one forward or backward pass.
enum MaskView<'a> {
    Causal(Option<&'a [bool]>),
    Bias(&'a [f32], bool),
}

impl MaskView<'_> {
    /// For query row i of batch b: clears `add` to length `t`, sets it to the additive term of each
    /// visible key and -inf elsewhere; returns 1 + the last visible key, or 0 when none is visible.
    fn row(&self, b: usize, i: usize, t: usize, add: &mut [f32]) -> usize {
        let mut end = 0;
        match self {
            MaskView::Causal(m) => {
                for (j, a) in add.iter_mut().enumerate() {
                    let on = j <= i && m.is_none_or(|m| m[b * t + j]);
                    *a = if on { 0.0 } else { f32::NEG_INFINITY };
                    if on {
                        end = j + 1;
                    }
                }
            }
            MaskView::Bias(v, batched) => {
                let bi = if *batched { b } else { 0 };
                let row = &v[(bi * t + i) * t..][..t];
                for (j, (a, &x)) in add.iter_mut().zip(row).enumerate() {
                    let on = x > MASKED;
                    *a = if on { x } else { f32::NEG_INFINITY };
                    if on {
                        end = j + 1;
                    }
                }
            }
        }
        end
    }
}

/// `c (m×n, row stride ldc) = [c +] beta·op(a)·op(b)` for row-major `a` (m×k, or k×m when `ta`)
/// and `b` (k×n, or n×k when `tb`) with row strides `lda`, `ldb`.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    ldc: usize,
    acc: bool,
    (a, lda, ta): (&[f32], usize, bool),
    (b, ldb, tb): (&[f32], usize, bool),
    beta: f32,
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
    assert!(
        ac <= lda && a.len() >= (ar - 1) * lda + ac,
        "gemm_f32: a out of bounds"
    );
    assert!(
        bc <= ldb && b.len() >= (br - 1) * ldb + bc,
        "gemm_f32: b out of bounds"
    );
    assert!(
        n <= ldc && c.len() >= (m - 1) * ldc + n,
        "gemm_f32: c out of bounds"
    );
    let (a_rs, a_cs) = if ta { (1, lda) } else { (lda, 1) };
    let (b_rs, b_cs) = if tb { (1, ldb) } else { (ldb, 1) };
    // SAFETY: the asserts above keep every index of op(a) (m×k), op(b) (k×n) and c (m×n) with the
    // strides below inside its slice; c is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

struct AttentionOp {
    dims: AttnDims,
    mask: AttnMask,
    /// (B, Hq, T) logsumexp of each row's scaled scores, written by the forward for the backward.
    /// Each call makes its own op, so this belongs to one graph node.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

impl AttentionOp {
    /// Probabilities of query rows `i0..i0+rows` of (batch b, query head slab `q`) against keys
    /// `0..kend` into `p (rows × kend)`. With `lse` None (forward) it normalises and writes each
    /// row's logsumexp into `lse_out`; with Some (backward) it uses those. `add` is (T) scratch.
    /// Returns kend: 1 + the last key any of these rows sees (T if a row sees none).
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        mask: &MaskView,
        bi: usize,
        i0: usize,
        rows: usize,
        q: &[f32],
        k: &[f32],
        p: &mut Vec<f32>,
        add: &mut [f32],
        lse_in: Option<&[f32]>,
        lse_out: &mut [f32],
    ) -> usize {
        let AttnDims { t, d, .. } = self.dims;
        let scale = 1.0 / (d as f32).sqrt();
        // key extent of the block first, so that S is only as wide as needed
        let mut kend = 0;
        for i in i0..i0 + rows {
            let e = mask.row(bi, i, t, add);
            kend = kend.max(if e == 0 { t } else { e });
        }
        p.clear();
        p.resize(rows * kend, 0.0);
        // s (rows × kend) = scale · q[i0..] · k[..kend]ᵀ
        gemm_f32(
            (rows, kend, d),
            p,
            kend,
            false,
            (&q[i0 * d..(i0 + rows) * d], d, false),
            (&k[..kend * d], d, true),
            scale,
        );
        for r in 0..rows {
            let s = &mut p[r * kend..(r + 1) * kend];
            if mask.row(bi, i0 + r, t, add) == 0 {
                // no visible key: transformers' finfo.min bias makes every score equal
                s.fill(1.0 / t as f32);
                lse_out[r] = (t as f32).ln();
                continue;
            }
            for (s, a) in s.iter_mut().zip(add.iter()) {
                *s += a;
            }
            match lse_in {
                Some(lse) => s.iter_mut().for_each(|x| *x = (*x - lse[r]).exp()),
                None => {
                    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut l = 0f32;
                    for x in s.iter_mut() {
                        *x = (*x - m).exp();
                        l += *x;
                    }
                    s.iter_mut().for_each(|x| *x /= l);
                    lse_out[r] = m + l.ln();
                }
            }
        }
        kend
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "qtune-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let AttnDims { hq, hkv, t, d, .. } = self.dims;
        let (q, k, v) = (
            f32_of(qs, ql, self.name())?,
            f32_of(ks, kl, self.name())?,
            f32_of(vs, vl, self.name())?,
        );
        let rep = hq / hkv;
        // o: (B, Hq, T, D); lse: (B, Hq, T); one task per (b, query head)
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; q.len() / d.max(1)];
        let (o_ref, lse_ref) = (&mut o, &mut lse);
        self.mask.with_view(|mask| {
            if t * d == 0 {
                return;
            }
            o_ref
                .par_chunks_mut(t * d)
                .zip(lse_ref.par_chunks_mut(t))
                .enumerate()
                .for_each(|(bh, (o, lse))| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let q = &q[bh * t * d..(bh + 1) * t * d];
                    let kv0 = (bi * hkv + h / rep) * t * d;
                    let (k, v) = (&k[kv0..kv0 + t * d], &v[kv0..kv0 + t * d]);
                    let (mut p, mut add) = (Vec::new(), vec![0f32; t]);
                    for i0 in (0..t).step_by(BQ) {
                        let rows = BQ.min(t - i0);
                        let lse = &mut lse[i0..i0 + rows];
                        let kend =
                            self.probs(mask, bi, i0, rows, q, k, &mut p, &mut add, None, lse);
                        // o[i0..] (rows × D) = p (rows × kend) · v[..kend]
                        gemm_f32(
                            (rows, d, kend),
                            &mut o[i0 * d..(i0 + rows) * d],
                            d,
                            false,
                            (&p, kend, false),
                            (&v[..kend * d], d, false),
                            1.0,
                        );
                    }
                });
        })?;
        *self.lse.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        Ok((storage_of(o, qs.dtype()), ql.shape().clone()))
    }

    /// Flash-attention backward per query block: p = exp(s - lse), dp = dO·vᵀ,
    /// ds = p·(dp - rowsum(dO·O))·scale, dq = ds·k, dk += dsᵀ·q, dv += pᵀ·dO
    /// (GQA: kv grads summed over the query heads of the group).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let AttnDims { b, hq, hkv, t, d } = self.dims;
        let Some(lse) = self.lse.lock().expect("lse lock poisoned").clone() else {
            bail!("causal_attention: backward before forward");
        };
        let rep = hq / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        let name = self.name();
        let (q_dims, dtypes) = (q.dims().to_vec(), [q.dtype(), k.dtype(), v.dtype()]);
        let mut dq = vec![0f32; b * hq * t * d];
        let mut dk = vec![0f32; b * hkv * t * d];
        let mut dv = vec![0f32; b * hkv * t * d];
        let (q, k, v, o, d_o) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            o.contiguous()?,
            d_o.contiguous()?,
        );
        let guards = [&q, &k, &v, &o, &d_o].map(|t| t.storage_and_layout());
        let mut data: Vec<Cow<[f32]>> = Vec::with_capacity(5);
        for (s, l) in &guards {
            let Storage::Cpu(cpu) = &**s else {
                bail!("{name}: only the CPU kernels exist so far; move the tensors to the CPU");
            };
            data.push(f32_of(cpu, l, name)?);
        }
        let [q, k, v, o, d_o] = [0, 1, 2, 3, 4].map(|i| &*data[i]);
        let (dq_ref, dk_ref, dv_ref) = (&mut dq, &mut dk, &mut dv);
        self.mask.with_view(|mask| {
            if t * d == 0 {
                return;
            }
            // one task per (b, kv head): it owns that head's dk, dv and the dq of its `rep` query
            // heads, so no two tasks write the same memory
            dq_ref
                .par_chunks_mut(rep * t * d)
                .zip(
                    dk_ref
                        .par_chunks_mut(t * d)
                        .zip(dv_ref.par_chunks_mut(t * d)),
                )
                .enumerate()
                .for_each(|(bg, (dq, (dk, dv)))| {
                    let bi = bg / hkv;
                    let (k, v) = (&k[bg * t * d..][..t * d], &v[bg * t * d..][..t * d]);
                    let (mut p, mut dp, mut add) = (Vec::new(), Vec::new(), vec![0f32; t]);
                    let mut unused = vec![0f32; BQ];
                    for r in 0..rep {
                        let bh = bg * rep + r; // = bi·Hq + h
                        let slab = bh * t * d..(bh + 1) * t * d;
                        let (q, o, d_o) = (&q[slab.clone()], &o[slab.clone()], &d_o[slab]);
                        let dq = &mut dq[r * t * d..(r + 1) * t * d];
                        for i0 in (0..t).step_by(BQ) {
                            let rows = BQ.min(t - i0);
                            let lse = &lse[bh * t + i0..][..rows];
                            let kend = self.probs(
                                mask,
                                bi,
                                i0,
                                rows,
                                q,
                                k,
                                &mut p,
                                &mut add,
                                Some(lse),
                                &mut unused,
                            );
                            let (qb, ob, dob) = (
                                &q[i0 * d..(i0 + rows) * d],
                                &o[i0 * d..(i0 + rows) * d],
                                &d_o[i0 * d..(i0 + rows) * d],
                            );
                            // dv[..kend] += pᵀ (kend × rows) · dO (rows × D)
                            gemm_f32(
                                (kend, d, rows),
                                &mut dv[..kend * d],
                                d,
                                true,
                                (&p, kend, true),
                                (dob, d, false),
                                1.0,
                            );
                            // dp (rows × kend) = dO · v[..kend]ᵀ
                            dp.clear();
                            dp.resize(rows * kend, 0.0);
                            gemm_f32(
                                (rows, kend, d),
                                &mut dp,
                                kend,
                                false,
                                (dob, d, false),
                                (&v[..kend * d], d, true),
                                1.0,
                            );
                            // ds = p·(dp - dO·O)·scale, in place of dp
                            for r in 0..rows {
                                let dd = dot(&dob[r * d..(r + 1) * d], &ob[r * d..(r + 1) * d]);
                                let (pr, dpr) = (
                                    &p[r * kend..(r + 1) * kend],
                                    &mut dp[r * kend..(r + 1) * kend],
                                );
                                for (x, &pv) in dpr.iter_mut().zip(pr) {
                                    *x = pv * (*x - dd) * scale;
                                }
                            }
                            // dq[i0..] (rows × D) = ds · k[..kend]
                            gemm_f32(
                                (rows, d, kend),
                                &mut dq[i0 * d..(i0 + rows) * d],
                                d,
                                false,
                                (&dp, kend, false),
                                (&k[..kend * d], d, false),
                                1.0,
                            );
                            // dk[..kend] += dsᵀ (kend × rows) · q (rows × D)
                            gemm_f32(
                                (kend, d, rows),
                                &mut dk[..kend * d],
                                d,
                                true,
                                (&dp, kend, true),
                                (qb, d, false),
                                1.0,
                            );
                        }
                    }
                });
        })?;
        drop(data);
        drop(guards);
        let kd = [b, hkv, t, d];
        Ok((
            Some(tensor_of(dq, &q_dims, dtypes[0])?),
            Some(tensor_of(dk, &kd, dtypes[1])?),
            Some(tensor_of(dv, &kd, dtypes[2])?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Cross-entropy through the frozen lm_head, chunk by chunk.

/// `(Σ over tokens with label >= 0 of -log softmax(hidden·Wᵀ + bias)[label], that token count)`
/// for `hidden (N, C)` and `labels (N)` (-100, or any negative, ignores a token), through the
/// frozen `lm_head` (V, C); the signature of the composite `nn::cross_entropy_chunked`.
/// Logits exist `chunk` rows at a time only: the forward keeps a logsumexp per token, the
/// backward recomputes each chunk's logits, forms `softmax - onehot` and maps it back through
/// lm_head's input-gradient kernel. The loss is an f32 scalar whatever hidden's dtype;
/// differentiable in hidden only.
pub fn cross_entropy_chunked(
    hidden: &Tensor,
    lm_head: &QLinear,
    labels: &[i64],
    chunk: usize,
) -> Result<(Tensor, usize)> {
    check_cpu_or_cuda("cross_entropy_chunked", &[hidden])?;
    let (n, c) = hidden.dims2()?;
    let v = lm_head.out_features();
    if c != lm_head.in_features() || labels.len() != n {
        bail!(
            "cross_entropy_chunked: hidden {:?} (N, C) and {} labels do not fit lm_head ({v} x {})",
            hidden.dims(),
            labels.len(),
            lm_head.in_features()
        );
    }
    let mut n_tokens = 0;
    for (i, &l) in labels.iter().enumerate() {
        if l >= 0 && l as usize >= v {
            bail!("cross_entropy_chunked: label {l} at token {i} is outside the vocabulary 0..{v}");
        }
        n_tokens += usize::from(l >= 0);
    }
    let bias = match lm_head.bias() {
        None => None,
        Some(b) => Some(Arc::new(const_f32(b, "cross_entropy_chunked")?)),
    };
    let op = CrossEntropyOp {
        w: lm_head.weight().clone(),
        bias,
        labels: Arc::new(labels.to_vec()),
        chunk: chunk.max(1),
        lse: Mutex::new(None),
        #[cfg(feature = "cuda")]
        gpu: lm_head.gpu_cache().clone(),
        #[cfg(feature = "cuda")]
        lse_gpu: Mutex::new(None),
    };
    let loss = hidden.contiguous()?.apply_op1(op)?;
    Ok((loss, n_tokens))
}

struct CrossEntropyOp {
    /// lm_head weight (V, C), quantised or f32, never a graph node.
    w: Arc<StoredTensor>,
    bias: Option<Arc<Vec<f32>>>,
    labels: Arc<Vec<i64>>,
    chunk: usize,
    /// (N) logsumexp of each token's logits, from the forward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
    /// lm_head's device copies (shared with its QLinear).
    #[cfg(feature = "cuda")]
    gpu: Arc<crate::cuda::GpuWeightCache>,
    /// The logsumexps of a forward on the GPU, kept there for the backward.
    #[cfg(feature = "cuda")]
    lse_gpu: Mutex<Option<Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>>,
}

impl CrossEntropyOp {
    /// logits (rows, V) = h (rows, C) · Wᵀ + bias.
    fn logits(&self, h: &[f32], rows: usize, out: &mut [f32]) {
        let w = self.w.matrix();
        qmatmul_fwd(h, rows, &w, out);
        if let Some(b) = &self.bias {
            out.par_chunks_mut(w.rows)
                .for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(x, b)| *x += b));
        }
    }
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "qtune-cross-entropy-chunked"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_of(s, l, self.name())?;
        let (vocab, c) = (self.w.shape[0], self.w.shape[1]);
        let n = self.labels.len();
        let mut lse = vec![0f32; n];
        // logits: (chunk, V), reused
        let mut logits = vec![0f32; self.chunk.min(n) * vocab];
        let mut loss = 0f64;
        for (ci, lse) in lse.chunks_mut(self.chunk).enumerate() {
            let (r0, rows) = (ci * self.chunk, lse.len());
            let lg = &mut logits[..rows * vocab];
            self.logits(&h[r0 * c..(r0 + rows) * c], rows, lg);
            loss += lg
                .par_chunks(vocab)
                .zip(lse.par_iter_mut())
                .zip(self.labels[r0..r0 + rows].par_iter())
                .map(|((row, lse), &label)| {
                    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let sum: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
                    let z = m as f64 + sum.ln();
                    *lse = z as f32;
                    if label < 0 {
                        0.0
                    } else {
                        z - row[label as usize] as f64
                    }
                })
                .sum::<f64>();
        }
        *self.lse.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    /// The same on the GPU (src/cuda/ops.rs `cross_entropy_fwd`); the loss is summed in f64 on the
    /// host from per-row values.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let head = crate::cuda::ops::CeHead {
            cache: &self.gpu,
            w: &self.w,
            bias: self.bias.as_ref().map(|b| b.as_slice()),
            labels: &self.labels,
            chunk: self.chunk,
        };
        let (loss, lse) = crate::cuda::ops::cross_entropy_fwd(&head, (s, l))?;
        *self.lse_gpu.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        let out = s.device.clone_htod(&[loss as f32])?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, s.device.clone()),
            Shape::from(()),
        ))
    }

    /// dh = g·(softmax(logits) - onehot(label))·W per chunk; ignored rows give zero.
    fn bwd(&self, h: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() {
            let Some(lse) = self.lse_gpu.lock().expect("lse lock poisoned").clone() else {
                bail!("cross_entropy_chunked: backward before forward");
            };
            let g: f32 = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
            let op = CrossEntropyBwdCuda {
                gpu: self.gpu.clone(),
                w: self.w.clone(),
                bias: self.bias.clone(),
                labels: self.labels.clone(),
                chunk: self.chunk,
                lse,
                g,
            };
            return Ok(Some(h.contiguous()?.apply_op1_no_bwd(&op)?));
        }
        let Some(lse) = self.lse.lock().expect("lse lock poisoned").clone() else {
            bail!("cross_entropy_chunked: backward before forward");
        };
        let g: f32 = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
        let (vocab, c) = (self.w.shape[0], self.w.shape[1]);
        let n = self.labels.len();
        let dh = with_f32(h, self.name(), |h| {
            let mut dh = vec![0f32; n * c];
            let mut logits = vec![0f32; self.chunk.min(n) * vocab];
            let w = self.w.matrix();
            for (ci, dh) in dh.chunks_mut(self.chunk * c).enumerate() {
                let (r0, rows) = (ci * self.chunk, dh.len() / c);
                let lg = &mut logits[..rows * vocab];
                self.logits(&h[r0 * c..(r0 + rows) * c], rows, lg);
                // lg becomes dlogits in place: (rows, V)
                lg.par_chunks_mut(vocab)
                    .zip(self.labels[r0..r0 + rows].par_iter())
                    .zip(lse[r0..r0 + rows].par_iter())
                    .for_each(|((row, &label), &z)| {
                        if label < 0 {
                            row.fill(0.0);
                            return;
                        }
                        row.iter_mut().for_each(|x| *x = g * (*x - z).exp());
                        row[label as usize] -= g;
                    });
                qmatmul_bwd_input(lg, rows, &w, dh, false);
            }
            dh
        })?;
        Ok(Some(tensor_of(dh, h.dims(), h.dtype())?))
    }
}

/// The cross-entropy's input gradient on the GPU, as an op over `hidden` (see
/// `CrossEntropyOp::bwd`).
#[cfg(feature = "cuda")]
struct CrossEntropyBwdCuda {
    gpu: Arc<crate::cuda::GpuWeightCache>,
    w: Arc<StoredTensor>,
    bias: Option<Arc<Vec<f32>>>,
    labels: Arc<Vec<i64>>,
    chunk: usize,
    lse: Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>,
    g: f32,
}

#[cfg(feature = "cuda")]
impl CustomOp1 for CrossEntropyBwdCuda {
    fn name(&self) -> &'static str {
        "qtune-cross-entropy-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("qtune-cross-entropy-bwd: the CPU backward is CrossEntropyOp::bwd")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let head = crate::cuda::ops::CeHead {
            cache: &self.gpu,
            w: &self.w,
            bias: self.bias.as_ref().map(|b| b.as_slice()),
            labels: &self.labels,
            chunk: self.chunk,
        };
        let dh = crate::cuda::ops::cross_entropy_bwd(&head, &self.lse, self.g, (s, l))?;
        Ok((dh, l.shape().clone()))
    }
}
