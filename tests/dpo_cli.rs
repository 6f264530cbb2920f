//! `qtune train --objective dpo` through the binary: the reference is the base (so a zero-B adapter
//! starts at exactly ln 2), `--precompute-ref` gives the same losses, `--ref-adapter` is the
//! reference, resume is bit-identical, conversational pairs render through the chat template, and
//! bad pairs are refused by `file:line`. (Parity with TRL's DPOTrainer: tests/dpo_trl.rs.)
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fx(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

fn qtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qtune"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

fn run_ok(args: &[&str]) {
    let o = qtune(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn fails_with(args: &[&str], needle: &str) {
    let o = qtune(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
}

/// `key` of every metrics line that has it.
fn series(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

fn args(out: &Path) -> Vec<String> {
    [
        "--objective",
        "dpo",
        "--beta",
        "0.1",
        "--model",
        &fx("tests/fixtures/llama/model"),
        "--data",
        &fx("tests/fixtures/dpo_cli/pairs.jsonl"),
        "--eval-data",
        &fx("tests/fixtures/dpo_cli/pairs.jsonl"),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        "--dropout",
        "0.1",
        "--save-every",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(a: &[String]) {
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    run_ok(&a);
}

#[test]
fn starts_at_ln2_learns_and_precomputing_the_reference_changes_nothing() {
    let a = tempfile::tempdir().unwrap();
    run(&args(a.path()));
    let evals = series(a.path(), "eval_loss");
    // LoRA's B starts at zero: the policy is the reference, so every pair's loss is ln 2.
    assert!(
        (evals[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{evals:?}"
    );
    assert!(evals.last().unwrap() < &(evals[0] - 0.01), "{evals:?}");
    assert_eq!(series(a.path(), "pairs"), vec![2.0; 6]);
    for k in [
        "rewards_chosen",
        "rewards_rejected",
        "rewards_margin",
        "rewards_accuracy",
    ] {
        assert_eq!(series(a.path(), k).len(), 6, "{k}");
    }
    let b = tempfile::tempdir().unwrap();
    let mut pa = args(b.path());
    pa.push("--precompute-ref".into());
    run(&pa);
    assert!(b.path().join("ref_logps.json").is_file());
    let (la, lb) = (series(a.path(), "loss"), series(b.path(), "loss"));
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-6, "{la:?} vs {lb:?}");
    }
}

#[test]
fn resume_is_bit_identical_with_and_without_precomputed_reference() {
    for pre in [false, true] {
        let full = tempfile::tempdir().unwrap();
        let mut a = args(full.path());
        if pre {
            a.push("--precompute-ref".into());
        }
        run(&a);
        let part = tempfile::tempdir().unwrap();
        let mut a = args(part.path());
        if pre {
            a.push("--precompute-ref".into());
        }
        a.extend(["--stop-after".into(), "3".into()]);
        run(&a);
        run_ok(&["--resume", part.path().to_str().unwrap()]);
        let f = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
        assert_eq!(f(full.path()), f(part.path()), "precompute {pre}");
        assert_eq!(series(full.path(), "loss"), series(part.path(), "loss"));
    }
}

#[test]
fn the_reference_adapter_is_the_reference() {
    // Train an adapter, then start DPO from it with it as the reference: ln 2 again at step 0.
    let sft = tempfile::tempdir().unwrap();
    run(&args(sft.path()));
    let init = sft.path().join("adapter").display().to_string();
    let d = tempfile::tempdir().unwrap();
    let mut a = args(d.path());
    a.extend([
        "--adapter-init".into(),
        init.clone(),
        "--ref-adapter".into(),
        init,
    ]);
    run(&a);
    let evals = series(d.path(), "eval_loss");
    assert!(
        (evals[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{evals:?}"
    );
    // Without --ref-adapter the same start is not at ln 2 (the reference is the base).
    let e = tempfile::tempdir().unwrap();
    let mut a = args(e.path());
    let init = sft.path().join("adapter").display().to_string();
    a.extend(["--adapter-init".into(), init]);
    run(&a);
    let evals = series(e.path(), "eval_loss");
    assert!(
        (evals[0] - std::f64::consts::LN_2).abs() > 1e-3,
        "{evals:?}"
    );
}

#[test]
fn conversational_pairs_render_through_the_chat_template() {
    let d = tempfile::tempdir().unwrap();
    let mut a = args(d.path());
    let i = a.iter().position(|s| s == "--data").unwrap();
    a[i + 1] = fx("tests/fixtures/dpo_cli/chat.jsonl");
    let j = a.iter().position(|s| s == "--eval-data").unwrap();
    a.drain(j..j + 2);
    let k = a.iter().position(|s| s == "--steps").unwrap();
    a[k + 1] = "2".into();
    a.extend(["--chat-template".into(), "chatml".into()]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = qtune(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("2 pairs (Conversational)"), "{err}");
}

#[test]
fn bad_pairs_are_refused_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let m = fx("tests/fixtures/llama/model");
    for (line, needle) in [
        (r#"{"prompt": "a", "chosen": "b"}"#, "missing \"rejected\""),
        (
            r#"{"prompt": "a", "chosen": "", "rejected": "c"}"#,
            "empty \"chosen\"",
        ),
        (
            r#"{"prompt": "a", "chosen": "b", "rejected": "b"}"#,
            "\"chosen\" and \"rejected\" are the same: the pair holds no preference",
        ),
        (
            r#"{"prompt": "a", "completion": "b"}"#,
            "this is supervised data (key \"completion\"), not preference pairs; train on it \
             with --objective sft",
        ),
    ] {
        let p = dir.path().join("bad.jsonl");
        std::fs::write(
            &p,
            format!("{{\"prompt\": \"x\", \"chosen\": \"y\", \"rejected\": \"z\"}}\n{line}\n"),
        )
        .unwrap();
        let args = [
            "--objective",
            "dpo",
            "--model",
            &m,
            "--data",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        // One run: the message names the line and what is wrong with it.
        fails_with(&args, &format!("bad.jsonl:2: {needle}"));
    }
    // A pairs file given to SFT.
    fails_with(
        &[
            "--model",
            &m,
            "--data",
            &fx("tests/fixtures/dpo_cli/pairs.jsonl"),
            "--out",
            out.to_str().unwrap(),
        ],
        "--objective dpo",
    );
    fails_with(
        &["--objective", "ppo", "--model", &m, "--data", "x"],
        "--objective",
    );
}

#[test]
fn eval_reports_the_runs_final_dpo_loss_and_export_writes_gguf_lora() {
    let d = tempfile::tempdir().unwrap();
    let mut a = args(d.path());
    a.extend(["--export".into(), "gguf-lora".into()]);
    run(&a);
    assert!(d.path().join("adapter.gguf").is_file());
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "eval",
            "--objective",
            "dpo",
            "--json",
            // the run's dtype: eval resolves `auto` as train does (by CPU and model width)
            "--dtype",
            "auto",
            "--model",
            &fx("tests/fixtures/llama/model"),
            "--adapter",
            d.path().join("adapter").to_str().unwrap(),
            "--data",
            &fx("tests/fixtures/dpo_cli/pairs.jsonl"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let last = *series(d.path(), "eval_loss").last().unwrap();
    assert!(
        (v["loss"].as_f64().unwrap() - last).abs() < 1e-6,
        "{v} vs {last}"
    );
    assert_eq!(v["pairs"], 4);
}
