//! Run-time choice of kernel: the best SIMD level this CPU has, detected once.
//! `QTUNE_SIMD=scalar|avx2|avx512` forces a level (for tests and benchmarks); a level the CPU lacks
//! falls back to the best one it has.
use super::{scalar, QType};
use half::bf16;
use std::sync::OnceLock;

/// Instruction-set level a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    Neon,
    Avx2,
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return SimdLevel::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return SimdLevel::Neon;
            }
        }
        SimdLevel::Scalar
    }

    /// Levels this CPU can run, lowest first (for tests comparing every path to the scalar one).
    pub fn available() -> Vec<SimdLevel> {
        let best = SimdLevel::detect();
        [SimdLevel::Scalar, SimdLevel::Neon, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| match l {
                SimdLevel::Scalar => true,
                SimdLevel::Neon => best == SimdLevel::Neon,
                SimdLevel::Avx2 | SimdLevel::Avx512 => *l <= best && best != SimdLevel::Neon,
            })
            .collect()
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Neon => "neon",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// The level in use: detected once, possibly lowered by `QTUNE_SIMD`.
pub fn active_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = SimdLevel::detect();
        match std::env::var("QTUNE_SIMD").ok().as_deref() {
            Some("scalar") => SimdLevel::Scalar,
            Some("avx2") if best >= SimdLevel::Avx2 && best != SimdLevel::Neon => SimdLevel::Avx2,
            _ => best,
        }
    })
}

/// Name of the kernel family in use (printed by `qtune inspect` and the benches).
pub fn kernel_name() -> &'static str {
    active_level().name()
}

/// A dequantiser: `src` holds exactly `dst.len() / block_size` blocks.
pub type DequantFn = fn(&[u8], &mut [f32]);

/// The dequantiser for `qtype` at `level` (falls back to scalar where no SIMD version exists).
pub fn dequant_fn(qtype: QType, level: SimdLevel) -> DequantFn {
    let _ = level;
    match qtype {
        QType::F32 => scalar::dequant_f32,
        QType::F16 => scalar::dequant_f16,
        QType::BF16 => scalar::dequant_bf16,
        QType::Q4_0 => scalar::dequant_q4_0,
        QType::Q8_0 => scalar::dequant_q8_0,
        t => panic!("no dequantiser for {t:?} yet"),
    }
}

/// Dequantises whole blocks of `qtype` from `src` into `dst` with the active kernel.
pub fn dequantize_f32(qtype: QType, src: &[u8], dst: &mut [f32]) {
    dequant_fn(qtype, active_level())(src, dst)
}

/// Dequantises whole blocks into bf16 (round to nearest even), through an f32 stack buffer.
pub fn dequantize_bf16(qtype: QType, src: &[u8], dst: &mut [bf16]) {
    let bs = qtype.block_size();
    let ts = qtype.type_size();
    // 1024 elements per pass: a multiple of every block size, and small enough to stay in L1.
    const CHUNK: usize = 1024;
    let mut buf = [0f32; CHUNK];
    let per = CHUNK / bs.min(CHUNK) * bs.min(CHUNK);
    for (i, out) in dst.chunks_mut(per).enumerate() {
        let nb = out.len().div_ceil(bs);
        let s = &src[i * (per / bs) * ts..][..nb * ts];
        dequantize_f32(qtype, s, &mut buf[..out.len()]);
        for (o, v) in out.iter_mut().zip(&buf) {
            *o = bf16::from_f32(*v);
        }
    }
}

/// Types `quantize` can write (ggml types; NF4 has its own writer in `nf4`).
pub const QUANTIZABLE: [QType; 3] = [QType::Q4_0, QType::Q8_0, QType::Q4_K];

/// Quantises `src` (a whole number of blocks of `qtype`) into `dst` (exactly the bytes of those
/// blocks). Errors for a type we do not write.
pub fn quantize(qtype: QType, src: &[f32], dst: &mut [u8]) -> crate::Result<()> {
    let _ = (src, dst);
    Err(crate::Error::Invalid(format!("quantising to {} is not implemented yet", qtype.name())))
}
