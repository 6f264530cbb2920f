//! bitsandbytes NF4 with double quantisation (QLoRA's storage format).
//!
//! A tensor is flattened and cut into blocks of 64; each block stores 32 bytes of packed 4-bit codes
//! (high nibble first) into the 16-value NormalFloat table, and one absmax. With double quant the
//! absmax values, minus their mean (`offset`), are themselves quantised to 8 bits with bitsandbytes'
//! dynamic map in blocks of 256, each with an f32 `nested_absmax`.

/// Elements per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// Absmax values per nested (double-quant) block.
pub const NF4_NESTED_BLOCK: usize = 256;

/// A borrowed NF4 tensor: packed codes and double-quantised statistics.
#[derive(Clone, Copy, Debug)]
pub struct Nf4Ref<'a> {
    /// Packed codes, two per byte, high nibble first (`numel / 2` bytes).
    pub packed: &'a [u8],
    /// 8-bit quantised absmax, one per block of 64 (`numel / 64` bytes).
    pub absmax_q: &'a [u8],
    /// f32 scale of each group of 256 absmax values.
    pub nested_absmax: &'a [f32],
    /// The 256-entry dynamic map the absmax values are coded with.
    pub nested_code: &'a [f32; 256],
    /// The 16-entry NF4 table.
    pub code: &'a [f32; 16],
    /// Mean subtracted from absmax before quantising it.
    pub offset: f32,
}

impl Nf4Ref<'_> {
    /// Dequantises `dst.len()` elements starting at flat element `first` (a multiple of 64).
    pub fn dequantize(&self, first: usize, dst: &mut [f32]) {
        let _ = (first, dst);
        unimplemented!("NF4 dequantisation lands with the NF4 work")
    }
}
