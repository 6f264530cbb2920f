//! `qtune generate`: text from the quantised base with an unmerged adapter (or a merged model).
use anyhow::{anyhow, bail, Context, Result};
use qtune::export::Adapter;
use qtune::format::gguf;
use qtune::generate::{generate, Generator, Sampling};
use qtune::models::LlamaConfig;
use qtune::store::{SourceFormat, WeightStore};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Generate text with a KV cache, streaming tokens to stdout.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a Hugging Face directory or a GGUF file (quantised or merged).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter applied unmerged (PEFT directory or GGUF LoRA file).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text (encoded with the tokenizer's special tokens, as `qtune train` does).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids (no tokenizer needed).
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// tokenizer.json to use (default: the model directory's, or the one beside a GGUF file).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// New tokens at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End with one JSON line: prompt_tokens, tokens, text, tokens_per_s.
    #[arg(long)]
    pub json: bool,
    /// Quantise a float base at load: q4_0, q8_0, q4_k, q6_k or nf4 (stored quantised types are kept).
    #[arg(long)]
    pub quant: Option<String>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

/// The tokenizer, behind two functions so `crate::data::Tokenizer` can replace it.
struct Tok(tokenizers::Tokenizer);

impl Tok {
    fn open(p: &Path) -> Result<Tok> {
        tokenizers::Tokenizer::from_file(p)
            .map(Tok)
            .map_err(|e| anyhow!("{}: cannot read the tokenizer: {e}", p.display()))
    }
    fn encode(&self, s: &str) -> Result<Vec<u32>> {
        Ok(self
            .0
            .encode(s, true)
            .map_err(|e| anyhow!("encoding the prompt: {e}"))?
            .get_ids()
            .to_vec())
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.0
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding: {e}"))
    }
}

fn tokenizer_path(a: &Args) -> Option<PathBuf> {
    if let Some(t) = &a.tokenizer {
        return Some(t.clone());
    }
    let dir = if a.model.is_dir() {
        a.model.clone()
    } else {
        a.model.parent()?.to_path_buf()
    };
    Some(dir.join("tokenizer.json")).filter(|p| p.exists())
}

/// End-of-sequence ids: GGUF metadata, or generation_config.json / config.json.
fn eos_ids(store: &WeightStore) -> Vec<u32> {
    if store.format == SourceFormat::Gguf {
        return gguf::find(&store.gguf_metadata, "tokenizer.ggml.eos_token_id")
            .and_then(gguf::Value::as_u64)
            .map(|x| vec![x as u32])
            .unwrap_or_default();
    }
    let dir = if store.path.is_dir() {
        store.path.clone()
    } else {
        store
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    for f in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match &v["eos_token_id"] {
            serde_json::Value::Number(n) => {
                return n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            serde_json::Value::Array(a) => {
                return a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            }
            _ => {}
        }
    }
    Vec::new()
}

/// Runs `qtune generate`.
pub fn run(a: Args) -> Result<()> {
    let store = WeightStore::open(&a.model)?;
    let cfg = LlamaConfig::from_store(&store)?;
    let adapter = match &a.adapter {
        Some(p) => Some(
            Adapter::load(p, &cfg).with_context(|| format!("reading adapter {}", p.display()))?,
        ),
        None => None,
    };
    let tok = match tokenizer_path(&a) {
        Some(p) => Some(Tok::open(&p)?),
        None => None,
    };
    let prompt: Vec<u32> = match (&a.prompt, &a.prompt_ids, &tok) {
        (Some(text), None, Some(t)) => t.encode(text)?,
        (Some(_), None, None) => bail!(
            "no tokenizer.json beside {}; pass --tokenizer PATH or --prompt-ids",
            a.model.display()
        ),
        (None, Some(ids), _) => ids
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--prompt-ids: '{s}' is not a token id"))
            })
            .collect::<Result<_>>()?,
        _ => bail!("give --prompt TEXT or --prompt-ids IDS"),
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let quant = match &a.quant {
        None => None,
        Some(q) => Some(
            qtune::quant::QType::parse(q)
                .ok_or_else(|| anyhow!("--quant {q}: use q4_0, q8_0, q4_k, q6_k or nf4"))?,
        ),
    };
    let g = Generator::with_options(
        &store,
        adapter.as_ref(),
        qtune::models::LlamaOptions {
            quant,
            ..Default::default()
        },
    )?;
    let eos = if a.ignore_eos {
        vec![]
    } else {
        eos_ids(&store)
    };
    let s = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut shown = String::new();
    let mut ids = Vec::new();
    let mut stdout = std::io::stdout();
    let r = generate(&g, &prompt, a.max_tokens, &s, &eos, |id| {
        ids.push(id);
        if let Some(t) = &tok {
            // Decode the whole tail each time: a token can complete a multi-byte character.
            if let Ok(text) = t.decode(&ids) {
                if let Some(new) = text.strip_prefix(shown.as_str()) {
                    let _ = write!(stdout, "{new}");
                    let _ = stdout.flush();
                    shown = text;
                }
            }
        } else {
            let _ = write!(stdout, "{id} ");
            let _ = stdout.flush();
        }
    })?;
    let text = match &tok {
        Some(t) => t.decode(&r.tokens)?,
        None => String::new(),
    };
    println!();
    eprintln!(
        "{} tokens, prompt {} tokens in {:.2} s, decode {:.2} tokens/s",
        r.tokens.len(),
        prompt.len(),
        r.prompt_s,
        r.tokens_per_s
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_tokens": prompt,
                "tokens": r.tokens,
                "text": text,
                "tokens_per_s": r.tokens_per_s,
            })
        );
    }
    Ok(())
}
