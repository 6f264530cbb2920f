//! What a bench measured, and how it is printed (`Display`) and written (`--json`).

use super::BenchConfig;
use crate::models::plan::GpuTerms;
use crate::models::{LlamaConfig, MemoryPlan};

/// Device-memory figures of a bench on a GPU.
#[derive(Clone, Debug)]
pub struct GpuReport {
    /// The GPU-only terms and what of the plan stays on the host.
    pub terms: GpuTerms,
    /// Device memory in use after the context was made, before any weight (context, modules,
    /// cuBLAS, and anything else on the GPU).
    pub baseline_used: u64,
    /// Peak bytes allocated from candle's pool over load, warm-up and timed steps.
    pub peak_allocated: u64,
}

impl GpuReport {
    /// Predicted allocated peak: the plan's device part and the GPU terms, without the context
    /// (measured as [`GpuReport::baseline_used`] instead).
    pub fn predicted_allocated(&self, plan: &MemoryPlan) -> u64 {
        self.terms.allocated_total(plan) as u64
    }
}

/// What a bench measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// The configuration.
    pub config: BenchConfig,
    /// Model hyper-parameters of the shape.
    pub model: LlamaConfig,
    /// The memory plan by part.
    pub plan: MemoryPlan,
    /// RSS of the process before any weight existed (binary, libraries, thread pool).
    pub baseline_rss: usize,
    /// Peak RSS (VmHWM) over generation, load, warm-up and timed steps.
    pub measured_peak: usize,
    /// Wall time of each timed step (s).
    pub step_times: Vec<f64>,
    /// CPU seconds (all threads) of each timed step: under contention, the fair comparison.
    pub step_cpu_s: Vec<f64>,
    /// Loss of each timed step.
    pub losses: Vec<f32>,
    /// Trainable LoRA parameters.
    pub lora_params: usize,
    /// Weights of all linears (decoder projections and lm_head).
    pub linear_params: usize,
    /// FLOPs per step as counted (see [`step_flops`](super::step_flops)).
    pub flops_per_step: f64,
    /// MFU's denominator (GFLOP/s): on a CPU the larger of the measured f32 GEMM rate and the bf16
    /// instruction ceiling (`vdpbf16ps`, where the CPU has it); on a GPU its GEMM rate.
    pub peak_gflops: f64,
    /// What `peak_gflops` measured ("f32 GEMM", "vdpbf16ps", "GPU bf16 GEMM", ...).
    pub peak_kind: String,
    /// Streams a step's batch ran as (`models::batch_streams`).
    pub streams: usize,
    /// Seconds spent generating the weights and loading the model.
    pub setup_s: f64,
    /// Device memory figures (`--device cuda`).
    pub gpu: Option<GpuReport>,
}

impl BenchReport {
    /// Median, min and max step time (s).
    pub fn step_stats(&self) -> (f64, f64, f64) {
        let mut v = self.step_times.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let med = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        (med, v[0], v[n - 1])
    }

    /// Predicted peak RSS: the plan plus the process's own baseline.
    pub fn predicted_peak(&self) -> usize {
        self.plan.total() + self.baseline_rss
    }

    /// True when the run had a single step: its peak RSS comes before AdamW's first update writes
    /// the moments (allocated zeroed, so their pages are not resident yet), and sits below the
    /// peak of every later step by up to the optimizer's moment bytes (Qwen2.5-7B: 5202 against
    /// 5374 MiB). The plan predicts the later steps' peak.
    pub fn first_step_only(&self) -> bool {
        self.config.warmup + self.config.steps < 2
    }

    /// Tokens per second at the median step time.
    pub fn tokens_per_s(&self) -> f64 {
        (self.config.rows() * self.config.seq_len) as f64 / self.step_stats().0
    }

    /// Tokens per CPU second (all threads), at the median CPU time of a step.
    pub fn tokens_per_cpu_s(&self) -> f64 {
        let mut v = self.step_cpu_s.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v.get(v.len() / 2).copied().unwrap_or(0.0);
        (self.config.rows() * self.config.seq_len) as f64 / med
    }

    /// Achieved GFLOP/s at the median step time.
    pub fn gflops(&self) -> f64 {
        self.flops_per_step / self.step_stats().0 / 1e9
    }

    /// The JSON object `--json` writes.
    pub fn to_json(&self) -> serde_json::Value {
        let (med, min, max) = self.step_stats();
        let p = &self.plan;
        let c = &self.config;
        let gpu = self.gpu.as_ref().map(|g| {
            serde_json::json!({
                "baseline_used_bytes": g.baseline_used,
                "peak_allocated_bytes": g.peak_allocated,
                "predicted_allocated_bytes": g.predicted_allocated(p),
                "device_peak_bytes": g.baseline_used + g.peak_allocated,
                "dequant_scratch": g.terms.dequant_scratch,
                "attention_scores": g.terms.attention_scores,
                "mlp_backward": g.terms.mlp_backward,
                "composite_norms": g.terms.composite_norms,
                "allocator": g.terms.allocator,
                "host_only": g.terms.host_only,
            })
        });
        let mut v = serde_json::json!({
            "tool": "qtune",
            "gpu": gpu,
            "predicted_peak_bytes": self.predicted_peak(),
            "measured_peak_bytes": self.measured_peak,
            "step_time_s": med,
            "step_time_min_s": min,
            "step_time_max_s": max,
            "step_times_s": self.step_times,
            "step_cpu_s": self.step_cpu_s,
            "tokens_per_cpu_s": self.tokens_per_cpu_s(),
            "losses": self.losses,
            "tokens_per_s": self.tokens_per_s(),
            "gflops": self.gflops(),
            "peak_gflops": self.peak_gflops,
            "mfu": self.gflops() / self.peak_gflops,
            "flops_per_step": self.flops_per_step,
            "setup_s": self.setup_s,
            "plan": {
                "process_baseline": self.baseline_rss,
                "weights": p.weights,
                "adapters": p.adapters,
                "adapter_grads": p.adapter_grads,
                "optimizer": p.optimizer,
                "checkpoints": p.checkpoints,
                "recompute": p.recompute,
                "kernel_scratch": p.kernel_scratch,
                "logits_chunk": p.logits_chunk,
                "total": p.total(),
            },
            "config": {
                "shape": c.shape,
                "quant": c.quant.name(),
                "seq_len": c.seq_len,
                "batch_size": c.batch_size,
                "rank": c.rank,
                "targets": c.targets,
                "steps": c.steps,
                "warmup": c.warmup,
                "dtype": format!("{:?}", c.dtype).to_lowercase(),
                "ce_chunk": c.ce_chunk,
                "optim_8bit": c.optim_8bit,
                "device": c.device,
                "threads": rayon::current_num_threads(),
                "lora_params": self.lora_params,
                "linear_params": self.linear_params,
                "model": {
                    "vocab_size": self.model.vocab_size,
                    "hidden_size": self.model.hidden_size,
                    "intermediate_size": self.model.intermediate_size,
                    "num_layers": self.model.num_layers,
                    "num_heads": self.model.num_heads,
                    "num_kv_heads": self.model.num_kv_heads,
                },
            },
        });
        // Beside the rest: one json! of every key passes the macro's recursion limit.
        v["peak_kind"] = serde_json::json!(self.peak_kind);
        v["first_step_only"] = serde_json::json!(self.first_step_only());
        v["objective"] = serde_json::json!(if c.dpo_beta.is_some() { "dpo" } else { "sft" });
        v["rows"] = serde_json::json!(c.rows());
        v["method"] = serde_json::json!(c.method_name());
        // candle's element-wise workers' spin budget when the user set one (candle's own: 25,000;
        // 0 helps on a loaded machine, costs on a quiet one: docs/BENCHMARKS.md, session 8)
        v["config"]["candle_spin_limit"] =
            serde_json::json!(std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").ok());
        // candle's element-wise pool size (`qtune` sets 1 unless given) and whether the workers
        // poll through a step (`nn::awake`: QTUNE_SPIN, null for the size-based default)
        v["config"]["candle_num_threads"] =
            serde_json::json!(std::env::var("CANDLE_NUM_THREADS").ok());
        v["config"]["spin"] = serde_json::json!(std::env::var("QTUNE_SPIN").ok());
        // the batch's streams (`models::step::streams`: two on a CPU from two sequences) and
        // whether the recompute was pipelined (QTUNE_PIPELINE)
        v["config"]["streams"] = serde_json::json!(self.streams);
        v["config"]["pipeline"] = serde_json::json!(std::env::var("QTUNE_PIPELINE").ok());
        if let Some(pr) = &c.prompt {
            v["config"]["num_virtual_tokens"] = serde_json::json!(pr.num_virtual_tokens);
            if pr.has_encoder() {
                v["config"]["encoder_hidden_size"] = serde_json::json!(pr.encoder_hidden_size);
            }
        }
        v["plan"]["reference_forward"] = serde_json::json!(p.reference);
        v
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b as f64 / 1048576.0;
        let c = &self.config;
        let (med, min, max) = self.step_stats();
        writeln!(
            f,
            "{} {} | {}seq {} x batch {} | {} ({} params) | {} threads | {} AdamW moments",
            c.shape,
            c.quant.name(),
            c.variant(),
            c.seq_len,
            c.batch_size,
            c.adapter_label(),
            self.lora_params,
            rayon::current_num_threads(),
            if c.optim_8bit { "8-bit" } else { "f32" }
        )?;
        writeln!(f, "memory plan:\n{}", self.plan)?;
        writeln!(
            f,
            "{:<26} {:>10.1} MiB",
            "+ process baseline",
            mib(self.baseline_rss)
        )?;
        let (pr, me) = (self.predicted_peak(), self.measured_peak);
        writeln!(
            f,
            "predicted peak {:.1} MiB, measured peak RSS {:.1} MiB ({:+.1} %)",
            mib(pr),
            mib(me),
            100.0 * (me as f64 - pr as f64) / pr as f64
        )?;
        if self.first_step_only() {
            writeln!(
                f,
                "(one step only: its peak comes before the first AdamW update writes the moments; \
                 --warmup 1 measures the peak every later step reaches, which the plan predicts)"
            )?;
        }
        writeln!(
            f,
            "step time median {med:.3} s (min {min:.3}, max {max:.3}) over {} steps after {} warm-up",
            c.steps, c.warmup
        )?;
        if let Some(g) = &self.gpu {
            writeln!(f, "GPU ({}):\n{}", c.device, g.terms)?;
            let (pr, me) = (g.predicted_allocated(&self.plan), g.peak_allocated);
            writeln!(
                f,
                "device: {:.1} MiB in use before loading (context, cuBLAS); predicted allocated \
                 peak {:.1} MiB, measured {:.1} MiB ({:+.1} %); device peak {:.1} MiB",
                mib(g.baseline_used as usize),
                mib(pr as usize),
                mib(me as usize),
                100.0 * (me as f64 - pr as f64) / pr as f64,
                mib((g.baseline_used + me) as usize)
            )?;
        }
        let peak_kind = &self.peak_kind;
        write!(
            f,
            "{:.2} tokens/s, {:.1} GFLOP/s, MFU {:.1} % of the measured {peak_kind} peak {:.1} \
             GFLOP/s",
            self.tokens_per_s(),
            self.gflops(),
            100.0 * self.gflops() / self.peak_gflops,
            self.peak_gflops
        )
    }
}
