//! The training loop against PyTorch/PEFT (10 AdamW steps from the reference adapter), resume
//! bit-identity, gradient accumulation, and refusals (memory limit, foreign checkpoint).
use qtune::train::config::TrainConfig;
use qtune::train::trainer::{train, RunOptions, Sample};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn expected() -> serde_json::Value {
    let p = root().join("tests/fixtures/train/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn samples() -> Vec<Sample> {
    expected()["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Sample {
            ids: serde_json::from_value(e["ids"].clone()).unwrap(),
            labels: serde_json::from_value(e["labels"].clone()).unwrap(),
        })
        .collect()
}

/// The parity settings of the issue: batch 1, no accumulation, dropout 0, constant lr, no clipping.
fn parity_cfg(out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(root().join("tests/fixtures/llama/model")),
        out: out.to_path_buf(),
        adapter_init: Some(root().join("tests/fixtures/llama/f32/adapter")),
        steps: Some(10),
        batch_size: 1,
        grad_accum: 1,
        dropout: 0.0,
        schedule: "constant".into(),
        max_grad_norm: 0.0,
        lr: expected()["lr"].as_f64().unwrap(),
        dtype: "f32".into(),
        shuffle: false,
        ..TrainConfig::default()
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        stop_after: None,
    }
}

#[test]
fn ten_steps_match_peft_and_torch_adamw() {
    let dir = tempfile::tempdir().unwrap();
    let rep = train(&parity_cfg(dir.path()), samples(), Vec::new(), &quiet()).unwrap();
    let want: Vec<f64> = serde_json::from_value(expected()["losses"].clone()).unwrap();
    assert_eq!(rep.losses.len(), 10);
    for (i, (g, w)) in rep.losses.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() < 1e-4,
            "step {}: qtune {g}, PEFT {w}",
            i + 1
        );
    }
    // The adapter and its resolved config are written; metrics hold one line per step.
    assert!(dir
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
    let toml = std::fs::read_to_string(dir.path().join("adapter/qtune.toml")).unwrap();
    assert!(toml.contains("schedule = \"constant\""), "{toml}");
    let png = std::fs::read(dir.path().join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let m = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = m
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    for k in [
        "step",
        "loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "peak_mem_bytes",
    ] {
        assert!(lines[9].get(k).is_some(), "metrics lack {k}: {}", lines[9]);
    }
}

fn small_cfg(out: &Path, dropout: f32) -> TrainConfig {
    TrainConfig {
        model: Some(root().join("tests/fixtures/llama/model")),
        out: out.to_path_buf(),
        steps: Some(6),
        batch_size: 2,
        grad_accum: 2,
        dropout,
        schedule: "cosine".into(),
        warmup: 2,
        lr: 1e-2,
        rank: 4,
        seed: 3,
        dtype: "bf16".into(),
        save_every: 3,
        ..TrainConfig::default()
    }
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn resume_after_a_stop_is_bit_identical() {
    for dropout in [0.0, 0.1] {
        let full = tempfile::tempdir().unwrap();
        let r = train(
            &small_cfg(full.path(), dropout),
            samples(),
            Vec::new(),
            &quiet(),
        )
        .unwrap();
        assert_eq!(r.losses.len(), 6);
        let part = tempfile::tempdir().unwrap();
        let stop = RunOptions {
            quiet: true,
            stop_after: Some(3),
        };
        train(
            &small_cfg(part.path(), dropout),
            samples(),
            Vec::new(),
            &stop,
        )
        .unwrap();
        assert!(!part.path().join("adapter").exists());
        let mut cfg = small_cfg(part.path(), dropout);
        cfg.resume = Some(part.path().to_path_buf());
        let r2 = train(&cfg, samples(), Vec::new(), &quiet()).unwrap();
        assert_eq!(r2.losses, r.losses[3..].to_vec(), "dropout {dropout}");
        assert_eq!(
            adapter_bytes(full.path()),
            adapter_bytes(part.path()),
            "dropout {dropout}"
        );
    }
}

#[test]
fn resume_from_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stop = RunOptions {
        quiet: true,
        stop_after: Some(3),
    };
    train(&small_cfg(dir.path(), 0.0), samples(), Vec::new(), &stop).unwrap();
    // Other settings.
    let mut cfg = small_cfg(dir.path(), 0.0);
    cfg.lr = 5e-3;
    cfg.resume = Some(dir.path().join("checkpoint-3"));
    let e = train(&cfg, samples(), Vec::new(), &quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another run") && e.contains("lr"), "{e}");
    // Other data.
    let mut cfg = small_cfg(dir.path(), 0.0);
    cfg.resume = Some(dir.path().to_path_buf());
    let e = train(&cfg, samples()[1..].to_vec(), Vec::new(), &quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("training data differ"), "{e}");
    // Not a checkpoint at all.
    let empty = tempfile::tempdir().unwrap();
    cfg.resume = Some(empty.path().to_path_buf());
    let e = train(&cfg, samples(), Vec::new(), &quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no trainer_state.json"), "{e}");
}

#[test]
fn a_run_above_max_memory_is_refused_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path(), 0.0);
    cfg.max_memory = Some("64k".into());
    let e = train(&cfg, samples(), Vec::new(), &quiet())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exceeds --max-memory") && e.contains("--seq-len"),
        "{e}"
    );
    assert!(
        !dir.path().join("metrics.jsonl").exists(),
        "nothing may start"
    );
}

#[test]
fn accumulation_equals_one_big_batch() {
    // Loss of a step = mean over all its target tokens, however the micro-batches split them.
    let run = |bs: usize, acc: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = parity_cfg(dir.path());
        c.steps = Some(2);
        c.batch_size = bs;
        c.grad_accum = acc;
        train(&c, samples(), Vec::new(), &quiet()).unwrap().losses
    };
    let (a, b) = (run(4, 1), run(1, 4));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 2e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn eval_loss_is_reported_and_falls() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = parity_cfg(dir.path());
    c.steps = Some(8);
    c.eval_every = 4;
    let s = samples();
    let r = train(&c, s.clone(), s, &quiet()).unwrap();
    let steps: Vec<usize> = r.evals.iter().map(|e| e.0).collect();
    assert_eq!(steps, vec![0, 4, 8]);
    assert!(r.evals[2].1 < r.evals[0].1, "{:?}", r.evals);
}

/// `small_cfg` with 8-bit moments at rank 64, where most LoRA tensors of the fixture model reach
/// the 4096 elements that 8-bit state needs (k/v's B, 32 x 64, stays f32).
fn eight_bit_cfg(out: &Path, dropout: f32) -> TrainConfig {
    TrainConfig {
        rank: 64,
        optim_8bit: true,
        ..small_cfg(out, dropout)
    }
}

#[test]
fn resume_with_8bit_moments_is_bit_identical() {
    for dropout in [0.0, 0.1] {
        let full = tempfile::tempdir().unwrap();
        let r = train(
            &eight_bit_cfg(full.path(), dropout),
            samples(),
            Vec::new(),
            &quiet(),
        )
        .unwrap();
        let part = tempfile::tempdir().unwrap();
        let stop = RunOptions {
            quiet: true,
            stop_after: Some(3),
        };
        train(
            &eight_bit_cfg(part.path(), dropout),
            samples(),
            Vec::new(),
            &stop,
        )
        .unwrap();
        // The checkpoint holds 8-bit state: codes and absmax.
        let opt = part.path().join("checkpoint-3/optimizer");
        let json = std::fs::read_to_string(opt.join("optimizer.json")).unwrap();
        assert!(json.contains("\"blockwise8\""), "{json}");
        let st = std::fs::read(opt.join("optimizer.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let names = st.names();
        assert!(names.iter().any(|n| n.starts_with("exp_avg.code/")));
        assert!(names.iter().any(|n| n.starts_with("exp_avg_sq.absmax/")));
        // ... and f32 moments for the tensors below 4096 elements.
        assert!(names.iter().any(|n| n.starts_with("exp_avg/")));
        // Resuming without the flag is refused, naming the state directory; nothing is written.
        let mut cfg = small_cfg(part.path(), dropout);
        cfg.rank = 64;
        cfg.resume = Some(part.path().to_path_buf());
        let e = train(&cfg, samples(), Vec::new(), &quiet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--optim-8bit") && e.contains(&opt.display().to_string()),
            "{e}"
        );
        assert!(!part.path().join("adapter").exists());
        let mut cfg = eight_bit_cfg(part.path(), dropout);
        cfg.resume = Some(part.path().to_path_buf());
        let r2 = train(&cfg, samples(), Vec::new(), &quiet()).unwrap();
        assert_eq!(r2.losses, r.losses[3..].to_vec(), "dropout {dropout}");
        assert_eq!(
            adapter_bytes(full.path()),
            adapter_bytes(part.path()),
            "dropout {dropout}"
        );
        let toml = std::fs::read_to_string(part.path().join("adapter/qtune.toml")).unwrap();
        assert!(toml.contains("optim-8bit = true"), "{toml}");
    }
}

/// A sanity check, not ground truth: the same 50 steps with 8-bit and with f32 moments give loss
/// curves a few percent apart.
#[test]
fn eight_bit_moments_track_the_f32_loss_curve() {
    let run = |eight: bool| {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            model: Some(root().join("tests/fixtures/llama/model")),
            out: dir.path().to_path_buf(),
            steps: Some(50),
            batch_size: 2,
            rank: 64,
            alpha: 16.0,
            lr: 5e-3,
            schedule: "constant".into(),
            dtype: "f32".into(),
            seed: 5,
            optim_8bit: eight,
            ..TrainConfig::default()
        };
        train(&c, samples(), Vec::new(), &quiet()).unwrap().losses
    };
    let (a, b) = (run(false), run(true));
    assert_ne!(a, b, "8-bit moments must change something");
    let rel: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (y - x).abs() / x).collect();
    let worst = rel.iter().cloned().fold(0f32, f32::max);
    let tail = |v: &[f32]| v[40..].iter().sum::<f32>() / 10.0;
    let (ta, tb) = (tail(&a), tail(&b));
    eprintln!("f32 losses {a:?}\n8-bit losses {b:?}\nworst step rel diff {worst}, last-10 mean {ta} vs {tb}");
    assert!(ta < a[0] - 0.5, "training must make progress: {a:?}");
    assert!(worst < 0.02, "{worst}");
    assert!((tb - ta).abs() / ta < 0.01, "{ta} vs {tb}");
}
