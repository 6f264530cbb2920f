//! DoRA against PEFT 0.13.2 (tests/reference/gen_peft_methods_fixtures.py; conventions in
//! tests/reference/NOTES-dpo-peft.md section 2): the tiny Llama (GQA) and Falcon (multi-query),
//! f32 and Q8_0 / Q4_0 / NF4 bases quantised at load (PEFT ran on the same weights quantised and
//! dequantised). From PEFT's `adapter_init` (a perturbed magnitude, so only "keep the stored m"
//! reproduces the losses), 6 AdamW steps on the fixture batch: every loss and the loss after the
//! last update within 1e-4 relative; the adapter we then write equals PEFT's `adapter_final` and
//! reads back; the merged layer-0 weights equal PEFT's `merge_and_unload()`.
use candle_core::{DType, Device, Tensor};
use qtune::export::{Adapter, BaseConfig};
use qtune::lora::adapter::{self, AdapterConfig};
use qtune::models::{CausalLm, LlamaOptions, LoraSpec};
use qtune::quant::QType;
use qtune::store::WeightStore;
use qtune::train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn dir(arch: &str, tag: &str) -> PathBuf {
    fx(&format!("tests/fixtures/peft_methods/{arch}/dora/{tag}"))
}

fn model_dir(arch: &str) -> PathBuf {
    match arch {
        "llama" => fx("tests/fixtures/llama/model"),
        _ => fx("tests/fixtures/falcon/mq/model"),
    }
}

fn quant(tag: &str) -> Option<QType> {
    match tag {
        "q8_0" => Some(QType::Q8_0),
        "q4_0" => Some(QType::Q4_0),
        "nf4" => Some(QType::NF4),
        _ => None,
    }
}

fn expected(arch: &str, tag: &str) -> serde_json::Value {
    let p = dir(arch, tag).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
}

fn batch(j: &serde_json::Value) -> Batch {
    let t = |k: &str| {
        let v: Vec<Vec<i64>> = serde_json::from_value(j[k].clone()).unwrap();
        let (b, n) = (v.len(), v[0].len());
        Tensor::from_vec(v.concat(), (b, n), &Device::Cpu).unwrap()
    };
    Batch {
        ids: t("input_ids").to_dtype(DType::U32).unwrap(),
        mask: t("attention_mask").to_dtype(DType::U32).unwrap(),
        labels: t("labels"),
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// max |a - b| / max |b|.
fn rel_t(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let f = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)) as f64
}

/// The model with DoRA adapters from `spec`, f32, checkpointed, on the tag's base.
fn load(arch: &str, tag: &str, spec: LoraSpec) -> Box<dyn CausalLm> {
    let store = WeightStore::open(&model_dir(arch)).unwrap();
    let opts = LlamaOptions {
        quant: quant(tag),
        lora: Some(spec),
        checkpoint: true,
        ..LlamaOptions::default()
    };
    qtune::models::load(&store, opts).unwrap()
}

fn dora_spec() -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        use_dora: true,
        ..LoraSpec::default()
    }
}

/// Sets every adapter tensor of `m` from the PEFT directory `d` (all of them must be there).
fn set_from(m: &dyn CausalLm, d: &Path) -> AdapterConfig {
    let (acfg, tensors) = adapter::load_peft(d).unwrap();
    assert!(acfg.use_dora);
    let by: HashMap<String, Tensor> = tensors.into_iter().collect();
    let params = m.lora_params();
    assert_eq!(params.len(), by.len(), "one tensor per PEFT tensor");
    for (n, v) in params {
        let t = by
            .get(&n)
            .unwrap_or_else(|| panic!("{n} not in {}", d.display()));
        v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
    }
    acfg
}

fn case(arch: &str, tag: &str) {
    let want = expected(arch, tag);
    let b = batch(&want);
    let d = dir(arch, tag);
    let m = load(arch, tag, dora_spec());
    let acfg = set_from(m.as_ref(), &d.join("adapter_init"));
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let lr = want["lr"].as_f64().unwrap();
    let mut opt = AdamW::new(m.lora_params(), cfg).unwrap();
    let losses: Vec<f64> = serde_json::from_value(want["losses"].clone()).unwrap();
    assert_eq!(losses.len(), 6);
    let mut worst = 0f64;
    for (i, w) in losses.iter().enumerate() {
        let (l, grads) = m.train_grads(&b.ids, Some(&b.mask), &b.labels).unwrap();
        let r = rel(l as f64, *w);
        assert!(
            r < 1e-4,
            "{arch} {tag} step {i}: loss {l} vs PEFT {w} (rel {r:e})"
        );
        worst = worst.max(r);
        opt.step(&grads, lr).unwrap();
    }
    let after = m.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap() as f64;
    let w = want["loss_after"].as_f64().unwrap();
    assert!(
        rel(after, w) < 1e-4,
        "{arch} {tag}: loss after {after} vs PEFT {w}"
    );
    eprintln!(
        "{arch} {tag}: 6 steps, worst loss rel {worst:.2e}, after {:.2e}",
        rel(after, w)
    );

    // The adapter we write is PEFT's adapter_final, and reads back into the same loss.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    adapter::save_peft_vars(&out, &acfg, &m.lora_params()).unwrap();
    let (_, ours) = adapter::load_peft(&out).unwrap();
    let (_, peft) = adapter::load_peft(&d.join("adapter_final")).unwrap();
    assert_eq!(ours.len(), peft.len());
    for ((n, a), (pn, p)) in ours.iter().zip(&peft) {
        assert_eq!(n, pn);
        // Elementwise, AdamW's normalisation turns rounding in gradients near 0 into visible
        // update differences (up to 1.5e-4 of a tensor's largest value seen); the loss below is
        // the tight check.
        let r = rel_t(a, p);
        assert!(
            r < 5e-4,
            "{arch} {tag}: {n} differs from PEFT's adapter_final (rel {r:e})"
        );
    }
    let m2 = load(arch, tag, dora_spec());
    set_from(m2.as_ref(), &out);
    let again = m2.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap() as f64;
    assert!(
        rel(again, after) < 1e-6,
        "{arch} {tag}: reloaded {again} vs {after}"
    );
    // PEFT's own final adapter in our model gives PEFT's reloaded loss.
    let m3 = load(arch, tag, dora_spec());
    set_from(m3.as_ref(), &d.join("adapter_final"));
    let theirs = m3.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap() as f64;
    let w = want["reloaded_loss"].as_f64().unwrap();
    assert!(
        rel(theirs, w) < 1e-5,
        "{arch} {tag}: PEFT's adapter_final gives {theirs} vs {w}"
    );
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
fn falcon_f32() {
    case("falcon", "f32");
}
#[test]
fn falcon_q8_0() {
    case("falcon", "q8_0");
}
#[test]
fn falcon_q4_0() {
    case("falcon", "q4_0");
}
#[test]
fn falcon_nf4() {
    case("falcon", "nf4");
}

/// A fresh DoRA adapter's magnitude is the row norm of the weight actually used (the dequantised
/// one), as PEFT computed it at `get_peft_model` (magnitude_peft_init), and the model starts equal
/// to the base.
#[test]
fn fresh_magnitude_is_the_dequantised_row_norm() {
    for arch in ["llama", "falcon"] {
        for tag in ["f32", "q8_0", "q4_0", "nf4"] {
            let m = load(arch, tag, dora_spec());
            let want = candle_core::safetensors::load(
                dir(arch, tag).join("magnitude_peft_init.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            let mut n = 0;
            for (name, v) in m.lora_params() {
                if let Some(module) = adapter::parse_magnitude_name(&name) {
                    let key =
                        format!("base_model.model.{module}.lora_magnitude_vector.default.weight");
                    let r = rel_t(v.as_tensor(), &want[&key]);
                    assert!(r < 1e-6, "{arch} {tag} {module}: m rel {r:e}");
                    n += 1;
                }
            }
            assert_eq!(n, want.len(), "{arch} {tag}");
        }
    }
    // Starting as the base: the fresh DoRA loss equals a frozen model's.
    let want = expected("llama", "q4_0");
    let b = batch(&want);
    let m = load("llama", "q4_0", dora_spec());
    let base = load(
        "llama",
        "q4_0",
        LoraSpec {
            use_dora: false,
            ..dora_spec()
        },
    );
    let (l1, l0) = (
        m.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap(),
        base.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap(),
    );
    assert!(
        rel(l1 as f64, l0 as f64) < 1e-6,
        "fresh DoRA {l1} vs base {l0}"
    );
}

/// The negative control: a loader that recomputes m (as ‖W‖ or ‖W + sBA‖) instead of keeping the
/// stored one lands on PEFT's other losses, far from ours; ours is the stored-magnitude loss.
#[test]
fn stored_magnitude_is_kept_negative_control() {
    for arch in ["llama", "falcon"] {
        for tag in ["f32", "q4_0"] {
            let want = expected(arch, tag);
            let nc = &want["dora_negative_control"];
            let b = batch(&want);
            let m = load(arch, tag, dora_spec());
            set_from(m.as_ref(), &dir(arch, tag).join("adapter_init"));
            let ours = m.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap() as f64;
            let stored = nc["loss_stored_magnitude"].as_f64().unwrap();
            assert!(rel(ours, stored) < 1e-5, "{arch} {tag}: {ours} vs {stored}");
            for k in [
                "loss_if_magnitude_is_norm_W",
                "loss_if_magnitude_is_norm_W_plus_sBA",
            ] {
                let other = nc[k].as_f64().unwrap();
                // The controls sit >= 1e-3 away: 10x our tolerance at least.
                assert!(rel(other, stored) > 1e-3, "{arch} {tag}: {k} is no control");
                assert!(rel(ours, other) > 1e-3, "{arch} {tag}: we match {k}");
            }
            // A model whose magnitude is recomputed from W (a fresh adapter's m) with the stored A
            // and B gives the ‖W‖ control: our forward, not the fixture, tells them apart.
            let (_, tensors) = adapter::load_peft(&dir(arch, tag).join("adapter_init")).unwrap();
            let m2 = load(arch, tag, dora_spec());
            for (n, v) in m2.lora_params() {
                if adapter::parse_magnitude_name(&n).is_none() {
                    let t = &tensors.iter().find(|(k, _)| *k == n).unwrap().1;
                    v.set(t).unwrap();
                }
            }
            let recomputed = m2.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap() as f64;
            let w = nc["loss_if_magnitude_is_norm_W"].as_f64().unwrap();
            assert!(
                rel(recomputed, w) < 1e-5,
                "{arch} {tag}: m = ‖W‖ gives {recomputed} vs {w}"
            );
        }
    }
}

/// `merge` folds DoRA as PEFT's `merge_and_unload()`: W' = (m / ‖W + sBA‖) ⊙ (W + sBA), checked on
/// every layer-0 target of the f32 bases.
#[test]
fn merge_equals_peft_merged_layer0() {
    for arch in ["llama", "falcon"] {
        let store = WeightStore::open(&model_dir(arch)).unwrap();
        let cfg = BaseConfig::from_store(&store).unwrap();
        let d = dir(arch, "f32");
        let a = Adapter::load(&d.join("adapter_init"), &cfg).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        qtune::export::merge::merge(&store, &cfg, &a, &out, None).unwrap();
        let merged = WeightStore::open(&out).unwrap();
        let want =
            candle_core::safetensors::load(d.join("merged_layer0.safetensors"), &Device::Cpu)
                .unwrap();
        assert!(!want.is_empty());
        for (name, w) in &want {
            let t = merged
                .get(name)
                .unwrap_or_else(|| panic!("{name} not merged"));
            let mx = t.matrix();
            let mut v = vec![0f32; mx.rows * mx.cols];
            mx.dequant_tile(0, mx.rows, 0, mx.cols, &mut v);
            let got = Tensor::from_vec(v, (mx.rows, mx.cols), &Device::Cpu).unwrap();
            let r = rel_t(&got, w);
            assert!(r < 1e-5, "{arch}: merged {name} rel {r:e}");
        }
    }
}

/// llama.cpp has no DoRA: the GGUF LoRA export refuses it and says to merge instead.
#[test]
fn gguf_lora_export_refuses_dora() {
    let store = WeightStore::open(&model_dir("llama")).unwrap();
    let cfg = BaseConfig::from_store(&store).unwrap();
    let a = Adapter::load(&dir("llama", "f32").join("adapter_final"), &cfg).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e =
        qtune::export::write_gguf_lora(&a, cfg, "llama", QType::F32, &tmp.path().join("x.gguf"))
            .unwrap_err()
            .to_string();
    assert!(e.contains("DoRA") && e.contains("merge"), "{e}");
}

/// Falcon's Q4_0 base quantised at load is gguf-py's `quantize` (the fingerprints of
/// tests/fixtures/dpo/falcon/q4_0/base_check.json): this fixture has values where x/d + 8.5 lies a
/// hair below an integer in f64 but rounds up to it in f32 (ggml's FMA, gguf-py's f32 trunc).
#[test]
fn falcon_q4_0_at_load_is_gguf_py() {
    let store = WeightStore::open(&model_dir("falcon")).unwrap();
    let opts = LlamaOptions {
        quant: Some(QType::Q4_0),
        ..LlamaOptions::default()
    };
    let t = qtune::models::open(&store, opts).unwrap();
    let p = fx("tests/fixtures/dpo/falcon/q4_0/base_check.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    for l in 0..2 {
        for p in ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"] {
            let q = t.base_linear(l, p).unwrap();
            let mx = q.weight().matrix();
            let mut v = vec![0f32; mx.rows * mx.cols];
            mx.dequant_tile(0, mx.rows, 0, mx.cols, &mut v);
            let ws: f64 = (v.iter().enumerate())
                .map(|(i, &x)| x as f64 * (1 + i % 7) as f64)
                .sum();
            let w = want[&q.weight().name]["weighted_sum"].as_f64().unwrap();
            assert!(
                rel(ws, w) < 1e-6,
                "{}: {ws} vs gguf-py {w}",
                q.weight().name
            );
        }
    }
}

fn qtune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args)
        .output()
        .unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let o = qtune(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "qtune {args:?}: {err}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `qtune train --method dora` through the binary: dropout and 8-bit AdamW on, stopped after step
/// 3 and resumed, gives the uninterrupted run's adapter bytes and losses; the run's settings keep
/// `method = "dora"`; the adapter is a PEFT DoRA directory that `eval`, `generate` and `merge`
/// take, and `export --format gguf-lora` refuses (llama.cpp has no DoRA).
#[test]
fn cli_train_resume_eval_generate_merge() {
    let model = model_dir("llama");
    let data = fx("tests/fixtures/train/data.jsonl");
    let args = |out: &Path| -> Vec<String> {
        let v = [
            "train",
            "--method",
            "dora",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--rank",
            "64",
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
            "--optim-8bit",
            "--quant",
            "q4_0",
            "--out",
            out.to_str().unwrap(),
        ];
        v.iter().map(|s| s.to_string()).collect()
    };
    let call = |v: Vec<String>| run_ok(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let full = tempfile::tempdir().unwrap();
    call(args(full.path()));
    let part = tempfile::tempdir().unwrap();
    let mut a = args(part.path());
    a.extend(["--stop-after".into(), "3".into()]);
    call(a);
    let mut a = args(part.path());
    a.extend(["--resume".into(), part.path().display().to_string()]);
    call(a);
    let f = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        f(full.path()),
        f(part.path()),
        "resume is not bit-identical"
    );
    let losses = |d: &Path| -> Vec<f64> {
        let t = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        (t.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()))
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
    };
    assert_eq!(losses(full.path()), losses(part.path()));
    let saved = std::fs::read_to_string(full.path().join("adapter/qtune.toml")).unwrap();
    assert!(saved.contains("method = \"dora\""), "{saved}");
    let adir = full.path().join("adapter");
    let (acfg, tensors) = adapter::load_peft(&adir).unwrap();
    assert!(acfg.use_dora);
    // 2 layers x 7 linears x (A, B, m)
    assert_eq!(tensors.len(), 42);
    assert!(tensors
        .iter()
        .any(|(n, _)| n.ends_with("q_proj.lora_magnitude_vector")));

    let (m, a) = (model.to_str().unwrap(), adir.to_str().unwrap());
    let out = run_ok(&[
        "eval",
        "--model",
        m,
        "--adapter",
        a,
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    let with = v["loss"].as_f64().unwrap();
    let out = run_ok(&[
        "eval",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    let without = v["loss"].as_f64().unwrap();
    assert!(
        with < without,
        "the DoRA adapter does not lower the loss: {with} vs {without}"
    );
    run_ok(&[
        "generate",
        "--model",
        m,
        "--adapter",
        a,
        "--prompt-ids",
        "1,5,9",
        "--max-tokens",
        "4",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    run_ok(&[
        "merge",
        "--model",
        m,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
    ]);
    // The merged model (no adapter) gives the adapter's eval loss.
    let out = run_ok(&[
        "eval",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    let folded = v["loss"].as_f64().unwrap();
    assert!(
        rel(folded, with) < 1e-5,
        "merged {folded} vs unmerged {with}"
    );
    let o = qtune(&[
        "export",
        "--model",
        m,
        "--adapter",
        a,
        "--format",
        "gguf-lora",
        "--out",
        tmp.path().join("a.gguf").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("DoRA") && err.contains("merge"),
        "{err}"
    );
}

/// A DoRA directory with a magnitude missing, of the wrong length, or in a LoRA config is refused
/// by tensor name.
#[test]
fn bad_dora_directories_are_refused_by_name() {
    let src = dir("llama", "f32").join("adapter_init");
    let (acfg, tensors) = adapter::load_peft(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    type Case<'a> = (Vec<(String, Tensor)>, bool, &'a str);
    let cases: Vec<Case> = vec![
        (
            tensors.iter().filter(|(n, _)| n != q).cloned().collect(),
            true,
            "not found",
        ),
        (
            (tensors.iter().cloned())
                .map(|(n, t)| {
                    if n == q {
                        (n, t.narrow(0, 0, 3).unwrap())
                    } else {
                        (n, t)
                    }
                })
                .collect(),
            true,
            "[64] was expected",
        ),
        (tensors.clone(), false, "use_dora false"),
    ];
    for (i, (ts, dora, want)) in cases.into_iter().enumerate() {
        let d = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = acfg.clone();
        cfg.use_dora = dora;
        std::fs::write(d.join(adapter::CONFIG_FILE), cfg.to_json()).unwrap();
        let map: HashMap<String, Tensor> = ts.into_iter().collect();
        candle_core::safetensors::save(&map, d.join(adapter::WEIGHTS_FILE)).unwrap();
        let e = adapter::load_peft(&d).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains("lora_magnitude_vector"),
            "case {i}: {e}"
        );
    }
}

/// The memory plan counts every DoRA tensor the model holds (A, B and m per linear) and DoRA's
/// graph terms: more than LoRA's plan by the magnitudes, their optimizer state, the ‖W‖² rows and
/// two (tokens, out) tensors per linear of a layer.
#[test]
fn plan_counts_the_dora_tensors() {
    for arch in ["llama", "falcon"] {
        let store = WeightStore::open(&model_dir(arch)).unwrap();
        let opts = |dora: bool| LlamaOptions {
            lora: Some(LoraSpec {
                use_dora: dora,
                ..dora_spec()
            }),
            ..LlamaOptions::default()
        };
        let (lora, dora) = (
            qtune::models::MemoryPlan::for_store(&store, &opts(false), 1, 8).unwrap(),
            qtune::models::MemoryPlan::for_store(&store, &opts(true), 1, 8).unwrap(),
        );
        let m = qtune::models::load(&store, opts(true)).unwrap();
        let held: usize = m.lora_params().iter().map(|(_, v)| v.elem_count()).sum();
        // AdamW's f32 state is a fixed number of bytes per element: the plan's per-element figure
        // over the elements the model really holds is LoRA's.
        let l = qtune::models::load(&store, opts(false)).unwrap();
        let lora_held: usize = l.lora_params().iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(dora.optimizer * lora_held, lora.optimizer * held, "{arch}");
        let mags: usize = (m.lora_params().iter())
            .filter(|(n, _)| adapter::parse_magnitude_name(n).is_some())
            .map(|(_, v)| v.elem_count())
            .sum();
        // f32: the magnitudes and their gradients (4 + 4), ‖W‖² (4)
        assert_eq!(dora.adapters - lora.adapters, 8 * mags, "{arch}");
        assert_eq!(dora.adapter_grads - lora.adapter_grads, 4 * mags, "{arch}");
        assert!(
            dora.optimizer > lora.optimizer && dora.recompute > lora.recompute,
            "{arch}"
        );
    }
}

/// DPO's reference zeroes LoRA B, which would leave DoRA's magnitude on: refused by name, from the
/// flag and from a DoRA `--adapter-init`.
#[test]
fn dpo_with_dora_is_refused() {
    let model = model_dir("llama");
    let data = fx("tests/fixtures/dpo/pairs.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let init = dir("llama", "f32").join("adapter_init");
    let base = [
        "train",
        "--objective",
        "dpo",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        tmp.path().to_str().unwrap(),
    ];
    for extra in [
        vec!["--method", "dora"],
        vec!["--adapter-init", init.to_str().unwrap()],
    ] {
        let mut a = base.to_vec();
        a.extend(extra);
        let o = qtune(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("dora with --objective dpo"),
            "{err}"
        );
    }
}
