//! `qtune merge`: the adapter folded into the base weights.
use anyhow::{bail, Result};
use qtune::quant::QType;
use std::path::PathBuf;

/// Merge an adapter into its base: a GGUF (path ends in .gguf) or a safetensors directory.
#[derive(clap::Args)]
#[command(mut_args(super::model_help(
    "The base model (Hugging Face directory or GGUF; or a Hub id: org/name[@rev], org/name:QUANT)"
)))]
pub struct Args {
    #[command(flatten)]
    pub base: super::BaseAndAdapter,
    /// Output: a .gguf file, or a directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Type of the merged weights: f32, f16, bf16, q8_0, q4_0, q4_k, q6_k or nf4 (directory only).
    #[arg(long = "type")]
    pub qtype: Option<String>,
}

/// Runs `qtune merge`.
pub fn run(mut a: Args) -> Result<()> {
    let qtype = match &a.qtype {
        None => None,
        Some(s) => match QType::parse(s) {
            Some(t) => Some(t),
            None => bail!("--type {s}: use f32, f16, bf16, q8_0, q4_0, q4_k, q6_k or nf4"),
        },
    };
    let (store, cfg, adapter) = a.base.open()?;
    super::create_parent(&a.out)?;
    let t0 = std::time::Instant::now();
    let r = qtune::export::merge::merge(&store, &cfg, &adapter, &a.out, qtype)?;
    println!(
        "merged {} projections into {} ({} tensors, {} bytes) in {:.1} s",
        r.merged,
        a.out.display(),
        r.tensors,
        r.bytes,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
