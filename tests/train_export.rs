//! `qtune train --export gguf-lora` writes llama.cpp's LoRA file beside the PEFT adapter, and it
//! holds the trained factors (read back through the export module's GGUF LoRA reader), for Llama
//! and Falcon bases.
use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn data(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("d.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"the quick\", \"completion\": \" brown fox\"}\n{\"prompt\": \"hello\", \"completion\": \" world\"}\n",
    )
    .unwrap();
    p
}

#[test]
fn train_writes_gguf_lora_beside_peft() {
    let model = fixtures().join("llama/model");
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--batch-size",
            "2",
        ])
        .args(["--lr", "1e-2", "--export", "gguf-lora"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gguf_path = out.join("adapter.gguf");
    let store = qtune::store::WeightStore::open(&gguf_path).unwrap();
    let ty =
        qtune::format::gguf::find(&store.gguf_metadata, "general.type").and_then(|v| v.as_str());
    assert_eq!(ty, Some("adapter"));
    let cfg =
        qtune::models::LlamaConfig::from_store(&qtune::store::WeightStore::open(&model).unwrap())
            .unwrap();
    // The GGUF LoRA read back (q/k rows un-permuted) equals the PEFT adapter written beside it.
    let from_gguf = qtune::export::Adapter::load(&gguf_path, &cfg).unwrap();
    let from_peft = qtune::export::Adapter::load(&out.join("adapter"), &cfg).unwrap();
    assert_eq!(from_gguf.r, from_peft.r);
    assert!((from_gguf.scale - from_peft.scale).abs() < 1e-12);
    assert_eq!(from_gguf.modules.len(), from_peft.modules.len());
    for (g, p) in from_gguf.modules.iter().zip(&from_peft.modules) {
        assert_eq!((g.layer, g.proj), (p.layer, p.proj));
        // f32 export: exact, after the GGUF reader undoes llama.cpp's q/k row permutation.
        assert!(g.a == p.a && g.b == p.b, "layer {} {}", g.layer, g.proj);
    }
    assert!(
        from_peft
            .modules
            .iter()
            .any(|m| m.b.iter().any(|&x| x != 0.0)),
        "B was trained"
    );
}

/// A Falcon base (grouped-KV layout, whose fused qkv rows llama.cpp regroups) trains with
/// `--export gguf-lora` too: the file read back equals the PEFT adapter, and the greedy
/// before/after generation runs.
#[test]
fn train_writes_gguf_lora_for_falcon() {
    let model = fixtures().join("falcon_export/gqa/model");
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap(), "--steps", "3"])
        .args([
            "--targets",
            "all-linear",
            "--lr",
            "1e-2",
            "--export",
            "gguf-lora",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("after training"), "{stdout}");
    let store = qtune::store::WeightStore::open(&model).unwrap();
    let cfg = qtune::export::BaseConfig::from_store(&store).unwrap();
    let from_gguf = qtune::export::Adapter::load(&out.join("adapter.gguf"), &cfg).unwrap();
    let from_peft = qtune::export::Adapter::load(&out.join("adapter"), &cfg).unwrap();
    assert_eq!(from_gguf.modules.len(), 8);
    assert_eq!(from_gguf.modules.len(), from_peft.modules.len());
    for (g, p) in from_gguf.modules.iter().zip(&from_peft.modules) {
        assert_eq!((g.layer, g.proj), (p.layer, p.proj));
        assert!(g.a == p.a && g.b == p.b, "layer {} {}", g.layer, g.proj);
    }
}
