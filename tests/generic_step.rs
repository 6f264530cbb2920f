//! The whole training step with the device-generic attention (`nn::generic`, what the GPU runs)
//! equals the step with the fused CPU kernel, for Llama (GQA-free fixture, with padding and
//! dropout) and Falcon (multi-query and grouped layouts): the model-level check, on the CPU, of
//! the one piece of the GPU step that is our own math and not a kernel. One test in its own
//! binary: it flips a process-wide switch.
use candle_core::{DType, Device, Tensor};
use qtune::models::{CausalLm, Falcon, FalconConfig, Llama, LlamaOptions, LoraSpec};
use qtune::nn::fused::GENERIC_ATTENTION;
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::Path;
use std::sync::atomic::Ordering;

fn batch(vocab: u32) -> (Tensor, Tensor, Tensor) {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % vocab).collect();
    let mut m = vec![1u32; 24];
    m[21..].iter_mut().for_each(|v| *v = 0);
    let labels: Vec<i64> = ids
        .iter()
        .zip(&m)
        .map(|(&i, &k)| if k == 0 { -100 } else { i as i64 })
        .collect();
    let cpu = &Device::Cpu;
    (
        Tensor::from_vec(ids, (2, 12), cpu).unwrap(),
        Tensor::from_vec(m, (2, 12), cpu).unwrap(),
        Tensor::from_vec(labels, (2, 12), cpu).unwrap(),
    )
}

fn opts(dtype: DType, dropout: f32) -> LlamaOptions {
    LlamaOptions {
        quant: Some(QType::Q8_0),
        dtype,
        lora: Some(LoraSpec {
            targets: vec!["all-linear".into()],
            r: 4,
            alpha: 8.0,
            dropout,
            seed: 5,
            ..LoraSpec::default()
        }),
        ce_chunk: 7,
        ..LlamaOptions::default()
    }
}

fn perturb(m: &dyn CausalLm) {
    // Varying values: a B of equal entries makes dA = s·(dz·B)ᵀ·x vanish wherever the next op is
    // invariant to a shift across channels (Falcon's LayerNorm), leaving rounding noise to compare.
    for (i, (name, v)) in m.lora_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|j| 0.05 * (i % 5 + 1) as f32 * (1.0 + 0.5 * (j as f32 * 0.7).sin()))
                .collect();
            let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let v = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (v(a), v(b));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// One step of a freshly loaded model (same seed, same perturbation) with each attention.
fn both(load: &dyn Fn() -> Box<dyn CausalLm>, vocab: u32, what: &str, tol: f32) {
    let (ids, mask, labels) = batch(vocab);
    let mut runs = Vec::new();
    for generic in [false, true] {
        GENERIC_ATTENTION.store(generic, Ordering::Relaxed);
        let m = load();
        perturb(m.as_ref());
        runs.push(m.train_grads(&ids, Some(&mask), &labels).unwrap());
    }
    GENERIC_ATTENTION.store(false, Ordering::Relaxed);
    let ((lf, gf), (lg, gg)) = (&runs[0], &runs[1]);
    assert!(
        (lf - lg).abs() <= tol * lf.abs(),
        "{what}: loss {lg} vs {lf}"
    );
    assert_eq!(gf.len(), gg.len());
    for (name, g) in gf {
        let e = max_rel(&gg[name], g);
        assert!(e < tol, "{what}: {name} off by {e:e}");
    }
}

#[test]
fn generic_attention_gives_the_fused_step() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let llama = WeightStore::open(&root.join("llama/model")).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let load =
            || -> Box<dyn CausalLm> { Box::new(Llama::load(&llama, opts(dtype, 0.1)).unwrap()) };
        both(&load, 300, &format!("llama {dtype:?}"), tol);
    }
    for layout in ["mq", "gqa"] {
        let store = WeightStore::open(&root.join(format!("falcon/{layout}/model"))).unwrap();
        let vocab = FalconConfig::from_store(&store).unwrap().vocab_size as u32;
        let load = || -> Box<dyn CausalLm> {
            Box::new(Falcon::load(&store, opts(DType::F32, 0.0)).unwrap())
        };
        both(&load, vocab, &format!("falcon {layout}"), 1e-5);
    }
}
