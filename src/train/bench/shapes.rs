//! The model shapes `qtune bench` knows: their `config.json`, parameter count and the dimensions
//! the FLOP count needs.

use crate::models::{FalconConfig, LlamaConfig};
use crate::quant::QType;
use crate::{Error, Result};
use std::path::Path;

/// Named shapes `qtune bench --shape` knows (a `config.json` path works too).
pub const SHAPES: [&str; 7] = [
    "llama-2-7b",
    "llama-2-13b",
    "tinyllama-1.1b",
    "llama-3-8b",
    "mistral-7b",
    "qwen2.5-7b",
    "falcon-7b",
];

/// Weight types a synthetic model can be generated in.
pub const BENCH_QUANTS: [QType; 5] = [
    QType::NF4,
    QType::Q4_0,
    QType::Q8_0,
    QType::Q4_K,
    QType::BF16,
];

/// The transformers `config.json` of a named shape, or of a `config.json` path.
pub fn shape_config(shape: &str) -> Result<serde_json::Value> {
    let llama = |v: u64, c: u64, i: u64, l: u64, h: u64, k: u64, theta: f64| {
        serde_json::json!({
            "model_type": "llama", "vocab_size": v, "hidden_size": c, "intermediate_size": i,
            "num_hidden_layers": l, "num_attention_heads": h, "num_key_value_heads": k,
            "rms_norm_eps": 1e-5, "rope_theta": theta, "tie_word_embeddings": false,
        })
    };
    // Values from each model's published config.json on the Hugging Face hub.
    Ok(match shape {
        "llama-2-7b" => llama(32000, 4096, 11008, 32, 32, 32, 1e4),
        "llama-2-13b" => llama(32000, 5120, 13824, 40, 40, 40, 1e4),
        "tinyllama-1.1b" => llama(32000, 2048, 5632, 22, 32, 4, 1e4),
        // meta-llama/Llama-3.1-8B: Llama 3's 128256-token vocabulary, GQA 32/8, and 3.1's rotary
        // scaling (`rope_scaling` llama3, 128k context; Llama 3.0 8B is the same shape without it).
        "llama-3-8b" => {
            let mut c = llama(128256, 4096, 14336, 32, 32, 8, 5e5);
            c["max_position_embeddings"] = 131072.into();
            c["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            });
            c
        }
        // mistralai/Mistral-7B-Instruct-v0.2: rope_theta 1e6, no sliding window (v0.1's 4096-token
        // window would refuse --seq-len above it).
        "mistral-7b" => {
            let mut c = llama(32000, 4096, 14336, 32, 32, 8, 1e6);
            c["model_type"] = "mistral".into();
            c["sliding_window"] = serde_json::Value::Null;
            c
        }
        // Qwen/Qwen2.5-7B: q/k/v biases, GQA 28/4, untied head, the sliding-window keys off.
        "qwen2.5-7b" => {
            let mut c = llama(152064, 3584, 18944, 28, 28, 4, 1e6);
            c["model_type"] = "qwen2".into();
            c["rms_norm_eps"] = 1e-6.into();
            c["use_sliding_window"] = false.into();
            c["sliding_window"] = 131072.into();
            c["max_window_layers"] = 28.into();
            c
        }
        // tiiuae/falcon-7b: multi-query attention, parallel attention + MLP, tied head.
        "falcon-7b" => serde_json::json!({
            "model_type": "falcon", "vocab_size": 65024, "hidden_size": 4544,
            "num_attention_heads": 71, "num_kv_heads": 1, "num_hidden_layers": 32,
            "multi_query": true, "parallel_attn": true, "new_decoder_architecture": false,
            "bias": false, "alibi": false, "layer_norm_epsilon": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true,
        }),
        path => {
            let p = Path::new(path);
            let p = if p.is_dir() {
                p.join("config.json")
            } else {
                p.to_path_buf()
            };
            if !p.exists() {
                return Err(Error::Invalid(format!(
                    "--shape {path}: neither a known shape ({}) nor an existing config.json",
                    SHAPES.join(", ")
                )));
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Json {
                path: p.clone(),
                msg: format!("not valid JSON: {e}"),
            })?
        }
    })
}

/// Parameters of a Llama-family model of this config (embedding, decoder layers with norms and
/// Qwen2's q/k/v biases, final norm, and an untied lm_head).
pub fn param_count(cfg: &LlamaConfig) -> usize {
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let biases = if cfg.family.qwen2 { q + 2 * kv } else { 0 };
    let layer = 2 * q * c + 2 * kv * c + 3 * i * c + 2 * c + biases;
    let head = if cfg.tie_word_embeddings { 0 } else { v * c };
    v * c + cfg.num_layers * layer + c + head
}

/// The dimensions the FLOP count needs, for either architecture (Falcon's MLP size as
/// `intermediate_size`; its tied head).
pub(super) fn shape_dims(config: &serde_json::Value, path: &Path) -> Result<LlamaConfig> {
    if config["model_type"] != "falcon" {
        return LlamaConfig::from_hf(config, path);
    }
    let f = FalconConfig::from_hf(config, path)?;
    Ok(LlamaConfig {
        vocab_size: f.vocab_size,
        hidden_size: f.hidden_size,
        intermediate_size: f.ffn_hidden_size,
        num_layers: f.num_layers,
        num_heads: f.num_heads,
        num_kv_heads: f.num_kv_heads,
        head_dim: f.head_dim,
        rope_theta: f.rope_theta,
        rms_norm_eps: f.layer_norm_eps,
        tie_word_embeddings: true,
        family: Default::default(),
    })
}
