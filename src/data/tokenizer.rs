//! Tokenizers: a Hugging Face `tokenizer.json` (run by the `tokenizers` crate, as transformers does),
//! or the vocabulary a GGUF embeds, tokenised as llama.cpp does: byte-level BPE ("gpt2") through the
//! same crate, SentencePiece ("llama": tokens + scores) by our own bigram merger.
use super::guard;
use crate::error::{Error, Result};
use crate::format::gguf::{self, Value};
use crate::store::WeightStore;
use serde_json::{json, Value as Json};
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TT_UNKNOWN: i64 = 2;
const TT_CONTROL: i64 = 3;
const TT_USER_DEFINED: i64 = 4;
const TT_BYTE: i64 = 6;

/// GPT-2's pre-tokenizer split (llama.cpp "gpt-2"), also what HF's ByteLevel(use_regex) runs.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split (llama.cpp "llama-bpe").
const RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
    Spm(Spm),
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
        let path = store.path.clone();
        let meta = &store.gguf_metadata;
        let bad = |msg: String| Error::corrupt(&path, "GGUF", msg);
        let get = |k: &str| gguf::find(meta, k);
        let model = get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: the GGUF embeds no tokenizer (tokenizer.ggml.model missing); pass the \
                     Hugging Face model directory with tokenizer.json instead",
                    path.display()
                ))
            })?
            .to_string();
        let strings = |k: &str| -> Result<Vec<String>> {
            let arr = get(k)
                .and_then(Value::as_array)
                .ok_or_else(|| bad(format!("{k} is missing or not an array")))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("{k} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types: Vec<i64> = match get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Some(a) => {
                return Err(bad(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    a.len()
                )))
            }
            None => vec![1; n],
        };
        let id_key = |k: &str| -> Result<Option<u32>> {
            match get(k).and_then(Value::as_u64) {
                Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                Some(id) => Err(bad(format!(
                    "{k} = {id} is not below the vocabulary size {n}"
                ))),
                None => Ok(None),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let pad = id_key("tokenizer.ggml.padding_token_id")?;
        let flag = |k: &str| get(k).and_then(Value::as_bool);
        let chat_template = get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        let (inner, add_bos) = match model.as_str() {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let tk = gguf_bpe(&path, &tokens, &types, &merges, pre)?;
                // llama.cpp adds BOS to a BPE vocabulary only for Llama 3's pre-tokenizer, unless
                // the file says otherwise.
                let llama3 = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
                (
                    Inner::Hf(Box::new(tk)),
                    flag("tokenizer.ggml.add_bos_token").unwrap_or(llama3),
                )
            }
            "llama" => {
                let scores: Vec<f32> = match get("tokenizer.ggml.scores").and_then(Value::as_array)
                {
                    Some(a) if a.len() == n => {
                        a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
                    }
                    _ => {
                        return Err(bad(format!(
                            "tokenizer.ggml.scores is missing or does not have {n} entries"
                        )))
                    }
                };
                let spm = Spm::new(
                    tokens,
                    scores,
                    types,
                    flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                );
                (
                    Inner::Spm(spm),
                    flag("tokenizer.ggml.add_bos_token").unwrap_or(true),
                )
            }
            other => {
                return Err(Error::Invalid(format!(
                    "{}: GGUF tokenizer model '{other}' is not supported (qtune reads 'gpt2' and \
                     'llama'); pass the Hugging Face model directory with tokenizer.json instead",
                    path.display()
                )))
            }
        };
        Ok(Tokenizer {
            inner,
            source: path,
            bos,
            eos,
            pad,
            add_bos: add_bos && bos.is_some(),
            add_eos: flag("tokenizer.ggml.add_eos_token").unwrap_or(false) && eos.is_some(),
            post_processor: false,
            chat_template,
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
            Inner::Spm(spm) => spm.encode(text, &mut ids),
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(tk) => guard::catch(|| tk.decode(ids, false))
                .map_err(|p| tok_err(&self.source, "decoding failed (tokenizer panicked)", p))?
                .map_err(|e| tok_err(&self.source, "decoding failed", e)),
            Inner::Spm(spm) => Ok(spm.decode(ids)),
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
            Inner::Spm(spm) => spm.tokens.get(id as usize).cloned(),
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
            Inner::Spm(spm) => spm.tokens.len(),
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

/// A byte-level BPE `tokenizers::Tokenizer` from a GGUF's tokens and merges: we write the
/// equivalent tokenizer.json so the crate runs exactly its tested BPE.
fn gguf_bpe(
    path: &Path,
    tokens: &[String],
    types: &[i64],
    merges: &[String],
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split_then_bytes = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    // llama.cpp's pre-tokenizer names; each is a regex split before the byte mapping.
    let (pre_tok, ignore_merges) = match pre {
        "default" | "gpt-2" => (split_then_bytes(RE_GPT2), false),
        "llama-bpe" | "llama3" => (split_then_bytes(RE_LLAMA3), true),
        other => {
            return Err(Error::Invalid(format!(
                "{}: GGUF BPE pre-tokenizer '{other}' is not supported (qtune knows gpt-2 and \
                 llama-bpe); pass the Hugging Face model directory with tokenizer.json instead",
                path.display()
            )))
        }
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        // Duplicate strings (padding placeholders) keep their first id, as llama.cpp's map does.
        if !vocab.contains_key(t) {
            vocab.insert(t.clone(), json!(id));
        }
        if matches!(ty, TT_CONTROL | TT_USER_DEFINED | TT_UNKNOWN) {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false,
                              "special": ty != TT_USER_DEFINED}),
            );
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
            json!([a, b])
        })
        .collect();
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tok, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges}
    });
    let spec = spec.to_string();
    guard::catch(|| spec.parse::<tokenizers::Tokenizer>())
        .map_err(|p| Error::corrupt(path, "GGUF", format!("tokenizer vocabulary: {p}")))?
        .map_err(|e| Error::corrupt(path, "GGUF", format!("tokenizer vocabulary: {e}")))
}

/// SentencePiece BPE as llama.cpp runs it: spaces become U+2581, adjacent symbols merge by the
/// highest score whose concatenation is a token, unknown characters fall back to `<0xNN>` bytes.
struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i64>,
    ids: HashMap<String, u32>,
    /// Control / user-defined tokens matched literally in text, longest first.
    specials: Vec<(String, u32)>,
    add_space_prefix: bool,
}

/// A candidate merge of symbols `left` and `right` (heap order: score, then leftmost).
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl Spm {
    fn new(tokens: Vec<String>, scores: Vec<f32>, types: Vec<i64>, add_space_prefix: bool) -> Spm {
        let mut ids = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| {
                !t.is_empty() && matches!(ty, TT_CONTROL | TT_USER_DEFINED | TT_UNKNOWN)
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Spm {
            tokens,
            scores,
            types,
            ids,
            specials,
            add_space_prefix,
        }
    }

    /// Splits text at special-token strings, then tokenises each raw piece; every raw piece starts
    /// the text or follows a special token, so each gets llama.cpp's space prefix.
    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut rest = text;
        while !rest.is_empty() {
            // Earliest special match, longest at that position.
            let hit = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (raw, special) = match hit {
                Some((p, len, id)) => (&rest[..p], Some((len, id, p))),
                None => (rest, None),
            };
            if !raw.is_empty() {
                self.encode_raw(raw, true, out);
            }
            match special {
                Some((len, id, p)) => {
                    out.push(id);
                    rest = &rest[p + len..];
                }
                None => break,
            }
        }
    }

    fn encode_raw(&self, raw: &str, prefix: bool, out: &mut Vec<u32>) {
        let mut text = String::with_capacity(raw.len() + 3);
        if prefix && self.add_space_prefix {
            text.push(' ');
        }
        text.push_str(raw);
        let text = text.replace(' ', "\u{2581}");
        // Symbols: byte ranges in `text`, linked left/right; a merged-away symbol has len 0.
        let mut start: Vec<usize> = Vec::new();
        let mut len: Vec<usize> = Vec::new();
        for (i, c) in text.char_indices() {
            start.push(i);
            len.push(c.len_utf8());
        }
        let n = start.len();
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut heap = BinaryHeap::new();
        let try_add =
            |heap: &mut BinaryHeap<Bigram>, l: usize, r: usize, s: &[usize], ln: &[usize]| {
                let piece = &text[s[l]..s[l] + ln[l] + ln[r]];
                if let Some(&id) = self.ids.get(piece) {
                    heap.push(Bigram {
                        score: self.scores[id as usize],
                        left: l,
                        right: r,
                        len: piece.len(),
                    });
                }
            };
        for i in 1..n {
            try_add(&mut heap, i - 1, i, &start, &len);
        }
        while let Some(b) = heap.pop() {
            // Stale: one side already merged into something else.
            if len[b.left] == 0 || len[b.right] == 0 || len[b.left] + len[b.right] != b.len {
                continue;
            }
            len[b.left] += len[b.right];
            len[b.right] = 0;
            next[b.left] = next[b.right];
            if next[b.left] < n {
                prev[next[b.left]] = b.left as isize;
            }
            if prev[b.left] >= 0 {
                try_add(&mut heap, prev[b.left] as usize, b.left, &start, &len);
            }
            if next[b.left] < n {
                try_add(&mut heap, b.left, next[b.left], &start, &len);
            }
        }
        let mut i = 0;
        while i < n {
            let piece = &text[start[i]..start[i] + len[i]];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for byte in piece.bytes() {
                        let name = format!("<0x{byte:02X}>");
                        // No byte token either: llama.cpp emits its unknown token (id 0 here).
                        out.push(self.ids.get(&name).copied().unwrap_or(0));
                    }
                }
            }
            i = next[i];
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            match self.types.get(id as usize).copied().unwrap_or(1) {
                TT_BYTE => {
                    if let Some(b) = t
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                _ => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
            }
        }
        let s = String::from_utf8_lossy(&bytes).into_owned();
        match (self.add_space_prefix, s.strip_prefix(' ')) {
            (true, Some(t)) => t.to_string(),
            _ => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy_spm() -> Spm {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![TT_UNKNOWN, TT_CONTROL, TT_CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TT_BYTE);
        }
        for t in ["\u{2581}", "a", "b", "ab", "\u{2581}a", "\u{2581}ab"] {
            tokens.push(t.into());
            types.push(1);
        }
        let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
        Spm::new(tokens, scores, types, true)
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let spm = toy_spm();
        let mut out = Vec::new();
        spm.encode("ab</s>é", &mut out);
        // "▁ab" merges fully; after </s> a space prefix again; é is two byte tokens.
        let id = |t: &str| spm.ids[t];
        assert_eq!(
            out,
            vec![id("\u{2581}ab"), 2, id("\u{2581}"), 3 + 0xC3, 3 + 0xA9]
        );
        assert_eq!(spm.decode(&out), "ab</s> é");
    }
}
