//! `qtune train`: JSONL data and a base model to a PEFT LoRA adapter. With no arguments it trains
//! the embedded default (assets/) for about a minute.
use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use qtune::data::{load_examples, DataOptions, Tokenizer};
use qtune::store::WeightStore;
use qtune::train::checkpoint;
use qtune::train::config::TrainConfig;
use qtune::train::dpo::{Dpo, PairExample};
use qtune::train::trainer::{train, train_with, RunOptions, Sample};
use std::path::{Path, PathBuf};

/// The flags of `qtune train`: every setting of [`TrainConfig`] (each also a key of `--config`;
/// a flag given wins) and those that only the command takes.
#[derive(clap::Args, Debug)]
pub struct Flags {
    /// TOML file with any of these settings as keys (`batch-size = 4`); flags win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    // The settings.
    #[command(flatten)]
    pub settings: TrainConfig,
    /// With a Hub id: the file to take from a GGUF repository (instead of `org/name:QUANT`).
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// Also write the final adapter in another format beside the PEFT one: `gguf-lora` writes
    /// `<out>/adapter.gguf`, llama.cpp's LoRA file (f32 factors; Llama bases).
    #[arg(long)]
    pub export: Option<String>,
    /// Stop right after this step, without the final save (simulates a kill; for resume tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// `qtune train`'s command line: the flags, and which of them were given (only those override
/// the `--config` file and a resumed run's settings; the others hold their defaults).
#[derive(Debug)]
pub struct Args {
    /// Every flag, given or default.
    pub flags: Flags,
    /// The ids (kebab-case) of the flags given on the command line: for a setting, its key.
    pub given: Vec<String>,
}

impl clap::FromArgMatches for Args {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let given = m
            .ids()
            .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.as_str().replace('_', "-"))
            .collect();
        Ok(Args {
            flags: Flags::from_arg_matches(m)?,
            given,
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for Args {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        help_order(Flags::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        help_order(Flags::augment_args_for_update(cmd))
    }
}

/// `--help` lists the flags in [`TrainConfig`]'s order (that of the saved `qtune.toml`) but for
/// three, kept where they stood before the settings and the flags were one struct: `--gguf-file`
/// after `--model`, `--optim-8bit` after `--packing`, `--device` last.
fn help_order(cmd: clap::Command) -> clap::Command {
    // Every flag at twice its place, so that a moved one fits in after another.
    let cmd = cmd.mut_args(|a| {
        let o = a.get_display_order();
        a.display_order(2 * o)
    });
    let after = |id: &str| {
        let a = cmd.get_arguments().find(|a| a.get_id() == id);
        a.map_or(0, |a| a.get_display_order() + 1)
    };
    let (model, packing, last) = (after("model"), after("packing"), after("stop_after"));
    cmd.mut_arg("gguf_file", |a| a.display_order(model))
        .mut_arg("optim_8bit", |a| a.display_order(packing))
        .mut_arg("device", |a| a.display_order(last))
}

impl Args {
    /// The settings given as flags, as a TOML table to merge over the `--config` file's.
    fn flags_table(&self) -> Result<toml::Table> {
        let mut t = toml::Table::try_from(&self.flags.settings).context("collecting flags")?;
        t.retain(|k, _| self.given.iter().any(|g| g == k));
        Ok(t)
    }
}

/// The embedded default: model, data and settings shipped in assets/.
fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Resolves the config: defaults < embedded default (when no model and no data are named anywhere)
/// < --config file < flags.
pub fn resolve(args: &Args) -> Result<TrainConfig> {
    let file = match &args.flags.config {
        Some(p) => TrainConfig::table_from_file(p)?,
        None => toml::Table::new(),
    };
    let flags = args.flags_table()?;
    let named = |k: &str| file.contains_key(k) || flags.contains_key(k);
    // `--resume DIR`: the run's own settings, saved in its checkpoint; flags may change only what
    // does not move the trajectory, and the run goes on in its own directory.
    let resume = [&flags, &file]
        .iter()
        .find_map(|t| t.get("resume").and_then(|v| v.as_str()).map(PathBuf::from));
    if let Some(r) = &resume {
        let given = [file.clone(), flags.clone()];
        if let Some(cfg) = checkpoint::resume_config(r, &given, args.flags.config.as_deref())? {
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
    let mut cfg = TrainConfig::resolve(&layers, args.flags.config.as_deref())?;
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
            args.flags.gguf_file.as_deref(),
        )?);
    }
    // a bad --device fails before the data are tokenised
    qtune::nn::device::open(&cfg.device)?;
    super::on_pool(cfg.threads, || run_on_pool(cfg, args))?
}

/// The rest of `qtune train`, on a worker of the pool [`super::on_pool`] built for `--threads`.
fn run_on_pool(cfg: TrainConfig, args: Args) -> Result<()> {
    if let Some(f) = args.flags.export.as_deref().filter(|f| *f != "gguf-lora") {
        bail!(
            "--export {f}: the only extra format is gguf-lora (the PEFT adapter is always written)"
        );
    }
    if args.flags.export.is_some() && cfg.method == qtune::train::config::Method::Dora {
        bail!(
            "--export gguf-lora with --method dora: llama.cpp has no DoRA, only plain LoRA; train \
             without --export and fold the adapter into the base with `qtune merge` instead"
        );
    }
    if args.flags.export.is_some() && cfg.method.is_prompt() {
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
        stop_after: args.flags.stop_after,
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
        if args.flags.export.is_some() {
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
        stop_after: args.flags.stop_after,
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
        if args.flags.export.is_some() {
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
    use clap::{Args as _, FromArgMatches};

    /// The flags' table holds the flags given and nothing else (the others hold defaults), so
    /// that a flag not given does not hide the --config file's value.
    #[test]
    fn flags_table_holds_only_the_flags_given() {
        let cmd = Args::augment_args(clap::Command::new("train"));
        let m = cmd.get_matches_from(["train", "--model", "m.gguf", "--rank", "4"]);
        let args = Args::from_arg_matches(&m).unwrap();
        let t = args.flags_table().unwrap();
        let keys: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model", "rank"]);
    }
}
