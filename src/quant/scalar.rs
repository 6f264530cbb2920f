//! Scalar reference kernels: one dequantiser (and, where we write the type, one quantiser) per type.
//! These define correctness: they are tested bit-exact against gguf-py and bitsandbytes fixtures, and
//! every SIMD kernel is tested equal to them. Keep them simple and obviously right.
//!
//! Signature shared by every dequantiser: `fn(src: &[u8], dst: &mut [f32])`, where `src` holds
//! exactly `dst.len() / block_size` whole blocks.
//!
//! Arithmetic order follows gguf-py (which here agrees with ggml's C reference): the per-sub-block
//! scale `d * sc` is rounded to f32 first, then multiplied by the code, then the min is subtracted
//! (or added), each step rounded separately: no fused multiply-add anywhere.
//! (In fact every product here is exact in f32: an f16 significand has 11 bits and the integer
//! factors at most 13 more, e.g. Q6_K's 2047 * 127 * 31 < 2^24. Only the final add/sub of a min
//! rounds, once, so reordering or an FMA would give the same bits; the order is kept anyway so
//! that equality holds by construction, and an FMA-mutated kernel is not a test that can fail.)
use super::blocks::{scale_min_k4, scales_q3_k};
use super::types::QK_K;
use half::f16;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline(always)]
fn arr<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    // The caller passes whole blocks, so the range is always in bounds (an internal invariant).
    b[at..at + N].try_into().expect("block slice")
}

/// F32 (little-endian bytes) to f32.
pub fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// F16 to f32.
pub fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// BF16 to f32: the 16 bits become the top half of the f32, as in ggml and gguf-py. (NaN payloads
/// pass through unchanged; `half::bf16::to_f32` would quieten signalling NaNs.)
pub fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// Q4_0: `w[j] = d * ((qs[j] & 15) - 8)`, `w[j+16] = d * ((qs[j] >> 4) - 8)`.
#[inline(always)]
pub fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs: &[u8; 16] = arr(b, 2);
        for j in 0..16 {
            o[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
            o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: `w = d * q + m`, nibbles as in Q4_0.
#[inline(always)]
pub fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs: &[u8; 16] = arr(b, 4);
        for j in 0..16 {
            o[j] = d * (qs[j] & 0x0f) as f32 + m;
            o[j + 16] = d * (qs[j] >> 4) as f32 + m;
        }
    }
}

/// Q5_0/Q5_1's codes `j` and `j + 16`: the low and high nibbles of `qs[j]`, with bits `j` and
/// `j + 16` of `qh` as their fifth bits.
#[inline(always)]
fn q5_codes(qs: &[u8; 16], qh: u32, j: usize) -> (u8, u8) {
    let lo = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
    let hi = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    (lo, hi)
}

/// Q5_0: `w[j] = d * (q[j] - 16)`, bit 4 of `q[j]` is bit j of `qh`.
#[inline(always)]
pub fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes(*arr(b, 2));
        let qs: &[u8; 16] = arr(b, 6);
        for j in 0..16 {
            let (lo, hi) = q5_codes(qs, qh, j);
            o[j] = (lo as i32 - 16) as f32 * d;
            o[j + 16] = (hi as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: `w = d * q + m`, 5-bit codes as in Q5_0.
#[inline(always)]
pub fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes(*arr(b, 4));
        let qs: &[u8; 16] = arr(b, 8);
        for j in 0..16 {
            let (lo, hi) = q5_codes(qs, qh, j);
            o[j] = d * lo as f32 + m;
            o[j + 16] = d * hi as f32 + m;
        }
    }
}

/// Q8_0: `w[j] = d * qs[j]`.
#[inline(always)]
pub fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (w, q) in o.iter_mut().zip(&b[2..]) {
            *w = (*q as i8) as f32 * d;
        }
    }
}

/// Q2_K: `w = (d * sc) * q - (dmin * m)` per sub-block of 16.
#[inline(always)]
pub fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(84).zip(dst.chunks_exact_mut(QK_K)) {
        let scales: &[u8; 16] = arr(b, 0);
        let qs: &[u8; 64] = arr(b, 16);
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        for h in 0..2 {
            for s in 0..4 {
                // 32 outputs from one 2-bit plane of 32 bytes: sub-blocks 2*(4h+s) and +1.
                let base = h * 128 + s * 32;
                for half in 0..2 {
                    let sc = scales[base / 16 + half];
                    let dl = d * (sc & 0x0f) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    for l in 0..16 {
                        let q = (qs[h * 32 + half * 16 + l] >> (2 * s)) & 3;
                        o[base + half * 16 + l] = dl * q as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Q3_K: `w = (d * (sc - 32)) * (q2 - (hbit ? 0 : 4))` per sub-block of 16.
#[inline(always)]
pub fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(110).zip(dst.chunks_exact_mut(QK_K)) {
        let hmask: &[u8; 32] = arr(b, 0);
        let qs: &[u8; 64] = arr(b, 32);
        let sc = scales_q3_k(arr(b, 96));
        let d = f16_at(b, 108);
        for h in 0..2 {
            for s in 0..4 {
                let base = h * 128 + s * 32;
                let bit = 4 * h + s;
                for half in 0..2 {
                    let dl = d * (sc[base / 16 + half] as i32 - 32) as f32;
                    for l in 0..16 {
                        let i = half * 16 + l;
                        let q2 = ((qs[h * 32 + i] >> (2 * s)) & 3) as i32;
                        let hb = (hmask[i] >> bit) & 1;
                        let q = q2 - if hb != 0 { 0 } else { 4 };
                        o[base + i] = dl * q as f32;
                    }
                }
            }
        }
    }
}

/// A Q4_K or Q5_K super-block `b` (the two share their first 16 bytes) into `o`: eight
/// sub-blocks of 32, sub-block `j = 2c + h` at `o[c * 64 + h * 32..]`, `o = (d * sc) * q - (dmin *
/// m)` with `q = code(c, h, l)` for its element `l`.
#[inline(always)]
fn dequant_k4_like(b: &[u8], o: &mut [f32], code: impl Fn(usize, usize, usize) -> u8) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales: &[u8; 12] = arr(b, 4);
    for c in 0..4 {
        for h in 0..2 {
            let (sc, m) = scale_min_k4(2 * c + h, scales);
            let d1 = d * sc as f32;
            let m1 = dmin * m as f32;
            for l in 0..32 {
                o[c * 64 + h * 32 + l] = d1 * code(c, h, l) as f32 - m1;
            }
        }
    }
}

/// Q4_K: `w = (d * sc) * q - (dmin * m)` per sub-block of 32; q is the low (even sub-blocks) or
/// high nibble of `qs`.
#[inline(always)]
pub fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        let qs: &[u8; 128] = arr(b, 16);
        dequant_k4_like(b, o, |c, h, l| (qs[c * 32 + l] >> (4 * h)) & 0x0f);
    }
}

/// Q5_K: as Q4_K with 5-bit q, whose fifth bit for sub-block `j` is bit `j` of `qh[l]`.
#[inline(always)]
pub fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        let qh: &[u8; 32] = arr(b, 16);
        let qs: &[u8; 128] = arr(b, 48);
        dequant_k4_like(b, o, |c, h, l| {
            let j = 2 * c + h;
            ((qs[c * 32 + l] >> (4 * h)) & 0x0f) | (((qh[l] >> j) & 1) << 4)
        });
    }
}

/// Q6_K: `w = (d * sc) * (q - 32)` per sub-block of 16.
#[inline(always)]
pub fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let ql: &[u8; 128] = arr(b, 0);
        let qh: &[u8; 64] = arr(b, 128);
        let scales: &[u8; 16] = arr(b, 192);
        let d = f16_at(b, 208);
        for a in 0..2 {
            // 128 outputs: element a*128 + s*32 + l takes nibble (s/2) of ql[a*64 + (s%2)*32 + l]
            // and bits 2s..2s+2 of qh[a*32 + l].
            for s in 0..4 {
                let base = a * 128 + s * 32;
                for half in 0..2 {
                    let dl = d * (scales[base / 16 + half] as i8) as f32;
                    for l in half * 16..half * 16 + 16 {
                        let lo = (ql[a * 64 + (s % 2) * 32 + l] >> (4 * (s / 2))) & 0x0f;
                        let hi = (qh[a * 32 + l] >> (2 * s)) & 3;
                        let q = (lo | (hi << 4)) as i32 - 32;
                        o[base + l] = dl * q as f32;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantisers. Q8_0 and Q4_0 reproduce gguf-py's `quantize` bit for bit (its arithmetic, including
// Q4_0's f64 rounding step, which is how gguf-py matches ggml's FMA-contracted C reference).
// Q4_K is our own implementation of ggml's reference search (see `quant_q4_k`).

/// Q8_0 quantiser: `d = amax / 127`, `q = round_half_away(x / d)`.
pub fn quant_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(34)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, v) in b[2..].iter_mut().zip(x) {
            // f32::round rounds half away from zero, as ggml's roundf.
            *q = ((v * id).round() as i8) as u8;
        }
    }
}

/// The value of largest magnitude with its sign (the first one on ties; 0 for none) and that
/// magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// Q4_0 quantiser: `d = x[argmax |x|] / -8`, `q = trunc(x / d + 8.5)` clamped to 0..=15.
pub fn quant_q4_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(18)) {
        // The signed value of largest magnitude, so that it maps to code 0.
        let (max, _) = signed_absmax(x);
        let d = max / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        // x·id + 8.5 exactly (f64), rounded to f32 and then truncated: ggml's FMA `x0 + 8.5f`
        // and gguf-py's `np.trunc(.., dtype=np.float32)` (5.99999993 rounds to 6.0 first).
        let q = |v: f32| (((v as f64 * id as f64 + 8.5) as f32).trunc() as u8).min(15);
        for j in 0..16 {
            b[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
        }
    }
}

/// Round to nearest, ties to even, as an i32 (what ggml's `nearest_int` bit trick computes).
#[inline]
fn nearest(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Fits `x ≈ scale * l + min` with integer `l` in `0..=nmax` and `min <= 0`, minimising the
/// weighted squared error: start from the min/max grid, then try `nstep + 1` slightly different
/// grids and solve the 2-parameter least-squares problem for each (ggml's `make_qkx2_quants`).
/// Returns `(scale, -min)` and leaves the codes in `l`.
fn fit_scale_min(
    x: &[f32],
    w: &[f32],
    l: &mut [u8],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let sum_w: f32 = w.iter().sum();
    let sum_x: f32 = x.iter().zip(w).map(|(x, w)| x * w).sum();
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..n {
        let q = nearest(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best += w[i] * diff * diff;
    }
    let mut trial = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = q as u8;
            let q = q as f32;
            sl += w[i] * q;
            sl2 += w[i] * q * q;
            sxl += w[i] * q * x[i];
        }
        let det = sum_w * sl2 - sl * sl;
        if det > 0.0 {
            let mut this_scale = (sum_w * sxl - sum_x * sl) / det;
            let mut this_min = (sl2 * sum_x - sl * sxl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sxl / sl2;
            }
            let mut err = 0f32;
            for i in 0..n {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                err += w[i] * diff * diff;
            }
            if err < best {
                l[..n].copy_from_slice(&trial[..n]);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K quantiser (ggml's reference approach): each sub-block of 32 gets a scale and min from a
/// weighted least-squares search (weights `rms(x) + |x|` favour large values); the 8 scales and 8
/// mins are then quantised to 6 bits against the super-block's f16 `d` and `dmin`, and the codes
/// recomputed against those rounded values.
pub fn quant_q4_k(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(144)) {
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        let mut w = [0f32; 32];
        for j in 0..8 {
            let xs = &x[32 * j..32 * j + 32];
            let av = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
            for (wi, v) in w.iter_mut().zip(xs) {
                *wi = av + v.abs();
            }
            (scales[j], mins[j]) =
                fit_scale_min(xs, &w, &mut l[32 * j..32 * j + 32], 15, -1.0, 0.1, 20);
        }
        let max_scale = scales.iter().copied().fold(0f32, f32::max);
        let max_min = mins.iter().copied().fold(0f32, f32::max);
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut ls = [0u8; 8];
        let mut lm = [0u8; 8];
        for j in 0..8 {
            ls[j] = nearest(inv_scale * scales[j]).clamp(0, 63) as u8;
            lm[j] = nearest(inv_min * mins[j]).clamp(0, 63) as u8;
        }
        // 12-byte packing: the inverse of `blocks::scale_min_k4`.
        let mut sc = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                sc[j] = ls[j];
                sc[j + 4] = lm[j];
            } else {
                sc[j + 4] = (ls[j] & 15) | ((lm[j] & 15) << 4);
                sc[j - 4] |= (ls[j] >> 4) << 6;
                sc[j] |= (lm[j] >> 4) << 6;
            }
        }
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        b[0..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_le_bytes());
        b[4..16].copy_from_slice(&sc);
        // Recompute the codes against the scales as they will be decoded.
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &sc);
            let dj = d.to_f32() * s as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for i in 32 * j..32 * j + 32 {
                l[i] = nearest((x[i] + dm) / dj).clamp(0, 15) as u8;
            }
        }
        let qs = &mut b[16..144];
        for c in 0..4 {
            for i in 0..32 {
                qs[c * 32 + i] = l[c * 64 + i] | (l[c * 64 + 32 + i] << 4);
            }
        }
    }
}

/// Fits `x ≈ scale * l` with integer `l` in `-nmax..nmax`, minimising the x²-weighted squared
/// error: start from the grid through the largest-magnitude value, then try 18 nearby grids and
/// keep the best least-squares scale (ggml's `make_qx_quants` with its `rmse_type = 1`).
/// Returns the scale and leaves the biased codes `l + nmax` in `l_out`.
fn fit_scale_signed(x: &[f32], l_out: &mut [u8], nmax: i32) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        l_out.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (o, &v) in l_out.iter_mut().zip(x) {
        *o = (code(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let trial = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(trial);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            iscale = trial;
            for (o, &v) in l_out.iter_mut().zip(x) {
                *o = (code(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K quantiser (ggml's reference approach): a signed least-squares scale per sub-block of 16,
/// those 16 scales quantised to int8 against the super-block's f16 `d`, then the 6-bit codes
/// recomputed against the rounded scales.
pub fn quant_q6_k(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(210)) {
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for j in 0..16 {
            scales[j] = fit_scale_signed(&x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16], 32);
            if scales[j].abs() > max_abs {
                max_abs = scales[j].abs();
                max_scale = scales[j];
            }
        }
        b.fill(0);
        if max_abs < 1e-15 {
            continue; // all-zero block: d = 0, codes 0
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        b[208..210].copy_from_slice(&d.to_le_bytes());
        let mut sc = [0i8; 16];
        for j in 0..16 {
            sc[j] = nearest(iscale * scales[j]).min(127) as i8;
            b[192 + j] = sc[j] as u8;
        }
        for (j, &s) in sc.iter().enumerate() {
            let dj = d.to_f32() * s as f32;
            if dj == 0.0 {
                continue;
            }
            for i in 16 * j..16 * j + 16 {
                l[i] = (nearest(x[i] / dj).clamp(-32, 31) + 32) as u8;
            }
        }
        // Layout: see `dequant_q6_k` (element a*128 + s*32 + i).
        for a in 0..2 {
            let l = &l[128 * a..128 * a + 128];
            for i in 0..32 {
                b[64 * a + i] = (l[i] & 15) | ((l[i + 64] & 15) << 4);
                b[64 * a + 32 + i] = (l[i + 32] & 15) | ((l[i + 96] & 15) << 4);
                b[128 + 32 * a + i] = (l[i] >> 4)
                    | ((l[i + 32] >> 4) << 2)
                    | ((l[i + 64] >> 4) << 4)
                    | ((l[i + 96] >> 4) << 6);
            }
        }
    }
}
