//! x86-64 kernels. One body, written once in a macro, is compiled twice: for AVX2+FMA+F16C (8-lane
//! f32 stores) and for AVX-512 F+BW (16-lane stores; the integer unpacking stays 128/256-bit, which
//! every AVX-512 CPU runs at full speed). Codes are unpacked with integer SIMD into bytes, widened
//! to i32, converted to f32 and scaled with separate multiply and add/subtract instructions in the
//! scalar code's order, so results equal `scalar` bit for bit (FMA is enabled for other code but
//! never emitted here: Rust does not contract `a * b + c`).
//!
//! Every kernel is an `unsafe` `#[target_feature]` function; the safe `fn(&[u8], &mut [f32])`
//! wrappers handed out by each module's `dequant_fn` are only reachable through
//! `simd::dequant_fn`, which checks `has_avx2` / `has_avx512` first.

/// AVX2, FMA and F16C, the AVX2 level's features.
pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512 BF16 on top of the AVX-512 level (`vcvtneps2bf16` for the bf16-output kernels).
pub fn has_avx512_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

/// AVX-512 F+BW plus the AVX2 level (the 512-bit kernels reuse its 256-bit unpacking).
pub fn has_avx512() -> bool {
    has_avx2() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

macro_rules! x86_kernels {
    (
        $features:literal,
        lanes: $lanes:literal of $f32x:ty, $i32x:ty,
        f32 ops: $set1:ident, $mul:ident, $add:ident, $sub:ident, $cvt:ident, $load:ident,
            $store:ident,
        widen_i8::<$signed:ident>($wc:ident) = $widen:expr,
        f16_lanes($fp:ident) = $f16:expr,
        bf16_lanes($bp:ident) = $bf16:expr,
        store_bf16_lanes($rv:ident, $rd:ident) = $round:expr $(,)?
    ) => {
        use crate::quant::blocks::{scale_min_k4, scales_q3_k};
        use crate::quant::dispatch::{DequantBf16Fn, DequantFn};
        use crate::quant::simd::Out;
        use crate::quant::QType;
        use half::bf16;
        use std::arch::x86_64::*;

        /// Multiply, then add the offset (Q4_1/Q5_1: `d * q + m`).
        const ADD: u8 = 1;
        /// Multiply, then subtract the offset (K-quants: `(d * sc) * q - dmin * m`).
        const SUB: u8 = 2;
        /// Multiply only.
        const MUL: u8 = 0;

        /// `out[0..16] = f32(codes[i]) * d (op m)`: the 16 codes widened to i32 lanes
        /// (sign-extended when `SIGNED`), converted, multiplied, then `m` added or subtracted.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn emit16<O: Out, const SIGNED: bool, const OP: u8>(
            codes: __m128i,
            d: f32,
            m: f32,
            out: *mut O,
        ) {
            let (dv, mv) = ($set1(d), $set1(m));
            for (i, v) in widen_i8::<SIGNED>(codes).into_iter().enumerate() {
                let mut r = $mul($cvt(v), dv);
                if OP == ADD {
                    r = $add(r, mv);
                } else if OP == SUB {
                    r = $sub(r, mv);
                }
                put(out.add(LANES * i), r);
            }
        }

        /// `LANES` f32 lanes stored as `O`: as they are, or rounded to bf16 in the register (the
        /// kernels' bf16 output: no f32 round trip through memory).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn put<O: Out>(out: *mut O, r: $f32x) {
            if O::BF16 {
                store_bf16_lanes(r, out as *mut bf16)
            } else {
                $store(out as *mut f32, r)
            }
        }

        /// 16 codes as i32 lanes, `LANES` a register (sign-extended when `SIGNED`).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn widen_i8<const $signed: bool>($wc: __m128i) -> [$i32x; 16 / LANES] {
            $widen
        }

        /// 32 codes from a 256-bit register, one scale.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn emit32<O: Out, const SIGNED: bool, const OP: u8>(
            codes: __m256i,
            d: f32,
            m: f32,
            out: *mut O,
        ) {
            emit16::<O, SIGNED, OP>(_mm256_castsi256_si128(codes), d, m, out);
            emit16::<O, SIGNED, OP>(_mm256_extracti128_si256::<1>(codes), d, m, out.add(16));
        }

        /// The f16 at byte `i`. (`half` converts with F16C behind a cached feature check. Inlining
        /// `vcvtph2ps` here was slower: LLVM folds the load into a `vpinsrw` that merges into a
        /// live register, a false dependency that chained every block to the previous one and
        /// halved Q8_0's throughput. Session 10 tried `vcvtph2ps` on a zero-extending `vmovd`
        /// here again: Q8_0 into bf16 ran at 0.4× again. The table kernels below take their
        /// Q4_0 scales by `vpbroadcastw` + `vcvtph2ps` instead, which does not slow them.)
        #[inline(always)]
        fn f16_at(b: &[u8], i: usize) -> f32 {
            half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
        }

        /// Bits 0..16 of `qh` (bits 16..32 when `HIGH`) as 16 bytes holding 0 or 0x10: the fifth
        /// bit of Q5_0/Q5_1 codes.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn q5_high_bits<const HIGH: bool>(qh: u32) -> __m128i {
            let v = _mm_cvtsi32_si128(qh as i32);
            // Byte j of the result reads byte j/8 of qh (2 + j/8 for the high half)...
            let idx = if HIGH {
                _mm_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202)
            } else {
                _mm_set_epi64x(0x0101_0101_0101_0101, 0)
            };
            let bytes = _mm_shuffle_epi8(v, idx);
            // ...and tests bit j%8 of it.
            let bit = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let set = _mm_cmpeq_epi8(_mm_and_si128(bytes, bit), bit);
            _mm_and_si128(set, _mm_set1_epi8(0x10))
        }

        /// The two 128-bit halves of `q` (codes 0..16 and 16..32).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn halves(q: __m256i) -> [__m128i; 2] {
            [_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q)]
        }

        /// Bits `shift..` of every byte of `v`, kept where `mask` is set (`(v >> shift) & mask`).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn bits_at(v: __m256i, shift: usize, mask: __m256i) -> __m256i {
            _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32)), mask)
        }

        #[target_feature(enable = $features)]
        unsafe fn q4_0<O: Out>(src: &[u8], dst: &mut [O]) {
            let m4 = _mm_set1_epi8(0x0f);
            let eight = _mm_set1_epi8(8);
            for (b, o) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let qs = _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i);
                let lo = _mm_sub_epi8(_mm_and_si128(qs, m4), eight);
                let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(qs), m4), eight);
                emit16::<O, true, MUL>(lo, d, 0.0, o.as_mut_ptr());
                emit16::<O, true, MUL>(hi, d, 0.0, o.as_mut_ptr().add(16));
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q4_1<O: Out>(src: &[u8], dst: &mut [O]) {
            let m4 = _mm_set1_epi8(0x0f);
            for (b, o) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
                let lo = _mm_and_si128(qs, m4);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), m4);
                emit16::<O, false, ADD>(lo, d, m, o.as_mut_ptr());
                emit16::<O, false, ADD>(hi, d, m, o.as_mut_ptr().add(16));
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q5_0<O: Out>(src: &[u8], dst: &mut [O]) {
            let m4 = _mm_set1_epi8(0x0f);
            let sixteen = _mm_set1_epi8(16);
            for (b, o) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = _mm_loadu_si128(b.as_ptr().add(6) as *const __m128i);
                let lo = _mm_or_si128(_mm_and_si128(qs, m4), q5_high_bits::<false>(qh));
                let hi = _mm_or_si128(
                    _mm_and_si128(_mm_srli_epi16::<4>(qs), m4),
                    q5_high_bits::<true>(qh),
                );
                emit16::<O, true, MUL>(_mm_sub_epi8(lo, sixteen), d, 0.0, o.as_mut_ptr());
                emit16::<O, true, MUL>(_mm_sub_epi8(hi, sixteen), d, 0.0, o.as_mut_ptr().add(16));
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q5_1<O: Out>(src: &[u8], dst: &mut [O]) {
            let m4 = _mm_set1_epi8(0x0f);
            for (b, o) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = _mm_loadu_si128(b.as_ptr().add(8) as *const __m128i);
                let lo = _mm_or_si128(_mm_and_si128(qs, m4), q5_high_bits::<false>(qh));
                let hi = _mm_or_si128(
                    _mm_and_si128(_mm_srli_epi16::<4>(qs), m4),
                    q5_high_bits::<true>(qh),
                );
                emit16::<O, false, ADD>(lo, d, m, o.as_mut_ptr());
                emit16::<O, false, ADD>(hi, d, m, o.as_mut_ptr().add(16));
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q8_0<O: Out>(src: &[u8], dst: &mut [O]) {
            for (b, o) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
                // A line a block covers every line of the stream (blocks are 34 bytes).
                crate::quant::simd::prefetch_ahead(b.as_ptr(), 1);
                let d = f16_at(b, 0);
                let qs = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                emit32::<O, true, MUL>(qs, d, 0.0, o.as_mut_ptr());
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q2_k<O: Out>(src: &[u8], dst: &mut [O]) {
            let m2 = _mm256_set1_epi8(3);
            for (b, o) in src.chunks_exact(84).zip(dst.chunks_exact_mut(256)) {
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let o = o.as_mut_ptr();
                for h in 0..2 {
                    let qs = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * h) as *const __m256i);
                    for s in 0..4 {
                        let q = bits_at(qs, 2 * s, m2);
                        let base = h * 128 + s * 32;
                        for (half, codes) in halves(q).into_iter().enumerate() {
                            let sc = b[base / 16 + half];
                            let dl = d * (sc & 0x0f) as f32;
                            let ml = dmin * (sc >> 4) as f32;
                            emit16::<O, false, SUB>(codes, dl, ml, o.add(base + 16 * half));
                        }
                    }
                }
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q3_k<O: Out>(src: &[u8], dst: &mut [O]) {
            let m2 = _mm256_set1_epi8(3);
            let one = _mm256_set1_epi8(1);
            let four = _mm256_set1_epi8(4);
            for (b, o) in src.chunks_exact(110).zip(dst.chunks_exact_mut(256)) {
                let sc = scales_q3_k(b[96..108].try_into().expect("block"));
                let d = f16_at(b, 108);
                let hmask = _mm256_loadu_si256(b.as_ptr() as *const __m256i);
                let o = o.as_mut_ptr();
                for h in 0..2 {
                    let qs = _mm256_loadu_si256(b.as_ptr().add(32 + 32 * h) as *const __m256i);
                    for s in 0..4 {
                        let q2 = bits_at(qs, 2 * s, m2);
                        let hb = bits_at(hmask, 4 * h + s, one);
                        // q = q2 - 4 + 4 * hbit: subtract 4 where the high bit is clear.
                        let hb4 = _mm256_slli_epi16::<2>(hb);
                        let q = _mm256_sub_epi8(_mm256_add_epi8(q2, hb4), four);
                        let base = h * 128 + s * 32;
                        for (half, codes) in halves(q).into_iter().enumerate() {
                            let dl = d * (sc[base / 16 + half] as i32 - 32) as f32;
                            emit16::<O, true, MUL>(codes, dl, 0.0, o.add(base + 16 * half));
                        }
                    }
                }
            }
        }

        /// Q4_K, and Q5_K when `QH` (the fifth bits at byte 16, the nibbles from byte 48): 8
        /// sub-blocks of 32 with 6-bit scales and mins.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn k4_like<O: Out, const QH: bool>(src: &[u8], dst: &mut [O]) {
            let m4 = _mm256_set1_epi8(0x0f);
            let one = _mm256_set1_epi8(1);
            let (size, qs_at) = if QH { (176, 48) } else { (144, 16) };
            for (b, o) in src.chunks_exact(size).zip(dst.chunks_exact_mut(256)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales: &[u8; 12] = b[4..16].try_into().expect("block");
                let qh = match QH {
                    true => _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i),
                    false => _mm256_setzero_si256(),
                };
                let o = o.as_mut_ptr();
                for c in 0..4 {
                    let qs = _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(qs, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(qs), m4);
                    for (h, nib) in [lo, hi].into_iter().enumerate() {
                        let j = 2 * c + h;
                        let codes = match QH {
                            true => {
                                _mm256_or_si256(nib, _mm256_slli_epi16::<4>(bits_at(qh, j, one)))
                            }
                            false => nib,
                        };
                        let (sc, m) = scale_min_k4(j, scales);
                        let (dl, ml) = (d * sc as f32, dmin * m as f32);
                        emit32::<O, false, SUB>(codes, dl, ml, o.add(64 * c + 32 * h));
                    }
                }
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q6_k<O: Out>(src: &[u8], dst: &mut [O]) {
            let m4 = _mm256_set1_epi8(0x0f);
            let m2 = _mm256_set1_epi8(3);
            let bias = _mm256_set1_epi8(32);
            for (b, o) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
                let d = f16_at(b, 208);
                let o = o.as_mut_ptr();
                for a in 0..2 {
                    let ql0 = _mm256_loadu_si256(b.as_ptr().add(64 * a) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(b.as_ptr().add(64 * a + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * a) as *const __m256i);
                    // Plane s: nibble s/2 of ql[(s%2)*32 + l], bits 2s..2s+2 of qh[l].
                    let nibs = [
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    ];
                    for (s, nib) in nibs.into_iter().enumerate() {
                        let hi = bits_at(qh, 2 * s, m2);
                        let q =
                            _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16::<4>(hi)), bias);
                        let base = a * 128 + s * 32;
                        for (half, codes) in halves(q).into_iter().enumerate() {
                            let dl = d * (b[192 + base / 16 + half] as i8) as f32;
                            emit16::<O, true, MUL>(codes, dl, 0.0, o.add(base + 16 * half));
                        }
                    }
                }
            }
        }

        // The conversions, `LANES` elements a register: F16 and BF16 -> f32 (`widen16`), f32 ->
        // bf16 (`to_bf16_impl`); the tails go through the scalar code.

        /// f32 lanes a register.
        const LANES: usize = $lanes;

        /// `LANES` f16 at `p` as f32 lanes.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn f16_lanes($fp: *const u8) -> $f32x {
            $f16
        }

        /// `LANES` bf16 at `p` as f32 lanes (the bits become the top half).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn bf16_lanes($bp: *const u8) -> $f32x {
            $bf16
        }

        /// `LANES` f32 lanes rounded to bf16 at `dst` (as `half::bf16::from_f32`).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn store_bf16_lanes($rv: $f32x, $rd: *mut bf16) {
            $round
        }

        /// BF16 (`BF`) or F16 to f32, `LANES` at a time; the tail through the scalar code.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn widen16<const BF: bool>(src: &[u8], dst: &mut [f32]) {
            let n = dst.len() / LANES * LANES;
            for i in (0..n).step_by(LANES) {
                let p = src.as_ptr().add(2 * i);
                let v = if BF { bf16_lanes(p) } else { f16_lanes(p) };
                $store(dst.as_mut_ptr().add(i), v);
            }
            let (src, dst) = (&src[2 * n..], &mut dst[n..]);
            if BF {
                crate::quant::scalar::dequant_bf16(src, dst)
            } else {
                crate::quant::scalar::dequant_f16(src, dst)
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn to_bf16_impl(src: &[f32], dst: &mut [bf16]) {
            let n = src.len().min(dst.len()) / LANES * LANES;
            for i in (0..n).step_by(LANES) {
                store_bf16_lanes($load(src.as_ptr().add(i)), dst.as_mut_ptr().add(i));
            }
            for (o, v) in dst[n..].iter_mut().zip(&src[n..]) {
                *o = bf16_of(*v);
            }
        }

        /// The block kernel for `qtype` writing `O`, as a safe function pointer, or `None` for the
        /// types without one (F16/BF16/F32 and NF4).
        fn block_kernel<O: Out>(qtype: QType) -> Option<fn(&[u8], &mut [O])> {
            macro_rules! safe {
                // `$kernel` names the generic kernel at `w`'s own `O`.
                ($kernel:expr) => {{
                    fn w<O: Out>(src: &[u8], dst: &mut [O]) {
                        // SAFETY: only handed out by `dequant_fn` / `dequant_bf16_fn` below, which
                        // `simd::dequant_fn` / `simd::dequant_bf16_fn` reach after checking this
                        // CPU has `$features`.
                        unsafe { $kernel(src, dst) }
                    }
                    w::<O> as fn(&[u8], &mut [O])
                }};
            }
            Some(match qtype {
                QType::Q4_0 => safe!(q4_0::<O>),
                QType::Q4_1 => safe!(q4_1::<O>),
                QType::Q5_0 => safe!(q5_0::<O>),
                QType::Q5_1 => safe!(q5_1::<O>),
                QType::Q8_0 => safe!(q8_0::<O>),
                QType::Q2_K => safe!(q2_k::<O>),
                QType::Q3_K => safe!(q3_k::<O>),
                QType::Q4_K => safe!(k4_like::<O, false>),
                QType::Q5_K => safe!(k4_like::<O, true>),
                QType::Q6_K => safe!(q6_k::<O>),
                QType::F16 | QType::BF16 | QType::F32 | QType::NF4 => return None,
            })
        }

        /// This level's kernel for `qtype` (callers must have checked the CPU features).
        pub(in crate::quant::simd) fn dequant_fn(qtype: QType) -> Option<DequantFn> {
            fn f16<const BF: bool>(src: &[u8], dst: &mut [f32]) {
                // SAFETY: as `block_kernel`'s: reached only after the feature check.
                unsafe { widen16::<BF>(src, dst) }
            }
            match qtype {
                QType::F16 => Some(f16::<false>),
                QType::BF16 => Some(f16::<true>),
                // F32 is a copy; NF4 is not a ggml block type.
                _ => block_kernel::<f32>(qtype),
            }
        }

        /// This level's kernel for `qtype` writing bf16 (each value rounded once, in the register);
        /// F16/BF16/F32 take the staged path.
        pub(in crate::quant::simd) fn dequant_bf16_fn(qtype: QType) -> Option<DequantBf16Fn> {
            block_kernel::<bf16>(qtype)
        }

        /// f32 -> bf16 (round to nearest even, NaN quietened), as `half::bf16::from_f32`.
        /// Only handed out by `simd::f32_to_bf16_fn` after the feature check.
        pub(in crate::quant::simd) fn to_bf16(src: &[f32], dst: &mut [bf16]) {
            // SAFETY: see `dequant_fn`.
            unsafe { to_bf16_impl(src, dst) }
        }

        /// The scalar f32 -> bf16 step for tails.
        #[inline(always)]
        fn bf16_of(v: f32) -> bf16 {
            bf16::from_f32(v)
        }
    };
}

/// 8-lane bf16 rounding of a register of f32 bits: `(x + 0x7fff + lsb) >> 16`, NaN -> `x >> 16 |
/// 0x40`. Returns 32-bit lanes holding the 16-bit results.
macro_rules! bf16_round_body {
    ($x:expr, $and:ident, $add:ident, $srli:ident, $or:ident, $set1:ident, $cmpgt:ident, $blend:ident) => {{
        let x = $x;
        let lsb = $and($srli::<16>(x), $set1(1));
        let rne = $srli::<16>($add($add(x, $set1(0x7fff)), lsb));
        let nan = $cmpgt($and(x, $set1(0x7fff_ffff)), $set1(0x7f80_0000));
        let q = $or($srli::<16>(x), $set1(0x40));
        $blend(rne, q, nan)
    }};
}

pub mod avx2 {
    x86_kernels!(
        "avx2,fma,f16c",
        lanes: 8 of __m256, __m256i,
        f32 ops: _mm256_set1_ps, _mm256_mul_ps, _mm256_add_ps, _mm256_sub_ps, _mm256_cvtepi32_ps,
            _mm256_loadu_ps, _mm256_storeu_ps,
        widen_i8::<SIGNED>(c) = if SIGNED {
            [_mm256_cvtepi8_epi32(c), _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(c))]
        } else {
            [_mm256_cvtepu8_epi32(c), _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(c))]
        },
        f16_lanes(p) = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        bf16_lanes(p) = {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        },
        store_bf16_lanes(v, dst) = {
            let x = _mm256_castps_si256(v);
            let r = bf16_round_body!(x, _mm256_and_si256, _mm256_add_epi32, _mm256_srli_epi32,
                _mm256_or_si256, _mm256_set1_epi32, _mm256_cmpgt_epi32, _mm256_blendv_epi8);
            let packed =
                _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
            _mm_storeu_si128(dst as *mut __m128i, packed)
        },
    );
}

/// The 512-bit instantiation of [`x86_kernels!`] for the feature string `$features`, with its
/// bf16 store: the two AVX-512 modules differ only there.
macro_rules! avx512_kernels {
    ($features:literal, store_bf16_lanes($v:ident, $d:ident) = $round:expr $(,)?) => {
        x86_kernels!(
            $features,
            lanes: 16 of __m512, __m512i,
            f32 ops: _mm512_set1_ps, _mm512_mul_ps, _mm512_add_ps, _mm512_sub_ps,
                _mm512_cvtepi32_ps, _mm512_loadu_ps, _mm512_storeu_ps,
            widen_i8::<SIGNED>(c) = if SIGNED {
                [_mm512_cvtepi8_epi32(c)]
            } else {
                [_mm512_cvtepu8_epi32(c)]
            },
            f16_lanes(p) = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            bf16_lanes(p) = {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
            },
            store_bf16_lanes($v, $d) = $round,
        );
    };
}

pub mod avx512 {
    use std::arch::x86_64::{__m512i, _mm512_cmpgt_epi32_mask, _mm512_mask_blend_epi32};

    /// Signed 32-bit `a > b` as a k-mask.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn cmpgt512(a: __m512i, b: __m512i) -> u16 {
        _mm512_cmpgt_epi32_mask(a, b)
    }

    /// `b` where the mask bit is set, else `a`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn blend512(a: __m512i, b: __m512i, k: u16) -> __m512i {
        _mm512_mask_blend_epi32(k, a, b)
    }
    avx512_kernels!(
        "avx512f,avx512bw,avx2,fma,f16c",
        store_bf16_lanes(v, dst) = {
            let x = _mm512_castps_si512(v);
            let r = bf16_round_body!(
                x,
                _mm512_and_si512,
                _mm512_add_epi32,
                _mm512_srli_epi32,
                _mm512_or_si512,
                _mm512_set1_epi32,
                cmpgt512,
                blend512
            );
            _mm256_storeu_si256(dst as *mut __m256i, _mm512_cvtepi32_epi16(r))
        },
    );

    /// f32 -> bf16 as [`to_bf16`], with AVX-512 BF16's `vcvtneps2bf16` (one instruction for the
    /// integer rounding's ten) for every 16 lanes without an f32 subnormal, which the instruction
    /// reads as zero; a vector with one takes the integer rounding. The same bits as
    /// `half::bf16::from_f32` for every input. Only handed out by `simd::f32_to_bf16_fn` after it
    /// checked AVX-512 BF16.
    pub(in crate::quant::simd) fn to_bf16_cvt(src: &[f32], dst: &mut [bf16]) {
        // SAFETY: the caller checked AVX-512 F, BW and BF16 (and the AVX2 level under them).
        unsafe { to_bf16_cvt_impl(src, dst) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    unsafe fn to_bf16_cvt_impl(src: &[f32], dst: &mut [bf16]) {
        use std::arch::x86_64::{__m256bh, _mm512_cvtneps_pbh, _mm512_set1_epi32};
        use std::arch::x86_64::{_mm512_test_epi32_mask, _mm512_testn_epi32_mask};
        let n = src.len().min(dst.len()) / 16 * 16;
        let (exponent, mantissa) = (_mm512_set1_epi32(0x7f80_0000), _mm512_set1_epi32(0x7f_ffff));
        for i in (0..n).step_by(16) {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let d = dst.as_mut_ptr().add(i);
            let x = _mm512_castps_si512(v);
            // subnormal lanes: exponent bits all zero, mantissa bits not
            if _mm512_testn_epi32_mask(x, exponent) & _mm512_test_epi32_mask(x, mantissa) != 0 {
                store_bf16_lanes(v, d);
            } else {
                let h: __m256bh = _mm512_cvtneps_pbh(v);
                _mm256_storeu_si256(
                    d as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
        }
        for (o, v) in dst[n..].iter_mut().zip(&src[n..]) {
            *o = bf16::from_f32(*v);
        }
    }

    /// Two f32 rows rounded to bf16 and interleaved, `dst[c] = (lo[c], hi[c])` as one u32 (lo in
    /// the low half), as [`super::super::pair_rows_scalar`] but with `vcvtne2ps2bf16` rounding 16
    /// lanes of each row into one register and `vpermw` interleaving them: one pass, where
    /// rounding each row and then pairing took three. A vector with an f32 subnormal in either
    /// row (which the instruction reads as zero) takes the scalar rounding. Only handed out by
    /// `simd::pair_rows_fn` after it checked AVX-512 BF16.
    pub(in crate::quant::simd) fn pair_rows_cvt(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
        // SAFETY: the caller checked AVX-512 F, BW and BF16 (and the AVX2 level under them).
        unsafe { pair_rows_cvt_impl(lo, hi, dst) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    unsafe fn pair_rows_cvt_impl(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
        use std::arch::x86_64::{__m512bh, _mm512_cvtne2ps_pbh, _mm512_set1_epi32};
        use std::arch::x86_64::{_mm512_test_epi32_mask, _mm512_testn_epi32_mask};
        let n = lo.len().min(hi.len()).min(dst.len()) / 16 * 16;
        let (exponent, mantissa) = (_mm512_set1_epi32(0x7f80_0000), _mm512_set1_epi32(0x7f_ffff));
        let subnormal = |v: __m512| {
            let x = _mm512_castps_si512(v);
            _mm512_testn_epi32_mask(x, exponent) & _mm512_test_epi32_mask(x, mantissa) != 0
        };
        // word 2i of the result is lo's lane i (word i of the conversion), word 2i + 1 hi's
        // (word 16 + i); a constant, so a call (a row pair) costs one load for it
        const ORDER: [i16; 32] = {
            let mut o = [0i16; 32];
            let mut i = 0;
            while i < 32 {
                o[i] = (i / 2 + 16 * (i % 2)) as i16;
                i += 1;
            }
            o
        };
        let order = _mm512_loadu_si512(ORDER.as_ptr() as *const _);
        for i in (0..n).step_by(16) {
            let (l, h) = (
                _mm512_loadu_ps(lo.as_ptr().add(i)),
                _mm512_loadu_ps(hi.as_ptr().add(i)),
            );
            if subnormal(l) || subnormal(h) {
                super::super::pair_rows_scalar(&lo[i..i + 16], &hi[i..i + 16], &mut dst[i..i + 16]);
            } else {
                // words 0..16: lo rounded, 16..32: hi rounded
                let r: __m512bh = _mm512_cvtne2ps_pbh(h, l);
                let r = std::mem::transmute::<__m512bh, __m512i>(r);
                let d = dst.as_mut_ptr().add(i);
                _mm512_storeu_si512(d as *mut _, _mm512_permutexvar_epi16(order, r));
            }
        }
        super::super::pair_rows_scalar(&lo[n..], &hi[n..], &mut dst[n..]);
    }
}

/// The AVX-512 kernels again with AVX-512 BF16's `vcvtneps2bf16` for the bf16 output: one
/// instruction for the ten of the integer rounding. It rounds to nearest even and quietens NaN as
/// `half` does, but reads f32 subnormals as zero: no dequantised value is one (every f16 scale is a
/// multiple of 2^-24, so each product and difference is 0 or at least 2^-24 in magnitude), and
/// `to_bf16` (which takes any f32) stays on the integer rounding of `avx512`: only this module's
/// `dequant_bf16_fn` is handed out.
#[allow(dead_code)]
pub mod avx512bf16 {
    avx512_kernels!(
        "avx512f,avx512bw,avx512bf16,avx2,fma,f16c",
        store_bf16_lanes(v, dst) = {
            let h: __m256bh = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                dst as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(h),
            )
        },
    );
}

/// Q4_0 and Q4_K into bf16 through a 16-entry table per scale: a block's (or sub-block's) sixteen
/// possible values are computed once as the f32 kernels compute each (`f32(q) · d`, or
/// `f32(q) · dl − ml`) and rounded, two (sub-)blocks' tables in one register by one
/// `vcvtne2ps2bf16`, then `vpermw` looks the 32 codes of a (sub-)block up in them (the second
/// block's codes or'ed with 16): the same bits as the kernels above, in a third of the
/// instructions. Q6_K (sixteen values a scale: a table would cost what it saves) gets a kernel
/// that takes its scales as one vector. AVX-512 BW and BF16 (the caller checked:
/// `simd::dequant_bf16_fn`).
pub mod avx512bf16_blocks;
