//! One function per input a stranger controls. Each takes arbitrary bytes, drives qtune's real entry
//! point with them and returns; a panic, an abort, a hang or a huge allocation is the failure the
//! fuzzer looks for. Every `Err` must name what went wrong (`named`).
//!
//! Used by the libFuzzer targets in `fuzz/fuzz_targets/` and, on stable, by
//! `tests/fuzz_regressions.rs` (which includes this file with `#[path]`), so a committed crashing
//! input re-runs in `cargo test` exactly as the fuzzer ran it.
//!
//! Inputs made of several files are sections separated by [`SEP`] (a line libFuzzer's dictionary
//! knows): byte flips mutate each file, splices move whole files.
#![allow(dead_code)]

use qtune::data::template::{ChatTemplate, Message};
use qtune::data::{load_examples, DataOptions, Tokenizer};
use qtune::export::Adapter;
use qtune::models::LlamaConfig;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Separates the files of a multi-file input.
pub const SEP: &[u8] = b"\n--qtune-fuzz-file--\n";

/// Most elements dequantised per input: enough for the first and last row of every tensor of a
/// small file, bounded so a valid file with large (file-backed) tensors keeps an execution short.
const MAX_DEQUANT: usize = 1 << 15;

/// The input's sections (always `n` of them; missing ones are empty).
pub fn sections(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match find(rest, SEP) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[][..]);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A scratch directory of this process (reused: one set of files per execution, overwritten).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("qtune-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
}

/// A fresh, empty subdirectory `name` of the scratch directory.
fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch subdir");
    d
}

/// The committed test fixtures (seeds come from here; some targets need a fixed model).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests/fixtures")
}

/// An error must say something (a named error, not an empty string). With
/// `QTUNE_FUZZ_SHOW_ERRORS=1` every error is printed (to review messages, or to find panics that
/// `data::guard` caught in third-party code: they say "panicked").
fn named(r: qtune::Result<impl Sized>) {
    static SHOW: OnceLock<bool> = OnceLock::new();
    if let Err(e) = r {
        let msg = e.to_string();
        assert!(!msg.trim().is_empty(), "an error with no message");
        if *SHOW.get_or_init(|| std::env::var_os("QTUNE_FUZZ_SHOW_ERRORS").is_some()) {
            eprintln!("qtune error: {msg}");
        }
    }
}

/// Dequantises the first and the last row of every tensor of a store, as the kernels read them
/// (the last row ends at the tensor's last byte), within [`MAX_DEQUANT`] elements per input.
pub fn exercise_store(store: &WeightStore) {
    let mut budget = MAX_DEQUANT;
    let _ = (store.bits_per_weight(), store.nbytes());
    let mut row = Vec::new();
    for t in &store.tensors {
        let m = t.matrix();
        if m.cols == 0 || m.rows == 0 {
            continue;
        }
        for r in [0, m.rows - 1] {
            if budget < m.cols {
                return;
            }
            budget -= m.cols;
            row.resize(m.cols, 0f32);
            m.dequant_tile(r, 1, 0, m.cols, &mut row);
        }
    }
}

/// GGUF: header, metadata, tensor infos, then every tensor view dequantised.
pub fn gguf(data: &[u8]) {
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(data.to_vec());
    let r = qtune::format::gguf::from_shared(Path::new("fuzz.gguf"), owner);
    if let Ok(store) = &r {
        exercise_store(store);
        // What `qtune inspect` prints of it.
        for (k, v) in &store.gguf_metadata {
            let _ = format!("{k} = {v}");
        }
        named(LlamaConfig::from_store(store));
    }
    named(r);
}

/// A GGUF's embedded vocabulary (section 0: the GGUF) built into a tokenizer, then section 1
/// encoded and decoded, and section 2 decoded as token ids.
pub fn gguf_tokenizer(data: &[u8]) {
    let s = sections(data, 3);
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(s[0].to_vec());
    let Ok(store) = qtune::format::gguf::from_shared(Path::new("fuzz.gguf"), owner) else {
        return;
    };
    let tok = Tokenizer::from_gguf(&store);
    if let Ok(tok) = &tok {
        encode_decode(tok, s[1], s[2]);
    }
    named(tok);
}

fn encode_decode(tok: &Tokenizer, text: &[u8], ids: &[u8]) {
    let text = String::from_utf8_lossy(text);
    for special in [false, true] {
        let r = tok.encode(&text, special);
        if let Ok(ids) = &r {
            named(tok.decode(ids));
        }
        named(r);
    }
    let ids: Vec<u32> = ids
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .collect();
    named(tok.decode(&ids));
    for &id in ids.iter().take(8) {
        let _ = tok.id_to_token(id);
    }
    let _ = (tok.vocab_size(), tok.pad_or_eos(), tok.chat_template());
}

/// The tiny Llama model's config (adapters are checked against it).
fn llama_cfg() -> &'static LlamaConfig {
    static CFG: OnceLock<LlamaConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let store = WeightStore::open(&fixtures().join("llama/model")).expect("fixture model");
        LlamaConfig::from_store(&store).expect("fixture config")
    })
}

/// A llama.cpp GGUF LoRA file read as an adapter for the tiny Llama.
pub fn gguf_lora(data: &[u8]) {
    let p = scratch().join("lora.gguf");
    std::fs::write(&p, data).expect("write scratch");
    named(Adapter::load(&p, llama_cfg()));
}

/// A single `.safetensors` file opened as a model, every tensor dequantised.
pub fn safetensors(data: &[u8]) {
    let p = scratch().join("model.safetensors");
    std::fs::write(&p, data).expect("write scratch");
    let r = WeightStore::open(&p);
    if let Ok(store) = &r {
        exercise_store(store);
    }
    named(r);
}

/// A sharded directory: section 0 is `model.safetensors.index.json`, 1 and 2 the shards
/// `model-00001-of-00002.safetensors` and `model-00002-of-00002.safetensors`, 3 `config.json`.
pub fn safetensors_sharded(data: &[u8]) {
    let s = sections(data, 4);
    let d = fresh_dir("sharded");
    std::fs::write(d.join("model.safetensors.index.json"), s[0]).expect("write");
    std::fs::write(d.join("model-00001-of-00002.safetensors"), s[1]).expect("write");
    std::fs::write(d.join("model-00002-of-00002.safetensors"), s[2]).expect("write");
    if !s[3].is_empty() {
        std::fs::write(d.join("config.json"), s[3]).expect("write");
    }
    let r = WeightStore::open(&d);
    if let Ok(store) = &r {
        exercise_store(store);
        named(LlamaConfig::from_store(store));
    }
    named(r);
}

/// A bitsandbytes 4-bit checkpoint directory: section 0 is `model.safetensors` (packed weights,
/// absmax, quant maps and the quant-state JSON tensor), section 1 `config.json`; NF4 tensors are
/// dequantised.
pub fn bnb(data: &[u8]) {
    let s = sections(data, 2);
    let d = fresh_dir("bnb");
    std::fs::write(d.join("model.safetensors"), s[0]).expect("write");
    if !s[1].is_empty() {
        std::fs::write(d.join("config.json"), s[1]).expect("write");
    }
    let r = WeightStore::open(&d);
    if let Ok(store) = &r {
        exercise_store(store);
    }
    named(r);
}

/// A model directory's tokenizer: section 0 `tokenizer.json`, 1 `tokenizer_config.json`, 2 text
/// encoded and decoded, 3 token ids decoded.
pub fn tokenizer_json(data: &[u8]) {
    let s = sections(data, 4);
    let d = fresh_dir("tok");
    std::fs::write(d.join("tokenizer.json"), s[0]).expect("write");
    if !s[1].is_empty() {
        std::fs::write(d.join("tokenizer_config.json"), s[1]).expect("write");
    }
    // Without the BPE word cache: tokenizers 0.23 never frees a dropped model's cache entries
    // (Tokenizer::without_word_cache), which grew this process ~2-5 kB per input.
    let tok = Tokenizer::from_model_dir(&d).map(Tokenizer::without_word_cache);
    if let Ok(tok) = &tok {
        encode_decode(tok, s[2], s[3]);
    }
    named(tok);
}

/// A chat template (section 0, as a model file ships it) rendered over a conversation: section 1,
/// one message per line, `role: content` (lines without a colon are user turns).
pub fn chat_template(data: &[u8]) {
    let s = sections(data, 2);
    let src = String::from_utf8_lossy(s[0]);
    let t = ChatTemplate::new(&src, "<s>", "</s>");
    if let Ok(t) = &t {
        let text = String::from_utf8_lossy(s[1]);
        let messages: Vec<Message> = text
            .lines()
            .take(16)
            .map(|l| match l.split_once(':') {
                Some((r, c)) => Message {
                    role: r.trim().to_string(),
                    content: c.to_string(),
                },
                None => Message {
                    role: "user".into(),
                    content: l.to_string(),
                },
            })
            .collect();
        named(t.render(&messages, true));
        named(t.segments(&messages));
    }
    named(t);
}

/// The chat model's tokenizer (fixture), loaded once.
fn chat_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_model_dir(&fixtures().join("data/model_chat")).expect("fixture tokenizer")
    })
}

/// A JSONL training file (section 1) in any format (text, alpaca, prompt/completion, messages),
/// with options from byte 0 of section 0 and, if section 0 has more, a chat template from the rest.
pub fn jsonl(data: &[u8]) {
    let s = sections(data, 2);
    let flags = s[0].first().copied().unwrap_or(0);
    let template = (s[0].len() > 1).then(|| String::from_utf8_lossy(&s[0][1..]).into_owned());
    let opts = DataOptions {
        train_on_prompt: flags & 1 != 0,
        packing: flags & 2 != 0,
        seq_len: 2 + (flags >> 2) as usize * 4,
        // A template that names an existing file would read it: only Jinja text or a builtin.
        template: template.filter(|t| !Path::new(t).exists()),
    };
    let p = scratch().join("data.jsonl");
    std::fs::write(&p, s[1]).expect("write scratch");
    named(load_examples(&p, chat_tokenizer(), &opts));
}

/// A PEFT adapter directory (section 0 `adapter_config.json`, section 1
/// `adapter_model.safetensors`) loaded against the tiny Llama.
pub fn peft_adapter(data: &[u8]) {
    let s = sections(data, 2);
    let d = fresh_dir("peft");
    std::fs::write(d.join("adapter_config.json"), s[0]).expect("write");
    std::fs::write(d.join("adapter_model.safetensors"), s[1]).expect("write");
    named(Adapter::load(&d, llama_cfg()));
}

/// A `qtune.toml` training config: parsed, resolved over the defaults, every derived value asked.
pub fn config_toml(data: &[u8]) {
    use qtune::train::config::TrainConfig;
    let p = scratch().join("qtune.toml");
    std::fs::write(&p, data).expect("write scratch");
    let t = TrainConfig::table_from_file(&p);
    if let Ok(t) = &t {
        let cfg = TrainConfig::resolve(std::slice::from_ref(t), Some(&p));
        if let Ok(c) = &cfg {
            named(c.quant_type());
            named(c.schedule_kind());
            named(c.compute_dtype(None));
            named(c.max_memory_bytes());
            let _ = c.moment_storage();
            let _ = c.to_toml();
        }
        named(cfg);
    }
    named(t);
}

/// Runs the named target's function on `data` (the regression test's dispatcher).
pub fn run(target: &str, data: &[u8]) -> bool {
    let f: fn(&[u8]) = match target {
        "gguf" => gguf,
        "gguf_tokenizer" => gguf_tokenizer,
        "gguf_lora" => gguf_lora,
        "safetensors" => safetensors,
        "safetensors_sharded" => safetensors_sharded,
        "bnb" => bnb,
        "tokenizer_json" => tokenizer_json,
        "chat_template" => chat_template,
        "jsonl" => jsonl,
        "peft_adapter" => peft_adapter,
        "config_toml" => config_toml,
        _ => return false,
    };
    f(data);
    true
}
