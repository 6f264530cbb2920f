//! Blockwise 8-bit AdamW moments, as bitsandbytes' `AdamW8bit` keeps them (its CUDA kernel
//! `kOptimizerStatic8bit2StateBlockwise`, bnb 0.47: blocks of 256, `min_8bit_size` 4096).
//!
//! Each parameter's first moment is stored as one byte per element, an index into bnb's signed
//! dynamic map (`create_dynamic_map(signed=True)`), the second moment as an index into the unsigned
//! one (`signed=False`: the second moment is never negative, so all 256 codes go to [0, 1]); each
//! block of 256 elements has one f32 absmax per moment. A step dequantises a block (code x absmax),
//! updates both moments in f32, takes the block's new absmax from the updated values, updates the
//! parameter from the f32 moments, and only then requantises them (nearest code). So the 8-bit
//! rounding enters the next step's moments, never this step's update.
//!
//! The update follows the kernel's arithmetic, not torch's AdamW: `m = m*b1 + (1-b1)*g`,
//! `v = v*b2 + (1-b2)*g*g`, `p += -lr*sqrt(bc2)/bc1 * m / (sqrt(v) + sqrt(bc2)*eps)`, and the
//! decoupled weight decay `p *= 1 - lr*wd` after the update (torch applies it before). Our scalars
//! are computed in f64 and rounded to f32 once (the kernel uses the approximate GPU intrinsics
//! `__powf` and `__fdividef`, which have no bit-level CPU equivalent), and the per-element
//! arithmetic is plain f32 without FMA so that a numpy float32 reference reproduces it bit for bit
//! (tests/reference/gen_optim_fixtures.py). As in the kernel, an element with a non-finite gradient
//! keeps its parameter and gets zero moments.
//!
//! Quantisation is the kernel's `quantize_2D`: nearest code by comparing with the f32 midpoint of
//! the two codes around the value, a value exactly on a midpoint taking the even index; then the
//! first moment's code is moved one step if its sign differs from the moment's (a small negative
//! moment coded to 0.0 becomes the smallest negative code), as the kernel does. The value quantised
//! is `moment / absmax`, an exact f32 division (the kernel's `__fdividef` is approximate). Entry 0
//! of the signed map is -0.99296875 here, as in the kernel's map; bnb's CPU `quantize_blockwise`
//! overwrites it with -1.0 in place (`nf4::dynamic_map` holds that stored form).
use crate::quant::nf4;

/// Elements per 8-bit block (bnb's blockwise optimizers use 256).
pub const BLOCK: usize = 256;
/// Parameters with fewer elements keep 32-bit moments (bnb's `min_8bit_size`): for them the
/// absmax overhead and the precision loss buy nothing.
pub const MIN_8BIT_SIZE: usize = 4096;

/// `create_dynamic_map(signed=False)` of bitsandbytes 0.47.0 as f32 bit patterns (a table, as
/// `nf4::dynamic_map`: torch's f32 `linspace` rounding defines the values).
const UNSIGNED_MAP_BITS: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

/// Entry 0 of `create_dynamic_map(signed=True)` before bnb's CPU quantiser overwrites it: -0.99296875.
const SIGNED_FIRST_BITS: u32 = 0xbf7e3333;
/// Index of 0.0 in the signed map.
const SIGNED_ZERO: u8 = 127;

/// bitsandbytes' signed dynamic map as its 8-bit optimizers use it (entry 0 = -0.99296875).
pub fn signed_map() -> [f32; 256] {
    let mut m = nf4::dynamic_map();
    m[0] = f32::from_bits(SIGNED_FIRST_BITS);
    m
}

/// bitsandbytes' unsigned dynamic map (`create_dynamic_map(signed=False)`), 0.0 to 1.0.
pub fn unsigned_map() -> [f32; 256] {
    UNSIGNED_MAP_BITS.map(f32::from_bits)
}

/// The two 8-bit moments of one parameter: codes (one per element) and per-block f32 absmax.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments8 {
    /// First-moment codes into [`signed_map`].
    pub exp_avg_code: Vec<u8>,
    /// First-moment absmax per block of [`BLOCK`].
    pub exp_avg_absmax: Vec<f32>,
    /// Second-moment codes into [`unsigned_map`].
    pub exp_avg_sq_code: Vec<u8>,
    /// Second-moment absmax per block of [`BLOCK`].
    pub exp_avg_sq_absmax: Vec<f32>,
}

impl Moments8 {
    /// Zero moments for `n` elements: zero codes and zero absmax, as bnb initialises its buffers
    /// (any code times a zero absmax dequantises to zero).
    pub fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK);
        Moments8 {
            exp_avg_code: vec![0; n],
            exp_avg_absmax: vec![0.0; blocks],
            exp_avg_sq_code: vec![0; n],
            exp_avg_sq_absmax: vec![0.0; blocks],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.exp_avg_code.len()
    }

    /// True for a parameter of no elements.
    pub fn is_empty(&self) -> bool {
        self.exp_avg_code.is_empty()
    }

    /// The moments as f32 (code x block absmax), first then second.
    pub fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let deq = |code: &[u8], absmax: &[f32], map: &[f32; 256]| -> Vec<f32> {
            code.iter()
                .enumerate()
                .map(|(i, &c)| map[c as usize] * absmax[i / BLOCK])
                .collect()
        };
        (
            deq(&self.exp_avg_code, &self.exp_avg_absmax, &signed_map()),
            deq(
                &self.exp_avg_sq_code,
                &self.exp_avg_sq_absmax,
                &unsigned_map(),
            ),
        )
    }

    /// Bytes these moments occupy: two codes per element and two absmax per block.
    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.len())
    }

    /// Bytes the 8-bit moments of `n` elements occupy.
    pub fn bytes_for(n: usize) -> usize {
        2 * n + 2 * 4 * n.div_ceil(BLOCK)
    }
}

/// The f32 scalars of one 8-bit step.
pub(crate) struct Coeffs8 {
    b1: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    neg_step: f32,
    eps_hat: f32,
    decay: f32,
}

impl Coeffs8 {
    /// Scalars for step `step` (1-based) at learning rate `lr`, computed in f64, rounded once.
    pub(crate) fn new(beta1: f64, beta2: f64, eps: f64, wd: f64, lr: f64, step: u64) -> Self {
        let t = step as f64;
        let bc1 = 1.0 - beta1.powf(t);
        let bc2_sqrt = (1.0 - beta2.powf(t)).sqrt();
        Coeffs8 {
            b1: beta1 as f32,
            w1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            neg_step: (-lr * bc2_sqrt / bc1) as f32,
            eps_hat: (bc2_sqrt * eps) as f32,
            decay: (1.0 - lr * wd) as f32,
        }
    }
}

/// The two maps, built once per step.
pub(crate) struct Maps {
    signed: [f32; 256],
    unsigned: [f32; 256],
}

impl Maps {
    pub(crate) fn new() -> Self {
        Maps {
            signed: signed_map(),
            unsigned: unsigned_map(),
        }
    }
}

/// The kernel's nearest code of `x` (in [-1, 1], or NaN for an all-zero block) in the increasing
/// `map`: the code just at or below `x` or the next one, split at their f32 midpoint, ties to the
/// even index (where the kernel's 7-step binary search from index 127 always ends). NaN -> `zero`.
#[inline]
fn code_index(x: f32, map: &[f32; 256], zero: u8) -> u8 {
    if x.is_nan() {
        return zero;
    }
    let above = map.partition_point(|&c| c <= x);
    if above == 0 {
        // Below map[0] (the signed map starts at -0.99296875, values reach -1).
        return 0;
    }
    let lo = above - 1;
    if lo == 255 {
        return 255;
    }
    let mid = (map[lo] + map[lo + 1]) * 0.5;
    let hi = lo + 1;
    // Above the midpoint, or exactly on it with `hi` the even index.
    let i = if x > mid || (x == mid && hi.is_multiple_of(2)) {
        hi
    } else {
        lo
    };
    i as u8
}

/// One 8-bit AdamW step on parameter `p` (its f32 master) with gradient `g`.
pub(crate) fn update(k: &Coeffs8, maps: &Maps, p: &mut [f32], st: &mut Moments8, g: &[f32]) {
    let n = p.len();
    debug_assert!(g.len() == n && st.len() == n);
    let (mut s1, mut s2) = ([0f32; BLOCK], [0f32; BLOCK]);
    for b in 0..n.div_ceil(BLOCK) {
        let start = b * BLOCK;
        let len = BLOCK.min(n - start);
        let (a1, a2) = (st.exp_avg_absmax[b], st.exp_avg_sq_absmax[b]);
        let (mut new1, mut new2) = (-f32::MAX, -f32::MAX);
        for j in 0..len {
            let i = start + j;
            let gi = g[i];
            if gi.is_finite() {
                let v = maps.unsigned[st.exp_avg_sq_code[i] as usize] * a2;
                s2[j] = v * k.b2 + k.w2 * gi * gi;
                let m = maps.signed[st.exp_avg_code[i] as usize] * a1;
                s1[j] = m * k.b1 + k.w1 * gi;
            } else {
                s1[j] = 0.0;
                s2[j] = 0.0;
            }
            new1 = new1.max(s1[j].abs());
            new2 = new2.max(s2[j].abs());
        }
        for j in 0..len {
            let i = start + j;
            if g[i].is_finite() {
                let pi = p[i] + k.neg_step * (s1[j] / (s2[j].sqrt() + k.eps_hat));
                p[i] = pi * k.decay;
            }
        }
        st.exp_avg_absmax[b] = new1;
        st.exp_avg_sq_absmax[b] = new2;
        for j in 0..len {
            let i = start + j;
            let mut c1 = code_index(s1[j] / new1, &maps.signed, SIGNED_ZERO);
            // Keep the sign of the moment (the kernel's fix-up): a tiny negative moment must not
            // become +0.0, nor a tiny positive one negative.
            if maps.signed[c1 as usize].is_sign_negative() != s1[j].is_sign_negative() {
                c1 = if s1[j] > 0.0 {
                    c1.wrapping_add(1)
                } else {
                    c1.wrapping_sub(1)
                };
            }
            st.exp_avg_code[i] = c1;
            st.exp_avg_sq_code[i] = code_index(s2[j] / new2, &maps.unsigned, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_increasing_and_span_the_range() {
        for m in [signed_map(), unsigned_map()] {
            assert!(m.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(m[255], 1.0);
        }
        assert_eq!(signed_map()[SIGNED_ZERO as usize], 0.0);
        assert_eq!(unsigned_map()[0], 0.0);
    }

    #[test]
    fn code_index_is_the_nearest_code_with_ties_to_even() {
        let m = unsigned_map();
        for (i, w) in m.windows(2).enumerate() {
            let mid = (w[0] + w[1]) * 0.5;
            let even = if i.is_multiple_of(2) { i } else { i + 1 } as u8;
            assert_eq!(code_index(mid, &m, 0), even, "tie at {i}");
            assert_eq!(code_index(w[0], &m, 0), i as u8);
            assert_eq!(
                code_index(f32::from_bits(mid.to_bits() + 1), &m, 0),
                i as u8 + 1
            );
            assert_eq!(
                code_index(f32::from_bits(mid.to_bits() - 1), &m, 0),
                i as u8
            );
        }
        let s = signed_map();
        assert_eq!(code_index(-1.0, &s, SIGNED_ZERO), 0);
        assert_eq!(code_index(1.0, &s, SIGNED_ZERO), 255);
        assert_eq!(code_index(f32::NAN, &s, SIGNED_ZERO), SIGNED_ZERO);
    }

    #[test]
    fn a_small_negative_moment_keeps_its_sign_and_a_bad_gradient_resets_the_moments() {
        // One block: a large gradient sets the scale, a tiny negative one would round to +0.0.
        let mut g = vec![0f32; 300];
        g[0] = 1.0;
        g[1] = -1e-9;
        g[2] = f32::NAN;
        let mut p = vec![0.5f32; 300];
        let mut st = Moments8::zeros(300);
        let k = Coeffs8::new(0.9, 0.999, 1e-8, 0.0, 1e-3, 1);
        update(&k, &Maps::new(), &mut p, &mut st, &g);
        let (m, v) = st.dequantize();
        assert!(m[1] < 0.0, "{}", m[1]);
        assert_eq!((m[2], v[2], p[2]), (0.0, 0.0, 0.5));
        assert!(p[0] < 0.5 && p[1] > 0.5);
        // The second block (elements 256..300) saw only zero gradients: zero moments, p unchanged.
        assert_eq!(st.exp_avg_absmax[1], 0.0);
        assert!(p[256..].iter().all(|&x| x == 0.5));
    }
}
