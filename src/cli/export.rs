//! `qtune export`: an adapter as llama.cpp's GGUF LoRA or as a PEFT directory.
use anyhow::{bail, Result};
use qtune::export::{base_architecture, write_gguf_lora, write_peft};
use qtune::quant::QType;
use std::path::PathBuf;

/// Export a trained adapter for llama.cpp (`--lora`) or PEFT.
#[derive(clap::Args)]
#[command(mut_args(super::model_help("The base model the adapter was trained on (Hugging Face directory or GGUF; or a Hub id: org/name[@rev], org/name:QUANT)")))]
pub struct Args {
    #[command(flatten)]
    pub base: super::BaseAndAdapter,
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
    let dtype = match QType::parse(&a.dtype) {
        Some(t @ (QType::F32 | QType::F16 | QType::BF16)) => t,
        _ => bail!("--dtype {}: use f32, f16 or bf16", a.dtype),
    };
    if !matches!(a.format.as_str(), "gguf-lora" | "peft") {
        bail!("--format {}: use gguf-lora or peft", a.format);
    }
    let (store, cfg, adapter) = a.base.open()?;
    super::create_parent(&a.out)?;
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
