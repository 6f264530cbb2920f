//! Rotary position embeddings: tables and the rotation, whose backward is the inverse rotation.
use super::*;

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
    tape::apply1(&x.contiguous()?, op)
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

impl RopeOp {
    /// `x (B·H, T, D)` rotated in its element type, each `(b, h)` slab a task; f32 arithmetic,
    /// one rounding an output.
    fn rotate<T: Elem>(&self, x: &[T]) -> Vec<T> {
        let (t, half) = (self.t, self.half);
        let d = 2 * half;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        if t * d == 0 {
            return vec![T::of(0.0); x.len()];
        }
        par_spans(x.len(), t * d, T::of(0.0), |_, y| {
            let x = &x[y.range()];
            for p in 0..t {
                let xr = &x[p * d..(p + 1) * d];
                let cos = &self.cos[p * half..(p + 1) * half];
                let sin = &self.sin[p * half..(p + 1) * half];
                // one pass per layout, so that the contiguous halves vectorise
                if self.interleaved {
                    y.put_blocks(d, T::put_row, |j0, out| {
                        for (k, o) in out.iter_mut().enumerate() {
                            let j = j0 + k;
                            let (i, c) = (j / 2, cos[j / 2]);
                            let (a, b, sn) = (xr[2 * i].f(), xr[2 * i + 1].f(), sign * sin[i]);
                            *o = if j % 2 == 0 {
                                a * c - b * sn
                            } else {
                                b * c + a * sn
                            };
                        }
                    });
                } else {
                    let (x1, x2) = xr.split_at(half);
                    // first half a·cos − b·sin, second b·cos + a·sin, for a, b the two halves
                    for (a, b, sn) in [(x1, x2, -sign), (x2, x1, sign)] {
                        y.put_blocks(half, T::put_row, |j0, out| {
                            let n = out.len();
                            let (a, b) = (&a[j0..j0 + n], &b[j0..j0 + n]);
                            let (c, s) = (&cos[j0..j0 + n], &sin[j0..j0 + n]);
                            for ((((o, a), b), &c), &s) in
                                out.iter_mut().zip(a).zip(b).zip(c).zip(s)
                            {
                                *o = a.f() * c + b.f() * sn * s;
                            }
                        });
                    }
                }
            }
        })
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "qtune-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        let y = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.rotate(slice_of(v, l, "rope")?)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.rotate(slice_of(v, l, "rope")?)),
            CpuStorage::F16(v) => CpuStorage::F16(self.rotate(slice_of(v, l, "rope")?)),
            _ => bail!("rope: x must be f32, bf16 or f16"),
        };
        Ok((y, l.shape().clone()))
    }

    /// kernels/ops.cu `qt_rope` (one thread per rotated pair; the backward is this op inverted).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CudaOut {
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
