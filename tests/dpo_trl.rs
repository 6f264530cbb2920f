//! DPO against TRL 0.12.2's `DPOTrainer` (tests/reference/gen_dpo_fixtures.py; conventions in
//! tests/reference/NOTES-dpo-peft.md): the tiny Llama (GQA) and Falcon (multi-query) from the same
//! PEFT adapter, 6 AdamW steps of batch 1 on f32, Q8_0, Q4_0 and NF4 bases (TRL ran on the same
//! weights quantised and dequantised). Per step the loss, rewards and log-prob sums of the forward
//! before the update; after training, the DPO loss of our final adapter on all 8 pairs against
//! TRL's final adapter's; and our tokenisation of every pair against the ids TRL trained on.
use qtune::data::{load_pairs, DataOptions, Tokenizer};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn expected(arch: &str, tag: &str) -> serde_json::Value {
    let p = fx(&format!("tests/fixtures/dpo/{arch}/{tag}/expected.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn model_of(arch: &str) -> PathBuf {
    match arch {
        "llama" => fx("tests/fixtures/dpo/llama/model"),
        _ => fx("tests/fixtures/falcon/mq/model"),
    }
}

fn series(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn case(arch: &str, tag: &str) {
    case_on(arch, tag, "pairs.jsonl")
}

fn case_on(arch: &str, tag: &str, data: &str) {
    let want = expected(arch, tag);
    let data = fx(&format!("tests/fixtures/dpo/{data}"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let model = model_of(arch);
    let init = fx(&format!("tests/fixtures/dpo/{arch}/adapter_init"));
    let quant = match tag {
        "f32" | "f32_chat" => "none",
        q => q,
    };
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(["train", "--objective", "dpo", "--beta", "0.1", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--adapter-init")
        .arg(&init)
        .args([
            "--quant",
            quant,
            "--steps",
            "6",
            "--batch-size",
            "1",
            "--grad-accum",
            "1",
            "--lr",
            "1e-2",
            "--schedule",
            "constant",
            "--max-grad-norm",
            "0",
            "--dropout",
            "0",
            "--shuffle",
            "false",
            "--dtype",
            "f32",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps = want["steps_record"].as_array().unwrap();
    let key = |k: &str| series(&out, k);
    let (loss, lc, lr_) = (key("loss"), key("logps_chosen"), key("logps_rejected"));
    let (rc, rr) = (key("rewards_chosen"), key("rewards_rejected"));
    assert_eq!(loss.len(), 6);
    for (s, w) in steps.iter().enumerate() {
        let f = |k: &str| w[k].as_f64().unwrap();
        let at = format!("{arch} {tag} step {s}");
        assert!(
            rel(loss[s], f("loss")) < 1e-4,
            "{at}: loss {} vs TRL {}",
            loss[s],
            f("loss")
        );
        assert!(
            rel(lc[s], f("logps/chosen")) < 1e-5,
            "{at}: logps/chosen {} vs {}",
            lc[s],
            f("logps/chosen")
        );
        assert!(
            rel(lr_[s], f("logps/rejected")) < 1e-5,
            "{at}: logps/rejected"
        );
        // Rewards are β·differences of sums of size ~100: their error is ~1e-5 of β·|logps|.
        let tol = 1e-5 * 0.1 * (f("logps/chosen").abs() + f("logps/rejected").abs()) + 1e-6;
        assert!(
            (rc[s] - f("rewards/chosen")).abs() < tol,
            "{at}: rewards/chosen {} vs {}",
            rc[s],
            f("rewards/chosen")
        );
        assert!(
            (rr[s] - f("rewards/rejected")).abs() < tol,
            "{at}: rewards/rejected"
        );
    }
    // For tests/reference/check_dpo_adapter_peft.py: our adapter, to load in PEFT.
    if let Ok(d) = std::env::var("QTUNE_DPO_PEFT_CHECK_DIR") {
        let dst = Path::new(&d).join(format!("{arch}_{tag}"));
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(out.join("adapter").join(f), dst.join(f)).unwrap();
        }
    }
    // Our final adapter gives TRL's post-training DPO loss on all 8 pairs.
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "eval",
            "--objective",
            "dpo",
            "--json",
            "--dtype",
            "f32",
            "--model",
        ])
        .arg(&model)
        .arg("--adapter")
        .arg(out.join("adapter"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if tag.starts_with("f32") {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let (got, trl) = (
            v["loss"].as_f64().unwrap(),
            want["final_mean_loss"].as_f64().unwrap(),
        );
        assert!(
            rel(got, trl) < 1e-4,
            "{arch}: final DPO loss {got} vs TRL {trl}"
        );
    }
}

#[test]
fn llama_f32() {
    case("llama", "f32");
}
#[test]
fn llama_q8_0() {
    case("llama", "q8_0");
}
#[test]
fn llama_q4_0() {
    case("llama", "q4_0");
}
#[test]
fn llama_nf4() {
    case("llama", "nf4");
}
#[test]
fn llama_conversational_pairs_through_the_chat_template() {
    case_on("llama", "f32_chat", "pairs_chat.jsonl");
}
#[test]
fn falcon_f32() {
    case("falcon", "f32");
}
#[test]
fn falcon_nf4() {
    case("falcon", "nf4");
}

#[test]
fn pairs_tokenise_as_trl_trained_on_them() {
    let ids_of = |arch: &str, data: &str, tag: &str| {
        let tok = Tokenizer::from_model_dir(&model_of(arch)).unwrap();
        let file = fx(&format!("tests/fixtures/dpo/{data}"));
        let (pairs, _) = load_pairs(&file, &tok, &DataOptions::default()).unwrap();
        let want = expected(arch, tag);
        let want = want["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), want.len());
        for (i, (p, w)) in pairs.iter().zip(want).enumerate() {
            let ids = |k: &str| -> Vec<u32> { serde_json::from_value(w[k].clone()).unwrap() };
            assert_eq!(p.prompt, ids("prompt_ids"), "{arch} {tag} pair {i} prompt");
            assert_eq!(p.chosen, ids("chosen_ids"), "{arch} {tag} pair {i} chosen");
            assert_eq!(
                p.rejected,
                ids("rejected_ids"),
                "{arch} {tag} pair {i} rejected"
            );
        }
    };
    ids_of("llama", "pairs.jsonl", "f32");
    ids_of("falcon", "pairs.jsonl", "f32");
    // Chat messages: ChatML rendered as TRL's apply_chat_template, the prompt with BOS.
    ids_of("llama", "pairs_chat.jsonl", "f32_chat");
}
