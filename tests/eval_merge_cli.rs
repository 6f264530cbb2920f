//! `qtune eval` and merging into a bitsandbytes NF4 base, through the binary: the eval loss of the
//! base with PEFT's initial adapter is PEFT's first training loss on that example; a merged NF4
//! base evaluates as the unmerged adapter (f32 output) and the requantised outputs load and run.
mod common;
use common::qtune;
use std::path::{Path, PathBuf};

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// `qtune eval ... --json`'s loss.
fn eval(model: &Path, adapter: Option<&Path>, data: &Path) -> f64 {
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let mut args = vec!["eval", "--model", m, "--data", d, "--json"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let (ok, out, err) = qtune(&args);
    assert!(ok, "eval {m}: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

fn first_line(src: &Path, dir: &Path) -> PathBuf {
    let p = dir.join(src.file_name().unwrap());
    let line = std::fs::read_to_string(src).unwrap();
    std::fs::write(&p, line.lines().next().unwrap()).unwrap();
    p
}

#[test]
fn eval_loss_is_peft_first_step_loss() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx("train/expected.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (file, key) in [("data.jsonl", "losses"), ("text.jsonl", "text_losses")] {
        let data = first_line(&fx("train").join(file), dir.path());
        let got = eval(&fx("llama/model"), Some(&fx("llama/f32/adapter")), &data);
        let w = want[key][0].as_f64().unwrap();
        eprintln!("{file}: qtune eval {got}, PEFT step-1 loss {w}");
        // The same bound as the training parity test (f32, ~2e-5 relative).
        assert!((got - w).abs() < 1e-4, "{file}: qtune {got}, PEFT {w}");
    }
}

fn merge(base: &Path, adapter: &Path, out: &Path, t: &str) {
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let (b, a, o) = (p(base), p(adapter), p(out));
    let args = [
        "merge",
        "--model",
        &b,
        "--adapter",
        &a,
        "--out",
        &o,
        "--type",
        t,
    ];
    let (ok, _, err) = qtune(&args);
    assert!(ok, "merge --type {t}: {err}");
}

#[test]
fn merging_into_a_bnb_nf4_base() {
    let dir = tempfile::tempdir().unwrap();
    let hf = qtune::store::WeightStore::open(&fx("llama/model")).unwrap();
    let nf4 = dir.path().join("nf4");
    qtune::format::bnb::write_nf4_dir(&hf, &nf4).unwrap();
    let adapter = fx("llama/f32/adapter");
    let data = fx("train/data.jsonl");
    let unmerged = eval(&nf4, Some(&adapter), &data);

    // f32 output: the NF4 weights dequantised plus the delta; equal to the unmerged adapter.
    let f32_dir = dir.path().join("merged-f32");
    merge(&nf4, &adapter, &f32_dir, "f32");
    let cfg = std::fs::read_to_string(f32_dir.join("config.json")).unwrap();
    assert!(
        !cfg.contains("quantization_config"),
        "a float merge must drop the bnb quantization_config"
    );
    let merged = eval(&f32_dir, None, &data);
    eprintln!("NF4 base: unmerged {unmerged}, merged f32 {merged}");
    assert!(((merged - unmerged) / unmerged).abs() < 1e-5);

    // Requantised outputs: an NF4 directory (bitsandbytes layout) and a Q8_0 GGUF load and run.
    let nf4_out = dir.path().join("merged-nf4");
    let q8_out = dir.path().join("merged.q8_0.gguf");
    merge(&nf4, &adapter, &nf4_out, "nf4");
    merge(&nf4, &adapter, &q8_out, "q8_0");
    let s = qtune::store::WeightStore::open(&nf4_out).unwrap();
    assert_eq!(s.format, qtune::store::SourceFormat::BnbNf4);
    for out in [&nf4_out, &q8_out] {
        let l = eval(out, None, &data);
        eprintln!("{}: {l} (unmerged {unmerged})", out.display());
        assert!(l.is_finite());
    }
}

#[test]
fn eval_refuses_an_adapter_for_another_model() {
    let data = fx("train/data.jsonl");
    let (ok, _, err) = qtune(&[
        "eval",
        "--model",
        fx("llama/model").to_str().unwrap(),
        "--adapter",
        fx("falcon/mq/f32/adapter").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("falcon/mq/f32/adapter"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    eprintln!("{err}");
}
