//! ggml block layouts, `#[repr(C)]` so a block can be viewed in place inside a memory map.
//! Each struct has a compile-time size assert against ggml's `static_assert`s (ggml-common.h).
//! Every field is a byte array or an f16, so the alignment is at most 2 and there is no padding.
use super::types::QK_K;
use half::f16;

/// Declares ggml block structs: `#[repr(C)]`, `Copy`, the size asserted at compile time against
/// ggml's `static_assert`s, and `bytemuck::Pod` (every field is a byte array or an f16: alignment
/// at most 2, no padding, every bit pattern a valid value).
macro_rules! ggml_blocks {
    ($($(#[$doc:meta])* $name:ident, $size:literal bytes { $($field:ident: $ty:ty),* })*) => {$(
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            $(pub $field: $ty,)*
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        // SAFETY: plain-old-data made of byte arrays and f16, no padding (size asserted above).
        unsafe impl bytemuck::Zeroable for $name {}
        // SAFETY: as above; every bit pattern is a valid value (bytes and f16 only), Copy, 'static.
        unsafe impl bytemuck::Pod for $name {}
    )*};
}

ggml_blocks! {
    /// Q4_0: 32 weights, one f16 scale `d`; `w = d * (q - 8)`. Byte j holds element j in its low
    /// nibble and element j+16 in its high nibble.
    BlockQ4_0, 18 bytes { d: f16, qs: [u8; 16] }

    /// Q4_1: 32 weights, scale `d` and minimum `m`; `w = d * q + m`, nibbles as in Q4_0.
    BlockQ4_1, 20 bytes { d: f16, m: f16, qs: [u8; 16] }

    /// Q5_0: 32 weights; low 4 bits as in Q4_0, bit 4 of element j is bit j of the little-endian
    /// u32 `qh`; `w = d * (q - 16)`.
    BlockQ5_0, 22 bytes { d: f16, qh: [u8; 4], qs: [u8; 16] }

    /// Q5_1: 32 weights, 5-bit codes as in Q5_0; `w = d * q + m`.
    BlockQ5_1, 24 bytes { d: f16, m: f16, qh: [u8; 4], qs: [u8; 16] }

    /// Q8_0: 32 weights, one f16 scale; `w = d * q`.
    BlockQ8_0, 34 bytes { d: f16, qs: [i8; 32] }

    /// Q2_K: 256 weights in 16 sub-blocks of 16. `scales[i]` holds a 4-bit scale (low) and
    /// 4-bit min (high) for sub-block i; `w = d * sc * q - dmin * m`, q 2 bits. Element
    /// `h*128 + s*32 + l` is bits `2s..2s+2` of `qs[h*32 + l]`.
    BlockQ2K, 84 bytes { scales: [u8; QK_K / 16], qs: [u8; QK_K / 4], d: f16, dmin: f16 }

    /// Q3_K: 256 weights in 16 sub-blocks of 16, 6-bit signed scales packed in 12 bytes;
    /// `w = d * (sc - 32) * (q2 - (hbit ? 0 : 4))`. 2 low bits as in Q2_K, the high bit of
    /// element `b*32 + l` is bit b of `hmask[l]`.
    BlockQ3K, 110 bytes { hmask: [u8; QK_K / 8], qs: [u8; QK_K / 4], scales: [u8; 12], d: f16 }

    /// Q4_K: 256 weights in 8 sub-blocks of 32, 6-bit scales and mins packed in 12 bytes;
    /// `w = d * sc * q - dmin * m`. Element `c*64 + h*32 + l` is nibble h of `qs[c*32 + l]`.
    BlockQ4K, 144 bytes { d: f16, dmin: f16, scales: [u8; 12], qs: [u8; QK_K / 2] }

    /// Q5_K: Q4_K plus a fifth bit: bit 4 of element `b*32 + l` is bit b of `qh[l]`.
    BlockQ5K, 176 bytes {
        d: f16, dmin: f16, scales: [u8; 12], qh: [u8; QK_K / 8], qs: [u8; QK_K / 2]
    }

    /// Q6_K: 256 weights in 16 sub-blocks of 16 with int8 scales; `w = d * sc * (q - 32)`, q 6
    /// bits: 4 low bits in `ql`, 2 high bits in `qh`.
    BlockQ6K, 210 bytes {
        ql: [u8; QK_K / 2], qh: [u8; QK_K / 4], scales: [i8; QK_K / 16], d: f16
    }
}

/// Unpacks the 6-bit (scale, min) pair of sub-block `j` (0..8) of a Q4_K/Q5_K block.
/// Bytes 0..4 hold scales 0..4 (low 6 bits), 4..8 mins 0..4; bytes 8..12 hold the low 4 bits of
/// scales/mins 4..8, whose top 2 bits sit in the top bits of bytes 0..8.
#[inline(always)]
pub fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// All eight scales then all eight mins of [`scale_min_k4`], unpacked a 32-bit word at a time
/// (four bytes per operation, for the SIMD kernels that take them as one vector).
#[inline(always)]
pub fn scales_mins_k4(s: &[u8; 12]) -> [u8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a, b, c) = (w(0), w(1), w(2));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let words = [
        a & low6,
        (c & low4) | (((a >> 6) & top2) << 4),
        b & low6,
        ((c >> 4) & low4) | (((b >> 6) & top2) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, v) in out.chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Unpacks the 16 6-bit Q3_K scales (still biased by 32).
#[inline(always)]
pub fn scales_q3_k(s: &[u8; 12]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 15 } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = low | (high << 4);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QType;

    #[test]
    fn scales_mins_k4_unpacks_as_scale_min_k4() {
        // Each pattern puts every byte value in every position over v in 0..256 (v + c and
        // 151·v + c are bijections mod 256), with two different relations between positions.
        let patterns = |v: u32| -> [[u8; 12]; 2] {
            [
                std::array::from_fn(|i| (v + 37 * i as u32) as u8),
                std::array::from_fn(|i| (151 * v + 97 * i as u32) as u8),
            ]
        };
        for s in (0..256u32).flat_map(patterns) {
            let all = scales_mins_k4(&s);
            for j in 0..8 {
                assert_eq!((all[j], all[8 + j]), scale_min_k4(j, &s), "{s:?} j={j}");
            }
        }
    }

    #[test]
    fn sizes_match_qtype() {
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), QType::Q4_0.type_size());
        assert_eq!(std::mem::size_of::<BlockQ4_1>(), QType::Q4_1.type_size());
        assert_eq!(std::mem::size_of::<BlockQ5_0>(), QType::Q5_0.type_size());
        assert_eq!(std::mem::size_of::<BlockQ5_1>(), QType::Q5_1.type_size());
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), QType::Q8_0.type_size());
        assert_eq!(std::mem::size_of::<BlockQ2K>(), QType::Q2_K.type_size());
        assert_eq!(std::mem::size_of::<BlockQ3K>(), QType::Q3_K.type_size());
        assert_eq!(std::mem::size_of::<BlockQ4K>(), QType::Q4_K.type_size());
        assert_eq!(std::mem::size_of::<BlockQ5K>(), QType::Q5_K.type_size());
        assert_eq!(std::mem::size_of::<BlockQ6K>(), QType::Q6_K.type_size());
    }
}
