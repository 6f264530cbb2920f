//! The checkpointed backward walked by qtune over a layer's recorded ops (`nn::fused::tape`, the
//! default; and the head's, the mean cross-entropy's) gives candle's backward bit for bit: Llama
//! with LoRA on every linear or on q and v only (frozen linears on the tape too), padding,
//! dropout, f32 and bf16 (with the f32 and the bf16 recompute), a batch as two streams, the
//! pipelined recompute; Falcon (multi-query); DoRA (whose layers run candle ops as well, so candle
//! walks them) unchanged; and the checkpointed step (our walk) equals the uncheckpointed one
//! (candle's over the whole graph) in f32. One test in its own binary: it flips process-wide
//! switches.
mod common;

use candle_core::DType;
use qtune::models::{
    own_backward_walks, CausalLm, Falcon, Llama, LlamaOptions, OWN_BACKWARD, PIPELINED_RECOMPUTE,
};
use qtune::store::WeightStore;
use std::path::Path;
use std::sync::atomic::Ordering;

/// One step of a freshly loaded model with candle's walk and with ours: the same loss and
/// gradients; gives how many layers our walk took.
fn same_step(load: &dyn Fn() -> Box<dyn CausalLm>, vocab: u32, what: &str) -> usize {
    let (ids, mask, labels) = common::step_batch(vocab);
    let mut runs = Vec::new();
    let mut walks = 0;
    for own in [false, true] {
        OWN_BACKWARD.store(own, Ordering::Relaxed);
        let m = load();
        common::perturb_lora_b(m.as_ref());
        let before = own_backward_walks();
        runs.push(m.train_grads(&ids, Some(&mask), &labels).unwrap());
        match own {
            false => assert_eq!(own_backward_walks(), before, "{what}: walked with it off"),
            true => walks = own_backward_walks() - before,
        }
    }
    OWN_BACKWARD.store(true, Ordering::Relaxed);
    common::assert_same_step(&runs[0], &runs[1], what);
    walks
}

#[test]
fn own_backward_gives_candles_step() {
    common::on_two_threads(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let llama = WeightStore::open(&root.join("llama/model")).unwrap();
        let layers = qtune::models::LlamaConfig::from_store(&llama)
            .unwrap()
            .num_layers;
        let case = |opts: LlamaOptions, what: &str| {
            let load =
                || -> Box<dyn CausalLm> { Box::new(Llama::load(&llama, opts.clone()).unwrap()) };
            same_step(&load, 300, what)
        };
        for dtype in [DType::F32, DType::BF16] {
            // two sequences: two streams, each walking every layer; and the head once
            let walks = case(common::step_opts(dtype, 0.1), &format!("llama {dtype:?}"));
            assert_eq!(walks, 2 * layers + 1, "llama {dtype:?}: walks of ours");
            let mut qv = common::step_opts(dtype, 0.0);
            qv.lora.as_mut().unwrap().targets = vec!["q_proj".into(), "v_proj".into()];
            let walks = case(qv, &format!("llama q, v {dtype:?}"));
            assert_eq!(walks, 2 * layers + 1, "llama q, v {dtype:?}: walks of ours");
        }
        // the all-bf16 step: the gradient sums are half precision (ours on the pool)
        let mut all_bf16 = common::step_opts(DType::BF16, 0.1);
        all_bf16.recompute = Some(DType::BF16);
        let walks = case(all_bf16, "llama bf16 recompute");
        assert_eq!(walks, 2 * layers + 1, "llama bf16 recompute: walks of ours");
        PIPELINED_RECOMPUTE.store(true, Ordering::Relaxed);
        let walks = case(common::step_opts(DType::BF16, 0.1), "llama pipelined");
        PIPELINED_RECOMPUTE.store(false, Ordering::Relaxed);
        assert_eq!(walks, 2 * layers + 1, "llama pipelined: walks of ours");
        let mut dora = common::step_opts(DType::F32, 0.0);
        dora.lora.as_mut().unwrap().use_dora = true;
        // the head only
        assert_eq!(case(dora, "llama dora"), 1, "llama dora: walks of ours");
        let store = WeightStore::open(&root.join("falcon/mq/model")).unwrap();
        let cfg = qtune::models::FalconConfig::from_store(&store).unwrap();
        let opts = common::step_opts(DType::F32, 0.0);
        let load =
            || -> Box<dyn CausalLm> { Box::new(Falcon::load(&store, opts.clone()).unwrap()) };
        let walks = same_step(&load, cfg.vocab_size as u32, "falcon mq");
        // one stream (Falcon's parallel blocks keep the batch whole)
        assert_eq!(walks, cfg.num_layers + 1, "falcon mq: walks of ours");
        // and the uncheckpointed step (candle's walk over the whole graph) equals the
        // checkpointed one (ours over each recomputed layer) in f32
        let (ids, mask, labels) = common::step_batch(300);
        let modes: Vec<_> = [true, false]
            .into_iter()
            .map(|checkpoint| {
                let mut o = common::step_opts(DType::F32, 0.1);
                o.checkpoint = checkpoint;
                let m = Llama::load(&llama, o).unwrap();
                common::perturb_lora_b(&m);
                m.train_grads(&ids, Some(&mask), &labels).unwrap()
            })
            .collect();
        common::assert_same_step(&modes[0], &modes[1], "llama checkpointed or not");
    });
}
