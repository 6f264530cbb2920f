//! `qtune bench`: memory and speed of a LoRA training step on a real model shape, with random
//! weights generated directly in their quantised form (memory and time do not depend on the
//! weights' values, so nobody has to download 13 GB to compare).
//!
//! The weights are owned buffers (`Bytes::from_vec`), one tensor at a time, filled with random
//! blocks of the target type: no full-precision copy of any matrix ever exists. Owned rather than a
//! temporary GGUF mapped back: anonymous memory is counted by RSS exactly once and cannot be
//! evicted under pressure, so the measured peak is the plan's `weights` term plus the step, with
//! no page-cache effects (a mapped file's pages count in RSS only once touched, and the kernel may
//! drop them again), and no scratch file of 4-7 GB is written to a small disk.

mod measure;
mod report;
mod shapes;
mod synthetic;

use crate::nn::device::{heap_probe, trim_heap};
pub use measure::{
    measure_device_peak, measure_f32_peak, process_cpu_s, reset_peak_rss, status_bytes, step_flops,
    tune_allocator,
};
pub use report::{BenchReport, GpuReport};
pub use shapes::{param_count, shape_config, BENCH_QUANTS, SHAPES};
pub use synthetic::{random_tensor, synthetic_store};

use crate::data::pairs::Pair;
use crate::lora::prompt::{PromptMethod, PromptSpec};
use crate::models::plan::GpuTerms;
use crate::models::{LlamaConfig, LlamaOptions, LoraSpec, MemoryPlan};
use crate::quant::QType;
use crate::store::WeightStore;
use crate::train::dpo::{Dpo, PairExample};
use crate::train::objective::Objective;
use crate::train::optim::{AdamW, AdamWConfig, MomentStorage};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use shapes::shape_dims;
use std::path::Path;
use std::time::Instant;
use synthetic::Rng;

/// What to bench.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// A name from [`SHAPES`] or a config.json path.
    pub shape: String,
    /// Weight type of the decoder linears.
    pub quant: QType,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA targets (PEFT names or all-linear).
    pub targets: Vec<String>,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (page faults, allocator, thread pool).
    pub warmup: usize,
    /// Compute dtype (f32 or bf16).
    pub dtype: DType,
    /// The one-layer recompute's dtype (`None`: auto, see [`LlamaOptions::recompute_dtype`]).
    pub recompute: Option<DType>,
    /// Rows per cross-entropy chunk.
    pub ce_chunk: usize,
    /// Seed of weights and tokens.
    pub seed: u64,
    /// AdamW moments as blockwise 8-bit codes (`qtune train --optim-8bit`).
    pub optim_8bit: bool,
    /// `cpu`, `cuda` or `cuda:N` (see [`crate::nn::device::open`]).
    pub device: String,
    /// `Some(β)`: the step is DPO's (`qtune train --objective dpo`) on `batch_size` pairs, each a
    /// prompt of half the sequence and two completions of the other half: one model call of
    /// 2·batch rows after the reference forward over them. `None`: SFT's step.
    pub dpo_beta: Option<f64>,
    /// DoRA instead of LoRA on the same targets (`qtune train --method dora`).
    pub dora: bool,
    /// A prompt-learning method instead of LoRA (`qtune train --method prompt-tuning|p-tuning|
    /// prefix-tuning`): no linear adapters; `rank` and `targets` are then unused.
    pub prompt: Option<PromptSpec>,
}

impl BenchConfig {
    /// Sequences of one model call: the batch, or both completions of every pair.
    pub fn rows(&self) -> usize {
        self.batch_size * if self.dpo_beta.is_some() { 2 } else { 1 }
    }

    /// What the step is beyond SFT with LoRA, for report headers (`DPO β 0.1, 2 rows a pair | `).
    pub fn variant(&self) -> String {
        let mut v = String::new();
        if let Some(b) = self.dpo_beta {
            v += &format!("DPO β {b}, 2 rows a pair | ");
        }
        if self.dora {
            v += "DoRA | ";
        }
        v
    }

    /// The trained adapter, for report headers: `LoRA r16 on all-linear`, or the prompt-learning
    /// method with its virtual tokens (`PREFIX_TUNING N 20`).
    pub fn adapter_label(&self) -> String {
        match &self.prompt {
            None => format!("LoRA r{} on {}", self.rank, self.targets.join(",")),
            Some(p) if p.has_encoder() => format!(
                "{} N {} (encoder {})",
                p.method.peft_type(),
                p.num_virtual_tokens,
                p.encoder_hidden_size
            ),
            Some(p) => format!("{} N {}", p.method.peft_type(), p.num_virtual_tokens),
        }
    }

    /// `--method`'s name: lora, dora, prompt-tuning, p-tuning or prefix-tuning.
    pub fn method_name(&self) -> &'static str {
        match (&self.prompt, self.dora) {
            (Some(p), _) => match p.method {
                PromptMethod::PromptTuning => "prompt-tuning",
                PromptMethod::PTuning => "p-tuning",
                PromptMethod::PrefixTuning(_) => "prefix-tuning",
            },
            (None, true) => "dora",
            (None, false) => "lora",
        }
    }
}

/// `b` preference pairs from `b` random rows of `t` tokens: each row's first half is the prompt,
/// its second half the chosen completion, and the rejected one is the same tokens reversed (so
/// both rows of a pair have `t` tokens).
fn dpo_pairs(ids: &[u32], b: usize, t: usize) -> Vec<PairExample> {
    ids.chunks(t)
        .take(b)
        .map(|row| {
            let (prompt, chosen) = row.split_at(t / 2);
            PairExample {
                pair: Pair {
                    prompt: prompt.to_vec(),
                    chosen: chosen.to_vec(),
                    rejected: chosen.iter().rev().copied().collect(),
                },
                reference: None,
            }
        })
        .collect()
}

/// The memory plan of a bench configuration without running it (no device is opened): the host
/// plan, and with a CUDA `device` the GPU terms and the predicted allocated peak on the device
/// (`GpuReport::predicted_allocated`; the CUDA context comes on top of it). The synthetic weights
/// are generated, since the plan counts their bytes.
pub fn plan_bench(cfg: &BenchConfig) -> Result<(MemoryPlan, Option<GpuTerms>)> {
    let config = shape_config(&cfg.shape)?;
    let store = synthetic_store(&config, cfg.quant, cfg.seed)?;
    let opts = bench_options(cfg, Device::Cpu);
    plan_of(&store, &opts, cfg, cfg.device != "cpu")
}

/// The plan of `cfg` for `store` loaded with `opts`, and the GPU terms when `gpu`.
fn plan_of(
    store: &WeightStore,
    opts: &LlamaOptions,
    cfg: &BenchConfig,
    gpu: bool,
) -> Result<(MemoryPlan, Option<GpuTerms>)> {
    let (b, t) = (cfg.rows(), cfg.seq_len);
    let plan = MemoryPlan::for_store_prompt(store, opts, cfg.prompt.as_ref(), b, t)?
        .with_optimizer(moment_storage(cfg))
        .with_reference_forward(cfg.dpo_beta.is_some());
    let terms = match gpu {
        true => Some(GpuTerms::new(store, &plan, b, t, cfg.dtype)?),
        false => None,
    };
    Ok((plan, terms))
}

fn moment_storage(cfg: &BenchConfig) -> MomentStorage {
    if cfg.optim_8bit {
        MomentStorage::Blockwise8
    } else {
        MomentStorage::F32
    }
}

fn bench_options(cfg: &BenchConfig, device: Device) -> LlamaOptions {
    LlamaOptions {
        quant: None,
        dtype: cfg.dtype,
        lora: cfg.prompt.is_none().then(|| LoraSpec {
            targets: cfg.targets.clone(),
            r: cfg.rank,
            alpha: 2.0 * cfg.rank as f64,
            dropout: 0.0,
            seed: cfg.seed,
            use_dora: cfg.dora,
            ..LoraSpec::default()
        }),
        checkpoint: true,
        ce_chunk: cfg.ce_chunk,
        recompute: cfg.recompute,
        device,
    }
}

/// The machine's peak (GFLOP/s) the MFU is taken against, and its kind: on a CPU the largest of
/// the measured f32 GEMM rate and the bf16 instruction ceilings (`vdpbf16ps`, AMX's
/// `tdpbf16ps`); on a GPU its GEMM rate.
fn machine_peak(
    cfg: &BenchConfig,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<(f64, String)> {
    if device.is_cpu() {
        progress("measuring this machine's f32 GEMM and bf16 instruction peaks");
        let mut best = (measure_f32_peak(), "f32 GEMM".to_string());
        if let Some(bf) = crate::quant::matmul_bf16::measure_bf16_peak() {
            let name = format!("{} (bf16)", crate::quant::matmul_bf16::DP_INSTRUCTION);
            best = std::cmp::max_by(best, (bf, name), |a, b| a.0.total_cmp(&b.0));
        }
        if let Some(amx) = crate::quant::matmul_bf16::measure_amx_peak() {
            let name = "tdpbf16ps (AMX bf16)".to_string();
            best = std::cmp::max_by(best, (amx, name), |a, b| a.0.total_cmp(&b.0));
        }
        return Ok(best);
    }
    progress(&format!("measuring the GPU's {:?} GEMM peak", cfg.dtype));
    let peak = measure_device_peak(device, cfg.dtype)?;
    Ok((peak, format!("GPU {:?} GEMM", cfg.dtype).to_lowercase()))
}

/// Weights of all linears: the decoder's matrices and the head (the embedding's when tied).
fn linear_weights(store: &WeightStore, model_cfg: &LlamaConfig) -> usize {
    let matrices: usize = store
        .tensors
        .iter()
        .filter(|t| {
            t.shape.len() == 2
                && t.name != "model.embed_tokens.weight"
                && t.name != "transformer.word_embeddings.weight"
        })
        .map(|t| t.numel())
        .sum();
    let tied_head = match model_cfg.tie_word_embeddings {
        true => model_cfg.vocab_size * model_cfg.hidden_size,
        false => 0,
    };
    matrices + tied_head
}

/// FLOPs of one step as counted. DPO: the policy's 2·batch rows, and the reference forward over
/// them (a third of a checkpointed step's 6 FLOPs per weight and token: its forward only).
/// Prompt rows lengthen every sequence (a prefix only adds keys: not counted).
fn bench_flops(cfg: &BenchConfig, model_cfg: &LlamaConfig, linear_params: usize) -> f64 {
    let (b, t) = (cfg.batch_size, cfg.seq_len);
    let t_eff = t + match &cfg.prompt {
        Some(p) if !matches!(p.method, PromptMethod::PrefixTuning(_)) => p.num_virtual_tokens,
        _ => 0,
    };
    match cfg.dpo_beta {
        None => step_flops(model_cfg, linear_params, b * t_eff, t_eff),
        Some(_) => step_flops(model_cfg, linear_params, 2 * b * t_eff, t_eff) * 4.0 / 3.0,
    }
}

/// Generates the model, loads it with LoRA, runs `warmup` then `steps` timed training steps
/// (forward, checkpointed backward, AdamW) and measures time and peak RSS. `progress` gets a line
/// per phase.
pub fn run_bench(cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if cfg.steps == 0 || cfg.seq_len < 2 || cfg.batch_size == 0 || cfg.rank == 0 {
        return Err(Error::Invalid(
            "bench needs --steps >= 1, --seq-len >= 2, --batch-size >= 1 and --rank >= 1".into(),
        ));
    }
    let config = shape_config(&cfg.shape)?;
    let model_cfg = shape_dims(&config, Path::new(&cfg.shape))?;
    let device = crate::nn::device::open(&cfg.device)?;
    tune_allocator();
    let (peak_gflops, peak_kind) = machine_peak(cfg, &device, progress)?;
    let gpu_baseline = crate::nn::device::used_bytes(&device)?;
    crate::nn::device::reset_peak(&device)?;
    // The GEMM peak's buffers (3 × 9 MiB at 1536²) are freed now. Under glibc's dynamic mmap
    // threshold they were mappings, gone; with a threshold set above them
    // (MALLOC_MMAP_THRESHOLD_=33554432) they were heap chunks below live ones, whose pages glibc
    // keeps: the baseline read 36.4 MiB instead of 7.6-9.6, memory the step then reuses, so the
    // prediction counted it twice. Handing free pages back first makes it sound in every setting.
    trim_heap();
    heap_probe("bench", "baseline");
    let baseline_rss = status_bytes("VmRSS:");
    reset_peak_rss();
    let t0 = Instant::now();
    progress(&format!("generating random {} weights", cfg.quant.name()));
    let store = synthetic_store(&config, cfg.quant, cfg.seed)?;
    let opts = bench_options(cfg, device.clone());
    let moments = moment_storage(cfg);
    let (plan, gpu_terms) = plan_of(&store, &opts, cfg, gpu_baseline.is_some())?;
    let linear_params = linear_weights(&store, &model_cfg);
    progress(&format!("loading the model with {}", cfg.adapter_label()));
    // As the trainer: the prompt-learning adapter installed on the shared decoder.
    let model: Box<dyn crate::models::CausalLm> = match &cfg.prompt {
        None => crate::models::load(&store, opts)?,
        Some(p) => {
            let mut m = crate::models::open(&store, opts)?;
            m.install_prompt(p)?;
            Box::new(m)
        }
    };
    drop(store);
    let params = model.lora_params();
    let lora_params = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            moments,
            ..AdamWConfig::default()
        },
    )?;
    let setup_s = t0.elapsed().as_secs_f64();
    progress(&format!(
        "loaded: RSS {:.1} MiB, peak so far {:.1} MiB",
        status_bytes("VmRSS:") as f64 / 1048576.0,
        status_bytes("VmHWM:") as f64 / 1048576.0
    ));
    let (b, t) = (cfg.batch_size, cfg.seq_len);
    let mut rng = Rng::new(cfg.seed ^ 0x5eed);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| (rng.next() % model_cfg.vocab_size as u64) as u32)
        .collect();
    let cerr = |e: candle_core::Error| Error::Invalid(format!("bench batch: {e}"));
    let pairs = dpo_pairs(&ids, b, t);
    let dpo = Dpo {
        beta: cfg.dpo_beta.unwrap_or(0.0),
        reference_adapter: None,
        precompute: false,
    };
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).map_err(cerr)?;
    let labels = ids.to_dtype(DType::I64).map_err(cerr)?;
    let mut step = || -> Result<(f32, f64, f64)> {
        let (s0, c0) = (Instant::now(), process_cpu_s());
        let (loss, grads) = match cfg.dpo_beta {
            None => model.train_grads(&ids, None, &labels)?,
            // The trainer's DPO micro-step itself: reference forward, then the policy's rows.
            Some(_) => {
                let m = dpo.micro_step(model.as_ref(), &pairs)?;
                (m.loss as f32, m.grads)
            }
        };
        heap_probe("bench", "grads");
        opt.step(&grads, 1e-4)?;
        heap_probe("bench", "adamw");
        drop(grads);
        // a GPU step has ended when its last upload has
        device
            .synchronize()
            .map_err(|e| Error::Invalid(format!("bench step: {e}")))?;
        Ok((loss, s0.elapsed().as_secs_f64(), process_cpu_s() - c0))
    };
    let mib = |b: usize| b as f64 / 1048576.0;
    for w in 0..cfg.warmup {
        progress(&format!("warm-up step {}/{}", w + 1, cfg.warmup));
        let (_, s, _) = step()?;
        progress(&format!(
            "  {s:.2} s, peak RSS so far {:.1} MiB",
            mib(status_bytes("VmHWM:"))
        ));
    }
    let (mut step_times, mut losses, mut step_cpu_s) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..cfg.steps {
        progress(&format!("timed step {}/{}", i + 1, cfg.steps));
        let (l, s, cpu) = step()?;
        step_cpu_s.push(cpu);
        progress(&format!(
            "  {s:.2} s, loss {l:.4}, peak RSS so far {:.1} MiB",
            mib(status_bytes("VmHWM:"))
        ));
        step_times.push(s);
        losses.push(l);
    }
    let measured_peak = status_bytes("VmHWM:");
    let gpu = match (
        gpu_terms,
        gpu_baseline,
        crate::nn::device::peak_allocated(&device)?,
    ) {
        (Some(terms), Some(baseline_used), Some(peak_allocated)) => Some(GpuReport {
            terms,
            baseline_used,
            peak_allocated,
        }),
        _ => None,
    };
    let flops_per_step = bench_flops(cfg, &model_cfg, linear_params);
    let streams = crate::models::batch_streams(model.decoder(), cfg.rows(), cfg.device == "cpu");
    Ok(BenchReport {
        config: cfg.clone(),
        model: model_cfg,
        plan,
        baseline_rss,
        measured_peak,
        step_times,
        step_cpu_s,
        losses,
        lora_params,
        linear_params,
        flops_per_step,
        peak_gflops,
        peak_kind,
        streams,
        setup_s,
        gpu,
    })
}
