//! Falcon's memory plan agrees with what `Falcon::load` actually holds: stored weight bytes, and the
//! number of LoRA parameters for each target set (Llama's plan would refuse a Falcon config).
use qtune::models::{Falcon, FalconOptions, LoraSpec, MemoryPlan};
use qtune::store::WeightStore;
use std::path::Path;

#[test]
fn plan_matches_the_loaded_model() {
    for kind in ["mq", "gqa", "seq"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/falcon")
            .join(kind);
        let store = WeightStore::open(&dir.join("model")).unwrap();
        for targets in [vec!["all-linear"], vec!["query_key_value", "dense_4h_to_h"]] {
            let opts = FalconOptions {
                lora: Some(LoraSpec {
                    targets: targets.iter().map(|s| s.to_string()).collect(),
                    r: 4,
                    alpha: 8.0,
                    ..LoraSpec::default()
                }),
                ..FalconOptions::default()
            };
            let plan = MemoryPlan::for_store(&store, &opts, 2, 12).unwrap();
            assert_eq!(plan, MemoryPlan::falcon(&store, &opts, 2, 12).unwrap());
            let stored: usize = store.tensors.iter().map(|t| t.nbytes()).sum();
            assert_eq!(
                plan.weights, stored,
                "{kind}: unquantised weights are the file's"
            );
            let m = Falcon::load(&store, opts).unwrap();
            let params: usize = m.lora_params().iter().map(|(_, v)| v.elem_count()).sum();
            assert_eq!(plan.adapters, params * 4, "{kind} {targets:?}: LoRA bytes");
            // Two f32 moments and the f32 master copy `train::AdamW` keeps.
            assert_eq!(plan.optimizer, params * 12);
            assert!(plan.recompute > 0 && plan.total() > plan.weights);
        }
    }
}

#[test]
fn gpu_terms_count_one_scratch_of_the_largest_linear() {
    use qtune::models::plan::{GpuTerms, CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/falcon/gqa");
    let store = WeightStore::open(&dir.join("model")).unwrap();
    let plan = MemoryPlan::for_store(&store, &FalconOptions::default(), 2, 12).unwrap();
    let g = GpuTerms::new(&store, &plan, 2, 12, candle_core::DType::BF16).unwrap();
    let largest = store
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| t.numel())
        .max()
        .unwrap();
    assert_eq!(
        g.dequant_scratch,
        2 * largest,
        "one bf16 scratch, not one per layer"
    );
    let f32_terms = GpuTerms::new(&store, &plan, 2, 12, candle_core::DType::F32).unwrap();
    assert_eq!(
        f32_terms.dequant_scratch,
        4 * largest,
        "f32 activations: f32 scratch"
    );
    assert_eq!(g.context, CUDA_CONTEXT_BYTES);
    assert_eq!(g.cublas_workspace, CUBLAS_WORKSPACE_BYTES);
    assert_eq!(
        g.total(),
        g.context
            + g.cublas_workspace
            + g.dequant_scratch
            + g.attention_scores
            + g.mlp_backward
            + g.composite_norms
            + g.allocator
    );
    // a GPU runs the composite LayerNorm (bf16: its input's f32 copy, five f32 intermediates and
    // the cast back, 26 bytes an element, less the 2 of the fused one's output the plan counts)
    // for each of a layer's norms, and candle's adds keep one residual sum more than the fused one
    let cfg = qtune::models::FalconConfig::from_store(&store).unwrap();
    let norms = if cfg.two_norms || !cfg.parallel_attn {
        2
    } else {
        1
    };
    assert_eq!(
        g.composite_norms,
        2 * 12 * cfg.hidden_size * (norms * 24 + 2)
    );
    // a GPU runs candle's composite GELU backward: 10 (B·T, I) bf16 temporaries
    let ffn = qtune::models::FalconConfig::from_store(&store)
        .unwrap()
        .ffn_hidden_size;
    assert_eq!(g.mlp_backward, 10 * 2 * 12 * ffn * 2);
    // four live f32 blocks of every query head (2 x 12 x 12 scores each: far under the budget)
    let heads = qtune::models::FalconConfig::from_store(&store)
        .unwrap()
        .num_heads;
    assert_eq!(g.attention_scores, 4 * 4 * heads * 2 * 12 * 12);
    // the optimizer and every layer's checkpointed input stay on the host; Falcon ties lm_head to
    // the embedding (no lm_head stored), so the table is uploaded as the head
    assert!(store.get("lm_head.weight").is_none());
    let layers = qtune::models::FalconConfig::from_store(&store)
        .unwrap()
        .num_layers;
    let offloaded = plan.checkpoints / (layers + 3) * layers;
    assert!(offloaded > 0);
    assert_eq!(g.host_only, plan.optimizer + offloaded);
    assert_eq!(
        g.device_total(&plan),
        plan.total() - plan.kernel_scratch - g.host_only + g.total()
    );
}
