//! Fused training ops with hand-written backward passes (CPU): RMSNorm, rotary embeddings, causal
//! GQA attention and its head layout (split and merged as one op each way), a chunked
//! cross-entropy through a frozen lm_head, the MLP activations (SwiGLU's gate, exact GELU),
//! LayerNorm, and the residual adds fused into the norms.
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
use crate::quant::matmul::{
    par_spans, par_spans_init, qmatmul_bwd_input, qmatmul_fwd, zeroed, Span,
};
use crate::quant::matmul_bf16::{qmatmul_bwd_input_bf16, qmatmul_fwd_bf16, FwdOut};
use crate::store::StoredTensor;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use super::CudaOut;
use super::{CpuOut, Grads2, Grads3};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

// ---------------------------------------------------------------------------------------------
// Boundary helpers: f32 views of CPU storage, f32 results back in the activation dtype.

/// `f` of every element, in parallel tasks of [`CHUNK`] (the whole-tensor widenings ran on the
/// calling thread alone while the other cores waited).
fn par_map<S: Copy + Sync, D: Send>(v: &[S], f: impl Fn(S) -> D + Sync + Send) -> Vec<D> {
    v.par_iter().with_min_len(CHUNK).map(|&x| f(x)).collect()
}

/// The contiguous f32 data of a storage slice (borrowed for f32, converted for bf16/f16).
fn f32_of<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: argument must be contiguous (call .contiguous() first)");
    };
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(par_map(&v[start..end], bf16_f)),
        CpuStorage::F16(v) => Cow::Owned(par_map(&v[start..end], |x| x.to_f32())),
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

/// `v` rounded to `T` by [`Elem::row_of`] (bf16: the SIMD rounding) in parallel tasks of
/// [`CHUNK`]: 2.3–2.5× `half`'s scalar rounding mapped element by element (512K values, 2 threads,
/// session 16), the same bits.
fn rounded<T: Elem>(v: &[f32]) -> Vec<T> {
    par_spans(v.len(), CHUNK, T::of(0.0), |_, o| {
        T::put_row(o, &v[o.range()])
    })
}

/// f32 results as a storage of `dtype`.
fn storage_of(v: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(rounded(&v)),
        DType::F16 => CpuStorage::F16(rounded(&v)),
        _ => CpuStorage::F32(v),
    }
}

/// f32 results as a (gradient) tensor of `dtype`.
/// `g` in `dtype`: an f32 gradient rounded as the fused ops round their outputs (a gradient that
/// [`backward_collecting`] left in f32 gets the rounding the op would have given it).
pub fn round_grad(g: &Tensor, dtype: DType) -> Result<Tensor> {
    if g.dtype() == dtype {
        return Ok(g.clone());
    }
    if g.dtype() != DType::F32 || !g.device().is_cpu() {
        return g.to_dtype(dtype);
    }
    let v = g.flatten_all()?.to_vec1::<f32>()?;
    tensor_of(v, g.dims(), dtype)
}

fn tensor_of(v: Vec<f32>, dims: &[usize], dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::BF16 => Tensor::from_vec(rounded::<bf16>(&v), dims, &Device::Cpu),
        DType::F16 => Tensor::from_vec(rounded::<f16>(&v), dims, &Device::Cpu),
        _ => Tensor::from_vec(v, dims, &Device::Cpu),
    }
}

fn check_cpu(op: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| !matches!(t.device(), Device::Cpu)) {
        bail!("{op}: only the CPU kernels exist so far; move the tensors to the CPU");
    }
    Ok(())
}

/// The contiguous part of a storage's data a layout views, or an error naming the op.
fn slice_of<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: argument must be contiguous (call .contiguous() first)");
    };
    Ok(&v[start..end])
}

/// The activation element types the fused ops read and write, through f32.
pub(crate) trait Elem: candle_core::WithDType {
    /// The value as f32 (exact).
    fn f(self) -> f32;
    /// `v` rounded to this type (nearest even).
    fn of(v: f32) -> Self;
    /// `src` rounded into `dst` as [`Elem::of`] rounds (SIMD for bf16).
    fn row_of(src: &[f32], dst: &mut [Self]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = Self::of(v);
        }
    }
    /// Writes the f32 values `src` next into `y`, rounded to this type by [`Elem::row_of`]
    /// (through the stack); f32 copies them once.
    fn put_row(y: &mut Span<'_, Self>, src: &[f32]) {
        y.put_converted(src, Self::row_of)
    }
    /// The slice itself when the type is f32 (read in place, no conversion).
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The slice itself when the type is bf16 (the bf16 kernels' operands as they are).
    fn as_bf16(_: &[Self]) -> Option<&[bf16]> {
        None
    }
    /// The slice as an output the bf16 forward kernels write (f32 and bf16 only).
    fn fwd_out(_: &mut [MaybeUninit<Self>]) -> Option<FwdOut<'_>> {
        None
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
    #[inline(always)]
    fn of(v: f32) -> Self {
        v
    }
    fn put_row(y: &mut Span<'_, f32>, src: &[f32]) {
        y.put_slice(src)
    }
    fn as_f32(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
    fn fwd_out(v: &mut [MaybeUninit<f32>]) -> Option<FwdOut<'_>> {
        Some(FwdOut::F32(v))
    }
}

/// `half`'s conversions.
impl Elem for f16 {
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn of(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `half`'s conversions to the bit, written without branches ([`bf16_of`], [`bf16_f`]) so that
/// the element-wise loops inline and vectorise them, and the SIMD rounding of the bf16 kernels for
/// rows (the same bits).
impl Elem for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        bf16_f(self)
    }
    #[inline(always)]
    fn of(v: f32) -> Self {
        bf16_of(v)
    }
    fn as_bf16(v: &[bf16]) -> Option<&[bf16]> {
        Some(v)
    }
    fn fwd_out(v: &mut [MaybeUninit<bf16>]) -> Option<FwdOut<'_>> {
        Some(FwdOut::Bf16(v))
    }
    fn row_of(src: &[f32], dst: &mut [bf16]) {
        use crate::quant::matmul_bf16::Activation;
        f32::row_to_bf16(src, dst)
    }
}

/// `v` rounded to bf16, nearest even, NaN quietened: `half::bf16::from_f32`'s bits. Why not
/// `half`'s: its rounding branches and was a call per element in the ops' loops (SwiGLU, rotary,
/// the norms: 4 % of a ~100M bf16 step, session 25); this one is selects the compiler vectorises.
#[inline(always)]
pub(crate) fn bf16_of(v: f32) -> bf16 {
    let x = v.to_bits();
    // adding 0x7fff plus the kept part's lowest bit carries exactly when the dropped half is
    // above one half, or equal to it with an odd kept part (finite values cannot wrap)
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = x & 0x7fff_ffff > 0x7f80_0000;
    bf16::from_bits(if nan { (x >> 16) | 0x40 } else { rounded } as u16)
}

/// `v` widened to f32, NaN quietened: `half::bf16::to_f32`'s bits, without its branch.
#[inline(always)]
pub(crate) fn bf16_f(v: bf16) -> f32 {
    let i = v.to_bits() as u32;
    let nan = i & 0x7fff > 0x7f80;
    f32::from_bits(if nan { (i | 0x40) << 16 } else { i << 16 })
}

/// Elements a parallel task of the element-wise ops takes.
const CHUNK: usize = 4096;

/// `f(a[j], b[j])` (an f32 value) rounded to T for every j (`a` and `b` of one length), written
/// in place in parallel tasks of [`CHUNK`], 64 values at a time through [`Elem::row_of`] (bf16:
/// the SIMD rounding, the same bits as [`Elem::of`]).
fn zip_map<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> f32 + Sync) -> Vec<T> {
    par_spans(a.len(), CHUNK, T::of(0.0), |_, y| {
        let r = y.range();
        let (a, b) = (&a[r.clone()], &b[r]);
        let mut tmp = [0f32; 64];
        for (ac, bc) in a.chunks(64).zip(b.chunks(64)) {
            let t = &mut tmp[..ac.len()];
            for ((t, &a), &b) in t.iter_mut().zip(ac).zip(bc) {
                *t = f(a, b);
            }
            T::put_row(y, t);
        }
    })
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

mod attention;
mod attention_products;
mod cross_entropy;
mod exp;
mod gelu;
mod heads;
mod lora;
mod norm;
mod residual;
mod rope;
mod scale;
mod swiglu;
pub mod tape;

pub use attention::*;
pub(crate) use attention::{attention_dims, attention_task_bytes, bias_rows, AttnDims};
pub use cross_entropy::*;
pub use gelu::*;
pub use heads::*;
pub(crate) use lora::lora_bf16_scratch_bytes;
pub use lora::*;
pub use norm::*;
pub use residual::*;
pub use rope::*;
pub use scale::*;
pub use swiglu::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free bf16 conversions give `half`'s bits: every bf16 widened, and f32 patterns
    /// strided over all 2^32 plus each rounding boundary (dropped half just below, at and above
    /// one half, with even and odd kept parts), the extremes, infinities and NaNs.
    #[test]
    fn bf16_conversions_are_halfs() {
        for b in 0..=u16::MAX {
            let v = bf16::from_bits(b);
            assert_eq!(bf16_f(v).to_bits(), v.to_f32().to_bits(), "widen {b:#06x}");
        }
        let mut xs: Vec<u32> = (0..=u32::MAX).step_by(4093).collect();
        for hi in [
            0u32, 1, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0x7fc0, 0x8001, 0xff7f, 0xff80,
        ] {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                xs.push(hi << 16 | lo);
            }
        }
        xs.extend([f32::MAX, f32::MIN, f32::MIN_POSITIVE, f32::NAN, -f32::NAN].map(f32::to_bits));
        for x in xs {
            let v = f32::from_bits(x);
            assert_eq!(
                bf16_of(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "round {x:#010x}"
            );
        }
    }
}
