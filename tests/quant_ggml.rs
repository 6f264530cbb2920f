//! ggml block kernels against gguf-py ground truth (fixtures from
//! tests/reference/gen_ggml_fixtures.py), and every SIMD level against the scalar reference.
use half::{bf16, f16};
use qtune::quant::dispatch::{self, dequant_fn, dequantize_bf16_at, SimdLevel};
use qtune::quant::QType;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ggml")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name))
        .unwrap_or_else(|e| panic!("{name}: {e}; run tests/reference/gen_ggml_fixtures.py"))
}

fn read_f32(name: &str) -> Vec<f32> {
    read(name)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Every type with a ggml block dequantiser.
const TYPES: [QType; 13] = [
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

/// Index of the first element whose bits differ, with both values.
fn first_diff(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
        .map(|(i, (x, y))| (i, *x, *y))
}

#[test]
fn dequant_matches_gguf_py_bit_exactly() {
    for t in TYPES.into_iter().filter(|t| *t != QType::F32) {
        let raw = read(&format!("deq_{}.bin", t.name()));
        let want = read_f32(&format!("deq_{}.f32", t.name()));
        assert_eq!(
            raw.len(),
            t.bytes_for(want.len()).unwrap(),
            "{t:?} fixture sizes"
        );
        for level in SimdLevel::available() {
            let mut got = vec![f32::NAN; want.len()];
            dequant_fn(t, level)(&raw, &mut got);
            if let Some((i, g, w)) = first_diff(&got, &want) {
                panic!(
                    "{} at {}: element {i}: got {g:e}, gguf-py {w:e}",
                    t.name(),
                    level.name()
                );
            }
        }
    }
}

/// xorshift64*: deterministic random bytes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// A finite f16 of magnitude 1e-4 .. 3, either sign.
    fn scale(&mut self) -> f16 {
        let mag = 10f32.powf(-4.0 + 4.5 * self.f32());
        f16::from_f32(if self.next() & 1 == 0 { mag } else { -mag })
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.f32().max(1e-9), self.f32());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

/// Byte offsets of the f16 fields of a block (kept finite so outputs are comparable).
fn f16_fields(t: QType) -> &'static [usize] {
    match t {
        QType::F16 | QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 | QType::Q4_K | QType::Q5_K => &[0, 2],
        QType::Q2_K => &[80, 82],
        QType::Q3_K => &[108],
        QType::Q6_K => &[208],
        _ => &[],
    }
}

fn random_blocks(t: QType, nblocks: usize, rng: &mut Rng) -> Vec<u8> {
    let ts = t.type_size();
    let mut raw: Vec<u8> = (0..nblocks * ts).map(|_| rng.next() as u8).collect();
    for b in raw.chunks_exact_mut(ts) {
        for &off in f16_fields(t) {
            b[off..off + 2].copy_from_slice(&rng.scale().to_le_bytes());
        }
        if t == QType::F32 {
            // Any bit pattern but NaN payloads are fine; keep them finite for readable failures.
            b.copy_from_slice(&(rng.normal() * 100.0).to_le_bytes());
        }
    }
    raw
}

#[test]
fn every_simd_level_equals_scalar() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let levels = SimdLevel::available();
    eprintln!("levels: {:?}", levels);
    for t in TYPES {
        for nblocks in [1usize, 3, 17, 255] {
            // Flat types: several hundred elements per "block count" so tails are exercised too.
            let n = if t.block_size() == 1 {
                nblocks * 7
            } else {
                nblocks
            };
            let raw = random_blocks(t, n, &mut rng);
            let len = n * t.block_size();
            let mut want = vec![0f32; len];
            dequant_fn(t, SimdLevel::Scalar)(&raw, &mut want);
            for &level in &levels[1..] {
                let mut got = vec![f32::NAN; len];
                dequant_fn(t, level)(&raw, &mut got);
                if let Some((i, g, w)) = first_diff(&got, &want) {
                    panic!(
                        "{} {} blocks at {}: element {i}: got {g:e}, scalar {w:e}",
                        t.name(),
                        n,
                        level.name()
                    );
                }
            }
        }
    }
}

/// Every one of the 65536 F16 and BF16 bit patterns (subnormals, infinities, signalling and quiet
/// NaNs) converts to the same f32 bits at every level.
#[test]
fn f16_bf16_all_bit_patterns() {
    let raw: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_le_bytes()).collect();
    for t in [QType::F16, QType::BF16] {
        let mut want = vec![0f32; 65536];
        dequant_fn(t, SimdLevel::Scalar)(&raw, &mut want);
        if t == QType::F16 {
            // Scalar F16 is `half`; check it on the finite values against the definition.
            for (i, w) in want
                .iter()
                .enumerate()
                .filter(|(i, _)| (i >> 10) & 31 != 31)
            {
                let (s, e, m) = ((i >> 15) as i32, ((i >> 10) & 31) as i32, (i & 1023) as f64);
                let v = if e == 0 {
                    m * 2f64.powi(-24)
                } else {
                    (1024.0 + m) * 2f64.powi(e - 25)
                };
                assert_eq!(*w as f64, if s == 1 { -v } else { v }, "f16 {i:#06x}");
            }
        }
        for level in SimdLevel::available() {
            let mut got = vec![0f32; 65536];
            dequant_fn(t, level)(&raw, &mut got);
            if let Some((i, g, w)) = first_diff(&got, &want) {
                panic!(
                    "{t:?} {i:#06x} at {}: {:#010x} vs scalar {:#010x}",
                    level.name(),
                    g.to_bits(),
                    w.to_bits()
                );
            }
        }
    }
}

#[test]
fn dequantize_f32_uses_a_kernel_equal_to_scalar() {
    let mut rng = Rng(3);
    for t in TYPES {
        let raw = random_blocks(t, 5, &mut rng);
        let len = 5 * t.block_size();
        let (mut want, mut got) = (vec![0f32; len], vec![f32::NAN; len]);
        dequant_fn(t, SimdLevel::Scalar)(&raw, &mut want);
        qtune::quant::dequantize_f32(t, &raw, &mut got);
        assert!(first_diff(&got, &want).is_none(), "{t:?}");
    }
}

#[test]
fn quantize_matches_gguf_py_bit_exactly() {
    for t in [QType::Q8_0, QType::Q4_0] {
        let x = read_f32(&format!("q_{}_in.f32", t.name()));
        let want = read(&format!("q_{}.bin", t.name()));
        let mut got = vec![0u8; t.bytes_for(x.len()).unwrap()];
        dispatch::quantize(t, &x, &mut got).unwrap();
        let ts = t.type_size();
        for (i, (g, w)) in got.chunks(ts).zip(want.chunks(ts)).enumerate() {
            assert_eq!(
                g,
                w,
                "{} block {i} (row {}) differs from gguf-py",
                t.name(),
                i / 8
            );
        }
    }
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    (a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64)
        .sqrt()
}

fn round_trip(t: QType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; t.bytes_for(x.len()).unwrap()];
    dispatch::quantize(t, x, &mut q).unwrap();
    let mut y = vec![0f32; x.len()];
    dequant_fn(t, SimdLevel::Scalar)(&q, &mut y);
    (q, y)
}

/// Q4_K and Q6_K are our own quantisers (gguf-py 0.10 has none): gguf-py must decode our bytes to
/// exactly what we decode, and the error on N(0,1) must rank Q6_K < Q4_K < Q4_0.
#[test]
fn k_quantisers_decode_in_gguf_py_and_beat_q4_0() {
    let x = read_f32("gauss.f32");
    let (_, y0) = round_trip(QType::Q4_0, &x);
    let e40 = rms(&x, &y0);
    let mut errs = vec![];
    for t in [QType::Q4_K, QType::Q6_K] {
        let (q, y) = round_trip(t, &x);
        let stem = t.name().to_lowercase();
        if std::env::var_os("QTUNE_WRITE_FIXTURES").is_some() {
            std::fs::write(fixture(&format!("{stem}_ours.bin")), &q).unwrap();
            eprintln!("wrote {stem}_ours.bin: now rerun gen_ggml_fixtures.py");
            continue;
        }
        // Our bytes are still the bytes gguf-py decoded (a change to the quantiser must regenerate).
        assert!(
            q == read(&format!("{stem}_ours.bin")),
            "{t:?} quantiser output changed: regenerate the fixture"
        );
        let gguf = read_f32(&format!("{stem}_ours_gguf.f32"));
        if let Some((i, g, w)) = first_diff(&y, &gguf) {
            panic!("{t:?} element {i}: ours {g:e}, gguf-py {w:e}");
        }
        errs.push(rms(&x, &y));
    }
    if errs.is_empty() {
        return;
    }
    let (e4k, e6k) = (errs[0], errs[1]);
    eprintln!("RMS error on N(0,1): Q4_0 {e40:.5}, Q4_K {e4k:.5}, Q6_K {e6k:.5}");
    assert!(e4k < e40, "Q4_K RMS {e4k} not below Q4_0 RMS {e40}");
    // A broken search (e.g. codes all zero) would sit near 1.0; Q4_0 is ~0.09 on N(0,1).
    assert!(e4k < 0.08, "Q4_K RMS {e4k} too large");
    // Two more bits: each bit halves the error, so anything above half of Q4_K's is broken.
    assert!(
        e6k < e4k / 2.0,
        "Q6_K RMS {e6k} not well below Q4_K RMS {e4k}"
    );
    // An all-zero super-block stays exactly zero.
    let (_, z) = round_trip(QType::Q6_K, &[0.0; 256]);
    assert!(z.iter().all(|v| *v == 0.0));
}

#[test]
fn quantize_rejects_what_it_cannot_write() {
    let x = vec![0.5f32; 256];
    let mut out = vec![0u8; 176];
    let e = dispatch::quantize(QType::Q5_K, &x, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Q5_K"), "{e}");
    let mut out = vec![0u8; 34];
    let e = dispatch::quantize(QType::Q8_0, &x[..33], &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("whole number"), "{e}");
    let e = dispatch::quantize(QType::Q8_0, &x[..32], &mut out[..30])
        .unwrap_err()
        .to_string();
    assert!(e.contains("34 bytes"), "{e}");
    // Large inputs go through the parallel path and must give the serial bytes.
    let mut rng = Rng(42);
    let big: Vec<f32> = (0..256 * 100).map(|_| rng.normal()).collect();
    for t in dispatch::QUANTIZABLE {
        let mut par = vec![0u8; t.bytes_for(big.len()).unwrap()];
        dispatch::quantize(t, &big, &mut par).unwrap();
        let mut ser = vec![0u8; par.len()];
        for (s, d) in big
            .chunks(256)
            .zip(ser.chunks_mut(256 / t.block_size() * t.type_size()))
        {
            dispatch::quantize(t, s, d).unwrap();
        }
        assert!(par == ser, "{t:?}: parallel bytes differ");
    }
}

/// The bf16-output kernels: every type, level and rounding variant equals the same level's f32
/// kernel rounded by `half` bit for bit, including blocks whose scales are f16 subnormals, zero,
/// the largest f16, infinities and NaN (the f32 values then hold NaN and infinities).
#[test]
fn bf16_kernels_equal_f32_kernels_rounded() {
    let mut rng = Rng(23);
    // Subnormal, zero, max, ±inf, a quiet and a signalling NaN.
    let specials: [u16; 7] = [0x0001, 0x0000, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x7c01];
    let mut direct = 0;
    for t in TYPES {
        let nblocks = 53; // not a multiple of the 16-block groups the Q4_0 table kernel takes
        let mut raw = random_blocks(t, nblocks, &mut rng);
        let ts = t.type_size();
        for (i, &bits) in specials.iter().enumerate() {
            if let Some(&off) = f16_fields(t).first() {
                raw[i * 7 * ts + off..][..2].copy_from_slice(&bits.to_le_bytes());
            }
        }
        let n = nblocks * t.block_size();
        for level in SimdLevel::available() {
            let mut f = vec![0f32; n];
            dequant_fn(t, level)(&raw, &mut f);
            let want: Vec<u16> = f.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
            for integer_rounding in [false, true] {
                if qtune::quant::simd::dequant_bf16_fn(t, level, integer_rounding).is_some() {
                    direct += 1;
                }
                let mut got = vec![bf16::ZERO; n];
                dequantize_bf16_at(t, level, integer_rounding, &raw, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        *w,
                        "{t:?} {} (integer rounding {integer_rounding}): element {i}, f32 {:e}",
                        level.name(),
                        f[i]
                    );
                }
            }
        }
    }
    // The direct kernels exist where this CPU has a SIMD level (otherwise the test only checks
    // the staged path against itself).
    if SimdLevel::available().len() > 1 && cfg!(target_arch = "x86_64") {
        assert!(direct > 0, "no bf16-output kernel was exercised");
    }
}

#[test]
fn bf16_output_matches_half() {
    let mut rng = Rng(7);
    let mut vals: Vec<f32> = (0..3000)
        .map(|_| rng.normal() * 10f32.powf(rng.f32() * 60.0 - 30.0))
        .collect();
    // Ties, NaNs (both signs, signalling payloads), infinities, subnormals, overflow to inf.
    for bits in [
        0x3f80_8000u32,
        0x3f81_8000,
        0x3f80_8001,
        0x7fc0_0000,
        0xffc0_0001,
        0x7f80_0001,
        0xff80_0001,
        0x7f80_0000,
        0xff80_0000,
        0x0000_0001,
        0x8000_8000,
        0x0001_8000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0,
        0x8000_0000,
    ] {
        vals.push(f32::from_bits(bits));
    }
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let want: Vec<u16> = vals.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
    for level in SimdLevel::available() {
        let mut got = vec![bf16::ZERO; vals.len()];
        dequantize_bf16_at(QType::F32, level, false, &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                *w,
                "{}: {:e} ({:#010x})",
                level.name(),
                vals[i],
                vals[i].to_bits()
            );
        }
    }
    // A quantised type through the same path: bf16 of the scalar f32 output.
    let raw = random_blocks(QType::Q4_K, 9, &mut rng);
    let mut f = vec![0f32; 9 * 256];
    dequant_fn(QType::Q4_K, SimdLevel::Scalar)(&raw, &mut f);
    for level in SimdLevel::available() {
        let mut got = vec![bf16::ZERO; f.len()];
        dequantize_bf16_at(QType::Q4_K, level, false, &raw, &mut got);
        assert!(
            got.iter()
                .zip(&f)
                .all(|(g, v)| g.to_bits() == bf16::from_f32(*v).to_bits()),
            "{level:?}"
        );
    }
}

/// The activation rounding (`simd::f32_to_bf16_fn`) of every level equals `half` bit for bit, with
/// the specials in every lane of a vector: alone (the AVX-512 BF16 `vcvtneps2bf16` path) and beside
/// an f32 subnormal (which that instruction would read as zero: the vector takes the integer path).
#[test]
fn activation_rounding_matches_half_in_every_lane() {
    let specials = [
        0x3f80_8000u32, // a tie, rounded to even (down)
        0x3f81_8000,    // a tie, rounded to even (up)
        0x3f80_8001,
        0x7fc0_0000,
        0xffc0_0001,
        0x7f80_0001, // signalling NaN, quietened
        0x7f80_0000,
        0xff80_0000,
        0x7f7f_ffff, // rounds to inf
        0x8000_0000,
        0x4049_0fdb,
        0xc2f6_e979,
    ];
    let subnormals = [0x0000_0001u32, 0x8000_8000, 0x0001_8000, 0x007f_ffff];
    let mut vals = Vec::new();
    for shift in 0..16 {
        // a vector of specials and normals, then the same with one subnormal in lane `shift`
        let mut v: Vec<u32> = (0..16)
            .map(|i| specials[(i + shift) % specials.len()])
            .collect();
        vals.extend(&v);
        v[shift] = subnormals[shift % subnormals.len()];
        vals.extend(&v);
    }
    vals.extend(&subnormals[..3]); // a tail
    let vals: Vec<f32> = vals.into_iter().map(f32::from_bits).collect();
    let want: Vec<u16> = vals.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
    for level in SimdLevel::available() {
        let mut got = vec![bf16::ZERO; vals.len()];
        qtune::quant::simd::f32_to_bf16_fn(level)(&vals, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                *w,
                "{}: lane {i} ({:#010x})",
                level.name(),
                vals[i].to_bits()
            );
        }
    }
}

/// The paired-row rounding (`simd::pair_rows_fn`, AVX-512 BF16) equals the scalar reference bit
/// for bit: the specials of the test above in every lane of either row, a subnormal in one vector
/// of either row (that vector rounded by the scalar path, the others by the instruction), and a
/// tail.
#[test]
fn paired_row_rounding_matches_half_in_every_lane() {
    let specials = [
        0x3f80_8000u32,
        0x3f81_8000,
        0x7fc0_0000,
        0x7f80_0001,
        0xff80_0000,
        0x7f7f_ffff,
        0x8000_0000,
        0xc2f6_e979,
        0x3f80_8001,
        0x4049_0fdb,
    ];
    let n = 16 * 12 + 5;
    // subnormals that round to a non-zero bf16 (the instruction would give zero)
    let row = |shift: usize, subnormal: (usize, u32)| -> Vec<f32> {
        let mut r: Vec<u32> = (0..n)
            .map(|i| specials[(i * 7 + shift) % specials.len()])
            .collect();
        r[subnormal.0] = subnormal.1;
        r.into_iter().map(f32::from_bits).collect()
    };
    let (lo, hi) = (
        row(0, (16 * 2 + 5, 0x0001_8000)),
        row(3, (16 * 4 + 11, 0x807f_ffff)),
    );
    for level in SimdLevel::available() {
        let Some(pair) = qtune::quant::simd::pair_rows_fn(level) else {
            continue;
        };
        for (a, b) in [(&lo, &hi), (&hi, &lo)] {
            let mut want = vec![0u32; n];
            qtune::quant::simd::pair_rows_scalar(a, b, &mut want);
            let mut got = vec![0u32; n];
            pair(a, b, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{}: lane {i}", level.name());
            }
        }
    }
    // the scalar reference is half's rounding of each row, paired
    let mut want = vec![0u32; n];
    qtune::quant::simd::pair_rows_scalar(&lo, &hi, &mut want);
    for (i, w) in want.iter().enumerate() {
        let (l, h) = (bf16::from_f32(lo[i]), bf16::from_f32(hi[i]));
        assert_eq!(
            *w,
            l.to_bits() as u32 | (h.to_bits() as u32) << 16,
            "lane {i}"
        );
    }
}

/// Throughput per type and level: `cargo test --release --test quant_ggml throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let mut rng = Rng(1);
    // 256 KiB of f32 output: an L2-resident tile, as the fused matmul streams them. The machine is
    // shared, so the best of 30 timed batches is reported.
    let elems = 1 << 16;
    for t in TYPES {
        let n = elems / t.block_size();
        let raw = random_blocks(t, n, &mut rng);
        let mut out = vec![0f32; elems];
        let mut line = format!("{:5}", t.name());
        for level in SimdLevel::available() {
            let f = dequant_fn(t, level);
            f(&raw, &mut out);
            let reps = 20;
            let mut best = f64::INFINITY;
            for _ in 0..30 {
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    f(std::hint::black_box(&raw), std::hint::black_box(&mut out));
                }
                best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
            let s = best;
            line += &format!(
                "  {:>6}: in {:6.2} GB/s out {:6.2} GB/s",
                level.name(),
                raw.len() as f64 / s / 1e9,
                (elems * 4) as f64 / s / 1e9
            );
        }
        println!("{line}");
    }
    // f32 -> bf16 through `dequantize_bf16` (Q4_K: dequantise + convert), GB/s of bf16 output.
    let raw = random_blocks(QType::Q4_K, elems / 256, &mut rng);
    let mut out = vec![bf16::ZERO; elems];
    let mut line = "Q4_K->bf16".to_string();
    for level in SimdLevel::available() {
        let mut best = f64::INFINITY;
        for _ in 0..30 {
            let t0 = std::time::Instant::now();
            for _ in 0..20 {
                dequantize_bf16_at(
                    QType::Q4_K,
                    level,
                    false,
                    std::hint::black_box(&raw),
                    std::hint::black_box(&mut out),
                );
            }
            best = best.min(t0.elapsed().as_secs_f64() / 20.0);
        }
        line += &format!(
            "  {:>6}: out {:6.2} GB/s",
            level.name(),
            (elems * 2) as f64 / best / 1e9
        );
    }
    println!("{line}");
}
