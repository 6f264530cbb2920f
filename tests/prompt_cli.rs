//! The prompt-learning methods through the binary: `train --method ...` flags, the adapter PEFT
//! reads, `generate` and `eval` with it, and the refusals of `merge`, `export --format gguf-lora`
//! and `train --export gguf-lora`.
use std::path::PathBuf;
use std::process::{Command, Output};

fn fx(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

fn qtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn train_generate_eval_and_refusals() {
    let model = fx("tests/fixtures/llama/model");
    let data = fx("tests/fixtures/train/data.jsonl");
    for (method, extra) in [
        ("prompt-tuning", vec!["--prompt-init-text", "hello world"]),
        ("p-tuning", vec!["--encoder-hidden-size", "16"]),
        (
            "prefix-tuning",
            vec!["--prefix-projection", "--encoder-hidden-size", "16"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().display().to_string();
        let mut args = vec![
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--out",
            &out,
            "--method",
            method,
            "--num-virtual-tokens",
            "3",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
        ];
        args.extend(extra.iter().copied());
        let o = qtune(&args);
        assert!(o.status.success(), "{method}: {}", text(&o));
        let adir = dir.path().join("adapter");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["num_virtual_tokens"], 3, "{cfg}");
        let a = adir.display().to_string();
        let o = qtune(&[
            "generate",
            "--model",
            &model,
            "--adapter",
            &a,
            "--prompt-ids",
            "5,9,2",
            "--max-tokens",
            "3",
            "--exact",
        ]);
        assert!(o.status.success(), "{method} generate: {}", text(&o));
        let o = qtune(&["eval", "--model", &model, "--adapter", &a, "--data", &data]);
        assert!(o.status.success(), "{method} eval: {}", text(&o));
        let merged = dir.path().join("merged").display().to_string();
        for args in [
            vec![
                "merge",
                "--model",
                &model,
                "--adapter",
                &a,
                "--out",
                &merged,
            ],
            vec![
                "export",
                "--model",
                &model,
                "--adapter",
                &a,
                "--format",
                "gguf-lora",
                "--out",
                &merged,
            ],
        ] {
            let o = qtune(&args);
            let e = text(&o);
            assert!(!o.status.success(), "{method} {}: {e}", args[0]);
            assert!(
                e.contains("llama.cpp") && e.contains("--method lora"),
                "{e}"
            );
        }
    }
    // Asked for up front, the llama.cpp export is refused before any training.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let o = qtune(&[
        "train",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out,
        "--method",
        "prompt-tuning",
        "--export",
        "gguf-lora",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("llama.cpp"),
        "{}",
        text(&o)
    );
    assert!(!dir.path().join("adapter").exists());
    // P-tuning without its width, and a method the flag does not know, name the flag.
    let o = qtune(&[
        "train", "--model", &model, "--data", &data, "--out", &out, "--method", "p-tuning",
    ]);
    assert!(text(&o).contains("--encoder-hidden-size"), "{}", text(&o));
    let o = qtune(&[
        "train", "--model", &model, "--data", &data, "--out", &out, "--method", "ia3",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("ia3"),
        "{}",
        text(&o)
    );
}

/// `qtune bench --method prompt-tuning|p-tuning|prefix-tuning` runs the trainer's own step with
/// the adapter on a synthetic model of the tiny Llama's shape (trainable counts as PEFT shapes
/// them, a finite loss, the plan beside the measured peak); `--plan-only --device cuda` prints the
/// GPU terms with the method; Falcon prefix tuning is refused before anything runs, as PEFT would.
#[test]
fn bench_runs_the_prompt_methods() {
    let shape = fx("tests/fixtures/llama/model");
    // tiny Llama: hidden 64, 2 layers, 2 KV heads of 16
    let (c, l, kvh, d, n, h) = (64, 2, 2, 16, 6, 16);
    for (method, extra, params) in [
        ("prompt-tuning", vec![], n * c),
        (
            "p-tuning",
            vec!["--encoder-hidden-size", "16"],
            n * c + (h * c + h) + (h * h + h) + (c * h + c),
        ),
        ("prefix-tuning", vec![], n * l * 2 * kvh * d),
    ] {
        let mut args = vec![
            "bench",
            "--shape",
            &shape,
            "--quant",
            "q8_0",
            "--method",
            method,
            "--num-virtual-tokens",
            "6",
            "--seq-len",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ];
        args.extend(extra.iter().copied());
        let o = qtune(&args);
        assert!(o.status.success(), "{method}: {}", text(&o));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["method"], method, "{method}");
        assert_eq!(j["config"]["num_virtual_tokens"], 6, "{method}");
        assert_eq!(j["config"]["lora_params"], params, "{method}");
        assert!(j["losses"][0].as_f64().unwrap().is_finite(), "{method}");
        assert!(j["plan"]["total"].as_u64().unwrap() > 0, "{method}");
        let mut plan = vec![
            "bench",
            "--shape",
            &shape,
            "--method",
            method,
            "--plan-only",
        ];
        plan.extend(["--device", "cuda", "--num-virtual-tokens", "6"]);
        plan.extend(extra.iter().copied());
        let o = qtune(&plan);
        let t = text(&o);
        assert!(o.status.success(), "{method}: {t}");
        assert!(
            t.contains("N 6") && t.contains("attention score blocks"),
            "{t}"
        );
    }
    let falcon = fx("tests/fixtures/falcon/mq/model");
    for plan_only in [true, false] {
        let mut args = vec!["bench", "--shape", &falcon, "--method", "prefix-tuning"];
        args.extend(["--quant", "q8_0", "--seq-len", "8", "--steps", "1"]);
        if plan_only {
            args.push("--plan-only");
        }
        let o = qtune(&args);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(t.contains("PEFT 0.13.2 cannot run it"), "{t}");
    }
    // P-tuning without a width is refused, as `train` refuses it
    let o = qtune(&[
        "bench",
        "--shape",
        &shape,
        "--method",
        "p-tuning",
        "--plan-only",
    ]);
    assert!(!o.status.success() && text(&o).contains("--encoder-hidden-size"));
}
