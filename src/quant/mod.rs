//! Quantised block formats and the CPU kernels that dequantise them on the fly.
//!
//! Layout of this folder (the data path, bottom up):
//! - `types`: [`QType`], the tensor types we read, with their ggml ids and block geometry.
//! - `blocks`: `#[repr(C)]` block structs, one per ggml type, with size asserts.
//! - `scalar`: the reference dequantisers and quantisers, one per type; every SIMD path is tested
//!   equal to these, and these are tested bit-exact against gguf-py / bitsandbytes fixtures.
//! - `simd`: AVX2+FMA, AVX-512 and NEON versions, chosen at run time by `dispatch`.
//! - `dot8`, `dot8_pack`: decode products with 8-bit activations, row by row and on Q4_0/Q4_K
//!   repacked eight rows at a time (the decode layout).
//! - `nf4`: bitsandbytes NF4 with double quantisation (its statistics live beside the blocks).
//! - `matmul`: fused quantised matmul `y = x·Wᵀ` and input-gradient `dx = dy·W`, tile by tile.
//! - `matmul_bf16`: the same products in bf16 with f32 sums (`vdpbf16ps` on AVX-512 BF16), for
//!   `--dtype bf16`; the f32 kernels where the CPU lacks it.
pub mod blocks;
pub mod dispatch;
pub mod dot8;
pub mod dot8_pack;
pub mod matmul;
pub mod matmul_bf16;
pub mod nf4;
pub mod scalar;
pub mod simd;
pub(crate) mod transpose;
pub mod types;

pub use dispatch::{dequantize_bf16, dequantize_f32, kernel_name, SimdLevel};
pub use types::QType;

/// A 2-D quantised weight `W` of shape (rows, cols), row-major, as the kernels see it.
/// `rows` is the output features of a linear layer, `cols` its input features (the quantised axis).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// Number of rows (output features).
    pub rows: usize,
    /// Number of columns (input features); blocks run along this axis.
    pub cols: usize,
    /// The stored bytes.
    pub data: QData<'a>,
}

/// The bytes behind a [`QMatrix`].
#[derive(Clone, Copy, Debug)]
pub enum QData<'a> {
    /// A ggml type (or F32/F16/BF16): `rows * cols / block_size` contiguous blocks.
    Ggml { qtype: QType, bytes: &'a [u8] },
    /// NF4 with double-quantised statistics.
    Nf4(nf4::Nf4Ref<'a>),
}

impl<'a> QMatrix<'a> {
    /// Elements per block along `cols` (1 for F32/F16/BF16).
    pub fn block_size(&self) -> usize {
        match &self.data {
            QData::Ggml { qtype, .. } => qtype.block_size(),
            QData::Nf4(_) => nf4::NF4_BLOCK,
        }
    }

    /// The tensor type.
    pub fn qtype(&self) -> QType {
        match &self.data {
            QData::Ggml { qtype, .. } => *qtype,
            QData::Nf4(_) => QType::NF4,
        }
    }

    /// Dequantises the tile `W[row0 .. row0+nrows, col0 .. col0+ncols]` into `dst` (row-major,
    /// `nrows * ncols` f32). `col0` and `ncols` must be multiples of the block size (or reach the end
    /// of the row). This is the only way kernels read weights: a tile at a time, into a reused
    /// scratch buffer, so no full-precision copy of W ever exists.
    pub fn dequant_tile(
        &self,
        row0: usize,
        nrows: usize,
        col0: usize,
        ncols: usize,
        dst: &mut [f32],
    ) {
        let bs = self.block_size();
        debug_assert!(row0 + nrows <= self.rows && col0 + ncols <= self.cols);
        debug_assert!(
            col0.is_multiple_of(bs) && (ncols.is_multiple_of(bs) || col0 + ncols == self.cols)
        );
        debug_assert!(dst.len() >= nrows * ncols);
        match &self.data {
            QData::Ggml { qtype, bytes } => {
                let ts = qtype.type_size();
                let row_bytes = self.cols / bs * ts;
                for r in 0..nrows {
                    let start = (row0 + r) * row_bytes + col0 / bs * ts;
                    let len = ncols.div_ceil(bs) * ts;
                    dequantize_f32(
                        *qtype,
                        &bytes[start..start + len],
                        &mut dst[r * ncols..(r + 1) * ncols],
                    );
                }
            }
            QData::Nf4(q) => {
                for r in 0..nrows {
                    let first = (row0 + r) * self.cols + col0;
                    q.dequantize(first, &mut dst[r * ncols..(r + 1) * ncols]);
                }
            }
        }
    }

    /// [`Self::dequant_tile`] into bf16: the same values rounded once (a ggml type through its
    /// bf16-output kernel where it has one).
    pub fn dequant_tile_bf16(
        &self,
        row0: usize,
        nrows: usize,
        col0: usize,
        ncols: usize,
        dst: &mut [half::bf16],
    ) {
        let bs = self.block_size();
        debug_assert!(row0 + nrows <= self.rows && col0 + ncols <= self.cols);
        debug_assert!(
            col0.is_multiple_of(bs) && (ncols.is_multiple_of(bs) || col0 + ncols == self.cols)
        );
        debug_assert!(dst.len() >= nrows * ncols);
        for (r, out) in dst[..nrows * ncols].chunks_exact_mut(ncols).enumerate() {
            match &self.data {
                QData::Ggml { qtype, bytes } => {
                    let ts = qtype.type_size();
                    let start = ((row0 + r) * (self.cols / bs) + col0 / bs) * ts;
                    let len = ncols.div_ceil(bs) * ts;
                    dequantize_bf16(*qtype, &bytes[start..start + len], out);
                }
                QData::Nf4(q) => q.dequantize_bf16((row0 + r) * self.cols + col0, out),
            }
        }
    }
}
