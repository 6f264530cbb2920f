//! The `export`, `merge` and `generate` subcommands end to end: outputs appear only on success,
//! errors name the problem, `generate --json` ends with the documented JSON line.
use std::path::{Path, PathBuf};

mod common;
use common::{export_then_merge, qtune};

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn export_merge_generate_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let model = fx().join("llama/model");
    let adapter = fx().join("llama/f32/adapter");
    let m = model.to_str().unwrap();
    let lora = d.path().join("sub/lora.gguf");
    let merged = d.path().join("merged.gguf");
    export_then_merge(&model, &adapter, &lora, &merged);
    assert!(lora.exists() && merged.exists());
    let (ok, out, err) = qtune(&[
        "generate",
        "--model",
        m,
        "--adapter",
        lora.to_str().unwrap(),
        "--prompt",
        "the quick brown fox",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap();
    let j: serde_json::Value = serde_json::from_str(last).unwrap();
    for k in ["prompt_tokens", "tokens", "text", "tokens_per_s"] {
        assert!(j.get(k).is_some(), "{k} missing in {last}");
    }
    assert!(!j["tokens"].as_array().unwrap().is_empty());
    assert!(err.contains("tokens/s"), "{err}");
    // Bad input: an adapter config without a rank -> named error, nothing written.
    let bad = d.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        bad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v.as_object_mut().unwrap().remove("r");
    std::fs::write(bad.join("adapter_config.json"), v.to_string()).unwrap();
    for (cmd, out) in [
        ("export", d.path().join("x/y.gguf")),
        ("merge", d.path().join("x/z.gguf")),
    ] {
        let mut args = vec![
            cmd,
            "--model",
            m,
            "--adapter",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if cmd == "export" {
            args.extend(["--format", "gguf-lora"]);
        }
        let (ok, _, err) = qtune(&args);
        assert!(!ok);
        assert!(err.contains("'r' is missing"), "{err}");
        assert!(!d.path().join("x").exists(), "{cmd} wrote before failing");
    }
}
