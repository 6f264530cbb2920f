//! The `qtune` command line. Library errors carry the file and tensor; here they only gain context.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qtune::quant::QType;
use qtune::store::hub::resolve_model;
use qtune::store::WeightStore;
use std::path::PathBuf;

mod cli;

#[derive(Parser)]
#[command(
    name = "qtune",
    version,
    about = "LoRA fine-tuning on a 4/8-bit memory-mapped base model"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Memory and speed of a LoRA training step on a model shape with random quantised weights.
    Bench(cli::bench::Args),
    /// Print a model file's architecture, metadata, tensors and bits per weight (reads headers only).
    Inspect {
        /// A .gguf file, a .safetensors file, a Hugging Face model directory, or a Hub id
        /// (org/name[@rev], org/name:QUANT).
        path: PathBuf,
        /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
        #[arg(long)]
        gguf_file: Option<String>,
        /// Also parse a GGUF header with the independent gguf-rs crate and check that both agree.
        #[arg(long)]
        verify: bool,
    },
    /// Quantise a model, one tensor at a time: ggml types write a GGUF, nf4 a bitsandbytes directory.
    Quantize {
        /// Source: a Hugging Face directory (safetensors) or a GGUF file, or a Hub id
        /// (org/name[@rev], org/name:QUANT).
        #[arg(long)]
        model: PathBuf,
        /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
        #[arg(long)]
        gguf_file: Option<String>,
        /// Target type: q4_0, q8_0, q4_k, q6_k or nf4; or f32, f16, bf16 (a plain conversion of a
        /// Hugging Face model to GGUF, as llama.cpp's convert_hf_to_gguf.py).
        #[arg(long = "type")]
        qtype: String,
        /// Output: a .gguf file for ggml types, a directory for nf4.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune a LoRA adapter on JSONL data (no arguments: the embedded default, about a minute).
    Train(Box<cli::train::Args>),
    /// Export an adapter as llama.cpp's GGUF LoRA or a PEFT directory.
    Export(cli::export::Args),
    /// Mean loss and perplexity of a model, with or without an adapter, on JSONL data.
    Eval(cli::eval::Args),
    /// Merge an adapter into its base model.
    Merge(cli::merge::Args),
    /// Generate text with the base and an unmerged adapter (KV cache, streaming).
    Generate(cli::generate::Args),
}

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`qtune bench --plan-only | head -1`)
    // panics in println!; a CLI should end as `cat` does.
    #[cfg(unix)]
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a valid disposition
    // for SIGPIPE and no Rust code relies on the signal being ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle's element-wise ops run on its own pool, whose workers spin 25,000 pauses (about a
    // millisecond) after every op before they park: on 2 cores that spinning took 14 % of a ~100M
    // bf16 step's samples from the rayon workers running the step (session 16). They park at once
    // unless the user says otherwise. Set before any thread exists (the pool starts on first use).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // Since session 19 there is no such pool unless the user asks for one: candle's element-wise
    // ops (the backward's gradient sums) run on the calling worker. With the workers kept awake
    // through a step (`nn::awake`) candle's thread competed with them for a core and the caller
    // waited on it (~100M bf16 step 1.04-1.10x faster without it).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Train(_) | Cmd::Bench(_)) {
        // before any thread allocates: one malloc arena (measured for training steps only)
        qtune::train::bench::tune_allocator();
    }
    // `qtune train` builds the pool after reading `--threads` (from its flags or config file).
    let res = match cli.cmd {
        Cmd::Train(args) => cli::train::run(*args),
        cmd => cli::on_pool(0, || run(cmd)).and_then(|r| r),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Every command but `train` (see `main`), on a worker of rayon's pool.
fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Bench(a) => cli::bench::run(a)?,
        Cmd::Train(_) => unreachable!("`main` runs train itself"),
        Cmd::Export(a) => cli::export::run(a)?,
        Cmd::Eval(a) => cli::eval::run(a)?,
        Cmd::Merge(a) => cli::merge::run(a)?,
        Cmd::Generate(a) => cli::generate::run(a)?,
        Cmd::Inspect {
            path,
            verify,
            gguf_file,
        } => {
            let path = resolve_model(&path, gguf_file.as_deref())?;
            let store = WeightStore::open(&path)?;
            print!("{}", qtune::format::inspect::inspect(&store));
            if verify {
                let msg = qtune::format::inspect::verify_gguf(&path)?;
                println!("{msg}");
            }
        }
        Cmd::Quantize {
            model,
            qtype,
            out,
            gguf_file,
        } => {
            let model = resolve_model(&model, gguf_file.as_deref())?;
            let t = QType::parse(&qtype).filter(|t| {
                matches!(t, QType::NF4 | QType::F32 | QType::F16 | QType::BF16)
                    || qtune::quant::dispatch::QUANTIZABLE.contains(t)
            });
            let Some(t) = t else {
                bail!(
                    "--type {qtype}: qtune quantises to q4_0, q8_0, q4_k, q6_k or nf4, or \
                     converts to f32, f16 or bf16"
                );
            };
            let store = WeightStore::open(&model)?;
            let t0 = std::time::Instant::now();
            if t == QType::NF4 {
                let report = qtune::format::bnb::write_nf4_dir(&store, &out)
                    .with_context(|| format!("quantising {} to nf4", model.display()))?;
                println!(
                    "{} tensors quantised to NF4, {} copied, model.safetensors {} bytes, also copied: {}",
                    report.nf4_tensors,
                    report.copied_tensors,
                    report.file_bytes,
                    report.extra_files.join(", ")
                );
            } else {
                let report = qtune::export::quantize::quantize_to_gguf(&store, t, &out)
                    .with_context(|| format!("quantising {} to {}", model.display(), t.name()))?;
                println!("{report}");
            }
            println!(
                "wrote {} in {:.1} s",
                out.display(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
