//! `qtune export`: the GGUF LoRA equals the one llama.cpp's own convert_lora_to_gguf.py makes from the
//! same PEFT adapter (fixture), and the adapter read back from it gives llama.cpp's logits
//! (tests/reference/check_lora_llamacpp.py); the PEFT export round-trips.
use candle_core::{Device, Tensor};
use qtune::export::{write_gguf_lora, write_peft, Adapter};
use qtune::format::gguf;
use qtune::models::{Llama, LlamaConfig, LlamaOptions};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_same_gguf_lora, rel};

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

fn logits_fixture(name: &str) -> Tensor {
    candle_core::safetensors::load(fx().join("export/logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove(name)
        .unwrap()
}

fn forward(store: &WeightStore, adapter: &Adapter) -> Tensor {
    let m = Llama::load(
        store,
        LlamaOptions {
            lora: Some(adapter.spec()),
            ..LlamaOptions::default()
        },
    )
    .unwrap();
    adapter.apply(&m).unwrap();
    m.forward(&ids(), None).unwrap().squeeze(0).unwrap()
}

#[test]
fn gguf_lora_equals_llama_cpp_converter() {
    let store = WeightStore::open(&fx().join("llama/model")).unwrap();
    let cfg = LlamaConfig::from_store(&store).unwrap();
    let ad = Adapter::load(&fx().join("llama/f32/adapter"), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.gguf");
    write_gguf_lora(&ad, &cfg, "llama", QType::F32, &ours).unwrap();
    assert_same_gguf_lora(&ours, &fx().join("export/llamacpp-lora-f32.gguf"));
}

#[test]
fn adapter_read_from_gguf_lora_gives_llama_cpp_logits() {
    let hf = WeightStore::open(&fx().join("llama/model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::F32, &base).unwrap();
    let g = WeightStore::open(&base).unwrap();
    let cfg = LlamaConfig::from_store(&g).unwrap();
    // The file llama.cpp's converter wrote, on a GGUF base: llama.cpp's own layout end to end.
    let ad = Adapter::load(&fx().join("export/llamacpp-lora-f32.gguf"), &cfg).unwrap();
    let got = forward(&g, &ad);
    let r_cpp = rel(&got, &logits_fixture("llamacpp_lora"));
    let r_tf = rel(&got, &logits_fixture("transformers_peft"));
    eprintln!("vs llama.cpp {r_cpp:.2e}, vs transformers+PEFT {r_tf:.2e}");
    assert!(r_cpp < 1e-3, "vs llama.cpp logits: {r_cpp:e}");
    assert!(r_tf < 1e-5, "vs transformers+PEFT logits: {r_tf:e}");
    // And the frozen base is far from it: the adapter matters.
    let frozen = Llama::load(&g, LlamaOptions::default())
        .unwrap()
        .forward(&ids(), None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(rel(&frozen, &logits_fixture("llamacpp_lora")) > 1e-2);
}

#[test]
fn peft_round_trip_through_gguf_lora() {
    let store = WeightStore::open(&fx().join("llama/model")).unwrap();
    let cfg = LlamaConfig::from_store(&store).unwrap();
    let src = fx().join("llama/f32/adapter");
    let ad = Adapter::load(&src, &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("a.gguf");
    write_gguf_lora(&ad, &cfg, "llama", QType::F32, &g).unwrap();
    let back = Adapter::load(&g, &cfg).unwrap();
    let out = dir.path().join("peft");
    write_peft(&back, QType::F32, &out).unwrap();
    let (c0, t0) = qtune::lora::adapter::load_peft(&src).unwrap();
    let (c1, t1) = qtune::lora::adapter::load_peft(&out).unwrap();
    assert_eq!((c0.r, c0.lora_alpha), (c1.r, c1.lora_alpha));
    assert_eq!(t0.len(), t1.len());
    for ((n0, a), (n1, b)) in t0.iter().zip(&t1) {
        assert_eq!(n0, n1);
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(a == b, "{n0} changed in the round trip");
    }
    // f16 export is the f32 one rounded.
    let h = dir.path().join("h.gguf");
    write_gguf_lora(&ad, &cfg, "llama", QType::F16, &h).unwrap();
    let s = gguf::load(&h).unwrap();
    assert!(s.tensors.iter().all(|t| t.qtype == QType::F16));
}

/// llama.cpp scales by alpha / r: an rsLoRA adapter (alpha / sqrt(r)) is exported with
/// alpha * sqrt(r), so both give the same scale.
#[test]
fn rslora_scale_is_folded_into_alpha() {
    let store = WeightStore::open(&fx().join("llama/model")).unwrap();
    let cfg = LlamaConfig::from_store(&store).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = fx().join("llama/f32/adapter");
    let ad = dir.path().join("ad");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        ad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["use_rslora"] = serde_json::Value::Bool(true);
    std::fs::write(ad.join("adapter_config.json"), v.to_string()).unwrap();
    let a = Adapter::load(&ad, &cfg).unwrap();
    assert_eq!(a.scale, 8.0 / 2.0); // alpha 8, r 4: 8 / sqrt(4)
    let out = dir.path().join("r.gguf");
    write_gguf_lora(&a, &cfg, "llama", QType::F32, &out).unwrap();
    let s = gguf::load(&out).unwrap();
    let alpha = gguf::find(&s.gguf_metadata, "adapter.lora.alpha")
        .and_then(gguf::Value::as_f64)
        .unwrap();
    assert_eq!(alpha / 4.0, 4.0);
    let back = Adapter::load(&out, &cfg).unwrap();
    assert_eq!(back.scale, 4.0);
}

/// What `qtune train --export gguf-lora` needs: an adapter straight from a model's LoRA variables.
#[test]
fn adapter_from_model_variables() {
    let store = WeightStore::open(&fx().join("llama/model")).unwrap();
    let cfg = LlamaConfig::from_store(&store).unwrap();
    let src = fx().join("llama/f32/adapter");
    let ad = Adapter::load(&src, &cfg).unwrap();
    let m = Llama::load(
        &store,
        LlamaOptions {
            lora: Some(ad.spec()),
            ..LlamaOptions::default()
        },
    )
    .unwrap();
    ad.apply(&m).unwrap();
    let vars: Vec<(String, Tensor)> = m
        .lora_params()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let again = Adapter::from_tensors(&src, ad.cfg.clone(), &vars, &cfg).unwrap();
    assert_eq!(again.modules.len(), ad.modules.len());
    for (x, y) in again.modules.iter().zip(&ad.modules) {
        assert!(x.a == y.a && x.b == y.b, "{}", x.module_path());
    }
}
