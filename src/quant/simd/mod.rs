//! SIMD dequantisers (AVX2+FMA+F16C, AVX-512 F+BW, NEON). Each has the same signature and the same
//! results, bit for bit, as its `scalar` reference: the same products and sums in the same order,
//! never a fused multiply-add. They are only reached through [`dequant_fn`], which hands one out
//! after checking at run time that this CPU has the features it was compiled for.
use super::dispatch::{DequantBf16Fn, DequantFn, SimdLevel};
use super::QType;
use half::bf16;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

/// How far ahead of the block being read the streaming kernels (decode, dequantisation into
/// bf16) prefetch. Decoding streams every weight once per token from DRAM, and with the hardware
/// prefetcher alone its kernel waited on memory (83 % of a 7B Q4_0 decode's samples in it);
/// 2 KiB ahead, that decode ran 1.1-1.9× faster in alternating runs on a VM whose memory
/// bandwidth neighbours were sharing (docs/BENCHMARKS.md, session 12; 1 and 4 KiB were slower).
pub const PREFETCH_AHEAD: usize = 2048;

/// Prefetches (into L1) the cache lines of the `len` bytes [`PREFETCH_AHEAD`] past `b`; a no-op
/// off x86. Safe to call with any address: a prefetch is a hint and does not fault, so reading
/// past a buffer's end is harmless.
#[inline(always)]
pub fn prefetch_ahead(b: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for o in (0..len).step_by(64) {
        // SAFETY: `prefetcht0` needs only SSE (every x86_64 CPU) and never faults or writes.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                b.wrapping_add(PREFETCH_AHEAD + o) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (b, len);
}

/// The SIMD kernel for `qtype` at `level`, or `None` where there is none (or the CPU lacks the
/// level's features: this check is what makes the `unsafe` kernels sound to call).
pub fn dequant_fn(qtype: QType, level: SimdLevel) -> Option<DequantFn> {
    match level {
        SimdLevel::Scalar => None,
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if x86::has_avx2() => x86::avx2::dequant_fn(qtype),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if x86::has_avx512() => x86::avx512::dequant_fn(qtype),
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon if std::arch::is_aarch64_feature_detected!("neon") => {
            neon::dequant_fn(qtype)
        }
        _ => None,
    }
}

/// What a dequantiser writes: f32, or bf16 rounded in the register (sealed: these two).
pub trait Out: Copy + private::Sealed {
    /// True for bf16.
    const BF16: bool;
}
impl Out for f32 {
    const BF16: bool = false;
}
impl Out for bf16 {
    const BF16: bool = true;
}
mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// The SIMD kernel for `qtype` at `level` that writes bf16 directly (each value rounded once, as
/// the f32 kernel's output through `half::bf16::from_f32`), or `None` where there is none: the
/// caller then stages through f32. At the AVX-512 level on a CPU with AVX-512 BF16 this is the
/// `vcvtneps2bf16` variant unless `integer_rounding` asks for the other (tests compare both).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn dequant_bf16_fn(
    qtype: QType,
    level: SimdLevel,
    integer_rounding: bool,
) -> Option<DequantBf16Fn> {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if x86::has_avx2() => x86::avx2::dequant_bf16_fn(qtype),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if x86::has_avx512_bf16() && !integer_rounding => {
            x86::avx512bf16_blocks::dequant_bf16_fn(qtype)
                .or_else(|| x86::avx512bf16::dequant_bf16_fn(qtype))
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if x86::has_avx512() => x86::avx512::dequant_bf16_fn(qtype),
        _ => None,
    }
}

/// f32 -> bf16 slice conversion: round to nearest even, NaN stays NaN (quietened), exactly as
/// `half::bf16::from_f32`.
pub type ToBf16Fn = fn(&[f32], &mut [bf16]);

/// The f32 -> bf16 converter for `level` (scalar where there is no SIMD one).
pub fn f32_to_bf16_fn(level: SimdLevel) -> ToBf16Fn {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if x86::has_avx2() => x86::avx2::to_bf16,
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if x86::has_avx512_bf16() => x86::avx512::to_bf16_cvt,
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if x86::has_avx512() => x86::avx512::to_bf16,
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon if std::arch::is_aarch64_feature_detected!("neon") => neon::to_bf16,
        _ => to_bf16_scalar,
    }
}

/// Scalar f32 -> bf16 (the reference the SIMD converters are tested against).
pub fn to_bf16_scalar(src: &[f32], dst: &mut [bf16]) {
    for (o, v) in dst.iter_mut().zip(src) {
        *o = bf16::from_f32(*v);
    }
}

/// Two f32 rows rounded to bf16 as `half::bf16::from_f32` rounds and interleaved:
/// `dst[c] = lo[c] | hi[c] << 16` (bits), over the shortest of the three.
pub type PairRowsFn = fn(&[f32], &[f32], &mut [u32]);

/// The paired-row rounding for `level`: one pass on AVX-512 BF16, else None (callers round each
/// row with [`f32_to_bf16_fn`] and pair them).
pub fn pair_rows_fn(level: SimdLevel) -> Option<PairRowsFn> {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if x86::has_avx512_bf16() => Some(x86::avx512::pair_rows_cvt),
        _ => None,
    }
}

/// Scalar [`PairRowsFn`] (the reference the SIMD one is tested against).
pub fn pair_rows_scalar(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
    for ((o, l), h) in dst.iter_mut().zip(lo).zip(hi) {
        *o = bf16::from_f32(*l).to_bits() as u32 | (bf16::from_f32(*h).to_bits() as u32) << 16;
    }
}
