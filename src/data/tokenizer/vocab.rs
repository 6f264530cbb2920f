//! The vocabulary a GGUF embeds (`tokenizer.ggml.*`), tokenised and detokenised as llama.cpp's
//! `llama_vocab` does: token attributes from the token types (plus the end-of-generation and
//! fill-in-the-middle tokens it marks as control by their text), special tokens split out of the
//! text first (longest first, every occurrence), then byte-level BPE with one of llama.cpp's
//! pre-tokenizers, or SentencePiece BPE, or BERT's WordPiece on the pieces between them.
use super::bpe::{self, Merges};
use super::pre::{self, PreTokenizer};
use super::{spm, wpm};
use crate::error::Result;
use crate::format::gguf::{self, Value};
use std::collections::HashMap;
use std::path::Path;

mod meta;

use meta::{mark_control_texts, model_defaults, per_token, tok_key, tok_strings, SpecialIds};

// llama.cpp's token attributes (`llama_token_attr`).
const ATTR_UNKNOWN: u32 = 1 << 0;
const ATTR_UNUSED: u32 = 1 << 1;
const ATTR_NORMAL: u32 = 1 << 2;
const ATTR_CONTROL: u32 = 1 << 3;
const ATTR_USER_DEFINED: u32 = 1 << 4;
const ATTR_BYTE: u32 = 1 << 5;
const ATTR_LSTRIP: u32 = 1 << 7;
const ATTR_RSTRIP: u32 = 1 << 8;

/// `tokenizer.ggml.token_type` values -> attributes (anything else is "undefined", 0).
fn attr_of_type(t: i64) -> u32 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => 0,
    }
}

/// The tokenizer model a GGUF names.
enum Model {
    Bpe {
        pre: Box<PreTokenizer>,
        merges: Merges,
        ignore_merges: bool,
    },
    Spm,
    Wpm,
}

/// A GGUF vocabulary as llama.cpp runs it.
pub(crate) struct GgufVocab {
    model: Model,
    /// Token texts by id (an empty one reads "[EMPTY_<id>]", as in llama.cpp).
    texts: Vec<String>,
    attrs: Vec<u32>,
    scores: Vec<f32>,
    /// Text -> id; a repeated text maps to its last id.
    ids: HashMap<String, u32>,
    /// Control / user-defined / unknown tokens, longest text first.
    specials: Vec<u32>,
    /// What each id detokenises to (special tokens as their text).
    pieces: Vec<Vec<u8>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    /// Longest token text in bytes (WordPiece's search window).
    max_token_len: usize,
}

/// One piece of text after special tokens are split out: a byte range of the text, or a token.
#[derive(Clone, Copy)]
enum Frag {
    Raw(usize, usize),
    Token(u32),
}

impl GgufVocab {
    /// Reads `tokenizer.ggml.*` from a GGUF's metadata; `model` is `tokenizer.ggml.model`.
    pub fn from_metadata(path: &Path, meta: &[(String, Value)], model: &str) -> Result<GgufVocab> {
        let get = |k: &str| tok_key(meta, k);
        let mut texts = tok_strings(path, meta, "tokens")?;
        let n = texts.len();
        let flag = |k: &str| get(k).and_then(Value::as_bool);
        let pre_name = get("pre").and_then(Value::as_str).unwrap_or("default");
        // Defaults by model type (llama-vocab.cpp), then the file's own flags win.
        let (model, spec, defaults) = model_defaults(path, meta, model, pre_name)?;
        let types = per_token(path, meta, "token_type", n, 1, |v| v.as_i64().unwrap_or(0))?;
        let scores = per_token(path, meta, "scores", n, 0.0, |v| {
            v.as_f64().unwrap_or(0.0) as f32
        })?;
        let mut attrs: Vec<u32> = types.iter().map(|&t| attr_of_type(t)).collect();
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in texts.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[EMPTY_{i}]");
            }
            ids.insert(t.clone(), i as u32);
        }
        let SpecialIds {
            bos,
            eos,
            unk,
            sep,
            pad,
        } = defaults.with_file_ids(meta, n);
        mark_control_texts(meta, &ids, &mut attrs);
        let add_space_prefix = flag("add_space_prefix").unwrap_or(matches!(model, Model::Spm));
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(texts[i as usize].len()));
        let max_token_len = texts.iter().map(String::len).max().unwrap_or(0);
        let mut v = GgufVocab {
            model,
            texts,
            attrs,
            scores,
            ids,
            specials,
            pieces: Vec::new(),
            bos,
            eos,
            unk,
            sep,
            pad,
            add_bos: flag("add_bos_token").unwrap_or(spec.add_bos),
            add_eos: flag("add_eos_token").unwrap_or(false),
            add_space_prefix,
            clean_spaces: spec.clean_spaces,
            max_token_len,
        };
        v.pieces = (0..n as u32).map(|i| v.piece(i)).collect();
        v.set_model_attrs(meta, pre_name);
        Ok(v)
    }

    /// Per-model attributes llama.cpp sets by name (they are not in GGUF files).
    fn set_model_attrs(&mut self, meta: &[(String, Value)], pre_name: &str) {
        let name = gguf::find(meta, "general.name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let arch = gguf::find(meta, "general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre_name.contains(p))
            || arch.contains("nomic-bert-moe")
        {
            if let Some(&id) = self.ids.get("<mask>") {
                self.attrs[id as usize] |= ATTR_LSTRIP;
            }
        } else if name.contains("phi-3") || name.contains("phi3") {
            for &id in &self.specials {
                self.attrs[id as usize] |= ATTR_RSTRIP;
            }
            if let Some(&id) = self.ids.get("</s>") {
                self.attrs[id as usize] |= ATTR_RSTRIP;
            }
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(&id) = self.ids.get(t) {
                    self.attrs[id as usize] &= !ATTR_RSTRIP;
                }
            }
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// The text of token `id`.
    pub fn text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    fn lookup(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// What token `id` reads as in text (llama.cpp's `token_to_piece` with special tokens shown).
    fn piece(&self, id: u32) -> Vec<u8> {
        let text = &self.texts[id as usize];
        let attr = self.attrs[id as usize];
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        match self.model {
            Model::Bpe { .. } if attr & ATTR_NORMAL != 0 => decode_byte_level(text),
            Model::Spm | Model::Wpm if attr & ATTR_NORMAL != 0 => {
                text.replace('\u{2581}', " ").into_bytes()
            }
            Model::Spm if attr & ATTR_BYTE != 0 => text
                .get(3..5)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map_or_else(Vec::new, |b| vec![b]),
            _ => Vec::new(),
        }
    }

    /// Splits special-token texts out of `text` (llama.cpp's `tokenizer_st_partition`): each
    /// special token in turn, longest first, at every occurrence in the raw pieces left. Without
    /// `parse_special` only user-defined tokens are split out.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Frag> {
        let mut frags = vec![Frag::Raw(0, text.len())];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            let attr = self.attrs[id as usize];
            if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let tok = self.texts[id as usize].as_str();
            let mut out = Vec::with_capacity(frags.len());
            for f in frags {
                let Frag::Raw(mut s, e) = f else {
                    out.push(f);
                    continue;
                };
                while let Some(p) = text[s..e].find(tok).map(|p| p + s) {
                    let mut left_end = p;
                    if attr & ATTR_LSTRIP != 0 {
                        while left_end > s && text.as_bytes()[left_end - 1].is_ascii_whitespace_c()
                        {
                            left_end -= 1;
                        }
                    }
                    if left_end > s {
                        out.push(Frag::Raw(s, left_end));
                    }
                    out.push(Frag::Token(id));
                    s = p + tok.len();
                    if attr & ATTR_RSTRIP != 0 {
                        while s < e && text.as_bytes()[s].is_ascii_whitespace_c() {
                            s += 1;
                        }
                    }
                }
                if s < e {
                    out.push(Frag::Raw(s, e));
                }
            }
            frags = out;
        }
        frags
    }

    /// Token ids of `text`. `add_special` adds BOS/EOS as the file says; `parse_special` turns
    /// control-token texts in `text` into their ids (user-defined tokens always are).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let frags = self.partition(text, parse_special);
        let mut out = Vec::new();
        let raw = |s: usize, e: usize| &text[s..e];
        match &self.model {
            Model::Spm => {
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                let mut prev_special = true;
                for f in frags {
                    match f {
                        Frag::Raw(s, e) => {
                            let mut t = String::with_capacity(e - s + 3);
                            if self.add_space_prefix && prev_special {
                                t.push(' ');
                            }
                            t.push_str(raw(s, e));
                            let t = t.replace(' ', "\u{2581}");
                            spm::encode(
                                &t,
                                &|x| self.lookup(x),
                                &|id| self.scores[id as usize],
                                &|b| self.byte_token(b),
                                &mut out,
                            );
                            prev_special = false;
                        }
                        Frag::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            Model::Bpe {
                pre,
                merges,
                ignore_merges,
            } => {
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                for f in frags {
                    match f {
                        Frag::Raw(s, e) => {
                            for word in pre.split(raw(s, e)) {
                                let lookup = |x: &str| self.lookup(x);
                                bpe::encode_word(&word, merges, *ignore_merges, &lookup, &mut out);
                            }
                        }
                        Frag::Token(id) => out.push(id),
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            Model::Wpm => {
                if add_special {
                    out.extend(self.bos);
                }
                for f in frags {
                    match f {
                        Frag::Raw(s, e) => wpm::encode(
                            raw(s, e),
                            &|x| self.lookup(x),
                            self.max_token_len,
                            self.unk,
                            &mut out,
                        ),
                        Frag::Token(id) => out.push(id),
                    }
                }
                if add_special {
                    out.extend(self.sep);
                }
            }
        }
        out
    }

    /// SentencePiece byte fallback: `<0xNN>`, else the byte itself as a token, else unknown.
    fn byte_token(&self, b: u8) -> u32 {
        let name = format!("<0x{b:02X}>");
        self.lookup(&name)
            .or_else(|| {
                b.is_ascii()
                    .then(|| self.lookup(&(b as char).to_string()))
                    .flatten()
            })
            .or(self.unk)
            .unwrap_or(0)
    }

    /// Text of `ids` as llama.cpp's `llama_detokenize(.., remove_special=false,
    /// unparse_special=true)`: special tokens as their text, SentencePiece's leading space dropped,
    /// and " ," / " 's" tidied for vocabularies that ask for it.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = Vec::new();
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let Some(p) = self.pieces.get(id as usize) else {
                continue;
            };
            let p = match (remove_space, p.first()) {
                (true, Some(b' ')) => &p[1..],
                _ => &p[..],
            };
            remove_space = false;
            bytes.extend_from_slice(p);
        }
        if self.clean_spaces {
            bytes = clean_spaces(&bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// C's `isspace` in the "C" locale (llama.cpp's lstrip/rstrip test).
trait CSpace {
    fn is_ascii_whitespace_c(&self) -> bool;
}
impl CSpace for u8 {
    fn is_ascii_whitespace_c(&self) -> bool {
        matches!(*self, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
    }
}

/// A byte-level token's bytes; a character outside GPT-2's byte map reads as llama.cpp writes it.
fn decode_byte_level(text: &str) -> Vec<u8> {
    thread_local! {
        static MAP: HashMap<char, u8> = pre::char_to_byte();
    }
    MAP.with(|map| {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match map.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    out.extend_from_slice(b"[UNK_BYTE_0x");
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                    out.extend_from_slice(text.as_bytes());
                    out.push(b']');
                }
            }
        }
        out
    })
}

/// llama.cpp's `clean_spaces` passes over detokenised bytes: drop the space before ?!., ; drop the
/// spaces around a lone apostrophe; drop the space before 's 'm 're 've.
fn clean_spaces(t: &[u8]) -> Vec<u8> {
    if t.is_empty() {
        return Vec::new();
    }
    // Pass 1: " ?", " !", " .", " ,".
    let mut a = vec![t[0]];
    for i in 1..t.len() {
        if t[i - 1] == b' ' && matches!(t[i], b'?' | b'!' | b'.' | b',') {
            a.pop();
        }
        a.push(t[i]);
    }
    // Pass 2: " ' " -> "'". llama.cpp writes a NUL over the dropped space in place, which the
    // next step reads as its left neighbour.
    let mut b = vec![a[0]];
    let mut i = 1;
    while i < a.len() {
        let x = a[i];
        if x == b'\'' && i + 1 < a.len() && a[i - 1] == b' ' && a[i + 1] == b' ' {
            b.pop();
            b.push(x);
            a[i + 1] = 0;
            i += 2;
            continue;
        }
        b.push(x);
        i += 1;
    }
    // Pass 3: " 's", " 'm", " 're", " 've".
    let mut c = vec![b[0]];
    for i in 1..b.len() {
        let x = b[i];
        if b[i - 1] == b' ' && x == b'\'' && i + 1 < b.len() {
            let x1 = b[i + 1];
            let x2 = b.get(i + 2).copied();
            let drop = matches!(x1, b's' | b'm')
                || (i + 2 < b.len() && matches!((x1, x2), (b'r', Some(b'e')) | (b'v', Some(b'e'))));
            if drop {
                c.pop();
            }
        }
        c.push(x);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Value {
        Value::Array(8, v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A toy SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, a few pieces.
    fn toy_spm() -> Vec<(String, Value)> {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for t in ["\u{2581}", "a", "b", "ab", "\u{2581}a", "\u{2581}ab"] {
            tokens.push(t.into());
            types.push(1);
        }
        let scores = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        vec![
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            ("tokenizer.ggml.tokens".into(), strs(&refs)),
            ("tokenizer.ggml.scores".into(), Value::Array(6, scores)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(5, types.into_iter().map(Value::I32).collect()),
            ),
        ]
    }

    #[test]
    fn spm_merges_by_score_splits_specials_and_falls_back_to_bytes() {
        let v = GgufVocab::from_metadata(Path::new("toy.gguf"), &toy_spm(), "llama").unwrap();
        let id = |t: &str| v.ids[t];
        // "▁ab" merges fully; after </s> a space prefix again; é is two byte tokens.
        let ids = v.encode("ab</s>é", true, true);
        assert_eq!(
            ids,
            [1, id("\u{2581}ab"), 2, id("\u{2581}"), 3 + 0xC3, 3 + 0xA9]
        );
        // llama.cpp drops the space prefix of the first token only (here <s>, which has none).
        assert_eq!(v.decode(&ids), "<s> ab</s> é");
        assert_eq!(v.decode(&ids[1..]), "ab</s> é");
        // Without special parsing "</s>" is text: '<' '/' 's' '>' as bytes.
        let plain = v.encode("</s>", false, false);
        assert_eq!(plain[0], id("\u{2581}"));
        assert_eq!(plain.len(), 5);
    }

    #[test]
    fn unknown_pre_tokenizer_names_the_file_and_the_name() {
        let meta = vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre".into(),
                Value::String("no-such-pre".into()),
            ),
            ("tokenizer.ggml.tokens".into(), strs(&["a", "b"])),
            ("tokenizer.ggml.merges".into(), strs(&["a b"])),
        ];
        let e = GgufVocab::from_metadata(Path::new("/m/x.gguf"), &meta, "gpt2")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("/m/x.gguf") && e.contains("'no-such-pre'"),
            "{e}"
        );
        let e = GgufVocab::from_metadata(Path::new("/m/x.gguf"), &meta, "t5")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/m/x.gguf") && e.contains("'t5'"), "{e}");
    }

    #[test]
    fn clean_spaces_follows_llama_cpp() {
        assert_eq!(clean_spaces(b"Hello , world !"), b"Hello, world!");
        assert_eq!(clean_spaces(b"he ' d"), b"he'd");
        assert_eq!(clean_spaces(b"it 's we 're I 'd"), b"it's we're I 'd");
    }
}
