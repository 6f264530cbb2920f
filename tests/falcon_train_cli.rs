//! `qtune train` drives Falcon through the same loop as Llama: a Falcon-7B-layout directory
//! (multi-query, fused qkv) quantised to NF4 at load trains, and the adapter carries PEFT's Falcon
//! names.
use std::path::PathBuf;
use std::process::Command;

#[test]
fn train_falcon_end_to_end() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/falcon/mq/model");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"the quick\", \"completion\": \" brown fox\"}\n{\"prompt\": \"hello\", \"completion\": \" world\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--quant",
            "nf4",
        ])
        .args(["--targets", "query_key_value,dense"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let cfg = std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap();
    assert!(
        cfg.contains("query_key_value") && cfg.contains("\"dense\""),
        "{cfg}"
    );
    let (acfg, tensors) = qtune::lora::adapter::load_peft(&out.join("adapter")).unwrap();
    assert_eq!(acfg.r, 8);
    assert!(tensors
        .iter()
        .any(|(n, _)| n.ends_with("self_attention.query_key_value.lora_B.weight")));
}

/// The same through a Falcon GGUF that `qtune quantize` wrote (llama.cpp's `falcon` names and fused
/// qkv layout, Q8_0, tokenizer from the GGUF's own vocabulary).
#[test]
fn train_falcon_gguf_end_to_end() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/falcon/mq/model");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("falcon-q8_0.gguf");
    let q = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "quantize",
            "--model",
            model.to_str().unwrap(),
            "--type",
            "q8_0",
        ])
        .args(["--out", gguf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"the quick brown fox\"}\n{\"text\": \"hello world\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "train",
            "--model",
            gguf.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--batch-size",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, tensors) = qtune::lora::adapter::load_peft(&out.join("adapter")).unwrap();
    assert!(tensors
        .iter()
        .any(|(n, _)| n.ends_with("mlp.dense_4h_to_h.lora_A.weight")));
}

/// A mixed-type Falcon GGUF, as llama.cpp's K-quant Falcon files are (4544-wide rows fall back to
/// other types): attention in Q8_0 and the MLP in Q4_0, assembled from two `qtune quantize` outputs
/// with our GGUF writer; it loads and trains.
#[test]
fn train_falcon_mixed_type_gguf() {
    use qtune::format::gguf::{GgufWriter, TensorPlan};
    use qtune::store::WeightStore;
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/falcon/mq/model");
    let dir = tempfile::tempdir().unwrap();
    let quant = |t: &str| {
        let p = dir.path().join(format!("falcon-{t}.gguf"));
        let q = Command::new(env!("CARGO_BIN_EXE_qtune"))
            .args(["quantize", "--model", model.to_str().unwrap(), "--type", t])
            .args(["--out", p.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
        WeightStore::open(&p).unwrap()
    };
    let (q8, q4) = (quant("q8_0"), quant("q4_0"));
    let pick = |name: &str| if name.contains(".ffn_") { &q4 } else { &q8 };
    let mixed = dir.path().join("falcon-mixed.gguf");
    let plan = q8
        .tensors
        .iter()
        .map(|t| {
            let src = pick(&t.name).get(&t.name).unwrap();
            TensorPlan {
                name: t.name.clone(),
                qtype: src.qtype,
                shape: src.shape.clone(),
            }
        })
        .collect();
    let mut w = GgufWriter::create(&mixed, &q8.gguf_metadata, plan).unwrap();
    for t in &q8.tensors {
        w.write_tensor(pick(&t.name).get(&t.name).unwrap().data.as_slice())
            .unwrap();
    }
    w.finish().unwrap();
    let store = WeightStore::open(&mixed).unwrap();
    let types: std::collections::BTreeSet<&str> =
        store.tensors.iter().map(|t| t.qtype.name()).collect();
    assert!(
        types.contains("Q4_0") && types.contains("Q8_0"),
        "{types:?}"
    );
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"the quick brown fox\"}\n{\"text\": \"hello world\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "train",
            "--model",
            mixed.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "2",
            "--batch-size",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("adapter/adapter_model.safetensors").exists());
}
