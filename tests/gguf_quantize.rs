//! `quantize_to_gguf` from a GGUF (the tiny Llama fixture) and from an in-memory Hugging Face Llama
//! store: names, metadata, tokenizer keys, llama.cpp's Q/K row permutation, types and values.
//! Set QTUNE_KEEP_GGUF_DIR=<dir> to keep the outputs (and the HF directory) for
//! tests/reference/check_gguf.py.
use half::f16;
use qtune::format::gguf::{self, Value};
use qtune::quant::QType;
use qtune::quantize::quantize_to_gguf;
use qtune::store::{Bytes, SourceFormat, StoredTensor, WeightStore};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// Where outputs go: the kept directory if asked for, else the temp dir.
fn out_dir(tmp: &Path) -> PathBuf {
    match std::env::var_os("QTUNE_KEEP_GGUF_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d)
        }
        None => tmp.to_path_buf(),
    }
}

fn meta<'a>(s: &'a WeightStore, k: &str) -> &'a Value {
    gguf::find(&s.gguf_metadata, k).unwrap_or_else(|| panic!("missing {k}"))
}

fn values(t: &StoredTensor) -> Vec<f32> {
    let m = t.matrix();
    let mut v = vec![0f32; m.rows * m.cols];
    m.dequant_tile(0, m.rows, 0, m.cols, &mut v);
    v
}

/// Deterministic pseudo-normal values (xorshift + sum of uniforms).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        let mut s = 0f32;
        for _ in 0..4 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            s += (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        s
    }
}

struct Hf {
    hidden: usize,
    heads: usize,
    kv: usize,
    ffn: usize,
    layers: usize,
    vocab: usize,
}

const HF: Hf = Hf {
    hidden: 256,
    heads: 4,
    kv: 2,
    ffn: 320,
    layers: 2,
    vocab: 262,
};

/// GPT-2 byte-level alphabet (printable bytes as themselves, the rest from U+0100).
fn byte_tokens() -> Vec<String> {
    let keep = |b: u32| {
        (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if keep(b) {
                char::from_u32(b).unwrap().to_string()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap().to_string()
            }
        })
        .collect()
}

/// Writes config.json, tokenizer.json and model.safetensors of a tiny Llama into `dir` and returns the
/// equivalent in-memory store (what the safetensors reader would give).
fn hf_store(dir: &Path, tokenizer_type: &str) -> WeightStore {
    let h = &HF;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h.hidden, "num_hidden_layers": h.layers, "num_attention_heads": h.heads,
        "num_key_value_heads": h.kv, "intermediate_size": h.ffn, "vocab_size": h.vocab,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 260, "eos_token_id": 261, "torch_dtype": "float32", "tie_word_embeddings": false
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in byte_tokens().into_iter().enumerate() {
        vocab.insert(t, i.into());
    }
    for (i, t) in ["Ġt", "he", "Ġthe", "in"].iter().enumerate() {
        vocab.insert(t.to_string(), (256 + i).into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 260, "content": "<|bos|>", "special": true},
            {"id": 261, "content": "<|eos|>", "special": true}
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": tokenizer_type, "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he", "i n"]}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok).unwrap(),
    )
    .unwrap();

    let hd = h.hidden / h.heads;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![h.vocab, h.hidden])];
    for l in 0..h.layers {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h.hidden]));
        shapes.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![h.hidden, h.hidden],
        ));
        shapes.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![h.kv * hd, h.hidden],
        ));
        if l == 0 {
            // Biases (as with `attention_bias: true`): the converter permutes these too.
            shapes.push((format!("{p}.self_attn.q_proj.bias"), vec![h.hidden]));
            shapes.push((format!("{p}.self_attn.k_proj.bias"), vec![h.kv * hd]));
        }
        shapes.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![h.kv * hd, h.hidden],
        ));
        shapes.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h.hidden, h.hidden],
        ));
        shapes.push((format!("{p}.self_attn.rotary_emb.inv_freq"), vec![hd / 2]));
        shapes.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h.hidden],
        ));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![h.ffn, h.hidden]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![h.ffn, h.hidden]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h.hidden, h.ffn]));
    }
    shapes.push(("model.norm.weight".into(), vec![h.hidden]));
    shapes.push(("lm_head.weight".into(), vec![h.vocab, h.hidden]));

    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut tensors = Vec::new();
    let mut raw: Vec<(String, Vec<usize>, QType, Vec<u8>)> = Vec::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        // Larger Q/K weights sharpen attention, so a wrong rotary layout shows in the logits.
        let scale = if name.contains("q_proj") || name.contains("k_proj") {
            0.4
        } else {
            0.1
        };
        let v: Vec<f32> = (0..n).map(|_| rng.next() * scale).collect();
        // One F16 source tensor, to cover conversion from a half-precision checkpoint.
        let (qtype, bytes) = if name.ends_with("layers.1.mlp.up_proj.weight") {
            (
                QType::F16,
                v.iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
        } else {
            (QType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        raw.push((name.clone(), shape.clone(), qtype, bytes.clone()));
        tensors.push(StoredTensor {
            name,
            qtype,
            shape,
            data: Bytes::from_vec(bytes),
            nf4: None,
        });
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, s, q, b)| {
            let dt = if *q == QType::F16 {
                safetensors::Dtype::F16
            } else {
                safetensors::Dtype::F32
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    // transformers refuses a safetensors file without {"format": "pt"} metadata.
    let info = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(info), &dir.join("model.safetensors")).unwrap();
    WeightStore {
        path: dir.to_path_buf(),
        format: SourceFormat::Safetensors,
        tensors,
        gguf_metadata: vec![],
        alignment: 32,
        config: Some(cfg),
    }
}

/// llama.cpp's permutation written as loops: HF row (head, pair j, index i) goes to GGUF row
/// (head, index i, pair j).
fn permuted(src: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; rows * cols];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let from = h * hd + j * half + i;
                let to = h * hd + 2 * i + j;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

fn hf_name(g: &str) -> String {
    if g == "token_embd.weight" {
        return "model.embed_tokens.weight".into();
    }
    if g == "output_norm.weight" {
        return "model.norm.weight".into();
    }
    if g == "output.weight" {
        return "lm_head.weight".into();
    }
    let rest = g.strip_prefix("blk.").unwrap();
    let (l, part) = rest.split_once('.').unwrap();
    let p = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => panic!("{g}"),
    };
    format!("model.layers.{l}.{p}")
}

/// The source values a GGUF tensor should hold (permuted for Q and K).
fn expected(src: &WeightStore, gname: &str) -> Vec<f32> {
    let t = src.get(&hf_name(gname)).unwrap();
    let v = values(t);
    let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
    if gname.contains("attn_q.") {
        permuted(&v, t.shape[0], cols, HF.heads)
    } else if gname.contains("attn_k.") {
        permuted(&v, t.shape[0], cols, HF.kv)
    } else {
        v
    }
}

fn check_hf_metadata(out: &WeightStore, ftype: u32) {
    assert_eq!(meta(out, "general.architecture").as_str(), Some("llama"));
    for (k, want) in [
        ("llama.embedding_length", 256),
        ("llama.block_count", 2),
        ("llama.feed_forward_length", 320),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.rope.dimension_count", 64),
        ("llama.context_length", 512),
        ("llama.vocab_size", 262),
        ("general.file_type", ftype as u64),
        ("general.quantization_version", 2),
        ("tokenizer.ggml.bos_token_id", 260),
        ("tokenizer.ggml.eos_token_id", 261),
    ] {
        assert!(
            matches!(meta(out, k), Value::U32(_)),
            "{k} is u32 as gguf-py writes it"
        );
        assert_eq!(meta(out, k).as_u64(), Some(want), "{k}");
    }
    assert_eq!(
        meta(out, "llama.attention.layer_norm_rms_epsilon"),
        &Value::F32(1e-5)
    );
    assert_eq!(meta(out, "llama.rope.freq_base"), &Value::F32(10000.0));
    assert_eq!(meta(out, "tokenizer.ggml.model").as_str(), Some("gpt2"));
    assert_eq!(meta(out, "tokenizer.ggml.pre").as_str(), Some("gpt-2"));
    let toks = meta(out, "tokenizer.ggml.tokens").as_array().unwrap();
    assert_eq!(toks.len(), 262);
    assert_eq!(toks[b'A' as usize].as_str(), Some("A"));
    assert_eq!(toks[32].as_str(), Some("Ġ"));
    assert_eq!(toks[258].as_str(), Some("Ġthe"));
    assert_eq!(toks[261].as_str(), Some("<|eos|>"));
    let types = meta(out, "tokenizer.ggml.token_type").as_array().unwrap();
    assert_eq!(types[0], Value::I32(1));
    assert_eq!(types[260], Value::I32(3));
    let merges = meta(out, "tokenizer.ggml.merges").as_array().unwrap();
    assert_eq!(merges[2].as_str(), Some("Ġt he"));
}

#[test]
fn hf_to_f32_maps_names_and_permutes_q_k() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = out_dir(tmp.path());
    let hf_dir = keep.join("hf-llama");
    std::fs::create_dir_all(&hf_dir).unwrap();
    let src = hf_store(&hf_dir, "BPE");
    let out_path = keep.join("hf-f32.gguf");
    let r = quantize_to_gguf(&src, QType::F32, &out_path).unwrap();
    assert!(r.fallbacks.is_empty(), "{r}");
    let out = gguf::load(&out_path).unwrap();
    check_hf_metadata(&out, 0);
    // 2 layers x 9 + 2 biases + embeddings, final norm, output; the rotary caches are dropped.
    assert_eq!(out.tensors.len(), 23);
    assert!(out.tensors.iter().all(|t| t.qtype == QType::F32));
    assert_eq!(
        out.get("blk.0.attn_k.weight").unwrap().shape,
        vec![128, 256]
    );
    for t in &out.tensors {
        assert_eq!(values(t), expected(&src, &t.name), "{}", t.name);
    }
    // The permutation moved rows (the test would pass vacuously otherwise).
    let q = out.get("blk.0.attn_q.weight").unwrap();
    assert_ne!(
        values(q),
        values(src.get("model.layers.0.self_attn.q_proj.weight").unwrap())
    );
    let kb = out.get("blk.0.attn_k.bias").unwrap();
    assert_ne!(
        values(kb),
        values(src.get("model.layers.0.self_attn.k_proj.bias").unwrap())
    );
}

#[test]
fn hf_to_q8_0_and_q4_k_with_fallback() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = out_dir(tmp.path());
    let hf_dir = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_dir).unwrap();
    let src = hf_store(&hf_dir, "BPE");

    let p = keep.join("hf-q8_0.gguf");
    let r = quantize_to_gguf(&src, QType::Q8_0, &p).unwrap();
    let out = gguf::load(&p).unwrap();
    check_hf_metadata(&out, 7);
    for t in &out.tensors {
        let want = expected(&src, &t.name);
        let got = values(t);
        if t.shape.len() == 1 {
            assert_eq!(t.qtype, QType::F32);
            assert_eq!(got, want, "{}", t.name);
            continue;
        }
        assert_eq!(t.qtype, QType::Q8_0, "{}", t.name);
        // Per block of 32: error at most half a step d = amax/127 (plus the f16 rounding of d).
        for (g, w) in got.chunks(32).zip(want.chunks(32)) {
            let d = w.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 0.57 * d + 1e-7, "{}: {a} vs {b}", t.name);
            }
        }
    }
    assert!(
        r.bits_per_weight() > 8.4 && r.bits_per_weight() < 8.6,
        "{r}"
    );

    let p = keep.join("hf-q4_k.gguf");
    let r = quantize_to_gguf(&src, QType::Q4_K, &p).unwrap();
    let out = gguf::load(&p).unwrap();
    assert_eq!(meta(&out, "general.file_type").as_u64(), Some(14));
    // ffn_down rows are 320 long: not a multiple of 256, so Q8_0 (reported), like Falcon's 4544.
    assert_eq!(r.fallbacks.len(), 2, "{r}");
    assert!(
        r.fallbacks[0].contains("blk.0.ffn_down.weight") && r.fallbacks[0].contains("Q8_0"),
        "{r}"
    );
    for t in &out.tensors {
        let want = match t.shape.len() {
            1 => QType::F32,
            _ if t.name.ends_with("ffn_down.weight") => QType::Q8_0,
            _ => QType::Q4_K,
        };
        assert_eq!(t.qtype, want, "{}", t.name);
        let (got, exp) = (values(t), expected(&src, &t.name));
        let err: f64 = got
            .iter()
            .zip(&exp)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        let norm: f64 = exp.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
        let rel = (err / norm).sqrt();
        let bound = match want {
            QType::F32 => 0.0,
            QType::Q8_0 => 0.01,
            _ => 0.1,
        };
        assert!(rel <= bound, "{}: relative RMS error {rel}", t.name);
    }
}

#[test]
fn gguf_to_f16_keeps_metadata_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = out_dir(tmp.path());
    let src = gguf::load(&fixture("tiny-llama-q8_0.gguf")).unwrap();
    let p = keep.join("tiny-f16.gguf");
    let r = quantize_to_gguf(&src, QType::F16, &p).unwrap();
    assert!(r.fallbacks.is_empty());
    let out = gguf::load(&p).unwrap();
    assert_eq!(out.gguf_metadata.len(), src.gguf_metadata.len());
    for ((k, v), (k2, v2)) in out.gguf_metadata.iter().zip(&src.gguf_metadata) {
        assert_eq!(k, k2);
        if k == "general.file_type" {
            assert_eq!(v, &Value::U32(1));
        } else {
            assert_eq!(v, v2, "{k}");
        }
    }
    for (a, b) in out.tensors.iter().zip(&src.tensors) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
        let want: Vec<f32> = if b.shape.len() == 2 {
            assert_eq!(a.qtype, QType::F16);
            values(b)
                .iter()
                .map(|x| f16::from_f32(*x).to_f32())
                .collect()
        } else {
            assert_eq!(a.qtype, QType::F32);
            values(b)
        };
        assert_eq!(values(a), want, "{}", a.name);
    }
}

#[test]
fn gguf_q8_0_to_q4_0() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = out_dir(tmp.path());
    let src = gguf::load(&fixture("tiny-llama-q8_0.gguf")).unwrap();
    let p = keep.join("tiny-q4_0.gguf");
    quantize_to_gguf(&src, QType::Q4_0, &p).unwrap();
    let out = gguf::load(&p).unwrap();
    assert_eq!(meta(&out, "general.file_type"), &Value::U32(2));
    assert_eq!(
        meta(&out, "tokenizer.ggml.tokens"),
        meta(&src, "tokenizer.ggml.tokens")
    );
    for (a, b) in out.tensors.iter().zip(&src.tensors) {
        assert_eq!(
            a.qtype,
            if b.shape.len() == 2 {
                QType::Q4_0
            } else {
                QType::F32
            },
            "{}",
            a.name
        );
        let (got, want) = (values(a), values(b));
        // Q4_0: d = amax/8 per block; error at most d/2, except values of the opposite sign to
        // the extreme, which clamp at q = 15 (7d) and can be off by a whole step d.
        for (g, w) in got.chunks(32).zip(want.chunks(32)) {
            let d = w.iter().fold(0f32, |a, x| a.max(x.abs())) / 8.0;
            for (x, y) in g.iter().zip(w) {
                let bound = if (x - y).abs() > 0.51 * d {
                    1.01 * d
                } else {
                    0.51 * d
                };
                assert!((x - y).abs() <= bound + 1e-7, "{}: {x} vs {y}", a.name);
                if (x - y).abs() > 0.51 * d {
                    assert!(
                        x * y > 0.0 && x.abs() >= 6.9 * d,
                        "{}: {x} vs {y}: only clamped values may be a step off",
                        a.name
                    );
                }
            }
        }
    }
    // Q8_0 -> Q8_0 copies the blocks unchanged.
    let p = keep.join("tiny-q8_0-copy.gguf");
    quantize_to_gguf(&src, QType::Q8_0, &p).unwrap();
    let out = gguf::load(&p).unwrap();
    for (a, b) in out.tensors.iter().zip(&src.tensors) {
        assert_eq!(a.data.as_slice(), b.data.as_slice(), "{}", a.name);
    }
}

#[test]
fn unsupported_tokenizer_and_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let src = hf_store(tmp.path(), "Unigram");
    let e = quantize_to_gguf(&src, QType::F32, &tmp.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("'Unigram' is not supported"), "{e}");
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = quantize_to_gguf(&src, QType::F32, &tmp.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tokenizer.json"), "{e}");
    let mut src = src;
    src.config.as_mut().unwrap()["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    let e = quantize_to_gguf(&src, QType::F32, &tmp.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("FalconForCausalLM") && e.contains("not supported"),
        "{e}"
    );
    // Nothing half-written was left behind.
    assert!(!tmp.path().join("x.gguf").exists() && !tmp.path().join("x.gguf.tmp").exists());
}
