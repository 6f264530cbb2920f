//! The decode layout: Q4_0 and Q4_K weights repacked once (at `--int8` decode time) so that eight
//! rows are interleaved, and one broadcast activation load feeds all eight rows of a
//! `vpdpbusd`, with their eight scales converted by one `vcvtph2ps`.
//!
//! Why: the row-at-a-time product of [`super::dot8`] spends ~14 instructions per 32-weight block
//! (a scalar f16 scale, a lane insert, a horizontal sum per row) and streamed the weights at about
//! 60 % of what llama.cpp reaches on the same file, which repacks the same way at load. Here a
//! block of eight rows costs about 40 instructions: five per row-block; where AVX-512 is whole,
//! two adjacent groups share each 512-bit instruction (`vnni::pair_q4_0`). The kernels prefetch
//! their stream ([`super::simd::PREFETCH_AHEAD`]).
//!
//! Layouts, per group of [`ROWS`] rows (a last, partial group is padded with zero rows):
//! - Q4_0, per 32-column block `i` (144 bytes, as eight 18-byte blocks): 8 f16 scales (row r at
//!   `2r`), then for chunk `c` in 0..4 and row `r`: the row's nibble bytes `4c..4c+4` at
//!   `16 + 32c + 4r`. Low nibbles are columns `4c..4c+4`, high nibbles `16+4c..`.
//! - Q4_K, per 256-column super-block (1,184 bytes, eight 144-byte super-blocks plus 32): 8 f16
//!   `d` at 0, 8 f16 `dmin` at 16, the 6-bit sub-block scales decoded to bytes at `32 + 8j + r`
//!   and mins at `96 + 8j + r` (sub-block `j` in 0..8), then for chunk `c` in 0..4, group `g` in
//!   0..8 and row `r`: nibble bytes `32c+4g..+4` at `160 + 256c + 32g + 4r` (low nibbles are
//!   sub-block `2c`, high ones `2c+1`, as in the stored block).
//!
//! The bytes are the same bits as the file's, moved: a packed matrix replaces reading the file's
//! pages (the caller releases them), so the resident model grows by the decoded Q4_K scales only
//! (+2.8 %), not by a second copy. Every kernel has [`group_ref`] beside it.
use super::dot8::{quantize_activations, Q8Act};
use super::{QData, QMatrix, QType};
use half::f16;
use rayon::prelude::*;

/// Rows interleaved in one group.
pub const ROWS: usize = 8;
const Q4_BYTES: usize = 18;
const Q4K_BYTES: usize = 144;
const Q4_0X8: usize = ROWS * Q4_BYTES;
const Q4KX8: usize = ROWS * Q4K_BYTES + 32;
/// Activation rows one kernel call takes (the prompt's rows share each unpacked weight block).
#[cfg(target_arch = "x86_64")]
const MAX_ACT: usize = 4;

/// A weight matrix in the decode layout.
pub struct Packed {
    /// Q4_0 or Q4_K.
    pub qtype: QType,
    /// Rows of the original matrix (the last group may hold padding rows).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The groups, `rows.div_ceil(8)` of them, each [`Packed::group_bytes`] long.
    pub bytes: Vec<u8>,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl Packed {
    /// Whether `w` can be packed: Q4_0 rows of whole 32-blocks, Q4_K rows of whole 256-blocks.
    pub fn supported(w: &QMatrix) -> bool {
        match w.data {
            QData::Ggml {
                qtype: QType::Q4_0, ..
            } => w.cols.is_multiple_of(32),
            QData::Ggml {
                qtype: QType::Q4_K, ..
            } => w.cols.is_multiple_of(256),
            _ => false,
        }
    }

    /// `w` in the decode layout (None where [`Self::supported`] is false).
    pub fn new(w: &QMatrix) -> Option<Packed> {
        let QData::Ggml { qtype, bytes } = w.data else {
            return None;
        };
        if !Self::supported(w) {
            return None;
        }
        let (rows, cols) = (w.rows, w.cols);
        let row_bytes = cols / qtype.block_size() * qtype.type_size();
        assert_eq!(bytes.len(), rows * row_bytes, "pack: {rows}×{cols} size");
        let mut p = Packed {
            qtype,
            rows,
            cols,
            bytes: Vec::new(),
        };
        let gb = p.group_bytes();
        p.bytes = vec![0u8; rows.div_ceil(ROWS) * gb];
        p.bytes
            .par_chunks_mut(gb)
            .enumerate()
            .for_each(|(gi, out)| {
                let r0 = gi * ROWS;
                let n = ROWS.min(rows - r0);
                let src = &bytes[r0 * row_bytes..(r0 + n) * row_bytes];
                match qtype {
                    QType::Q4_0 => pack_q4_0(src, row_bytes, n, out),
                    _ => pack_q4_k(src, row_bytes, n, out),
                }
            });
        Some(p)
    }

    /// Bytes of one group of eight rows.
    pub fn group_bytes(&self) -> usize {
        match self.qtype {
            QType::Q4_0 => self.cols / 32 * Q4_0X8,
            _ => self.cols / 256 * Q4KX8,
        }
    }
}

/// `n` rows of Q4_0 blocks (`row_bytes` each) into one group.
fn pack_q4_0(src: &[u8], row_bytes: usize, n: usize, out: &mut [u8]) {
    for (i, o) in out.chunks_exact_mut(Q4_0X8).enumerate() {
        for r in 0..n {
            let b = &src[r * row_bytes + i * Q4_BYTES..][..Q4_BYTES];
            o[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
            for c in 0..4 {
                let at = 16 + 32 * c + 4 * r;
                o[at..at + 4].copy_from_slice(&b[2 + 4 * c..2 + 4 * c + 4]);
            }
        }
    }
}

/// `n` rows of Q4_K super-blocks into one group.
fn pack_q4_k(src: &[u8], row_bytes: usize, n: usize, out: &mut [u8]) {
    for (i, o) in out.chunks_exact_mut(Q4KX8).enumerate() {
        for r in 0..n {
            let b = &src[r * row_bytes + i * Q4K_BYTES..][..Q4K_BYTES];
            o[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
            o[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
            let s: &[u8; 12] = b[4..16].try_into().expect("12 scale bytes");
            for j in 0..8 {
                let (sc, m) = super::blocks::scale_min_k4(j, s);
                o[32 + 8 * j + r] = sc;
                o[96 + 8 * j + r] = m;
            }
            for c in 0..4 {
                for g in 0..8 {
                    let at = 160 + 256 * c + 32 * g + 4 * r;
                    let from = 16 + 32 * c + 4 * g;
                    o[at..at + 4].copy_from_slice(&b[from..from + 4]);
                }
            }
        }
    }
}

/// The groups' eight dot products with each activation row: `out[j·m + a][r] = Σ w_r · x_a` for
/// group `j` of `g` (scalar reference, the same sums as ggml's `ggml_vec_dot_q4_0_q8_0` and our
/// [`super::dot8::dot_q4_k_q8_0_ref`], read from the packed layout).
pub fn group_ref(qtype: QType, g: &[u8], xs: &[&Q8Act], out: &mut [[f32; ROWS]]) {
    let gb = g.len() / (out.len() / xs.len());
    for (g, out) in g.chunks_exact(gb).zip(out.chunks_exact_mut(xs.len())) {
        group_ref1(qtype, g, xs, out);
    }
}

/// One group's products (see [`group_ref`]).
fn group_ref1(qtype: QType, g: &[u8], xs: &[&Q8Act], out: &mut [[f32; ROWS]]) {
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        *o = [0.0; ROWS];
        let xb = |xi: usize, e: usize| x.bytes[xi * 34 + 2 + e] as i8 as i32;
        match qtype {
            QType::Q4_0 => {
                for (i, blk) in g.chunks_exact(Q4_0X8).enumerate() {
                    for (r, acc) in o.iter_mut().enumerate() {
                        let mut sumi = 0i32;
                        for c in 0..4 {
                            for e in 0..4 {
                                let q = blk[16 + 32 * c + 4 * r + e];
                                sumi += ((q & 0x0F) as i32 - 8) * xb(i, 4 * c + e)
                                    + ((q >> 4) as i32 - 8) * xb(i, 16 + 4 * c + e);
                            }
                        }
                        *acc += sumi as f32 * (f16_at(blk, 2 * r) * x.scales[i]);
                    }
                }
            }
            _ => {
                for (bi, blk) in g.chunks_exact(Q4KX8).enumerate() {
                    for (r, acc) in o.iter_mut().enumerate() {
                        let (d, dmin) = (f16_at(blk, 2 * r), f16_at(blk, 16 + 2 * r));
                        for j in 0..8 {
                            let (c, shift) = (j / 2, 4 * (j % 2));
                            let xi = bi * 8 + j;
                            let mut isum = 0i32;
                            for gg in 0..8 {
                                for e in 0..4 {
                                    let q = blk[160 + 256 * c + 32 * gg + 4 * r + e];
                                    isum += ((q >> shift) & 0x0F) as i32 * xb(xi, 4 * gg + e);
                                }
                            }
                            let dsc = d * blk[32 + 8 * j + r] as f32;
                            let dm = dmin * blk[96 + 8 * j + r] as f32;
                            let xsum = -x.neg8sum[xi] / 8;
                            *acc += x.scales[xi] * (dsc * isum as f32 - dm * xsum as f32);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Q8Act, Q4KX8, Q4_0X8, ROWS};
    use crate::quant::simd::prefetch_ahead as prefetch;
    use std::arch::x86_64::*;

    /// Each activation row's accumulator as its eight rows' sums.
    #[inline(always)]
    fn sums8<const A: usize>(acc: [__m256; A]) -> [[f32; ROWS]; A] {
        // SAFETY: a __m256 is eight f32 lanes in order, as [f32; 8] (same size; any bits valid).
        acc.map(|v| unsafe { std::mem::transmute::<__m256, [f32; ROWS]>(v) })
    }

    /// Each activation row's accumulator as the sixteen rows' sums of a group pair.
    #[inline(always)]
    fn sums16<const A: usize>(acc: [__m512; A]) -> [[f32; 2 * ROWS]; A] {
        // SAFETY: a __m512 is sixteen f32 lanes in order, as [f32; 16] (same size; any bits valid).
        acc.map(|v| unsafe { std::mem::transmute::<__m512, [f32; 2 * ROWS]>(v) })
    }

    /// The activation bytes `at..at+4` of a Q8_0 block as one dword in every lane.
    #[inline(always)]
    unsafe fn bcast(xp: *const u8, at: usize) -> __m256i {
        _mm256_set1_epi32((xp.add(at) as *const i32).read_unaligned())
    }

    /// Eight f16 at `p0` and eight at `p1` (two groups' scales) as sixteen f32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    unsafe fn f16x16(p0: *const u8, p1: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(p0 as *const __m128i)),
            _mm_loadu_si128(p1 as *const __m128i),
        ))
    }

    /// Eight bytes at `p` as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bytes8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// Q4_0 group · `A` activation rows: per block, four 32-byte loads give the eight rows' 32
    /// nibbles; each `vpdpbusd` takes four columns of all eight rows against one broadcast dword.
    /// The nibble offset enters as `-8·Σx_q` in the sums' start value.
    ///
    /// # Safety
    /// AVX-512 VNNI+VL, AVX2, FMA, F16C; `g` holds `xs[a].scales.len()` blocks of 144 bytes, and
    /// every `xs[a]` as many Q8_0 blocks.
    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
    pub unsafe fn group_q4_0<const A: usize>(g: &[u8], xs: &[&Q8Act; A]) -> [[f32; ROWS]; A] {
        let nb = g.len() / Q4_0X8;
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); A];
        for i in 0..nb {
            let b = g.as_ptr().add(i * Q4_0X8);
            prefetch(b, Q4_0X8);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i));
            let mut s0 = [_mm256_setzero_si256(); A];
            let mut s1 = [_mm256_setzero_si256(); A];
            for a in 0..A {
                s0[a] = _mm256_set1_epi32(*xs[a].neg8sum.get_unchecked(i));
            }
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                for a in 0..A {
                    let xp = xs[a].bytes.as_ptr().add(i * 34 + 2);
                    s0[a] = _mm256_dpbusd_epi32(s0[a], lo, bcast(xp, 4 * c));
                    s1[a] = _mm256_dpbusd_epi32(s1[a], hi, bcast(xp, 16 + 4 * c));
                }
            }
            for a in 0..A {
                let f = _mm256_cvtepi32_ps(_mm256_add_epi32(s0[a], s1[a]));
                let sc = _mm256_mul_ps(d, _mm256_set1_ps(*xs[a].scales.get_unchecked(i)));
                acc[a] = _mm256_fmadd_ps(f, sc, acc[a]);
            }
        }
        sums8(acc)
    }

    /// Two adjacent Q4_0 groups (`gb` bytes apart) · `A` activation rows in 512-bit registers:
    /// lanes 0..8 are the first group's rows, 8..16 the second's, so one broadcast activation
    /// dword and one `vpdpbusd` serve sixteen rows (half the instructions of two
    /// [`group_q4_0`] calls where 512-bit operations run at full rate).
    ///
    /// # Safety
    /// AVX-512 F+BW+VNNI, AVX2, F16C; `g` holds two groups of `gb` bytes, each
    /// `xs[a].scales.len()` blocks of 144 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn pair_q4_0<const A: usize>(
        g: &[u8],
        gb: usize,
        xs: &[&Q8Act; A],
    ) -> [[f32; 2 * ROWS]; A] {
        let nb = gb / Q4_0X8;
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); A];
        for i in 0..nb {
            let b0 = g.as_ptr().add(i * Q4_0X8);
            let b1 = b0.add(gb);
            prefetch(b0, Q4_0X8);
            prefetch(b1, Q4_0X8);
            let d = f16x16(b0, b1);
            let mut s0 = [_mm512_setzero_si512(); A];
            let mut s1 = [_mm512_setzero_si512(); A];
            for a in 0..A {
                s0[a] = _mm512_set1_epi32(*xs[a].neg8sum.get_unchecked(i));
            }
            for c in 0..4 {
                let q = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(
                        b0.add(16 + 32 * c) as *const __m256i
                    )),
                    _mm256_loadu_si256(b1.add(16 + 32 * c) as *const __m256i),
                );
                let lo = _mm512_and_si512(q, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                for a in 0..A {
                    let xp = xs[a].bytes.as_ptr().add(i * 34 + 2);
                    let x0 = (xp.add(4 * c) as *const i32).read_unaligned();
                    let x1 = (xp.add(16 + 4 * c) as *const i32).read_unaligned();
                    s0[a] = _mm512_dpbusd_epi32(s0[a], lo, _mm512_set1_epi32(x0));
                    s1[a] = _mm512_dpbusd_epi32(s1[a], hi, _mm512_set1_epi32(x1));
                }
            }
            for a in 0..A {
                let f = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[a], s1[a]));
                let sc = _mm512_mul_ps(d, _mm512_set1_ps(*xs[a].scales.get_unchecked(i)));
                acc[a] = _mm512_fmadd_ps(f, sc, acc[a]);
            }
        }
        sums16(acc)
    }

    /// Q4_K group · `A` activation rows: per chunk, eight 32-byte loads give two sub-blocks of
    /// all eight rows (low and high nibbles); the decoded scales and mins are eight bytes a
    /// sub-block; `d` and `dmin` apply once a super-block.
    ///
    /// # Safety
    /// As [`group_q4_0`]; `g` holds `xs[a].scales.len() / 8` super-blocks of 1,184 bytes.
    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
    pub unsafe fn group_q4_k<const A: usize>(g: &[u8], xs: &[&Q8Act; A]) -> [[f32; ROWS]; A] {
        let nsb = g.len() / Q4KX8;
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); A];
        for sb in 0..nsb {
            let b = g.as_ptr().add(sb * Q4KX8);
            prefetch(b, Q4KX8);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(b.add(16) as *const __m128i));
            let mut accd = [_mm256_setzero_ps(); A];
            let mut accm = [_mm256_setzero_ps(); A];
            for c in 0..4 {
                let (j0, j1) = (2 * c, 2 * c + 1);
                let mut s0 = [_mm256_setzero_si256(); A];
                let mut s1 = [_mm256_setzero_si256(); A];
                for gg in 0..8 {
                    let q = _mm256_loadu_si256(b.add(160 + 256 * c + 32 * gg) as *const __m256i);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    for a in 0..A {
                        let xp = xs[a].bytes.as_ptr();
                        let (x0, x1) = ((sb * 8 + j0) * 34 + 2, (sb * 8 + j1) * 34 + 2);
                        s0[a] = _mm256_dpbusd_epi32(s0[a], lo, bcast(xp, x0 + 4 * gg));
                        s1[a] = _mm256_dpbusd_epi32(s1[a], hi, bcast(xp, x1 + 4 * gg));
                    }
                }
                for (j, s) in [(j0, &s0), (j1, &s1)] {
                    let sc = bytes8(b.add(32 + 8 * j));
                    let mn = bytes8(b.add(96 + 8 * j));
                    for a in 0..A {
                        let xi = sb * 8 + j;
                        let dx = *xs[a].scales.get_unchecked(xi);
                        let xsum = (-*xs[a].neg8sum.get_unchecked(xi) / 8) as f32;
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s[a]), sc);
                        accd[a] = _mm256_fmadd_ps(t, _mm256_set1_ps(dx), accd[a]);
                        accm[a] = _mm256_fmadd_ps(mn, _mm256_set1_ps(dx * xsum), accm[a]);
                    }
                }
            }
            for a in 0..A {
                acc[a] = _mm256_fmadd_ps(accd[a], d, acc[a]);
                acc[a] = _mm256_fnmadd_ps(accm[a], dmin, acc[a]);
            }
        }
        sums8(acc)
    }
    /// Two adjacent Q4_K groups (`gb` bytes apart) · `A` activation rows in 512-bit registers,
    /// lanes 0..8 the first group's rows and 8..16 the second's, as [`pair_q4_0`].
    ///
    /// # Safety
    /// AVX-512 F+BW+VNNI, AVX2, F16C; `g` holds two groups of `gb` bytes, each
    /// `xs[a].scales.len() / 8` super-blocks of 1,184 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn pair_q4_k<const A: usize>(
        g: &[u8],
        gb: usize,
        xs: &[&Q8Act; A],
    ) -> [[f32; 2 * ROWS]; A] {
        let nsb = gb / Q4KX8;
        let m4 = _mm512_set1_epi8(0x0F);
        // Eight bytes of each group as sixteen f32 lanes.
        let bytes16 = |p0: *const u8, p1: *const u8| {
            let lo = _mm_loadl_epi64(p0 as *const __m128i);
            let both = _mm_unpacklo_epi64(lo, _mm_loadl_epi64(p1 as *const __m128i));
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both))
        };
        let mut acc = [_mm512_setzero_ps(); A];
        for sb in 0..nsb {
            let b0 = g.as_ptr().add(sb * Q4KX8);
            let b1 = b0.add(gb);
            prefetch(b0, Q4KX8);
            prefetch(b1, Q4KX8);
            let d = f16x16(b0, b1);
            let dmin = f16x16(b0.add(16), b1.add(16));
            let mut accd = [_mm512_setzero_ps(); A];
            let mut accm = [_mm512_setzero_ps(); A];
            for c in 0..4 {
                let (j0, j1) = (2 * c, 2 * c + 1);
                let mut s0 = [_mm512_setzero_si512(); A];
                let mut s1 = [_mm512_setzero_si512(); A];
                for gg in 0..8 {
                    let at = 160 + 256 * c + 32 * gg;
                    let q = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(at) as *const __m256i)),
                        _mm256_loadu_si256(b1.add(at) as *const __m256i),
                    );
                    let lo = _mm512_and_si512(q, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                    for a in 0..A {
                        let xp = xs[a].bytes.as_ptr();
                        let (x0, x1) = ((sb * 8 + j0) * 34 + 2, (sb * 8 + j1) * 34 + 2);
                        let w0 = (xp.add(x0 + 4 * gg) as *const i32).read_unaligned();
                        let w1 = (xp.add(x1 + 4 * gg) as *const i32).read_unaligned();
                        s0[a] = _mm512_dpbusd_epi32(s0[a], lo, _mm512_set1_epi32(w0));
                        s1[a] = _mm512_dpbusd_epi32(s1[a], hi, _mm512_set1_epi32(w1));
                    }
                }
                for (j, s) in [(j0, &s0), (j1, &s1)] {
                    let sc = bytes16(b0.add(32 + 8 * j), b1.add(32 + 8 * j));
                    let mn = bytes16(b0.add(96 + 8 * j), b1.add(96 + 8 * j));
                    for a in 0..A {
                        let xi = sb * 8 + j;
                        let dx = *xs[a].scales.get_unchecked(xi);
                        let xsum = (-*xs[a].neg8sum.get_unchecked(xi) / 8) as f32;
                        let t = _mm512_mul_ps(_mm512_cvtepi32_ps(s[a]), sc);
                        accd[a] = _mm512_fmadd_ps(t, _mm512_set1_ps(dx), accd[a]);
                        accm[a] = _mm512_fmadd_ps(mn, _mm512_set1_ps(dx * xsum), accm[a]);
                    }
                }
            }
            for a in 0..A {
                acc[a] = _mm512_fmadd_ps(accd[a], d, acc[a]);
                acc[a] = _mm512_fnmadd_ps(accm[a], dmin, acc[a]);
            }
        }
        sums16(acc)
    }
}

/// The products of whole groups with activation rows: `g` holds `out.len() / xs.len()` groups,
/// `out[j·m + a]` is group `j`'s eight sums with row `a` (`m = xs.len()`).
pub type GroupFn = fn(QType, &[u8], &[&Q8Act], &mut [[f32; ROWS]]);

/// Blocks each activation row must have for groups of `gb` bytes (the kernels index by them).
#[cfg(target_arch = "x86_64")]
fn check_acts(qtype: QType, gb: usize, xs: &[&Q8Act]) {
    let blocks = match qtype {
        QType::Q4_0 => gb / Q4_0X8,
        _ => gb / Q4KX8 * 8,
    };
    assert!(xs
        .iter()
        .all(|x| x.scales.len() == blocks && x.bytes.len() == blocks * 34));
}

/// [`GroupFn`] over `vnni::group_q4_0` / `group_q4_k`: a group at a time, up to [`MAX_ACT`]
/// activation rows a call.
#[cfg(target_arch = "x86_64")]
fn group_vnni(qtype: QType, g: &[u8], xs: &[&Q8Act], out: &mut [[f32; ROWS]]) {
    let m = xs.len();
    let gb = g.len() / (out.len() / m);
    check_acts(qtype, gb, xs);
    macro_rules! run {
        ($g:expr, $xs:expr, $out:expr, $a:literal) => {{
            let xa: &[&Q8Act; $a] = $xs.try_into().expect("A rows");
            // SAFETY: `group_impls` lists this only where AVX-512 VNNI+VL, AVX2, FMA and F16C were
            // detected; the sizes were checked above.
            let r = unsafe {
                match qtype {
                    QType::Q4_0 => vnni::group_q4_0::<$a>($g, xa),
                    _ => vnni::group_q4_k::<$a>($g, xa),
                }
            };
            $out[..$a].copy_from_slice(&r);
        }};
    }
    for (g, out) in g.chunks_exact(gb).zip(out.chunks_exact_mut(m)) {
        for (xa, oa) in xs.chunks(MAX_ACT).zip(out.chunks_mut(MAX_ACT)) {
            match xa.len() {
                1 => run!(g, xa, oa, 1),
                2 => run!(g, xa, oa, 2),
                3 => run!(g, xa, oa, 3),
                _ => run!(g, xa, oa, 4),
            }
        }
    }
}

/// [`GroupFn`] with the groups taken in pairs by `vnni::pair_q4_0` / `pair_q4_k` (a last odd
/// group as [`group_vnni`]).
#[cfg(target_arch = "x86_64")]
fn group_zmm(qtype: QType, g: &[u8], xs: &[&Q8Act], out: &mut [[f32; ROWS]]) {
    let m = xs.len();
    let gb = g.len() / (out.len() / m);
    check_acts(qtype, gb, xs);
    let pairs = g.len() / (2 * gb);
    macro_rules! run {
        ($g:expr, $xs:expr, $o0:expr, $o1:expr, $a:literal) => {{
            let xa: &[&Q8Act; $a] = $xs.try_into().expect("A rows");
            // SAFETY: `group_impls` lists this only where AVX-512 F+BW+VNNI, AVX2, FMA and F16C
            // were detected; the sizes were checked above and `$g` holds two groups.
            let r = unsafe {
                match qtype {
                    QType::Q4_0 => vnni::pair_q4_0::<$a>($g, gb, xa),
                    _ => vnni::pair_q4_k::<$a>($g, gb, xa),
                }
            };
            for (a, v) in r.iter().enumerate() {
                $o0[a].copy_from_slice(&v[..ROWS]);
                $o1[a].copy_from_slice(&v[ROWS..]);
            }
        }};
    }
    for (j, gp) in g.chunks_exact(2 * gb).enumerate() {
        let (o0, o1) = out[2 * j * m..(2 * j + 2) * m].split_at_mut(m);
        for (c, xa) in xs.chunks(MAX_ACT).enumerate() {
            let (o0, o1) = (&mut o0[c * MAX_ACT..], &mut o1[c * MAX_ACT..]);
            match xa.len() {
                1 => run!(gp, xa, o0, o1, 1),
                2 => run!(gp, xa, o0, o1, 2),
                3 => run!(gp, xa, o0, o1, 3),
                _ => run!(gp, xa, o0, o1, 4),
            }
        }
    }
    if g.len() > 2 * pairs * gb {
        group_vnni(qtype, &g[2 * pairs * gb..], xs, &mut out[2 * pairs * m..]);
    }
}

/// Every implementation of the group product this CPU runs, the scalar reference first and the
/// fastest last (tests compare them all).
pub fn group_impls() -> Vec<(&'static str, GroupFn)> {
    // mutable only where a SIMD path exists
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut v: Vec<(&'static str, GroupFn)> = vec![("scalar", group_ref)];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        v.push(("avx512vnni", group_vnni));
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            v.push(("avx512vnni-zmm", group_zmm));
        }
    }
    v
}

/// Whether decoding should pack: a SIMD group kernel runs here, and `QTUNE_SIMD` does not ask
/// for another path.
pub fn worth_packing() -> bool {
    let want = std::env::var("QTUNE_SIMD").ok();
    group_impls().len() > 1 && want.as_deref().is_none_or(|w| w == "avx512vnni")
}

/// `y (m, rows) = x (m, cols) · Wᵀ` on a packed matrix, each row of x rounded to Q8_0 blocks,
/// with the group kernel `f` (the fastest of [`group_impls`] when None).
pub fn gemv_packed(x: &[f32], m: usize, p: &Packed, y: &mut [f32], f: Option<GroupFn>) {
    let (n, k) = (p.rows, p.cols);
    let op = "gemv_packed";
    crate::quant::matmul::check_operands(op, ("x", x.len()), ("y", y.len()), m, (n, k));
    let f = f.unwrap_or_else(|| group_impls().last().expect("the scalar reference").1);
    let xq: Vec<Q8Act> = (0..m)
        .map(|i| quantize_activations(&x[i * k..(i + 1) * k]))
        .collect();
    let xr: Vec<&Q8Act> = xq.iter().collect();
    let gb = p.group_bytes();
    let groups = n.div_ceil(ROWS);
    // yt: (groups, m, 8). Eight groups a task (64 rows) keep scheduling cheap; a group's weights
    // (18 KB at 4096 columns) stay in L1/L2 while the prompt's rows pass over them.
    let mut yt = vec![[0f32; ROWS]; groups * m];
    const PER_TASK: usize = 8;
    yt.par_chunks_mut(PER_TASK * m)
        .enumerate()
        .for_each(|(t, ys)| {
            let g0 = t * PER_TASK;
            f(
                p.qtype,
                &p.bytes[g0 * gb..(g0 + ys.len() / m) * gb],
                &xr,
                ys,
            );
        });
    for (gi, rows) in yt.chunks(m).enumerate() {
        let (r0, nr) = (gi * ROWS, ROWS.min(n - gi * ROWS));
        for (i, v) in rows.iter().enumerate() {
            y[i * n + r0..i * n + r0 + nr].copy_from_slice(&v[..nr]);
        }
    }
}
