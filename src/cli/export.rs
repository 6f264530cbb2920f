//! `qtune export`: an adapter as llama.cpp's GGUF LoRA or as a PEFT directory.
use anyhow::{bail, Context, Result};
use qtune::export::{base_architecture, write_gguf_lora, write_peft, Adapter, BaseConfig};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::PathBuf;

/// Export a trained adapter for llama.cpp (`--lora`) or PEFT.
#[derive(clap::Args)]
pub struct Args {
    /// The base model the adapter was trained on (Hugging Face directory or GGUF; or a Hub id: org/name[@rev], org/name:QUANT).
    #[arg(long)]
    pub model: PathBuf,
    /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// The adapter: a PEFT directory, or a GGUF LoRA file (for `--format peft`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// gguf-lora (llama.cpp) or peft.
    #[arg(long)]
    pub format: String,
    /// Output file (gguf-lora) or directory (peft).
    #[arg(long)]
    pub out: PathBuf,
    /// Factor type: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Runs `qtune export`.
pub fn run(mut a: Args) -> Result<()> {
    // a Hub id becomes its cached snapshot (downloaded first if needed); a local path is kept
    a.model = qtune::store::hub::resolve_model(&a.model, a.gguf_file.as_deref())?;
    let dtype = match QType::parse(&a.dtype) {
        Some(t @ (QType::F32 | QType::F16 | QType::BF16)) => t,
        _ => bail!("--dtype {}: use f32, f16 or bf16", a.dtype),
    };
    if !matches!(a.format.as_str(), "gguf-lora" | "peft") {
        bail!("--format {}: use gguf-lora or peft", a.format);
    }
    let store = WeightStore::open(&a.model)?;
    let cfg = BaseConfig::from_store(&store)?;
    let adapter = Adapter::load(&a.adapter, &cfg).with_context(|| {
        format!(
            "reading adapter {} for base {}",
            a.adapter.display(),
            a.model.display()
        )
    })?;
    if let Some(d) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    match a.format.as_str() {
        "gguf-lora" => write_gguf_lora(&adapter, &cfg, &base_architecture(&store), dtype, &a.out)?,
        _ => write_peft(&adapter, dtype, &a.out)?,
    }
    println!(
        "wrote {} ({} projections, r {}, scale {})",
        a.out.display(),
        adapter.modules.len(),
        adapter.r,
        adapter.scale
    );
    Ok(())
}
