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
//! tensor op), works on the CPU only so far, and is differentiable in its activation arguments.
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
        s => bail!("{op}: unsupported dtype {:?}; use f32, bf16 or f16", s.dtype()),
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

/// A small constant tensor (weights, tables, masks) as an owned f32 vector.
fn const_f32(t: &Tensor, op: &str) -> Result<Vec<f32>> {
    if !matches!(t.device(), Device::Cpu) {
        bail!("{op}: only the CPU kernels exist so far; move the tensors to the CPU");
    }
    t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()
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

/// y += alpha·x.
#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. RMSNorm with a frozen weight.

/// `y (.., C) = x / sqrt(mean(x²) + eps) · w` over the last dim, as transformers' LlamaRMSNorm
/// computes it in f32; `w (C)` is frozen (no gradient, not a graph node). The graph keeps x only.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    check_cpu("rms_norm", &[x, w])?;
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
    /// 1 / sqrt(mean(x²) + eps) of one row, accumulated in f64, rounded to f32 as torch's rsqrt.
    fn rstd(&self, row: &[f32]) -> f32 {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
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
        // x, y: (rows, C)
        let mut y = vec![0f32; x.len()];
        if c > 0 {
            y.par_chunks_mut(c)
                .zip(x.par_chunks(c))
                .for_each(|(y, x)| {
                    let r = self.rstd(x);
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(self.w.iter()) {
                        // transformers rounds x·rstd to f32 before the weight multiply
                        *y = w * (x * r);
                    }
                });
        }
        Ok((storage_of(y, s.dtype()), l.shape().clone()))
    }

    /// With g = dy·w and r = rstd: dx = r·g - x·r³·mean(g·x). No gradient for w.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let c = self.w.len();
        let dx = with_f32(x, self.name(), |x| {
            with_f32(dy, self.name(), |dy| {
                let mut dx = vec![0f32; x.len()];
                if c > 0 {
                    dx.par_chunks_mut(c)
                        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
                        .for_each(|(dx, (x, dy))| {
                            let r = self.rstd(x);
                            let gx: f64 = dy
                                .iter()
                                .zip(self.w.iter())
                                .zip(x)
                                .map(|((&d, &w), &x)| (d * w) as f64 * x as f64)
                                .sum();
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

// ---------------------------------------------------------------------------------------------
// 2. Rotary position embeddings.

/// `(cos, sin)`, each `(T, D/2)` f32, for positions `0..T`, head dim `D` and base `theta`, as
/// transformers' LlamaRotaryEmbedding computes them (inv_freq and p·inv_freq rounded to f32;
/// its `(T, D)` tables are these halves repeated twice).
pub fn rope_tables(t: usize, d: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    if d == 0 || d % 2 != 0 {
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
        Tensor::from_vec(cos, (t, half), &Device::Cpu)?,
        Tensor::from_vec(sin, (t, half), &Device::Cpu)?,
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
    check_cpu("rope", &[x, cos, sin])?;
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

    /// The rotation is orthogonal: dx = R(-theta)·dy. Nothing is needed from the forward.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let mut inv = self.clone();
        inv.inverse = !self.inverse;
        Ok(Some(dy.contiguous()?.apply_op1(inv)?))
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Causal attention with GQA and a key padding mask.

/// `softmax(q·kᵀ/sqrt(D) + causal + padding) · v` for `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)`
/// (query head h reads kv head `h / (Hq/Hkv)`), `key_mask (B, T)` 1 = attend, 0 = padding;
/// returns `(B, Hq, T, D)`. The graph keeps q, k, v, the output and a per-row logsumexp (B·Hq·T);
/// probabilities are recomputed in backward, so no (T×T) matrix outlives the call. A query row
/// that sees no key at all (left padding) averages v over all T keys, as transformers' additive
/// `finfo.min` mask gives on CPU, and its backward is that uniform softmax's, as torch's autograd.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_cpu("causal_attention", &[q, k, v])?;
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
    let mask = match key_mask {
        None => None,
        Some(m) => {
            check_cpu("causal_attention", &[m])?;
            if m.dims() != [b, t] {
                bail!(
                    "causal_attention: key_mask of shape {:?}, expected [{b}, {t}]",
                    m.dims()
                );
            }
            let m = const_f32(m, "causal_attention")?;
            Some(Arc::new(m.iter().map(|&v| v != 0.0).collect::<Vec<_>>()))
        }
    };
    let op = AttentionOp {
        dims: AttnDims {
            b,
            hq,
            hkv,
            t,
            d,
        },
        mask,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
}

struct AttentionOp {
    dims: AttnDims,
    /// (B, T): key j of batch b may be attended.
    mask: Option<Arc<Vec<bool>>>,
    /// (B, Hq, T) logsumexp of each row's scaled scores, written by the forward for the backward.
    /// Each call of [`causal_attention`] makes its own op, so this is per graph node.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

impl AttentionOp {
    /// Keys row i of batch b attends: (j in 0..=i with mask), or None when there is none.
    fn keys(&self, b: usize, i: usize, out: &mut Vec<usize>) -> bool {
        out.clear();
        match &self.mask {
            None => out.extend(0..=i),
            Some(m) => out.extend((0..=i).filter(|&j| m[b * self.dims.t + j])),
        }
        !out.is_empty()
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
        let AttnDims {
            b: _,
            hq,
            hkv,
            t,
            d,
        } = self.dims;
        let (q, k, v) = (
            f32_of(qs, ql, self.name())?,
            f32_of(ks, kl, self.name())?,
            f32_of(vs, vl, self.name())?,
        );
        let rep = hq / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        // o: (B, Hq, T, D); lse: (B, Hq, T); one task per (b, query head)
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; q.len() / d.max(1)];
        if t * d > 0 {
            o.par_chunks_mut(t * d)
                .zip(lse.par_chunks_mut(t))
                .enumerate()
                .for_each(|(bh, (o, lse))| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let q = &q[bh * t * d..(bh + 1) * t * d];
                    let kv0 = (bi * hkv + h / rep) * t * d;
                    let (k, v) = (&k[kv0..kv0 + t * d], &v[kv0..kv0 + t * d]);
                    let mut keys = Vec::with_capacity(t);
                    let mut s = vec![0f32; t];
                    for i in 0..t {
                        let (qi, oi) = (&q[i * d..(i + 1) * d], &mut o[i * d..(i + 1) * d]);
                        if !self.keys(bi, i, &mut keys) {
                            // no visible key: uniform over all T keys
                            for j in 0..t {
                                axpy(1.0 / t as f32, &v[j * d..(j + 1) * d], oi);
                            }
                            lse[i] = (t as f32).ln();
                            continue;
                        }
                        let mut m = f32::NEG_INFINITY;
                        for (n, &j) in keys.iter().enumerate() {
                            s[n] = dot(qi, &k[j * d..(j + 1) * d]) * scale;
                            m = m.max(s[n]);
                        }
                        let mut l = 0f32;
                        for (n, &j) in keys.iter().enumerate() {
                            let p = (s[n] - m).exp();
                            l += p;
                            axpy(p, &v[j * d..(j + 1) * d], oi);
                        }
                        oi.iter_mut().for_each(|x| *x /= l);
                        lse[i] = m + l.ln();
                    }
                });
        }
        *self.lse.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        Ok((storage_of(o, qs.dtype()), ql.shape().clone()))
    }

    /// Flash-attention backward: p = exp(s - lse), dp = dO·v, ds = p·(dp - dO·O),
    /// dq = scale·ds·k, dk = scale·dsᵀ·q, dv = pᵀ·dO (GQA: kv grads summed over the group).
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
        let mut dq = vec![0f32; b * hq * t * d];
        let mut dk = vec![0f32; b * hkv * t * d];
        let mut dv = vec![0f32; b * hkv * t * d];
        with_f32(q, name, |q| {
            with_f32(k, name, |k| {
                with_f32(v, name, |v| {
                    with_f32(o, name, |o| {
                        with_f32(d_o, name, |d_o| {
                            if t * d == 0 {
                                return;
                            }
                            // one task per (b, kv head): it owns that head's dk, dv and the dq of
                            // its `rep` query heads, so no two tasks write the same memory
                            dq.par_chunks_mut(rep * t * d)
                                .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
                                .enumerate()
                                .for_each(|(bg, (dq, (dk, dv)))| {
                                    let bi = bg / hkv;
                                    let (k, v) =
                                        (&k[bg * t * d..(bg + 1) * t * d], &v[bg * t * d..][..t * d]);
                                    let mut keys = Vec::with_capacity(t);
                                    for r in 0..rep {
                                        let bh = bg * rep + r; // = bi·Hq + h
                                        let base = bh * t * d;
                                        let dq = &mut dq[r * t * d..(r + 1) * t * d];
                                        for i in 0..t {
                                            let row = base + i * d;
                                            let (qi, oi, doi) =
                                                (&q[row..row + d], &o[row..row + d], &d_o[row..row + d]);
                                            let dd = dot(doi, oi);
                                            let uniform = !self.keys(bi, i, &mut keys);
                                            if uniform {
                                                keys.clear();
                                                keys.extend(0..t);
                                            }
                                            let dqi = &mut dq[i * d..(i + 1) * d];
                                            for &j in &keys {
                                                let (kj, vj) = (&k[j * d..(j + 1) * d], &v[j * d..(j + 1) * d]);
                                                let p = if uniform {
                                                    1.0 / t as f32
                                                } else {
                                                    (dot(qi, kj) * scale - lse[bh * t + i]).exp()
                                                };
                                                let ds = p * (dot(doi, vj) - dd) * scale;
                                                axpy(ds, kj, dqi);
                                                axpy(ds, qi, &mut dk[j * d..(j + 1) * d]);
                                                axpy(p, doi, &mut dv[j * d..(j + 1) * d]);
                                            }
                                        }
                                    }
                                });
                        })
                    })
                })
            })
        })?????;
        let kd = [b, hkv, t, d];
        Ok((
            Some(tensor_of(dq, q.dims(), q.dtype())?),
            Some(tensor_of(dk, &kd, k.dtype())?),
            Some(tensor_of(dv, &kd, v.dtype())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Cross-entropy through the frozen lm_head, chunk by chunk.

/// `(Σ over tokens with label != -100 of -log softmax(hidden·Wᵀ + bias)[label], that token count)`
/// for `hidden (N, C)` and `labels (N)` (i64/u32 tensor), through the frozen `lm_head` (V, C).
/// Logits exist `chunk` rows at a time only: the forward keeps a logsumexp per token, the
/// backward recomputes each chunk's logits, forms `softmax - onehot` and maps it back through
/// lm_head's input-gradient kernel. The loss is an f32 scalar whatever hidden's dtype;
/// differentiable in hidden only.
pub fn cross_entropy_chunked(
    hidden: &Tensor,
    lm_head: &QLinear,
    labels: &Tensor,
    chunk: usize,
) -> Result<(Tensor, usize)> {
    check_cpu("cross_entropy_chunked", &[hidden, labels])?;
    let (n, c) = hidden.dims2()?;
    let v = lm_head.out_features();
    if c != lm_head.in_features() || labels.dims() != [n] {
        bail!(
            "cross_entropy_chunked: hidden {:?} (N, C) and labels {:?} (N) do not fit lm_head \
             ({v} x {})",
            hidden.dims(),
            labels.dims(),
            lm_head.in_features()
        );
    }
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
    let mut n_tokens = 0;
    for (i, &l) in labels.iter().enumerate() {
        if l == -100 {
            continue;
        }
        if l < 0 || l as usize >= v {
            bail!("cross_entropy_chunked: label {l} at token {i} is outside the vocabulary 0..{v} (use -100 to ignore a token)");
        }
        n_tokens += 1;
    }
    let bias = match lm_head.bias() {
        None => None,
        Some(b) => Some(Arc::new(const_f32(b, "cross_entropy_chunked")?)),
    };
    let op = CrossEntropyOp {
        w: lm_head.weight().clone(),
        bias,
        labels: Arc::new(labels),
        chunk: chunk.max(1),
        lse: Mutex::new(None),
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
                    if label == -100 {
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

    /// dh = g·(softmax(logits) - onehot(label))·W per chunk; rows with label -100 give zero.
    fn bwd(&self, h: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
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
                        if label == -100 {
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
