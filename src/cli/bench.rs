//! `qtune bench`: memory and speed of a LoRA training step on a real model shape (random weights).
use anyhow::{bail, Context, Result};
use qtune::lora::prompt::{PromptMethod, PromptSpec};
use qtune::quant::QType;
use qtune::train::bench::{run_bench, BenchConfig};
use std::path::PathBuf;

/// Arguments of `qtune bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// llama-2-7b, llama-2-13b, tinyllama-1.1b, llama-3-8b, mistral-7b, qwen2.5-7b, falcon-7b, or
    /// a config.json path.
    #[arg(long)]
    shape: String,
    /// Weight type of the decoder linears: nf4, q4_0, q8_0, q4_k or bf16.
    #[arg(long, default_value = "q4_0")]
    quant: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA targets, comma-separated PEFT names (q_proj,v_proj,...) or all-linear.
    #[arg(long, default_value = "all-linear", value_delimiter = ',')]
    targets: Vec<String>,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// cpu, cuda or cuda:N (a build with `--features cuda`; compute capability 8.0+).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of activations and adapters: f32, bf16 or auto (bf16 on a GPU or a CPU with
    /// AVX-512 BF16, else f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Activation dtype of the one-layer recompute: auto (f32 for a bf16 step on the CPU), f32
    /// or the compute dtype, as `qtune train --recompute-dtype`.
    #[arg(long, default_value = "auto")]
    recompute_dtype: String,
    /// Rows per cross-entropy chunk.
    #[arg(long, default_value_t = 256)]
    ce_chunk: usize,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW moments as blockwise 8-bit codes, as `qtune train --optim-8bit`.
    #[arg(long)]
    optim_8bit: bool,
    /// The step to time: sft, or dpo (a pair a batch element: the reference forward, then one
    /// call over both completions, as `qtune train --objective dpo`).
    #[arg(long, default_value = "sft")]
    objective: String,
    /// lora, dora (LoRA with a trained magnitude per output row), prompt-tuning, p-tuning or
    /// prefix-tuning: the adapter `qtune train --method` trains (prompt learning ignores --rank and
    /// --targets).
    #[arg(long, default_value = "lora")]
    method: String,
    /// Prompt learning: virtual tokens N.
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// P-tuning's MLP width (and prefix tuning's projection with --prefix-projection).
    #[arg(long)]
    encoder_hidden_size: Option<usize>,
    /// Prefix tuning: the prefix is the output of an MLP (PEFT's prefix_projection).
    #[arg(long)]
    prefix_projection: bool,
    /// DPO's β (with --objective dpo).
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Print the memory plan only (host, and with --device cuda the GPU terms), without running
    /// a step or opening a device: what a run would need, on any build.
    #[arg(long)]
    plan_only: bool,
    /// Write the JSON report: to PATH, or to stdout with no value (the text report then goes to
    /// stderr).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
}

/// Runs the bench and prints (and optionally writes) its report.
pub fn run(a: Args) -> Result<()> {
    let quant = QType::parse(&a.quant)
        .filter(|q| qtune::train::bench::BENCH_QUANTS.contains(q))
        .with_context(|| format!("--quant {}: use nf4, q4_0, q8_0, q4_k or bf16", a.quant))?;
    // `auto` by CPU alone here (bench's default is f32; the shape's width is not read yet).
    let dtype = qtune::nn::device::compute_dtype(&a.dtype, &a.device, None)?;
    let dpo_beta = match a.objective.as_str() {
        "sft" => None,
        "dpo" => Some(a.beta),
        o => bail!("--objective {o}: use sft or dpo"),
    };
    let (dora, prompt) = match a.method.as_str() {
        "lora" => (false, None),
        "dora" => (true, None),
        "prompt-tuning" => (false, Some(PromptMethod::PromptTuning)),
        "p-tuning" => (false, Some(PromptMethod::PTuning)),
        "prefix-tuning" => (false, Some(PromptMethod::PrefixTuning(a.prefix_projection))),
        m => bail!("--method {m}: use lora, dora, prompt-tuning, p-tuning or prefix-tuning"),
    };
    if a.prefix_projection && !matches!(prompt, Some(PromptMethod::PrefixTuning(_))) {
        bail!("--prefix-projection is prefix tuning's: use it with --method prefix-tuning");
    }
    let prompt = match prompt {
        None => None,
        Some(method) => {
            if a.num_virtual_tokens == 0 {
                bail!("--num-virtual-tokens must be at least 1");
            }
            let spec = PromptSpec {
                method,
                num_virtual_tokens: a.num_virtual_tokens,
                encoder_hidden_size: a.encoder_hidden_size.unwrap_or(0),
                init_ids: None,
                init_text: None,
                seed: a.seed,
            };
            if spec.has_encoder() && spec.encoder_hidden_size == 0 {
                bail!(
                    "--method {} needs --encoder-hidden-size (P-tuning's MLP and prefix tuning's \
                     projection need a width, e.g. the hidden size)",
                    a.method
                );
            }
            Some(spec)
        }
    };
    let cfg = BenchConfig {
        shape: a.shape.clone(),
        quant,
        seq_len: a.seq_len,
        batch_size: a.batch_size,
        rank: a.rank,
        targets: a.targets.clone(),
        steps: a.steps,
        warmup: a.warmup,
        dtype,
        recompute: qtune::nn::device::recompute_dtype(&a.recompute_dtype)?,
        ce_chunk: a.ce_chunk,
        seed: a.seed,
        optim_8bit: a.optim_8bit,
        device: a.device.clone(),
        dpo_beta,
        dora,
        prompt,
    };
    if a.plan_only {
        let (plan, gpu) =
            qtune::train::bench::plan_bench(&cfg).with_context(|| format!("bench {}", a.shape))?;
        let mib = |b: usize| b as f64 / 1048576.0;
        println!(
            "{} {} | {}seq {} x batch {} | {}\nmemory plan (host):\n{plan}",
            a.shape,
            quant.name(),
            cfg.variant(),
            a.seq_len,
            a.batch_size,
            cfg.adapter_label()
        );
        if let Some(g) = gpu {
            let alloc = g.allocated_total(&plan);
            println!(
                "on {}:\n{g}\npredicted allocated peak {:.1} MiB; with the estimated context and \
                 cuBLAS workspace, device peak {:.1} MiB ({:.2} GB)",
                a.device,
                mib(alloc),
                mib(g.device_total(&plan)),
                g.device_total(&plan) as f64 / 1e9
            );
        }
        return Ok(());
    }
    let to_stdout = a.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    let mut progress = |s: &str| eprintln!("[bench] {s}");
    let report = run_bench(&cfg, &mut progress).with_context(|| format!("bench {}", a.shape))?;
    if to_stdout {
        eprintln!("{report}");
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        println!("{report}");
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&report.to_json())? + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
        }
    }
    Ok(())
}
