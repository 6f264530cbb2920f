//! ggml block layouts, `#[repr(C)]` so a block can be viewed in place inside a memory map.
//! Each struct has a compile-time size assert against ggml's `static_assert`s (ggml-common.h).
//! Every field is a byte array or an f16, so the alignment is at most 2 and there is no padding.
use super::types::QK_K;
use half::f16;

/// Q4_0: 32 weights, one f16 scale `d`; `w = d * (q - 8)`. Byte j holds element j in its low
/// nibble and element j+16 in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// Q4_1: 32 weights, scale `d` and minimum `m`; `w = d * q + m`, nibbles as in Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// Q5_0: 32 weights; low 4 bits as in Q4_0, bit 4 of element j is bit j of the little-endian
/// u32 `qh`; `w = d * (q - 16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// Q5_1: 32 weights, 5-bit codes as in Q5_0; `w = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

/// Q8_0: 32 weights, one f16 scale; `w = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// Q2_K: 256 weights in 16 sub-blocks of 16. `scales[i]` holds a 4-bit scale (low) and 4-bit min
/// (high) for sub-block i; `w = d * sc * q - dmin * m`, q 2 bits. Element `h*128 + s*32 + l` is
/// bits `2s..2s+2` of `qs[h*32 + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

/// Q3_K: 256 weights in 16 sub-blocks of 16, 6-bit signed scales packed in 12 bytes;
/// `w = d * (sc - 32) * (q2 - (hbit ? 0 : 4))`. 2 low bits as in Q2_K, the high bit of element
/// `b*32 + l` is bit b of `hmask[l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

/// Q4_K: 256 weights in 8 sub-blocks of 32, 6-bit scales and mins packed in 12 bytes;
/// `w = d * sc * q - dmin * m`. Element `c*64 + h*32 + l` is nibble h of `qs[c*32 + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// Q5_K: Q4_K plus a fifth bit: bit 4 of element `b*32 + l` is bit b of `qh[l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

/// Q6_K: 256 weights in 16 sub-blocks of 16 with int8 scales; `w = d * sc * (q - 32)`, q 6 bits:
/// 4 low bits in `ql`, 2 high bits in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: plain-old-data made of byte arrays and f16, no padding (size asserted above).
        unsafe impl bytemuck::Zeroable for $t {}
        // SAFETY: as above; every bit pattern is a valid value (bytes and f16 only), Copy, 'static.
        unsafe impl bytemuck::Pod for $t {}
    )*};
}
pod!(
    BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K,
    BlockQ6K
);

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
