//! Transformer building blocks as plain functions over candle tensors, written with composite candle
//! ops that all have a backward (the reference implementation; `fused` holds custom-op versions
//! with the same signatures that keep less alive for backward).
//!
//! Shapes: B batch, T sequence, H query heads, KVH key/value heads, D head dim, C channels, V vocab.
pub mod awake;
pub mod device;
pub mod fused;
pub mod generic;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};

/// What a custom op's `cpu_fwd` returns.
pub(crate) type CpuOut = Result<(CpuStorage, Shape)>;
/// What a custom op's `cuda_fwd` returns.
#[cfg(feature = "cuda")]
pub(crate) type CudaOut = Result<(candle_core::CudaStorage, Shape)>;
/// The input gradients a two-operand custom op's `bwd` returns.
pub(crate) type Grads2 = Result<(Option<Tensor>, Option<Tensor>)>;
/// The input gradients a three-operand custom op's `bwd` returns.
pub(crate) type Grads3 = Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;

/// `x * c` where `c` is a constant (no gradient is wanted for it) broadcastable to x's shape;
/// same dtype. Unlike `broadcast_mul`, whose backward also computes (and then keeps, unconsumed, in
/// the gradient store until the whole backward ends) an x-sized gradient for `c`, this op's
/// backward returns only `dx = grad · c`.
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let c = c.detach().broadcast_as(x.shape())?;
    fused::tape::apply2(x, &c, ConstOp::Mul)
}

/// `x + c` for a constant `c` broadcastable to x's shape (same dtype); backward `dx = grad`, and no
/// gradient for `c` (see [`mul_const`]).
pub fn add_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let c = c.detach().broadcast_as(x.shape())?;
    fused::tape::apply2(x, &c, ConstOp::Add)
}

/// Elementwise op with a constant second operand (already broadcast to the first's shape).
#[derive(Clone, Copy, Debug)]
enum ConstOp {
    Mul,
    Add,
}

impl ConstOp {
    /// Both operands must have one shape (no broadcasting here).
    fn check_shapes(&self, l1: &Layout, l2: &Layout) -> Result<()> {
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "{}: shapes {:?} and {:?} differ",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        Ok(())
    }

    fn f32(self, x: f32, c: f32) -> f32 {
        match self {
            ConstOp::Mul => x * c,
            ConstOp::Add => x + c,
        }
    }
}

/// Calls `f(offset in 1, offset in 2)` for every element, in row-major order of the (equal) shapes.
fn for_each_pair(l1: &Layout, l2: &Layout, mut f: impl FnMut(usize, usize)) {
    let dims = l1.dims();
    let (s1, s2) = (l1.stride(), l2.stride());
    let n = dims.len();
    let (mut b1, mut b2) = (l1.start_offset(), l2.start_offset());
    if n == 0 {
        f(b1, b2);
        return;
    }
    let (last, t1, t2) = (dims[n - 1], s1[n - 1], s2[n - 1]);
    let outer: usize = dims[..n - 1].iter().product();
    let mut idx = vec![0usize; n - 1];
    for _ in 0..outer {
        for j in 0..last {
            f(b1 + j * t1, b2 + j * t2);
        }
        for d in (0..n - 1).rev() {
            idx[d] += 1;
            b1 += s1[d];
            b2 += s2[d];
            if idx[d] < dims[d] {
                break;
            }
            b1 -= s1[d] * dims[d];
            b2 -= s2[d] * dims[d];
            idx[d] = 0;
        }
    }
}

fn const_apply<T: Copy>(
    a: &[T],
    la: &Layout,
    c: &[T],
    lc: &Layout,
    f: impl Fn(T, T) -> T,
) -> Vec<T> {
    if let (Some((a0, a1)), Some((c0, c1))) = (la.contiguous_offsets(), lc.contiguous_offsets()) {
        return a[a0..a1]
            .iter()
            .zip(&c[c0..c1])
            .map(|(&x, &y)| f(x, y))
            .collect();
    }
    let mut out = Vec::with_capacity(la.shape().elem_count());
    for_each_pair(la, lc, |i, j| out.push(f(a[i], c[j])));
    out
}

impl CustomOp2 for ConstOp {
    fn name(&self) -> &'static str {
        match self {
            ConstOp::Mul => "qtune-mul-const",
            ConstOp::Add => "qtune-add-const",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CpuOut {
        self.check_shapes(l1, l2)?;
        let op = *self;
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(c)) => {
                CpuStorage::F32(const_apply(a, l1, c, l2, |x, y| op.f32(x, y)))
            }
            // Half types: f32 arithmetic rounded once, as candle's own bf16/f16 kernels do.
            (CpuStorage::BF16(a), CpuStorage::BF16(c)) => {
                CpuStorage::BF16(const_apply(a, l1, c, l2, |x, y| {
                    bf16::from_f32(op.f32(x.to_f32(), y.to_f32()))
                }))
            }
            (CpuStorage::F16(a), CpuStorage::F16(c)) => {
                CpuStorage::F16(const_apply(a, l1, c, l2, |x, y| {
                    f16::from_f32(op.f32(x.to_f32(), y.to_f32()))
                }))
            }
            _ => candle_core::bail!(
                "{}: operands must share one float dtype (f32, bf16 or f16)",
                self.name()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    /// candle's own element-wise kernels (same rounding as its CPU ones).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> CudaOut {
        use candle_core::backend::BackendStorage;
        self.check_shapes(l1, l2)?;
        let out = match self {
            ConstOp::Mul => s1.binary_impl::<candle_core::op::Mul>(s2, l1, l2)?,
            ConstOp::Add => s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?,
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, c: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        // grad arrives detached, c is a constant: the result records no graph.
        let g = match self {
            ConstOp::Mul => grad.mul(c)?,
            ConstOp::Add => grad.clone(),
        };
        Ok((Some(g), None))
    }
}

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
    mul_const(&y, &w.to_dtype(dt)?)
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
    let o1 = (mul_const(&x1, cos)? - mul_const(&x2, sin)?)?;
    let o2 = (mul_const(&x2, cos)? + mul_const(&x1, sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// The `(T, D/2)` cos and sin tables of [`rope`] for positions `0..t`, computed in f32 as
/// transformers does (`inv_freq = 1 / theta^(2i/D)`, angle = `pos * inv_freq`), cast to `dtype`.
pub fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    rope_tables_of(t, &inv, dtype)
}

/// [`rope_tables`] from given inverse frequencies `(D/2,)` (scaled rotary: Llama 3.1).
pub fn rope_tables_of(t: usize, inv: &[f32], dtype: DType) -> Result<(Tensor, Tensor)> {
    let half = inv.len();
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
        candle_core::bail!(
            "attention mask has {} entries, expected {b} x {t}",
            keep.len()
        );
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

/// Causal self-attention with grouped KV heads: `q (B, H, T, D)`, `k`, `v (B, KVH, S, D)` with H a
/// multiple of KVH (query head h reads KV head `h / (H/KVH)`), `bias (B, 1, T, S)` f32 from
/// [`attention_bias`] (it carries the causal and padding masks; S > T when earlier keys come from
/// a KV cache). Scores `q·kᵀ/sqrt(D)` and softmax in f32; returns `(B, H, T, D)` in q's dtype.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (kvh, sk) = (k.dim(1)?, k.dim(2)?);
    if kvh == 0 || !h.is_multiple_of(kvh) {
        candle_core::bail!("{h} query heads are not a multiple of {kvh} KV heads");
    }
    let rep = |x: &Tensor| -> Result<Tensor> {
        if kvh == h {
            return Ok(x.clone());
        }
        // (B, KVH, S, D) -> (B, KVH, H/KVH, S, D) -> (B, H, S, D)
        x.unsqueeze(2)?
            .broadcast_as((b, kvh, h / kvh, sk, d))?
            .contiguous()?
            .reshape((b, h, sk, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    // s: (B, H, T, S)
    let s = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let s = add_const(
        &(s.to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?,
        bias,
    )?;
    let p = softmax_last(&s)?.to_dtype(v.dtype())?;
    // (B, H, T, D)
    p.matmul(&v.contiguous()?)
}

/// Softmax over the last dim with composite ops (the max is a constant shift, kept out of the graph).
fn softmax_last(s: &Tensor) -> Result<Tensor> {
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = add_const(s, &m.neg()?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// SiLU `x · sigmoid(x)`, any shape and float dtype.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// max |a - b| over all elements, compared in f32.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// mul_const / add_const equal candle's broadcast ops on strided inputs (f32 and bf16), and
    /// their backward gives x the same gradient and the constant none.
    #[test]
    fn const_ops_match_broadcast_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &dev)
                .unwrap()
                .reshape((2, 3, 4, 6))
                .unwrap()
                .affine(0.1, -1.0)
                .unwrap(),
        )
        .unwrap();
        let c = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((4, 1, 3))
            .unwrap()
            .affine(0.25, 0.5)
            .unwrap();
        // A transposed, narrowed (non-contiguous) view.
        let xs = x.transpose(1, 2).unwrap().narrow(3, 1, 3).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let (xd, cd) = (xs.to_dtype(dt).unwrap(), c.to_dtype(dt).unwrap());
            let a = mul_const(&xd, &cd).unwrap();
            let b = xd.broadcast_mul(&cd).unwrap();
            assert_eq!(max_abs_diff(&a, &b), 0.0, "{dt:?}");
            let a = add_const(&xd, &cd).unwrap();
            let b = xd.broadcast_add(&cd).unwrap();
            assert_eq!(max_abs_diff(&a, &b), 0.0, "{dt:?}");
        }
        let w = Tensor::arange(0f32, 2.0 * 4.0 * 3.0 * 3.0, &dev)
            .unwrap()
            .reshape((2, 4, 3, 3))
            .unwrap();
        // the gradients of sum(y * w)
        let grads = |y: Tensor| y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = grads(mul_const(&add_const(&xs, &c).unwrap(), &c).unwrap());
        let gb = grads(xs.broadcast_add(&c).unwrap().broadcast_mul(&c).unwrap());
        let (ga_x, gb_x) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert_eq!(max_abs_diff(ga_x, gb_x), 0.0);
        // candle's ops leave gradients for the constant's broadcast views; ours leave none.
        assert!(ga.get_ids().count() < gb.get_ids().count());
    }
}
