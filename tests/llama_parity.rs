//! Llama + LoRA parity with transformers 4.46.3 / PEFT 0.13.2 (fixtures from
//! tests/reference/gen_llama_fixtures.py): logits, loss and every LoRA gradient, on an f32 base and on
//! bases quantised at load to Q8_0 and NF4, with gradient checkpointing on and off; and the same model
//! written as an f32 GGUF (llama.cpp names, permuted Q/K rows) gives the same logits.
use candle_core::{DType, Device, Tensor};
use qtune::models::{Llama, LlamaOptions, LoraSpec};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
    loss: f64,
    /// Losses of 10 AdamW steps (lr 1e-2, betas 0.9/0.999, eps 1e-8, no weight decay).
    losses: Vec<f64>,
}

fn batch(tag: &str) -> Batch {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(tag).join("expected.json")).unwrap(),
    )
    .unwrap();
    let mat = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(j[k].clone()).unwrap() };
    let t = |v: Vec<Vec<i64>>| {
        let (b, t) = (v.len(), v[0].len());
        Tensor::from_vec(v.concat(), (b, t), &Device::Cpu).unwrap()
    };
    Batch {
        ids: t(mat("input_ids")).to_dtype(DType::U32).unwrap(),
        mask: t(mat("attention_mask")).to_dtype(DType::U32).unwrap(),
        labels: t(mat("labels")),
        loss: j["loss"].as_f64().unwrap(),
        losses: serde_json::from_value(j["losses"].clone()).unwrap(),
    }
}

/// A safetensors file by name; the fixture's parameter names carry PEFT's in-memory adapter name
/// (`lora_A.default.weight`), which saved adapters (and qtune) leave out.
fn load_st(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.replace(".default.weight", ".weight"), v))
        .collect()
}

/// max |a - b| / max |b| over all elements.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (d / m) as f64
}

fn lora_spec() -> LoraSpec {
    LoraSpec {
        targets: vec!["all-linear".into()],
        r: 4,
        alpha: 8.0,
        ..LoraSpec::default()
    }
}

/// A model with the fixture's initial adapter weights.
fn model(store: &WeightStore, quant: Option<QType>, checkpoint: bool, tag: &str) -> Llama {
    let m = Llama::load(
        store,
        LlamaOptions {
            quant,
            lora: Some(lora_spec()),
            checkpoint,
            ce_chunk: 7, // several chunks, one partial
            ..LlamaOptions::default()
        },
    )
    .unwrap();
    let init = load_st(&fixtures().join(tag).join("adapter_init.safetensors"));
    let params = m.lora_params();
    assert_eq!(params.len(), init.len(), "one LoRA tensor per PEFT tensor");
    for (name, var) in params {
        let t = init
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not in the fixture"));
        var.set(t).unwrap();
    }
    m
}

fn parity(tag: &str, quant: Option<QType>) {
    let store = WeightStore::open(&fixtures().join("model")).unwrap();
    let b = batch(tag);
    let dir = fixtures().join(tag);
    // The quantised-at-load base is exactly what torch ran on.
    let base = load_st(&dir.join("base_dequantized.safetensors"));
    let m = model(&store, quant, true, tag);
    for layer in 0..2 {
        for (p, g, _) in qtune::models::llama::PROJECTIONS {
            let l = m.base_linear(layer, p).unwrap();
            assert_eq!(l.weight().qtype, quant.unwrap_or(QType::F32));
            let mx = l.weight().matrix();
            let mut w = vec![0f32; mx.rows * mx.cols];
            mx.dequant_tile(0, mx.rows, 0, mx.cols, &mut w);
            let want: Vec<f32> = base[&format!("model.layers.{layer}.{g}.{p}.weight")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                w == want,
                "{tag}: layer {layer} {p} base differs from the reference"
            );
        }
    }
    let logits = m.forward(&b.ids, Some(&b.mask)).unwrap();
    let want = &load_st(&dir.join("logits.safetensors"))["logits"];
    let r = rel(&logits, want);
    eprintln!("{tag}: logits rel {r:.2e}");
    assert!(r < 1e-5, "{tag}: logits rel error {r:e}");
    let loss = m
        .loss(&b.ids, Some(&b.mask), &b.labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let lr = (loss - b.loss).abs() / b.loss.abs();
    eprintln!("{tag}: loss {loss} vs {} (rel {lr:.2e})", b.loss);
    assert!(lr < 1e-5, "{tag}: loss {loss} vs {}", b.loss);
    let grads_ref = load_st(&dir.join("grads.safetensors"));
    for ckpt in [true, false] {
        let m = model(&store, quant, ckpt, tag);
        let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        let lr = (l as f64 - b.loss).abs() / b.loss.abs();
        assert!(lr < 1e-5, "{tag} ckpt={ckpt}: train loss {l} vs {}", b.loss);
        assert_eq!(grads.len(), grads_ref.len());
        let mut worst = 0f64;
        for (name, want) in &grads_ref {
            let got = grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let r = rel(got, want);
            assert!(r < 1e-4, "{tag} ckpt={ckpt}: {name} rel error {r:e}");
            worst = worst.max(r);
        }
        eprintln!("{tag} ckpt={ckpt}: loss rel {lr:.2e}, worst LoRA grad rel {worst:.2e}");
    }
}

#[test]
fn parity_f32() {
    parity("f32", None);
}

#[test]
fn parity_q8_0_quantised_at_load() {
    parity("q8_0", Some(QType::Q8_0));
}

#[test]
fn parity_nf4_quantised_at_load() {
    parity("nf4", Some(QType::NF4));
}

/// The f32 GGUF written by `quantize_to_gguf` (llama.cpp names, Q/K rows permuted for its rotary)
/// gives the safetensors model's logits, frozen and with the fixture's adapter (whose q/k B rows are
/// in Hugging Face order: the GGUF loader must undo the permutation, not just rotate differently).
#[test]
fn gguf_base_gives_the_same_logits() {
    let store = WeightStore::open(&fixtures().join("model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-f32.gguf");
    qtune::quantize::quantize_to_gguf(&store, QType::F32, &path).unwrap();
    let g = WeightStore::open(&path).unwrap();
    let b = batch("f32");
    let frozen = |s: &WeightStore| {
        Llama::load(s, LlamaOptions::default())
            .unwrap()
            .forward(&b.ids, Some(&b.mask))
            .unwrap()
    };
    let r = rel(&frozen(&g), &frozen(&store));
    eprintln!("gguf frozen: logits rel {r:.2e}");
    assert!(r < 1e-5, "frozen GGUF logits rel error {r:e}");
    let m = model(&g, None, true, "f32");
    let want = &load_st(&fixtures().join("f32/logits.safetensors"))["logits"];
    let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
    eprintln!("gguf + adapter: logits rel {r:.2e}");
    assert!(r < 1e-5, "GGUF + adapter logits rel error {r:e}");
    // And q/k LoRA gradients come out in Hugging Face row order, equal to PyTorch's.
    let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
    assert!((l as f64 - b.loss).abs() < 1e-5 * b.loss.abs());
    let grads_ref = load_st(&fixtures().join("f32/grads.safetensors"));
    for (name, want) in &grads_ref {
        let r = rel(&grads[name], want);
        assert!(r < 1e-4, "GGUF base: {name} rel error {r:e}");
    }
}

/// Ten AdamW steps (train::optim, torch's AdamW) on the fixture batch follow PyTorch's loss curve
/// to 1e-4, with checkpointing, on each base.
fn adamw_curve(tag: &str, quant: Option<QType>) {
    use qtune::train::optim::{AdamW, AdamWConfig};
    let store = WeightStore::open(&fixtures().join("model")).unwrap();
    let b = batch(tag);
    let m = model(&store, quant, true, tag);
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(m.lora_params(), cfg).unwrap();
    let mut worst = 0f64;
    for (i, want) in b.losses.iter().enumerate() {
        let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        let r = (l as f64 - want).abs() / want.abs();
        assert!(r < 1e-4, "{tag}: step {i} loss {l} vs {want} (rel {r:e})");
        worst = worst.max(r);
        opt.step(&grads, 1e-2).unwrap();
    }
    eprintln!("{tag}: 10 AdamW steps, worst loss rel {worst:.2e}");
}

#[test]
fn adamw_10_steps_f32() {
    adamw_curve("f32", None);
}

#[test]
fn adamw_10_steps_q8_0() {
    adamw_curve("q8_0", Some(QType::Q8_0));
}

#[test]
fn adamw_10_steps_nf4() {
    adamw_curve("nf4", Some(QType::NF4));
}

/// A bitsandbytes 4-bit checkpoint as a base: the reference model written by our bnb-layout writer
/// (byte-identical to bitsandbytes' own serialisation, tests/nf4_write.rs) loads as stored NF4 and
/// gives the NF4 reference's logits, loss and LoRA gradients (PyTorch ran on bnb's dequantisation).
#[test]
fn bnb_4bit_checkpoint_base() {
    let src = WeightStore::open(&fixtures().join("model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bnb");
    qtune::format::bnb::write_nf4_dir(&src, &out).unwrap();
    let store = WeightStore::open(&out).unwrap();
    assert_eq!(store.format, qtune::store::SourceFormat::BnbNf4);
    let m = model(&store, None, true, "nf4");
    assert_eq!(
        m.base_linear(0, "q_proj").unwrap().weight().qtype,
        QType::NF4
    );
    let b = batch("nf4");
    let want = &load_st(&fixtures().join("nf4/logits.safetensors"))["logits"];
    let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
    eprintln!("bnb checkpoint: logits rel {r:.2e}");
    assert!(r < 1e-5, "bnb checkpoint logits rel error {r:e}");
    let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
    assert!(
        (l as f64 - b.loss).abs() < 1e-5 * b.loss.abs(),
        "loss {l} vs {}",
        b.loss
    );
    let grads_ref = load_st(&fixtures().join("nf4/grads.safetensors"));
    for (name, want) in &grads_ref {
        let r = rel(&grads[name], want);
        assert!(r < 1e-4, "bnb base: {name} rel error {r:e}");
    }
}
