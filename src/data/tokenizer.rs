//! Tokenizers: a Hugging Face `tokenizer.json` (run by the `tokenizers` crate, as transformers does),
//! or the vocabulary a GGUF embeds, tokenised exactly as llama.cpp does (tokenizer/vocab.rs):
//! byte-level BPE ("gpt2") with every pre-tokenizer llama.cpp knows, SentencePiece ("llama") and
//! WordPiece ("bert").
mod bpe;
mod pre;
mod spm;
mod vocab;
mod wpm;

use super::guard;
use crate::error::{Error, Result};
use crate::format::gguf::{self, Value};
use crate::store::WeightStore;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use vocab::GgufVocab;

/// A text <-> token-id mapping with its special tokens and chat template.
pub struct Tokenizer {
    inner: Inner,
    /// Where it came from, for error messages.
    source: PathBuf,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    /// GGUF only: add BOS / EOS ourselves when asked for special tokens (tokenizer.json has a
    /// post-processor for that).
    add_bos: bool,
    add_eos: bool,
    /// Let tokenizer.json's post-processor add special tokens (false where transformers replaces it).
    post_processor: bool,
    chat_template: Option<String>,
}

/// Tokenizer classes whose transformers implementation rebuilds the post-processor from
/// `add_bos_token` / `add_eos_token` in tokenizer_config.json, ignoring tokenizer.json's.
const BOS_EOS_CLASSES: &[&str] = &[
    "LlamaTokenizerFast",
    "LlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "GemmaTokenizerFast",
    "GemmaTokenizer",
];

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Gguf(Box<GgufVocab>),
}

fn tok_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        msg: format!("{what}: {e}"),
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_str(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s)
        .map(Some)
        .map_err(|e| tok_err(path, "not valid JSON", e))
}

impl Tokenizer {
    /// Loads `tokenizer.json` (+ `tokenizer_config.json` for special tokens and the chat template)
    /// from a Hugging Face model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Tokenizer> {
        if !dir.exists() {
            return Err(Error::Invalid(format!("{}: does not exist", dir.display())));
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{}: no tokenizer.json in the model directory (qtune reads tokenizers in the \
                 tokenizers-library format; SentencePiece-only tokenizer.model is not read)",
                dir.display()
            )));
        }
        // The tokenizers crate panics on some damaged files (e.g. a deeply nested decoder).
        let tk = guard::catch(|| tokenizers::Tokenizer::from_file(&path))
            .map_err(|p| {
                tok_err(
                    &path,
                    "cannot load tokenizer (the tokenizers crate panicked)",
                    p,
                )
            })?
            .map_err(|e| tok_err(&path, "cannot load tokenizer", e))?;
        let cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let model_cfg = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
        let id_of = |key: &str, cfg_key: &str| -> Option<u32> {
            token_str(cfg.get(key))
                .and_then(|s| tk.token_to_id(&s))
                .or_else(|| first_id(model_cfg.get(cfg_key)))
        };
        let bos = id_of("bos_token", "bos_token_id");
        let eos = id_of("eos_token", "eos_token_id");
        let pad = id_of("pad_token", "pad_token_id");
        let chat_template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: the one named "default".
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            // Newer transformers save it beside: chat_template.jinja.
            None => {
                let p = dir.join("chat_template.jinja");
                p.exists()
                    .then(|| std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e)))
                    .transpose()?
            }
        };
        let class = cfg.get("tokenizer_class").and_then(Json::as_str);
        let rebuilt = class.is_some_and(|c| BOS_EOS_CLASSES.contains(&c));
        let cfg_flag =
            |k: &str, default: bool| cfg.get(k).and_then(Json::as_bool).unwrap_or(default);
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(tk)),
            source: path,
            bos,
            eos,
            pad,
            add_bos: rebuilt && cfg_flag("add_bos_token", true) && bos.is_some(),
            add_eos: rebuilt && cfg_flag("add_eos_token", false) && eos.is_some(),
            post_processor: !rebuilt,
            chat_template,
        })
    }

    /// Builds the tokenizer a GGUF embeds (`tokenizer.ggml.*`), tokenising as llama.cpp does.
    pub fn from_gguf(store: &WeightStore) -> Result<Tokenizer> {
        Tokenizer::from_gguf_metadata(&store.path, &store.gguf_metadata)
    }

    /// Builds the tokenizer from GGUF metadata already read (`path` names the file in errors).
    pub fn from_gguf_metadata(path: &Path, meta: &[(String, Value)]) -> Result<Tokenizer> {
        let path = path.to_path_buf();
        let model = gguf::find(meta, "tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: the GGUF embeds no tokenizer (tokenizer.ggml.model missing); pass the \
                     Hugging Face model directory with tokenizer.json instead",
                    path.display()
                ))
            })?;
        let v = GgufVocab::from_metadata(&path, meta, model)?;
        let chat_template = gguf::find(meta, "tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Tokenizer {
            source: path,
            bos: v.bos,
            eos: v.eos,
            pad: v.pad,
            // The vocabulary adds BOS / EOS itself, as llama.cpp does.
            add_bos: false,
            add_eos: false,
            post_processor: false,
            chat_template,
            inner: Inner::Gguf(Box::new(v)),
        })
    }

    /// The tokenizer for a model path as `qtune train --model` takes it: a GGUF file's embedded
    /// vocabulary, or a directory's tokenizer.json.
    pub fn for_model(path: &Path) -> Result<Tokenizer> {
        if path.is_dir() {
            Tokenizer::from_model_dir(path)
        } else {
            Tokenizer::from_gguf(&WeightStore::open(path)?)
        }
    }

    /// The same tokenizer without the BPE model's per-word cache (tokenizer.json BPE models only;
    /// the tokens are the same). tokenizers 0.23 keeps that cache in a thread-local map keyed per
    /// model and never frees a model's entries when the model is dropped (up to 10,000 words per
    /// model and thread, never reused): a process that builds many tokenizers grows by each one's
    /// words. qtune builds one per run and keeps the cache; the fuzzer (one per input) drops it.
    pub fn without_word_cache(mut self) -> Tokenizer {
        if let Inner::Hf(tk) = &mut self.inner {
            // A clone has a fresh cache id; capacity 0 stores no word (an empty map per model
            // and thread is still left behind, ~100 bytes).
            let bpe = match tk.get_model() {
                tokenizers::ModelWrapper::BPE(bpe) => Some(bpe.clone()),
                _ => None,
            };
            if let Some(mut bpe) = bpe {
                bpe.resize_cache(0);
                tk.with_model(bpe);
            }
        }
        self
    }

    /// Token ids of `text`. Special-token strings in the text (`<s>`, `<|im_end|>`) become their ids;
    /// `add_special` adds what the tokenizer adds around a sequence (usually BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Inner::Hf(tk) => {
                // The crate can panic on a damaged model (e.g. a bad continuing_subword_prefix).
                let enc = guard::catch(|| tk.encode(text, add_special && self.post_processor))
                    .map_err(|p| {
                        tok_err(&self.source, "tokenising failed (tokenizer panicked)", p)
                    })?
                    .map_err(|e| tok_err(&self.source, "tokenising failed", e))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Inner::Gguf(v) => ids.extend(v.encode(text, add_special, true)),
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Token ids as llama.cpp's `llama_tokenize(text, add_special, parse_special)` gives them for a
    /// GGUF vocabulary: without `parse_special`, control-token texts in `text` are tokenised as
    /// plain text. A tokenizer.json always matches its added tokens (`parse_special` is ignored).
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Gguf(v) => Ok(v.encode(text, add_special, parse_special)),
            Inner::Hf(_) => self.encode(text, add_special),
        }
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(tk) => guard::catch(|| tk.decode(ids, false))
                .map_err(|p| tok_err(&self.source, "decoding failed (tokenizer panicked)", p))?
                .map_err(|e| tok_err(&self.source, "decoding failed", e)),
            Inner::Gguf(v) => Ok(v.decode(ids)),
        }
    }

    /// Id of the beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Id of the end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Id of the padding token, if the tokenizer names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The id to pad batches with: the padding token, else EOS, else 0 (padding is masked anyway).
    pub fn pad_or_eos(&self) -> u32 {
        self.pad.or(self.eos).unwrap_or(0)
    }

    /// The text of token `id` (for chat-template variables such as `bos_token`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(tk) => guard::catch(|| tk.id_to_token(id)).ok().flatten(),
            Inner::Gguf(v) => v.text(id).map(str::to_string),
        }
    }

    /// The Jinja chat template the model ships, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Number of ids (including added tokens).
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(tk) => tk.get_vocab_size(true),
            Inner::Gguf(v) => v.len(),
        }
    }

    /// The file the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

fn first_id(v: Option<&Json>) -> Option<u32> {
    match v? {
        Json::Number(n) => n.as_u64().map(|x| x as u32),
        Json::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}
