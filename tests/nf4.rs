//! NF4 against bitsandbytes 0.47.0 (fixtures from tests/reference/gen_nf4_fixtures.py): our
//! quantiser's every byte and statistic, and our dequantiser's every value, bit for bit.
use qtune::quant::nf4::{
    dynamic_map, quantize_blockwise_dynamic, quantize_nf4, Nf4Owned, NF4_CODE,
};
use qtune::quant::SimdLevel;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4")
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn f32s(name: &str) -> Vec<f32> {
    bytes(name)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&bytes("manifest.json")).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn fnv1a64(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &c in b {
        h ^= c as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The deterministic input of the big case (same integers as the Python generator).
fn formula_input(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut v = (((i as i64 * 7919 + 13) % 65521) - 32760) as f32 / 4096.0;
            if i % 997 == 0 {
                v *= 37.0;
            }
            if (i / 64) % 101 == 5 {
                v = 0.0;
            }
            v
        })
        .collect()
}

/// Dequantises all of `q` at every SIMD level this CPU has; all must equal `want` bit for bit.
fn check_dequant(case: &str, q: &Nf4Owned, want: &[f32]) {
    for level in SimdLevel::available() {
        let mut got = vec![0f32; q.numel()];
        q.as_ref().dequantize_at(level, 0, &mut got);
        let bad = got
            .iter()
            .zip(want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "{case} at {level:?}: element {bad:?} differs from bnb"
        );
    }
}

#[test]
fn tables_match_bnb() {
    let code = f32s("small_f32.code.bin");
    assert_eq!(bits(&code), bits(&NF4_CODE));
    assert_eq!(
        bits(&f32s("small_f32.nested_code.bin")),
        bits(&dynamic_map())
    );
}

#[test]
fn quantize_and_dequantize_match_bnb() {
    let m = manifest();
    for case in [
        "small_f32",
        "outliers_f32",
        "f16",
        "bf16",
        "ties_f32",
        "offset_sensitive",
    ] {
        let meta = &m["cases"][case];
        let x = f32s(&format!("{case}.input.bin"));
        assert_eq!(x.len() as u64, meta["numel"].as_u64().unwrap());
        let q = quantize_nf4(&x).unwrap();
        assert_eq!(
            q.offset.to_bits() as u64,
            meta["offset_bits"].as_u64().unwrap(),
            "{case}: offset"
        );
        let packed = bytes(&format!("{case}.packed.bin"));
        let bad = q.packed.iter().zip(&packed).position(|(a, b)| a != b);
        assert_eq!(q.packed.len(), packed.len(), "{case}: packed length");
        assert!(
            bad.is_none(),
            "{case}: packed byte {bad:?} differs (ours {:?})",
            bad.map(|i| (q.packed[i], packed[i]))
        );
        assert_eq!(
            q.absmax_q,
            bytes(&format!("{case}.absmax_q.bin")),
            "{case}: absmax codes"
        );
        assert_eq!(
            bits(&q.nested_absmax),
            bits(&f32s(&format!("{case}.nested_absmax.bin"))),
            "{case}: nested absmax"
        );
        assert_eq!(
            bits(&q.nested_code[..]),
            bits(&f32s(&format!("{case}.nested_code.bin"))),
            "{case}"
        );
        check_dequant(case, &q, &f32s(&format!("{case}.deq.bin")));
    }
}

#[test]
fn dequantize_bnb_statistics() {
    // Dequantise bnb's own bytes and statistics (not ours) and compare with bnb's output.
    let m = manifest();
    for case in [
        "small_f32",
        "outliers_f32",
        "f16",
        "bf16",
        "ties_f32",
        "offset_sensitive",
    ] {
        let q = Nf4Owned {
            packed: bytes(&format!("{case}.packed.bin")),
            absmax_q: bytes(&format!("{case}.absmax_q.bin")),
            nested_absmax: f32s(&format!("{case}.nested_absmax.bin")),
            nested_code: Box::new(f32s(&format!("{case}.nested_code.bin")).try_into().unwrap()),
            code: Box::new(f32s(&format!("{case}.code.bin")).try_into().unwrap()),
            offset: f32::from_bits(m["cases"][case]["offset_bits"].as_u64().unwrap() as u32),
        };
        check_dequant(case, &q, &f32s(&format!("{case}.deq.bin")));
    }
}

#[test]
fn big_formula_matches_bnb_hashes() {
    let m = manifest();
    let meta = &m["cases"]["big_formula"];
    let n = meta["numel"].as_u64().unwrap() as usize;
    let q = quantize_nf4(&formula_input(n)).unwrap();
    assert_eq!(
        q.offset.to_bits() as u64,
        meta["offset_bits"].as_u64().unwrap(),
        "offset"
    );
    assert_eq!(
        bits(&q.nested_absmax),
        bits(&f32s("big_formula.nested_absmax.bin"))
    );
    assert_eq!(
        fnv1a64(&q.absmax_q),
        meta["hashes"]["absmax_q"].as_str().unwrap(),
        "absmax codes"
    );
    assert_eq!(
        fnv1a64(&q.packed),
        meta["hashes"]["packed"].as_str().unwrap(),
        "packed"
    );
    let mut deq = vec![0f32; n];
    q.as_ref().dequantize(0, &mut deq);
    let deq_bytes: Vec<u8> = deq.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        fnv1a64(&deq_bytes),
        meta["hashes"]["deq"].as_str().unwrap(),
        "dequantised"
    );
}

#[test]
fn blockwise_dynamic_matches_bnb() {
    let x = f32s("blockwise.input.bin");
    let code: [f32; 256] = f32s("blockwise.code.bin").try_into().unwrap();
    assert_eq!(bits(&code), bits(&dynamic_map()));
    let (q, absmax) = quantize_blockwise_dynamic(&x, 256, &code);
    assert_eq!(bits(&absmax), bits(&f32s("blockwise.absmax.bin")));
    let want = bytes("blockwise.q.bin");
    let bad = q.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        bad.is_none(),
        "code {bad:?} differs: ours {:?}",
        bad.map(|i| (q[i], want[i], x[i]))
    );
}

/// Throughput, not correctness: `cargo test --test nf4 -- --ignored --nocapture speed`.
#[test]
#[ignore]
fn speed() {
    let n = 4096 * 4096;
    let x = formula_input(n);
    let t = std::time::Instant::now();
    let q = quantize_nf4(&x).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "quantize_nf4: {n} weights in {secs:.3} s = {:.0} Mweights/s",
        n as f64 / secs / 1e6
    );
    // Dequantise a 4096-column tile of 64 rows repeatedly (stays in L2, as the matmul kernels use it).
    let mut tile = vec![0f32; 64 * 4096];
    for level in SimdLevel::available() {
        let reps = 200;
        let t = std::time::Instant::now();
        for r in 0..reps {
            let first = (r % 64) * tile.len();
            q.as_ref().dequantize_at(level, first, &mut tile);
        }
        let secs = t.elapsed().as_secs_f64();
        let w = (reps * tile.len()) as f64;
        println!(
            "dequantize {level:?}: {:.2} Gweights/s ({:.1} GB/s of f32 out)",
            w / secs / 1e9,
            w * 4.0 / secs / 1e9
        );
    }
}

/// bf16 output: exactly bnb's f32 dequantisation rounded once (`half::bf16::from_f32`), also from
/// an offset that is not a block boundary.
#[test]
fn dequantize_bf16_is_f32_rounded_once() {
    let x = formula_input(64 * 300);
    let q = qtune::quant::nf4::quantize_nf4(&x).unwrap();
    let r = q.as_ref();
    for (first, len) in [(0, 64 * 300), (37, 1000), (64 * 17, 2500)] {
        let mut f = vec![0f32; len];
        r.dequantize(first, &mut f);
        let mut b = vec![half::bf16::ZERO; len];
        r.dequantize_bf16(first, &mut b);
        for (i, (bv, fv)) in b.iter().zip(&f).enumerate() {
            assert_eq!(
                bv.to_bits(),
                half::bf16::from_f32(*fv).to_bits(),
                "element {}",
                first + i
            );
        }
    }
}

/// The bf16 table kernel (AVX-512 BF16) against the f32 kernel rounded once, on statistics no
/// quantiser writes but a file can hold: absmax zero, ±inf, NaN, the largest f32, tiny absmax
/// whose products are f32 subnormals (which `vcvtneps2bf16` would flush), and ordinary values.
#[test]
fn dequantize_bf16_special_absmax() {
    let nested_code = qtune::quant::nf4::dynamic_map();
    // One nested block per absmax case: absmax = nested_code[q] · nested_absmax + offset, with
    // q = 255 (nested_code 1.0) and offset 0, so absmax = nested_absmax exactly.
    let cases = [
        1.0f32,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        1e-37,
        -3e-38,
        1e-39,
        f32::MIN_POSITIVE,
        2.0f32.powi(-122),
        2.0f32.powi(-123),
        0.0123,
    ];
    let blocks = cases.len() * 256;
    let packed: Vec<u8> = (0..blocks * 32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let absmax_q = vec![255u8; blocks];
    let r = qtune::quant::nf4::Nf4Ref {
        packed: &packed,
        absmax_q: &absmax_q,
        nested_absmax: &cases,
        nested_code: &nested_code,
        code: &qtune::quant::nf4::NF4_CODE,
        offset: 0.0,
    };
    let n = r.numel();
    let mut f = vec![0f32; n];
    r.dequantize(0, &mut f);
    let mut b = vec![half::bf16::ZERO; n];
    r.dequantize_bf16(0, &mut b);
    for (i, (bv, fv)) in b.iter().zip(&f).enumerate() {
        let want = half::bf16::from_f32(*fv);
        assert!(
            bv.to_bits() == want.to_bits(),
            "element {i} (absmax {}): {:#06x} against {:#06x}",
            cases[i / 64 / 256],
            bv.to_bits(),
            want.to_bits()
        );
    }
}
