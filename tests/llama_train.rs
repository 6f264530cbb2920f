//! Llama training-path behaviour beyond reference parity: dropout masks replayed across the
//! checkpointed recompute, bf16 compute, layer ranges and target selection.
use candle_core::{DType, Device, Tensor};
use qtune::models::{Llama, LlamaOptions, LoraSpec};
use qtune::store::WeightStore;
use std::path::Path;

fn store() -> WeightStore {
    WeightStore::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model"))
        .unwrap()
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 300).collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
    let mut m = vec![1u32; 24];
    m[21..].iter_mut().for_each(|v| *v = 0);
    let mask = Tensor::from_vec(m.clone(), (2, 12), &Device::Cpu).unwrap();
    let labels: Vec<i64> = ids
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .zip(&m)
        .map(|(&i, &k)| if k == 0 { -100 } else { i as i64 })
        .collect();
    let labels = Tensor::from_vec(labels, (2, 12), &Device::Cpu).unwrap();
    (ids, mask, labels)
}

fn load(spec: LoraSpec, checkpoint: bool, dtype: DType) -> Llama {
    Llama::load(
        &store(),
        LlamaOptions {
            lora: Some(spec),
            checkpoint,
            dtype,
            ..LlamaOptions::default()
        },
    )
    .unwrap()
}

/// Makes every B non-zero so that all gradient paths carry signal.
fn perturb(m: &Llama) {
    for (i, (name, v)) in m.lora_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let t = (Tensor::ones(v.shape(), DType::F32, &Device::Cpu).unwrap()
                * (0.05 * (i % 5 + 1) as f64))
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

/// With dropout on, the checkpointed backward must recompute each layer with the masks of its
/// forward: its gradients equal the whole-graph backward's. A mask redrawn in the recompute would
/// give different gradients (checked: a second step draws new masks and the gradients change).
#[test]
fn dropout_masks_replay_in_recompute() {
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.3,
        seed: 7,
        ..LoraSpec::default()
    };
    let (ids, mask, labels) = batch();
    let a = load(spec.clone(), true, DType::F32);
    let b = load(spec, false, DType::F32);
    perturb(&a);
    perturb(&b);
    let (la, ga) = a.train_grads(&ids, Some(&mask), &labels).unwrap();
    let (lb, gb) = b.train_grads(&ids, Some(&mask), &labels).unwrap();
    assert!((la - lb).abs() <= 1e-6 * lb.abs(), "{la} vs {lb}");
    assert_eq!(ga.len(), 28);
    for (k, g) in &ga {
        let r = max_rel(g, &gb[k]);
        assert!(r < 1e-5, "{k}: checkpointed vs full rel {r:e}");
    }
    // The next step draws other masks: loss and gradients move (so the test above can fail).
    let (la2, ga2) = a.train_grads(&ids, Some(&mask), &labels).unwrap();
    assert!(
        (la2 - la).abs() > 1e-4,
        "dropout masks did not change between steps"
    );
    let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert!(max_rel(&ga2[k], &ga[k]) > 1e-3);
    // Evaluation (loss) has no dropout and differs from the training loss.
    let le = a
        .loss(&ids, Some(&mask), &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (le - la).abs() > 1e-5,
        "eval loss {le} equals the dropout loss {la}"
    );
}

/// bf16 compute follows the f32 model to bf16 precision (8 mantissa bits, ~4e-3 per rounding).
#[test]
fn bf16_compute_tracks_f32() {
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        ..LoraSpec::default()
    };
    let (ids, mask, labels) = batch();
    let f = load(spec.clone(), true, DType::F32);
    let h = load(spec, true, DType::BF16);
    perturb(&f);
    perturb(&h);
    // Same A in both: copy f32's A into the bf16 model.
    for ((_, vf), (_, vh)) in f.lora_params().into_iter().zip(h.lora_params()) {
        vh.set(&vf.as_tensor().to_dtype(DType::BF16).unwrap())
            .unwrap();
    }
    let (lf, gf) = f.train_grads(&ids, Some(&mask), &labels).unwrap();
    let (lh, gh) = h.train_grads(&ids, Some(&mask), &labels).unwrap();
    assert!(
        (lf - lh).abs() < 2e-2 * lf.abs(),
        "bf16 loss {lh} vs f32 {lf}"
    );
    let mut worst = 0f32;
    for (k, g) in &gf {
        assert_eq!(gh[k].dtype(), DType::BF16);
        let r = max_rel(&gh[k], g);
        assert!(r < 0.1, "{k}: bf16 grad rel {r}");
        worst = worst.max(r);
    }
    eprintln!("bf16 step against f32: loss {lh} vs {lf}, worst gradient rel {worst:.3e}");
}

/// Targets and layer ranges select exactly the named adapters.
#[test]
fn targets_and_layer_range() {
    let m = load(
        LoraSpec {
            targets: vec!["q_proj".into(), "down_proj".into()],
            layers: Some(1..2),
            ..LoraSpec::default()
        },
        true,
        DType::F32,
    );
    let names: Vec<String> = m.lora_params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
        ]
    );
    let bad = Llama::load(
        &store(),
        LlamaOptions {
            lora: Some(LoraSpec {
                targets: vec!["qkv".into()],
                ..LoraSpec::default()
            }),
            ..LlamaOptions::default()
        },
    );
    assert!(bad.is_err());
}

/// Bad inputs are errors, not panics: token ids past the vocabulary, labels of another shape,
/// a batch without targets.
#[test]
fn bad_inputs_are_errors() {
    let m = load(LoraSpec::default(), true, DType::F32);
    let (ids, mask, labels) = batch();
    let big = Tensor::from_vec(vec![5u32, 300], (1, 2), &Device::Cpu).unwrap();
    let err = m.forward(&big, None).unwrap_err().to_string();
    assert!(err.contains("token id 300"), "{err}");
    let short = labels.narrow(1, 0, 11).unwrap();
    assert!(m.train_grads(&ids, Some(&mask), &short).is_err());
    let none = Tensor::full(-100i64, (2, 12), &Device::Cpu).unwrap();
    let err = m
        .train_grads(&ids, Some(&mask), &none)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no target tokens"), "{err}");
    let bad = Tensor::full(300i64, (2, 12), &Device::Cpu).unwrap();
    assert!(m.train_grads(&ids, Some(&mask), &bad).is_err());
    assert!(m.loss(&ids, Some(&mask), &bad).is_err());
}
