//! Prompt tuning, P-tuning and prefix tuning against PEFT 0.13.2 (tests/fixtures/peft_methods, made
//! by tests/reference/gen_peft_methods_fixtures.py): 6 AdamW steps from PEFT's init adapter on the
//! tiny Llama (GQA) and Falcon (multi-query) for f32, Q8_0, Q4_0 and NF4 bases; the losses, their
//! changes, the saved adapter and its reload; and the refusals (Falcon prefix tuning, merge/export).
use qtune::train::config::{Method, TrainConfig};
use qtune::train::trainer::{train, RunOptions, Sample};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(arch: &str, method: &str, tag: &str) -> PathBuf {
    root().join(format!("tests/fixtures/peft_methods/{arch}/{method}/{tag}"))
}

fn model(arch: &str) -> PathBuf {
    root().join(match arch {
        "llama" => "tests/fixtures/llama/model",
        _ => "tests/fixtures/falcon/mq/model",
    })
}

fn expected(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

/// The fixture's batch as samples (each row cut at its padding; qtune pads them again on the right).
fn samples(e: &Value) -> Vec<Sample> {
    let rows = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(e[k].clone()).unwrap() };
    let (ids, mask, labels) = (rows("input_ids"), rows("attention_mask"), rows("labels"));
    (0..ids.len())
        .map(|r| {
            let n = mask[r].iter().filter(|&&m| m == 1).count();
            Sample {
                ids: ids[r][..n].iter().map(|&x| x as u32).collect(),
                labels: labels[r][..n].to_vec(),
            }
        })
        .collect()
}

fn method_of(m: &str) -> Method {
    match m {
        "prompt" | "prompt_text" => Method::PromptTuning,
        "ptuning" => Method::PTuning,
        _ => Method::PrefixTuning,
    }
}

/// PEFT's init directory; for an encoder method, with its encoder state beside it as
/// `prompt_encoder.safetensors` (what `--adapter-init` reads).
fn init_dir(fx: &Path, tmp: &Path) -> PathBuf {
    let init = fx.join("adapter_init");
    let enc = fx.join("encoder_init.safetensors");
    if !enc.is_file() {
        return init;
    }
    let d = tmp.join("init");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(init.join(f), d.join(f)).unwrap();
    }
    std::fs::copy(enc, d.join("prompt_encoder.safetensors")).unwrap();
    d
}

fn cfg(arch: &str, method: &str, tag: &str, out: &Path, e: &Value) -> TrainConfig {
    TrainConfig {
        model: Some(model(arch)),
        out: out.to_path_buf(),
        quant: if tag == "f32" {
            "none".into()
        } else {
            tag.into()
        },
        method: method_of(method),
        // The fixtures' encoders are 32 wide (the init directory's config says so too).
        encoder_hidden_size: matches!(method, "ptuning" | "prefix_proj").then_some(32),
        prefix_projection: method == "prefix_proj",
        num_virtual_tokens: e["num_virtual_tokens"].as_u64().unwrap() as usize,
        steps: Some(6),
        batch_size: 2,
        grad_accum: 1,
        schedule: "constant".into(),
        max_grad_norm: 0.0,
        lr: e["lr"].as_f64().unwrap(),
        dtype: "f32".into(),
        shuffle: false,
        save_every: 3,
        ..TrainConfig::default()
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        stop_after: None,
    }
}

fn tensor(path: &Path, name: &str) -> Vec<f32> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

/// One fixture run: 6 steps from PEFT's init, checked against PEFT's losses and adapter.
fn parity(arch: &str, method: &str, tag: &str) {
    let fx = fixture(arch, method, tag);
    let e = expected(&fx);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut c = cfg(arch, method, tag, &out, &e);
    if method == "prompt_text" {
        // TEXT init from the tokenizer, not from a file: the rows must be PEFT's.
        c.prompt_init_text = Some(e["init_text"].as_str().unwrap().into());
    } else {
        c.adapter_init = Some(init_dir(&fx, tmp.path()));
    }
    let rep = train(&c, samples(&e), Vec::new(), &quiet())
        .unwrap_or_else(|err| panic!("{arch}/{method}/{tag}: {err}"));
    let want: Vec<f64> = serde_json::from_value(e["losses"].clone()).unwrap();
    let got: Vec<f64> = rep.losses.iter().map(|&l| l as f64).collect();
    let at = format!("{arch}/{method}/{tag}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-4 * w.abs(),
            "{at} step {}: qtune {g}, PEFT {w}",
            i + 1
        );
    }
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| ((g - w) / w).abs())
        .fold(0f64, f64::max);
    eprintln!("{at}: largest relative loss error {worst:.1e}");
    // The changes since step 1, against PEFT's largest one.
    let big = want
        .iter()
        .map(|w| (w - want[0]).abs())
        .fold(0f64, f64::max);
    assert!(big > 1e-2, "{at}: the fixture's loss barely moves ({big})");
    for i in 1..6 {
        let (dg, dw) = (got[i] - got[0], want[i] - want[0]);
        assert!(
            (dg - dw).abs() < 2e-3 * big,
            "{at} step {}: change {dg} vs PEFT {dw} (largest {big})",
            i + 1
        );
    }
    // The saved adapter: PEFT's tensor and config keys.
    let adir = out.join("adapter");
    let pe = tensor(&adir.join("adapter_model.safetensors"), "prompt_embeddings");
    let pw = tensor(
        &fx.join("adapter_final/adapter_model.safetensors"),
        "prompt_embeddings",
    );
    assert!(
        rel(&pe, &pw) < 1e-4,
        "{at}: prompt_embeddings {}",
        rel(&pe, &pw)
    );
    eprintln!(
        "{at}: prompt_embeddings max error / max |x| {:.1e}",
        rel(&pe, &pw)
    );
    let read = |p: PathBuf| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let ours = read(adir.join("adapter_config.json"));
    let peft = read(fx.join("adapter_final/adapter_config.json"));
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&ours), keys(&peft), "{at}: adapter_config.json keys");
    for k in [
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "num_transformer_submodules",
        "num_layers",
        "token_dim",
        "num_attention_heads",
        "inference_mode",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "encoder_hidden_size",
        "prefix_projection",
        "encoder_reparameterization_type",
    ] {
        assert_eq!(ours.get(k), peft.get(k), "{at}: {k}");
    }
    // Reloaded as PEFT reloads it (the saved rows fixed), the batch gives PEFT's loss after.
    let lm = qtune::train::eval::load_for_eval(&model(arch), Some(&adir), candle_core::DType::F32);
    let lm = reloaded_quant(lm, arch, tag, &adir);
    let s = samples(&e);
    let refs: Vec<&Sample> = s.iter().collect();
    let b = qtune::train::trainer::make_batch(&refs).unwrap();
    let l = lm.eval_loss(&b.ids, Some(&b.mask), &b.labels).unwrap() as f64;
    let after = e["loss_after"].as_f64().unwrap();
    assert!(
        (l - after).abs() < 1e-4 * after,
        "{at}: reloaded {l}, PEFT {after}"
    );
    eprintln!(
        "{at}: reloaded loss relative error {:.1e}",
        ((l - after) / after).abs()
    );
}

/// `load_for_eval` keeps the base as stored; a quantised fixture needs the same quantisation at
/// load, so those reload through the generic loader with `quant`.
fn reloaded_quant(
    lm: qtune::Result<Box<dyn qtune::models::CausalLm>>,
    arch: &str,
    tag: &str,
    adir: &Path,
) -> Box<dyn qtune::models::CausalLm> {
    if tag == "f32" {
        return lm.unwrap();
    }
    let l = qtune::lora::prompt::load(adir).unwrap();
    let opts = qtune::models::LlamaOptions {
        quant: qtune::quant::QType::parse(tag),
        checkpoint: false,
        ..Default::default()
    };
    let store = qtune::store::WeightStore::open(&model(arch)).unwrap();
    let mut m = qtune::models::open(&store, opts).unwrap();
    m.install_prompt(&l.inference_spec()).unwrap();
    qtune::lora::prompt::set_vars(&m.lora_params(), adir, &l).unwrap();
    Box::new(m)
}

const TAGS: [&str; 4] = ["f32", "q8_0", "q4_0", "nf4"];

#[test]
fn prompt_tuning_matches_peft() {
    for arch in ["llama", "falcon"] {
        for tag in TAGS {
            parity(arch, "prompt", tag);
        }
    }
}

#[test]
fn prompt_tuning_text_init_matches_peft() {
    for arch in ["llama", "falcon"] {
        for tag in TAGS {
            parity(arch, "prompt_text", tag);
        }
    }
}

#[test]
fn p_tuning_matches_peft() {
    for arch in ["llama", "falcon"] {
        for tag in TAGS {
            parity(arch, "ptuning", tag);
        }
    }
}

#[test]
fn prefix_tuning_matches_peft_on_llama() {
    for method in ["prefix", "prefix_proj"] {
        for tag in TAGS {
            parity("llama", method, tag);
        }
    }
}

/// One row per micro-batch, accumulated: a row's first label counts as a target in its
/// micro-batch's weight (the last virtual token predicts it), so the step's loss is still PEFT's
/// mean over both rows' targets (row 1 has one more target than its shifted labels).
#[test]
fn accumulated_rows_weigh_their_first_label() {
    for (method, tag) in [("prompt", "f32"), ("ptuning", "q8_0")] {
        let fx = fixture("llama", method, tag);
        let e = expected(&fx);
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg("llama", method, tag, &tmp.path().join("run"), &e);
        c.adapter_init = Some(init_dir(&fx, tmp.path()));
        (c.batch_size, c.grad_accum) = (1, 2);
        let rep = train(&c, samples(&e), Vec::new(), &quiet()).unwrap();
        let want: Vec<f64> = serde_json::from_value(e["losses"].clone()).unwrap();
        for (i, (g, w)) in rep.losses.iter().zip(&want).enumerate() {
            let g = *g as f64;
            assert!(
                (g - w).abs() < 1e-4 * w,
                "{method} step {}: {g} vs PEFT {w}",
                i + 1
            );
        }
    }
}

/// The training data of tests/fixtures/train (token ids and labels).
fn train_samples() -> Vec<Sample> {
    let p = root().join("tests/fixtures/train/expected.json");
    let e: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    e["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| Sample {
            ids: serde_json::from_value(x["ids"].clone()).unwrap(),
            labels: serde_json::from_value(x["labels"].clone()).unwrap(),
        })
        .collect()
}

fn small_cfg(out: &Path, method: Method, projection: bool) -> TrainConfig {
    TrainConfig {
        model: Some(model("llama")),
        out: out.to_path_buf(),
        method,
        num_virtual_tokens: 3,
        encoder_hidden_size: Some(16),
        prefix_projection: projection,
        steps: Some(6),
        batch_size: 2,
        grad_accum: 2,
        schedule: "cosine".into(),
        warmup: 2,
        lr: 1e-2,
        seed: 3,
        dtype: "bf16".into(),
        save_every: 3,
        ..TrainConfig::default()
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = ["adapter_model.safetensors", "prompt_encoder.safetensors"]
        .iter()
        .filter(|f| dir.join(f).is_file())
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn resume_after_a_stop_is_bit_identical() {
    // (method, projection, 8-bit moments): P-tuning's 16x16.. tensors are under 4096 elements, so
    // its 8-bit run uses a 64-wide encoder (mlp_head.2 is 64x64: blockwise 8-bit moments).
    for (m, proj, eight) in [
        (Method::PromptTuning, false, false),
        (Method::PTuning, false, false),
        (Method::PrefixTuning, false, false),
        (Method::PrefixTuning, true, false),
        (Method::PTuning, false, true),
    ] {
        let c8 = |dir: &Path| {
            let mut c = small_cfg(dir, m, proj);
            c.optim_8bit = eight;
            if eight {
                c.encoder_hidden_size = Some(64);
            }
            c
        };
        let full = tempfile::tempdir().unwrap();
        let r = train(&c8(full.path()), train_samples(), Vec::new(), &quiet()).unwrap();
        assert_eq!(r.losses.len(), 6);
        let part = tempfile::tempdir().unwrap();
        let stop = RunOptions {
            quiet: true,
            stop_after: Some(3),
        };
        train(&c8(part.path()), train_samples(), Vec::new(), &stop).unwrap();
        let mut c = c8(part.path());
        c.resume = Some(part.path().to_path_buf());
        let r2 = train(&c, train_samples(), Vec::new(), &quiet()).unwrap();
        assert_eq!(r2.losses, r.losses[3..].to_vec(), "{m:?} {proj}");
        let (a, b) = (
            files(&full.path().join("adapter")),
            files(&part.path().join("adapter")),
        );
        assert_eq!(a.len(), if m == Method::PTuning || proj { 2 } else { 1 });
        assert!(a == b, "{m:?} {proj}: the adapters differ");
        // A run of another method refuses the checkpoint.
        let mut other = small_cfg(part.path(), Method::Lora, false);
        other.resume = Some(part.path().to_path_buf());
        assert!(train(&other, train_samples(), Vec::new(), &quiet()).is_err());
    }
}

#[test]
fn falcon_prefix_tuning_is_refused_with_peft_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = small_cfg(tmp.path(), Method::PrefixTuning, false);
    c.model = Some(model("falcon"));
    let e = train(&c, train_samples(), Vec::new(), &quiet())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PEFT 0.13.2") && e.contains("num_kv_heads"),
        "{e}"
    );
    // PEFT's own record of the failure is in the fixture.
    let x = expected(&fixture("falcon", "prefix", "f32"));
    assert!(x["error"]
        .as_str()
        .unwrap()
        .contains("Sizes of tensors must match"));
}

#[test]
fn merge_and_gguf_export_refuse_prompt_adapters() {
    let store = qtune::store::WeightStore::open(&model("llama")).unwrap();
    let base = qtune::export::BaseConfig::from_store(&store).unwrap();
    for m in ["prompt", "ptuning", "prefix"] {
        let dir = fixture("llama", m, "f32").join("adapter_final");
        let e = match qtune::export::Adapter::load(&dir, &base) {
            Ok(_) => panic!("{m}: loaded as a LoRA adapter"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("llama.cpp") && e.contains("merged") && e.contains("--method lora"),
            "{e}"
        );
    }
}

/// Decoding with the KV cache (virtual rows or prefix in it) gives the full forward's logits.
#[test]
fn generate_with_prompt_adapters_matches_the_forward() {
    let store = qtune::store::WeightStore::open(&model("llama")).unwrap();
    let ids: Vec<u32> = vec![28, 175, 214, 298, 108, 148];
    for m in ["prompt", "ptuning", "prefix", "prefix_proj"] {
        let dir = fixture("llama", m, "f32").join("adapter_final");
        let g = qtune::generate::Generator::with_prompt(&store, &dir, Default::default()).unwrap();
        let mut cache = qtune::generate::KvCache::default();
        let first = g.step(&ids[..4], &mut cache).unwrap();
        let next = g.step(&ids[4..], &mut cache).unwrap();
        let lm =
            qtune::train::eval::load_for_eval(&model("llama"), Some(&dir), candle_core::DType::F32)
                .unwrap();
        let t = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let full = lm.forward(&t, None).unwrap().squeeze(0).unwrap();
        let got = candle_core::Tensor::cat(&[&first, &next], 0).unwrap();
        let v = |x: &candle_core::Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r = rel(&v(&got), &v(&full));
        assert!(r < 1e-5, "{m}: {r}");
    }
}

fn spec(
    method: qtune::lora::prompt::PromptMethod,
    n: usize,
    h: usize,
) -> qtune::lora::prompt::PromptSpec {
    qtune::lora::prompt::PromptSpec {
        method,
        num_virtual_tokens: n,
        encoder_hidden_size: h,
        init_ids: None,
        init_text: None,
        seed: 0,
    }
}

/// The plan of a prompt-tuning run is the frozen model's at N more positions plus the rows; a KV
/// prefix adds attention terms and its parameters.
#[test]
fn memory_plan_counts_the_virtual_tokens_and_the_prefix() {
    use qtune::lora::prompt::PromptMethod as M;
    use qtune::models::MemoryPlan;
    let store = qtune::store::WeightStore::open(&model("llama")).unwrap();
    let opts = qtune::models::LlamaOptions::default();
    let none = MemoryPlan::for_store(&store, &opts, 2, 32).unwrap();
    let longer = MemoryPlan::for_store(&store, &opts, 2, 36).unwrap();
    let pt = spec(M::PromptTuning, 4, 0);
    let p = MemoryPlan::for_store_prompt(&store, &opts, Some(&pt), 2, 32).unwrap();
    assert_eq!(p.recompute, longer.recompute);
    assert_eq!(p.checkpoints, longer.checkpoints);
    assert_eq!(p.adapters, 4 * 64 * 4);
    let px = spec(M::PrefixTuning(false), 4, 0);
    let q = MemoryPlan::for_store_prompt(&store, &opts, Some(&px), 2, 32).unwrap();
    assert!(q.recompute > none.recompute);
    assert_eq!(q.checkpoints, none.checkpoints);
    assert_eq!(q.adapters, 4 * (2 * 2 * 32) * 4);
}

/// The plan's figures at the Llama-2-7B shape (NF4, seq 512, batch 1) for the README; run with
/// `--ignored --nocapture` (generates the 7B synthetic weights, ~4 GB).
#[test]
#[ignore]
fn plan_figures_at_7b() {
    use qtune::lora::prompt::PromptMethod as M;
    use qtune::models::MemoryPlan;
    let cfg = qtune::train::bench::shape_config("llama-2-7b").unwrap();
    let store = qtune::train::bench::synthetic_store(&cfg, qtune::quant::QType::NF4, 0).unwrap();
    let opts = qtune::models::LlamaOptions {
        dtype: candle_core::DType::BF16,
        ..Default::default()
    };
    let mib = |b: usize| b as f64 / 1048576.0;
    for (name, s) in [
        ("prompt-tuning N=20", spec(M::PromptTuning, 20, 0)),
        ("p-tuning N=20 H=4096", spec(M::PTuning, 20, 4096)),
        ("prefix-tuning N=20", spec(M::PrefixTuning(false), 20, 0)),
        (
            "prefix-tuning N=20 projection H=512",
            spec(M::PrefixTuning(true), 20, 512),
        ),
    ] {
        let p = MemoryPlan::for_store_prompt(&store, &opts, Some(&s), 1, 512).unwrap();
        println!("{name}: total {:.1} MiB\n{p}", mib(p.total()));
    }
}
