//! `qtune generate`'s decoder: logits with the KV cache (one token at a time, or in chunks) equal the
//! training model's full forward (1e-5, f32), and greedy decoding gives transformers + PEFT's
//! `generate` token ids (fixture from tests/reference/check_lora_llamacpp.py), on a Hugging Face base
//! with the PEFT adapter and on a GGUF base with the GGUF LoRA.
use candle_core::{Device, Tensor};
use qtune::export::Adapter;
use qtune::generate::{generate, Generator, KvCache, Sampling};
use qtune::models::{Llama, LlamaConfig, LlamaOptions};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

mod common;
use common::rel;

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fx().join("export/expected.json")).unwrap())
        .unwrap()
}

fn ids(key: &str) -> Vec<u32> {
    serde_json::from_value(expected()[key].clone()).unwrap()
}

#[test]
fn kv_cache_logits_equal_full_forward() {
    let store = WeightStore::open(&fx().join("llama/model")).unwrap();
    let cfg = LlamaConfig::from_store(&store).unwrap();
    let ad = Adapter::load(&fx().join("llama/f32/adapter"), &cfg).unwrap();
    let toks = ids("input_ids");
    let n = toks.len();
    // The training model's forward, no cache.
    let m = Llama::load(
        &store,
        LlamaOptions {
            lora: Some(ad.spec()),
            ..LlamaOptions::default()
        },
    )
    .unwrap();
    ad.apply(&m).unwrap();
    let full = m
        .forward(
            &Tensor::from_vec(toks.clone(), (1, n), &Device::Cpu).unwrap(),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let g = Generator::new(&store, Some(&ad)).unwrap();
    // Whole prompt at once.
    let mut c = KvCache::default();
    let all = g.step(&toks, &mut c).unwrap();
    let r = rel(&all, &full);
    eprintln!("one step vs forward: {r:.2e}");
    assert!(r < 1e-5, "{r:e}");
    // One token at a time through the cache, then in uneven chunks.
    for chunks in [vec![1; n], vec![5, 1, 4, 2]] {
        let mut c = KvCache::default();
        let mut rows = Vec::new();
        let mut at = 0;
        for k in chunks {
            rows.push(g.step(&toks[at..at + k], &mut c).unwrap());
            at += k;
        }
        assert_eq!(c.len(), n);
        let got = Tensor::cat(&rows, 0).unwrap();
        let r = rel(&got, &full);
        eprintln!("cached steps vs forward: {r:.2e}");
        assert!(r < 1e-5, "{r:e}");
    }
}

fn greedy(store: &WeightStore, adapter: &Path) -> Vec<u32> {
    let cfg = LlamaConfig::from_store(store).unwrap();
    let ad = Adapter::load(adapter, &cfg).unwrap();
    let g = Generator::new(store, Some(&ad)).unwrap();
    let mut streamed = Vec::new();
    let r = generate(&g, &ids("gen_prompt"), 32, &Sampling::default(), &[], |t| {
        streamed.push(t)
    })
    .unwrap();
    assert_eq!(streamed, r.tokens);
    r.tokens
}

#[test]
fn greedy_matches_transformers_peft_generate() {
    let want = ids("gen_tokens");
    assert_eq!(want.len(), 32);
    let hf = WeightStore::open(&fx().join("llama/model")).unwrap();
    assert_eq!(greedy(&hf, &fx().join("llama/f32/adapter")), want);
    // GGUF base with llama.cpp's GGUF LoRA: same ids.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::F32, &base).unwrap();
    let g = WeightStore::open(&base).unwrap();
    assert_eq!(
        greedy(&g, &fx().join("export/llamacpp-lora-f32.gguf")),
        want
    );
}

#[test]
fn sampling_is_seeded_and_stops_at_eos() {
    let hf = WeightStore::open(&fx().join("llama/model")).unwrap();
    let g = Generator::new(&hf, None).unwrap();
    let s = |seed| Sampling {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.9,
        seed,
    };
    let p = ids("gen_prompt");
    let a = generate(&g, &p, 16, &s(1), &[], |_| {}).unwrap().tokens;
    let b = generate(&g, &p, 16, &s(1), &[], |_| {}).unwrap().tokens;
    let c = generate(&g, &p, 16, &s(2), &[], |_| {}).unwrap().tokens;
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Stop at the first token if it is an end-of-sequence id.
    let first = a[0];
    let r = generate(&g, &p, 16, &s(1), &[first], |_| {}).unwrap();
    assert_eq!(r.tokens, vec![first]);
}
