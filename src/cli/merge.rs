//! `qtune merge`: the adapter folded into the base weights.
use anyhow::{bail, Context, Result};
use qtune::export::{Adapter, BaseConfig};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::PathBuf;

/// Merge an adapter into its base: a GGUF (path ends in .gguf) or a safetensors directory.
#[derive(clap::Args)]
pub struct Args {
    /// The base model (Hugging Face directory or GGUF; or a Hub id: org/name[@rev], org/name:QUANT).
    #[arg(long)]
    pub model: PathBuf,
    /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// The adapter (PEFT directory or GGUF LoRA file).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output: a .gguf file, or a directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Type of the merged weights: f32, f16, bf16, q8_0, q4_0, q4_k, q6_k or nf4 (directory only).
    #[arg(long = "type")]
    pub qtype: Option<String>,
}

/// Runs `qtune merge`.
pub fn run(mut a: Args) -> Result<()> {
    // a Hub id becomes its cached snapshot (downloaded first if needed); a local path is kept
    a.model = qtune::store::hub::resolve_model(&a.model, a.gguf_file.as_deref())?;
    let qtype = match &a.qtype {
        None => None,
        Some(s) => match QType::parse(s) {
            Some(t) => Some(t),
            None => bail!("--type {s}: use f32, f16, bf16, q8_0, q4_0, q4_k, q6_k or nf4"),
        },
    };
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
