//! Tests of the memory plan (`plan.rs`): its terms at the 7B shapes, the optimizer and adapter
//! terms, and the backward's checkpoint/gradient trade.
use super::*;

/// Llama-2-7B, rank 16, all-linear: per layer q/k/v/o (4096 -> 4096), gate/up (4096 -> 11008),
/// down (11008 -> 4096); 32 layers, ~40M LoRA parameters, every tensor far above 4096 elements.
fn llama7b_r16() -> Vec<usize> {
    let (c, i, r) = (4096, 11008, 16);
    let per_layer = [(c, c), (c, c), (c, c), (c, c), (i, c), (i, c), (c, i)];
    (0..32)
        .flat_map(|_| per_layer.iter().flat_map(|&(o, inp)| [r * inp, o * r]))
        .collect()
}

/// An untied embedding table stays on the host: it is neither in the device total nor the
/// scratch's size; the scratch follows the compute dtype.
#[test]
fn gpu_terms_leave_an_untied_embedding_on_the_host() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let store = WeightStore::open(&dir.join("model")).unwrap();
    let opts = LlamaOptions::default();
    let plan = MemoryPlan::for_store(&store, &opts, 1, 8).unwrap();
    let embed = store.get("model.embed_tokens.weight").unwrap();
    assert!(store.get("lm_head.weight").is_some());
    let layers = LlamaConfig::from_store(&store).unwrap().num_layers;
    let offloaded = plan.checkpoints / (layers + 3) * layers;
    for (dtype, size) in [(candle_core::DType::BF16, 2), (candle_core::DType::F32, 4)] {
        let g = GpuTerms::new(&store, &plan, 1, 8, dtype).unwrap();
        assert_eq!(g.host_only, plan.optimizer + offloaded + embed.data.len());
        // the largest weight a product dequantises: the lm_head (300 x 64) ties with the table,
        // so the MLP's (intermediate x hidden) decides
        let largest = store
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2 && t.name != embed.name)
            .map(|t| t.numel())
            .max()
            .unwrap();
        assert_eq!(g.dequant_scratch, size * largest);
    }
}

/// The prompt-learning methods' rows reach both plans: the host plan and the GPU terms grow
/// with N for each method; prompt/P-tuning rows lengthen the sequence the blocked attention's
/// score blocks are sized by; a prefix swaps them for the composite attention's scores over
/// N + T keys, counted in the recompute graph.
#[test]
fn cpu_and_gpu_plans_grow_with_virtual_tokens() {
    use crate::lora::prompt::{PromptMethod, PromptSpec};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let store = WeightStore::open(&dir.join("model")).unwrap();
    let opts = LlamaOptions::default();
    let (b, t, heads) = (2, 8, 4);
    let dt = candle_core::DType::BF16;
    for method in [
        PromptMethod::PromptTuning,
        PromptMethod::PTuning,
        PromptMethod::PrefixTuning(false),
        PromptMethod::PrefixTuning(true),
    ] {
        let mut last: Option<(usize, usize)> = None;
        for n in [1, 4, 16, 64] {
            let spec = PromptSpec {
                method,
                num_virtual_tokens: n,
                encoder_hidden_size: 32,
                init_ids: None,
                init_text: None,
                seed: 0,
            };
            let plan = MemoryPlan::for_store_prompt(&store, &opts, Some(&spec), b, t).unwrap();
            let g = GpuTerms::new(&store, &plan, b, t, dt).unwrap();
            let prefix = matches!(method, PromptMethod::PrefixTuning(_));
            assert_eq!(
                (plan.prompt_rows, plan.kv_prefix),
                if prefix { (0, n) } else { (n, 0) }
            );
            let want = match prefix {
                true => 0,
                false => 16 * crate::nn::generic::score_block_elems(b, t + n, heads),
            };
            assert_eq!(g.attention_scores, want, "{method:?} N {n}");
            let now = (plan.total(), g.device_total(&plan));
            if let Some(prev) = last {
                assert!(
                    now.0 > prev.0 && now.1 > prev.1,
                    "{method:?} N {n}: {prev:?} -> {now:?}"
                );
            }
            last = Some(now);
        }
    }
}

/// The backward trades checkpoints for adapter gradients: the worst layer is the last one
/// recomputed when gradients dominate, the first when checkpoints do.
#[test]
fn backward_carry_takes_the_worst_layer() {
    let lora = crate::models::LoraSpec {
        r: 2,
        ..Default::default()
    };
    let m: Option<&dyn AdapterMethod> = Some(&lora);
    // 3 layers, one (4, 4) linear adapted in the first two: (2·4 + 4·2)·4 = 64 bytes each.
    let rows = vec![vec![true], vec![true], vec![false]];
    let dims = [(4, 4)];
    // big checkpoints: layer 2 (first recomputed) holds 2 + 4 of them and no gradient
    assert_eq!(backward_carry(m, &rows, &dims, 0, 100, 4), 6 * 100);
    // small checkpoints: layer 0 holds 4 of them and both layers' gradients (+ prompt's 7)
    assert_eq!(
        backward_carry(m, &rows, &dims, 7, 10, 4),
        4 * 10 + 2 * 64 + 7
    );
    // never more than the two terms whole
    assert!(backward_carry(m, &rows, &dims, 0, 10, 4) <= (3 + 3) * 10 + 2 * 64);
}

#[test]
fn optimizer_term_follows_the_moment_storage() {
    let n = llama7b_r16();
    let params: usize = n.iter().sum();
    assert_eq!(params, 39_976_960);
    // f32: master + two moments.
    assert_eq!(optimizer_bytes(&n, MomentStorage::F32), 12 * params);
    // 8-bit: master 4 + codes 2 per parameter, two f32 absmax per block of 256 (every tensor
    // is a whole number of blocks here): 6.03125 bytes per parameter.
    let eight = optimizer_bytes(&n, MomentStorage::Blockwise8);
    assert_eq!(eight, 6 * params + 8 * params / 256);
    assert_eq!(eight, 241_111_040); // 229.9 MiB, against 457.5 MiB at f32
                                    // Tensors below 4096 elements keep f32 moments; a partial block counts whole.
    assert_eq!(
        optimizer_bytes(&[4095, 4097], MomentStorage::Blockwise8),
        12 * 4095 + 6 * 4097 + 8 * 17
    );
}

/// The recompute's dtype: auto widens a bf16 CPU step's layer to f32 (the plan's recompute term
/// grows, nothing else), an explicit bf16 recompute plans as before, and a recompute narrower than
/// the compute dtype is an error before anything is planned.
#[test]
fn recompute_dtype_widens_only_the_recompute_term() {
    use candle_core::DType;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let store = WeightStore::open(&dir.join("model")).unwrap();
    let plan = |dtype, recompute| {
        let opts = LlamaOptions {
            dtype,
            recompute,
            lora: Some(crate::models::LoraSpec::default()),
            ..LlamaOptions::default()
        };
        MemoryPlan::for_store(&store, &opts, 2, 32)
    };
    let auto = plan(DType::BF16, None).unwrap();
    let wide = plan(DType::BF16, Some(DType::F32)).unwrap();
    let narrow = plan(DType::BF16, Some(DType::BF16)).unwrap();
    assert_eq!(auto, wide);
    assert!(wide.recompute > narrow.recompute, "{wide:?} / {narrow:?}");
    let rest = |p: &MemoryPlan| (p.weights, p.adapters, p.checkpoints, p.kernel_scratch);
    assert_eq!(rest(&wide), rest(&narrow));
    let f32_plan = plan(DType::F32, None).unwrap();
    assert_eq!(plan(DType::F32, Some(DType::F32)).unwrap(), f32_plan);
    let e = plan(DType::F32, Some(DType::BF16)).unwrap_err().to_string();
    assert!(e.contains("--recompute-dtype bf16"), "{e}");
}
