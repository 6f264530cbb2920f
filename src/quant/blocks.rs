//! ggml block layouts, `#[repr(C)]` so a block can be viewed in place inside a memory map.
//! Each struct has a compile-time size assert against ggml's `static_assert`s.
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

/// Q8_0: 32 weights, one f16 scale; `w = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

// SAFETY: plain-old-data blocks of bytes and f16 (alignment 2; views check alignment).
unsafe impl bytemuck::Zeroable for BlockQ4_0 {}
unsafe impl bytemuck::Pod for BlockQ4_0 {}
unsafe impl bytemuck::Zeroable for BlockQ8_0 {}
unsafe impl bytemuck::Pod for BlockQ8_0 {}
