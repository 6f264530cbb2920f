//! `qtune merge`: merge-then-forward equals forward with the adapter unmerged (f32, 1e-5), on a
//! Hugging Face base (safetensors directory out) and a GGUF base (GGUF out, q/k rows in llama.cpp's
//! order); llama.cpp's logits on our merged f32 GGUF are a fixture (check_lora_llamacpp.py). Bad
//! input fails with a named error before anything is written.
use candle_core::{Device, Tensor};
use qtune::export::Adapter;
use qtune::models::{Llama, LlamaConfig, LlamaOptions};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

mod common;
use common::rel;

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ids() -> Tensor {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx().join("export/expected.json")).unwrap())
            .unwrap();
    let v: Vec<u32> = serde_json::from_value(j["input_ids"].clone()).unwrap();
    let n = v.len();
    Tensor::from_vec(v, (1, n), &Device::Cpu).unwrap()
}

fn unmerged(store: &WeightStore) -> Tensor {
    let cfg = LlamaConfig::from_store(store).unwrap();
    let ad = Adapter::load(&fx().join("llama/f32/adapter"), &cfg).unwrap();
    let m = Llama::load(
        store,
        LlamaOptions {
            lora: Some(ad.spec()),
            ..LlamaOptions::default()
        },
    )
    .unwrap();
    ad.apply(&m).unwrap();
    m.forward(&ids(), None).unwrap()
}

fn frozen(path: &Path) -> Tensor {
    let s = WeightStore::open(path).unwrap();
    Llama::load(&s, LlamaOptions::default())
        .unwrap()
        .forward(&ids(), None)
        .unwrap()
}

fn merge(base: &WeightStore, out: &Path, t: Option<QType>) -> qtune::Result<()> {
    let cfg = LlamaConfig::from_store(base)?;
    let ad = Adapter::load(&fx().join("llama/f32/adapter"), &cfg)?;
    qtune::merge::merge(base, &cfg, &ad, out, t).map(|_| ())
}

#[test]
fn merged_hf_directory_equals_unmerged() {
    let hf = WeightStore::open(&fx().join("llama/model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&hf, &out, None).unwrap();
    let r = rel(&frozen(&out), &unmerged(&hf));
    eprintln!("HF dir merged vs unmerged: {r:.2e}");
    assert!(r < 1e-5, "{r:e}");
    assert!(out.join("config.json").exists() && out.join("tokenizer.json").exists());
    // bf16 output: the same within bf16 rounding of the weights.
    let o16 = dir.path().join("merged16");
    merge(&hf, &o16, Some(QType::BF16)).unwrap();
    let r = rel(&frozen(&o16), &unmerged(&hf));
    eprintln!("bf16 merged vs unmerged: {r:.2e}");
    assert!(r < 3e-2, "{r:e}");
}

#[test]
fn merged_gguf_equals_unmerged_and_llama_cpp() {
    let hf = WeightStore::open(&fx().join("llama/model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::F32, &base).unwrap();
    let g = WeightStore::open(&base).unwrap();
    let out = dir.path().join("merged.gguf");
    merge(&g, &out, None).unwrap();
    let got = frozen(&out);
    let r = rel(&got, &unmerged(&g));
    eprintln!("GGUF merged vs unmerged: {r:.2e}");
    assert!(r < 1e-5, "{r:e}");
    // llama.cpp ran our HF -> GGUF merge (same weights) and got these logits.
    let cpp = candle_core::safetensors::load(fx().join("export/logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("llamacpp_merged")
        .unwrap();
    let r = rel(&got.squeeze(0).unwrap(), &cpp);
    eprintln!("merged GGUF vs llama.cpp on our merged GGUF: {r:.2e}");
    assert!(r < 1e-3, "{r:e}");
    // Requantised merge: Q8_0 merged projections, everything else kept.
    let q = dir.path().join("merged-q8.gguf");
    merge(&g, &q, Some(QType::Q8_0)).unwrap();
    let s = WeightStore::open(&q).unwrap();
    assert_eq!(s.get("blk.0.attn_q.weight").unwrap().qtype, QType::Q8_0);
    assert_eq!(s.get("token_embd.weight").unwrap().qtype, QType::F32);
    let r = rel(&frozen(&q), &unmerged(&g));
    eprintln!("Q8_0 merged vs unmerged f32: {r:.2e}");
    assert!(r < 5e-2, "{r:e}");
}

/// Copies the fixture adapter with its config edited by `f`.
fn edited_adapter(dir: &Path, f: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = fx().join("llama/f32/adapter");
    let d = dir.join("ad");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        d.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    f(&mut v);
    std::fs::write(d.join("adapter_config.json"), v.to_string()).unwrap();
    d
}

#[test]
fn bad_adapters_are_named_errors_and_write_nothing() {
    let hf = WeightStore::open(&fx().join("llama/model")).unwrap();
    let cfg = LlamaConfig::from_store(&hf).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "'r' is missing",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("r");
            }),
        ),
        (
            "'lora_alpha' is missing",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("lora_alpha");
            }),
        ),
        (
            "target module 'lm_head'",
            Box::new(|v| {
                let mut t = v["target_modules"].as_array().unwrap().clone();
                t.push("lm_head".into());
                v["target_modules"] = serde_json::Value::Array(t);
            }),
        ),
    ];
    for (want, f) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ad = edited_adapter(dir.path(), f);
        let e = Adapter::load(&ad, &cfg).unwrap_err().to_string();
        assert!(e.contains(want), "expected '{want}' in: {e}");
    }
    // An adapter for another model: a base with another hidden size.
    let mut other = cfg.clone();
    other.hidden_size = 128;
    let e = Adapter::load(&fx().join("llama/f32/adapter"), &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit this model"), "{e}");
    // GGUF LoRA of another architecture.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            qtune::format::gguf::Value::String("falcon".into()),
        ),
        (
            "general.type".to_string(),
            qtune::format::gguf::Value::String("adapter".into()),
        ),
        (
            "adapter.type".to_string(),
            qtune::format::gguf::Value::String("lora".into()),
        ),
    ];
    let w = qtune::format::gguf::GgufWriter::create(&p, &meta, vec![]).unwrap();
    w.finish().unwrap();
    let e = Adapter::load(&p, &cfg).unwrap_err().to_string();
    assert!(e.contains("falcon"), "{e}");
    // A GGUF base cannot merge into a directory: refused before writing.
    let base = dir.path().join("base.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::F32, &base).unwrap();
    let g = WeightStore::open(&base).unwrap();
    let out = dir.path().join("outdir");
    assert!(merge(&g, &out, None).is_err());
    assert!(!out.exists());
}
