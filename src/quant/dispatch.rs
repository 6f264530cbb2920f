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
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
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
        [
            SimdLevel::Scalar,
            SimdLevel::Neon,
            SimdLevel::Avx2,
            SimdLevel::Avx512,
        ]
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

/// The dequantiser for `qtype` at `level` (falls back to the best lower level where a type has no
/// kernel at `level`, and to scalar for a level this CPU lacks). NF4 is not a ggml block type: its
/// kernels live in `nf4` and take their statistics beside the codes.
pub fn dequant_fn(qtype: QType, level: SimdLevel) -> DequantFn {
    // A level above what the CPU runs is never handed out: the SIMD kernels assume their features.
    let best = SimdLevel::detect();
    let ok = match level {
        SimdLevel::Scalar => true,
        SimdLevel::Neon => best == SimdLevel::Neon,
        SimdLevel::Avx2 | SimdLevel::Avx512 => best != SimdLevel::Neon && level <= best,
    };
    if ok {
        if let Some(f) = super::simd::dequant_fn(qtype, level) {
            return f;
        }
    }
    scalar_fn(qtype)
}

/// The scalar reference dequantiser for `qtype`.
fn scalar_fn(qtype: QType) -> DequantFn {
    match qtype {
        QType::F32 => scalar::dequant_f32,
        QType::F16 => scalar::dequant_f16,
        QType::BF16 => scalar::dequant_bf16,
        QType::Q4_0 => scalar::dequant_q4_0,
        QType::Q4_1 => scalar::dequant_q4_1,
        QType::Q5_0 => scalar::dequant_q5_0,
        QType::Q5_1 => scalar::dequant_q5_1,
        QType::Q8_0 => scalar::dequant_q8_0,
        QType::Q2_K => scalar::dequant_q2_k,
        QType::Q3_K => scalar::dequant_q3_k,
        QType::Q4_K => scalar::dequant_q4_k,
        QType::Q5_K => scalar::dequant_q5_k,
        QType::Q6_K => scalar::dequant_q6_k,
        // Reaching this is a caller bug: NF4 tensors go through `nf4::Nf4Ref`, never raw blocks.
        QType::NF4 => panic!("NF4 has no ggml block dequantiser; use quant::nf4::Nf4Ref"),
    }
}

/// Dequantises whole blocks of `qtype` from `src` into `dst` with the active kernel.
/// `src` must hold exactly the blocks of `dst.len()` elements (callers check sizes against the
/// file first; a mismatch here is a bug, not bad input).
pub fn dequantize_f32(qtype: QType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len()),
        qtype.bytes_for(dst.len()),
        "dequantize_f32({}): src/dst sizes disagree",
        qtype.name()
    );
    // Called once per row of every weight tile: look the kernel up in a table built once, rather
    // than re-running feature detection per call.
    static TABLE: OnceLock<Vec<DequantFn>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t: Vec<DequantFn> = vec![scalar::dequant_f32; QType::ALL.len()];
        for q in QType::ALL.into_iter().filter(|q| *q != QType::NF4) {
            t[q as usize] = dequant_fn(q, active_level());
        }
        t
    });
    assert!(
        qtype != QType::NF4,
        "NF4 has no ggml block dequantiser; use quant::nf4::Nf4Ref"
    );
    table[qtype as usize](src, dst)
}

/// A dequantiser into bf16: `src` holds exactly `dst.len() / block_size` blocks.
pub type DequantBf16Fn = fn(&[u8], &mut [bf16]);

/// Dequantises whole blocks into bf16 (round to nearest even, NaN stays NaN): the f32 kernel's
/// values rounded once. Types with a bf16-output kernel at the active level round in the register;
/// the others go through an f32 stack buffer that stays in L1.
pub fn dequantize_bf16(qtype: QType, src: &[u8], dst: &mut [bf16]) {
    // Called once per row of every weight tile: the kernels are looked up once, as in
    // `dequantize_f32`.
    static TABLE: OnceLock<Vec<Option<DequantBf16Fn>>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = vec![None; QType::ALL.len()];
        for q in QType::ALL {
            t[q as usize] = super::simd::dequant_bf16_fn(q, active_level(), false);
        }
        t
    });
    match table[qtype as usize] {
        Some(f) => {
            check_bf16_sizes(qtype, src, dst);
            f(src, dst)
        }
        None => dequantize_bf16_staged(qtype, active_level(), src, dst),
    }
}

/// [`dequantize_bf16`] with an explicit SIMD level (tests and benches compare levels); at the
/// AVX-512 level `integer_rounding` picks the kernels that round without AVX-512 BF16.
pub fn dequantize_bf16_at(
    qtype: QType,
    level: SimdLevel,
    integer_rounding: bool,
    src: &[u8],
    dst: &mut [bf16],
) {
    match super::simd::dequant_bf16_fn(qtype, level, integer_rounding) {
        Some(f) => {
            check_bf16_sizes(qtype, src, dst);
            f(src, dst)
        }
        None => dequantize_bf16_staged(qtype, level, src, dst),
    }
}

fn check_bf16_sizes(qtype: QType, src: &[u8], dst: &[bf16]) {
    assert_eq!(
        Some(src.len()),
        qtype.bytes_for(dst.len()),
        "dequantize_bf16({}): src/dst sizes disagree",
        qtype.name()
    );
}

/// The f32 kernel into an L1 stack buffer, then rounded: the reference the bf16-output kernels
/// equal bit for bit, and the path of types without one.
pub fn dequantize_bf16_staged(qtype: QType, level: SimdLevel, src: &[u8], dst: &mut [bf16]) {
    let bs = qtype.block_size();
    let ts = qtype.type_size();
    check_bf16_sizes(qtype, src, dst);
    // 1024 elements per pass: a multiple of every block size, and small enough to stay in L1.
    const CHUNK: usize = 1024;
    let mut buf = [0f32; CHUNK];
    let deq = dequant_fn(qtype, level);
    let cvt = super::simd::f32_to_bf16_fn(level);
    for (i, out) in dst.chunks_mut(CHUNK).enumerate() {
        let s = &src[i * (CHUNK / bs) * ts..][..out.len() / bs * ts];
        deq(s, &mut buf[..out.len()]);
        cvt(&buf[..out.len()], out);
    }
}

/// Types `quantize` can write (ggml types; NF4 has its own writer in `nf4`).
pub const QUANTIZABLE: [QType; 4] = [QType::Q4_0, QType::Q8_0, QType::Q4_K, QType::Q6_K];

/// Quantises `src` (a whole number of blocks of `qtype`) into `dst` (exactly the bytes of those
/// blocks). Errors for a type we do not write or sizes that do not match. Large inputs are split
/// into chunks of blocks quantised in parallel (blocks are independent, so the bytes are the same).
pub fn quantize(qtype: QType, src: &[f32], dst: &mut [u8]) -> crate::Result<()> {
    use rayon::prelude::*;
    let f: fn(&[f32], &mut [u8]) = match qtype {
        QType::Q8_0 => scalar::quant_q8_0,
        QType::Q4_0 => scalar::quant_q4_0,
        QType::Q4_K => scalar::quant_q4_k,
        QType::Q6_K => scalar::quant_q6_k,
        t => {
            return Err(crate::Error::Invalid(format!(
                "quantising to {} is not supported; qtune writes {}",
                t.name(),
                QUANTIZABLE.map(|t| t.name()).join(", ")
            )))
        }
    };
    let bs = qtype.block_size();
    let Some(nbytes) = qtype.bytes_for(src.len()) else {
        return Err(crate::Error::Invalid(format!(
            "cannot quantise {} values to {}: not a whole number of {bs}-element blocks",
            src.len(),
            qtype.name()
        )));
    };
    if dst.len() != nbytes {
        return Err(crate::Error::Invalid(format!(
            "quantising {} values to {} needs {nbytes} bytes of output, got {}",
            src.len(),
            qtype.name(),
            dst.len()
        )));
    }
    // 16 K-quant super-blocks (or 128 small blocks) per task: enough work to amortise a task.
    let chunk = 4096;
    if src.len() <= chunk {
        f(src, dst);
    } else {
        src.par_chunks(chunk)
            .zip(dst.par_chunks_mut(chunk / bs * qtype.type_size()))
            .for_each(|(s, d)| f(s, d));
    }
    Ok(())
}
