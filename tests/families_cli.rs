//! The Llama family through the binary: a SmolLM2-style tied model (no `lm_head.weight`) and a
//! Qwen2 (q/k/v biases, tied) train (with `--export gguf-lora`), evaluate and generate; Mistral's
//! sliding window refuses a longer `--seq-len` before anything is trained. Numerics are in tests/families_parity.rs.
mod common;
use common::qtune;
use std::path::{Path, PathBuf};

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn train(family: &str, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let model = fx(&format!("families/{family}/model"));
    let data = fx("train/data.jsonl");
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "4",
        "--dtype",
        "f32",
        "--lr",
        "1e-2",
        "--batch-size",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    qtune(&args)
}

fn eval(family: &str, adapter: Option<&Path>) -> f64 {
    let model = fx(&format!("families/{family}/model"));
    let data = fx("train/data.jsonl");
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let (ok, out, err) = qtune(&args);
    assert!(ok, "eval {family}: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// Train (with `--export gguf-lora`), then the adapter lowers eval's loss on the data it saw, and
/// generation runs with it; the llama.cpp LoRA file carries the base's llama.cpp architecture and
/// generates as the PEFT adapter does.
fn train_eval_generate(family: &str, gguf_arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = train(family, dir.path(), &["--export", "gguf-lora"]);
    assert!(ok, "train {family}: {err}");
    let adapter = dir.path().join("adapter");
    let lora = dir.path().join("adapter.gguf");
    let meta = qtune::format::gguf::load(&lora).unwrap().gguf_metadata;
    assert_eq!(
        qtune::format::gguf::find(&meta, "general.architecture")
            .and_then(qtune::format::gguf::Value::as_str),
        Some(gguf_arch),
        "{family}"
    );
    let (before, after) = (eval(family, None), eval(family, Some(&adapter)));
    eprintln!("{family}: eval loss {before} -> {after}");
    assert!(
        after.is_finite() && after < before,
        "{family}: {before} -> {after}"
    );
    let model = fx(&format!("families/{family}/model"));
    let gen = |a: &Path| {
        let (ok, out, err) = qtune(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            a.to_str().unwrap(),
            "--prompt",
            "the quick brown fox",
            "--max-tokens",
            "4",
            "--json",
        ]);
        assert!(ok, "generate {family} with {}: {err}", a.display());
        let v: serde_json::Value =
            serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
        assert!(v["tokens"].as_array().is_some_and(|t| !t.is_empty()), "{v}");
        v["tokens"].clone()
    };
    assert_eq!(gen(&adapter), gen(&lora), "{family}");
}

#[test]
fn tied_head_trains_evaluates_generates() {
    train_eval_generate("tied", "llama");
}

#[test]
fn qwen2_trains_evaluates_generates() {
    train_eval_generate("qwen2", "qwen2");
}

#[test]
fn mistral_refuses_seq_len_beyond_window() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = train("mistral", dir.path(), &["--seq-len", "32"]);
    assert!(!ok);
    assert!(
        err.contains("sliding window of 16") && err.contains("--seq-len 16"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = train("mistral", dir.path(), &["--seq-len", "16"]);
    assert!(ok, "{err}");
}
