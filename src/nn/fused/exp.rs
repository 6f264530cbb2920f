//! `exp` over slices for the fused ops' softmaxes and sigmoids (attention's probabilities, the
//! cross-entropy's, SwiGLU's gate): libm's scalar `expf` was 6–10 % of a ~100M bf16 step's samples
//! (session 14), in bf16 steps (f32 steps keep libm's, see [`exp_shift_sum`]). Cephes'
//! single-precision method, in AVX-512 and AVX2 + FMA lanes with a scalar
//! path of the same steps (aarch64, older x86, and the tails): n = round(x·log2 e),
//! r = x − n·ln 2 (in two parts), e^r by a degree-6 polynomial, times 2^n (as two factors, so that
//! each stays a normal number). Within 2 ulp of exp; below −87.34 (results under the smallest
//! normal f32) it gives 0, above 88.72 +inf, NaN stays NaN.
use crate::quant::dispatch::{active_level, SimdLevel};

/// Inputs below this give 0 (exp(LO) is the smallest normal f32: no denormal results, whose
/// arithmetic is slow on x86).
const LO: f32 = -87.336_55;
/// Inputs above this give +inf (exp(HI) is the largest finite f32).
const HI: f32 = 88.722_83;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: the first exact in few bits, so that n·LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial for e^r on [−ln2/2, ln2/2]: e^r ≈ 1 + r + r²·P(r).
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `x[i] = exp(x[i] − shift)` for every i; returns the sum of the results (f32 lanes, then
/// their sum). With `shift` the row maximum this is a softmax's numerator and denominator.
/// `simd`: these SIMD lanes (a bf16 step's ops); else libm's `expf` one value at a time (f32
/// steps keep the reference's rounding: about 9 % of these lanes' results differ from libm's by
/// an ulp, and the PEFT-parity tests follow six AdamW updates to 5e-4, which magnifies gradients
/// near zero; with these lanes in an f32 step one DoRA case moved to 6.9e-4).
pub(crate) fn exp_shift_sum(x: &mut [f32], shift: f32, simd: bool) -> f32 {
    if !simd {
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
            sum += *v;
        }
        return sum;
    }
    exp_shift_sum_at(active_level(), x, shift)
}

/// [`exp_shift_sum`] at a given SIMD level (tests compare them; a level this CPU lacks runs the
/// scalar path).
pub(crate) fn exp_shift_sum_at(level: SimdLevel, x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if level == SimdLevel::Avx512 && has!("avx512f") {
            // SAFETY: AVX-512 F checked just above.
            return unsafe { x86::exp_shift_sum_avx512(x, shift) };
        }
        if level >= SimdLevel::Avx2 && has!("avx2") && has!("fma") {
            // SAFETY: AVX2 and FMA checked just above.
            return unsafe { x86::exp_shift_sum_avx2(x, shift) };
        }
    }
    let _ = level;
    scalar_shift_sum(x, shift)
}

fn scalar_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = exp_scalar(*v - shift);
        sum += *v;
    }
    sum
}

/// One value, by the SIMD paths' steps (the same fused multiply-adds, so the same result).
#[inline]
pub(crate) fn exp_scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < LO {
        return 0.0;
    }
    if x > HI {
        return f32::INFINITY;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let p = P[1..].iter().fold(P[0], |p, &c| p.mul_add(r, c));
    let y = (p * r).mul_add(r, r) + 1.0;
    let n = n as i32;
    let (h1, h2) = (n >> 1, n - (n >> 1));
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    y * pow2(h1) * pow2(h2)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// exp of 16 lanes (see the module docs; lanes below LO → 0, above HI → inf, NaN → NaN).
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        // max/min return their second operand when either is NaN: x's NaN carries through
        let xc = _mm512_min_ps(set(HI), _mm512_max_ps(set(LO), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, set(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, set(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, set(LN2_LO), r);
        let mut p = set(P[0]);
        for &c in &P[1..] {
            p = _mm512_fmadd_ps(p, r, set(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), set(1.0));
        let ni = _mm512_cvtps_epi32(n);
        let h1 = _mm512_srai_epi32::<1>(ni);
        let h2 = _mm512_sub_epi32(ni, h1);
        let pow2 = |e: __m512i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                e,
                _mm512_set1_epi32(127),
            )))
        };
        let e = _mm512_mul_ps(_mm512_mul_ps(y, pow2(h1)), pow2(h2));
        let e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(LO)), e, set(0.0));
        _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, set(HI)),
            e,
            set(f32::INFINITY),
        )
    }

    /// [`super::exp_shift_sum`] in 16 lanes (the tail by the scalar steps).
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shift_sum_avx512(x: &mut [f32], shift: f32) -> f32 {
        let (mut acc, s) = (_mm512_setzero_ps(), _mm512_set1_ps(shift));
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), s));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm512_add_ps(acc, e);
        }
        _mm512_reduce_add_ps(acc) + scalar_shift_sum(chunks.into_remainder(), shift)
    }

    /// exp of 8 lanes, as [`exp16`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        let xc = _mm256_min_ps(set(HI), _mm256_max_ps(set(LO), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, set(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, set(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, set(LN2_LO), r);
        let mut p = set(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, set(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), set(1.0));
        let ni = _mm256_cvtps_epi32(n);
        let h1 = _mm256_srai_epi32::<1>(ni);
        let h2 = _mm256_sub_epi32(ni, h1);
        let pow2 = |e: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        let e = _mm256_mul_ps(_mm256_mul_ps(y, pow2(h1)), pow2(h2));
        let e = _mm256_blendv_ps(e, set(0.0), _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(LO)));
        _mm256_blendv_ps(
            e,
            set(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, set(HI)),
        )
    }

    /// [`super::exp_shift_sum`] in 8 lanes (the tail by the scalar steps).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shift_sum_avx2(x: &mut [f32], shift: f32) -> f32 {
        let (mut acc, s) = (_mm256_setzero_ps(), _mm256_set1_ps(shift));
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>() + scalar_shift_sum(chunks.into_remainder(), shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path within 2 ulp of f64's exp over [−90, 90] (plus the edges and the specials), and
    /// the SIMD lanes equal to the scalar steps bit for bit.
    #[test]
    fn exp_is_within_two_ulp_on_every_path() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -90.0 + i as f32 * 9e-4).collect();
        xs.extend([0.0, -0.0, LO, HI, -87.0, 88.5, 1e-30, -1e-30, 0.5, -0.5]);
        let specials = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -1e30, 1e30];
        for level in SimdLevel::available() {
            let mut got = xs.clone();
            let sum = exp_shift_sum_at(level, &mut got, 0.0);
            let mut want_sum = 0f64; // with exp(88.5) in it: +inf
            for (&x, &g) in xs.iter().zip(&got) {
                assert_eq!(g.to_bits(), exp_scalar(x).to_bits(), "{level:?}: exp({x})");
                let w = (x as f64).exp();
                want_sum += g as f64;
                if x < LO {
                    assert_eq!(g, 0.0, "{level:?}: exp({x}) below LO");
                } else if x > HI {
                    assert_eq!(g, f32::INFINITY, "{level:?}: exp({x}) above HI");
                } else if w < 2.0 * f32::MIN_POSITIVE as f64 {
                    // at the edge of the normals: an absolute error of a few denormal steps
                    assert!(
                        (g as f64 - w).abs() < 1e-44,
                        "{level:?}: exp({x}) = {g}, want {w}"
                    );
                } else {
                    let ulp = (w as f32).to_bits().abs_diff(g.to_bits());
                    assert!(ulp <= 2, "{level:?}: exp({x}) = {g}, want {w} ({ulp} ulp)");
                }
            }
            assert!(
                sum.is_infinite() && want_sum.is_infinite(),
                "{level:?}: {sum}"
            );
            // a softmax-like row: the lanes' sum (f32) against the same values' sum in f64
            let mut row: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 8.0).collect();
            let sum = exp_shift_sum_at(level, &mut row, 8.0);
            let want: f64 = row.iter().map(|&e| e as f64).sum();
            assert!(
                ((sum as f64 - want) / want).abs() < 1e-6,
                "{level:?}: {sum} vs {want}"
            );
            let mut sp = specials.to_vec();
            exp_shift_sum_at(level, &mut sp, 0.0);
            assert_eq!(sp[0], 0.0);
            assert_eq!(sp[1], f32::INFINITY);
            assert!(sp[2].is_nan());
            assert_eq!((sp[3], sp[4]), (0.0, f32::INFINITY));
            // a shift is subtracted first
            let mut v = vec![2.0f32; 19];
            exp_shift_sum_at(level, &mut v, 2.0);
            assert!(v.iter().all(|&e| e == 1.0), "{level:?}: exp(2 - 2) = {v:?}");
        }
    }
}
