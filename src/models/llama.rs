//! The Llama family: Llama 1-3 (Llama 3.1's `llama3` rotary scaling, or llama.cpp's
//! `rope_freqs.weight`), Mistral (a sliding window: longer sequences refused), Qwen2 (q/k/v biases,
//! GGUF rows unpermuted), SmolLM2/TinyLlama (tied head). RMSNorm, split q/k/v/o, rotate-half rotary,
//! SwiGLU MLP, sequential residual. Its config reader and [`Spec`]; everything else is the shared
//! [`Transformer`](super::transformer::Transformer).
use super::arch::{
    self, Architecture, Attention, HfKeys, Mlp, Names, NormKind, Residual, Role, RopeScaling, Spec,
};
pub use super::options::{LlamaOptions, LoraSpec};
use crate::store::WeightStore;
use crate::Result;

/// A Llama causal LM over a weight store.
pub type Llama = super::Model<LlamaConfig>;

/// The Hugging Face layer stem (PEFT module paths start with it).
pub const HF_LAYER: &str = "model.layers";

/// The seven projections of a decoder layer by PEFT name, with their module group and GGUF name.
pub const PROJECTIONS: [(&str, &str, &str); 7] = [
    ("q_proj", "self_attn", "attn_q"),
    ("k_proj", "self_attn", "attn_k"),
    ("v_proj", "self_attn", "attn_v"),
    ("o_proj", "self_attn", "attn_output"),
    ("gate_proj", "mlp", "ffn_gate"),
    ("up_proj", "mlp", "ffn_up"),
    ("down_proj", "mlp", "ffn_down"),
];

/// Hyper-parameters of a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden size C.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads H.
    pub num_heads: usize,
    /// Key/value heads KVH (GQA when below H).
    pub num_kv_heads: usize,
    /// Head dim D.
    pub head_dim: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// What sets this member of the family apart.
    pub family: Family,
}

/// A member of the Llama family: what differs from Llama 2.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    /// Qwen2: biases on q/k/v, GGUF architecture `qwen2` (rows not permuted).
    pub qwen2: bool,
    /// Rotary scaling (Llama 3.1).
    pub rope_scaling: RopeScaling,
    /// Mistral v0.1's / Qwen2's (when used) sliding window.
    pub sliding_window: Option<usize>,
}

impl Architecture for LlamaConfig {
    fn read(store: &WeightStore) -> Result<Self> {
        arch::read_config(store, "Llama", Self::from_hf, Self::from_gguf)
    }

    fn spec(&self, gguf: bool) -> Spec {
        let hf = Names {
            embed: "model.embed_tokens.weight",
            final_norm: "model.norm",
            head: "lm_head.weight",
            layer: HF_LAYER,
            attn_norm: "input_layernorm",
            mlp_norm: Some("post_attention_layernorm"),
        };
        let qwen2 = self.family.qwen2;
        Spec {
            arch: if qwen2 { "qwen2" } else { "llama" },
            label: if qwen2 { "Qwen2" } else { "Llama" },
            gguf,
            names: if gguf { arch::GGUF_NAMES } else { hf },
            hf_layer: HF_LAYER,
            projections: &PROJECTIONS,
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            ffn: self.intermediate_size,
            layers: self.num_layers,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            eps: self.rms_norm_eps,
            norm: NormKind::Rms,
            attention: Attention::Split,
            mlp: Mlp::SwiGlu,
            residual: Residual::Sequential,
            rope_scaling: self.family.rope_scaling.clone(),
            gguf_qk_permuted: !qwen2,
            bias: if qwen2 {
                &[Role::Q, Role::K, Role::V]
            } else {
                &[]
            },
            sliding_window: self.family.sliding_window,
            // llama.cpp drops `output.weight` when the head is tied.
            tied_head: self.tie_word_embeddings || gguf,
        }
    }
}

impl LlamaConfig {
    /// From a transformers `config.json` (`path` names it in errors).
    pub fn from_hf(cfg: &serde_json::Value, path: &std::path::Path) -> Result<Self> {
        let k = HfKeys::new(cfg, path);
        if let Some(t) = k
            .str("model_type")
            .filter(|t| !matches!(*t, "llama" | "mistral" | "qwen2"))
        {
            return Err(k.bad(format!(
                "model_type '{t}' is not a Llama; qtune's Llama loader reads llama, mistral and qwen2"
            )));
        }
        let qwen2 = k.str("model_type") == Some("qwen2");
        // Mistral: `sliding_window` (null from v0.2); Qwen2: only with `use_sliding_window`.
        let window = match qwen2 {
            true if !k.flag("use_sliding_window", false) => None,
            _ => k.int(&["sliding_window"]),
        };
        let family = Family {
            qwen2,
            rope_scaling: k.rope_scaling()?,
            sliding_window: window,
        };
        for b in ["attention_bias", "mlp_bias"] {
            if k.flag(b, false) {
                return Err(k.bad(format!(
                    "{b} = true: Llama linears with biases are not supported yet"
                )));
            }
        }
        let hidden = k.need(&["hidden_size"])?;
        let heads = k.need(&["num_attention_heads"])?;
        let c = LlamaConfig {
            vocab_size: k.need(&["vocab_size"])?,
            hidden_size: hidden,
            intermediate_size: k.need(&["intermediate_size"])?,
            num_layers: k.need(&["num_hidden_layers"])?,
            num_heads: heads,
            num_kv_heads: k.int(&["num_key_value_heads"]).unwrap_or(heads),
            head_dim: k.int(&["head_dim"]).unwrap_or(hidden / heads.max(1)),
            rope_theta: k.float("rope_theta", 10000.0),
            rms_norm_eps: k.float("rms_norm_eps", 1e-6),
            tie_word_embeddings: k.flag("tie_word_embeddings", false),
            family,
        };
        c.check().map_err(|m| k.bad(m))?;
        Ok(c)
    }

    /// From GGUF `llama.*` metadata; the vocabulary size falls back to `token_embd`'s rows and the
    /// tie to the absence of `output.weight` (both as llama.cpp reads them).
    pub fn from_gguf(store: &WeightStore) -> Result<Self> {
        let arch = super::gguf_arch(store);
        let qwen2 = arch == Some("qwen2");
        let g = match qwen2 {
            true => super::GgufHparams::new(store, "qwen2", "Llama-family")?,
            false => super::GgufHparams::new(store, "llama", "Llama")?,
        };
        let hidden = g.int("embedding_length")?;
        let heads = g.int("attention.head_count")?;
        let embd = g.embedding()?;
        let c = LlamaConfig {
            vocab_size: g.int("vocab_size").unwrap_or(embd.shape[0]),
            hidden_size: hidden,
            intermediate_size: g.int("feed_forward_length")?,
            num_layers: g.int("block_count")?,
            num_heads: heads,
            num_kv_heads: g.int("attention.head_count_kv").unwrap_or(heads),
            head_dim: g
                .int("rope.dimension_count")
                .unwrap_or(hidden / heads.max(1)),
            rope_theta: g.float("rope.freq_base").unwrap_or(10000.0),
            rms_norm_eps: g.float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            tie_word_embeddings: store.get("output.weight").is_none(),
            family: Family {
                qwen2,
                rope_scaling: g.rope_freqs()?,
                sliding_window: None,
            },
        };
        c.check().map_err(|m| g.corrupt(m))?;
        Ok(c)
    }

    /// The config of a store: config.json for Hugging Face directories, metadata for GGUF.
    pub fn from_store(store: &WeightStore) -> Result<Self> {
        <Self as Architecture>::read(store)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let c = self;
        arch::check_heads(c.num_heads, c.num_kv_heads, c.head_dim)?;
        let dims = [c.vocab_size, c.hidden_size, c.intermediate_size];
        if dims.contains(&0) || c.num_layers == 0 {
            return Err(format!("zero-sized dimension in {c:?}"));
        }
        Ok(())
    }
}
