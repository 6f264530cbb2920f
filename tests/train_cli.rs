//! `qtune train` end to end: JSONL through the tokenizer to PEFT's losses, config file vs flags,
//! resume bit-identity through the binary, and bad input.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qtune"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

fn expected() -> serde_json::Value {
    let p = root().join("tests/fixtures/train/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn fx(p: &str) -> String {
    root().join(p).display().to_string()
}

fn step_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

fn parity(data: &str, key: &str) {
    let want: Vec<f64> = serde_json::from_value(expected()[key].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = want.len().to_string();
    let o = qtune(&[
        "--model",
        &fx("tests/fixtures/llama/model"),
        "--data",
        &fx(data),
        "--adapter-init",
        &fx("tests/fixtures/llama/f32/adapter"),
        "--steps",
        &steps,
        "--dtype",
        "f32",
        "--batch-size",
        "1",
        "--grad-accum",
        "1",
        "--dropout",
        "0",
        "--schedule",
        "constant",
        "--max-grad-norm",
        "0",
        "--lr",
        "1e-2",
        "--shuffle",
        "false",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = step_losses(dir.path());
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-4,
            "{data} step {}: qtune {g}, PEFT {w}",
            i + 1
        );
    }
}

#[test]
fn prompt_completion_jsonl_reproduces_peft_losses() {
    parity("tests/fixtures/train/data.jsonl", "losses");
}

#[test]
fn text_jsonl_reproduces_peft_losses() {
    parity("tests/fixtures/train/text.jsonl", "text_losses");
}

fn base_args(out: &Path) -> Vec<String> {
    [
        "--model",
        &fx("tests/fixtures/llama/model"),
        "--data",
        &fx("tests/fixtures/train/data.jsonl"),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        "--schedule",
        "cosine",
        "--warmup",
        "2",
        "--save-every",
        "3",
        "--dropout",
        "0.1",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_ok(args: &[String]) {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = qtune(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn stop_and_resume_gives_identical_adapter_bytes() {
    let full = tempfile::tempdir().unwrap();
    run_ok(&base_args(full.path()));
    let part = tempfile::tempdir().unwrap();
    let mut a = base_args(part.path());
    a.extend(["--stop-after".into(), "3".into()]);
    run_ok(&a);
    let mut a = base_args(part.path());
    a.extend(["--resume".into(), part.path().display().to_string()]);
    run_ok(&a);
    let f = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(f(full.path()), f(part.path()));
    assert_eq!(step_losses(full.path()), step_losses(part.path()));
    // A checkpoint holds everything resume needs.
    let ck = part.path().join("checkpoint-3");
    for p in [
        "adapter/adapter_model.safetensors",
        "optimizer/optimizer.json",
        "trainer_state.json",
    ] {
        assert!(ck.join(p).is_file(), "{p}");
    }
}

/// `--threads` builds the pool the whole command runs on (`cli::on_pool`), and the plan's header
/// names it. A bf16 step (where `auto` picks it: a CPU with AVX-512 BF16) gives the same adapter
/// to the byte on one thread and three (its kernels' sums do not depend on the split); an f32
/// step runs its quantised tiles through the gemm crate, whose tile rows follow the thread count,
/// so its adapter agrees to about 1e-5 of its largest value, and its losses as printed.
#[test]
fn threads_flag_sets_the_pool_and_leaves_the_adapter_unchanged() {
    let mut bf16 = Vec::new();
    let runs: Vec<_> = ["1", "3"]
        .iter()
        .map(|n| {
            let dir = tempfile::tempdir().unwrap();
            let mut a = base_args(dir.path());
            a.extend(["--threads".into(), n.to_string()]);
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            let o = qtune(&a);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{err}");
            assert!(err.contains(&format!(", {n} threads):")), "{err}");
            bf16.push(err.contains("compute bf16,"));
            dir
        })
        .collect();
    assert_eq!(bf16[0], bf16[1]);
    assert_eq!(step_losses(runs[0].path()), step_losses(runs[1].path()));
    let f = |d: &Path| d.join("adapter/adapter_model.safetensors");
    if bf16[0] {
        let read = |d: &Path| std::fs::read(f(d)).unwrap();
        assert_eq!(read(runs[0].path()), read(runs[1].path()));
        return;
    }
    let cpu = candle_core::Device::Cpu;
    let (a, b) = (
        candle_core::safetensors::load(f(runs[0].path()), &cpu).unwrap(),
        candle_core::safetensors::load(f(runs[1].path()), &cpu).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let (x, y) = (x.flatten_all().unwrap(), b[name].flatten_all().unwrap());
        let (x, y) = (x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        let top = x
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let worst = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst <= 1e-4 * top, "{name}: {worst} against {top}");
    }
}

#[test]
fn config_file_takes_the_same_keys_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let cfgp = dir.path().join("qtune.toml");
    std::fs::write(
        &cfgp,
        "steps = 2\nbatch_size = 1\nrank = 2\nschedule = \"constant\"\nlr = 0.5\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = qtune(&[
        "--config",
        cfgp.to_str().unwrap(),
        "--model",
        &fx("tests/fixtures/llama/model"),
        "--data",
        &fx("tests/fixtures/train/data.jsonl"),
        "--lr",
        "0.001",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = std::fs::read_to_string(out.join("adapter/qtune.toml")).unwrap();
    let t: toml::Table = saved.parse().unwrap();
    assert_eq!(t["rank"].as_integer(), Some(2), "{saved}");
    assert_eq!(t["lr"].as_float(), Some(0.001), "{saved}");
    assert_eq!(t["steps"].as_integer(), Some(2), "{saved}");
    assert_eq!(step_losses(&out).len(), 2);
}

fn fails_with(args: &[&str], needle: &str) {
    let o = qtune(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_input_is_refused_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let m = fx("tests/fixtures/llama/model");
    let d = fx("tests/fixtures/train/data.jsonl");
    let base = [
        "--model",
        m.as_str(),
        "--data",
        d.as_str(),
        "--out",
        out,
        "--steps",
        "1",
    ];
    for (extra, needle) in [
        (&["--schedule", "step"][..], "--schedule"),
        (&["--dtype", "f16"][..], "--dtype"),
        (&["--quant", "q3_k"][..], "--quant"),
        (&["--targets", "qq_proj"][..], "qq_proj"),
        (&["--max-memory", "lots"][..], "--max-memory"),
        (&["--max-memory", "100k"][..], "exceeds --max-memory"),
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--shuffle", "maybe"][..], "--shuffle"),
        (&["--resume", out][..], "no trainer_state.json"),
    ] {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fails_with(&a, needle);
    }
    let cfgp = dir.path().join("bad.toml");
    std::fs::write(&cfgp, "bogus-key = 1\n").unwrap();
    let mut a = base.to_vec();
    a.extend(["--config", cfgp.to_str().unwrap()]);
    fails_with(&a, "bogus-key");
}

#[test]
fn resume_from_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = base_args(dir.path());
    a.extend(["--stop-after".into(), "3".into()]);
    run_ok(&a);
    let mut a = base_args(dir.path());
    a.extend([
        "--resume".into(),
        dir.path().display().to_string(),
        "--seed".into(),
        "7".into(),
    ]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    fails_with(&a, "another run");
}

#[test]
fn no_arguments_trains_the_embedded_default_and_eval_loss_falls() {
    // The embedded default with fewer steps (flags win over it); run where its out dir may go.
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "train",
            "--steps",
            "30",
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let evals: Vec<f64> = std::fs::read_to_string(dir.path().join("qtune-out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("eval_loss").and_then(|x| x.as_f64()))
        .collect();
    assert_eq!(evals.len(), 2, "{err}");
    assert!(evals[1] < 0.5 * evals[0], "eval loss {evals:?}");
    // The before/after demo on the held-out questions: more answers right after training.
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("held-out answers exactly right: "))
        .unwrap_or_else(|| panic!("no before/after count in {out}"));
    let counts: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    // [before, total, after, total]
    assert_eq!(counts.len(), 4, "{line}");
    assert!(counts[2] >= counts[0] + counts[1] / 4, "{line}");
    assert!(
        err.contains("memory plan") && err.contains("peak memory: measured"),
        "{err}"
    );
}

#[test]
fn optim_8bit_flag_and_key_resume_bit_identically() {
    // Rank 64: most LoRA tensors of the fixture model reach the 4096 elements 8-bit state needs.
    let args = |out: &Path| -> Vec<String> {
        let mut a = base_args(out);
        let r = a.iter().position(|s| s == "--rank").unwrap();
        a[r + 1] = "64".into();
        a
    };
    let full = tempfile::tempdir().unwrap();
    let mut a = args(full.path());
    a.push("--optim-8bit".into());
    run_ok(&a);
    let saved = std::fs::read_to_string(full.path().join("adapter/qtune.toml")).unwrap();
    assert!(saved.contains("optim-8bit = true"), "{saved}");
    let part = tempfile::tempdir().unwrap();
    let mut a = args(part.path());
    a.extend(["--optim-8bit".into(), "--stop-after".into(), "3".into()]);
    run_ok(&a);
    // Resuming 8-bit state with the key set to false: refused by name (without it, the run's
    // own setting, saved in its checkpoint, applies).
    let mut a = args(part.path());
    a.extend(["--resume".into(), part.path().display().to_string()]);
    let off = part.path().join("off.toml");
    std::fs::write(&off, "optim-8bit = false\n").unwrap();
    let mut refused: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    refused.extend(["--config", off.to_str().unwrap()]);
    fails_with(&refused, "--optim-8bit false (the run has true)");
    // The TOML key does what the flag does.
    let cfgp = part.path().join("eight.toml");
    std::fs::write(&cfgp, "optim-8bit = true\n").unwrap();
    a.extend(["--config".into(), cfgp.display().to_string()]);
    run_ok(&a);
    let f = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(f(full.path()), f(part.path()));
    assert_eq!(step_losses(full.path()), step_losses(part.path()));
}

/// `qtune train --resume R` alone, from another working directory: the run's own settings (saved in
/// its checkpoint), continued in R and nowhere else, bit-identical to an uninterrupted run.
#[test]
fn resume_alone_takes_the_runs_settings_and_writes_only_into_the_run() {
    let full = tempfile::tempdir().unwrap();
    run_ok(&base_args(full.path()));
    let part = tempfile::tempdir().unwrap();
    let mut a = base_args(part.path());
    a.extend(["--stop-after".into(), "4".into()]);
    run_ok(&a);
    let elsewhere = tempfile::tempdir().unwrap();
    let run = part.path().display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(["train", "--resume", &run])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "the resumed run wrote outside its directory"
    );
    let f = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(f(full.path()), f(part.path()));
    assert_eq!(step_losses(full.path()), step_losses(part.path()));
    // A checkpoint keeps the run's settings.
    assert!(part.path().join("checkpoint-3/qtune.toml").is_file());
}

#[test]
fn resume_refuses_a_trajectory_change_or_another_out_by_name() {
    let part = tempfile::tempdir().unwrap();
    let mut a = base_args(part.path());
    a.extend(["--stop-after".into(), "3".into()]);
    run_ok(&a);
    let run = part.path().display().to_string();
    fails_with(
        &["--resume", &run, "--lr", "0.5"],
        "--lr 0.5 (the run has 0.01) would make this another run",
    );
    let other = tempfile::tempdir().unwrap();
    fails_with(
        &["--resume", &run, "--out", other.path().to_str().unwrap()],
        "a resumed run goes on in its own directory",
    );
    fails_with(&["--resume", "/nonexistent/run"], "no such directory");
    // What does not move the trajectory may change.
    run_ok(&[
        "--resume".to_string(),
        run.clone(),
        "--eval-every".into(),
        "2".into(),
        "--save-every".into(),
        "2".into(),
    ]);
}

/// A run of [`base_args`] plus `extra`, stopped after step 3 (its checkpoint-3 written).
fn stopped_after_3(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut a = base_args(dir.path());
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(["--stop-after".into(), "3".into()]);
    run_ok(&a);
    dir
}

/// Rewrites the resolved compute dtype a checkpoint's trainer state records (`None` removes it,
/// as in a checkpoint of qtune before it was recorded) and the checksums over it; returns the
/// value it had.
fn set_compute_dtype(ck: &Path, to: Option<&str>) -> String {
    let p = ck.join("trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let run = st["run"].as_object_mut().unwrap();
    let had = run["compute-dtype"].as_str().unwrap().to_string();
    match to {
        Some(d) => run.insert("compute-dtype".into(), d.into()),
        None => run.remove("compute-dtype"),
    };
    std::fs::write(&p, serde_json::to_string_pretty(&st).unwrap()).unwrap();
    qtune::train::manifest::write_manifest(ck).unwrap();
    had
}

/// `--dtype auto` resolves by CPU, device and width, and so may resolve otherwise where a run is
/// resumed: the checkpoint records what it resolved to, and the resumed run goes on in that.
#[test]
fn auto_dtype_resumes_in_the_dtype_its_run_started_in() {
    let part = stopped_after_3(&["--dtype", "auto"]);
    let ck = part.path().join("checkpoint-3");
    // As if the run had started on a machine whose `auto` picked the other dtype.
    let here = set_compute_dtype(&ck, Some("bf16"));
    let there = if here == "bf16" { "f32" } else { "bf16" };
    set_compute_dtype(&ck, Some(there));
    let run = part.path().display().to_string();
    let o = qtune(&["--resume", &run]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stderr);
    let name = if there == "bf16" { "BF16" } else { "F32" };
    assert!(
        said.contains(&format!("--dtype auto resumes in {name}")),
        "{said}"
    );
    let last = part.path().join("checkpoint-6/trainer_state.json");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last).unwrap()).unwrap();
    assert_eq!(st["run"]["compute-dtype"], there);
}

/// A checkpoint written before the resolved dtype was recorded resumes in what `auto` resolved to
/// then (f32 for this toy model on every CPU; today's rule picks bf16 where the CPU has AVX-512
/// BF16): bit-identical to the uninterrupted run. The runs before the resume see a CPU without
/// bf16 kernels (`QTUNE_NO_BF16_KERNELS`), where the old and new rules agree, as the old version
/// did.
#[test]
fn a_checkpoint_without_the_resolved_dtype_resumes_in_the_old_rule() {
    let old_version = |a: &[String]| {
        let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
            .arg("train")
            .args(a)
            .env("QTUNE_NO_BF16_KERNELS", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (full, part) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    old_version(&base_args(full.path()));
    let mut a = base_args(part.path());
    a.extend(["--stop-after".into(), "3".into()]);
    old_version(&a);
    assert_eq!(
        set_compute_dtype(&part.path().join("checkpoint-3"), None),
        "f32"
    );
    run_ok(&["--resume".into(), part.path().display().to_string()]);
    let f = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(f(full.path()), f(part.path()));
}
