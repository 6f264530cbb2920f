//! `tokenizer.ggml.*` keys from a byte-level BPE `tokenizer.json`.
use super::hf::cfg_u64;
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use std::path::{Path, PathBuf};

/// `tokenizer.ggml.*` keys for a byte-level BPE `tokenizer.json` (llama.cpp model "gpt2").
pub(super) fn bpe_tokenizer(
    dir: &Path,
    cfg: &serde_json::Value,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let (path, tj) = read_bpe_json(dir)?;
    let model = &tj["model"];
    let Some(vocab) = model.get("vocab").and_then(|v| v.as_object()) else {
        return Err(Error::Json {
            path,
            msg: "model.vocab is missing".into(),
        });
    };
    let (tokens, types) = token_table(&path, vocab, added_tokens(&tj), vocab_size)?;
    let merges = merges(&path, model)?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("gpt-2".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(8, tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(5, types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(8, merges)),
    ];
    for (k, g) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(id) = cfg_u64(cfg, k) {
            out.push((g.to_string(), Value::U32(id as u32)));
        }
    }
    Ok(out)
}

/// `dir/tokenizer.json` parsed, refused unless its model is a byte-level BPE.
fn read_bpe_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        let what = if dir.join("tokenizer.model").exists() {
            "a SentencePiece tokenizer.model (no tokenizer.json)"
        } else {
            "no tokenizer.json"
        };
        return Err(Error::Invalid(format!(
            "{}: {what}: qtune writes only byte-level BPE tokenizers (tokenizer.json, model type BPE) into GGUF",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tj: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let model = &tj["model"];
    let kind = model
        .get("type")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    if kind != "BPE" {
        return Err(Error::Invalid(format!(
            "{}: tokenizer model type '{kind}' is not supported; qtune writes only byte-level BPE tokenizers",
            path.display()
        )));
    }
    // SentencePiece-converted BPE (Llama 1/2) needs llama.cpp's "llama" tokenizer with scores.
    if model.get("byte_fallback").and_then(|v| v.as_bool()) == Some(true) {
        return Err(Error::Invalid(format!(
            "{}: SentencePiece-style BPE tokenizer (byte_fallback) is not supported; qtune writes only \
             byte-level (GPT-2 style) BPE tokenizers",
            path.display()
        )));
    }
    Ok((path, tj))
}

/// `added_tokens` as (id, content, special).
fn added_tokens(tj: &serde_json::Value) -> Vec<(usize, String, bool)> {
    let mut added = Vec::new();
    if let Some(a) = tj.get("added_tokens").and_then(|v| v.as_array()) {
        for t in a {
            if let (Some(id), Some(c)) = (
                t.get("id").and_then(|v| v.as_u64()),
                t.get("content").and_then(|v| v.as_str()),
            ) {
                added.push((
                    id as usize,
                    c.to_string(),
                    t.get("special").and_then(|v| v.as_bool()).unwrap_or(false),
                ));
            }
        }
    }
    added
}

/// Every id's token string and llama.cpp token type, `vocab_size` of them (config.json's; an id
/// past it is an error).
fn token_table(
    path: &Path,
    vocab: &serde_json::Map<String, serde_json::Value>,
    added: Vec<(usize, String, bool)>,
    vocab_size: usize,
) -> Result<(Vec<Value>, Vec<i32>)> {
    let max_id = vocab
        .values()
        .filter_map(|v| v.as_u64())
        .map(|v| v as usize)
        .chain(added.iter().map(|a| a.0))
        .max();
    let n = vocab_size.max(max_id.map_or(0, |m| m + 1));
    if n > vocab_size {
        return Err(Error::Json {
            path: path.to_path_buf(),
            msg: format!(
                "tokenizer has ids up to {} but config.json vocab_size is {vocab_size}",
                n - 1
            ),
        });
    }
    // Ids the tokenizer does not define are padding placeholders, as llama.cpp's converter writes.
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER_DEFINED: i32 = 4;
    const UNUSED: i32 = 5;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(tok.clone());
            types[id as usize] = NORMAL;
        }
    }
    for (id, c, special) in added {
        tokens[id] = Some(c);
        types[id] = if special { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    Ok((tokens, types))
}

/// The merges as "a b" strings: from "a b" strings (tokenizers < 0.20.4) or ["a", "b"] pairs
/// (newer).
fn merges(path: &Path, model: &serde_json::Value) -> Result<Vec<Value>> {
    let mut merges = Vec::new();
    for m in model
        .get("merges")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let s = match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(p) if p.len() == 2 => {
                format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )
            }
            _ => {
                return Err(Error::Json {
                    path: path.to_path_buf(),
                    msg: format!("unreadable merge {m}"),
                })
            }
        };
        merges.push(Value::String(s));
    }
    Ok(merges)
}
