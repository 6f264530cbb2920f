//! `qtune train`: JSONL data and a base model to a PEFT LoRA adapter. With no arguments it trains
//! the embedded default (assets/) for about a minute.
use anyhow::{bail, Context, Result};
use qtune::data::{load_examples, DataOptions, Tokenizer};
use qtune::store::WeightStore;
use qtune::train::checkpoint;
use qtune::train::config::TrainConfig;
use qtune::train::dpo::{Dpo, PairExample};
use qtune::train::trainer::{train, train_with, RunOptions, Sample};
use serde::Serialize;
use std::path::{Path, PathBuf};

fn is_false(b: &bool) -> bool {
    !*b
}

/// Flags of `qtune train`; each is also a key of `--config` (same name), and a flag given wins.
/// (Serialised into a TOML table to merge over the file's: toml leaves out the `None` fields, so
/// only the flags given are there; a `false` switch is skipped by `is_false`.)
#[derive(clap::Args, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with any of these settings as keys (`batch-size = 4`); flags win over it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Base model: Hugging Face directory, .safetensors or .gguf, or a Hub id (org/name[@rev],
    /// org/name:QUANT for a GGUF repository) (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
    #[arg(long)]
    #[serde(skip)]
    pub gguf_file: Option<String>,
    /// Training data (JSONL: text, prompt/completion, messages or alpaca lines).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation data (JSONL), for eval loss and perplexity.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory (metrics.jsonl, checkpoint-N/, adapter/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Quantise a float base at load: nf4, q4_0, q8_0, q4_k, q6_k or none [default: none].
    #[arg(long)]
    pub quant: Option<String>,
    /// What trains: lora; dora (LoRA plus a trained magnitude per output row, PEFT's use_dora;
    /// takes the LoRA flags); prompt-tuning, p-tuning or prefix-tuning (PEFT's prompt-learning
    /// methods, saving PEFT's prompt_embeddings) [default: lora].
    #[arg(long, value_enum)]
    pub method: Option<qtune::train::config::Method>,
    /// Virtual tokens of prompt-tuning, p-tuning and prefix-tuning [default: 20].
    #[arg(long)]
    pub num_virtual_tokens: Option<usize>,
    /// Width of P-tuning's MLP encoder, and of prefix tuning's projection.
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: the prefix is the output of an MLP (PEFT's prefix_projection).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub prefix_projection: bool,
    /// Prompt tuning: start the virtual tokens from this text's token embeddings (PEFT's TEXT
    /// init) instead of N(0, 1).
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default: 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout [default: 0].
    #[arg(long)]
    pub dropout: Option<f32>,
    /// LoRA targets, comma-separated PEFT names (q_proj,v_proj) or all-linear [default: all-linear].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Warmup steps [default: 0].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Optimizer steps (wins over --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the data [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Global gradient-norm clip, 0 = off [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Tokens per sequence; longer examples are truncated [default: 512].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Seed of LoRA init, dropout and data order [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Shuffle examples each epoch: true or false [default: true].
    #[arg(long)]
    pub shuffle: Option<bool>,
    /// Evaluate every N steps (and at start and end) [default: 0: start and end only].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps (and at the end) [default: 0: end only].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Worker threads, 0 = all cores [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Refuse a run predicted to need more (8G, 512M, bytes).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// Compute and adapter dtype: auto (bf16 on a GPU, and on a CPU with AVX-512 BF16 for models
    /// of hidden size 1024 or more; else f32), bf16 or f32 [default: auto].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Start from this PEFT adapter directory (its rank, alpha and targets are used).
    #[arg(long)]
    pub adapter_init: Option<PathBuf>,
    /// Continue from a checkpoint directory (or an --out directory: its newest checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Also put the loss on prompt / user tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub train_on_prompt: bool,
    /// Pack short examples together into --seq-len sequences.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub packing: bool,
    /// Keep AdamW's moments 8-bit, blockwise as bitsandbytes' AdamW8bit (~2 bytes per LoRA
    /// parameter instead of 8; tensors under 4096 elements stay 32-bit).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub optim_8bit: bool,
    /// Chat template for `messages` data: a built-in name, a Jinja file or Jinja text.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// What to learn: sft (next-token loss on examples) or dpo (preference pairs
    /// {"prompt","chosen","rejected"}) [default: sft].
    #[arg(long)]
    pub objective: Option<String>,
    /// DPO's β: how far the policy may move from the reference [default: 0.1].
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO's reference: the base plus this frozen PEFT adapter (e.g. the SFT adapter the DPO run
    /// starts from with --adapter-init) [default: the base alone].
    #[arg(long)]
    pub ref_adapter: Option<PathBuf>,
    /// DPO: compute every pair's reference log-probs once before training (kept in the run
    /// directory, reused on resume), then run the policy only.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub precompute_ref: bool,
    /// Also write the final adapter in another format beside the PEFT one: `gguf-lora` writes
    /// `<out>/adapter.gguf`, llama.cpp's LoRA file (f32 factors; Llama bases).
    #[arg(long)]
    #[serde(skip)]
    pub export: Option<String>,
    /// Stop right after this step, without the final save (simulates a kill; for resume tests).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// cpu, cuda or cuda:N (a build with `--features cuda`; compute capability 8.0+)
    /// [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
}

/// The embedded default: model, data and settings shipped in assets/.
fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Resolves the config: defaults < embedded default (when no model and no data are named anywhere)
/// < --config file < flags.
pub fn resolve(args: &Args) -> Result<TrainConfig> {
    let file = match &args.config {
        Some(p) => TrainConfig::table_from_file(p)?,
        None => toml::Table::new(),
    };
    let flags = toml::Table::try_from(args).context("collecting flags")?;
    let named = |k: &str| file.contains_key(k) || flags.contains_key(k);
    // `--resume DIR`: the run's own settings, saved in its checkpoint; flags may change only what
    // does not move the trajectory, and the run goes on in its own directory.
    let resume = [&flags, &file]
        .iter()
        .find_map(|t| t.get("resume").and_then(|v| v.as_str()).map(PathBuf::from));
    if let Some(r) = &resume {
        let given = [file.clone(), flags.clone()];
        if let Some(cfg) = checkpoint::resume_config(r, &given, args.config.as_deref())? {
            return Ok(cfg);
        }
    }
    let mut layers = Vec::new();
    if !named("model") && !named("data") {
        let p = assets().join("default.toml");
        let mut t = TrainConfig::table_from_file(&p).with_context(|| {
            "the embedded default (assets/) is missing; pass --model and --data"
        })?;
        // Paths in the embedded config are relative to assets/.
        for k in ["model", "data", "eval-data"] {
            if let Some(toml::Value::String(s)) = t.get(k) {
                let abs = assets().join(s).display().to_string();
                t.insert(k.into(), toml::Value::String(abs));
            }
        }
        layers.push(t);
    }
    let out_named = named("out");
    layers.push(file);
    layers.push(flags);
    let mut cfg = TrainConfig::resolve(&layers, args.config.as_deref())?;
    if let Some(r) = &resume {
        // A checkpoint from before settings were saved in it: every setting was given again.
        let given_out = out_named.then_some(cfg.out.as_path());
        cfg.out = checkpoint::resume_out(r, given_out)?;
    }
    Ok(cfg)
}

/// The tokenizer of a model: its directory's tokenizer.json, or the vocabulary a GGUF embeds.
pub(crate) fn tokenizer(model: &Path) -> Result<Tokenizer> {
    if !model.exists() {
        bail!(
            "{}: no such file or directory (--model takes a GGUF file or a Hugging Face model \
             directory)",
            model.display()
        );
    }
    if model.is_dir() {
        return Ok(Tokenizer::from_model_dir(model)?);
    }
    if model.extension().is_some_and(|e| e == "gguf") {
        let store = WeightStore::open(model)?;
        return Ok(Tokenizer::from_gguf(&store)?);
    }
    match model.parent() {
        Some(d) => Ok(Tokenizer::from_model_dir(d)?),
        None => bail!("{}: no tokenizer found beside the model", model.display()),
    }
}

fn load(path: &Path, tok: &Tokenizer, cfg: &TrainConfig, what: &str) -> Result<Vec<Sample>> {
    let opts = DataOptions {
        train_on_prompt: cfg.train_on_prompt,
        seq_len: cfg.seq_len,
        packing: cfg.packing,
        template: cfg.chat_template.clone(),
    };
    load_samples(path, tok, &opts, what)
}

/// Tokenised samples of a JSONL file, with a one-line summary on stderr.
pub(crate) fn load_samples(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
    what: &str,
) -> Result<Vec<Sample>> {
    let (ex, st) = load_examples(path, tok, opts)
        .with_context(|| format!("loading {what} data {}", path.display()))?;
    eprintln!(
        "{what} data {}: {} examples ({}), {} sequences, {} tokens, {} trained on; {} truncated to \
         --seq-len {}, {} dropped (no target left)",
        path.display(),
        st.n,
        st.format.describe(),
        st.sequences,
        st.tokens,
        st.targets,
        st.truncated,
        opts.seq_len,
        st.dropped
    );
    Ok(ex
        .into_iter()
        .map(|e| Sample {
            ids: e.ids,
            labels: e.labels,
        })
        .collect())
}

/// Runs `qtune train`.
pub fn run(args: Args) -> Result<()> {
    let mut cfg = resolve(&args)?;
    // a Hub id becomes its cached snapshot (downloaded first if needed); a local path is kept
    if let Some(m) = &cfg.model {
        cfg.model = Some(qtune::store::hub::resolve_model(
            m,
            args.gguf_file.as_deref(),
        )?);
    }
    // a bad --device fails before the data are tokenised
    qtune::nn::device::open(&cfg.device)?;
    if cfg.threads > 0 {
        // candle's CPU kernels and ours share rayon's global pool.
        std::env::set_var("RAYON_NUM_THREADS", cfg.threads.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build_global()
            .context("setting --threads")?;
    }
    if let Some(f) = args.export.as_deref().filter(|f| *f != "gguf-lora") {
        bail!(
            "--export {f}: the only extra format is gguf-lora (the PEFT adapter is always written)"
        );
    }
    if args.export.is_some() && cfg.method == qtune::train::config::Method::Dora {
        bail!(
            "--export gguf-lora with --method dora: llama.cpp has no DoRA, only plain LoRA; train \
             without --export and fold the adapter into the base with `qtune merge` instead"
        );
    }
    if args.export.is_some() && cfg.method.is_prompt() {
        bail!(
            "{}",
            qtune::export::prompt_refusal("--export gguf-lora", cfg.method_name())
        );
    }
    let model = cfg.model.clone().context("--model: no base model given")?;
    let data = cfg
        .data
        .clone()
        .context("--data: no training JSONL given")?;
    let tok = tokenizer(&model)?;
    if cfg.objective == "dpo" {
        return run_dpo(&cfg, &args, &data, &tok);
    }
    let train_data = load(&data, &tok, &cfg, "training")?;
    let eval_data = match &cfg.eval_data {
        Some(p) => load(p, &tok, &cfg, "eval")?,
        None => Vec::new(),
    };
    let opts = RunOptions {
        quiet: false,
        stop_after: args.stop_after,
    };
    // prompts for the before/after demo: the eval data's (held out), else the training data's
    let held_out = !eval_data.is_empty();
    let probes = super::demo::probes(if held_out { &eval_data } else { &train_data }, &tok);
    let rep = train(&cfg, train_data, eval_data, &opts)?;
    if let (Some(first), Some(last)) = (rep.evals.first(), rep.evals.last()) {
        println!(
            "eval loss {:.4} (step {}) -> {:.4} (step {})",
            first.1, first.0, last.1, last.0
        );
    }
    if let (Some(l), true) = (rep.losses.last(), rep.adapter_dir.is_dir()) {
        println!(
            "final train loss {l:.4}; adapter in {}",
            rep.adapter_dir.display()
        );
        if cfg.method.is_prompt() {
            println!(
                "try it: qtune generate --model {} --adapter {} --prompt \"...\"",
                model.display(),
                rep.adapter_dir.display()
            );
            return Ok(());
        }
        let store = qtune::store::WeightStore::open(&model)?;
        let base = qtune::export::BaseConfig::from_store(&store)?;
        if args.export.is_some() {
            export_gguf_lora(&store, &rep.adapter_dir)?;
        }
        // Greedy answers without and with the adapter (the same code as `qtune generate`).
        let adapter = qtune::export::Adapter::load(&rep.adapter_dir, &base)?;
        super::demo::show(&store, &adapter, &tok, &probes, held_out)?;
        if let Some(p) = probes.first() {
            println!(
                "try it: qtune generate --model {} --adapter {} --prompt {:?}",
                model.display(),
                rep.adapter_dir.display(),
                p.text()
            );
        }
    }
    Ok(())
}

/// Tokenised preference pairs of a JSONL file, with a one-line summary on stderr.
fn load_pairs(
    path: &Path,
    tok: &Tokenizer,
    cfg: &TrainConfig,
    what: &str,
) -> Result<Vec<PairExample>> {
    let opts = DataOptions {
        seq_len: cfg.seq_len,
        template: cfg.chat_template.clone(),
        ..DataOptions::default()
    };
    let (pairs, st) = qtune::data::load_pairs(path, tok, &opts)
        .with_context(|| format!("loading {what} pairs {}", path.display()))?;
    eprintln!(
        "{what} pairs {}: {} pairs ({:?}), {} tokens; {} cut to --seq-len {}",
        path.display(),
        st.n,
        st.format,
        st.tokens,
        st.truncated,
        cfg.seq_len
    );
    Ok(pairs
        .into_iter()
        .map(|pair| PairExample {
            pair,
            reference: None,
        })
        .collect())
}

/// `qtune train --objective dpo`: preference pairs against the base (or `--ref-adapter`) as the
/// reference.
fn run_dpo(cfg: &TrainConfig, args: &Args, data: &Path, tok: &Tokenizer) -> Result<()> {
    let train_data = load_pairs(data, tok, cfg, "training")?;
    let eval_data = match &cfg.eval_data {
        Some(p) => load_pairs(p, tok, cfg, "eval")?,
        None => Vec::new(),
    };
    let reference_adapter = match &cfg.ref_adapter {
        Some(dir) => Some(qtune::lora::adapter::load_peft(dir)?.1),
        None => None,
    };
    let dpo = Dpo {
        beta: cfg.beta,
        reference_adapter,
        precompute: cfg.precompute_ref,
    };
    let opts = RunOptions {
        quiet: false,
        stop_after: args.stop_after,
    };
    let rep = train_with(&dpo, cfg, train_data, eval_data, &opts)?;
    if let (Some(first), Some(last)) = (rep.evals.first(), rep.evals.last()) {
        println!(
            "eval DPO loss {:.4} (step {}) -> {:.4} (step {})",
            first.1, first.0, last.1, last.0
        );
    }
    if let Some(l) = rep.losses.last() {
        println!(
            "final DPO loss {l:.4}; adapter in {}",
            rep.adapter_dir.display()
        );
        if args.export.is_some() {
            let model = cfg
                .model
                .as_deref()
                .context("--model: no base model given")?;
            export_gguf_lora(&WeightStore::open(model)?, &rep.adapter_dir)?;
        }
    }
    Ok(())
}

/// `--export gguf-lora`: `<out>/adapter.gguf`, llama.cpp's LoRA file, beside the PEFT adapter.
fn export_gguf_lora(store: &WeightStore, adapter_dir: &Path) -> Result<()> {
    let base = qtune::export::BaseConfig::from_store(store)?;
    let adapter = qtune::export::Adapter::load(adapter_dir, &base)?;
    let out = adapter_dir
        .parent()
        .unwrap_or(Path::new("."))
        .join("adapter.gguf");
    let arch = qtune::export::base_architecture(store);
    qtune::export::write_gguf_lora(&adapter, &base, &arch, qtune::quant::QType::F32, &out)?;
    println!("llama.cpp LoRA written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;

    /// The flags' table holds the flags given and nothing else (toml leaves out `None` fields), so
    /// that a flag not given does not hide the --config file's value.
    #[test]
    fn flags_table_holds_only_the_flags_given() {
        let args = Args {
            model: Some("m.gguf".into()),
            rank: Some(4),
            ..Default::default()
        };
        let t = toml::Table::try_from(&args).unwrap();
        let keys: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model", "rank"]);
    }
}
