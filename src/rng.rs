//! SplitMix64 (Steele, Lea and Flood, 2014): the one small, seedable, dependency-free generator
//! behind every seeded choice (data order, LoRA's A and dropout masks, prompt-learning rows), so
//! a result depends on its seed alone.

/// SplitMix64's state: `next` adds the golden-ratio increment and mixes the sum.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The state increment, 2^64 / φ.
    pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

    /// The output function: a 64-bit finaliser of `z`.
    pub fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits of `z`.
    pub fn unit(z: u64) -> f64 {
        (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GOLDEN);
        Self::mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        Self::unit(self.next())
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our sizes).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }

    /// N(0, 1) by Box-Muller.
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (1.0 - self.next_f64(), self.next_f64());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    /// The reference sequence of SplitMix64 from seed 0 (Vigna's splitmix64.c).
    #[test]
    fn matches_the_reference_sequence() {
        let mut r = SplitMix64(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next(), 0x06c4_5d18_8009_454f);
    }
}
