//! Metadata and tensor jobs for a Hugging Face Llama-family (Llama, Mistral, Qwen2) or Falcon store:
//! llama.cpp's names, keys and row orders, as its `convert_hf_to_gguf.py` writes them.
use super::tokenizer::bpe_tokenizer;
use super::{choose_type, Extra, Job, Metadata};
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::models::arch::{Architecture, RopeScaling};
use crate::models::LlamaConfig;
use crate::quant::QType;
use crate::store::{StoredTensor, WeightStore};
use std::path::{Path, PathBuf};

/// Reads an integer from config.json.
pub(super) fn cfg_u64(cfg: &serde_json::Value, key: &str) -> Option<u64> {
    cfg.get(key).and_then(|v| v.as_u64())
}

/// The directory of a Hugging Face store (its path, or the folder of a single file).
fn model_dir(src: &WeightStore) -> PathBuf {
    if src.path.is_dir() {
        src.path.clone()
    } else {
        src.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// GGUF name of a Hugging Face Llama tensor (`None`: not written, e.g. rotary caches).
pub(super) fn llama_name(hf: &str) -> Option<Option<String>> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(Some(n.to_string()));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if part == "self_attn.rotary_emb.inv_freq" {
        return Some(None);
    }
    let (stem, suffix) = part.rsplit_once('.')?;
    let g = match stem {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    Some(Some(format!("blk.{layer}.{g}.{suffix}")))
}

/// The Hugging Face architectures llama.cpp's converter writes with the `llama` graph (Mistral v0.1
/// and SmolLM2/TinyLlama are Llamas to it) and with `qwen2`.
const LLAMA_ARCHS: [&str; 3] = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// llama.cpp's `rope_freqs.weight` for Llama 3.1's `rope_scaling` (`llama3`), as its converter
/// computes it (`LlamaModel.generate_extra_tensors`, torch f32): per frequency, 1 above the high
/// frequency band, `factor` below the low one, and `1 / ((1 - s) / factor + s)` between. `None`
/// for plain rotary. (The converter reads `original_max_position_embeddings` from the top level of
/// config.json, defaulting to Llama 3.1's 8192; transformers, and this, read it from
/// `rope_scaling`: they agree for the published Llama 3.x configs.)
pub(super) fn llama3_rope_factors(
    scaling: &RopeScaling,
    theta: f64,
    head_dim: usize,
) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor: lo,
        high_freq_factor: hi,
        original_max: old,
    } = *scaling
    else {
        return None;
    };
    let (low_wl, high_wl) = (old / lo, old / hi);
    let factors = (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
            let wl = 2.0 * std::f32::consts::PI / freq;
            if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor
            } else {
                let smooth = (old / wl - lo) / (hi - lo);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

/// Metadata, tensor jobs and computed tensors (`rope_freqs.weight`) for a Hugging Face
/// `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM` store, as llama.cpp's converter
/// writes them: `llama` with q/k rows permuted for its rotary, or `qwen2` (rows as stored, q/k/v
/// biases, no `vocab_size` / `rope.dimension_count` keys). A tied head is left out, as in the file.
pub(super) fn hf_llama<'a>(
    src: &'a WeightStore,
    qtype: QType,
    fallbacks: &mut Vec<String>,
) -> Result<(Metadata, Vec<Job<'a>>, Extra)> {
    let dir = model_dir(src);
    let cfg_path = dir.join("config.json");
    let Some(cfg) = src.config.as_ref() else {
        return Err(Error::Json {
            path: cfg_path,
            msg: "config.json is missing: it is needed to convert a Hugging Face model".into(),
        });
    };
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let known = LLAMA_ARCHS.contains(&arch)
        || (arch.is_empty() && matches!(model_type, "llama" | "mistral" | "qwen2"));
    if !known {
        return Err(Error::Invalid(format!(
            "{}: architecture '{}' is not supported by `qtune quantize` from Hugging Face ({} and \
             Falcon); convert it with llama.cpp's convert_hf_to_gguf.py and quantise the GGUF",
            cfg_path.display(),
            if arch.is_empty() { model_type } else { arch },
            LLAMA_ARCHS.join(", ")
        )));
    }
    // The family's reading of config.json (rope_scaling, biases, refusals), as training reads it.
    let c = LlamaConfig::from_hf(cfg, &cfg_path)?;
    let spec = c.spec(false);
    let gguf_arch = spec.arch;
    let (hidden, n_layer, n_head, n_kv, ffn, vocab, head_dim) = (
        c.hidden_size as u64,
        c.num_layers as u64,
        c.num_heads as u64,
        c.num_kv_heads as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
        c.head_dim as u64,
    );
    let ctx = cfg_u64(cfg, "max_position_embeddings").unwrap_or(2048);
    let (eps, theta) = (c.rms_norm_eps, c.rope_theta);
    let u32v = |v: u64| Value::U32(v as u32);
    let mut keys = vec![
        ("context_length", u32v(ctx)),
        ("embedding_length", u32v(hidden)),
        ("block_count", u32v(n_layer)),
        ("feed_forward_length", u32v(ffn)),
        ("attention.head_count", u32v(n_head)),
        ("attention.head_count_kv", u32v(n_kv)),
        ("attention.layer_norm_rms_epsilon", Value::F32(eps as f32)),
        ("rope.freq_base", Value::F32(theta as f32)),
    ];
    if spec.gguf_qk_permuted {
        // llama's converter adds these two (qwen2's does not; llama.cpp derives them).
        keys.insert(0, ("vocab_size", u32v(vocab)));
        keys.insert(5, ("rope.dimension_count", u32v(head_dim)));
    }
    let mut meta = arch_metadata(gguf_arch, &dir, keys);
    meta.extend(bpe_tokenizer(&dir, cfg, vocab as usize)?);
    let extra: Extra = llama3_rope_factors(&spec.rope_scaling, theta, c.head_dim)
        .map(|f| ("rope_freqs.weight".to_string(), f))
        .into_iter()
        .collect();
    let (n_head, n_kv) = match spec.gguf_qk_permuted {
        true => (n_head, n_kv),
        // qwen2: llama.cpp runs NeoX rotary on the rows as stored.
        false => (0, 0),
    };

    let mut jobs = Vec::with_capacity(src.tensors.len());
    for t in &src.tensors {
        let Some(mapped) = llama_name(&t.name) else {
            return Err(unmapped(src, t, "LlamaForCausalLM"));
        };
        let Some(gname) = mapped else { continue };
        // The converter permutes weights and biases of q_proj / k_proj alike.
        let heads = if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") {
            Some(n_head as usize)
        } else if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") {
            Some(n_kv as usize)
        } else {
            None
        }
        .filter(|h| *h > 0);
        if let Some(h) = heads {
            if t.shape.is_empty() || t.shape.len() > 2 || t.shape[0] % (2 * h) != 0 {
                return Err(Error::Shape {
                    path: src.path.clone(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "shape {:?} cannot be split into {h} heads of rotary pairs",
                        t.shape
                    ),
                });
            }
        }
        jobs.push(job(t, gname, qtype, fallbacks, heads, None));
    }
    Ok((meta, jobs, extra))
}

/// The Hugging Face row that row `r` of llama.cpp's Falcon qkv (`[all q, all k, all v]`) comes
/// from: HF groups rows per KV head as `[q x H/KV, k, v]`.
pub(super) fn falcon_hf_row(r: usize, heads: usize, kv: usize, hd: usize) -> usize {
    let g = heads / kv;
    let (head, i) = (r / hd, r % hd);
    if head < heads {
        ((head / g) * (g + 2) + head % g) * hd + i
    } else if head < heads + kv {
        ((head - heads) * (g + 2) + g) * hd + i
    } else {
        ((head - heads - kv) * (g + 2) + g + 1) * hd + i
    }
}

/// GGUF name of a Hugging Face Falcon tensor, as llama.cpp's tensor map names it (`ln_mlp` is its
/// `attn_norm` and `ln_attn` its `attn_norm_2`).
fn falcon_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "transformer.word_embeddings.weight" => Some("token_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("transformer.h.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" | "ln_mlp" => "attn_norm",
        "ln_attn" => "attn_norm_2",
        "self_attention.query_key_value" => "attn_qkv",
        "self_attention.dense" => "attn_output",
        "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Metadata and tensor jobs for a Hugging Face `FalconForCausalLM` store, as llama.cpp's converter
/// writes them, except `falcon.feed_forward_length`, which is the real MLP size (the converter
/// writes 4 x hidden whatever `ffn_hidden_size` says) and the KV head count, which is the one
/// transformers uses (1 for multi-query, where small configs save `num_kv_heads` = heads).
pub(super) fn hf_falcon<'a>(
    src: &'a WeightStore,
    qtype: QType,
    fallbacks: &mut Vec<String>,
) -> Result<(Metadata, Vec<Job<'a>>, Extra)> {
    let c = crate::models::FalconConfig::from_store(src)?;
    let dir = model_dir(src);
    if !c.parallel_attn {
        return Err(Error::Invalid(format!(
            "{}: a Falcon with parallel_attn false has no llama.cpp graph; it cannot be written as GGUF",
            dir.display()
        )));
    }
    let cfg = src.config.as_ref().expect("from_store read config.json");
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta = arch_metadata(
        "falcon",
        &dir,
        vec![
            ("context_length", u32v(2048)),
            ("tensor_data_layout", Value::String("jploski".into())),
            ("embedding_length", u32v(c.hidden_size)),
            ("feed_forward_length", u32v(c.ffn_hidden_size)),
            ("block_count", u32v(c.num_layers)),
            ("attention.head_count", u32v(c.num_heads)),
            ("attention.head_count_kv", u32v(c.num_kv_heads)),
            (
                "attention.layer_norm_epsilon",
                Value::F32(c.layer_norm_eps as f32),
            ),
        ],
    );
    meta.extend(bpe_tokenizer(&dir, cfg, c.vocab_size)?);
    let mut jobs = Vec::with_capacity(src.tensors.len());
    for t in &src.tensors {
        let Some(gname) = falcon_name(&t.name) else {
            return Err(unmapped(src, t, "Falcon"));
        };
        let groups =
            gname
                .contains(".attn_qkv.")
                .then_some((c.num_heads, c.num_kv_heads, c.head_dim));
        if groups.is_some() && t.shape.first() != Some(&c.qkv_rows()) {
            return Err(Error::Shape {
                path: src.path.clone(),
                tensor: t.name.clone(),
                msg: format!("{:?} is not a fused qkv of {} rows", t.shape, c.qkv_rows()),
            });
        }
        jobs.push(job(t, gname, qtype, fallbacks, None, groups));
    }
    Ok((meta, jobs, Vec::new()))
}

/// The error for a tensor of `src` that llama.cpp's `mapping` (of Hugging Face names to GGUF
/// names) does not name.
fn unmapped(src: &WeightStore, t: &StoredTensor, mapping: &str) -> Error {
    Error::Invalid(format!(
        "{}: tensor '{}' has no GGUF name in llama.cpp's {mapping} mapping",
        src.path.display(),
        t.name
    ))
}

/// `general.architecture` and `general.name` (the model directory's name, else "model"), then
/// `<arch>.<key>` for each of `keys`, in order.
fn arch_metadata(arch: &str, dir: &Path, keys: Vec<(&str, Value)>) -> Metadata {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.name".to_string(), Value::String(name)),
    ];
    meta.extend(keys.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    meta
}

/// The job writing `t` as `name` in `qtype`, or in the fallback [`choose_type`] picks (reported in
/// `fallbacks`).
fn job<'a>(
    t: &'a StoredTensor,
    name: String,
    qtype: QType,
    fallbacks: &mut Vec<String>,
    permute_heads: Option<usize>,
    qkv_groups: Option<(usize, usize, usize)>,
) -> Job<'a> {
    let (to, why) = choose_type(&name, &t.shape, qtype);
    fallbacks.extend(why);
    Job {
        src: t,
        name,
        to,
        permute_heads,
        qkv_groups,
    }
}
