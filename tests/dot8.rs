//! Decode products with 8-bit activations (`quant::dot8`): the AVX2 dot products equal the scalar
//! reference up to f32 summation order; the reference equals Σ dequant(w)·dequant(x_q) computed
//! with the dequantisers that are bit-exact with gguf-py (so the block layouts are ggml's); and the
//! whole product stays within the activation rounding of the exact f32 product. The decode layout
//! (`quant::dot8_pack`: eight rows interleaved) gives the same sums as the row reference, and
//! decoding through it stays near the exact logits (Q4_0 and Q4_K models).
use qtune::quant::dot8;
use qtune::quant::{dispatch, QData, QMatrix, QType};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

fn quantized(q: QType, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; q.bytes_for(v.len()).unwrap()];
    dispatch::quantize(q, v, &mut out).unwrap();
    out
}

/// Error relative to Σ|w·x|: a dot product's rounding scales with its terms, not its (possibly
/// cancelled) value.
fn rel(a: f32, b: f64, abs_sum: f64) -> f64 {
    (a as f64 - b).abs() / abs_sum
}

#[test]
fn dot_products_match_the_dequantised_reference() {
    for (qi, q) in [QType::Q4_0, QType::Q8_0, QType::Q4_K]
        .into_iter()
        .enumerate()
    {
        // Q4_0/Q8_0: not a multiple of 256 (whole 32-blocks only); Q4_K: whole super-blocks.
        let k = if q == QType::Q4_K {
            4096 + 256
        } else {
            4096 + 96
        };
        let impls = dot8::dot_impls(q);
        let reference = impls[0].1;
        let mut worst = (0f64, 0f64);
        for seed in 0..20u64 {
            let w = quantized(q, &rand_vec(k, seed * 2 + qi as u64));
            let mut x = rand_vec(k, 1000 + seed);
            // Some blocks with a large spread, some all zero.
            x[..32].iter_mut().for_each(|v| *v *= 100.0);
            x[64..96].iter_mut().for_each(|v| *v = 0.0);
            let xq = dot8::quantize_activations(&x);
            let (mut wd, mut xd) = (vec![0f32; k], vec![0f32; k]);
            dispatch::dequantize_f32(q, &w, &mut wd);
            dispatch::dequantize_f32(QType::Q8_0, &xq.bytes, &mut xd);
            let exact: f64 = wd.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
            let abs_sum: f64 = wd
                .iter()
                .zip(&xd)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let r = reference(&w, &xq);
            worst.0 = worst.0.max(rel(r, exact, abs_sum));
            for (_, simd) in &impls[1..] {
                worst.1 = worst.1.max(rel(simd(&w, &xq), r as f64, abs_sum));
            }
        }
        let names: Vec<&str> = impls.iter().map(|i| i.0).collect();
        eprintln!(
            "{} {names:?}: reference vs dequantised f64 {:.1e}, SIMD vs reference {:.1e}",
            q.name(),
            worst.0,
            worst.1
        );
        // Both are f32 sums of a few hundred block products: f32 tolerance.
        assert!(worst.0 < 1e-5, "{}: reference {:e}", q.name(), worst.0);
        assert!(worst.1 < 1e-5, "{}: SIMD {:e}", q.name(), worst.1);
    }
}

#[test]
fn gemv_stays_within_the_activation_rounding_of_the_exact_product() {
    let (n, k, m) = (300, 1024, 2);
    for q in [QType::Q4_0, QType::Q8_0, QType::Q4_K] {
        let wb = quantized(q, &rand_vec(n * k, 7));
        let w = QMatrix {
            rows: n,
            cols: k,
            data: QData::Ggml {
                qtype: q,
                bytes: &wb,
            },
        };
        assert!(dot8::supported(&w));
        let x = rand_vec(m * k, 8);
        let (mut y8, mut y) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
        assert!(dot8::gemv_q8(&x, m, &w, &mut y8));
        qtune::quant::matmul::qmatmul_fwd(&x, m, &w, &mut y);
        let scale = y.iter().fold(0f32, |a, b| a.max(b.abs()));
        let err = y8
            .iter()
            .zip(&y)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
            / scale;
        eprintln!(
            "{}: 8-bit activations vs exact, max rel {err:.2e}",
            q.name()
        );
        assert!(y8.iter().all(|v| v.is_finite()), "every output written");
        // Q8_0 rounding of x is at most 1/254 of each block's max; summed over 32 blocks of
        // random signs the product moves well under 1 %.
        assert!(err < 1e-2 && err > 0.0, "{}: {err:e}", q.name());
    }
    // Types without the path are declined, and nothing is written.
    let f = vec![0u8; 4 * 32 * 4];
    let w = QMatrix {
        rows: 4,
        cols: 32,
        data: QData::Ggml {
            qtype: QType::F32,
            bytes: &f,
        },
    };
    let mut y = vec![1f32; 4];
    assert!(!dot8::gemv_q8(&[0.0; 32], 1, &w, &mut y));
    assert_eq!(y, vec![1f32; 4]);
}

#[test]
fn decoding_with_8_bit_activations_stays_near_the_exact_logits() {
    // The tiny Llama fixture quantised to Q4_0 (every linear has the fast path).
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model");
    let hf = qtune::store::WeightStore::open(&fx).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q4_0.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::Q4_0, &p).unwrap();
    let store = qtune::store::WeightStore::open(&p).unwrap();
    let mut g = qtune::generate::Generator::new(&store, None).unwrap();
    let ids: Vec<u32> = (10..26).collect();
    let mut run = |int8: bool| -> Vec<f32> {
        g.set_int8_activations(int8);
        let mut c = qtune::generate::KvCache::default();
        // The prompt, then one token at a time (the decode path proper).
        let mut out: Vec<f32> = Vec::new();
        let l = g.step(&ids[..8], &mut c).unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for &t in &ids[8..] {
            let l = g.step(&[t], &mut c).unwrap();
            out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    };
    let (fast, exact) = (run(true), run(false));
    let scale = exact.iter().fold(0f32, |a, b| a.max(b.abs()));
    let err = fast
        .iter()
        .zip(&exact)
        .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
        / scale;
    eprintln!("Q4_0 decode, 8-bit vs f32 activations: logits max rel {err:.2e}");
    assert!(fast.iter().all(|v| v.is_finite()));
    assert!(err > 0.0 && err < 2e-2, "{err:e}");
}

#[test]
fn packed_groups_equal_the_row_dot_products() {
    use qtune::quant::dot8_pack::{gemv_packed, group_impls, Packed};
    // 21 rows: two whole groups of eight and a padded one; 1, 3 and 6 activation rows (the
    // kernels take at most four at a time).
    let n = 21;
    for q in [QType::Q4_0, QType::Q4_K] {
        let k = if q == QType::Q4_K { 1024 } else { 1024 + 96 };
        let wb = quantized(q, &rand_vec(n * k, 11));
        let w = QMatrix {
            rows: n,
            cols: k,
            data: QData::Ggml {
                qtype: q,
                bytes: &wb,
            },
        };
        let p = Packed::new(&w).expect("packs");
        let row_ref = dot8::dot_impls(q)[0].1;
        let rb = wb.len() / n;
        for m in [1usize, 3, 6] {
            let mut x = rand_vec(m * k, 12 + m as u64);
            x[..32].iter_mut().for_each(|v| *v *= 100.0);
            x[64..96].iter_mut().for_each(|v| *v = 0.0);
            let (mut worst, mut names) = (0f64, vec![]);
            for (name, f) in group_impls() {
                let mut y = vec![f32::NAN; m * n];
                gemv_packed(&x, m, &p, &mut y, Some(f));
                for i in 0..m {
                    let xq = dot8::quantize_activations(&x[i * k..(i + 1) * k]);
                    let (mut wd, mut xd) = (vec![0f32; k], vec![0f32; k]);
                    dispatch::dequantize_f32(QType::Q8_0, &xq.bytes, &mut xd);
                    for r in 0..n {
                        dispatch::dequantize_f32(q, &wb[r * rb..(r + 1) * rb], &mut wd);
                        let abs_sum: f64 = wd
                            .iter()
                            .zip(&xd)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let want = row_ref(&wb[r * rb..(r + 1) * rb], &xq);
                        worst = worst.max(rel(y[i * n + r], want as f64, abs_sum));
                    }
                }
                names.push(name);
            }
            eprintln!(
                "{} packed {names:?}, {m} rows: vs ggml's row reference {worst:.1e}",
                q.name()
            );
            assert!(worst < 1e-5, "{} m={m}: {worst:e}", q.name());
        }
    }
    // Other types are not packed.
    let f = vec![0u8; 8 * 32 * 34 / 32];
    let w = QMatrix {
        rows: 8,
        cols: 32,
        data: QData::Ggml {
            qtype: QType::Q8_0,
            bytes: &f,
        },
    };
    assert!(Packed::new(&w).is_none());
}

/// A one-layer Llama GGUF whose every linear (and the embedding and head) is Q4_K: hidden 256, so
/// K-quant blocks fit (the tiny fixture's 64 does not).
fn write_q4_k_llama(p: &std::path::Path) {
    use qtune::format::gguf::{GgufWriter, TensorPlan, Value};
    let (v, c, f) = (300usize, 256usize, 512usize);
    let s = |x: &str| Value::String(x.into());
    let u = Value::U32;
    let mut tokens = vec![s("<unk>"), s("<s>"), s("</s>")];
    tokens.extend((3..v).map(|i| s(&format!("t{i}"))));
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("llama.context_length".to_string(), u(128)),
        ("llama.embedding_length".to_string(), u(c as u32)),
        ("llama.block_count".to_string(), u(1)),
        ("llama.feed_forward_length".to_string(), u(f as u32)),
        ("llama.rope.dimension_count".to_string(), u(64)),
        ("llama.attention.head_count".to_string(), u(4)),
        ("llama.attention.head_count_kv".to_string(), u(2)),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".to_string(), s("llama")),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(8, tokens)),
    ];
    let mut plan: Vec<(String, QType, Vec<usize>)> =
        vec![("token_embd.weight".into(), QType::Q4_K, vec![v, c])];
    plan.push(("blk.0.attn_norm.weight".into(), QType::F32, vec![c]));
    for (n, o, k) in [
        ("attn_q", c, c),
        ("attn_k", c / 2, c),
        ("attn_v", c / 2, c),
        ("attn_output", c, c),
        ("ffn_gate", f, c),
        ("ffn_up", f, c),
        ("ffn_down", c, f),
    ] {
        plan.push((format!("blk.0.{n}.weight"), QType::Q4_K, vec![o, k]));
    }
    plan.push(("blk.0.ffn_norm.weight".into(), QType::F32, vec![c]));
    plan.push(("output_norm.weight".into(), QType::F32, vec![c]));
    plan.push(("output.weight".into(), QType::Q4_K, vec![v, c]));
    let tp = plan
        .iter()
        .map(|(n, q, sh)| TensorPlan {
            name: n.clone(),
            qtype: *q,
            shape: sh.clone(),
        })
        .collect();
    let mut w = GgufWriter::create(p, &meta, tp).unwrap();
    for (i, (_, q, sh)) in plan.iter().enumerate() {
        let n: usize = sh.iter().product();
        if *q == QType::F32 {
            let b: Vec<u8> = (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
            w.write_tensor(&b).unwrap();
        } else {
            let vals: Vec<f32> = rand_vec(n, 40 + i as u64).iter().map(|x| x * 0.1).collect();
            w.write_tensor(&quantized(*q, &vals)).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn q4_k_decoding_in_the_packed_layout_stays_near_the_exact_logits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q4_k.gguf");
    write_q4_k_llama(&p);
    let store = qtune::store::WeightStore::open(&p).unwrap();
    let mut g = qtune::generate::Generator::new(&store, None).unwrap();
    let ids: Vec<u32> = (10..22).collect();
    let mut run = |int8: bool| -> Vec<f32> {
        // With 8-bit activations every matrix is packed here (on a CPU with the packed kernels).
        g.set_int8_activations(int8);
        let mut c = qtune::generate::KvCache::default();
        let mut out: Vec<f32> = Vec::new();
        let l = g.step(&ids[..6], &mut c).unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for &t in &ids[6..] {
            let l = g.step(&[t], &mut c).unwrap();
            out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    };
    let (fast, exact) = (run(true), run(false));
    let scale = exact.iter().fold(0f32, |a, b| a.max(b.abs()));
    let err = fast
        .iter()
        .zip(&exact)
        .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
        / scale;
    eprintln!(
        "Q4_K decode ({}), 8-bit vs f32 activations: logits max rel {err:.2e}",
        if qtune::quant::dot8_pack::worth_packing() {
            "packed"
        } else {
            "rows"
        }
    );
    assert!(fast.iter().all(|v| v.is_finite()));
    assert!(err > 0.0 && err < 2e-2, "{err:e}");
}
