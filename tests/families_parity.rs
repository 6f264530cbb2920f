//! The Llama family against transformers 4.46.3 / PEFT 0.13.2 on tiny random models of each member
//! (fixtures from tests/reference/gen_families_fixtures.py): Llama 3.1 rotary scaling, Qwen2 (q/k/v
//! biases, tied head), Mistral (sliding window) and a SmolLM2-style tied head with no
//! `lm_head.weight`. Logits, loss and every LoRA gradient (PEFT `all-linear`, non-zero B) at f32
//! tolerance, through `models::open` (the path train, eval and generate take).
mod common;
use candle_core::{DType, Device, Tensor};
use common::rel;
use qtune::models::{self, arch::RopeScaling, LlamaOptions, LoraSpec};
use qtune::store::WeightStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(family)
}

fn expected(family: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(family).join("expected.json")).unwrap())
        .unwrap()
}

/// PEFT's in-memory names carry the adapter name (`lora_A.default.weight`); saved ones do not.
fn load_st(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.replace(".default.weight", ".weight"), v))
        .collect()
}

fn ids(j: &serde_json::Value, key: &str) -> Tensor {
    let v: Vec<Vec<i64>> = serde_json::from_value(j[key].clone()).unwrap();
    let (b, t) = (v.len(), v[0].len());
    Tensor::from_vec(v.concat(), (b, t), &Device::Cpu).unwrap()
}

fn store(family: &str) -> WeightStore {
    WeightStore::open(&dir(family).join("model")).unwrap()
}

/// The model with the fixture's initial adapter (every PEFT tensor has its qtune twin).
fn model(family: &str, checkpoint: bool) -> models::transformer::Transformer {
    model_of(&store(family), family, checkpoint)
}

fn model_of(s: &WeightStore, family: &str, checkpoint: bool) -> models::transformer::Transformer {
    let opts = LlamaOptions {
        lora: Some(LoraSpec {
            targets: vec!["all-linear".into()],
            r: 4,
            alpha: 8.0,
            ..LoraSpec::default()
        }),
        checkpoint,
        ce_chunk: 7,
        ..LlamaOptions::default()
    };
    let m = models::open(s, opts).unwrap();
    let init = load_st(&dir(family).join("adapter_init.safetensors"));
    let params = m.lora_params();
    assert_eq!(
        params.len(),
        init.len(),
        "{family}: one LoRA tensor per PEFT tensor"
    );
    for (name, var) in params {
        let t = init.get(&name);
        var.set(t.unwrap_or_else(|| panic!("{family}: {name} not in PEFT's")))
            .unwrap();
    }
    m
}

/// Logits, loss and LoRA gradients (checkpointed and not) equal transformers + PEFT's.
fn parity(family: &str) {
    let j = expected(family);
    let (ids, mask) = (
        ids(&j, "input_ids").to_dtype(DType::U32).unwrap(),
        ids(&j, "attention_mask"),
    );
    let (mask, labels) = (mask.to_dtype(DType::U32).unwrap(), ids_labels(&j));
    let want_loss = j["loss"].as_f64().unwrap();
    // PEFT's all-linear found the seven projections qtune adapts.
    let mut ours: Vec<String> = qtune::models::llama::PROJECTIONS
        .iter()
        .map(|p| p.0.into())
        .collect();
    ours.sort();
    assert_eq!(
        serde_json::to_value(&ours).unwrap(),
        j["peft_targets"],
        "{family}: PEFT targets"
    );
    let m = model(family, true);
    let logits = m.forward(&ids, Some(&mask)).unwrap();
    let r = rel(
        &logits,
        &load_st(&dir(family).join("logits.safetensors"))["logits"],
    );
    eprintln!("{family}: logits rel {r:.2e}");
    assert!(r < 1e-5, "{family}: logits rel error {r:e}");
    let grads_ref = load_st(&dir(family).join("grads.safetensors"));
    for ckpt in [true, false] {
        let m = model(family, ckpt);
        let (l, grads) = m.train_grads(&ids, Some(&mask), &labels).unwrap();
        let lr = (l as f64 - want_loss).abs() / want_loss.abs();
        assert!(lr < 1e-5, "{family} ckpt={ckpt}: loss {l} vs {want_loss}");
        assert_eq!(grads.len(), grads_ref.len());
        let mut worst = 0f64;
        for (name, want) in &grads_ref {
            let got = grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let r = rel(got, want);
            assert!(r < 1e-5, "{family} ckpt={ckpt}: {name} rel error {r:e}");
            worst = worst.max(r);
        }
        eprintln!("{family} ckpt={ckpt}: loss rel {lr:.2e}, worst LoRA grad rel {worst:.2e}");
    }
}

fn ids_labels(j: &serde_json::Value) -> Tensor {
    ids(j, "labels")
}

#[test]
fn llama3_rope_scaling() {
    let spec = models::spec_of(&store("llama3")).unwrap();
    assert!(matches!(spec.rope_scaling, RopeScaling::Llama3 { .. }));
    // The frequencies transformers uses (two kept, one smoothed, one divided by the factor).
    let want: Vec<f32> = serde_json::from_value(expected("llama3")["inv_freq"].clone()).unwrap();
    // (transformers' smoothing rounds one f32 operation differently: within an ulp)
    for (g, w) in spec.inv_freq().iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-6 * w,
            "inv_freq {g} vs transformers' {w}"
        );
    }
    assert_eq!(spec.inv_freq().len(), want.len());
    parity("llama3");
}

#[test]
fn qwen2_qkv_biases_tied_head() {
    let s = store("qwen2");
    assert!(s.get("lm_head.weight").is_none(), "Qwen2 fixture is tied");
    let spec = models::spec_of(&s).unwrap();
    assert_eq!((spec.arch, spec.sliding_window), ("qwen2", None));
    let m = model("qwen2", true);
    for (p, has) in [
        ("q_proj", true),
        ("k_proj", true),
        ("v_proj", true),
        ("o_proj", false),
        ("up_proj", false),
    ] {
        assert_eq!(
            m.base_linear(0, p).unwrap().bias().is_some(),
            has,
            "{p} bias"
        );
    }
    parity("qwen2");
}

#[test]
fn mistral_within_its_window() {
    let spec = models::spec_of(&store("mistral")).unwrap();
    assert_eq!(spec.sliding_window, Some(16));
    parity("mistral");
}

/// A sequence beyond the window is refused, with the window and what to do, in the forward and the
/// training step.
#[test]
fn mistral_refuses_beyond_its_window() {
    let m = model("mistral", true);
    let ok = Tensor::ones((1, 16), DType::U32, &Device::Cpu).unwrap();
    m.forward(&ok, None).unwrap();
    let long = Tensor::ones((1, 17), DType::U32, &Device::Cpu).unwrap();
    let e = m.forward(&long, None).unwrap_err().to_string();
    assert!(
        e.contains("sliding window of 16") && e.contains("--seq-len 16"),
        "{e}"
    );
    let labels = Tensor::ones((1, 17), DType::I64, &Device::Cpu).unwrap();
    let e = m.train_grads(&long, None, &labels).unwrap_err().to_string();
    assert!(e.contains("sliding window of 16"), "{e}");
    // Decoding applies the window mask instead (generation past the window runs).
    assert!(m.decode_ctx(40, 1).is_ok());
}

#[test]
fn tied_head_without_lm_head() {
    let s = store("tied");
    assert!(
        s.get("lm_head.weight").is_none(),
        "the file has no lm_head.weight"
    );
    assert!(models::spec_of(&s).unwrap().tied_head);
    parity("tied");
}

/// config.json readings: other `rope_scaling` types refused by name (naming the file), llama3 with a
/// missing key refused, and which sliding windows count (Qwen2's only with `use_sliding_window`).
#[test]
fn family_config_keys() {
    use qtune::models::LlamaConfig;
    let read = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        LlamaConfig::from_hf(&c, Path::new("m/config.json"))
    };
    let e = read(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
    let e = e.unwrap_err().to_string();
    assert!(e.contains("yarn") && e.contains("m/config.json"), "{e}");
    let e = read(
        serde_json::json!({"rope_scaling": {"type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0}}),
    );
    let e = e.unwrap_err().to_string();
    assert!(e.contains("original_max_position_embeddings"), "{e}");
    let w = |extra| read(extra).unwrap().family.sliding_window;
    assert_eq!(
        w(serde_json::json!({"model_type": "mistral", "sliding_window": 4096})),
        Some(4096)
    );
    assert_eq!(
        w(serde_json::json!({"model_type": "mistral", "sliding_window": null})),
        None
    );
    let q = serde_json::json!({"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": true});
    assert_eq!(w(q), Some(32));
    let q = serde_json::json!({"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": false});
    assert_eq!(w(q), None);
}

/// The GGUFs llama.cpp's converter wrote from the same models (tests/reference/gen_families_gguf.py):
/// Llama 3.1's `rope_freqs.weight`, Qwen2's `qwen2` architecture (biases, rows unpermuted) and the
/// tied head give transformers + PEFT's logits with the fixture's adapter.
#[test]
fn llama_cpp_ggufs_give_the_same_logits() {
    for family in ["llama3", "qwen2", "tied"] {
        let g = WeightStore::open(&dir(family).join("llama_cpp_f32.gguf")).unwrap();
        let spec = models::spec_of(&g).unwrap();
        match family {
            "llama3" => assert!(matches!(spec.rope_scaling, RopeScaling::Factors(_))),
            "qwen2" => assert_eq!(spec.arch, "qwen2"),
            _ => assert!(g.get("output.weight").is_none()),
        }
        let j = expected(family);
        let ids = ids(&j, "input_ids").to_dtype(DType::U32).unwrap();
        let mask = ids_mask(&j);
        let m = model_of(&g, family, true);
        let logits = m.forward(&ids, Some(&mask)).unwrap();
        let r = rel(
            &logits,
            &load_st(&dir(family).join("logits.safetensors"))["logits"],
        );
        eprintln!("{family} GGUF (llama.cpp's converter) + adapter: logits rel {r:.2e}");
        assert!(r < 1e-5, "{family} GGUF: logits rel error {r:e}");
    }
}

fn ids_mask(j: &serde_json::Value) -> Tensor {
    ids(j, "attention_mask").to_dtype(DType::U32).unwrap()
}
