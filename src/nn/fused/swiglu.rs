//! SwiGLU's gate `silu(g) · u` in one op with a hand-written backward (CPU).
//!
//! Why: candle runs it as `silu` then `mul`, and its SiLU backward rebuilds sigmoid(g) from four
//! temporaries (-g, exp, +1, recip) and then `1 - y`, a product and a sum: seven MLP-sized passes
//! and up to three extra tensors alive. Here forward and backward are one pass each and the graph
//! keeps only g and u (which it holds anyway as the projections' outputs).
use super::exp::exp_shift_sum;
use super::*;
use candle_core::CustomOp2;

/// `y (..) = silu(g) · u = g · sigmoid(g) · u` for `g` and `u` of one shape and dtype. As torch
/// computes it in half precision, silu(g) is rounded to the dtype before the product (f32 math,
/// two roundings); for f32 both are exact f32 operations.
/// Backward: `du = dy · silu(g)`, `dg = (dy · u) · sigmoid(g) · (1 + g · (1 - sigmoid(g)))`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    swiglu_with(g, u, false)
}

/// [`swiglu`] with the SIMD exp for f32 activations too when `simd_exp` (a bf16 step's f32
/// recompute); half-precision activations take it either way.
pub fn swiglu_with(g: &Tensor, u: &Tensor, simd_exp: bool) -> Result<Tensor> {
    check_cpu("swiglu", &[g, u])?;
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        bail!(
            "swiglu: gate {:?} {:?} and up {:?} {:?} must share shape and dtype",
            g.dims(),
            g.dtype(),
            u.dims(),
            u.dtype()
        );
    }
    let simd = simd_exp || g.dtype() != DType::F32;
    tape::apply2(&g.contiguous()?, &u.contiguous()?, SwiGluOp { simd })
}

/// The op; `simd`: the SIMD exp (see `exp::exp_shift_sum`).
struct SwiGluOp {
    simd: bool,
}

/// σ(g) for a chunk of gates into `s`: exp(−g) ([`exp_shift_sum`]: SIMD lanes when `simd`), then
/// 1 / (1 + e) (σ is 0 where exp(−g) overflows, 1 where it underflows).
fn sigmoids<T: Elem>(g: &[T], s: &mut [f32], simd: bool) {
    for (s, g) in s.iter_mut().zip(g) {
        *s = -g.f();
    }
    exp_shift_sum(s, 0.0, simd);
    s.iter_mut().for_each(|s| *s = 1.0 / (1.0 + *s));
}

impl SwiGluOp {
    fn forward<T: Elem>(&self, g: &[T], u: &[T]) -> Vec<T> {
        par_spans(g.len(), CHUNK, T::of(0.0), |_, y| {
            let span = y.range();
            let (g, u) = (&g[span.clone()], &u[span]);
            let mut s = [0f32; CHUNK];
            let s = &mut s[..g.len()];
            sigmoids(g, s, self.simd);
            y.put_blocks(g.len(), T::put_row, |j0, out| {
                let n = out.len();
                let (g, u, s) = (&g[j0..j0 + n], &u[j0..j0 + n], &s[j0..j0 + n]);
                for (((o, g), u), &s) in out.iter_mut().zip(g).zip(u).zip(s) {
                    // silu(g) rounded to T, then its product with u
                    *o = T::of(g.f() * s).f() * u.f();
                }
            });
        })
    }

    fn backward<T: Elem>(&self, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let mut dg = zeroed(g.len(), T::of(0.0));
        let mut du = zeroed(g.len(), T::of(0.0));
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                g.par_chunks(CHUNK)
                    .zip(u.par_chunks(CHUNK))
                    .zip(dy.par_chunks(CHUNK)),
            )
            .for_each(|((dg, du), ((g, u), dy))| {
                let mut sig = [0f32; CHUNK];
                sigmoids(g, &mut sig[..g.len()], self.simd);
                for i in 0..g.len() {
                    let (gf, d) = (g[i].f(), dy[i].f());
                    let s = sig[i];
                    let silu = T::of(gf * s).f();
                    du[i] = T::of(d * silu);
                    let ds = T::of(d * u[i].f()).f();
                    dg[i] = T::of(ds * (s * (1.0 + gf * (1.0 - s))));
                }
            });
        (dg, du)
    }
}

/// The typed contiguous slice of a storage, or an error naming the op.
fn typed<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("swiglu: arguments must be contiguous"),
    }
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "qtune-swiglu"
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, su: &CpuStorage, lu: &Layout) -> CpuOut {
        let y = match (sg, su) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(self.forward(typed(g, lg)?, typed(u, lu)?))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(self.forward(typed(g, lg)?, typed(u, lu)?))
            }
            (CpuStorage::F16(g), CpuStorage::F16(u)) => {
                CpuStorage::F16(self.forward(typed(g, lg)?, typed(u, lu)?))
            }
            _ => bail!("swiglu: gate and up must share one float dtype (f32, bf16 or f16)"),
        };
        Ok((y, lg.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Grads2 {
        let dy = dy.to_dtype(g.dtype())?.contiguous()?;
        let (sg, lg) = g.storage_and_layout();
        let (su, lu) = u.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        let (Storage::Cpu(sg), Storage::Cpu(su), Storage::Cpu(sd)) = (&*sg, &*su, &*sd) else {
            bail!("swiglu: only the CPU kernels exist");
        };
        let dims = lg.dims();
        macro_rules! grads {
            ($g:expr, $u:expr, $d:expr) => {{
                let (dg, du) = self.backward(typed($g, lg)?, typed($u, lu)?, typed($d, ld)?);
                (
                    Tensor::from_vec(dg, dims, &Device::Cpu)?,
                    Tensor::from_vec(du, dims, &Device::Cpu)?,
                )
            }};
        }
        let (dg, du) = match (sg, su, sd) {
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(d)) => grads!(g, u, d),
            (CpuStorage::BF16(g), CpuStorage::BF16(u), CpuStorage::BF16(d)) => grads!(g, u, d),
            (CpuStorage::F16(g), CpuStorage::F16(u), CpuStorage::F16(d)) => grads!(g, u, d),
            _ => bail!("swiglu: gate, up and the gradient must share one float dtype"),
        };
        Ok((Some(dg), Some(du)))
    }
}
