//! Falcon through `qtune export`, `qtune merge` and `qtune generate`, against llama.cpp and
//! transformers + PEFT (fixtures from tests/reference/check_falcon_lora_llamacpp.py in
//! tests/fixtures/falcon_export/), on the multi-query (Falcon-7B) and the grouped-KV (new decoder
//! architecture) layouts. llama.cpp's converter regroups the grouped layout's fused qkv rows; the
//! GGUF LoRA's B rows must follow, and come back on the way out.
use candle_core::{Device, Tensor};
use qtune::export::{write_gguf_lora, write_peft, Adapter, BaseConfig};
use qtune::format::gguf;
use qtune::generate::{generate, Generator, KvCache, Sampling};
use qtune::models::{CausalLm, Falcon, FalconOptions};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_same_gguf_lora, export_then_merge, qtune, rel};

const KINDS: [&str; 2] = ["mq", "gqa"];

fn fx(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/falcon_export")
        .join(kind)
}

fn ids(kind: &str, key: &str) -> Vec<u32> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx(kind).join("expected.json")).unwrap())
            .unwrap();
    serde_json::from_value(j[key].clone()).unwrap()
}

fn input(kind: &str) -> Tensor {
    let v = ids(kind, "input_ids");
    let n = v.len();
    Tensor::from_vec(v, (1, n), &Device::Cpu).unwrap()
}

fn reference(kind: &str, name: &str) -> Tensor {
    candle_core::safetensors::load(fx(kind).join("logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove(name)
        .unwrap()
}

fn hf(kind: &str) -> WeightStore {
    WeightStore::open(&fx(kind).join("model")).unwrap()
}

/// The f32 GGUF of the fixture model as `qtune quantize` writes it (what llama.cpp's converter
/// writes: names, metadata, regrouped qkv rows).
fn gguf_base(kind: &str, dir: &Path) -> WeightStore {
    let p = dir.join(format!("{kind}.gguf"));
    qtune::quantize::quantize_to_gguf(&hf(kind), QType::F32, &p).unwrap();
    WeightStore::open(&p).unwrap()
}

fn load_adapter(store: &WeightStore, path: &Path) -> Adapter {
    Adapter::load(path, BaseConfig::from_store(store).unwrap()).unwrap()
}

/// Logits `(T, V)` of the training model with `adapter` unmerged.
fn unmerged(store: &WeightStore, adapter: &Adapter, kind: &str) -> Tensor {
    let m = Falcon::load(
        store,
        FalconOptions {
            lora: Some(adapter.spec()),
            ..FalconOptions::default()
        },
    )
    .unwrap();
    adapter.apply(&m).unwrap();
    CausalLm::forward(&m, &input(kind), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn frozen(path: &Path, kind: &str) -> Tensor {
    let s = WeightStore::open(path).unwrap();
    Falcon::load(&s, FalconOptions::default())
        .unwrap()
        .forward(&input(kind), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn gguf_lora_equals_llama_cpp_converter() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        // From the Hugging Face base and from its GGUF: the same file, bit for bit what llama.cpp's
        // converter writes (the grouped layout's qkv B rows regrouped as it regroups them).
        for base in [hf(kind), gguf_base(kind, dir.path())] {
            let cfg = BaseConfig::from_store(&base).unwrap();
            let ad = Adapter::load(&fx(kind).join("adapter"), &cfg).unwrap();
            let ours = dir.path().join("ours.gguf");
            write_gguf_lora(&ad, &cfg, "falcon", QType::F32, &ours).unwrap();
            assert_same_gguf_lora(&ours, &fx(kind).join("llamacpp-lora-f32.gguf"));
        }
    }
}

/// The grouped layout really is reordered (so the test above checks something): B of
/// query_key_value differs between Hugging Face and GGUF order.
#[test]
fn grouped_qkv_rows_move_multi_query_rows_do_not() {
    for (kind, moves) in [("mq", false), ("gqa", true)] {
        let cfg = BaseConfig::from_store(&hf(kind)).unwrap();
        let rows = cfg.gguf_rows("query_key_value");
        assert_eq!(
            rows.as_ref()
                .is_some_and(|r| r.iter().enumerate().any(|(g, &h)| g != h)),
            moves,
            "{kind}"
        );
        assert!(cfg.gguf_rows("dense").is_none());
    }
}

#[test]
fn unmerged_logits_match_transformers_peft_and_llama_cpp() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let want = reference(kind, "transformers_peft");
        // PEFT adapter on the Hugging Face base.
        let h = hf(kind);
        let got = unmerged(&h, &load_adapter(&h, &fx(kind).join("adapter")), kind);
        let r = rel(&got, &want);
        eprintln!("{kind} HF + PEFT vs transformers+PEFT: {r:.2e}");
        assert!(r < 1e-5, "{kind}: {r:e}");
        // llama.cpp's own LoRA file on the GGUF base: llama.cpp's layout end to end.
        let g = gguf_base(kind, dir.path());
        let ad = load_adapter(&g, &fx(kind).join("llamacpp-lora-f32.gguf"));
        let got = unmerged(&g, &ad, kind);
        let r_tf = rel(&got, &want);
        let r_cpp = rel(&got, &reference(kind, "llamacpp_converter_lora"));
        eprintln!("{kind} GGUF + llama.cpp LoRA: vs transformers+PEFT {r_tf:.2e}, vs llama.cpp {r_cpp:.2e}");
        assert!(r_tf < 1e-5, "{kind}: {r_tf:e}");
        assert!(r_cpp < 1e-3, "{kind}: {r_cpp:e}");
        // The adapter matters.
        let base = frozen(&g.path, kind);
        assert!(rel(&base, &want) > 1e-2);
    }
}

/// `--format peft` from a GGUF LoRA (llama.cpp's, on a GGUF base): the regrouping undone gives
/// PEFT's adapter back bit for bit.
#[test]
fn peft_export_of_a_gguf_lora_restores_the_adapter() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let g = gguf_base(kind, dir.path());
        let ad = load_adapter(&g, &fx(kind).join("llamacpp-lora-f32.gguf"));
        let out = dir.path().join("peft");
        write_peft(&ad, QType::F32, &out).unwrap();
        let (c0, t0) = qtune::lora::adapter::load_peft(&fx(kind).join("adapter")).unwrap();
        let (c1, t1) = qtune::lora::adapter::load_peft(&out).unwrap();
        assert_eq!((c0.r, c0.lora_alpha), (c1.r, c1.lora_alpha));
        assert_eq!(t0.len(), t1.len());
        for (n0, a) in &t0 {
            let b = &t1
                .iter()
                .find(|(n, _)| n == n0)
                .unwrap_or_else(|| panic!("{n0} missing"))
                .1;
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(a == b, "{kind} {n0} changed");
        }
    }
}

#[test]
fn merge_then_forward_equals_unmerged() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let h = hf(kind);
        let g = gguf_base(kind, dir.path());
        let ad_h = load_adapter(&h, &fx(kind).join("adapter"));
        let ad_g = load_adapter(&g, &fx(kind).join("adapter"));
        let want_h = unmerged(&h, &ad_h, kind);
        let want_g = unmerged(&g, &ad_g, kind);
        let merge = |base: &WeightStore, ad: &Adapter, out: &Path, t: Option<QType>| {
            let cfg = BaseConfig::from_store(base).unwrap();
            qtune::merge::merge(base, &cfg, ad, out, t).unwrap()
        };
        // HF -> safetensors directory.
        let d = dir.path().join("merged");
        let rep = merge(&h, &ad_h, &d, None);
        assert_eq!(rep.merged, 8);
        let r = rel(&frozen(&d, kind), &want_h);
        eprintln!("{kind} HF dir merged vs unmerged: {r:.2e}");
        assert!(r < 1e-5, "{kind}: {r:e}");
        assert!(d.join("config.json").exists() && d.join("tokenizer.json").exists());
        // HF -> GGUF: llama.cpp ran this very conversion (check_falcon_lora_llamacpp.py).
        let f = dir.path().join("merged.gguf");
        merge(&h, &ad_h, &f, Some(QType::F32));
        let got = frozen(&f, kind);
        let r = rel(&got, &want_h);
        let r_cpp = rel(&got, &reference(kind, "llamacpp_merged"));
        let r_tf = rel(&got, &reference(kind, "transformers_peft"));
        eprintln!("{kind} HF->GGUF merged vs unmerged {r:.2e}, vs llama.cpp on it {r_cpp:.2e}, vs transformers+PEFT {r_tf:.2e}");
        assert!(r < 1e-5, "{kind}: {r:e}");
        assert!(r_cpp < 1e-3, "{kind}: {r_cpp:e}");
        assert!(r_tf < 1e-5, "{kind}: {r_tf:e}");
        // GGUF -> GGUF: the delta's qkv rows regrouped into the GGUF's order.
        let f = dir.path().join("merged-g.gguf");
        merge(&g, &ad_g, &f, None);
        let got = frozen(&f, kind);
        let r = rel(&got, &want_g);
        let r_cpp = rel(&got, &reference(kind, "llamacpp_merged_gguf"));
        eprintln!("{kind} GGUF merged vs unmerged {r:.2e}, vs llama.cpp on it {r_cpp:.2e}");
        assert!(r < 1e-5, "{kind}: {r:e}");
        assert!(r_cpp < 1e-3, "{kind}: {r_cpp:e}");
        // Requantised: the merged projections Q8_0, everything else kept.
        let q = dir.path().join("merged-q8.gguf");
        merge(&g, &ad_g, &q, Some(QType::Q8_0));
        let s = WeightStore::open(&q).unwrap();
        assert_eq!(s.get("blk.0.attn_qkv.weight").unwrap().qtype, QType::Q8_0);
        assert_eq!(s.get("token_embd.weight").unwrap().qtype, QType::F32);
        let r = rel(&frozen(&q, kind), &want_g);
        eprintln!("{kind} Q8_0 merged vs unmerged f32: {r:.2e}");
        assert!(r < 5e-2, "{kind}: {r:e}");
    }
}

#[test]
fn kv_cache_logits_equal_full_forward() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let g = gguf_base(kind, dir.path());
        for (store, adapter) in [
            (hf(kind), fx(kind).join("adapter")),
            (g, fx(kind).join("llamacpp-lora-f32.gguf")),
        ] {
            let ad = load_adapter(&store, &adapter);
            let full = unmerged(&store, &ad, kind);
            let gen = Generator::new(&store, Some(&ad)).unwrap();
            let toks = ids(kind, "input_ids");
            let n = toks.len();
            for chunks in [vec![n], vec![1; n], vec![5, 1, 4, 2]] {
                let mut c = KvCache::default();
                let mut rows = Vec::new();
                let mut at = 0;
                for k in chunks {
                    rows.push(gen.step(&toks[at..at + k], &mut c).unwrap());
                    at += k;
                }
                assert_eq!(c.len(), n);
                let r = rel(&Tensor::cat(&rows, 0).unwrap(), &full);
                eprintln!("{kind} cached steps vs forward: {r:.2e}");
                assert!(r < 1e-5, "{kind}: {r:e}");
            }
        }
    }
}

/// The old layout (per-head fused qkv, biases, attention then MLP in sequence) decodes through the
/// cache too: no llama.cpp graph exists for it, but `qtune generate` runs it.
#[test]
fn kv_cache_on_the_sequential_layout() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/falcon/seq/model");
    let store = WeightStore::open(&root).unwrap();
    let toks: Vec<u32> = (1..11).map(|i| i * 17 % 300).collect();
    let n = toks.len();
    let full = Falcon::load(&store, FalconOptions::default())
        .unwrap()
        .forward(
            &Tensor::from_vec(toks.clone(), (1, n), &Device::Cpu).unwrap(),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let gen = Generator::new(&store, None).unwrap();
    let mut c = KvCache::default();
    let rows: Vec<Tensor> = toks
        .chunks(3)
        .map(|ch| gen.step(ch, &mut c).unwrap())
        .collect();
    let r = rel(&Tensor::cat(&rows, 0).unwrap(), &full);
    eprintln!("seq cached steps vs forward: {r:.2e}");
    assert!(r < 1e-5, "{r:e}");
}

fn greedy(store: &WeightStore, adapter: &Path, kind: &str) -> Vec<u32> {
    let ad = load_adapter(store, adapter);
    let g = Generator::new(store, Some(&ad)).unwrap();
    let mut streamed = Vec::new();
    let r = generate(
        &g,
        &ids(kind, "gen_prompt"),
        32,
        &Sampling::default(),
        &[],
        |t| streamed.push(t),
    )
    .unwrap();
    assert_eq!(streamed, r.tokens);
    r.tokens
}

#[test]
fn greedy_matches_transformers_peft_generate() {
    for kind in KINDS {
        let want = ids(kind, "gen_tokens");
        assert_eq!(want.len(), 32);
        assert_eq!(greedy(&hf(kind), &fx(kind).join("adapter"), kind), want);
        let dir = tempfile::tempdir().unwrap();
        let g = gguf_base(kind, dir.path());
        assert_eq!(
            greedy(&g, &fx(kind).join("llamacpp-lora-f32.gguf"), kind),
            want,
            "{kind} GGUF base + llama.cpp's LoRA"
        );
    }
}

#[test]
fn adapters_for_another_model_are_named_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let falcon = BaseConfig::from_store(&hf("gqa")).unwrap();
    let llama =
        BaseConfig::from_store(&WeightStore::open(&root.join("llama/model")).unwrap()).unwrap();
    let err = |p: &Path, c: &BaseConfig| Adapter::load(p, c).unwrap_err().to_string();
    // A Llama adapter on a Falcon base, and the reverse: PEFT directories and GGUF LoRA files.
    let e = err(&root.join("llama/f32/adapter"), &falcon);
    assert!(
        e.contains("target module 'q_proj'") && e.contains("falcon base"),
        "{e}"
    );
    // (PEFT saves target_modules as a set: whichever Falcon name comes first is reported.)
    let e = err(&fx("gqa").join("adapter"), &llama);
    assert!(
        e.contains("is not a projection of this llama base") && e.contains("dense"),
        "{e}"
    );
    let e = err(&root.join("export/llamacpp-lora-f32.gguf"), &falcon);
    assert!(e.contains("\"llama\"") && e.contains("falcon"), "{e}");
    let e = err(&fx("gqa").join("llamacpp-lora-f32.gguf"), &llama);
    assert!(e.contains("\"falcon\"") && e.contains("llama"), "{e}");
    // A Falcon adapter for a Falcon of other shapes (hidden 128 vs 192).
    let other =
        BaseConfig::from_store(&WeightStore::open(&root.join("falcon/mq/model")).unwrap()).unwrap();
    let e = err(&fx("mq").join("adapter"), &other);
    assert!(e.contains("does not fit this model"), "{e}");
    let e = err(&fx("mq").join("llamacpp-lora-f32.gguf"), &other);
    assert!(e.contains("attn_qkv") && e.contains("expects"), "{e}");
    // A target module the base does not have.
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("ad");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::copy(
        fx("gqa").join("adapter/adapter_model.safetensors"),
        ad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(fx("gqa").join("adapter/adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["target_modules"] = serde_json::json!([
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "lm_head"
    ]);
    std::fs::write(ad.join("adapter_config.json"), v.to_string()).unwrap();
    let e = err(&ad, &falcon);
    assert!(e.contains("target module 'lm_head'"), "{e}");
    // The generator refuses an adapter read for the other architecture instead of misusing it.
    let ad = Adapter::load(&root.join("llama/f32/adapter"), &llama).unwrap();
    let e = Generator::new(&hf("gqa"), Some(&ad))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("llama base") && e.contains("falcon"), "{e}");
}

#[test]
fn falcon_export_merge_generate_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let model = fx("gqa").join("model");
    let adapter = fx("gqa").join("adapter");
    let (m, a) = (model.to_str().unwrap(), adapter.to_str().unwrap());
    let lora = d.path().join("sub/lora.gguf");
    let l = lora.to_str().unwrap();
    let merged = d.path().join("merged.gguf");
    let out = export_then_merge(&model, &adapter, &lora, &merged);
    assert_eq!(gguf::load(&lora).unwrap().tensors.len(), 16);
    assert!(out.contains("merged 8 projections"), "{out}");
    // Greedy from the command line, with our GGUF LoRA on the Hugging Face base: the ids of
    // transformers + PEFT `generate`, as the last JSON line.
    let prompt: Vec<String> = ids("gqa", "gen_prompt")
        .iter()
        .map(|x| x.to_string())
        .collect();
    let generate = |adapter: &str, rest: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--adapter", adapter, "--json"];
        args.extend(rest);
        let (ok, out, err) = qtune(&args);
        assert!(ok, "{err}");
        assert!(err.contains("tokens/s"), "{err}");
        serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()
    };
    let p = prompt.join(",");
    let j = generate(
        l,
        &[
            "--prompt-ids",
            &p,
            "--max-tokens",
            "32",
            "--temperature",
            "0",
            "--ignore-eos",
        ],
    );
    let got: Vec<u32> = serde_json::from_value(j["tokens"].clone()).unwrap();
    assert_eq!(got, ids("gqa", "gen_tokens"));
    // Text in, text out with the model's tokenizer, streaming.
    let j = generate(a, &["--prompt", "the quick brown fox", "--max-tokens", "8"]);
    assert!(j["text"].is_string() && !j["tokens"].as_array().unwrap().is_empty());
    // A Llama adapter on this Falcon base: named error, nothing written.
    let llama_ad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/f32/adapter");
    let la = llama_ad.to_str().unwrap();
    for (cmd, out) in [
        ("export", d.path().join("x/y.gguf")),
        ("merge", d.path().join("x/z.gguf")),
        ("generate", d.path().join("x/unused")),
    ] {
        let mut args = vec![cmd, "--model", m, "--adapter", la];
        let o = out.to_str().unwrap().to_string();
        match cmd {
            "export" => args.extend(["--format", "gguf-lora", "--out", &o]),
            "merge" => args.extend(["--out", &o]),
            _ => args.extend(["--prompt-ids", "1,2,3"]),
        }
        let (ok, _, err) = qtune(&args);
        assert!(!ok, "{cmd} accepted a Llama adapter");
        assert!(err.contains("target module 'q_proj'"), "{cmd}: {err}");
        assert!(!d.path().join("x").exists(), "{cmd} wrote before failing");
    }
    // And a Falcon adapter (PEFT or GGUF LoRA) on a Llama base.
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model");
    let ll = llama.to_str().unwrap();
    let fl = fx("gqa").join("llamacpp-lora-f32.gguf");
    for (ad, want) in [
        (a, "is not a projection of this llama base"),
        (fl.to_str().unwrap(), "this base is a llama"),
    ] {
        let o = d.path().join("x/y.gguf");
        let (ok, _, err) = qtune(&[
            "export",
            "--model",
            ll,
            "--adapter",
            ad,
            "--format",
            "gguf-lora",
            "--out",
            o.to_str().unwrap(),
        ]);
        assert!(!ok && err.contains(want), "{err}");
        assert!(!d.path().join("x").exists());
    }
}
