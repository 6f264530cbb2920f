//! Decode speed on a Llama-2-7B-shaped Q4_0 (or, with `QTUNE_BENCH_QTYPE=q4_k`, Q4_K) GGUF with
//! random weights (ignored by default: it writes ~3.8 GB).
//! `QTUNE_BENCH_GGUF=/tmp/llama7b-q4_0.gguf cargo test --release --test generate_bench -- --ignored
//! --nocapture`; llama.cpp's number on the same file comes from
//! `tests/reference/check_lora_llamacpp.py --bench FILE`.
use qtune::format::gguf::{GgufWriter, TensorPlan, Value};
use qtune::generate::{generate, Generator, Sampling};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

/// Writes the file streaming, one tensor at a time: Q4_0 blocks with small random scales.
fn write_random_7b(p: &Path, q: QType) {
    let (v, c, f, l, h) = (32000usize, 4096usize, 11008usize, 32usize, 32usize);
    let s = |x: &str| Value::String(x.into());
    let mut tokens = vec![s("<unk>"), s("<s>"), s("</s>")];
    tokens.extend((0..256).map(|b| s(&format!("<0x{b:02X}>"))));
    tokens.extend((tokens.len()..v).map(|i| s(&format!("t{i}"))));
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    types.extend((3..259).map(|_| Value::I32(6)));
    types.extend((259..v).map(|_| Value::I32(1)));
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".to_string(), s("random llama-2-7b shape")),
        (
            "general.file_type".to_string(),
            Value::U32(if q == QType::Q4_K { 15 } else { 2 }),
        ),
        ("llama.context_length".to_string(), Value::U32(4096)),
        ("llama.embedding_length".to_string(), Value::U32(c as u32)),
        ("llama.block_count".to_string(), Value::U32(l as u32)),
        (
            "llama.feed_forward_length".to_string(),
            Value::U32(f as u32),
        ),
        ("llama.rope.dimension_count".to_string(), Value::U32(128)),
        (
            "llama.attention.head_count".to_string(),
            Value::U32(h as u32),
        ),
        (
            "llama.attention.head_count_kv".to_string(),
            Value::U32(h as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".to_string(), s("llama")),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(8, tokens)),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(6, (0..v).map(|_| Value::F32(0.0)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(5, types),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0)),
    ];
    let mut plan = vec![];
    let mut add = |n: String, t: QType, shape: Vec<usize>| {
        plan.push(TensorPlan {
            name: n,
            qtype: t,
            shape,
        })
    };
    add("token_embd.weight".into(), q, vec![v, c]);
    for i in 0..l {
        add(format!("blk.{i}.attn_norm.weight"), QType::F32, vec![c]);
        for (n, o, k) in [
            ("attn_q", c, c),
            ("attn_k", c, c),
            ("attn_v", c, c),
            ("attn_output", c, c),
            ("ffn_gate", f, c),
            ("ffn_up", f, c),
            ("ffn_down", c, f),
        ] {
            add(format!("blk.{i}.{n}.weight"), q, vec![o, k]);
        }
        add(format!("blk.{i}.ffn_norm.weight"), QType::F32, vec![c]);
    }
    add("output_norm.weight".into(), QType::F32, vec![c]);
    add("output.weight".into(), q, vec![v, c]);
    let shapes: Vec<(QType, usize)> = plan
        .iter()
        .map(|t| (t.qtype, t.shape.iter().product()))
        .collect();
    let mut w = GgufWriter::create(p, &meta, plan).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (t, n) in shapes {
        if t == QType::F32 {
            let b: Vec<u8> = (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
            w.write_tensor(&b).unwrap();
            continue;
        }
        // About 1 MiB of blocks at a time: small f16 scales (weights ~N(0, 0.02²)-sized), random
        // nibbles (and, for Q4_K, random 6-bit sub-block scales and mins).
        let (bsize, bbytes, head) = if t == QType::Q4_K {
            (256, 144, 4)
        } else {
            (32, 18, 2)
        };
        let blocks = n / bsize;
        let per = (1 << 20) / bbytes;
        let mut done = 0;
        while done < blocks {
            let k = per.min(blocks - done);
            let mut b = vec![0u8; k * bbytes];
            for blk in b.chunks_exact_mut(bbytes) {
                blk[..2].copy_from_slice(&half::f16::from_f32(0.005).to_le_bytes());
                if head == 4 {
                    blk[2..4].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
                }
                for q in blk[head..].chunks_mut(8) {
                    let r = rnd().to_le_bytes();
                    let len = q.len();
                    q.copy_from_slice(&r[..len]);
                }
            }
            w.write_chunk(&b).unwrap();
            done += k;
        }
    }
    w.finish().unwrap();
}

/// This process's resident set now and at its peak, from `/proc/self/status`.
fn rss() -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .map_or("?".to_string(), |l| l[k.len()..].trim().to_string())
    };
    format!("RSS {} (peak {})", get("VmRSS:"), get("VmHWM:"))
}

#[test]
#[ignore]
fn decode_speed_7b_q4_0() {
    // QTUNE_BENCH_QTYPE=q4_k writes a Q4_K file instead (the type of most `Q4_K_M` layers).
    let q = match std::env::var("QTUNE_BENCH_QTYPE").as_deref() {
        Ok("q4_k") => QType::Q4_K,
        _ => QType::Q4_0,
    };
    let p = std::env::var("QTUNE_BENCH_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("qtune-llama7b-{}.gguf", q.name())));
    if !p.exists() {
        let t = std::time::Instant::now();
        write_random_7b(&p, q);
        eprintln!(
            "wrote {} in {:.1} s",
            p.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let store = WeightStore::open(&p).unwrap();
    let t = std::time::Instant::now();
    let mut g = Generator::new(&store, None).unwrap();
    eprintln!("loaded in {:.1} s; {}", t.elapsed().as_secs_f64(), rss());
    let prompt: Vec<u32> = (300..308).collect();
    let n: usize = std::env::var("QTUNE_BENCH_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    // `qtune generate`'s default (8-bit activations, as llama.cpp), then `--exact` (f32) unless
    // QTUNE_BENCH_EXACT=0.
    let exact = std::env::var("QTUNE_BENCH_EXACT").as_deref() != Ok("0");
    let modes = [("int8 activations", true), ("exact f32", false)];
    for (mode, int8) in modes.into_iter().filter(|m| m.1 || exact) {
        let t = std::time::Instant::now();
        // With 8-bit activations this repacks Q4_0/Q4_K into the decode layout.
        g.set_int8_activations(int8);
        let set_s = t.elapsed().as_secs_f64();
        let r = generate(&g, &prompt, n, &Sampling::default(), &[], |_| {}).unwrap();
        eprintln!(
            "qtune decode ({mode}): {} tokens, {:.3} tokens/s (prompt of {} in {:.2} s), threads {}; \
             setup {set_s:.1} s; {}",
            r.tokens.len(),
            r.tokens_per_s,
            prompt.len(),
            r.prompt_s,
            rayon::current_num_threads(),
            rss()
        );
    }
}
