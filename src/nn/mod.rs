//! Transformer building blocks as plain functions over candle tensors, written with composite candle
//! ops that all have a backward (the reference implementation; `fused` holds custom-op versions
//! with the same signatures that keep less alive for backward).
//!
//! Shapes: B batch, T sequence, H query heads, KVH key/value heads, D head dim, C channels, V vocab.
use crate::lora::QLinear;
use candle_core::{DType, Module, Result, Tensor, D};

/// RMSNorm as in transformers' `LlamaRMSNorm`: `w * (x / sqrt(mean(x², last dim) + eps))`.
///
/// `x (.., C)` in any float dtype; `w (C,)` f32 (a constant: no gradient is wanted for it).
/// The statistics are computed in f32; the result is `(.., C)` in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    // ms: (.., 1)
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    // transformers casts back to the input dtype before the weight multiply.
    let y = y.to_dtype(dt)?;
    y.broadcast_mul(&w.to_dtype(dt)?)
}

/// Rotary embedding, Hugging Face "rotate half" layout: dims `i` and `i + D/2` of each head form a
/// pair. `x (B, H, T, D)`; `cos`, `sin` `(T, D/2)` in x's dtype (angle `pos * theta^(-2i/D)` for
/// position `pos` = row and pair `i` = column). Returns `(B, H, T, D)`:
/// `out[..i] = x1·cos - x2·sin`, `out[i+D/2] = x2·cos + x1·sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let o1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let o2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// The `(T, D/2)` cos and sin tables of [`rope`] for positions `0..t`, computed in f32 as
/// transformers does (`inv_freq = 1 / theta^(2i/D)`, angle = `pos * inv_freq`), cast to `dtype`.
pub fn rope_tables(t: usize, head_dim: usize, theta: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let ang: Vec<f32> = (0..t)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let dev = candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(cos, (t, half), &dev)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (t, half), &dev)?.to_dtype(dtype)?,
    ))
}

/// The additive attention bias of transformers' 4-D causal mask: `(B, 1, T, T)` f32, 0 where query
/// `i` may see key `j` (`j <= i` and `pad[b, j] != 0`), `f32::MIN` elsewhere. `pad (B, T)`: 1 for
/// real tokens, 0 for padding (any dtype); `None` means no padding.
pub fn attention_bias(pad: Option<&Tensor>, b: usize, t: usize) -> Result<Tensor> {
    let keep: Vec<f32> = match pad {
        Some(m) => m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        None => vec![1.0; b * t],
    };
    if keep.len() != b * t {
        candle_core::bail!("attention mask has {} entries, expected {b} x {t}", keep.len());
    }
    let mut bias = vec![0f32; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                if j > i || keep[bi * t + j] == 0.0 {
                    bias[(bi * t + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, t), &candle_core::Device::Cpu)
}

/// Causal self-attention with grouped KV heads: `q (B, H, T, D)`, `k`, `v (B, KVH, T, D)` with H a
/// multiple of KVH (query head h reads KV head `h / (H/KVH)`), `bias (B, 1, T, T)` f32 from
/// [`attention_bias`] (it carries the causal and padding masks). Scores `q·kᵀ/sqrt(D)` and softmax
/// in f32; returns `(B, H, T, D)` in q's dtype.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    if kvh == 0 || h % kvh != 0 {
        candle_core::bail!("{h} query heads are not a multiple of {kvh} KV heads");
    }
    let rep = |x: &Tensor| -> Result<Tensor> {
        if kvh == h {
            return Ok(x.clone());
        }
        // (B, KVH, T, D) -> (B, KVH, H/KVH, T, D) -> (B, H, T, D)
        x.unsqueeze(2)?
            .broadcast_as((b, kvh, h / kvh, t, d))?
            .contiguous()?
            .reshape((b, h, t, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    // s: (B, H, T, T)
    let s = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let s = (s.to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(bias)?;
    let p = softmax_last(&s)?.to_dtype(v.dtype())?;
    // (B, H, T, D)
    p.matmul(&v.contiguous()?)
}

/// Softmax over the last dim with composite ops (the max is a constant shift, kept out of the graph).
fn softmax_last(s: &Tensor) -> Result<Tensor> {
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// SiLU `x · sigmoid(x)`, any shape and float dtype.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Summed cross-entropy of `lm_head(hidden)` against `labels`, computed `chunk` rows at a time so
/// that the logits of all tokens never exist at once in the forward.
///
/// `hidden (N, C)` (any float dtype; normed final hidden states, already shifted so row n predicts
/// `labels[n]`), `lm_head` maps C -> V, `labels` N class ids where -100 (any negative) is ignored.
/// Returns `(sum over kept rows of -log softmax(logits)[label]` as an f32 scalar tensor, number of
/// kept rows)`; logits and log-sum-exp are f32. With autograd, each chunk's graph still keeps its
/// logits until backward: a caller that needs the memory bound backpropagates chunk by chunk (as
/// `models::llama` does) or uses the fused version.
pub fn cross_entropy_chunked(
    hidden: &Tensor,
    lm_head: &QLinear,
    labels: &[i64],
    chunk: usize,
) -> Result<(Tensor, usize)> {
    let (n, _c) = hidden.dims2()?;
    if labels.len() != n {
        candle_core::bail!("{} labels for {n} hidden rows", labels.len());
    }
    let vocab = lm_head.out_features() as i64;
    let keep: Vec<(u32, u32)> = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= 0)
        .map(|(i, &l)| {
            if l >= vocab {
                candle_core::bail!("label {l} at row {i} is outside the vocabulary of {vocab}");
            }
            Ok((i as u32, l as u32))
        })
        .collect::<Result<_>>()?;
    let mut total = Tensor::zeros((), DType::F32, hidden.device())?;
    for part in keep.chunks(chunk.max(1)) {
        let (rows, lab): (Vec<u32>, Vec<u32>) = part.iter().copied().unzip();
        let m = rows.len();
        let rows = Tensor::from_vec(rows, m, hidden.device())?;
        let lab = Tensor::from_vec(lab, (m, 1), hidden.device())?;
        // h: (m, C) -> logits (m, V) f32
        let h = hidden.index_select(&rows, 0)?;
        let logits = lm_head.forward(&h)?.to_dtype(DType::F32)?;
        total = (total + chunk_nll(&logits, &lab)?)?;
    }
    Ok((total, keep.len()))
}

/// `sum_i logsumexp(logits_i) - logits_i[lab_i]` for `logits (m, V)` f32 and `lab (m, 1)` u32.
fn chunk_nll(logits: &Tensor, lab: &Tensor) -> Result<Tensor> {
    let mx = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&mx)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &mx)?;
    let picked = logits.gather(lab, D::Minus1)?;
    (lse - picked)?.sum_all()
}

/// Row-wise negative log-likelihood for one chunk, exposed for callers that backpropagate chunk by
/// chunk: `hidden (m, C)`, `labels` m ids all in `0..V`; returns the f32 scalar sum.
pub fn nll_sum(hidden: &Tensor, lm_head: &QLinear, labels: &[u32]) -> Result<Tensor> {
    let m = labels.len();
    let lab = Tensor::from_vec(labels.to_vec(), (m, 1), hidden.device())?;
    let logits = lm_head.forward(hidden)?.to_dtype(DType::F32)?;
    chunk_nll(&logits, &lab)
}
