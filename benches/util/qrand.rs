//! Random quantised weights for the matmul tests and benches (shared by `tests/matmul.rs` and
//! `benches/kernels.rs` through `#[path]`). Blocks are random bytes, except each block's f16 scale
//! fields, which are set to small finite values: every bit pattern of the quant fields is legal, so
//! this reaches every code path of a dequantiser without needing a quantiser.
#![allow(dead_code)]
use half::{bf16, f16};
use qtune::quant::QType;

/// Types the matmul tests and dequantisation benches run on: every ggml type (NF4 is built by its
/// quantiser in the tests instead).
pub const MATMUL_TYPES: &[QType] = &[
    QType::F32,
    QType::F16,
    QType::BF16,
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::Q2_K,
    QType::Q3_K,
    QType::Q4_K,
    QType::Q5_K,
    QType::Q6_K,
];

/// Quantised types the matmul benches time (a subset of [`MATMUL_TYPES`]: the ones 7B files use).
pub const BENCH_TYPES: &[QType] = &[QType::Q4_0, QType::Q8_0, QType::Q4_K, QType::Q6_K];

/// splitmix64: a tiny deterministic generator, so fixtures need no `rand` dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` values uniform in [-1, 1).
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// Byte offsets of the f16 scale fields inside one block (ggml's `block_*` structs).
pub fn f16_fields(t: QType) -> &'static [usize] {
    match t {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 => &[0, 2],
        QType::Q4_K | QType::Q5_K => &[0, 2], // d, dmin, then scales and quants
        QType::Q2_K => &[80, 82],             // scales[16], qs[64], d, dmin
        QType::Q3_K => &[108],                // hmask[32], qs[64], scales[12], d
        QType::Q6_K => &[208],                // ql[128], qh[64], scales[16], d
        QType::F32 | QType::F16 | QType::BF16 | QType::NF4 => &[],
    }
}

/// Bytes of a random `rows × cols` matrix of ggml type `t` (not NF4).
pub fn random_weights(t: QType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let n = rows * cols;
    match t {
        QType::F32 => (0..n)
            .flat_map(|_| (rng.uniform() * 0.1).to_le_bytes())
            .collect(),
        QType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.uniform() * 0.1).to_le_bytes())
            .collect(),
        QType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.uniform() * 0.1).to_le_bytes())
            .collect(),
        QType::NF4 => panic!("random_weights: NF4 is not a ggml block type"),
        _ => {
            let len = t
                .bytes_for(n)
                .expect("cols must be a multiple of the block size");
            let mut b: Vec<u8> = (0..len.div_ceil(8))
                .flat_map(|_| rng.next_u64().to_le_bytes())
                .collect();
            b.truncate(len);
            let ts = t.type_size();
            for blk in b.chunks_exact_mut(ts) {
                for &o in f16_fields(t) {
                    // Scales in ±[0.002, 0.02]: finite, and outputs of order 1 for K ~ 1000s.
                    let v = 0.002 + 0.018 * (rng.uniform() * 0.5 + 0.5);
                    let v = if rng.next_u64() & 1 == 0 { v } else { -v };
                    blk[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            b
        }
    }
}
