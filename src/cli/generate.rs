//! `qtune generate`: text from the quantised base with an unmerged adapter (or a merged model).
use anyhow::{anyhow, bail, Context, Result};
use qtune::data::template::{ChatTemplate, Message};
use qtune::data::Tokenizer;
use qtune::export::{Adapter, BaseConfig};
use qtune::format::gguf;
use qtune::models::generate::{generate, Generator, Sampling};
use qtune::store::{SourceFormat, WeightStore};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// Generate text with a KV cache, streaming tokens to stdout.
#[derive(clap::Args)]
#[command(mut_args(super::model_help("The model: a Hugging Face directory or a GGUF file (quantised or merged; or a Hub id: org/name[@rev], org/name:QUANT)")))]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArg,
    /// An adapter applied unmerged: a LoRA (PEFT directory or GGUF LoRA file) or a PEFT
    /// prompt-learning directory (its virtual tokens or prefix in the KV cache).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text (encoded with the tokenizer's special tokens, as `qtune train` does).
    #[arg(long, conflicts_with_all = ["prompt_ids", "chat"])]
    pub prompt: Option<String>,
    /// Interactive chat: each line read from stdin is a user turn, rendered with the model's chat
    /// template (or `--template`); an empty line or end of input stops.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub chat: bool,
    /// Chat template for `--chat` when the model has none: a built-in name (chatml), a file or Jinja.
    #[arg(long)]
    pub template: Option<String>,
    /// The prompt as comma-separated token ids (no tokenizer needed).
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// tokenizer.json to use (default: the model directory's, the one beside a GGUF file, or the
    /// GGUF's embedded vocabulary).
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
    /// Exact f32 activations in Q4_0/Q8_0/Q4_K products (by default they are rounded to 8 bits, as
    /// llama.cpp does: several times faster, logits within ~1e-2). For parity checks.
    #[arg(long)]
    pub exact: bool,
}

/// The tokenizer: `--tokenizer` (a tokenizer.json, with the tokenizer_config.json beside it), else
/// the model's own (a directory's tokenizer.json or a GGUF's embedded vocabulary), as `qtune train`
/// reads it. `None` when the model has none (then only `--prompt-ids` works).
fn tokenizer(a: &Args) -> Result<Option<Tokenizer>> {
    if let Some(t) = &a.tokenizer {
        let dir = if t.is_dir() {
            t.clone()
        } else {
            t.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        return Ok(Some(Tokenizer::from_model_dir(&dir)?));
    }
    if a.model.path.is_dir() || a.prompt.is_some() || a.chat {
        // A GGUF without a usable vocabulary: say so, unless token ids are given.
        if !a.model.path.is_dir() {
            if let Some(dir) = a
                .model
                .path
                .parent()
                .filter(|d| d.join("tokenizer.json").exists())
            {
                return Ok(Some(Tokenizer::from_model_dir(dir)?));
            }
        }
        return Ok(Some(Tokenizer::for_model(&a.model.path)?));
    }
    Ok(None)
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
pub fn run(mut a: Args) -> Result<()> {
    a.model.resolve()?;
    let store = WeightStore::open(&a.model.path)?;
    let cfg = BaseConfig::from_store(&store)?;
    let prompt_dir = a.adapter.as_ref().filter(|p| {
        qtune::lora::prompt::peft_type_of(p)
            .is_some_and(|t| qtune::lora::prompt::is_prompt_type(&t))
    });
    let adapter = match &a.adapter {
        Some(_) if prompt_dir.is_some() => None,
        Some(p) => Some(
            Adapter::load(p, &cfg).with_context(|| format!("reading adapter {}", p.display()))?,
        ),
        None => None,
    };
    let tok = tokenizer(&a)?;
    let prompt: Vec<u32> = match (&a.prompt, &a.prompt_ids, &tok) {
        (Some(text), None, Some(t)) => t.encode(text, true)?,
        (None, Some(ids), _) => ids
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--prompt-ids: '{s}' is not a token id"))
            })
            .collect::<Result<_>>()?,
        (None, None, Some(_)) if a.chat => Vec::new(),
        _ => bail!("give --prompt TEXT, --prompt-ids IDS or --chat"),
    };
    if prompt.is_empty() && !a.chat {
        bail!("the prompt encodes to no tokens");
    }
    let quant = match &a.quant {
        None => None,
        Some(q) => Some(
            qtune::quant::QType::parse(q)
                .ok_or_else(|| anyhow!("--quant {q}: use q4_0, q8_0, q4_k, q6_k or nf4"))?,
        ),
    };
    let lopts = qtune::models::LlamaOptions {
        quant,
        ..Default::default()
    };
    let mut g = match prompt_dir {
        Some(dir) => Generator::with_prompt(&store, dir, lopts)
            .with_context(|| format!("reading adapter {}", dir.display()))?,
        None => Generator::with_options(&store, adapter.as_ref(), lopts)?,
    };
    g.set_int8_activations(!a.exact);
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
    if a.chat {
        let tok = tok.as_ref().expect("--chat has a tokenizer");
        return chat(&a, &g, tok, &s, &eos);
    }
    let r = run_one(&g, tok.as_ref(), &prompt, &a, &s, &eos)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_tokens": prompt,
                "tokens": r.0.tokens,
                "text": r.1,
                "tokens_per_s": r.0.tokens_per_s,
            })
        );
    }
    Ok(())
}

/// Generates from `prompt`, streaming text (or ids without a tokenizer); returns the result and
/// its text.
fn run_one(
    g: &Generator,
    tok: Option<&Tokenizer>,
    prompt: &[u32],
    a: &Args,
    s: &Sampling,
    eos: &[u32],
) -> Result<(qtune::models::generate::Generated, String)> {
    let mut shown = String::new();
    let mut ids = Vec::new();
    let mut stdout = std::io::stdout();
    let r = generate(g, prompt, a.max_tokens, s, eos, |id| {
        ids.push(id);
        if let Some(t) = tok {
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
    let text = match tok {
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
    Ok((r, text))
}

/// The interactive loop of `--chat`: the whole conversation is re-rendered with the chat template
/// each turn (encoded without extra special tokens: the template writes them) and answered.
fn chat(a: &Args, g: &Generator, tok: &Tokenizer, s: &Sampling, eos: &[u32]) -> Result<()> {
    let source = match &a.template {
        Some(t) => match ChatTemplate::builtin(t) {
            Some(b) => b.to_string(),
            None if Path::new(t).is_file() => std::fs::read_to_string(t)
                .with_context(|| format!("--template {t}: cannot read it"))?,
            None => t.clone(),
        },
        None => tok.chat_template().map(str::to_string).ok_or_else(|| {
            anyhow!(
                "{} has no chat template; pass --template chatml (or a Jinja file)",
                a.model.path.display()
            )
        })?,
    };
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let tpl = ChatTemplate::new(&source, &name(tok.bos_id()), &name(tok.eos_id()))?;
    let mut messages: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(Message {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let text = tpl.render(&messages, true)?;
        let ids = tok.encode(&text, false)?;
        let (_, reply) = run_one(g, Some(tok), &ids, a, s, eos)?;
        let reply = match tok.eos_id().and_then(|e| tok.id_to_token(e)) {
            Some(e) => reply.trim_end_matches(e.as_str()).to_string(),
            None => reply,
        };
        messages.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
}
