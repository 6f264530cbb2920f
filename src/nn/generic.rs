//! Causal GQA attention made of candle tensor ops only, so it runs on any device: the CUDA path's
//! attention (we have no fused attention kernel of our own yet). Checked on the CPU against the
//! fused CPU kernel and transformers' fixtures (tests/fused_ops.rs), so what the GPU runs is the
//! same math candle's CUDA backend already tests op by op.
//!
//! Memory is what the fused kernel promises, a flash-attention-style contract at head granularity:
//! the graph node keeps q, k, v, the output and two f32 statistics per row; the (T × T) scores exist
//! only for a few query heads at a time ([`SCORE_BUDGET`]), in forward and again in backward.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use std::sync::Mutex;

#[cfg(feature = "cuda")]
use super::CudaOut;
use super::{CpuOut, Grads3};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// f32 elements of one (heads × T × T) score block: 8 Mi elements = 32 MiB, which keeps the four
/// live blocks of the backward near 128 MiB at any T (T = 2048: 2 query heads per block).
const SCORE_BUDGET: usize = 8 << 20;

/// Query heads per score block for batch `b` and length `t` (at least one).
fn heads_per_block(b: usize, t: usize, hq: usize) -> usize {
    (SCORE_BUDGET / (b * t * t).max(1)).clamp(1, hq.max(1))
}

/// f32 elements of one score block for batch `b`, length `t` and `hq` query heads (the memory
/// plan's unit for this op).
pub fn score_block_elems(b: usize, t: usize, hq: usize) -> usize {
    heads_per_block(b, t, hq) * b * t * t
}

/// `softmax(q·kᵀ/sqrt(D) + bias) · v` for `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)` (query head h
/// reads kv head `h / (Hq/Hkv)`) and transformers' additive `bias (B or 1, 1, T, T)` (0 = attend,
/// `f32::MIN` = masked; a row with every key masked averages v, as transformers gives). Same
/// signature and result as `fused::causal_attention`; differentiable in q, k and v.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, hq, t, _) = q.dims4()?;
    attention_blocked(q, k, v, bias, heads_per_block(b, t, hq))
}

/// [`causal_attention`] with `per` query heads per score block.
fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    per: usize,
) -> Result<Tensor> {
    let super::fused::AttnDims { b, hq, hkv, t, d } = super::fused::attention_dims(q, k, v)?;
    super::fused::bias_rows(bias, b, t)?;
    let bias = bias.detach().to_dtype(DType::F32)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let blocks = Blocks::new(hq, hkv, per.max(1), q.device())?;
    // forward outside the graph: o (B, Hq, T, D), row max and row sum (B, Hq, T, 1), block by block
    let (mut os, mut maxs, mut sums) = (Vec::new(), Vec::new(), Vec::new());
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    for (h0, n, kv_idx) in &blocks.list {
        let (qb, kb, vb) = blocks.operands(&qd, &kd, &vd, *h0, *n, kv_idx)?;
        let s = scores(&qb, &kb, &bias, d)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        os.push(e.broadcast_div(&sum)?.matmul(&vb)?.to_dtype(q.dtype())?);
        maxs.push(max);
        sums.push(sum);
    }
    let o = Tensor::cat(&os, 1)?;
    drop(os);
    let op = AttentionOp {
        o: Mutex::new(Some(o)),
        max: Tensor::cat(&maxs, 1)?,
        sum: Tensor::cat(&sums, 1)?,
        bias,
        blocks,
        d,
    };
    super::fused::tape::apply3(&q, &k, &v, op)
}

/// The query heads of each score block with the kv head each one reads.
struct Blocks {
    hkv: usize,
    /// (first query head, heads, kv head of each as a u32 index tensor on the device)
    list: Vec<(usize, usize, Tensor)>,
}

impl Blocks {
    fn new(hq: usize, hkv: usize, per: usize, dev: &candle_core::Device) -> Result<Self> {
        let rep = hq / hkv;
        let mut list = Vec::new();
        for h0 in (0..hq).step_by(per) {
            let n = per.min(hq - h0);
            let idx: Vec<u32> = (h0..h0 + n).map(|h| (h / rep) as u32).collect();
            list.push((h0, n, Tensor::from_vec(idx, n, dev)?));
        }
        Ok(Blocks { hkv, list })
    }

    /// `q[:, h0..h0+n]` and the kv heads those query heads read, each `(B, n, T, D)` f32.
    fn operands(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        h0: usize,
        n: usize,
        kv_idx: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let f = |x: Tensor| x.to_dtype(DType::F32)?.contiguous();
        Ok((
            f(q.narrow(1, h0, n)?)?,
            f(k.index_select(kv_idx, 1)?)?,
            f(v.index_select(kv_idx, 1)?)?,
        ))
    }
}

/// Scaled, biased scores `(B, n, T, T)` f32 of one block. A masked key's bias is `f32::MIN`, which
/// absorbs any score (no -inf, so an all-masked row stays uniform as in transformers).
fn scores(qb: &Tensor, kb: &Tensor, bias: &Tensor, d: usize) -> Result<Tensor> {
    (qb.matmul(&kb.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(bias)
}

struct AttentionOp {
    /// The forward's result, handed to candle once as the op's output.
    o: Mutex<Option<Tensor>>,
    /// (B, Hq, T, 1) f32 max and Σexp(s - max) of each scaled, biased score row. Kept apart, not as
    /// one logsumexp: in a row with every key masked, max = f32::MIN absorbs log(sum), and
    /// exp(s - lse) would give 1 instead of the forward's 1/T.
    max: Tensor,
    sum: Tensor,
    /// (B or 1, 1, T, T) f32.
    bias: Tensor,
    blocks: Blocks,
    d: usize,
}

impl AttentionOp {
    fn take_output(&self) -> Result<Tensor> {
        match self
            .o
            .lock()
            .expect("attention output lock poisoned")
            .take()
        {
            Some(o) => Ok(o),
            None => bail!("causal_attention: the op was applied twice"),
        }
    }

    /// The output's storage on the device `on` picks out (`None`: another device).
    fn output_storage<S: BackendStorage>(
        &self,
        on: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let o = self.take_output()?;
        let (storage, layout) = o.storage_and_layout();
        let Some(s) = on(&storage) else {
            bail!("causal_attention: output computed on another device than its inputs");
        };
        Ok((s.try_clone(layout)?, o.shape().clone()))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "qtune-causal-attention-generic"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CpuOut {
        self.output_storage(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> CudaOut {
        self.output_storage(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    /// Per score block: p = exp(s - max)/sum, dv = pᵀ·dO, dp = dO·vᵀ, ds = p∘(dp - rowsum(dO∘O))/√D,
    /// dq = ds·k, dk = dsᵀ·q; the kv gradients of a GQA group are summed with `index_add`.
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, d_o: &Tensor) -> Grads3 {
        let (b, _, t, d) = q.dims4()?;
        let scale = 1.0 / (self.d as f64).sqrt();
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let d_o = d_o.detach().to_dtype(DType::F32)?;
        // rowsum(dO ∘ O): (B, Hq, T, 1)
        let delta = (&d_o * o.detach().to_dtype(DType::F32)?)?.sum_keepdim(D::Minus1)?;
        let shape_kv = (b, self.blocks.hkv, t, d);
        let mut dk = Tensor::zeros(shape_kv, DType::F32, q.device())?;
        let mut dv = Tensor::zeros(shape_kv, DType::F32, q.device())?;
        let mut dqs = Vec::with_capacity(self.blocks.list.len());
        for (h0, n, kv_idx) in &self.blocks.list {
            let (h0, n) = (*h0, *n);
            let (qb, kb, vb) = self.blocks.operands(&q, &k, &v, h0, n, kv_idx)?;
            let dob = d_o.narrow(1, h0, n)?.contiguous()?;
            let p = scores(&qb, &kb, &self.bias, self.d)?
                .broadcast_sub(&self.max.narrow(1, h0, n)?)?
                .exp()?
                .broadcast_div(&self.sum.narrow(1, h0, n)?)?;
            let dvb = p.t()?.matmul(&dob)?;
            let dp = dob.matmul(&vb.t()?)?;
            let ds = ((p * dp.broadcast_sub(&delta.narrow(1, h0, n)?)?)? * scale)?;
            dqs.push(ds.matmul(&kb)?.to_dtype(q.dtype())?);
            let dkb = ds.t()?.matmul(&qb)?;
            dk = dk.index_add(kv_idx, &dkb, 1)?;
            dv = dv.index_add(kv_idx, &dvb, 1)?;
        }
        Ok((
            Some(Tensor::cat(&dqs, 1)?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused;
    use candle_core::{Device, Var};

    fn rand(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut z = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = (a - b).unwrap().abs().unwrap().max(0).unwrap();
        d.to_scalar::<f32>().unwrap() / scale
    }

    /// Outputs and q/k/v gradients of `f` for a fixed upstream gradient.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
    ) -> [Tensor; 4] {
        let (q, k, v) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
        let g = (o.to_dtype(DType::F32).unwrap() * d_o)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |x: &Var| g.get(x.as_tensor()).unwrap().clone();
        [o, grad(&q), grad(&k), grad(&v)]
    }

    /// Every block split (1 head, 3 heads across a GQA group boundary, all heads) gives the fused
    /// CPU kernel's output and gradients, with right padding and a fully masked (left-padded) row.
    #[test]
    fn blocks_match_the_fused_kernel() {
        blocks_match_for(2, 6, 2, 9, 8);
    }

    /// Falcon-7B's layout in small: multi-query (one kv head for all).
    #[test]
    fn multi_query_blocks_match_the_fused_kernel() {
        blocks_match_for(2, 3, 1, 9, 64);
    }

    fn blocks_match_for(b: usize, hq: usize, hkv: usize, t: usize, d: usize) {
        let q = rand((b, hq, t, d), 1);
        let k = rand((b, hkv, t, d), 2);
        let v = rand((b, hkv, t, d), 3);
        let d_o = rand((b, hq, t, d), 4);
        // batch 0: last two tokens padding; batch 1: first token padding (row 0 sees no key)
        let mask = Tensor::from_vec(
            vec![
                1f32, 1., 1., 1., 1., 1., 1., 0., 0., 0., 1., 1., 1., 1., 1., 1., 1., 1.,
            ],
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let bias = crate::nn::attention_bias(Some(&mask), b, t).unwrap();
        let want = run(
            |q, k, v| fused::causal_attention(q, k, v, &bias),
            &q,
            &k,
            &v,
            &d_o,
        );
        for per in [1, 2, 3, hq] {
            let got = run(
                |q, k, v| attention_blocked(q, k, v, &bias, per),
                &q,
                &k,
                &v,
                &d_o,
            );
            for (i, name) in ["o", "dq", "dk", "dv"].iter().enumerate() {
                let e = max_rel(&got[i], &want[i]);
                assert!(e < 1e-5, "{per} heads per block: {name} off by {e:e}");
            }
        }
        // bf16 activations: same op, compared with the f32 result at bf16 precision
        let h = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let got = run(
            |q, k, v| attention_blocked(q, k, v, &bias, 2),
            &h(&q),
            &h(&k),
            &h(&v),
            &d_o,
        );
        for (i, name) in ["o", "dq", "dk", "dv"].iter().enumerate() {
            assert_eq!(got[i].dtype(), DType::BF16);
            let e = max_rel(&got[i], &want[i]);
            assert!(e < 1e-2, "bf16: {name} off by {e:e}");
        }
    }

    #[test]
    fn shape_errors_are_named() {
        let q = rand((1, 3, 4, 8), 1);
        let k = rand((1, 2, 4, 8), 2);
        let bias = crate::nn::attention_bias(None, 1, 4).unwrap();
        let e = causal_attention(&q, &k, &k, &bias).unwrap_err().to_string();
        assert!(e.contains("multiple of Hkv"), "{e}");
        let bad = crate::nn::attention_bias(None, 1, 3).unwrap();
        let e = causal_attention(&q, &q, &q, &bad).unwrap_err().to_string();
        assert!(e.contains("bias of shape"), "{e}");
    }
}
