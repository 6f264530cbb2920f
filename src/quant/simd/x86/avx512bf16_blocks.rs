use crate::quant::blocks::scales_mins_k4;
use crate::quant::simd::prefetch_ahead as prefetch;
use half::bf16;
use std::arch::x86_64::*;

/// Two 16-entry tables in one register: `f32(c) · d0 − m0` in words 0..16 and
/// `f32(c) · d1 − m1` in words 16..32 (c = `first`..`first`+16, the lanes of `table_codes`),
/// each rounded by `vcvtne2ps2bf16`. One conversion serves two (sub-)blocks: that halves the
/// instruction that bounded the one-table loop.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
#[inline]
unsafe fn tables2(table_codes: __m512, d: [__m512; 2], m: [__m512; 2]) -> __m512i {
    let t0 = _mm512_sub_ps(_mm512_mul_ps(table_codes, d[0]), m[0]);
    let t1 = _mm512_sub_ps(_mm512_mul_ps(table_codes, d[1]), m[1]);
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(t1, t0))
}

/// 32 codes (bytes 0..32, already or'ed with 16 to read the second table) looked up in
/// `tables` (`vpermw` reads an index's low five bits), stored as 32 bf16 at `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
#[inline]
unsafe fn lookup32(codes: __m256i, tables: __m512i, out: *mut bf16) {
    let idx = _mm512_cvtepu8_epi16(codes);
    _mm512_storeu_si512(out as *mut _, _mm512_permutexvar_epi16(idx, tables));
}

/// The f16 at `p` in all sixteen lanes (`vpbroadcastw` + `vcvtph2ps`: no scalar round trip,
/// and no merge into a live register).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
#[inline]
unsafe fn f16_lanes(p: *const u8) -> __m512 {
    let h = (p as *const u16).read_unaligned();
    _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// A Q4_0 block's 32 codes (low nibbles then high), or'ed with `or` (0 or 16).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
#[inline]
unsafe fn q4_0_codes(b: *const u8, or: __m256i) -> __m256i {
    let qs = _mm_loadu_si128(b.add(2) as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
    _mm256_or_si256(_mm256_and_si256(both, _mm256_set1_epi8(0x0f)), or)
}

/// Q4_0: `(q − 8) · d`, two blocks a step (the table's `− 0` leaves every value as the f32
/// kernel's product: x − 0 = x for every x, −0 included).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
unsafe fn q4_0(src: &[u8], dst: &mut [bf16]) {
    let codes = _mm512_setr_ps(
        -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
    );
    let (zero, sixteen) = (_mm512_setzero_ps(), _mm256_set1_epi8(16));
    let pairs = src.chunks_exact(36).zip(dst.chunks_exact_mut(64));
    for (b, o) in pairs {
        let (b, o) = (b.as_ptr(), o.as_mut_ptr());
        prefetch(b, 36);
        let t = tables2(codes, [f16_lanes(b), f16_lanes(b.add(18))], [zero; 2]);
        lookup32(q4_0_codes(b, _mm256_setzero_si256()), t, o);
        lookup32(q4_0_codes(b.add(18), sixteen), t, o.add(32));
    }
    // An odd last block: its table twice over.
    let done = src.len() / 36;
    if let (Some(b), Some(o)) = (
        src.get(36 * done..36 * done + 18),
        dst.get_mut(64 * done..64 * done + 32),
    ) {
        let d = f16_lanes(b.as_ptr());
        let t = tables2(codes, [d; 2], [zero; 2]);
        lookup32(
            q4_0_codes(b.as_ptr(), _mm256_setzero_si256()),
            t,
            o.as_mut_ptr(),
        );
    }
}

/// Q4_K: sub-block j's `q · (d·sc_j) − dmin·m_j`; a 32-byte chunk's low nibbles (sub-block
/// 2c) and high nibbles (2c+1) share one table register. The eight `d·sc_j` and `dmin·m_j`
/// are one vector (each the same single f32 product as the f32 kernel's), and each chunk's
/// four are broadcast from it by `vpermps`: no scalar scale work per sub-block.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
unsafe fn q4_k(src: &[u8], dst: &mut [bf16]) {
    let codes = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    let (m4, sixteen) = (_mm512_set1_epi16(0x0f), _mm512_set1_epi16(16));
    // Lanes 0..8 take d, 8..16 dmin (of the block's [d, dmin] pair).
    let d_or_dmin = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let lane = |i: i32| _mm512_set1_epi32(i);
    for (b, o) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        prefetch(b.as_ptr(), 144);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (b.as_ptr() as *const i32).read_unaligned(),
        ));
        let dm = _mm512_permutexvar_ps(d_or_dmin, _mm512_castps128_ps512(dm));
        let sm = scales_mins_k4(b[4..16].try_into().expect("block"));
        let sm = _mm512_cvtepu8_epi32(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
        // Lane j: d·sc_j, lane 8 + j: dmin·m_j.
        let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sm), dm);
        let o = o.as_mut_ptr();
        for c in 0..4 {
            // The 32 bytes widened once to words; the low nibble indexes the first table,
            // the high nibble (or'ed with 16) the second: one `vpmovzxbw` for both lookups.
            let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                b.as_ptr().add(16 + 32 * c) as *const __m256i
            ));
            let lo = _mm512_and_si512(w, m4);
            let hi = _mm512_or_si512(_mm512_srli_epi16::<4>(w), sixteen);
            let j = 2 * c as i32;
            let at = |i: i32| _mm512_permutexvar_ps(lane(i), scaled);
            let t = tables2(codes, [at(j), at(j + 1)], [at(8 + j), at(9 + j)]);
            let out = o.add(64 * c) as *mut __m512i;
            _mm512_storeu_si512(out, _mm512_permutexvar_epi16(lo, t));
            _mm512_storeu_si512(out.add(1), _mm512_permutexvar_epi16(hi, t));
        }
    }
}

/// Q6_K: the f32 kernel's `f32(q) · (d·sc)` for 32 codes a step, rounded by one
/// `vcvtne2ps2bf16`; the sixteen `d·sc` are one vector and each 16-code group's is broadcast
/// from it by `vpermps` (the macro's kernel converts and broadcasts a scalar per group).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,f16c")]
unsafe fn q6_k(src: &[u8], dst: &mut [bf16]) {
    let (m4, m2, bias) = (
        _mm256_set1_epi8(0x0f),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(32),
    );
    for (b, o) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let (b, o) = (b.as_ptr(), o.as_mut_ptr());
        prefetch(b, 210);
        let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            b.add(192) as *const __m128i
        )));
        // Lane k: d·sc_k, the same single product as the f32 kernel's.
        let dl = _mm512_mul_ps(f16_lanes(b.add(208)), sc);
        for a in 0..2 {
            let ql0 = _mm256_loadu_si256(b.add(64 * a) as *const __m256i);
            let ql1 = _mm256_loadu_si256(b.add(64 * a + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(b.add(128 + 32 * a) as *const __m256i);
            // Plane s: nibble s/2 of ql[(s%2)*32 + l], bits 2s..2s+2 of qh[l].
            let planes = [
                (_mm256_and_si256(ql0, m4), _mm256_and_si256(qh, m2)),
                (
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                ),
                (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2),
                ),
                (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2),
                ),
            ];
            for (s, (nib, hi)) in planes.into_iter().enumerate() {
                let q = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16::<4>(hi)), bias);
                let base = a * 128 + s * 32;
                let k = (base / 16) as i32;
                let f = |codes: __m128i, k: i32| {
                    let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
                    _mm512_mul_ps(v, _mm512_permutexvar_ps(_mm512_set1_epi32(k), dl))
                };
                let r0 = f(_mm256_castsi256_si128(q), k);
                let r1 = f(_mm256_extracti128_si256::<1>(q), k + 1);
                let r = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(r1, r0));
                _mm512_storeu_si512(o.add(base) as *mut _, r);
            }
        }
    }
}

/// The table kernel for `qtype`, if it has one.
pub(in crate::quant::simd) fn dequant_bf16_fn(
    qtype: crate::quant::QType,
) -> Option<crate::quant::dispatch::DequantBf16Fn> {
    fn q4_0_safe(src: &[u8], dst: &mut [bf16]) {
        // SAFETY: handed out only through `simd::dequant_bf16_fn` after `has_avx512_bf16`.
        unsafe { q4_0(src, dst) }
    }
    fn q4_k_safe(src: &[u8], dst: &mut [bf16]) {
        // SAFETY: as `q4_0_safe`.
        unsafe { q4_k(src, dst) }
    }
    fn q6_k_safe(src: &[u8], dst: &mut [bf16]) {
        // SAFETY: as `q4_0_safe`.
        unsafe { q6_k(src, dst) }
    }
    match qtype {
        crate::quant::QType::Q4_0 => Some(q4_0_safe),
        crate::quant::QType::Q4_K => Some(q4_k_safe),
        crate::quant::QType::Q6_K => Some(q6_k_safe),
        _ => None,
    }
}
