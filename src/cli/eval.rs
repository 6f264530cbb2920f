//! `qtune eval`: mean loss and perplexity of a model (with or without an adapter) on JSONL data,
//! tokenised and masked exactly as `qtune train` does, so a merged or requantised model can be
//! compared with the adapter it came from.
use super::train::{load_samples, tokenizer};
use anyhow::{bail, Result};
use qtune::data::DataOptions;
use std::path::PathBuf;

/// Evaluate a model on JSONL data.
#[derive(clap::Args)]
#[command(mut_args(super::model_help("The model (Hugging Face directory, bitsandbytes NF4 directory or GGUF; or a Hub id: org/name[@rev], org/name:QUANT)")))]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArg,
    /// A PEFT adapter directory applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL data (any format `qtune train` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Longest sequence; longer examples are truncated as in training.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Sequences per forward pass (does not change the result).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Compute dtype: f32, bf16 or auto (as `qtune train` resolves it, by CPU and model width).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Put the loss on prompt tokens too (as `qtune train --train-on-prompt`).
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Chat template for `messages` lines (a built-in name, a Jinja file or text).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// sft (mean next-token loss) or dpo (preference pairs: DPO loss and reward accuracy against
    /// the base, or --ref-adapter, as the reference).
    #[arg(long, default_value = "sft")]
    pub objective: String,
    /// DPO's β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// DPO's reference adapter (default: the base alone).
    #[arg(long)]
    pub ref_adapter: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `qtune eval`.
pub fn run(mut a: Args) -> Result<()> {
    a.model.resolve()?;
    // `auto` as `qtune train` resolves it: by CPU and the model's width.
    let store = qtune::store::WeightStore::open(&a.model.path)?;
    let hidden = qtune::models::spec_of(&store)?.hidden;
    drop(store);
    let dtype = qtune::nn::device::compute_dtype(&a.dtype, "cpu", Some(hidden))?;
    let tok = tokenizer(&a.model.path)?;
    match a.objective.as_str() {
        "sft" => {}
        "dpo" => return eval_dpo(&a, &tok, dtype),
        o => bail!("--objective {o}: use sft or dpo"),
    }
    let opts = DataOptions {
        train_on_prompt: a.train_on_prompt,
        seq_len: a.seq_len,
        packing: false,
        template: a.chat_template.clone(),
    };
    let samples = load_samples(&a.data, &tok, &opts, "eval")?;
    let r = qtune::train::eval::evaluate(
        &a.model.path,
        a.adapter.as_deref(),
        &samples,
        a.batch_size,
        dtype,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens})
        );
    } else {
        println!(
            "eval loss {:.4}, perplexity {:.3} over {} target tokens",
            r.loss, r.perplexity, r.tokens
        );
    }
    Ok(())
}

/// `qtune eval --objective dpo`: DPO loss, rewards and reward accuracy on held-out pairs.
fn eval_dpo(a: &Args, tok: &qtune::data::Tokenizer, dtype: candle_core::DType) -> Result<()> {
    use qtune::train::objective::Objective;
    let opts = DataOptions {
        seq_len: a.seq_len,
        template: a.chat_template.clone(),
        ..DataOptions::default()
    };
    let (pairs, st) = qtune::data::load_pairs(&a.data, tok, &opts)?;
    let pairs: Vec<_> = pairs
        .into_iter()
        .map(|pair| qtune::train::dpo::PairExample {
            pair,
            reference: None,
        })
        .collect();
    let model = qtune::train::eval::load_for_eval(&a.model.path, a.adapter.as_deref(), dtype)?;
    let dpo = qtune::train::dpo::Dpo {
        beta: a.beta,
        reference_adapter: match &a.ref_adapter {
            Some(d) => Some(qtune::lora::adapter::load_peft(d)?.1),
            None => None,
        },
        precompute: false,
    };
    let m = dpo.evaluate(model.as_ref(), &pairs, a.batch_size)?;
    if a.json {
        let mut v = serde_json::json!({"pairs": st.n});
        for (k, x) in &m {
            v[k.trim_start_matches("eval_")] = serde_json::json!(x);
        }
        println!("{v}");
    } else {
        let get = |k: &str| m.iter().find(|(n, _)| *n == k).map_or(f64::NAN, |p| p.1);
        println!(
            "DPO loss {:.4}, reward accuracy {:.3}, reward margin {:.4} over {} pairs",
            get("eval_loss"),
            get("eval_rewards_accuracy"),
            get("eval_rewards_margin"),
            st.n
        );
    }
    Ok(())
}
