//! The checkpointed backward with each layer's recompute beside the next one's backward
//! (`models::step::pipelined`, `QTUNE_PIPELINE=1` on a CPU with two threads or more) gives the step of
//! the one-layer-at-a-time backward bit for bit: Llama (padding, dropout; f32 and bf16) and
//! Falcon (multi-query), on a two-thread pool. One test in its own binary: it flips a
//! process-wide switch.
mod common;

use candle_core::DType;
use qtune::models::{CausalLm, Falcon, Llama, PIPELINED_RECOMPUTE};
use qtune::store::WeightStore;
use std::path::Path;
use std::sync::atomic::Ordering;

/// One step of a freshly loaded model with and without the pipeline: the same loss and gradients.
fn same_step(load: &dyn Fn() -> Box<dyn CausalLm>, vocab: u32, what: &str) {
    let (ids, mask, labels) = common::step_batch(vocab);
    let mut runs = Vec::new();
    for on in [false, true] {
        PIPELINED_RECOMPUTE.store(on, Ordering::Relaxed);
        let m = load();
        common::perturb_lora_b(m.as_ref());
        runs.push(m.train_grads(&ids, Some(&mask), &labels).unwrap());
    }
    PIPELINED_RECOMPUTE.store(false, Ordering::Relaxed);
    common::assert_same_step(&runs[0], &runs[1], what);
}

#[test]
fn pipelined_recompute_gives_the_same_step() {
    common::on_two_threads(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let llama = WeightStore::open(&root.join("llama/model")).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let load = || -> Box<dyn CausalLm> {
                Box::new(Llama::load(&llama, common::step_opts(dtype, 0.1)).unwrap())
            };
            same_step(&load, 300, &format!("llama {dtype:?}"));
        }
        let store = WeightStore::open(&root.join("falcon/mq/model")).unwrap();
        let vocab = qtune::models::FalconConfig::from_store(&store)
            .unwrap()
            .vocab_size as u32;
        let load = || -> Box<dyn CausalLm> {
            Box::new(Falcon::load(&store, common::step_opts(DType::F32, 0.0)).unwrap())
        };
        same_step(&load, vocab, "falcon mq");
    });
}
