//! A LoRA training step on a Falcon (Falcon-7B layout: multi-query, parallel attention, 17 heads)
//! with 100+ MB of memory-mapped Q8_0 weights stays within its
//! [`MemoryPlan`]: peak RSS growth (VmHWM, reset through /proc/self/clear_refs) of a fresh child
//! process, from before the model is opened to the end of the step.
//!
//! The child runs with glibc's mmap threshold pinned (`MALLOC_MMAP_THRESHOLD_`), so that freed
//! tensors go back to the system and RSS follows the bytes actually alive, which is what the plan
//! counts. With glibc's default (dynamic) threshold, freed tensor memory is partly kept in the heap
//! and the peak RSS of the same step measured ~8 % higher (see the report printed by the child).
//! Same method as tests/llama_rss.rs.
use candle_core::{Device, Tensor};
use qtune::format::gguf::{GgufWriter, TensorPlan, Value};
use qtune::models::{Falcon, FalconOptions, LoraSpec, MemoryPlan};
use qtune::quant::{dispatch, QType};
use qtune::store::WeightStore;
use std::path::Path;

const CHILD: &str = "QTUNE_FALCON_RSS_CHILD";

fn status_kb(key: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// A random Falcon (hidden 1088 = 17 heads of 64, multi-query, 8 layers, MLP 4352, vocab 4096,
/// tied head) as a Q8_0 GGUF with llama.cpp names; ~107 MB of tensor data.
fn write_model(path: &Path) {
    let (v, c, l, h) = (4096usize, 1088usize, 8usize, 17usize);
    let (d, inter) = (c / h, 4 * c);
    let u = |x: usize| Value::U32(x as u32);
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("falcon".into()),
        ),
        ("falcon.context_length".into(), u(2048)),
        ("falcon.embedding_length".into(), u(c)),
        ("falcon.block_count".into(), u(l)),
        ("falcon.feed_forward_length".into(), u(inter)),
        ("falcon.attention.head_count".into(), u(h)),
        ("falcon.attention.head_count_kv".into(), u(1)),
        (
            "falcon.attention.layer_norm_epsilon".into(),
            Value::F32(1e-5),
        ),
    ];
    let mut plan = vec![("token_embd.weight".to_string(), vec![v, c])];
    for i in 0..l {
        let b = |n: &str, s: Vec<usize>| (format!("blk.{i}.{n}"), s);
        plan.extend([
            b("attn_norm.weight", vec![c]),
            b("attn_norm.bias", vec![c]),
            b("attn_qkv.weight", vec![(h + 2) * d, c]),
            b("attn_output.weight", vec![c, h * d]),
            b("ffn_up.weight", vec![inter, c]),
            b("ffn_down.weight", vec![c, inter]),
        ]);
    }
    plan.push(("output_norm.weight".into(), vec![c]));
    plan.push(("output_norm.bias".into(), vec![c]));
    let tp: Vec<TensorPlan> = plan
        .iter()
        .map(|(n, s)| TensorPlan {
            name: n.clone(),
            qtype: if s.len() == 1 {
                QType::F32
            } else {
                QType::Q8_0
            },
            shape: s.clone(),
        })
        .collect();
    let mut w = GgufWriter::create(path, &meta, tp).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for (_, shape) in &plan {
        let n: usize = shape.iter().product();
        if shape.len() == 1 {
            let ones: Vec<u8> = (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
            w.write_tensor(&ones).unwrap();
            continue;
        }
        let scale = 1.0 / (shape[1] as f32).sqrt();
        let f: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        let mut q = vec![0u8; QType::Q8_0.bytes_for(n).unwrap()];
        dispatch::quantize(QType::Q8_0, &f, &mut q).unwrap();
        w.write_tensor(&q).unwrap();
    }
    w.finish().unwrap();
}

/// Runs in the child: open, load, one step; prints the measurements and checks them.
#[test]
#[ignore = "run by train_step_peak_rss_within_plan in a fresh process"]
fn rss_child() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    let (batch, seq) = (2, 128);
    let opts = FalconOptions {
        lora: Some(LoraSpec {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            ..LoraSpec::default()
        }),
        checkpoint: true,
        ce_chunk: 64,
        ..FalconOptions::default()
    };
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919) % 4096) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap();
    let labels = ids.to_dtype(candle_core::DType::I64).unwrap();
    // Warm the thread pool and allocator paths that are not the model's (they exist either way).
    let _ = rayon::current_num_threads();
    let base = status_kb("VmRSS:") * 1024;
    reset_peak();
    let store = WeightStore::open(Path::new(&path)).unwrap();
    let plan = MemoryPlan::for_store(&store, &opts, batch, seq).unwrap();
    let model = Falcon::load(&store, opts).unwrap();
    let loaded = status_kb("VmRSS:") * 1024;
    let (loss, grads) = model.train_grads(&ids, None, &labels).unwrap();
    assert!(loss.is_finite() && grads.len() == 8 * 4 * 2);
    let peak = status_kb("VmHWM:") * 1024;
    drop(grads);
    // Second step: every weight page is resident now, so the growth is the step's own memory.
    let before2 = status_kb("VmRSS:") * 1024;
    reset_peak();
    let (loss2, grads2) = model.train_grads(&ids, None, &labels).unwrap();
    let peak2 = status_kb("VmHWM:") * 1024;
    assert!(loss2.is_finite() && !grads2.is_empty());
    let mib = |b: usize| b as f64 / 1048576.0;
    eprintln!("{plan}");
    eprintln!(
        "store {:.1} MiB; RSS: base {:.1}, loaded +{:.1}, step-1 peak +{:.1} MiB (plan total {:.1}); \
         after step 1 +{:.1}; step-2 peak over its start +{:.1} MiB (plan without weights {:.1})",
        mib(store.nbytes()),
        mib(base),
        mib(loaded - base),
        mib(peak - base),
        mib(plan.total()),
        mib(before2 - base),
        mib(peak2.saturating_sub(before2)),
        mib(plan.step_bytes())
    );
    assert!(
        store.nbytes() > 100_000_000,
        "the model must hold 100+ MB of weights"
    );
    // No optimizer exists in this process: its share of the plan is left out of the bound.
    let bound = plan.total() - plan.optimizer;
    // Step 1 (weights paged in on first touch) against the whole plan: the criterion,
    // predicted within 5 % of measured. Measured here (session 9, with the fused GELU): plan 1.9-2.1 %
    // over (before it 1.7 % under: the ~6 MiB the process keeps after a step, allocator and
    // kernel-thread state, is in no term), so this is two-sided rather than the strict upper bound
    // step 2 gets below.
    let step1 = peak - base;
    let miss = (step1 as f64 - bound as f64).abs() / step1 as f64;
    eprintln!(
        "step 1: plan {:.1} MiB vs measured {:.1} MiB ({:+.1} %)",
        mib(bound),
        mib(step1),
        100.0 * (bound as f64 / step1 as f64 - 1.0)
    );
    assert!(
        miss <= 0.05,
        "step-1 peak and plan differ by {:.1} %",
        100.0 * miss
    );
    let step2 = peak2 - before2;
    assert!(
        step2 <= bound - plan.weights,
        "second step exceeds the plan's step part"
    );
    // The plan is an estimate of this implementation, not a loose ceiling: the adapters and
    // weights exist already, so the measured step must use most of the rest.
    let step_plan = bound - plan.weights - plan.adapters;
    assert!(
        step2 * 10 >= step_plan * 8,
        "the plan's step part ({:.1} MiB) is far above the measured {:.1} MiB: recalibrate it",
        mib(step_plan),
        mib(step2)
    );
}

#[test]
fn train_step_peak_rss_within_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random-q8_0.gguf");
    write_model(&path);
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "rss_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, &path)
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "child failed: {err}");
    assert!(
        err.contains("step-1 peak"),
        "the child did not run the step"
    );
}
