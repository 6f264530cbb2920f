//! Subcommands that live in their own files: each has a clap `Args` and a `run`.
pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
pub mod generate;
pub mod merge;
pub mod train;

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Runs `f` on a worker of rayon's global pool, built here with `threads` workers (0: one a core;
/// `--threads`). Why: every parallel loop of a step (our kernels, candle's) started from a thread
/// outside the pool hands its work to the pool's workers and sleeps on a latch until they finish,
/// so each op paid a wake-up of both workers and of the caller; started from a worker, the caller
/// is one of the workers and the loop starts at once. On 2 cores that handoff was a fifth of a
/// ~100M bf16 step (session 17: 1.19-1.28x). The workers get the main thread's 8 MiB of stack,
/// as the command ran there before (address space only until used).
pub fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    if threads > 0 {
        // candle sizes its own element-wise pool from this variable
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(8 << 20)
        .build_global()
        .context("setting up the worker threads (--threads)")?;
    Ok(rayon::scope(|_| f()))
}

/// `--model` and `--gguf-file`, shared by the commands that read a model (each sets its own help
/// for `--model` with [`model_help`]).
#[derive(clap::Args)]
pub struct ModelArg {
    /// The model (Hugging Face directory or GGUF; or a Hub id: org/name[@rev], org/name:QUANT).
    #[arg(long = "model", id = "model", value_name = "MODEL")]
    pub path: PathBuf,
    /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
    #[arg(long)]
    pub gguf_file: Option<String>,
}

impl ModelArg {
    /// A Hub id becomes its cached snapshot (downloaded first if needed); a local path is kept.
    pub fn resolve(&mut self) -> anyhow::Result<()> {
        self.path = qtune::store::hub::resolve_model(&self.path, self.gguf_file.as_deref())?;
        Ok(())
    }
}

/// A base model and an adapter trained on it (`qtune export`, `qtune merge`).
#[derive(clap::Args)]
pub struct BaseAndAdapter {
    #[command(flatten)]
    pub model: ModelArg,
    /// The adapter: a PEFT directory or a GGUF LoRA file.
    #[arg(long)]
    pub adapter: PathBuf,
}

impl BaseAndAdapter {
    /// The base (a Hub id resolved first), its configuration, and the adapter read for it.
    pub fn open(
        &mut self,
    ) -> anyhow::Result<(
        qtune::store::WeightStore,
        qtune::export::BaseConfig,
        qtune::export::Adapter,
    )> {
        self.model.resolve()?;
        base_and_adapter(&self.model.path, &self.adapter)
    }
}

/// The base model at `model`, its configuration, and the adapter at `adapter` read for it.
fn base_and_adapter(
    model: &Path,
    adapter: &Path,
) -> anyhow::Result<(
    qtune::store::WeightStore,
    qtune::export::BaseConfig,
    qtune::export::Adapter,
)> {
    let store = qtune::store::WeightStore::open(model)?;
    let cfg = qtune::export::BaseConfig::from_store(&store)?;
    let adapter = qtune::export::Adapter::load(adapter, &cfg).with_context(|| {
        format!(
            "reading adapter {} for base {}",
            adapter.display(),
            model.display()
        )
    })?;
    Ok((store, cfg, adapter))
}

/// Creates the folder `out` will be written in.
pub fn create_parent(out: &Path) -> anyhow::Result<()> {
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

/// `--model`'s help in one command: `#[command(mut_args(model_help("...")))]` (`mut_args`, not
/// `mut_arg`, which would move `--model` to the end of the usage line).
pub fn model_help(help: &'static str) -> impl FnMut(clap::Arg) -> clap::Arg {
    move |a| {
        if a.get_id() == "model" {
            a.help(help)
        } else {
            a
        }
    }
}
