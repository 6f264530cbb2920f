//! Falcon + LoRA parity with transformers 4.46.3 / PEFT 0.13.2 (fixtures from
//! tests/reference/gen_falcon_fixtures.py), for three tiny models stored in f16: `mq` (Falcon-7B
//! layout: multi-query, parallel attention, 3 heads of 64), `gqa` (new decoder layout, 6 heads in 2
//! KV groups, ln_attn and ln_mlp) and `seq` (old layout without multi-query: sequential attention
//! then MLP, per-head fused qkv, linears with bias). On the f16 base (f32 compute) and on bases
//! quantised at load to Q8_0 and NF4 (not `seq`): logits and loss (1e-5), every LoRA gradient with
//! checkpointing on and off (1e-4), and the losses of 10 AdamW steps (1e-4).
use candle_core::{DType, Device, Tensor};
use qtune::models::falcon::PROJECTIONS;
use qtune::models::{Falcon, FalconOptions, LoraSpec};
use qtune::quant::QType;
use qtune::store::WeightStore;
use qtune::train::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/falcon")
        .join(kind)
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
    loss: f64,
    losses: Vec<f64>,
    lr: f64,
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn batch(dir: &Path) -> Batch {
    let j = json(&dir.join("expected.json"));
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
        lr: j["lr"].as_f64().unwrap(),
    }
}

/// A safetensors file by name, PEFT's in-memory adapter name (`.default`) left out as saved
/// adapters (and qtune) do.
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

/// A model with the fixture's initial adapter weights.
fn model(store: &WeightStore, quant: Option<QType>, checkpoint: bool, dir: &Path) -> Falcon {
    let m = Falcon::load(
        store,
        FalconOptions {
            quant,
            lora: Some(LoraSpec {
                targets: vec!["all-linear".into()],
                r: 4,
                alpha: 8.0,
                ..LoraSpec::default()
            }),
            checkpoint,
            ce_chunk: 7, // several chunks, one partial
            ..FalconOptions::default()
        },
    )
    .unwrap();
    let init = load_st(&dir.join("adapter_init.safetensors"));
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

/// The base qtune quantised at load is what torch ran on: the reference's fingerprint of every
/// dequantised decoder linear (weighted f64 sum and first 16 values).
fn check_base(m: &Falcon, dir: &Path, quant: Option<QType>) {
    let want = json(&dir.join("base_check.json"));
    let groups = |g: &str| if g == "mlp" { "mlp" } else { "self_attention" };
    for layer in 0..m.config().num_layers {
        for (p, g, _) in PROJECTIONS {
            let l = m.base_linear(layer, p).unwrap();
            assert_eq!(l.weight().qtype, quant.unwrap_or(QType::F16));
            let mx = l.weight().matrix();
            let mut w = vec![0f32; mx.rows * mx.cols];
            mx.dequant_tile(0, mx.rows, 0, mx.cols, &mut w);
            let key = format!("transformer.h.{layer}.{}.{p}.weight", groups(g));
            let fp = &want[&key];
            let head: Vec<f32> = serde_json::from_value(fp["head"].clone()).unwrap();
            assert_eq!(&w[..16], &head[..], "{key}: first values differ");
            let ws: f64 = w
                .iter()
                .enumerate()
                .map(|(i, &x)| x as f64 * (1 + i % 7) as f64)
                .sum();
            let scale: f64 = w
                .iter()
                .enumerate()
                .map(|(i, &x)| (x as f64 * (1 + i % 7) as f64).abs())
                .sum();
            let d = (ws - fp["weighted_sum"].as_f64().unwrap()).abs() / scale;
            assert!(d < 1e-12, "{key}: weighted sum differs ({d:e})");
        }
    }
}

fn parity(kind: &str, tag: &str, quant: Option<QType>) {
    let store = WeightStore::open(&fixtures(kind).join("model")).unwrap();
    let dir = fixtures(kind).join(tag);
    let b = batch(&dir);
    let m = model(&store, quant, true, &dir);
    check_base(&m, &dir, quant);
    let logits = m.forward(&b.ids, Some(&b.mask)).unwrap();
    let want = &load_st(&dir.join("logits.safetensors"))["logits"];
    let r = rel(&logits, want);
    eprintln!("{kind}/{tag}: logits rel {r:.2e}");
    assert!(r < 1e-5, "{kind}/{tag}: logits rel error {r:e}");
    let loss = m
        .loss(&b.ids, Some(&b.mask), &b.labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let lr = (loss - b.loss).abs() / b.loss.abs();
    eprintln!("{kind}/{tag}: loss {loss} vs {} (rel {lr:.2e})", b.loss);
    assert!(lr < 1e-5, "{kind}/{tag}: loss {loss} vs {}", b.loss);
    let grads_ref = load_st(&dir.join("grads.safetensors"));
    for ckpt in [true, false] {
        let m = model(&store, quant, ckpt, &dir);
        let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        let lr = (l as f64 - b.loss).abs() / b.loss.abs();
        assert!(
            lr < 1e-5,
            "{kind}/{tag} ckpt={ckpt}: train loss {l} vs {}",
            b.loss
        );
        assert_eq!(grads.len(), grads_ref.len());
        let mut worst = 0f64;
        for (name, want) in &grads_ref {
            let got = grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let r = rel(got, want);
            assert!(r < 1e-4, "{kind}/{tag} ckpt={ckpt}: {name} rel error {r:e}");
            worst = worst.max(r);
        }
        eprintln!("{kind}/{tag} ckpt={ckpt}: loss rel {lr:.2e}, worst LoRA grad rel {worst:.2e}");
    }
    // 10 AdamW steps (torch defaults, weight decay 0) on the same batch, checkpointing on.
    let m = model(&store, quant, true, &dir);
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(m.lora_params(), cfg).unwrap();
    let mut worst = 0f64;
    for (s, want) in b.losses.iter().enumerate() {
        let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        let r = (l as f64 - want).abs() / want.abs();
        assert!(r < 1e-4, "{kind}/{tag}: AdamW step {s} loss {l} vs {want}");
        worst = worst.max(r);
        opt.step(&grads, b.lr).unwrap();
    }
    eprintln!("{kind}/{tag}: 10 AdamW losses, worst rel {worst:.2e}");
}

#[test]
fn mq_parity_f32() {
    parity("mq", "f32", None);
}

#[test]
fn mq_parity_q8_0_quantised_at_load() {
    parity("mq", "q8_0", Some(QType::Q8_0));
}

#[test]
fn mq_parity_nf4_quantised_at_load() {
    parity("mq", "nf4", Some(QType::NF4));
}

#[test]
fn seq_parity_f32() {
    parity("seq", "f32", None);
}

#[test]
fn seq_parity_q8_0_quantised_at_load() {
    parity("seq", "q8_0", Some(QType::Q8_0));
}

#[test]
fn gqa_parity_f32() {
    parity("gqa", "f32", None);
}

#[test]
fn gqa_parity_q8_0_quantised_at_load() {
    parity("gqa", "q8_0", Some(QType::Q8_0));
}

#[test]
fn gqa_parity_nf4_quantised_at_load() {
    parity("gqa", "nf4", Some(QType::NF4));
}

fn fnv1a64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// `quantize_to_gguf` on a Hugging Face Falcon writes what llama.cpp's converter writes
/// (tests/reference/gen_falcon_gguf.py recorded it: every tensor's name, type, shape and bytes, by
/// hash), the same `falcon.*` metadata but for `feed_forward_length` (the converter writes 4 x
/// hidden; ours is the real size) and the same tokenizer sizes. That file (`falcon` names, fused
/// qkv regrouped to `[all q, all k, all v]`, `ln_attn` as attn_norm_2) then gives the transformers
/// logits and LoRA gradients with the fixture's adapter, on the f16 base and quantised at load to
/// Q8_0 and NF4.
#[test]
fn gqa_gguf_as_llama_cpp_writes_it_matches_transformers() {
    use qtune::format::gguf::{find, Value};
    let hf = WeightStore::open(&fixtures("gqa").join("model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gqa-f16.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::F16, &path).unwrap();
    let g = WeightStore::open(&path).unwrap();
    let want = json(&fixtures("gqa").join("llama_cpp_f16.json"));
    let tensors = want["tensors"].as_object().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    for (name, w) in tensors {
        let o = g.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(o.qtype.name(), w["type"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(o.shape, shape, "{name}");
        let h: u64 = w["fnv1a64"].as_str().unwrap().parse().unwrap();
        assert_eq!(fnv1a64(o.data.as_slice()), h, "{name}: bytes differ");
    }
    for (k, v) in want["metadata"].as_object().unwrap() {
        let ours = find(&g.gguf_metadata, k).unwrap_or_else(|| panic!("{k} missing"));
        match k.as_str() {
            "falcon.feed_forward_length" => assert_eq!(ours.as_u64(), Some(128)),
            _ if v.is_string() => assert_eq!(ours.as_str(), v.as_str(), "{k}"),
            _ if v.is_u64() => assert_eq!(ours.as_u64(), v.as_u64(), "{k}"),
            _ => assert_eq!(ours.as_f64(), v.as_f64(), "{k}"),
        }
    }
    let len = |k: &str| {
        find(&g.gguf_metadata, k)
            .and_then(Value::as_array)
            .map(|a| a.len())
    };
    assert_eq!(
        len("tokenizer.ggml.tokens"),
        want["tokens"].as_u64().map(|x| x as usize)
    );
    assert_eq!(
        len("tokenizer.ggml.merges"),
        want["merges"].as_u64().map(|x| x as usize)
    );
    let eos = find(&g.gguf_metadata, "tokenizer.ggml.eos_token_id").and_then(Value::as_u64);
    assert_eq!(eos, want["eos_token_id"].as_u64());

    let mut gc = qtune::models::FalconConfig::from_store(&g).unwrap();
    let hc = qtune::models::FalconConfig::from_store(&hf).unwrap();
    // GGUF stores the epsilon as f32.
    assert_eq!(gc.layer_norm_eps, hc.layer_norm_eps as f32 as f64);
    gc.layer_norm_eps = hc.layer_norm_eps;
    assert_eq!(gc, hc);
    for (tag, quant) in [
        ("f32", None),
        ("q8_0", Some(QType::Q8_0)),
        ("nf4", Some(QType::NF4)),
    ] {
        let dir = fixtures("gqa").join(tag);
        let b = batch(&dir);
        let m = model(&g, quant, true, &dir);
        check_base(&m, &dir, quant);
        let want = &load_st(&dir.join("logits.safetensors"))["logits"];
        let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
        eprintln!("gguf {tag}: logits rel {r:.2e}");
        assert!(r < 1e-5, "GGUF {tag}: logits rel error {r:e}");
        let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        assert!(
            (l as f64 - b.loss).abs() / b.loss < 1e-5,
            "GGUF {tag}: loss {l}"
        );
        for (name, want) in &load_st(&dir.join("grads.safetensors")) {
            let r = rel(&grads[name], want);
            assert!(r < 1e-4, "GGUF {tag}: {name} rel error {r:e}");
        }
    }
}

/// The multi-query model written by `quantize_to_gguf` (f16) loads back with the transformers
/// logits and LoRA gradients.
#[test]
fn mq_qtune_gguf_matches_transformers() {
    let hf = WeightStore::open(&fixtures("mq").join("model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mq-f16.gguf");
    qtune::quantize::quantize_to_gguf(&hf, QType::F16, &path).unwrap();
    let g = WeightStore::open(&path).unwrap();
    let dir = fixtures("mq").join("f32");
    let b = batch(&dir);
    let m = model(&g, None, true, &dir);
    check_base(&m, &dir, None);
    let want = &load_st(&dir.join("logits.safetensors"))["logits"];
    let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
    eprintln!("mq qtune gguf: logits rel {r:.2e}");
    assert!(r < 1e-5, "logits rel error {r:e}");
    let (_, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
    for (name, want) in &load_st(&dir.join("grads.safetensors")) {
        let r = rel(&grads[name], want);
        assert!(r < 1e-4, "{name} rel error {r:e}");
    }
}

/// PEFT's own `save_pretrained` adapter directory loads into qtune's Falcon by name (targets from
/// its adapter_config.json) and gives the logits PEFT computed; qtune's save loads back the same.
#[test]
fn peft_adapter_dir_round_trip() {
    use qtune::lora::adapter::{load_peft, save_peft_vars, AdapterConfig};
    let store = WeightStore::open(&fixtures("mq").join("model")).unwrap();
    let dir = fixtures("mq").join("f32");
    let (cfg, tensors) = load_peft(&dir.join("adapter")).unwrap();
    assert!(cfg.targets("query_key_value") && cfg.targets("dense") && cfg.targets("dense_4h_to_h"));
    let m = Falcon::load(
        &store,
        FalconOptions {
            lora: Some(LoraSpec {
                targets: PROJECTIONS.iter().map(|p| p.0.to_string()).collect(),
                r: cfg.r,
                alpha: cfg.lora_alpha,
                ..LoraSpec::default()
            }),
            ..FalconOptions::default()
        },
    )
    .unwrap();
    let by_name: HashMap<_, _> = tensors.into_iter().collect();
    let params = m.lora_params();
    assert_eq!(params.len(), by_name.len());
    for (name, var) in &params {
        var.set(&by_name[name]).unwrap();
    }
    let b = batch(&dir);
    let want = &load_st(&dir.join("logits.safetensors"))["logits"];
    let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
    assert!(r < 1e-5, "PEFT adapter logits rel error {r:e}");
    let tmp = tempfile::tempdir().unwrap();
    let out: AdapterConfig = cfg.clone();
    save_peft_vars(tmp.path(), &out, &params).unwrap();
    let (_, back) = load_peft(tmp.path()).unwrap();
    for (name, t) in back {
        assert_eq!(rel(&t, &by_name[&name]), 0.0, "{name}");
    }
}

/// bf16 compute (what training uses) runs every layout end to end: the loss and logits stay within
/// bf16's precision of the f32 reference, and so do the gradients (against PEFT's f32 ones) with
/// the layers recomputed in f32 (the CPU's default) or in bf16; with a bf16 recompute the
/// checkpointed gradients equal the non-checkpointed ones bit for bit.
#[test]
fn bf16_compute_runs_every_layout() {
    for (kind, recompute) in [
        ("mq", None),
        ("gqa", None),
        ("seq", None),
        ("mq", Some(DType::BF16)),
        ("gqa", Some(DType::BF16)),
        ("seq", Some(DType::BF16)),
    ] {
        let store = WeightStore::open(&fixtures(kind).join("model")).unwrap();
        let dir = fixtures(kind).join("f32");
        let b = batch(&dir);
        let load = |checkpoint| {
            let m = Falcon::load(
                &store,
                FalconOptions {
                    dtype: DType::BF16,
                    lora: Some(LoraSpec {
                        targets: vec!["all-linear".into()],
                        r: 4,
                        alpha: 8.0,
                        ..LoraSpec::default()
                    }),
                    checkpoint,
                    ce_chunk: 7,
                    recompute,
                    ..FalconOptions::default()
                },
            )
            .unwrap();
            let init = load_st(&dir.join("adapter_init.safetensors"));
            for (name, var) in m.lora_params() {
                var.set(&init[&name].to_dtype(DType::BF16).unwrap())
                    .unwrap();
            }
            m
        };
        let m = load(true);
        let want = &load_st(&dir.join("logits.safetensors"))["logits"];
        let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
        let (l, g1) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        let lr = (l as f64 - b.loss).abs() / b.loss;
        eprintln!("{kind} bf16: logits rel {r:.2e}, loss rel {lr:.2e}");
        assert!(
            r < 3e-2 && lr < 1e-2,
            "{kind} bf16: logits {r:e}, loss {lr:e}"
        );
        let grads_ref = load_st(&dir.join("grads.safetensors"));
        let mut worst = 0f64;
        for (name, want) in &grads_ref {
            let r = rel(&g1[name].to_dtype(DType::F32).unwrap(), want);
            worst = worst.max(r);
        }
        eprintln!("{kind} bf16, recompute {recompute:?}: worst gradient rel {worst:.2e}");
        assert!(
            worst < 3e-2,
            "{kind} bf16 ({recompute:?}): gradient rel {worst:e}"
        );
        if recompute.is_none() {
            continue;
        }
        let (_, g2) = load(false)
            .train_grads(&b.ids, Some(&b.mask), &b.labels)
            .unwrap();
        for (name, g) in &g1 {
            let g = g.to_dtype(DType::F32).unwrap();
            assert_eq!(
                rel(&g, &g2[name].to_dtype(DType::F32).unwrap()),
                0.0,
                "{name}"
            );
        }
    }
}

/// A bitsandbytes 4-bit Falcon checkpoint as the base: the multi-query model written by our
/// bnb-layout writer (bit-exact with bitsandbytes' quantiser) loads its decoder linears as stored
/// NF4 and gives the NF4 reference's logits and LoRA gradients.
#[test]
fn mq_bnb_4bit_checkpoint_base() {
    let src = WeightStore::open(&fixtures("mq").join("model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bnb");
    qtune::format::bnb::write_nf4_dir(&src, &out).unwrap();
    let store = WeightStore::open(&out).unwrap();
    assert_eq!(store.format, qtune::store::SourceFormat::BnbNf4);
    let dir = fixtures("mq").join("nf4");
    let b = batch(&dir);
    let m = model(&store, None, true, &dir);
    let want = &load_st(&dir.join("logits.safetensors"))["logits"];
    let r = rel(&m.forward(&b.ids, Some(&b.mask)).unwrap(), want);
    eprintln!("mq bnb checkpoint: logits rel {r:.2e}");
    assert!(r < 1e-5, "bnb Falcon logits rel error {r:e}");
    let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
    assert!((l as f64 - b.loss).abs() < 1e-5 * b.loss.abs());
    for (name, want) in &load_st(&dir.join("grads.safetensors")) {
        let r = rel(&grads[name], want);
        assert!(r < 1e-4, "bnb Falcon: {name} rel error {r:e}");
    }
}
