//! The exact (erf) GELU of Falcon's MLP in one op with a hand-written backward (CPU).
//!
//! Why: candle's `gelu_erf` forward is one pass, but its backward (candle-core 0.11
//! `backprop.rs`) composes the derivative from thirteen MLP-sized passes: x², its negation and
//! halving, exp, the 0.398942 scaling, the product with x, x/√2, erf, its halving, + 0.5, their
//! sum, the product with the gradient and the accumulation; 17 tensor reads and 13 writes, with
//! up to 10 N·I temporaries alive above the graph (measured in tests/falcon_rss.rs's shape). Here
//! the backward is one pass (x and dy read, dx written) before candle's accumulation, the forward
//! one pass, and the graph keeps only x (the up projection's output, which it holds anyway).
use super::*;
use candle_core::cpu::erf::erf_f32;
use std::f32::consts::FRAC_1_SQRT_2;

/// `y = x · Φ(x) = 0.5 · x · (1 + erf(x / √2))`, torch's `nn.GELU()` (approximate='none'), for
/// `x` in f32, bf16 or f16: f32 math rounded once to x's dtype, as torch's CPU kernel computes it
/// for every dtype. `erf` is candle's `erf_f32` (libm's `erff`, within an ulp of f32's).
/// Backward: `dx = dy · (Φ(x) + x · φ(x))`, φ the normal pdf, in f32 and rounded once (torch's
/// GeluBackward). CPU only: on a GPU the caller runs candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    check_cpu("gelu_erf", &[x])?;
    tape::apply1(&x.contiguous()?, GeluErfOp)
}

struct GeluErfOp;

/// 1 / √(2π), the normal pdf's factor.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Φ(x) in f32 as torch writes it: 0.5 · (1 + erf(x / √2)).
#[inline(always)]
fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2))
}

/// y = x · Φ(x) in f32 (torch's order: `x · 0.5 · (1 + erf(x · 1/√2))`).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2))
}

/// dy/dx = Φ(x) + x · φ(x), with φ(x) = exp(-x²/2) / √(2π).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    cdf(x) + x * (INV_SQRT_2PI * (x * x * -0.5).exp())
}

impl GeluErfOp {
    fn forward<T: Elem>(x: &[T]) -> Vec<T> {
        let mut y = vec![T::of(0.0); x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = T::of(gelu(x.f()));
                }
            });
        y
    }

    fn backward<T: Elem>(x: &[T], dy: &[T]) -> Vec<T> {
        zip_map(x, dy, |x, d| d.f() * gelu_grad(x.f()))
    }
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "qtune-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        let op = "gelu_erf";
        let y = match s {
            CpuStorage::F32(x) => CpuStorage::F32(Self::forward(slice_of(x, l, op)?)),
            CpuStorage::BF16(x) => CpuStorage::BF16(Self::forward(slice_of(x, l, op)?)),
            CpuStorage::F16(x) => CpuStorage::F16(Self::forward(slice_of(x, l, op)?)),
            s => bail!(
                "gelu_erf: unsupported dtype {:?}; use f32, bf16 or f16",
                s.dtype()
            ),
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let (sx, lx) = x.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        let (Storage::Cpu(sx), Storage::Cpu(sd)) = (&*sx, &*sd) else {
            bail!("gelu_erf: only the CPU kernels exist");
        };
        let (op, dims) = ("gelu_erf", lx.dims());
        macro_rules! grad {
            ($x:expr, $d:expr) => {
                Tensor::from_vec(
                    Self::backward(slice_of($x, lx, op)?, slice_of($d, ld, op)?),
                    dims,
                    &Device::Cpu,
                )?
            };
        }
        let dx = match (sx, sd) {
            (CpuStorage::F32(x), CpuStorage::F32(d)) => grad!(x, d),
            (CpuStorage::BF16(x), CpuStorage::BF16(d)) => grad!(x, d),
            (CpuStorage::F16(x), CpuStorage::F16(d)) => grad!(x, d),
            _ => bail!("gelu_erf: the input and its gradient must share one float dtype"),
        };
        Ok(Some(dx))
    }
}
