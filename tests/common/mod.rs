//! Helpers shared by the export / merge / generate tests (`mod common;` in each test crate; a crate
//! uses only some of them).
#![allow(dead_code)]
use candle_core::Tensor;
use std::path::Path;
use std::process::Command;

/// max |a - b| / max |b| over all elements.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)) as f64
}

/// Runs the qtune binary: (success, stdout, stderr).
pub fn qtune(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Two GGUF LoRA files hold the same adapter: the same LoRA metadata, the same tensors with the same
/// types, shapes and bytes.
pub fn assert_same_gguf_lora(ours: &Path, theirs: &Path) {
    use qtune::format::gguf;
    let a = gguf::load(ours).unwrap();
    let b = gguf::load(theirs).unwrap();
    for key in [
        "general.type",
        "adapter.type",
        "adapter.lora.alpha",
        "general.architecture",
    ] {
        assert_eq!(
            gguf::find(&a.gguf_metadata, key),
            gguf::find(&b.gguf_metadata, key),
            "{key}"
        );
    }
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &b.tensors {
        let o = a
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!((o.qtype, &o.shape), (t.qtype, &t.shape), "{}", t.name);
        // Same values bit for bit: rows reordered exactly as llama.cpp's converter does.
        assert!(o.data.as_slice() == t.data.as_slice(), "{} differs", t.name);
    }
}

/// `qtune export --format gguf-lora` of `adapter` for `model` to `lora`, then `qtune merge --type
/// q8_0` to `merged`; both must succeed. Returns merge's stdout.
pub fn export_then_merge(model: &Path, adapter: &Path, lora: &Path, merged: &Path) -> String {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (m, a) = (s(model), s(adapter));
    let (ok, _, err) = qtune(&[
        "export",
        "--model",
        &m,
        "--adapter",
        &a,
        "--format",
        "gguf-lora",
        "--out",
        &s(lora),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = qtune(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        &a,
        "--type",
        "q8_0",
        "--out",
        &s(merged),
    ]);
    assert!(ok, "{err}");
    out
}
