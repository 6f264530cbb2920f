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
use crate::models::llama::PROJECTIONS;
use crate::models::plan::GpuTerms;
use crate::models::{FalconConfig, LlamaConfig, LlamaOptions, LoraSpec, MemoryPlan};
use crate::quant::{nf4, QType};
use crate::store::{Bytes, Nf4Stats, SourceFormat, StoredTensor, WeightStore};
use crate::train::optim::{AdamW, AdamWConfig, MomentStorage};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Named shapes `qtune bench --shape` knows (a `config.json` path works too).
pub const SHAPES: [&str; 5] = [
    "llama-2-7b",
    "llama-2-13b",
    "tinyllama-1.1b",
    "mistral-7b",
    "falcon-7b",
];

/// Weight types a synthetic model can be generated in.
pub const BENCH_QUANTS: [QType; 5] = [
    QType::NF4,
    QType::Q4_0,
    QType::Q8_0,
    QType::Q4_K,
    QType::BF16,
];

/// The transformers `config.json` of a named shape, or of a `config.json` path.
pub fn shape_config(shape: &str) -> Result<serde_json::Value> {
    let llama = |v: u64, c: u64, i: u64, l: u64, h: u64, k: u64, theta: f64| {
        serde_json::json!({
            "model_type": "llama", "vocab_size": v, "hidden_size": c, "intermediate_size": i,
            "num_hidden_layers": l, "num_attention_heads": h, "num_key_value_heads": k,
            "rms_norm_eps": 1e-5, "rope_theta": theta, "tie_word_embeddings": false,
        })
    };
    // Values from each model's published config.json on the Hugging Face hub.
    Ok(match shape {
        "llama-2-7b" => llama(32000, 4096, 11008, 32, 32, 32, 1e4),
        "llama-2-13b" => llama(32000, 5120, 13824, 40, 40, 40, 1e4),
        "tinyllama-1.1b" => llama(32000, 2048, 5632, 22, 32, 4, 1e4),
        "mistral-7b" => {
            let mut c = llama(32000, 4096, 14336, 32, 32, 8, 1e6);
            c["model_type"] = "mistral".into();
            c
        }
        // tiiuae/falcon-7b: multi-query attention, parallel attention + MLP, tied head.
        "falcon-7b" => serde_json::json!({
            "model_type": "falcon", "vocab_size": 65024, "hidden_size": 4544,
            "num_attention_heads": 71, "num_kv_heads": 1, "num_hidden_layers": 32,
            "multi_query": true, "parallel_attn": true, "new_decoder_architecture": false,
            "bias": false, "alibi": false, "layer_norm_epsilon": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true,
        }),
        path => {
            let p = Path::new(path);
            let p = if p.is_dir() {
                p.join("config.json")
            } else {
                p.to_path_buf()
            };
            if !p.exists() {
                return Err(Error::Invalid(format!(
                    "--shape {path}: neither a known shape ({}) nor an existing config.json",
                    SHAPES.join(", ")
                )));
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Json {
                path: p.clone(),
                msg: format!("not valid JSON: {e}"),
            })?
        }
    })
}

/// Parameters of a Llama of this config (embedding, decoder layers with norms, final norm, and an
/// untied lm_head).
pub fn param_count(cfg: &LlamaConfig) -> usize {
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let layer = 2 * q * c + 2 * kv * c + 3 * i * c + 2 * c;
    let head = if cfg.tie_word_embeddings { 0 } else { v * c };
    v * c + cfg.num_layers * layer + c + head
}

/// A small, fast PRNG (xorshift64*): the values only need to look like weights.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Standard deviation of the generated weights (transformers' `initializer_range`).
const STD: f32 = 0.02;

/// Fills `out` with random blocks of `q` (one `block_bytes` block each), in parallel, so that
/// every element dequantises to a finite value of roughly `STD` standard deviation.
fn random_blocks(q: QType, out: &mut [u8], seed: u64) {
    let bb = q.type_size();
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    // Blocks per parallel chunk (~1 MiB) so the seed of a chunk depends only on its position.
    let per = (1 << 20) / bb;
    out.par_chunks_mut(per * bb)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut r = Rng::new(seed ^ (ci as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
            r.fill(chunk);
            for b in chunk.chunks_exact_mut(bb) {
                match q {
                    // d, then 16 bytes of nibbles: (q - 8)·d, uniform over 16 levels (std ≈ 4.6 d).
                    QType::Q4_0 => b[..2].copy_from_slice(&f16(STD / 4.6)),
                    // d, then 32 int8: uniform over 256 levels (std ≈ 74 d).
                    QType::Q8_0 => b[..2].copy_from_slice(&f16(STD / 74.0)),
                    // d, dmin, 12 bytes of 6-bit scales/mins (random), 128 bytes of nibbles:
                    // d·sc·q - dmin·m with sc, m ~ U[0, 63], q ~ U[0, 15].
                    QType::Q4_K => {
                        b[..2].copy_from_slice(&f16(STD / 150.0));
                        b[2..4].copy_from_slice(&f16(STD / 150.0 * 7.5));
                    }
                    QType::BF16 => {
                        for e in b.chunks_exact_mut(2) {
                            let x = half::bf16::from_f32(r.unit() * STD * 1.7);
                            e.copy_from_slice(&x.to_le_bytes());
                        }
                    }
                    QType::F32 => {
                        let x = r.unit() * STD * 1.7;
                        b.copy_from_slice(&x.to_le_bytes());
                    }
                    _ => unreachable!("random_blocks: {q:?} is not a bench type"),
                }
            }
        });
}

/// A random tensor of `shape` stored as `q` (NF4 with double-quantised statistics).
pub fn random_tensor(name: &str, shape: Vec<usize>, q: QType, seed: u64) -> Result<StoredTensor> {
    let numel: usize = shape.iter().product();
    let cols = *shape.last().unwrap_or(&1);
    if q == QType::NF4 {
        if !numel.is_multiple_of(nf4::NF4_BLOCK) {
            return Err(Error::Invalid(format!(
                "{name}: {numel} weights are not whole NF4 blocks of {}",
                nf4::NF4_BLOCK
            )));
        }
        let blocks = numel / nf4::NF4_BLOCK;
        let mut packed = vec![0u8; numel / 2];
        let mut absmax_q = vec![0u8; blocks];
        packed
            .par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, c)| {
                Rng::new(seed ^ (i as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).fill(c)
            });
        Rng::new(!seed).fill(&mut absmax_q);
        // absmax = code8[q]·nested + offset, code8 in [-1, 1]: absmax in [0.02, 0.04]; NF4 codes
        // in [-1, 1] then give values of roughly STD deviation.
        let nested = vec![0.01f32; blocks.div_ceil(nf4::NF4_NESTED_BLOCK)];
        return Ok(StoredTensor {
            name: name.into(),
            qtype: QType::NF4,
            shape,
            data: Bytes::from_vec(packed),
            nf4: Some(Nf4Stats {
                absmax_q: Bytes::from_vec(absmax_q),
                nested_absmax: nested,
                nested_code: Box::new(nf4::dynamic_map()),
                code: Box::new(nf4::NF4_CODE),
                offset: 0.03,
            }),
        });
    }
    let row = q.bytes_for(cols).ok_or_else(|| {
        Error::Invalid(format!(
            "{name}: rows of {cols} are not whole {} blocks of {}; pick another --quant",
            q.name(),
            q.block_size()
        ))
    })?;
    let mut data = vec![0u8; row * (numel / cols.max(1))];
    random_blocks(q, &mut data, seed);
    Ok(StoredTensor {
        name: name.into(),
        qtype: q,
        shape,
        data: Bytes::from_vec(data),
        nf4: None,
    })
}

/// A Llama of the shape in `config` (transformers names) with random weights: decoder linears in
/// `quant`; the embedding and lm_head in `quant` too, or BF16 for NF4 (as bitsandbytes leaves
/// them); norms f32 ones. Generated tensor by tensor, never through full precision.
pub fn synthetic_store(config: &serde_json::Value, quant: QType, seed: u64) -> Result<WeightStore> {
    if !BENCH_QUANTS.contains(&quant) {
        return Err(Error::Invalid(format!(
            "--quant {}: bench weights are one of nf4, q4_0, q8_0, q4_k, bf16",
            quant.name()
        )));
    }
    let path = PathBuf::from("synthetic/config.json");
    if config["model_type"] == "falcon" {
        return synthetic_falcon(config, quant, seed);
    }
    let cfg = LlamaConfig::from_hf(config, &path)?;
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let outer = if quant == QType::NF4 {
        QType::BF16
    } else {
        quant
    };
    let mut tensors = Vec::with_capacity(cfg.num_layers * 9 + 3);
    let mut seed = seed;
    let mut next = || {
        seed = seed.wrapping_add(1);
        seed
    };
    let ones = |name: String| StoredTensor {
        name,
        qtype: QType::F32,
        shape: vec![c],
        data: Bytes::from_vec(1f32.to_le_bytes().repeat(c)),
        nf4: None,
    };
    tensors.push(random_tensor(
        "model.embed_tokens.weight",
        vec![v, c],
        outer,
        next(),
    )?);
    for l in 0..cfg.num_layers {
        let pre = format!("model.layers.{l}");
        tensors.push(ones(format!("{pre}.input_layernorm.weight")));
        tensors.push(ones(format!("{pre}.post_attention_layernorm.weight")));
        for (name, group, _) in PROJECTIONS {
            let shape = match name {
                "q_proj" => vec![q, c],
                "k_proj" | "v_proj" => vec![kv, c],
                "o_proj" => vec![c, q],
                "gate_proj" | "up_proj" => vec![i, c],
                _ => vec![c, i],
            };
            let n = format!("{pre}.{group}.{name}.weight");
            tensors.push(random_tensor(&n, shape, quant, next())?);
        }
    }
    tensors.push(ones("model.norm.weight".into()));
    if !cfg.tie_word_embeddings {
        tensors.push(random_tensor("lm_head.weight", vec![v, c], outer, next())?);
    }
    Ok(WeightStore {
        path: PathBuf::from("synthetic"),
        format: SourceFormat::Safetensors,
        tensors,
        gguf_metadata: Vec::new(),
        alignment: 32,
        config: Some(config.clone()),
    })
}

/// A Falcon of `config`'s shape with Hugging Face names (fused qkv, LayerNorm weight and bias, tied
/// head), weights generated in `quant` like [`synthetic_store`]'s.
fn synthetic_falcon(config: &serde_json::Value, quant: QType, seed: u64) -> Result<WeightStore> {
    let cfg = FalconConfig::from_hf(config, Path::new("synthetic/config.json"))?;
    let (v, c, f) = (cfg.vocab_size, cfg.hidden_size, cfg.ffn_hidden_size);
    let qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
    let outer = if quant == QType::NF4 {
        QType::BF16
    } else {
        quant
    };
    let mut seed = seed;
    let mut next = || {
        seed = seed.wrapping_add(1);
        seed
    };
    let vec1 = |name: String, x: f32| StoredTensor {
        name,
        qtype: QType::F32,
        shape: vec![c],
        data: Bytes::from_vec(x.to_le_bytes().repeat(c)),
        nf4: None,
    };
    let mut tensors = vec![random_tensor(
        "transformer.word_embeddings.weight",
        vec![v, c],
        outer,
        next(),
    )?];
    for l in 0..cfg.num_layers {
        let pre = format!("transformer.h.{l}");
        tensors.push(vec1(format!("{pre}.input_layernorm.weight"), 1.0));
        tensors.push(vec1(format!("{pre}.input_layernorm.bias"), 0.0));
        for (name, shape) in [
            ("self_attention.query_key_value", vec![qkv, c]),
            ("self_attention.dense", vec![c, c]),
            ("mlp.dense_h_to_4h", vec![f, c]),
            ("mlp.dense_4h_to_h", vec![c, f]),
        ] {
            tensors.push(random_tensor(
                &format!("{pre}.{name}.weight"),
                shape,
                quant,
                next(),
            )?);
        }
    }
    tensors.push(vec1("transformer.ln_f.weight".into(), 1.0));
    tensors.push(vec1("transformer.ln_f.bias".into(), 0.0));
    Ok(WeightStore {
        path: PathBuf::from("synthetic"),
        format: SourceFormat::Safetensors,
        tensors,
        gguf_metadata: Vec::new(),
        alignment: 32,
        config: Some(config.clone()),
    })
}

/// The dimensions the FLOP count needs, for either architecture (Falcon's MLP size as
/// `intermediate_size`; its tied head).
fn shape_dims(config: &serde_json::Value, path: &Path) -> Result<LlamaConfig> {
    if config["model_type"] != "falcon" {
        return LlamaConfig::from_hf(config, path);
    }
    let f = FalconConfig::from_hf(config, path)?;
    Ok(LlamaConfig {
        vocab_size: f.vocab_size,
        hidden_size: f.hidden_size,
        intermediate_size: f.ffn_hidden_size,
        num_layers: f.num_layers,
        num_heads: f.num_heads,
        num_kv_heads: f.num_kv_heads,
        head_dim: f.head_dim,
        rope_theta: f.rope_theta,
        rms_norm_eps: f.layer_norm_eps,
        tie_word_embeddings: true,
    })
}

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
    /// Rows per cross-entropy chunk.
    pub ce_chunk: usize,
    /// Seed of weights and tokens.
    pub seed: u64,
    /// AdamW moments as blockwise 8-bit codes (`qtune train --optim-8bit`).
    pub optim_8bit: bool,
    /// `cpu`, `cuda` or `cuda:N` (see [`crate::nn::device::open`]).
    pub device: String,
}

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
    /// FLOPs per step as counted (see [`step_flops`]).
    pub flops_per_step: f64,
    /// This machine's measured f32 GEMM rate (GFLOP/s), MFU's denominator.
    pub peak_gflops: f64,
    /// Seconds spent generating the weights and loading the model.
    pub setup_s: f64,
    /// Device memory figures (`--device cuda`).
    pub gpu: Option<GpuReport>,
}

/// FLOPs of one training step: 6 per linear weight per token (forward, checkpoint recompute and
/// input gradient; the frozen base has no weight gradient) plus PaLM's attention term
/// 12·L·H·D·T per token (QKᵀ and A·V, forward and backward).
pub fn step_flops(cfg: &LlamaConfig, linear_params: usize, tokens: usize, seq: usize) -> f64 {
    let attn = 12.0 * (cfg.num_layers * cfg.num_heads * cfg.head_dim * seq) as f64;
    (6.0 * linear_params as f64 + attn) * tokens as f64
}

/// Value of a `/proc/self/status` line in bytes (0 where there is none, e.g. off Linux).
pub fn status_bytes(key: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system, all threads) this process has used, in seconds (0 off Linux).
/// `/proc/self/stat` counts in USER_HZ ticks, 100 per second on Linux.
pub fn process_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.get(s.rfind(')')? + 2..)?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let tick = |i: usize| f.get(i)?.parse::<f64>().ok();
            Some((tick(11)? + tick(12)?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` 5); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Limits glibc to one malloc arena. Tensors are freed on other threads than the ones that made
/// them (rayon workers), and per-thread arenas each keep their own freed memory: with one arena
/// the peak RSS of the 100M-shape bf16 step is 10 % lower (−6 % against the plan instead of +4 %)
/// at the same speed. The mmap threshold stays glibc's dynamic one: pinning it low
/// (MALLOC_MMAP_THRESHOLD_=65536) makes RSS follow the live bytes exactly, but every large tensor
/// then costs fresh pages (faults, zeroing, munmap's TLB shootdowns): 1.8x slower at the 100M
/// shape, 1.4x at 7B. Call before the first tensor exists; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: glibc's mallopt only changes allocator tuning.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

/// Best rate (GFLOP/s) of a few 1536³ f32 GEMMs on all threads: the dense ceiling MFU refers to.
pub fn measure_f32_peak() -> f64 {
    let n = 1536;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t0 = Instant::now();
        // SAFETY: a, b, c are n×n row-major and live for the call; c is written only here.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
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
    let (b, t) = (cfg.batch_size, cfg.seq_len);
    let plan = MemoryPlan::for_store(store, opts, b, t)?.with_optimizer(moment_storage(cfg));
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
        lora: Some(LoraSpec {
            targets: cfg.targets.clone(),
            r: cfg.rank,
            alpha: 2.0 * cfg.rank as f64,
            dropout: 0.0,
            seed: cfg.seed,
            ..LoraSpec::default()
        }),
        checkpoint: true,
        ce_chunk: cfg.ce_chunk,
        device,
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
    let peak_gflops = if device.is_cpu() {
        progress("measuring this machine's f32 GEMM peak");
        measure_f32_peak()
    } else {
        progress(&format!("measuring the GPU's {:?} GEMM peak", cfg.dtype));
        measure_device_peak(&device, cfg.dtype)?
    };
    let gpu_baseline = crate::nn::device::used_bytes(&device)?;
    crate::nn::device::reset_peak(&device)?;
    let baseline_rss = status_bytes("VmRSS:");
    reset_peak_rss();
    let t0 = Instant::now();
    progress(&format!("generating random {} weights", cfg.quant.name()));
    let store = synthetic_store(&config, cfg.quant, cfg.seed)?;
    let opts = bench_options(cfg, device.clone());
    let moments = moment_storage(cfg);
    let (plan, gpu_terms) = plan_of(&store, &opts, cfg, gpu_baseline.is_some())?;
    let linear_params: usize = store
        .tensors
        .iter()
        .filter(|t| {
            t.shape.len() == 2
                && t.name != "model.embed_tokens.weight"
                && t.name != "transformer.word_embeddings.weight"
        })
        .map(|t| t.numel())
        .sum::<usize>()
        + if model_cfg.tie_word_embeddings {
            model_cfg.vocab_size * model_cfg.hidden_size
        } else {
            0
        };
    progress("loading the model with LoRA");
    let model = crate::models::load(&store, opts)?;
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
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).map_err(cerr)?;
    let labels = ids.to_dtype(DType::I64).map_err(cerr)?;
    let mut step = || -> Result<(f32, f64, f64)> {
        let (s0, c0) = (Instant::now(), process_cpu_s());
        let (loss, grads) = model.train_grads(&ids, None, &labels)?;
        opt.step(&grads, 1e-4)?;
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
    let flops_per_step = step_flops(&model_cfg, linear_params, b * t, t);
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
        setup_s,
        gpu,
    })
}

/// The best rate (GFLOP/s) of a 4096³ product in `dtype` on `dev` (a GPU: bf16 uses its tensor
/// cores through cuBLAS), MFU's denominator there.
pub fn measure_device_peak(dev: &Device, dtype: DType) -> Result<f64> {
    let n = 4096;
    let e = |e: candle_core::Error| Error::Invalid(format!("measuring the GEMM peak: {e}"));
    let a = Tensor::ones((n, n), dtype, dev).map_err(e)?;
    let b = (Tensor::ones((n, n), dtype, dev).map_err(e)? * 0.5).map_err(e)?;
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        dev.synchronize().map_err(e)?;
        let t0 = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(a.matmul(&b).map_err(e)?);
        }
        dev.synchronize().map_err(e)?;
        best = best.min(t0.elapsed().as_secs_f64() / 10.0);
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
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

    /// Tokens per second at the median step time.
    pub fn tokens_per_s(&self) -> f64 {
        (self.config.batch_size * self.config.seq_len) as f64 / self.step_stats().0
    }

    /// Tokens per CPU second (all threads), at the median CPU time of a step.
    pub fn tokens_per_cpu_s(&self) -> f64 {
        let mut v = self.step_cpu_s.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v.get(v.len() / 2).copied().unwrap_or(0.0);
        (self.config.batch_size * self.config.seq_len) as f64 / med
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
                "allocator": g.terms.allocator,
                "host_only": g.terms.host_only,
            })
        });
        serde_json::json!({
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
        })
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b as f64 / 1048576.0;
        let c = &self.config;
        let (med, min, max) = self.step_stats();
        writeln!(
            f,
            "{} {} | seq {} x batch {} | LoRA r{} on {} ({} params) | {} threads | {} AdamW moments",
            c.shape,
            c.quant.name(),
            c.seq_len,
            c.batch_size,
            c.rank,
            c.targets.join(","),
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
        let peak_kind = if self.gpu.is_some() {
            format!("GPU {:?}", c.dtype).to_lowercase()
        } else {
            "f32".into()
        };
        write!(
            f,
            "{:.2} tokens/s, {:.1} GFLOP/s, MFU {:.1} % of the measured {peak_kind} GEMM peak {:.1} \
             GFLOP/s",
            self.tokens_per_s(),
            self.gflops(),
            100.0 * self.gflops() / self.peak_gflops,
            self.peak_gflops
        )
    }
}
