//! Decode-time matrix-vector products with 8-bit activations, as llama.cpp computes them: the
//! activation row is quantised to Q8_0 blocks (32 values, one f16 scale), and each weight block
//! (Q4_0 or Q8_0) meets its activation block as an integer dot product scaled by both scales.
//! Inference only: the rounding of the activations (about 0.4 % of each block's largest value) is
//! fine for sampling tokens and wrong for gradients, so training never comes here.
//!
//! Why: at one token a step, the f32 path dequantises every weight to f32 (measured 1.7 tokens/s
//! on a 7B Q4_0 file here, llama.cpp 8.2); integer products on the packed nibbles do 32 weights in
//! a few instructions, so the product runs at the speed the weights stream from memory.
use super::{QData, QMatrix, QType};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;
/// Bytes of one Q8_0 block: f16 scale + 32 i8.
const Q8_BYTES: usize = 34;
/// Bytes of one Q4_0 block: f16 scale + 16 bytes of nibbles.
const Q4_BYTES: usize = 18;
/// Bytes of one Q4_K super-block (256 weights): f16 d, f16 dmin, 12 bytes of 6-bit sub-block
/// scales and mins, 128 bytes of nibbles.
const Q4K_BYTES: usize = 144;

/// Whether [`gemv_q8`] handles `w`: Q4_0 or Q8_0 rows of whole blocks, or Q4_K where the CPU has
/// AVX-512 VNNI (its scalar form is slower than the exact f32 path it would replace).
pub fn supported(w: &QMatrix) -> bool {
    let QData::Ggml { qtype, .. } = w.data else {
        return false;
    };
    let ok = match qtype {
        QType::Q4_0 | QType::Q8_0 => true,
        QType::Q4_K => dot_impls(QType::Q4_K).len() > 1,
        _ => false,
    };
    ok && w.cols.is_multiple_of(QK)
}

/// An activation row as Q8_0 blocks, with what the SIMD products want per block precomputed
/// once (the row meets every weight row).
pub struct Q8Act {
    /// Q8_0 blocks: scale = max|x| / 127, values rounded to nearest (ggml's
    /// `quantize_row_q8_0_ref`, byte-identical to gguf-py).
    pub bytes: Vec<u8>,
    /// Each block's scale as f32.
    pub scales: Vec<f32>,
    /// `-8 · Σ x_q` per block: Q4_0's offset, so its nibbles can stay unsigned (VNNI).
    pub neg8sum: Vec<i32>,
}

/// `x (cols)` quantised for [`gemv_q8`].
pub fn quantize_activations(x: &[f32]) -> Q8Act {
    let mut bytes = vec![0u8; x.len() / QK * Q8_BYTES];
    super::scalar::quant_q8_0(x, &mut bytes);
    let scales = bytes.chunks_exact(Q8_BYTES).map(scale).collect();
    let neg8sum = bytes
        .chunks_exact(Q8_BYTES)
        .map(|b| -8 * b[2..].iter().map(|&v| v as i8 as i32).sum::<i32>())
        .collect();
    Q8Act {
        bytes,
        scales,
        neg8sum,
    }
}

fn scale(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Σ over blocks of `d_w · d_x · Σ w_q·x_q` for one Q4_0 row (scalar reference, ggml's
/// `ggml_vec_dot_q4_0_q8_0` generic path).
pub fn dot_q4_0_q8_0_ref(w: &[u8], x: &Q8Act) -> f32 {
    let x = &x.bytes;
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_BYTES).zip(x.chunks_exact(Q8_BYTES)) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = (wb[2 + j] & 0x0F) as i32 - 8;
            let hi = (wb[2 + j] >> 4) as i32 - 8;
            sumi += lo * xb[2 + j] as i8 as i32 + hi * xb[2 + j + QK / 2] as i8 as i32;
        }
        sum += sumi as f32 * (scale(wb) * scale(xb));
    }
    sum
}

/// The same for one Q8_0 row (ggml's `ggml_vec_dot_q8_0_q8_0` generic path).
pub fn dot_q8_0_q8_0_ref(w: &[u8], x: &Q8Act) -> f32 {
    let x = &x.bytes;
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q8_BYTES).zip(x.chunks_exact(Q8_BYTES)) {
        let sumi: i32 = wb[2..]
            .iter()
            .zip(&xb[2..])
            .map(|(&a, &b)| a as i8 as i32 * b as i8 as i32)
            .sum();
        sum += sumi as f32 * (scale(wb) * scale(xb));
    }
    sum
}

/// Σ x_q of activation block `i`.
fn block_sum(x: &Q8Act, i: usize) -> i32 {
    -x.neg8sum[i] / 8
}

/// (d·scale, dmin·min) of Q4_K sub-block `j` (0..8) of super-block `b`.
fn q4k_sub(b: &[u8], j: usize) -> (f32, f32) {
    let s: &[u8; 12] = b[4..16].try_into().expect("12 scale bytes");
    let (sc, m) = super::blocks::scale_min_k4(j, s);
    (scale(b) * sc as f32, scale(&b[2..4]) * m as f32)
}

/// One Q4_K row · Q8_0 activations: each 32-weight sub-block is `d·sc·q − dmin·m` with q in 0..16,
/// so against activation block `x` it contributes `dx·(d·sc·Σq·x_q − dmin·m·Σx_q)` (scalar
/// reference; the activation blocks line up with the sub-blocks).
pub fn dot_q4_k_q8_0_ref(w: &[u8], x: &Q8Act) -> f32 {
    let mut sum = 0f32;
    for (bi, b) in w.chunks_exact(Q4K_BYTES).enumerate() {
        let qs = &b[16..];
        for j in 0..8 {
            let xi = bi * 8 + j;
            let xb = &x.bytes[xi * Q8_BYTES + 2..(xi + 1) * Q8_BYTES];
            // Sub-blocks 2c and 2c+1 share 32 bytes: low nibbles, then high nibbles.
            let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let shift = 4 * (j % 2);
            let isum: i32 = chunk
                .iter()
                .zip(xb)
                .map(|(&q, &v)| ((q >> shift) & 0x0F) as i32 * v as i8 as i32)
                .sum();
            let (dsc, dm) = q4k_sub(b, j);
            sum += x.scales[xi] * (dsc * isum as f32 - dm * block_sum(x, xi) as f32);
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q4_BYTES, Q8_BYTES, QK};
    use std::arch::x86_64::*;

    /// The block's f16 scale with the F16C instruction (half's `to_f32` checks the CPU per call,
    /// which at two scales per 32 weights costs more than the dot product itself).
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn scale(b: &[u8]) -> f32 {
        let h = u16::from_le_bytes([b[0], b[1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
    }

    /// Σ of the eight i32 products of a block pair, as f32 lanes times the block scale, added to
    /// `acc`. `w`, `x`: 32 signed values each (w in -8..7 or -128..127, x in -127..127).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block(acc: __m256, w: __m256i, x: __m256i, d: f32) -> __m256 {
        // maddubs takes unsigned × signed: |w| × (x with w's sign) = w × x, pairwise into i16
        // (at most 2·128·127, no saturation), then pairs of i16 into i32.
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        let p16 = _mm256_maddubs_epi16(aw, sx);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(d), acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Q4_0 row · Q8_0 activations.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w` and `x` hold the same number of whole blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0_q8_0(w: &[u8], x: &super::Q8Act) -> f32 {
        let x = &x.bytes;
        let nb = (w.len() / Q4_BYTES).min(x.len() / Q8_BYTES);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let m4 = _mm_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let load = |i: usize| -> (__m256i, __m256i, f32) {
            let (wb, xb) = (wp.add(i * Q4_BYTES), xp.add(i * Q8_BYTES));
            let q = _mm_loadu_si128(wb.add(2) as *const __m128i);
            let lo = _mm_and_si128(q, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            // Elements 0..15 are the low nibbles, 16..31 the high ones.
            let wq = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight);
            let xq = _mm256_loadu_si256(xb.add(2) as *const __m256i);
            let d =
                scale(std::slice::from_raw_parts(wb, 2)) * scale(std::slice::from_raw_parts(xb, 2));
            (wq, xq, d)
        };
        // Two independent accumulators: the FMA chain of one block would otherwise wait on the
        // previous block's.
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 1 < nb {
            let (w0, x0, d0) = load(i);
            let (w1, x1, d1) = load(i + 1);
            a0 = block(a0, w0, x0, d0);
            a1 = block(a1, w1, x1, d1);
            i += 2;
        }
        if i < nb {
            let (w0, x0, d0) = load(i);
            a0 = block(a0, w0, x0, d0);
        }
        hsum(_mm256_add_ps(a0, a1))
    }

    /// Q8_0 row · Q8_0 activations.
    ///
    /// # Safety
    /// As [`dot_q4_0_q8_0`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0_q8_0(w: &[u8], x: &super::Q8Act) -> f32 {
        let x = &x.bytes;
        let mut acc = _mm256_setzero_ps();
        for (wb, xb) in w.chunks_exact(Q8_BYTES).zip(x.chunks_exact(Q8_BYTES)) {
            let wq = _mm256_loadu_si256(wb.as_ptr().add(2) as *const __m256i);
            let xq = _mm256_loadu_si256(xb.as_ptr().add(2) as *const __m256i);
            acc = block(acc, wq, xq, scale(wb) * scale(xb));
        }
        hsum(acc)
    }

    const _: () = assert!(QK == 32);
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Q8Act, Q4_BYTES};
    use std::arch::x86_64::*;

    /// Q4_0 row · Q8_0 activations with AVX-512 VNNI on 256-bit vectors: one `vpdpbusd` takes the
    /// unsigned nibbles times the signed activations, starting from `-8·Σx_q` (the nibble offset),
    /// so no sign juggling is needed.
    ///
    /// # Safety
    /// The CPU must have AVX-512 VNNI and VL, AVX2, FMA and F16C; `w` holds as many whole blocks
    /// as `x`.
    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dot_q4_0_q8_0(w: &[u8], x: &Q8Act) -> f32 {
        let nb = (w.len() / Q4_BYTES).min(x.scales.len());
        let (wp, xp) = (w.as_ptr(), x.bytes.as_ptr());
        let m4 = _mm_set1_epi8(0x0F);
        let block = |i: usize, acc: __m256| -> __m256 {
            let wb = wp.add(i * Q4_BYTES);
            let q = _mm_loadu_si128(wb.add(2) as *const __m128i);
            let lo = _mm_and_si128(q, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            let wq = _mm256_set_m128i(hi, lo);
            let xq = _mm256_loadu_si256(xp.add(i * 34 + 2) as *const __m256i);
            let start = _mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, x.neg8sum[i]);
            let p = _mm256_dpbusd_epi32(start, wq, xq);
            let h = u16::from_le_bytes([*wb, *wb.add(1)]) as i32;
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * x.scales[i]), acc)
        };
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 1 < nb {
            a0 = block(i, a0);
            a1 = block(i + 1, a1);
            i += 2;
        }
        if i < nb {
            a0 = block(i, a0);
        }
        hsum(_mm256_add_ps(a0, a1))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Q4_K row · Q8_0 activations: the nibbles are unsigned already, so each sub-block is one
    /// `vpdpbusd`; the min term is a scalar per sub-block.
    ///
    /// # Safety
    /// As [`dot_q4_0_q8_0`]; `w` holds `x.scales.len() / 8` whole super-blocks.
    #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dot_q4_k_q8_0(w: &[u8], x: &Q8Act) -> f32 {
        let nb = (w.len() / super::Q4K_BYTES).min(x.scales.len() / 8);
        let xp = x.bytes.as_ptr();
        let m4 = _mm256_set1_epi8(0x0F);
        let (mut acc, mut mins) = (_mm256_setzero_ps(), 0f32);
        for bi in 0..nb {
            let b = &w[bi * super::Q4K_BYTES..(bi + 1) * super::Q4K_BYTES];
            // d and dmin with F16C, once a super-block (half's `to_f32` checks the CPU per call).
            let h = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                b[0], b[1], b[2], b[3],
            ])));
            let (d, dmin) = (_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)));
            let sm: &[u8; 12] = b[4..16].try_into().expect("12 scale bytes");
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c) as *const __m256i);
                let halves = [
                    _mm256_and_si256(q, m4),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                ];
                for (h, wq) in halves.into_iter().enumerate() {
                    let (j, xi) = (2 * c + h, bi * 8 + 2 * c + h);
                    let xq = _mm256_loadu_si256(xp.add(xi * 34 + 2) as *const __m256i);
                    let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, xq);
                    let (sc, m) = crate::quant::blocks::scale_min_k4(j, sm);
                    let (dsc, dm) = (d * sc as f32, dmin * m as f32);
                    let dx = x.scales[xi];
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dx * dsc), acc);
                    mins += dx * dm * super::block_sum(x, xi) as f32;
                }
            }
        }
        hsum(acc) - mins
    }
}

/// A row dot product: one weight row's blocks · the quantised activations.
pub type DotFn = fn(&[u8], &Q8Act) -> f32;

/// Every implementation of the row dot product for `qtype` this CPU runs, scalar reference first
/// and the fastest last (tests compare them all).
pub fn dot_impls(qtype: QType) -> Vec<(&'static str, DotFn)> {
    // Only x86 adds SIMD implementations so far.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut v: Vec<(&'static str, DotFn)> = match qtype {
        QType::Q4_0 => vec![("scalar", dot_q4_0_q8_0_ref)],
        QType::Q8_0 => vec![("scalar", dot_q8_0_q8_0_ref)],
        QType::Q4_K => vec![("scalar", dot_q4_k_q8_0_ref)],
        _ => return Vec::new(),
    };
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let vnni =
            avx2 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        // SAFETY (each closure): the features were just detected; callers pass whole, matching
        // blocks (`gemv_q8` checks the shapes).
        match qtype {
            // SAFETY: AVX2+FMA+F16C detected above; whole blocks checked by the caller.
            QType::Q4_0 if avx2 => v.push(("avx2", |w, x| unsafe { avx2::dot_q4_0_q8_0(w, x) })),
            // SAFETY: as above.
            QType::Q8_0 if avx2 => v.push(("avx2", |w, x| unsafe { avx2::dot_q8_0_q8_0(w, x) })),
            _ => {}
        }
        match qtype {
            QType::Q4_0 if vnni => {
                // SAFETY: AVX-512 VNNI+VL (and AVX2) detected above; whole blocks (caller).
                v.push(("avx512vnni", |w, x| unsafe { vnni::dot_q4_0_q8_0(w, x) }))
            }
            QType::Q4_K if vnni => {
                // SAFETY: as above.
                v.push(("avx512vnni", |w, x| unsafe { vnni::dot_q4_k_q8_0(w, x) }))
            }
            _ => {}
        }
    }
    v
}

/// The row dot product `gemv_q8` uses: the fastest of [`dot_impls`], or the one `QTUNE_SIMD`
/// (`scalar`, `avx2`) asks for.
pub fn dot_fn(qtype: QType) -> Option<DotFn> {
    let impls = dot_impls(qtype);
    let want = std::env::var("QTUNE_SIMD").ok();
    let pick = impls
        .iter()
        .find(|(n, _)| want.as_deref() == Some(*n))
        .or(impls.last());
    pick.map(|p| p.1)
}

/// `y (m, rows) = x (m, cols) · Wᵀ` with each row of x quantised to Q8_0 first. Returns false
/// (and writes nothing) when `w` is not a type this path handles ([`supported`]).
pub fn gemv_q8(x: &[f32], m: usize, w: &QMatrix, y: &mut [f32]) -> bool {
    let (QData::Ggml { qtype, bytes }, true) = (w.data, supported(w)) else {
        return false;
    };
    let Some(dot) = dot_fn(qtype) else {
        return false;
    };
    let (n, k) = (w.rows, w.cols);
    crate::quant::matmul::check_operands("gemv_q8", ("x", x.len()), ("y", y.len()), m, (n, k));
    let row_bytes = bytes.len() / n.max(1);
    let xq: Vec<Q8Act> = (0..m)
        .map(|i| quantize_activations(&x[i * k..(i + 1) * k]))
        .collect();
    // Each weight row meets every activation row while it is in cache: a prompt of m tokens reads
    // the weights once, not m times. yt is (rows, m); 64 rows a task keeps scheduling cheap.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(64 * m).enumerate().for_each(|(t, ys)| {
        for (j, out) in ys.chunks_mut(m).enumerate() {
            let r = t * 64 + j;
            let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
            for (o, xa) in out.iter_mut().zip(&xq) {
                *o = dot(row, xa);
            }
        }
    });
    for (r, vals) in yt.chunks(m).enumerate() {
        for (i, v) in vals.iter().enumerate() {
            y[i * n + r] = *v;
        }
    }
    true
}
