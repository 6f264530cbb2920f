//! Scalar reference kernels: one dequantiser (and, where we write the type, one quantiser) per type.
//! These define correctness: they are tested bit-exact against gguf-py and bitsandbytes fixtures, and
//! every SIMD kernel is tested equal to them. Keep them simple and obviously right.
//!
//! Signature shared by every dequantiser: `fn(src: &[u8], dst: &mut [f32])`, where `src` holds
//! exactly `dst.len() / block_size` whole blocks.
use half::{bf16, f16};

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// F32 (little-endian bytes) to f32.
pub fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// F16 to f32.
pub fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// BF16 to f32.
pub fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// Q4_0: `w[j] = d * ((qs[j] & 15) - 8)`, `w[j+16] = d * ((qs[j] >> 4) - 8)`.
pub fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for j in 0..16 {
            let q = b[2 + j];
            o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q8_0: `w[j] = d * qs[j]`.
pub fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for j in 0..32 {
            o[j] = (b[2 + j] as i8) as f32 * d;
        }
    }
}
