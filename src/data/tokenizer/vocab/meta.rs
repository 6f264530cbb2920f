//! Reading `tokenizer.ggml.*`: the keys, the defaults by model type, the special ids, and the
//! tokens llama.cpp marks by their text.
use super::{Model, ATTR_CONTROL, ATTR_USER_DEFINED};
use crate::data::tokenizer::bpe::Merges;
use crate::data::tokenizer::pre::{self, PreSpec, PreTokenizer};
use crate::error::{Error, Result};
use crate::format::gguf::{self, Value};
use std::collections::HashMap;
use std::path::Path;

/// Token texts llama.cpp treats as end of turn / generation, or fill-in-the-middle markers, and
/// marks as control tokens when the file does not name them (llama-vocab.cpp, `load`).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
/// (metadata key of the id, texts that stand for it when the key is absent).
const FIM_TEXTS: &[(&[&str], &[&str])] = &[
    (&["eot_token_id"], EOT_TEXTS),
    (&["eom_token_id"], &["<|eom_id|>"]),
    (
        &["fim_pre_token_id", "prefix_token_id"],
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
        ],
    ),
    (
        &["fim_suf_token_id", "suffix_token_id"],
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
        ],
    ),
    (
        &["fim_mid_token_id", "middle_token_id"],
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
        ],
    ),
    (
        &["fim_pad_token_id"],
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"],
    ),
    (
        &["fim_rep_token_id"],
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    (&["fim_sep_token_id"], &["<|file_sep|>"]),
];

/// `tokenizer.ggml.<k>` in a GGUF's metadata.
pub(super) fn tok_key<'a>(meta: &'a [(String, Value)], k: &str) -> Option<&'a Value> {
    gguf::find(meta, &format!("tokenizer.ggml.{k}"))
}

/// `tokenizer.ggml.<k>`, an array of strings.
pub(super) fn tok_strings(path: &Path, meta: &[(String, Value)], k: &str) -> Result<Vec<String>> {
    let bad = |msg: String| Error::corrupt(path, "GGUF", msg);
    tok_key(meta, k)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("tokenizer.ggml.{k} is missing or not an array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("tokenizer.ggml.{k} holds a non-string")))
        })
        .collect()
}

/// `tokenizer.ggml.<k>`, one value per token read with `conv`, or `default` for each when absent.
pub(super) fn per_token<T: Clone>(
    path: &Path,
    meta: &[(String, Value)],
    k: &str,
    n: usize,
    default: T,
    conv: impl Fn(&Value) -> T,
) -> Result<Vec<T>> {
    match tok_key(meta, k).and_then(Value::as_array) {
        Some(a) if a.len() == n => Ok(a.iter().map(conv).collect()),
        Some(a) => Err(Error::corrupt(
            path,
            "GGUF",
            format!("tokenizer.ggml.{k} has {} entries for {n} tokens", a.len()),
        )),
        None => Ok(vec![default; n]),
    }
}

/// The special ids of a vocabulary.
#[derive(Clone, Copy, Default)]
pub(super) struct SpecialIds {
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) unk: Option<u32>,
    pub(super) sep: Option<u32>,
    pub(super) pad: Option<u32>,
}

impl SpecialIds {
    /// These defaults overridden by the ids the file names (an id past the `n` tokens is
    /// ignored, as llama.cpp warns and does), then any still out of range dropped.
    pub(super) fn with_file_ids(mut self, meta: &[(String, Value)], n: usize) -> SpecialIds {
        for (k, slot) in [
            ("bos_token_id", &mut self.bos),
            ("eos_token_id", &mut self.eos),
            ("unknown_token_id", &mut self.unk),
            ("seperator_token_id", &mut self.sep),
            ("padding_token_id", &mut self.pad),
        ] {
            if let Some(id) = tok_key(meta, k).and_then(Value::as_u64) {
                if (id as usize) < n {
                    *slot = Some(id as u32);
                }
            }
        }
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        SpecialIds {
            bos: in_range(self.bos),
            eos: in_range(self.eos),
            unk: in_range(self.unk),
            sep: in_range(self.sep),
            pad: in_range(self.pad),
        }
    }
}

/// The model, pre-tokenizer settings and default special ids of `tokenizer.ggml.model` = `model`
/// (llama-vocab.cpp's defaults by model type).
pub(super) fn model_defaults(
    path: &Path,
    meta: &[(String, Value)],
    model: &str,
    pre_name: &str,
) -> Result<(Model, PreSpec, SpecialIds)> {
    let ids = |bos, eos, unk, sep, pad| SpecialIds {
        bos,
        eos,
        unk,
        sep,
        pad,
    };
    Ok(match model {
        "gpt2" => {
            let spec = pre::pre_spec(pre_name).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: GGUF BPE pre-tokenizer '{pre_name}' (tokenizer.ggml.pre) is not one \
                     llama.cpp knows, so qtune cannot tokenise as it would; known names: {}",
                    path.display(),
                    pre::PRE_NAMES.join(", ")
                ))
            })?;
            let pre = PreTokenizer::new(spec.kind)
                .map(Box::new)
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
            let merges = Merges::new(&tok_strings(path, meta, "merges")?);
            let m = Model::Bpe {
                pre,
                merges,
                ignore_merges: spec.ignore_merges,
            };
            // ChatGLM's BPE has no default BOS (llama.cpp clears it).
            let bos = (spec.kind != pre::PreType::Chatglm4).then_some(11);
            (m, spec, ids(bos, Some(11), None, None, None))
        }
        "llama" => {
            let spec = PreSpec {
                kind: pre::PreType::Default,
                ignore_merges: false,
                add_bos: true,
                clean_spaces: false,
            };
            (Model::Spm, spec, ids(Some(1), Some(2), Some(0), None, None))
        }
        "bert" => {
            let spec = PreSpec {
                kind: pre::PreType::Default,
                ignore_merges: false,
                add_bos: true,
                clean_spaces: true,
            };
            let d = ids(Some(101), None, Some(100), Some(102), Some(0));
            (Model::Wpm, spec, d)
        }
        other => {
            return Err(Error::Invalid(format!(
                "{}: GGUF tokenizer model '{other}' (tokenizer.ggml.model) is not supported: \
                 qtune runs 'gpt2' (BPE), 'llama' (SentencePiece) and 'bert' (WordPiece) \
                 vocabularies as llama.cpp does; pass the Hugging Face model directory with \
                 tokenizer.json instead",
                path.display()
            )))
        }
    })
}

/// Marks by their text the end-of-turn and fill-in-the-middle tokens the file does not name as
/// control tokens, and the gpt-oss tokens that are always rendered as user-defined.
pub(super) fn mark_control_texts(
    meta: &[(String, Value)],
    ids: &HashMap<String, u32>,
    attrs: &mut [u32],
) {
    let mut control = |id: u32| {
        if attrs[id as usize] & ATTR_CONTROL == 0 {
            attrs[id as usize] = ATTR_CONTROL;
        }
    };
    for (keys, names) in FIM_TEXTS {
        if keys.iter().any(|k| tok_key(meta, k).is_some()) {
            continue;
        }
        for name in names.iter() {
            if let Some(&id) = ids.get(*name) {
                control(id);
            }
        }
    }
    for name in EOG_TEXTS {
        if let Some(&id) = ids.get(*name) {
            control(id);
        }
    }
    // gpt-oss: these are always rendered.
    for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(&id) = ids.get(name) {
            attrs[id as usize] = ATTR_USER_DEFINED;
        }
    }
    // o200k_harmony: with <|return|> and <|call|> present, <|end|> is no end of generation.
    if let (Some(_), Some(_), Some(&end)) = (
        ids.get("<|return|>"),
        ids.get("<|call|>"),
        ids.get("<|end|>"),
    ) {
        attrs[end as usize] = ATTR_USER_DEFINED;
    }
}
