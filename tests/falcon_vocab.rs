//! A Falcon GGUF with Falcon's real tokenizer, as llama.cpp's own converter writes it
//! (tests/fixtures/falcon_vocab/falcon-q8_0.gguf, from tests/reference/gen_falcon_vocab_gguf.py):
//! a tiny random Falcon in Falcon-7B's layout (multi-query, parallel attention, tied head, hidden
//! 32) whose `tokenizer.json` was rebuilt from llama.cpp's `ggml-vocab-falcon.gguf` with
//! falcon-7b's pre-tokenizer; the unmodified converter named it `falcon` by its own hash. Here:
//! qtune's tokenizer on it gives llama.cpp's ids, the model with a PEFT adapter gives the logits
//! and greedy tokens of transformers with PEFT, `export --format gguf-lora` from it writes what
//! llama.cpp's converter writes, and `train`, `generate` and `export` run on it from the command
//! line (the reference script also had llama.cpp apply the exported LoRA: its figures are in
//! expected.json).
use candle_core::{Device, Tensor};
use qtune::data::Tokenizer;
use qtune::export::{base_architecture, write_gguf_lora, Adapter, BaseConfig};
use qtune::format::gguf::{self, Value};
use qtune::generate::{generate, Generator, Sampling};
use qtune::models::{CausalLm, Falcon, FalconOptions};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_same_gguf_lora, qtune, rel};

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/falcon_vocab")
}

fn model() -> PathBuf {
    fx().join("falcon-q8_0.gguf")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fx().join("expected.json")).unwrap()).unwrap()
}

fn ids(key: &str) -> Vec<u32> {
    serde_json::from_value(expected()[key].clone()).unwrap()
}

fn reference(name: &str) -> Tensor {
    candle_core::safetensors::load(fx().join("logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove(name)
        .unwrap()
}

fn load_adapter(store: &WeightStore, path: &Path) -> Adapter {
    Adapter::load(path, BaseConfig::from_store(store).unwrap()).unwrap()
}

/// Logits `(T, V)` of the training model on the fixture, with `adapter` unmerged (or none).
fn logits(store: &WeightStore, adapter: Option<&Adapter>) -> Tensor {
    let m = Falcon::load(
        store,
        FalconOptions {
            lora: adapter.map(Adapter::spec),
            ..FalconOptions::default()
        },
    )
    .unwrap();
    if let Some(a) = adapter {
        a.apply(&m).unwrap();
    }
    let v = ids("input_ids");
    let x = Tensor::from_vec(v.clone(), (1, v.len()), &Device::Cpu).unwrap();
    CausalLm::forward(&m, &x, None).unwrap().squeeze(0).unwrap()
}

/// The file is what the converter wrote for Falcon-7B's tokenizer: pre-tokenizer `falcon`, the
/// full 65024-token vocabulary with its 12 control tokens, and a tied head (no `output.weight`).
#[test]
fn the_converter_named_the_pre_tokenizer_falcon() {
    let g = gguf::load(&model()).unwrap();
    let s = |k: &str| gguf::find(&g.gguf_metadata, k).and_then(Value::as_str);
    assert_eq!(s("general.architecture"), Some("falcon"));
    assert_eq!(s("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(s("tokenizer.ggml.pre"), Some("falcon"));
    assert!(g.get("output.weight").is_none());
    assert_eq!(g.get("token_embd.weight").unwrap().qtype, QType::Q8_0);
    let tk = Tokenizer::for_model(&model()).unwrap();
    assert_eq!(tk.vocab_size(), 65024);
    assert_eq!(tk.encode_with(">>TITLE<<", false, true).unwrap(), [0]);
    assert_eq!(tk.encode_with("<|endoftext|>", false, true).unwrap(), [11]);
}

/// qtune's tokenizer on the fixture gives llama.cpp's ids (and llama.cpp's detokenised text) for
/// random strings tokenised by llama.cpp on this very file (tokens.jsonl).
#[test]
fn tokenizer_matches_llama_cpp_on_the_file() {
    let tk = Tokenizer::for_model(&model()).unwrap();
    let text = std::fs::read_to_string(fx().join("tokens.jsonl")).unwrap();
    let (mut n, mut bad) = (0, Vec::new());
    for line in text.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        let t = rec["t"].as_str().unwrap();
        let (add, special) = (rec["b"].as_bool().unwrap(), rec["s"].as_bool().unwrap());
        let want: Vec<u32> = serde_json::from_value(rec["ids"].clone()).unwrap();
        let got = tk.encode_with(t, add, special).unwrap();
        if got != want {
            bad.push(format!("{t:?} ({add}, {special}): {got:?} != {want:?}"));
        }
        let want_text = rec.get("d").and_then(|d| d.as_str()).unwrap_or(t);
        let got_text = tk.decode(&want).unwrap();
        if got_text != want_text {
            bad.push(format!("decode {want:?}: {got_text:?} != {want_text:?}"));
        }
        n += 1;
    }
    assert!(n >= 300, "{n} strings");
    assert!(
        bad.is_empty(),
        "{} of {n} differ, first: {}",
        bad.len(),
        bad[0]
    );
}

/// The columns the reference keeps (every `logits_column_stride`-th of the vocabulary).
fn columns(logits: &Tensor) -> Tensor {
    let stride = expected()["logits_column_stride"].as_u64().unwrap() as u32;
    let v = logits.dim(1).unwrap() as u32;
    let idx = Tensor::arange_step(0u32, v, stride, &Device::Cpu).unwrap();
    logits.index_select(&idx, 1).unwrap()
}

/// The fixed PEFT adapter on the Q8_0 file gives transformers + PEFT's logits on the weights the
/// file holds; llama.cpp's own LoRA file of that adapter (its convert_lora_to_gguf.py) too.
#[test]
fn logits_match_transformers_peft() {
    let store = WeightStore::open(&model()).unwrap();
    assert_eq!(logits(&store, None).dim(1).unwrap(), 65024);
    let r = rel(&columns(&logits(&store, None)), &reference("transformers"));
    eprintln!("base vs transformers: {r:.2e}");
    assert!(r < 1e-5, "{r:e}");
    let want = reference("transformers_peft");
    for a in ["adapter", "llamacpp-lora-f32.gguf"] {
        let ad = load_adapter(&store, &fx().join(a));
        let r = rel(&columns(&logits(&store, Some(&ad))), &want);
        eprintln!("{a} vs transformers + PEFT: {r:.2e}");
        assert!(r < 1e-5, "{a}: {r:e}");
    }
    // The adapter moves the logits by far more than the tolerance.
    assert!(rel(&reference("transformers"), &want) > 1e-2);
}

/// `export --format gguf-lora` from this base writes llama.cpp's converter's file bit for bit.
#[test]
fn gguf_lora_equals_llama_cpp_converter() {
    let store = WeightStore::open(&model()).unwrap();
    let cfg = BaseConfig::from_store(&store).unwrap();
    let ad = Adapter::load(&fx().join("adapter"), &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.gguf");
    write_gguf_lora(&ad, &cfg, &base_architecture(&store), QType::F32, &ours).unwrap();
    assert_same_gguf_lora(&ours, &fx().join("llamacpp-lora-f32.gguf"));
}

/// Greedy decoding with the adapter: transformers + PEFT `generate`'s 32 tokens.
#[test]
fn greedy_matches_transformers_peft_generate() {
    let store = WeightStore::open(&model()).unwrap();
    let ad = load_adapter(&store, &fx().join("adapter"));
    let g = Generator::new(&store, Some(&ad)).unwrap();
    let r = generate(
        &g,
        &ids("gen_prompt"),
        32,
        &Sampling::default(),
        &[],
        |_| {},
    )
    .unwrap();
    assert_eq!(r.tokens, ids("gen_tokens"));
}

/// The user's path on the file: train a few LoRA steps with `--export gguf-lora`, generate from
/// text with the file's own tokenizer, and `export` of the trained adapter equals the file the
/// trainer wrote.
#[test]
fn train_generate_export_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/data.jsonl");
    let run = d.path().join("run");
    let (ok, out, err) = qtune(&[
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "6",
        "--seq-len",
        "64",
        "--batch-size",
        "1",
        "--lr",
        "1e-2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--out",
        run.to_str().unwrap(),
        "--export",
        "gguf-lora",
    ]);
    assert!(ok, "train: {err}\n{out}");
    let adapter = run.join("adapter");
    let lora = run.join("adapter.gguf");
    let store = WeightStore::open(&model()).unwrap();
    let ad = load_adapter(&store, &adapter);
    // Training moved the adapter off its zero-B start.
    assert!(rel(&logits(&store, Some(&ad)), &logits(&store, None)) > 1e-4);
    let again = d.path().join("again.gguf");
    let (ok, _, err) = qtune(&[
        "export",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--format",
        "gguf-lora",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(ok, "export: {err}");
    assert_same_gguf_lora(&again, &lora);
    // The GGUF LoRA and the PEFT directory are the same adapter to the model.
    let r = rel(
        &logits(&store, Some(&load_adapter(&store, &lora))),
        &logits(&store, Some(&ad)),
    );
    assert!(r < 1e-6, "{r:e}");
    let (ok, out, err) = qtune(&[
        "generate",
        "--model",
        m,
        "--adapter",
        lora.to_str().unwrap(),
        "--prompt",
        "The falcon flies over 1234 hills",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "generate: {err}");
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j["tokens"].as_array().unwrap().len(), 8);
    assert!(j["text"].is_string());
}
