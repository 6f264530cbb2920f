//! The whole training step with the device-generic attention (`nn::generic`, what the GPU runs)
//! equals the step with the fused CPU kernel, for Llama (GQA-free fixture, with padding and
//! dropout) and Falcon (multi-query and grouped layouts): the model-level check, on the CPU, of
//! the one piece of the GPU step that is our own math and not a kernel. One test in its own
//! binary: it flips process-wide switches. In bf16 the fused attention's block products are held
//! at f32 here (`F32_ATTENTION_PRODUCTS`), as the generic attention computes them in the step's
//! f32 recompute: this compares the two implementations of one math at the dtype's tolerance. The
//! bf16 products themselves are checked against torch in `fused_ops.rs`
//! (`attention_bf16_products_match_torch`) and, in a whole bf16 step against the f32 step, in
//! `llama_train.rs` (`bf16_compute_tracks_f32`).
mod common;

use candle_core::DType;
use qtune::models::{CausalLm, Falcon, FalconConfig, Llama};
use qtune::nn::fused::{F32_ATTENTION_PRODUCTS, GENERIC_ATTENTION};
use qtune::store::WeightStore;
use std::path::Path;
use std::sync::atomic::Ordering;

/// One step of a freshly loaded model (same seed, same perturbation) with each attention.
fn both(load: &dyn Fn() -> Box<dyn CausalLm>, vocab: u32, what: &str, tol: f32) {
    let (ids, mask, labels) = common::step_batch(vocab);
    let mut runs = Vec::new();
    for generic in [false, true] {
        GENERIC_ATTENTION.store(generic, Ordering::Relaxed);
        let m = load();
        common::perturb_lora_b(m.as_ref());
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
        let e = common::max_rel_any(&gg[name], g);
        assert!(e < tol, "{what}: {name} off by {e:e}");
    }
}

#[test]
fn generic_attention_gives_the_fused_step() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let llama = WeightStore::open(&root.join("llama/model")).unwrap();
    F32_ATTENTION_PRODUCTS.store(true, Ordering::Relaxed);
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let load = || -> Box<dyn CausalLm> {
            Box::new(Llama::load(&llama, common::step_opts(dtype, 0.1)).unwrap())
        };
        both(&load, 300, &format!("llama {dtype:?}"), tol);
    }
    for layout in ["mq", "gqa"] {
        let store = WeightStore::open(&root.join(format!("falcon/{layout}/model"))).unwrap();
        let vocab = FalconConfig::from_store(&store).unwrap().vocab_size as u32;
        let load = || -> Box<dyn CausalLm> {
            Box::new(Falcon::load(&store, common::step_opts(DType::F32, 0.0)).unwrap())
        };
        both(&load, vocab, &format!("falcon {layout}"), 1e-5);
    }
}
