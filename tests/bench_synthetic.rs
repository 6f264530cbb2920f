//! `qtune bench`'s synthetic models: the published parameter counts of the named shapes, valid
//! random blocks of every bench type (the right byte count, finite values near the intended
//! spread after our dequantisers), a full bench run's report, and its errors.
use qtune::bench::{
    param_count, run_bench, shape_config, step_flops, synthetic_store, BenchConfig,
};
use qtune::models::LlamaConfig;
use qtune::quant::QType;
use std::path::Path;

fn cfg_of(shape: &str) -> LlamaConfig {
    LlamaConfig::from_hf(&shape_config(shape).unwrap(), Path::new(shape)).unwrap()
}

#[test]
fn named_shapes_have_the_published_parameter_counts() {
    // Parameter counts of the Hugging Face checkpoints (model.num_parameters()).
    for (shape, n) in [
        ("llama-2-7b", 6_738_415_616usize),
        ("llama-2-13b", 13_015_864_320),
        ("tinyllama-1.1b", 1_100_048_384),
        ("mistral-7b", 7_241_732_096),
        ("llama-3-8b", 8_030_261_248),
        ("qwen2.5-7b", 7_615_616_512),
    ] {
        assert_eq!(param_count(&cfg_of(shape)), n, "{shape}");
    }
}

#[test]
fn falcon_7b_shape_and_unknown_shapes_are_errors() {
    // Falcon-7B's published size: 6,921,720,704 parameters (tied head).
    let c = shape_config("falcon-7b").unwrap();
    let f = qtune::models::FalconConfig::from_hf(&c, std::path::Path::new("falcon-7b")).unwrap();
    let (v, h, ff) = (f.vocab_size, f.hidden_size, f.ffn_hidden_size);
    let qkv = (f.num_heads + 2 * f.num_kv_heads) * f.head_dim;
    let layer = qkv * h + h * h + 2 * ff * h + 2 * h;
    assert_eq!(
        (f.num_heads, f.num_kv_heads, f.head_dim, ff),
        (71, 1, 64, 18176)
    );
    assert_eq!(v * h + f.num_layers * layer + 2 * h, 6_921_720_704);
    let e = shape_config("no-such-shape").unwrap_err().to_string();
    assert!(e.contains("llama-2-7b") && e.contains("config.json"), "{e}");
}

fn tiny() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
    })
}

/// Stored bytes of `numel` weights, from the block layouts (FIELD-NOTES; bitsandbytes NF4 codes
/// and one absmax byte per 64).
fn expected_bytes(q: QType, numel: usize) -> usize {
    match q {
        QType::Q4_0 => numel / 32 * 18,
        QType::Q8_0 => numel / 32 * 34,
        QType::Q4_K => numel / 256 * 144,
        QType::BF16 => numel * 2,
        QType::NF4 => numel / 2,
        _ => unreachable!(),
    }
}

#[test]
fn synthetic_weights_are_valid_blocks_of_each_type() {
    for q in [
        QType::Q4_0,
        QType::Q8_0,
        QType::Q4_K,
        QType::BF16,
        QType::NF4,
    ] {
        let store = synthetic_store(&tiny(), q, 7).unwrap();
        // 1 embedding + 2 × (2 norms + 7 linears) + final norm + lm_head
        assert_eq!(store.tensors.len(), 21, "{q:?}");
        for t in &store.tensors {
            let want = match (t.shape.len(), t.name.contains("layers")) {
                (1, _) => QType::F32,
                (_, false) if q == QType::NF4 => QType::BF16,
                _ => q,
            };
            assert_eq!(t.qtype, want, "{}", t.name);
            if t.shape.len() == 2 {
                assert_eq!(t.data.len(), expected_bytes(want, t.numel()), "{}", t.name);
                if let Some(s) = &t.nf4 {
                    assert_eq!(s.absmax_q.len(), t.numel() / 64);
                }
            }
            let m = t.matrix();
            let mut f = vec![0f32; m.rows * m.cols];
            m.dequant_tile(0, m.rows, 0, m.cols, &mut f);
            assert!(f.iter().all(|x| x.is_finite()), "{} {q:?}", t.name);
            let n = f.len() as f64;
            let mean = f.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (f.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            if t.shape.len() == 1 {
                assert!(f.iter().all(|&x| x == 1.0), "{}", t.name);
            } else {
                // Intended spread 0.02 (transformers' initializer_range); the types approximate it.
                assert!((0.008..0.05).contains(&std), "{} {q:?}: std {std}", t.name);
                assert!(mean.abs() < 0.02, "{} {q:?}: mean {mean}", t.name);
            }
        }
    }
}

#[test]
fn types_that_do_not_fit_the_shape_are_errors() {
    // hidden 96 is no multiple of Q4_K's 256-element super-block.
    let mut c = tiny();
    c["hidden_size"] = 96.into();
    c["num_attention_heads"] = 2.into();
    c["num_key_value_heads"] = 2.into();
    let e = synthetic_store(&c, QType::Q4_K, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Q4_K") && e.contains("--quant"), "{e}");
    let e = synthetic_store(&tiny(), QType::Q6_K, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--quant"), "{e}");
}

#[test]
fn step_flops_counts_six_per_linear_weight_and_attention() {
    let c = cfg_of("llama-2-7b");
    // decoder linears + lm_head of Llama-2-7B
    let linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096;
    let f = step_flops(&c, linear, 512, 256);
    let want = (6.0 * linear as f64 + 12.0 * 32.0 * 4096.0 * 256.0) * 512.0;
    assert!((f - want).abs() < 1e-6 * want);
}

#[test]
fn a_bench_run_reports_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, tiny().to_string()).unwrap();
    let cfg = BenchConfig {
        shape: p.to_string_lossy().into(),
        quant: QType::Q4_0,
        seq_len: 32,
        batch_size: 2,
        rank: 4,
        targets: vec!["q_proj".into(), "v_proj".into()],
        steps: 3,
        warmup: 1,
        dtype: candle_core::DType::F32,
        recompute: None,
        ce_chunk: 16,
        seed: 1,
        optim_8bit: false,
        device: "cpu".into(),
        dpo_beta: None,
        dora: false,
        prompt: None,
    };
    let r = run_bench(&cfg, &mut |_| {}).unwrap();
    assert!(r.gpu.is_none(), "no GPU figures on the CPU");
    // 2 layers × 2 targets × (A 4×256 + B out×4): q out 256, v out 128
    assert_eq!(r.lora_params, 2 * (4 * (256 + 256) + 4 * (256 + 128)));
    assert_eq!(r.step_times.len(), 3);
    assert!(r.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    // Random weights: the loss of a fresh model sits near ln(V).
    assert!((r.losses[0] - (512f32).ln()).abs() < 1.0, "{:?}", r.losses);
    let j = r.to_json();
    for k in [
        "predicted_peak_bytes",
        "measured_peak_bytes",
        "step_time_s",
        "tokens_per_s",
        "mfu",
        "plan",
        "config",
    ] {
        assert!(j.get(k).is_some(), "missing {k}");
    }
    let (med, min, max) = r.step_stats();
    assert!(min <= med && med <= max && min > 0.0);
    let tps = j["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 64.0 / med).abs() < 1e-9 * tps);
    assert_eq!(
        j["predicted_peak_bytes"].as_u64().unwrap() as usize,
        r.plan.total() + r.baseline_rss
    );
    assert!(j["measured_peak_bytes"].as_u64().unwrap() > 0);
    assert!(j["mfu"].as_f64().unwrap() > 0.0 && j["mfu"].as_f64().unwrap() < 1.0);
    assert_eq!(j["config"]["quant"], "Q4_0");
    // A warm-up step before the timed ones: the measured peak includes AdamW's written moments.
    assert_eq!(j["first_step_only"], false);
    assert!(!r.to_string().contains("one step only"));
    let mut one = r;
    (one.config.warmup, one.config.steps) = (0, 1);
    assert_eq!(one.to_json()["first_step_only"], true);
    assert!(one.to_string().contains("one step only"));
}

#[test]
fn a_dpo_bench_runs_the_trainers_dpo_step_on_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, tiny().to_string()).unwrap();
    let mut cfg = BenchConfig {
        shape: p.to_string_lossy().into(),
        quant: QType::Q4_0,
        seq_len: 32,
        batch_size: 2,
        rank: 4,
        targets: vec!["all-linear".into()],
        steps: 2,
        warmup: 0,
        dtype: candle_core::DType::F32,
        recompute: None,
        ce_chunk: 16,
        seed: 1,
        optim_8bit: false,
        device: "cpu".into(),
        dpo_beta: Some(0.1),
        dora: false,
        prompt: None,
    };
    let r = run_bench(&cfg, &mut |_| {}).unwrap();
    // B starts at zero: the policy is the reference, every pair's loss ln 2; the step moves it.
    assert!(
        (r.losses[0] - std::f32::consts::LN_2).abs() < 1e-6,
        "{:?}",
        r.losses
    );
    assert!(r.losses[1] != r.losses[0], "{:?}", r.losses);
    // 2 pairs: one call of 4 rows, with the reference forward in the plan.
    assert_eq!(cfg.rows(), 4);
    let j = r.to_json();
    let tps = j["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 4.0 * 32.0 / r.step_stats().0).abs() < 1e-9 * tps);
    assert!(r.plan.reference > 0);
    assert_eq!(j["objective"], "dpo");
    assert_eq!(j["rows"], 4);
    // The same plan as SFT's on 4 sequences, plus the reference forward where it is larger.
    cfg.dpo_beta = None;
    cfg.batch_size = 4;
    let (sft, _) = qtune::train::bench::plan_bench(&cfg).unwrap();
    assert_eq!(sft.checkpoints, r.plan.checkpoints);
    assert_eq!(sft.recompute, r.plan.recompute);
    assert!(r.plan.total() >= sft.total() && r.plan.reference < sft.step_bytes());
}

#[test]
fn cli_cuda_and_quant_errors() {
    let exe = env!("CARGO_BIN_EXE_qtune");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(exe).args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    // a CUDA build opens the device: GPU 99 exists nowhere, so both builds fail, each with its
    // message and no backtrace
    for cmd in [
        &["bench", "--shape", "llama-2-7b", "--device", "cuda:99"][..],
        &["train", "--device", "cuda:99"],
    ] {
        let e = run(cmd);
        assert!(!e.contains("candle_core::"), "{e}");
        if cfg!(feature = "cuda") {
            assert!(
                e.contains("--device cuda:99: ") && e.contains("use --device cpu"),
                "{e}"
            );
        } else {
            assert!(
                e.contains(
                    "built without CUDA; rebuild with `cargo build --release --features cuda`"
                ),
                "{e}"
            );
        }
    }
    // Falcon-7B's 4544-wide rows are no whole number of K-quant blocks.
    let e = run(&[
        "bench",
        "--shape",
        "falcon-7b",
        "--quant",
        "q4_k",
        "--steps",
        "1",
    ]);
    assert!(e.contains("4544") && e.contains("Q4_K"), "{e}");
    let e = run(&["bench", "--shape", "llama-2-7b", "--quant", "q6_k"]);
    assert!(e.contains("--quant q6_k"), "{e}");
}
