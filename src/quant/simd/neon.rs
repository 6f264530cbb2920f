//! aarch64 NEON kernels for the most used types: Q4_0, Q8_0, Q4_K, Q6_K, F16 and BF16. Same rule as
//! the x86 ones: unpack codes with integer SIMD, widen, convert, then multiply and subtract as
//! separate instructions in the scalar order (no FMA), so results equal `scalar` bit for bit.
//! Only handed out by `simd::dequant_fn` after `is_aarch64_feature_detected!("neon")`.
use crate::quant::blocks::scale_min_k4;
use crate::quant::dispatch::DequantFn;
use crate::quant::QType;
use half::{bf16, f16};
use std::arch::aarch64::*;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 16 codes as f32 (exact), from their two halves widened to 16 bits.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn f32x16(lo: int16x8_t, hi: int16x8_t) -> [float32x4_t; 4] {
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_high_s16(lo)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_high_s16(hi)),
    ]
}

/// out[0..16] = f32(codes[i]) * d, signed codes.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn emit16_s(codes: int8x16_t, d: f32, out: *mut f32) {
    let v = f32x16(vmovl_s8(vget_low_s8(codes)), vmovl_s8(vget_high_s8(codes)));
    for (k, v) in v.into_iter().enumerate() {
        vst1q_f32(out.add(4 * k), vmulq_f32(v, vdupq_n_f32(d)));
    }
}

/// out[0..16] = f32(codes[i]) * d - m, unsigned codes (0..=255: exact as 16-bit signed).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn emit16_u_sub(codes: uint8x16_t, d: f32, m: f32, out: *mut f32) {
    let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(codes)));
    let hi = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(codes)));
    for (k, v) in f32x16(lo, hi).into_iter().enumerate() {
        let r = vmulq_f32(v, vdupq_n_f32(d));
        vst1q_f32(out.add(4 * k), vsubq_f32(r, vdupq_n_f32(m)));
    }
}

#[target_feature(enable = "neon")]
unsafe fn q4_0(src: &[u8], dst: &mut [f32]) {
    let m4 = vdupq_n_u8(0x0f);
    let eight = vdupq_n_s8(8);
    for (b, o) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = vld1q_u8(b.as_ptr().add(2));
        let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(qs, m4)), eight);
        let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs)), eight);
        emit16_s(lo, d, o.as_mut_ptr());
        emit16_s(hi, d, o.as_mut_ptr().add(16));
    }
}

#[target_feature(enable = "neon")]
unsafe fn q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let p = b.as_ptr().add(2) as *const i8;
        emit16_s(vld1q_s8(p), d, o.as_mut_ptr());
        emit16_s(vld1q_s8(p.add(16)), d, o.as_mut_ptr().add(16));
    }
}

#[target_feature(enable = "neon")]
unsafe fn q4_k(src: &[u8], dst: &mut [f32]) {
    let m4 = vdupq_n_u8(0x0f);
    for (b, o) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales: &[u8; 12] = b[4..16].try_into().expect("block");
        let o = o.as_mut_ptr();
        for c in 0..4 {
            let (sc0, m0) = scale_min_k4(2 * c, scales);
            let (sc1, m1) = scale_min_k4(2 * c + 1, scales);
            let (d0, dm0) = (d * sc0 as f32, dmin * m0 as f32);
            let (d1, dm1) = (d * sc1 as f32, dmin * m1 as f32);
            for half in 0..2 {
                let qs = vld1q_u8(b.as_ptr().add(16 + 32 * c + 16 * half));
                emit16_u_sub(vandq_u8(qs, m4), d0, dm0, o.add(64 * c + 16 * half));
                emit16_u_sub(vshrq_n_u8::<4>(qs), d1, dm1, o.add(64 * c + 32 + 16 * half));
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn q6_k(src: &[u8], dst: &mut [f32]) {
    let m4 = vdupq_n_u8(0x0f);
    let m2 = vdupq_n_u8(3);
    let bias = vdupq_n_s8(32);
    for (b, o) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 208);
        let o = o.as_mut_ptr();
        for a in 0..2 {
            for s in 0..4 {
                let base = a * 128 + s * 32;
                for half in 0..2 {
                    // Element base + 16*half + i: nibble s/2 of ql[a*64 + (s%2)*32 + 16*half + i],
                    // bits 2s..2s+2 of qh[a*32 + 16*half + i].
                    let ql = vld1q_u8(b.as_ptr().add(64 * a + 32 * (s % 2) + 16 * half));
                    let qh = vld1q_u8(b.as_ptr().add(128 + 32 * a + 16 * half));
                    let nib = if s < 2 {
                        vandq_u8(ql, m4)
                    } else {
                        vshrq_n_u8::<4>(ql)
                    };
                    // A negative count shifts right.
                    let hi = vandq_u8(vshlq_u8(qh, vdupq_n_s8(-2 * s as i8)), m2);
                    let q = vorrq_u8(nib, vshlq_n_u8::<4>(hi));
                    let q = vsubq_s8(vreinterpretq_s8_u8(q), bias);
                    let dl = d * (b[192 + base / 16 + half] as i8) as f32;
                    emit16_s(q, dl, o.add(base + 16 * half));
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let h = vld1q_u16(src.as_ptr().add(2 * i) as *const u16);
        let lo: float32x4_t;
        let hi: float32x4_t;
        // FCVTL/FCVTL2 (base ARMv8 FP/SIMD): exact f16 -> f32. Rust's float16x4_t is unstable,
        // hence the two instructions by hand.
        std::arch::asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack)
        );
        vst1q_f32(dst.as_mut_ptr().add(i), lo);
        vst1q_f32(dst.as_mut_ptr().add(i + 4), hi);
    }
    crate::quant::scalar::dequant_f16(&src[2 * n..], &mut dst[n..]);
}

#[target_feature(enable = "neon")]
unsafe fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let h = vld1q_u16(src.as_ptr().add(2 * i) as *const u16);
        vst1q_f32(
            dst.as_mut_ptr().add(i),
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
        );
        vst1q_f32(
            dst.as_mut_ptr().add(i + 4),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        );
    }
    crate::quant::scalar::dequant_bf16(&src[2 * n..], &mut dst[n..]);
}

/// Four f32 rounded to bf16 (nearest even; a NaN stays a NaN, quietened), as `half::bf16::from_f32`:
/// integer arithmetic on the bits, so FPCR's flush-to-zero and rounding mode play no part.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) unsafe fn bf16x4(v: float32x4_t) -> uint16x4_t {
    let bits = vreinterpretq_u32_f32(v);
    // bits + 0x7fff + (bit 16): carries into the upper half exactly when RNE rounds up.
    let lsb = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
    let rounded = vaddq_u32(vaddq_u32(bits, vdupq_n_u32(0x7fff)), lsb);
    let nan = vcgtq_u32(
        vandq_u32(bits, vdupq_n_u32(0x7fff_ffff)),
        vdupq_n_u32(0x7f80_0000),
    );
    let quiet = vorrq_u32(bits, vdupq_n_u32(0x0040_0000));
    vshrn_n_u32::<16>(vbslq_u32(nan, quiet, rounded))
}

#[target_feature(enable = "neon")]
unsafe fn to_bf16_neon(src: &[f32], dst: &mut [bf16]) {
    let len = src.len().min(dst.len());
    let n = len / 8 * 8;
    for i in (0..n).step_by(8) {
        let lo = bf16x4(vld1q_f32(src.as_ptr().add(i)));
        let hi = bf16x4(vld1q_f32(src.as_ptr().add(i + 4)));
        vst1q_u16(dst.as_mut_ptr().add(i) as *mut u16, vcombine_u16(lo, hi));
    }
    super::to_bf16_scalar(&src[n..len], &mut dst[n..len]);
}

/// f32 -> bf16 for `simd::f32_to_bf16_fn` (callers must have detected NEON).
pub(super) fn to_bf16(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: only handed out by `f32_to_bf16_fn` after detecting NEON; loads and stores stay
    // inside the first `min(len)` elements of both slices.
    unsafe { to_bf16_neon(src, dst) }
}

macro_rules! safe {
    ($name:ident) => {{
        fn w(src: &[u8], dst: &mut [f32]) {
            // SAFETY: only handed out by `dequant_fn`, which `simd::dequant_fn` reaches after
            // detecting NEON.
            unsafe { $name(src, dst) }
        }
        w as DequantFn
    }};
}

/// The NEON kernel for `qtype`, where there is one (callers must have detected NEON).
pub(super) fn dequant_fn(qtype: QType) -> Option<DequantFn> {
    Some(match qtype {
        QType::F16 => safe!(f16_to_f32),
        QType::BF16 => safe!(bf16_to_f32),
        QType::Q4_0 => safe!(q4_0),
        QType::Q8_0 => safe!(q8_0),
        QType::Q4_K => safe!(q4_k),
        QType::Q6_K => safe!(q6_k),
        _ => return None,
    })
}
