//! The memory plan's optimizer term, for f32 and 8-bit moments, equals the state bytes the
//! optimizer actually holds for the model's LoRA parameters (Llama and Falcon fixtures, ranks that
//! put some tensors above and some below the 4096-element 8-bit threshold).
use qtune::models::{CausalLm, Falcon, Llama, LlamaOptions, LoraSpec, MemoryPlan};
use qtune::store::WeightStore;
use qtune::train::{AdamW, AdamWConfig, MomentStorage};
use std::path::Path;

fn check(model_dir: &Path, rank: usize) {
    let store = WeightStore::open(model_dir).unwrap();
    let opts = LlamaOptions {
        lora: Some(LoraSpec {
            targets: vec!["all-linear".into()],
            r: rank,
            alpha: 16.0,
            ..LoraSpec::default()
        }),
        ..LlamaOptions::default()
    };
    let plan = MemoryPlan::for_store(&store, &opts, 1, 8).unwrap();
    let model: Box<dyn CausalLm> = if model_dir.to_string_lossy().contains("falcon") {
        Box::new(Falcon::load(&store, opts).unwrap())
    } else {
        Box::new(Llama::load(&store, opts).unwrap())
    };
    let params = model.lora_params();
    let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
    assert!(
        sizes.iter().any(|&n| n >= 4096) && sizes.iter().any(|&n| n < 4096),
        "{}: rank {rank} should mix 8-bit and f32 tensors: {sizes:?}",
        model_dir.display()
    );
    for moments in [MomentStorage::F32, MomentStorage::Blockwise8] {
        let opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                moments,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let planned = plan.clone().with_optimizer(moments).optimizer;
        assert_eq!(
            planned,
            opt.state_bytes(),
            "{} {moments:?}",
            model_dir.display()
        );
    }
    let f32b = plan.clone().with_optimizer(MomentStorage::F32).optimizer;
    let q8b = plan.with_optimizer(MomentStorage::Blockwise8).optimizer;
    assert!(q8b < f32b, "{q8b} vs {f32b}");
}

#[test]
fn plan_optimizer_term_is_the_optimizers_state_llama() {
    check(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model"),
        64,
    );
}

#[test]
fn plan_optimizer_term_is_the_optimizers_state_falcon() {
    for kind in ["mq", "gqa", "seq"] {
        check(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/falcon")
                .join(kind)
                .join("model"),
            16,
        );
    }
}
