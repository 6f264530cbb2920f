//! bitsandbytes NF4 with double quantisation (QLoRA's storage format).
//!
//! A tensor is flattened and cut into blocks of 64; each block stores 32 bytes of packed 4-bit codes
//! (high nibble first) into the 16-value NormalFloat table, and one absmax. With double quant the
//! absmax values, minus their mean (`offset`), are themselves quantised to 8 bits with bitsandbytes'
//! dynamic map in blocks of 256, each with an f32 `nested_absmax`.
//!
//! Everything here is bit-exact with bitsandbytes 0.47.0 on CPU (tests/nf4.rs, fixtures from
//! tests/reference/gen_nf4_fixtures.py). The arithmetic it reproduces:
//! - block absmax `a_b = max |x|`; scaled value `s = clamp(x * (1/a_b), -1, 1)` (a reciprocal, then a
//!   product, both rounded to f32); code = argmin over the table of the f32 `|s - code[i]|`, the lower
//!   index winning ties; an all-zero block gives NaN and so code 0 (torch's argmin picks the NaN).
//! - `offset = mean(a)` summed in torch's single-thread CPU order (see [`torch_sum_f32`]).
//! - nested: per 256 values of `a - offset`, `m = max |v|`, `n = v / m` (a true division), index =
//!   the last code `<= n`, moved one right if strictly closer (bnb's C++ `quantize_block`).
//! - dequantise: `absmax_b = nested_code[q_b] * nested_absmax[b/256] + offset` (two f32 roundings, no
//!   FMA), `w = code[nibble] * absmax_b`.
use crate::{Error, Result};
use rayon::prelude::*;

/// Elements per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// Absmax values per nested (double-quant) block.
pub const NF4_NESTED_BLOCK: usize = 256;

/// The NF4 table as bitsandbytes lists it (`get_4bit_type("nf4")`: -1.0, -0.6961928009986877, ...,
/// 0.7229568362236023, 1.0), as the f32 bit patterns torch stores.
pub const NF4_CODE: [f32; 16] = {
    const BITS: [u32; 16] = [
        0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871,
        0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab,
        0x3f3913b3, 0x3f800000,
    ];
    let mut t = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = f32::from_bits(BITS[i]);
        i += 1;
    }
    t
};

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), as f32 bit patterns, with
/// entry 0 set to -1.0 as bnb's CPU quantiser does in place before it stores the map.
/// A table rather than a formula: torch's f32 `linspace` rounding is what defines these values.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf800000, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// bitsandbytes' 8-bit dynamic map (the `nested_quant_map` it writes).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

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
    /// Number of elements the packed codes hold.
    pub fn numel(&self) -> usize {
        self.packed.len() * 2
    }

    /// The f32 absmax of block `b`, computed exactly as bnb's `dequantize_blockwise` + offset does.
    #[inline]
    pub fn absmax(&self, b: usize) -> f32 {
        let scaled =
            self.nested_code[self.absmax_q[b] as usize] * self.nested_absmax[b / NF4_NESTED_BLOCK];
        scaled + self.offset
    }

    /// Dequantises `dst.len()` elements starting at flat element `first` with the best kernel for
    /// this CPU. `first` is normally a multiple of 64; any start and length inside the tensor work.
    pub fn dequantize(&self, first: usize, dst: &mut [f32]) {
        self.dequantize_at(super::dispatch::active_level(), first, dst)
    }

    /// Dequantises `dst.len()` elements starting at flat element `first` into bf16 (round to
    /// nearest even): the same values as [`Self::dequantize`] rounded once. Whole blocks go through
    /// a 16-entry bf16 table per block on AVX-512 BF16; elsewhere (and a partial block at either
    /// end) through an L1-sized f32 buffer.
    pub fn dequantize_bf16(&self, first: usize, dst: &mut [half::bf16]) {
        let level = super::dispatch::active_level();
        #[cfg(target_arch = "x86_64")]
        if level == super::SimdLevel::Avx512
            && super::matmul_bf16::has_avx512_bf16()
            && is_x86_feature_detected!("avx2")
        {
            return self.by_blocks(
                first,
                dst,
                |first, edge| self.dequantize_bf16_staged(level, first, edge),
                // SAFETY: AVX-512 F/BW/BF16 and AVX2 checked above; the kernel indexes its
                // blocks with bounds checks.
                |block0, body| unsafe { x86::blocks_bf16(self, block0, body) },
            );
        }
        self.dequantize_bf16_staged(level, first, dst)
    }

    /// [`Self::dequantize_bf16`] through the f32 kernel at `level` and an L1-sized buffer.
    pub fn dequantize_bf16_staged(
        &self,
        level: super::SimdLevel,
        first: usize,
        dst: &mut [half::bf16],
    ) {
        let cvt = super::simd::f32_to_bf16_fn(level);
        const CHUNK: usize = 1024;
        let mut buf = [0f32; CHUNK];
        for (i, out) in dst.chunks_mut(CHUNK).enumerate() {
            self.dequantize_at(level, first + i * CHUNK, &mut buf[..out.len()]);
            cvt(&buf[..out.len()], out);
        }
    }

    /// [`Self::dequantize`] with an explicit SIMD level (a level the CPU lacks falls back to scalar).
    pub fn dequantize_at(&self, level: super::SimdLevel, first: usize, dst: &mut [f32]) {
        // Scalar head up to the first block boundary, SIMD over whole blocks, scalar tail.
        self.by_blocks(
            first,
            dst,
            |first, edge| self.dequantize_scalar(first, edge),
            |block0, body| self.dequant_blocks(level, block0, body),
        )
    }

    /// `dst` (elements from flat element `first`) cut at block boundaries: `edge(first, part)`
    /// for the partial block at either end, `blocks(block0, part)` for the whole blocks between.
    fn by_blocks<T>(
        &self,
        first: usize,
        dst: &mut [T],
        mut edge: impl FnMut(usize, &mut [T]),
        blocks: impl FnOnce(usize, &mut [T]),
    ) {
        assert!(
            first + dst.len() <= self.numel(),
            "NF4 dequantize past the end of the tensor"
        );
        let head = ((NF4_BLOCK - first % NF4_BLOCK) % NF4_BLOCK).min(dst.len());
        let (h, rest) = dst.split_at_mut(head);
        edge(first, h);
        let first = first + head;
        let nfull = rest.len() / NF4_BLOCK * NF4_BLOCK;
        let (body, tail) = rest.split_at_mut(nfull);
        blocks(first / NF4_BLOCK, body);
        edge(first + nfull, tail);
    }

    /// Scalar reference: `dst[i] = code[nibble(first + i)] * absmax(block(first + i))`.
    pub fn dequantize_scalar(&self, first: usize, dst: &mut [f32]) {
        let mut cur_block = usize::MAX;
        let mut am = 0f32;
        for (i, o) in dst.iter_mut().enumerate() {
            let e = first + i;
            if e / NF4_BLOCK != cur_block {
                cur_block = e / NF4_BLOCK;
                am = self.absmax(cur_block);
            }
            let byte = self.packed[e / 2];
            let q = if e.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            };
            *o = self.code[q as usize] * am;
        }
    }

    /// Whole blocks `block0 ..` into `dst` (a multiple of 64 long) at `level`.
    fn dequant_blocks(&self, level: super::SimdLevel, block0: usize, dst: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            super::SimdLevel::Avx512
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") =>
            {
                // SAFETY: the CPU has AVX-512F/BW (checked above); slices are bounds-checked inside.
                unsafe { x86::blocks_avx512(self, block0, dst) }
            }
            #[cfg(target_arch = "x86_64")]
            super::SimdLevel::Avx2 | super::SimdLevel::Avx512
                if is_x86_feature_detected!("avx2") =>
            {
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe { x86::blocks_avx2(self, block0, dst) }
            }
            #[cfg(target_arch = "aarch64")]
            super::SimdLevel::Neon => neon::blocks_neon(self, block0, dst),
            _ => self.dequantize_scalar(block0 * NF4_BLOCK, dst),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Nf4Ref, NF4_BLOCK};
    use std::arch::x86_64::*;

    /// 16 packed bytes -> 32 nibble indices in element order (high nibble first), as 32 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nibbles(bytes: __m128i) -> (__m128i, __m128i) {
        let mask = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
        let lo = _mm_and_si128(bytes, mask);
        (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo))
    }

    /// Calls `emit(codes, absmax, out)` for each 16 elements of the blocks from `block0` that
    /// `dst` holds: their 16 code indices as bytes in element order, their block's absmax and
    /// their 16 outputs. Inlined into each kernel, so `emit` compiles with its features.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn each16(
        q: &Nf4Ref<'_>,
        block0: usize,
        dst: &mut [f32],
        mut emit: impl FnMut(__m128i, f32, &mut [f32]),
    ) {
        for (bi, out) in dst.chunks_exact_mut(NF4_BLOCK).enumerate() {
            let b = block0 + bi;
            let am = q.absmax(b);
            let src = &q.packed[b * 32..b * 32 + 32];
            for half in 0..2 {
                let bytes = _mm_loadu_si128(src[half * 16..].as_ptr() as *const __m128i);
                let (n0, n1) = nibbles(bytes);
                for (k, n) in [n0, n1].into_iter().enumerate() {
                    let o = half * 32 + k * 16;
                    emit(n, am, &mut out[o..o + 16]);
                }
            }
        }
    }

    /// AVX2: 8 lanes per step; the 16-entry table is two 8-lane permutes and a blend on bit 3.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn blocks_avx2(q: &Nf4Ref<'_>, block0: usize, dst: &mut [f32]) {
        let t_lo = _mm256_loadu_ps(q.code[..8].as_ptr());
        let t_hi = _mm256_loadu_ps(q.code[8..].as_ptr());
        each16(q, block0, dst, |n, am, out| {
            let am = _mm256_set1_ps(am);
            for (j, out) in out.chunks_exact_mut(8).enumerate() {
                let part = if j == 0 { n } else { _mm_srli_si128::<8>(n) };
                let idx = _mm256_cvtepu8_epi32(part);
                let lo = _mm256_permutevar8x32_ps(t_lo, idx);
                let hi = _mm256_permutevar8x32_ps(t_hi, idx);
                let sel = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
                let v = _mm256_mul_ps(_mm256_blendv_ps(lo, hi, sel), am);
                _mm256_storeu_ps(out.as_mut_ptr(), v);
            }
        })
    }

    /// Whole blocks from `block0` into bf16 (`dst` a multiple of 64 long): per block the sixteen
    /// values `code[c] · absmax` computed as the f32 kernels compute each, rounded once by
    /// `vcvtneps2bf16`, then looked up by `vpermw`, 32 codes at a time. `vcvtneps2bf16` reads f32
    /// subnormals as zero, so a block whose absmax makes any product subnormal (|absmax| under
    /// 2^-122, not zero: no real checkpoint has one) takes the scalar rounding instead.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16 and AVX2.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2")]
    pub(super) unsafe fn blocks_bf16(q: &Nf4Ref<'_>, block0: usize, dst: &mut [half::bf16]) {
        // the smallest non-zero |code| is 0.0796 > 2^-4: products of |absmax| >= 2^-122 are normal
        const TINY: f32 = 1.0 / (1u128 << 122) as f32;
        let code = _mm512_loadu_ps(q.code.as_ptr());
        for (bi, out) in dst.chunks_exact_mut(NF4_BLOCK).enumerate() {
            let b = block0 + bi;
            let am = q.absmax(b);
            let src = &q.packed[b * 32..b * 32 + 32];
            if am != 0.0 && am.abs() < TINY {
                for (i, o) in out.iter_mut().enumerate() {
                    let n = (src[i / 2] >> (4 * (1 - i % 2))) & 0x0f;
                    *o = half::bf16::from_f32(q.code[n as usize] * am);
                }
                continue;
            }
            let t = _mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(am)));
            let table = _mm512_castsi256_si512(std::mem::transmute::<__m256bh, __m256i>(t));
            for half in 0..2 {
                let bytes = _mm_loadu_si128(src[half * 16..].as_ptr() as *const __m128i);
                let (n0, n1) = nibbles(bytes);
                let idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(n1, n0));
                let o = out[half * 32..half * 32 + 32].as_mut_ptr();
                _mm512_storeu_si512(o as *mut _, _mm512_permutexvar_epi16(idx, table));
            }
        }
    }

    /// AVX-512: one 16-entry permute per 16 elements.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn blocks_avx512(q: &Nf4Ref<'_>, block0: usize, dst: &mut [f32]) {
        let table = _mm512_loadu_ps(q.code.as_ptr());
        each16(q, block0, dst, |n, am, out| {
            let idx = _mm512_cvtepu8_epi32(n);
            let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(am));
            _mm512_storeu_ps(out.as_mut_ptr(), v);
        })
    }
}

/// NEON (aarch64): unverified here (no aarch64 machine); same arithmetic as the scalar path.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Nf4Ref, NF4_BLOCK};
    use std::arch::aarch64::*;

    pub(super) fn blocks_neon(q: &Nf4Ref<'_>, block0: usize, dst: &mut [f32]) {
        for (bi, out) in dst.chunks_exact_mut(NF4_BLOCK).enumerate() {
            let b = block0 + bi;
            let am = q.absmax(b);
            let src = &q.packed[b * 32..b * 32 + 32];
            for (j, pair) in out.chunks_exact_mut(8).enumerate() {
                let mut vals = [0f32; 8];
                for (t, v) in vals.iter_mut().enumerate() {
                    let byte = src[j * 4 + t / 2];
                    let n = if t % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                    *v = q.code[n as usize];
                }
                // SAFETY: NEON is mandatory on aarch64; the pointers cover 8 floats each.
                unsafe {
                    let a = vmulq_n_f32(vld1q_f32(vals.as_ptr()), am);
                    let c = vmulq_n_f32(vld1q_f32(vals.as_ptr().add(4)), am);
                    vst1q_f32(pair.as_mut_ptr(), a);
                    vst1q_f32(pair.as_mut_ptr().add(4), c);
                }
            }
        }
    }
}

/// An owned NF4 tensor with double-quantised statistics (what [`quantize_nf4`] returns).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Owned {
    /// Packed codes, high nibble first (`numel / 2` bytes).
    pub packed: Vec<u8>,
    /// 8-bit absmax codes, one per block of 64.
    pub absmax_q: Vec<u8>,
    /// f32 scale per 256 absmax codes.
    pub nested_absmax: Vec<f32>,
    /// The dynamic map the absmax codes index.
    pub nested_code: Box<[f32; 256]>,
    /// The NF4 table.
    pub code: Box<[f32; 16]>,
    /// Mean removed from the absmax values before quantising them.
    pub offset: f32,
}

impl Nf4Owned {
    /// A borrowed view for the kernels.
    pub fn as_ref(&self) -> Nf4Ref<'_> {
        Nf4Ref {
            packed: &self.packed,
            absmax_q: &self.absmax_q,
            nested_absmax: &self.nested_absmax,
            nested_code: &self.nested_code,
            code: &self.code,
            offset: self.offset,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.packed.len() * 2
    }
}

/// Blocks per rayon task: big enough to amortise scheduling, small enough to balance 2+ cores.
const PAR_BLOCKS: usize = 1024;

/// Quantises `src` (numel a multiple of 64, all finite) to NF4 with double quant, bit-exact with
/// `bitsandbytes.functional.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")`.
pub fn quantize_nf4(src: &[f32]) -> Result<Nf4Owned> {
    if !src.len().is_multiple_of(NF4_BLOCK) {
        return Err(Error::Invalid(format!(
            "NF4 needs a number of elements that is a multiple of {NF4_BLOCK}, got {}",
            src.len()
        )));
    }
    if let Some(i) = src.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "cannot quantise to NF4: element {i} is {}",
            src[i]
        )));
    }
    let nblocks = src.len() / NF4_BLOCK;
    let mut packed = vec![0u8; src.len() / 2];
    let mut absmax = vec![0f32; nblocks];
    let task = PAR_BLOCKS * NF4_BLOCK;
    src.par_chunks(task)
        .zip(packed.par_chunks_mut(task / 2))
        .zip(absmax.par_chunks_mut(PAR_BLOCKS))
        .for_each(|((x, p), a)| {
            for ((xb, pb), ab) in x
                .chunks_exact(NF4_BLOCK)
                .zip(p.chunks_exact_mut(NF4_BLOCK / 2))
                .zip(a)
            {
                *ab = quantize_block_nf4(xb, pb);
            }
        });
    // Double quant: the absmax values minus their mean, 8-bit in blocks of 256.
    let offset = torch_sum_f32(&absmax) / nblocks as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let code = dynamic_map();
    let (absmax_q, nested_absmax) = quantize_blockwise_dynamic(&centred, NF4_NESTED_BLOCK, &code);
    Ok(Nf4Owned {
        packed,
        absmax_q,
        nested_absmax,
        nested_code: Box::new(code),
        code: Box::new(NF4_CODE),
        offset,
    })
}

/// One block of 64: writes 32 packed bytes and returns the block's absmax.
fn quantize_block_nf4(x: &[f32], out: &mut [u8]) -> f32 {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    // torch: `x * (1 / absmax)`, clamped; 0 * inf = NaN for an all-zero block.
    let r = 1.0f32 / absmax;
    let idx = |v: f32| -> u8 { nf4_index((v * r).clamp(-1.0, 1.0)) };
    for (o, pair) in out.iter_mut().zip(x.chunks_exact(2)) {
        *o = (idx(pair[0]) << 4) | idx(pair[1]);
    }
    absmax
}

/// argmin_i f32(|s - NF4_CODE[i]|), first index on ties; NaN -> 0 (torch's argmin returns the NaN).
#[inline]
fn nf4_index(s: f32) -> u8 {
    if s.is_nan() {
        return 0;
    }
    // The minimum is at one of the two codes around s: distances grow (and f32 rounding is
    // monotonic) away from them, and neighbouring codes are > 0.07 apart, far above an ulp.
    // Count of codes after the first that are <= s: branch-free, and s >= -1 = NF4_CODE[0].
    let lo = NF4_CODE[1..]
        .iter()
        .map(|&c| (c <= s) as usize)
        .sum::<usize>();
    if lo == 15 {
        return 15;
    }
    let d_lo = (s - NF4_CODE[lo]).abs();
    let d_hi = (s - NF4_CODE[lo + 1]).abs();
    if d_hi < d_lo {
        lo as u8 + 1
    } else {
        lo as u8
    }
}

/// bitsandbytes' 8-bit blockwise quantiser on CPU (`quantize_blockwise`, its C++ `quantize_block`):
/// per block `m = max |v|`; index of `v / m` = the last code `<= v / m`, moved right when the right
/// neighbour is strictly closer. Returns (codes, per-block absmax). `code` must be increasing with
/// `code[0] <= -1` and `code[255] >= 1`. A block of zeros (bnb divides 0/0 there) codes to 0.0.
pub fn quantize_blockwise_dynamic(
    src: &[f32],
    blocksize: usize,
    code: &[f32; 256],
) -> (Vec<u8>, Vec<f32>) {
    let zero_idx = code.iter().position(|&c| c == 0.0).unwrap_or(0) as u8;
    let mut q = vec![0u8; src.len()];
    let mut absmax = vec![0f32; src.len().div_ceil(blocksize)];
    q.par_chunks_mut(blocksize)
        .zip(src.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((qb, xb), am)| {
            let m = xb.iter().fold(-f32::MAX, |m, v| m.max(v.abs()));
            *am = m;
            for (o, &v) in qb.iter_mut().zip(xb) {
                let n = v / m;
                *o = if n.is_nan() {
                    zero_idx
                } else {
                    // Last index with code[i] <= n (code[0] <= -1 <= n).
                    let mut idx = code.partition_point(|&c| c <= n).saturating_sub(1);
                    if idx < 255 {
                        let dl = (n - code[idx]).abs();
                        let dr = (n - code[idx + 1]).abs();
                        if dr < dl {
                            idx += 1;
                        }
                    }
                    idx as u8
                };
            }
        });
    (q, absmax)
}

/// Sum of `x` in f32 in the order torch 2.5's CPU `sum` uses with one thread on x86-64 (its AVX2
/// kernel, which AVX-512 CPUs run too): 8-lane vectors, 4 interleaved accumulators, a 4-level
/// cascade flushing every 16 steps, then the scalar tail and the 8 lanes in order. bnb's
/// double-quant offset is `absmax.mean()` = this sum / n, so matching it makes the offset exact.
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const L: usize = 8;
    if x.len() < L {
        // torch's scalar path: the same cascade with scalars.
        let s = row_sum(x.len(), |i| [x[i]]);
        return s[0];
    }
    let nvec = x.len() / L;
    let lanes = row_sum(nvec, |i| {
        let mut v = [0f32; L];
        v.copy_from_slice(&x[i * L..(i + 1) * L]);
        v
    });
    let mut acc = 0f32;
    for &v in &x[nvec * L..] {
        acc += v;
    }
    for v in lanes {
        acc += v;
    }
    acc
}

/// torch's `row_sum`: `size` items of `W` lanes, in rows of 4 accumulated by `multi_row_sum`.
fn row_sum<const W: usize>(size: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut p = multi_row_sum::<W>(rows, |i, k| load(i * ILP + k));
    for i in rows * ILP..size {
        add(&mut p[0], &load(i));
    }
    let (first, rest) = p.split_at_mut(1);
    for r in rest.iter() {
        add(&mut first[0], r);
    }
    p[0]
}

fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// torch's `multi_row_sum` with 4 rows and 4 cascade levels.
fn multi_row_sum<const W: usize>(
    size: usize,
    load: impl Fn(usize, usize) -> [f32; W],
) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 {
        1
    } else {
        (usize::BITS - (size - 1).leading_zeros()) as usize
    };
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; 4]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, here) = acc.split_at_mut(j);
            for (hi, lo) in here[0].iter_mut().zip(below[j - 1].iter_mut()) {
                add(hi, lo);
                *lo = [0f32; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &load(i, k));
        }
        i += 1;
    }
    let (first, upper) = acc.split_at_mut(1);
    for level in upper.iter() {
        for (a, u) in first[0].iter_mut().zip(level) {
            add(a, u);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input() {
        assert!(quantize_nf4(&[0.0; 63]).is_err());
        let mut x = vec![0.5f32; 64];
        x[3] = f32::NAN;
        assert!(quantize_nf4(&x).is_err());
    }

    #[test]
    fn tables_are_sorted() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        let d = dynamic_map();
        assert!(d.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((d[0], d[127], d[255]), (-1.0, 0.0, 1.0));
    }

    #[test]
    fn every_level_equals_scalar() {
        // 3 nested blocks plus a partial one; odd starts and lengths too.
        let n = 64 * (3 * 256 + 17);
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 2654435761usize) % 1000003) as f32 / 1000003.0 - 0.5)
            .collect();
        let q = quantize_nf4(&x).unwrap();
        let r = q.as_ref();
        let mut want = vec![0f32; n];
        r.dequantize_scalar(0, &mut want);
        for level in super::super::SimdLevel::available() {
            for (first, len) in [
                (0, n),
                (64, 64 * 5),
                (7, 64 * 3 + 5),
                (n - 100, 100),
                (0, 1),
            ] {
                let mut got = vec![0f32; len];
                r.dequantize_at(level, first, &mut got);
                let same = got
                    .iter()
                    .zip(&want[first..first + len])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "level {level:?} first {first} len {len}");
            }
        }
    }
}
