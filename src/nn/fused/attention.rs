//! Causal GQA attention with a key padding mask; probabilities recomputed block by block in backward.
use super::attention_products::{
    bf16_products_bytes, key_stride, products, takes_bf16, BlockProducts, HeadMats, Mat,
};
use super::exp::exp_shift_sum;
use super::*;
use crate::quant::matmul::aligned_slice;

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
    attention_impl(q, k, v, mask, false)
}

/// [`causal_attention_masked`] with the mask given as transformers' additive bias
/// `(B or 1, 1, T, T)` (0 = attend, `f32::MIN` = masked; see `nn::attention_bias`): the same
/// signature as the composite `nn::causal_attention`. Entries at or below `f32::MIN / 2` are
/// skipped; others are added to the scaled scores. The bias is a constant (no gradient).
/// On the GPU (`--features cuda`) this is [`crate::nn::generic::causal_attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    causal_attention_with(q, k, v, bias, false)
}

/// [`causal_attention`] whose block products are bf16 (f32 sums) for f32 activations too when
/// `bf16_products` (a bf16 step's f32 recompute, as its linears take them); bf16 activations take
/// them where the CPU has bf16 kernels either way.
pub fn causal_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    bf16_products: bool,
) -> Result<Tensor> {
    let generic = GENERIC_ATTENTION.load(std::sync::atomic::Ordering::Relaxed);
    if generic || (cfg!(feature = "cuda") && q.device().is_cuda()) {
        return crate::nn::generic::causal_attention(q, k, v, bias);
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
        bf16_products,
    )
}

/// When set (tests), [`causal_attention`] takes the device-generic path on the CPU too, so that a
/// whole training step can be checked with the attention the GPU runs.
pub static GENERIC_ATTENTION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// When set (tests), the fused attention's block products stay f32 in a bf16 step too: for
/// comparing attention implementations on the same math (`tests/generic_step.rs`).
pub static F32_ATTENTION_PRODUCTS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Batch rows (B or 1) of an additive attention bias `(B or 1, 1, T, T)`, checked.
pub(crate) fn bias_rows(bias: &Tensor, b: usize, t: usize) -> Result<usize> {
    match bias.dims() {
        [bb, 1, t1, t2] if (*bb == b || *bb == 1) && *t1 == t && *t2 == t => Ok(*bb),
        d => bail!("causal_attention: bias of shape {d:?}, expected [{b}, 1, {t}, {t}]"),
    }
}

/// `(B, Hq, Hkv, T, D)` of attention operands `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)`, checked
/// to fit together (Hq a multiple of Hkv).
pub(crate) fn attention_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnDims> {
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

/// Bytes one attention task holds at once beside its inputs and outputs (one a thread), for `t`
/// rows of head size `d`: the probability and score-gradient blocks at their widest, and with
/// bf16 products (`bf16`, where this CPU has the kernels) the packs those read.
pub(crate) fn attention_task_bytes(t: usize, d: usize, bf16: bool) -> usize {
    let bf16 = takes_bf16(d, bf16);
    let blocks = 2 * (BQ * key_stride(t, bf16) + 16) * 4 + BQ * 4;
    blocks
        + if bf16 {
            bf16_products_bytes(t, d, BQ)
        } else {
            0
        }
}

fn attention_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttnMask,
    bf16_products: bool,
) -> Result<Tensor> {
    check_cpu("causal_attention", &[q, k, v])?;
    let AttnDims { b, hq, hkv, t, d } = attention_dims(q, k, v)?;
    let op = AttentionOp {
        dims: AttnDims { b, hq, hkv, t, d },
        mask,
        lse: Mutex::new(None),
        bf16_products,
    };
    tape::apply3(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) b: usize,
    pub(crate) hq: usize,
    pub(crate) hkv: usize,
    pub(crate) t: usize,
    pub(crate) d: usize,
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
    /// The bias rows, and whether they are per batch row.
    Bias(&'a [f32], bool),
}

impl MaskView<'_> {
    /// The bias row of query row i of batch b (`Bias` views only).
    fn bias_row(v: &[f32], batched: bool, b: usize, i: usize, t: usize) -> &[f32] {
        &v[((if batched { b } else { 0 }) * t + i) * t..][..t]
    }

    /// 1 + the last key query row i of batch b sees, or 0 when it sees none (O(T): [`Ends`] keeps
    /// them for a whole pass).
    fn end(&self, b: usize, i: usize, t: usize) -> usize {
        match self {
            MaskView::Causal(None) => i + 1,
            MaskView::Causal(Some(m)) => (0..=i).rev().find(|&j| m[b * t + j]).map_or(0, |j| j + 1),
            MaskView::Bias(v, batched) => {
                let row = Self::bias_row(v, *batched, b, i, t);
                row.iter().rposition(|&x| x > MASKED).map_or(0, |j| j + 1)
            }
        }
    }

    /// Scales the scores `s` (keys `0..s.len()`) of query row i of batch b by `scale` and masks
    /// them: invisible keys to -inf, the bias added to visible ones. Branch-free, so it vectorises.
    fn apply(&self, b: usize, i: usize, t: usize, scale: f32, s: &mut [f32]) {
        match self {
            MaskView::Causal(m) => {
                for (j, x) in s.iter_mut().enumerate() {
                    let on = j <= i && m.is_none_or(|m| m[b * t + j]);
                    *x = if on { *x * scale } else { f32::NEG_INFINITY };
                }
            }
            MaskView::Bias(v, batched) => {
                let row = &Self::bias_row(v, *batched, b, i, t)[..s.len()];
                for (x, &a) in s.iter_mut().zip(row) {
                    *x = if a > MASKED {
                        *x * scale + a
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }
        }
    }
}

/// Every query row's [`MaskView::end`] for one pass, computed once rather than per head.
struct Ends {
    /// (mask batch rows × T), each 1 + the last visible key or 0.
    ends: Vec<usize>,
    /// Whether `ends` has a row per batch row (else one row serves all).
    batched: bool,
    t: usize,
}

impl Ends {
    fn new(mask: &MaskView, b: usize, t: usize) -> Ends {
        let batched = !matches!(mask, MaskView::Causal(None) | MaskView::Bias(_, false));
        let rows = if batched { b } else { 1 };
        let t1 = t.max(1);
        let ends = (0..rows * t).map(|r| mask.end(r / t1, r % t1, t)).collect();
        Ends { ends, batched, t }
    }

    fn get(&self, b: usize, i: usize) -> usize {
        self.ends[(if self.batched { b } else { 0 }) * self.t + i]
    }
}

struct AttentionOp {
    dims: AttnDims,
    mask: AttnMask,
    /// (B, Hq, T) logsumexp of each row's scaled scores, written by the forward for the backward.
    /// Each call makes its own op, so this belongs to one graph node.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
    /// bf16 block products for f32 activations too (see [`causal_attention_with`]).
    bf16_products: bool,
}

/// What [`AttentionOp::probs`] reads for one head's query blocks besides the products.
struct Block<'a> {
    mask: &'a MaskView<'a>,
    ends: &'a Ends,
    /// Batch row.
    bi: usize,
    /// The SIMD exp of a bf16 step (else libm's; see `exp::exp_shift_sum`).
    simd_exp: bool,
}

impl<'a> Block<'a> {
    fn new(mask: &'a MaskView<'a>, ends: &'a Ends, bi: usize, simd_exp: bool) -> Self {
        Block {
            mask,
            ends,
            bi,
            simd_exp,
        }
    }
}

impl AttentionOp {
    /// Probabilities of query rows `i0..i0+rows` against keys `0..kend` into `p` (rows × ks, the
    /// products' stride; columns past kend 0). With `lse_in` None (forward) it normalises and writes
    /// each row's logsumexp into `lse_out`; with Some (backward) it uses those. Returns
    /// `(kend, ks)`: kend is 1 + the last key any of these rows sees (T if a row sees none).
    fn probs(
        &self,
        blk: &Block,
        (i0, rows): (usize, usize),
        prods: &mut dyn BlockProducts<'_>,
        p: &mut [f32],
        lse_in: Option<&[f32]>,
        lse_out: &mut [f32],
    ) -> (usize, usize) {
        let AttnDims { t, d, .. } = self.dims;
        let Block {
            mask,
            ends,
            bi,
            simd_exp,
        } = *blk;
        let scale = 1.0 / (d as f32).sqrt();
        // key extent of the block first, so that S is only as wide as needed
        let kend = (i0..i0 + rows)
            .map(|i| match ends.get(bi, i) {
                0 => t,
                e => e,
            })
            .max()
            .unwrap_or(0);
        let ks = prods.stride(kend);
        let p = &mut p[..rows * ks];
        // s (rows × ks) = q[i0..] · k[..kend]ᵀ, scaled below
        prods.scores(Mat::Q, Mat::K, (i0, rows, kend), p);
        for r in 0..rows {
            let s = &mut p[r * ks..r * ks + kend];
            if ends.get(bi, i0 + r) == 0 {
                // no visible key: transformers' finfo.min bias makes every score equal
                s.fill(1.0 / t as f32);
                lse_out[r] = (t as f32).ln();
                continue;
            }
            mask.apply(bi, i0 + r, t, scale, s);
            match lse_in {
                Some(lse) => {
                    exp_shift_sum(s, lse[r], simd_exp);
                }
                None => {
                    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let l = exp_shift_sum(s, m, simd_exp);
                    s.iter_mut().for_each(|x| *x /= l);
                    lse_out[r] = m + l.ln();
                }
            }
        }
        (kend, ks)
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
    ) -> CpuOut {
        let AttnDims { b, hq, hkv, t, d } = self.dims;
        let (q, k, v) = (
            f32_of(qs, ql, self.name())?,
            f32_of(ks, kl, self.name())?,
            f32_of(vs, vl, self.name())?,
        );
        let bf16 = self.bf16_products || qs.dtype() == DType::BF16;
        let rep = hq / hkv;
        // o: (B, Hq, T, D); lse: (B, Hq, T); one task per (b, query head)
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; q.len() / d.max(1)];
        let (o_ref, lse_ref) = (&mut o, &mut lse);
        self.mask.with_view(|mask| {
            if t * d == 0 {
                return;
            }
            let ends = Ends::new(mask, b, t);
            o_ref
                .par_chunks_mut(t * d)
                .zip(lse_ref.par_chunks_mut(t))
                .enumerate()
                .for_each(|(bh, (o, lse))| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let kv0 = (bi * hkv + h / rep) * t * d;
                    let mats = HeadMats {
                        q: &q[bh * t * d..(bh + 1) * t * d],
                        k: &k[kv0..kv0 + t * d],
                        v: &v[kv0..kv0 + t * d],
                        d_o: &[],
                        t,
                        d,
                    };
                    let mut prods = products(mats, bf16);
                    let blk = Block::new(mask, &ends, bi, bf16);
                    let mut p_buf = Vec::new();
                    let p = aligned_slice(&mut p_buf, BQ * prods.stride(t));
                    for i0 in (0..t).step_by(BQ) {
                        let rows = BQ.min(t - i0);
                        let lse = &mut lse[i0..i0 + rows];
                        let (kend, _) = self.probs(&blk, (i0, rows), &mut *prods, p, None, lse);
                        // o[i0..] (rows × D) = p (rows × kend) · v[..kend]
                        let o = &mut o[i0 * d..(i0 + rows) * d];
                        prods.mix(p, Mat::V, (rows, kend), o);
                    }
                });
        })?;
        *self.lse.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        Ok((storage_of(o, qs.dtype()), ql.shape().clone()))
    }

    /// Flash-attention backward per query block: p = exp(s - lse), dp = dO·vᵀ,
    /// ds = p·(dp - rowsum(dO·O))·scale, dq = ds·k, dk += dsᵀ·q, dv += pᵀ·dO
    /// (GQA: kv grads summed over the query heads of the group).
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, d_o: &Tensor) -> Grads3 {
        let AttnDims { b, hq, hkv, t, d } = self.dims;
        let Some(lse) = self.lse.lock().expect("lse lock poisoned").clone() else {
            bail!("causal_attention: backward before forward");
        };
        let rep = hq / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        let name = self.name();
        let (q_dims, dtypes) = (q.dims().to_vec(), [q.dtype(), k.dtype(), v.dtype()]);
        let bf16 = self.bf16_products || q.dtype() == DType::BF16;
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
            let ends = Ends::new(mask, b, t);
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
                    let (mut p_buf, mut dp_buf) = (Vec::new(), Vec::new());
                    let mut unused = vec![0f32; BQ];
                    let blk = Block::new(mask, &ends, bi, bf16);
                    // one set of products (and key-side packs) for the group's query heads
                    let (q0, d_o0) = (&q[..0], &d_o[..0]);
                    let mut prods = products(
                        HeadMats {
                            q: q0,
                            k,
                            v,
                            d_o: d_o0,
                            t,
                            d,
                        },
                        bf16,
                    );
                    let p = aligned_slice(&mut p_buf, BQ * prods.stride(t));
                    let dp = aligned_slice(&mut dp_buf, BQ * prods.stride(t));
                    for r in 0..rep {
                        let bh = bg * rep + r; // = bi·Hq + h
                        let slab = bh * t * d..(bh + 1) * t * d;
                        let (q, o, d_o) = (&q[slab.clone()], &o[slab.clone()], &d_o[slab]);
                        prods.set_query(q, d_o);
                        let dq = &mut dq[r * t * d..(r + 1) * t * d];
                        for i0 in (0..t).step_by(BQ) {
                            let rows = BQ.min(t - i0);
                            let lse = &lse[bh * t + i0..][..rows];
                            let rb = (i0, rows);
                            let (kend, ks) =
                                self.probs(&blk, rb, &mut *prods, p, Some(lse), &mut unused);
                            let (p, dp) = (&p[..rows * ks], &mut dp[..rows * ks]);
                            let kb = (i0, rows, kend);
                            // dv[..kend] += pᵀ (kend × rows) · dO (rows × D)
                            prods.mix_t(p, Mat::DO, kb, dv);
                            // dp (rows × ks) = dO · v[..kend]ᵀ
                            prods.scores(Mat::DO, Mat::V, kb, dp);
                            // ds = p·(dp - dO·O)·scale, in place of dp
                            let (ob, dob) = (&o[i0 * d..(i0 + rows) * d], &d_o[i0 * d..]);
                            for r in 0..rows {
                                let dd = dot(&dob[r * d..(r + 1) * d], &ob[r * d..(r + 1) * d]);
                                let (pr, dpr) =
                                    (&p[r * ks..r * ks + kend], &mut dp[r * ks..r * ks + kend]);
                                for (x, &pv) in dpr.iter_mut().zip(pr) {
                                    *x = pv * (*x - dd) * scale;
                                }
                            }
                            // dq[i0..] (rows × D) = ds · k[..kend]
                            prods.mix(dp, Mat::K, (rows, kend), &mut dq[i0 * d..(i0 + rows) * d]);
                            // dk[..kend] += dsᵀ (kend × rows) · q (rows × D)
                            prods.mix_t(dp, Mat::Q, kb, dk);
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
