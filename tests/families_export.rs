//! The Llama family's new members through `qtune export --format gguf-lora`, `qtune merge` and
//! `qtune quantize`, against llama.cpp's own converters and transformers + PEFT (fixtures from
//! tests/reference/check_families_lora_llamacpp.py in tests/fixtures/families_export/, which also
//! ran llama.cpp on every file qtune wrote). Llama 3.1 (`rope_freqs.weight`), Qwen2 (architecture
//! `qwen2`, q/k rows NOT permuted, biases, tied head), Mistral (a `llama` to llama.cpp) and a
//! SmolLM2-style tied Llama.
use candle_core::{Device, Tensor};
use qtune::export::{base_architecture, write_gguf_lora, Adapter, BaseConfig};
use qtune::format::gguf::{self, Value};
use qtune::models::{self, CausalLm, LlamaOptions};
use qtune::quant::QType;
use qtune::store::WeightStore;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_same_gguf_lora, qtune, rel};

const FAMILIES: [&str; 4] = ["llama3", "qwen2", "mistral", "tied"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// tests/fixtures/families_export/<family>: adapter/, llamacpp-lora-f32.gguf, logits, expected.
fn fx(family: &str) -> PathBuf {
    root().join("families_export").join(family)
}

fn hf_dir(family: &str) -> PathBuf {
    root().join("families").join(family).join("model")
}

/// The base as llama.cpp's converter wrote it (tests/fixtures/families/<family>/llama_cpp_f32.gguf,
/// from gen_families_gguf.py), where there is one.
fn converter_gguf(family: &str) -> Option<PathBuf> {
    let p = root()
        .join("families")
        .join(family)
        .join("llama_cpp_f32.gguf");
    p.exists().then_some(p)
}

fn input() -> Tensor {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx("llama3").join("expected.json")).unwrap())
            .unwrap();
    let v: Vec<u32> = serde_json::from_value(j["input_ids"].clone()).unwrap();
    let n = v.len();
    Tensor::from_vec(v, (1, n), &Device::Cpu).unwrap()
}

fn reference(family: &str, name: &str) -> Tensor {
    candle_core::safetensors::load(fx(family).join("logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove(name)
        .unwrap()
}

/// `qtune quantize --type f32` of the Hugging Face model into `dir`, through the binary.
fn quantized(family: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{family}.gguf"));
    let (ok, _, err) = qtune(&[
        "quantize",
        "--model",
        hf_dir(family).to_str().unwrap(),
        "--type",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "quantize {family}: {err}");
    out
}

/// Logits `(T, V)` of the training model on `store`, with `adapter` unmerged (or none).
fn logits(store: &WeightStore, adapter: Option<&Adapter>) -> Tensor {
    let opts = LlamaOptions {
        lora: adapter.map(Adapter::spec),
        ..LlamaOptions::default()
    };
    let m = models::open(store, opts).unwrap();
    if let Some(a) = adapter {
        a.apply(&m).unwrap();
    }
    CausalLm::forward(&m, &input(), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// From the Hugging Face base and from llama.cpp's GGUF of it, the exported file is bit for bit
/// what llama.cpp's convert_lora_to_gguf.py writes: `general.architecture` (`qwen2` for Qwen2,
/// `llama` for the others), alpha, names, and B rows permuted for `llama` only.
#[test]
fn gguf_lora_equals_llama_cpp_converter() {
    for family in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let gguf_base = converter_gguf(family).unwrap_or_else(|| quantized(family, dir.path()));
        for base in [hf_dir(family), gguf_base] {
            let store = WeightStore::open(&base).unwrap();
            let cfg = BaseConfig::from_store(&store).unwrap();
            let ad = Adapter::load(&fx(family).join("adapter"), &cfg).unwrap();
            let ours = dir.path().join("ours.gguf");
            write_gguf_lora(&ad, &cfg, &base_architecture(&store), QType::F32, &ours).unwrap();
            assert_same_gguf_lora(&ours, &fx(family).join("llamacpp-lora-f32.gguf"));
        }
        let arch = gguf::load(&fx(family).join("llamacpp-lora-f32.gguf"))
            .unwrap()
            .gguf_metadata;
        let want = if family == "qwen2" { "qwen2" } else { "llama" };
        assert_eq!(
            gguf::find(&arch, "general.architecture").and_then(Value::as_str),
            Some(want),
            "{family}"
        );
    }
}

/// So that the test above checks the row order: llama's q/k rows move, qwen2's do not.
#[test]
fn qk_rows_move_for_llama_not_for_qwen2() {
    for (family, moves) in [("llama3", true), ("mistral", true), ("qwen2", false)] {
        let cfg = BaseConfig::from_store(&WeightStore::open(&hf_dir(family)).unwrap()).unwrap();
        for p in ["q_proj", "k_proj"] {
            let rows = cfg.gguf_rows(p);
            assert_eq!(
                rows.is_some_and(|r| r.iter().enumerate().any(|(g, &h)| g != h)),
                moves,
                "{family} {p}"
            );
        }
    }
}

/// The PEFT adapter on the Hugging Face base, and llama.cpp's own LoRA file on llama.cpp's GGUF
/// base (its row orders undone on load), give transformers + PEFT's logits; llama.cpp's logits of
/// base + our file (recorded by the reference script) agree with both.
#[test]
fn unmerged_logits_match_transformers_peft_and_llama_cpp() {
    for family in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let want = reference(family, "transformers_peft");
        let hf = WeightStore::open(&hf_dir(family)).unwrap();
        let ad = Adapter::load(
            &fx(family).join("adapter"),
            BaseConfig::from_store(&hf).unwrap(),
        )
        .unwrap();
        let r = rel(&logits(&hf, Some(&ad)), &want);
        eprintln!("{family} HF + PEFT adapter vs transformers+PEFT: {r:.2e}");
        assert!(r < 1e-5, "{family}: {r:e}");
        let g = WeightStore::open(
            &converter_gguf(family).unwrap_or_else(|| quantized(family, dir.path())),
        )
        .unwrap();
        let ad = Adapter::load(
            &fx(family).join("llamacpp-lora-f32.gguf"),
            BaseConfig::from_store(&g).unwrap(),
        )
        .unwrap();
        let got = logits(&g, Some(&ad));
        let r_tf = rel(&got, &want);
        let r_cpp = rel(&got, &reference(family, "llamacpp_lora"));
        eprintln!(
            "{family} GGUF + llama.cpp LoRA: vs transformers+PEFT {r_tf:.2e}, vs llama.cpp {r_cpp:.2e}"
        );
        assert!(r_tf < 1e-5, "{family}: {r_tf:e}");
        // llama.cpp's f32 graph (its own kernels) sits ~1e-4 from transformers.
        assert!(r_cpp < 1e-3, "{family}: {r_cpp:e}");
        // The adapter changes the logits by far more than the tolerance.
        assert!(rel(&reference(family, "transformers"), &want) > 1e-2);
    }
}

/// `qtune quantize --type f32` of a Hugging Face directory writes what llama.cpp's
/// convert_hf_to_gguf.py writes: the same tensors bit for bit (Llama 3.1's `rope_freqs.weight`
/// from its `rope_scaling`; qwen2's unpermuted rows and biases; no `output.weight` when tied) and
/// the same architecture keys.
#[test]
fn quantize_writes_what_llama_cpp_converter_writes() {
    for family in ["llama3", "qwen2", "tied"] {
        let dir = tempfile::tempdir().unwrap();
        let ours = gguf::load(&quantized(family, dir.path())).unwrap();
        let theirs = gguf::load(&converter_gguf(family).unwrap()).unwrap();
        let arch = gguf::find(&theirs.gguf_metadata, "general.architecture")
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        for (k, v) in &theirs.gguf_metadata {
            // key_length / value_length: llama.cpp derives them from the head size when absent.
            let derived = k.ends_with(".key_length") || k.ends_with(".value_length");
            if k.starts_with(&format!("{arch}.")) && !derived {
                assert_eq!(
                    gguf::find(&ours.gguf_metadata, k),
                    Some(v),
                    "{family}: metadata {k}"
                );
            }
        }
        assert_eq!(
            gguf::find(&ours.gguf_metadata, "general.architecture").and_then(Value::as_str),
            Some(arch.as_str())
        );
        let mut names: Vec<&str> = ours.tensors.iter().map(|t| t.name.as_str()).collect();
        let mut want: Vec<&str> = theirs.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        want.sort();
        assert_eq!(names, want, "{family}: tensor names");
        for t in &theirs.tensors {
            let o = ours.get(&t.name).unwrap();
            assert_eq!(
                (o.qtype, &o.shape),
                (t.qtype, &t.shape),
                "{family} {}",
                t.name
            );
            assert!(
                o.data.as_slice() == t.data.as_slice(),
                "{family}: {} differs from llama.cpp's converter",
                t.name
            );
        }
        assert_eq!(
            ours.get("rope_freqs.weight").is_some(),
            family == "llama3",
            "{family}"
        );
    }
}

/// `qtune merge` of the adapter, into the Hugging Face base written as GGUF (qtune's conversion)
/// and into llama.cpp's GGUF: our model on either equals transformers + PEFT, and llama.cpp's
/// logits of both (recorded) did too.
#[test]
fn merged_gguf_matches_transformers_peft() {
    for family in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let want = reference(family, "transformers_peft");
        let adapter = fx(family).join("adapter");
        let mut bases = vec![hf_dir(family)];
        bases.extend(converter_gguf(family));
        for (i, base) in bases.iter().enumerate() {
            let out = dir.path().join(format!("merged{i}.gguf"));
            let (ok, _, err) = qtune(&[
                "merge",
                "--model",
                base.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--type",
                "f32",
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(ok, "merge {family} into {}: {err}", base.display());
            let r = rel(&logits(&WeightStore::open(&out).unwrap(), None), &want);
            eprintln!("{family} merged into {}: {r:.2e}", base.display());
            assert!(r < 1e-5, "{family}: {r:e}");
        }
        for key in ["llamacpp_merged", "llamacpp_merged_gguf"] {
            let r = rel(&reference(family, key), &want);
            assert!(r < 1e-3, "{family} {key}: {r:e}");
        }
    }
}
