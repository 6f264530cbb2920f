//! Falcon (FalconForCausalLM, and the older RefinedWeb / RefinedWebModel checkpoints) as
//! transformers 4.46 computes it: LayerNorms with bias, one fused `query_key_value` projection (three
//! layouts; llama.cpp regroups the new one in GGUF files), rotary embeddings, an exact-erf GELU MLP,
//! attention and MLP in parallel (or in sequence where the config says so), lm_head tied to the
//! word embeddings. Its config-key zoo and [`Spec`]; everything else is the shared
//! [`Transformer`](super::transformer::Transformer).
pub use super::arch::QkvLayout;
use super::arch::{
    self, Architecture, Attention, HfKeys, Mlp, Names, NormKind, Residual, Role, Spec,
};
pub use super::options::LlamaOptions as FalconOptions;
use crate::store::WeightStore;
use crate::Result;
use std::path::Path;

/// A Falcon causal LM over a weight store.
pub type Falcon = super::Model<FalconConfig>;

/// The Hugging Face layer stem (PEFT module paths start with it).
pub const HF_LAYER: &str = "transformer.h";

/// The four linears of a decoder layer by PEFT name, with their module group and GGUF name.
pub const PROJECTIONS: [(&str, &str, &str); 4] = [
    ("query_key_value", "self_attention", "attn_qkv"),
    ("dense", "self_attention", "attn_output"),
    ("dense_h_to_4h", "mlp", "ffn_up"),
    ("dense_4h_to_h", "mlp", "ffn_down"),
];

/// Hyper-parameters of a Falcon model.
#[derive(Clone, Debug, PartialEq)]
pub struct FalconConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden size C.
    pub hidden_size: usize,
    /// MLP inner size (4C unless `ffn_hidden_size` says otherwise).
    pub ffn_hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads H.
    pub num_heads: usize,
    /// Key/value heads KVH as the attention uses them (1 for multi-query).
    pub num_kv_heads: usize,
    /// Head dim D = C / H.
    pub head_dim: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Fused qkv layout.
    pub qkv: QkvLayout,
    /// Attention and MLP read the same residual and are both added to it.
    pub parallel_attn: bool,
    /// Separate `ln_attn` / `ln_mlp` (new layout with `num_ln_in_parallel_attn` 2).
    pub two_norms: bool,
    /// Linears carry biases (`bias: true`).
    pub bias: bool,
}

impl Architecture for FalconConfig {
    fn read(store: &WeightStore) -> Result<Self> {
        arch::read_config(store, "Falcon", Self::from_hf, Self::from_gguf)
    }

    fn spec(&self, gguf: bool) -> Spec {
        let (attn_norm, mlp_norm) = match (gguf, self.two_norms, self.parallel_attn) {
            // llama.cpp maps ln_mlp to attn_norm and ln_attn to attn_norm_2 (its Falcon graph feeds
            // attn_norm_2 to attention and attn_norm to the MLP).
            (true, true, _) => ("attn_norm_2", Some("attn_norm")),
            (true, false, _) => ("attn_norm", None),
            (false, true, _) => ("ln_attn", Some("ln_mlp")),
            (false, false, true) => ("input_layernorm", None),
            (false, false, false) => ("input_layernorm", Some("post_attention_layernorm")),
        };
        let names = if gguf {
            arch::GGUF_NAMES
        } else {
            Names {
                embed: "transformer.word_embeddings.weight",
                final_norm: "transformer.ln_f",
                head: "lm_head.weight",
                layer: HF_LAYER,
                ..arch::GGUF_NAMES
            }
        };
        Spec {
            arch: "falcon",
            label: "Falcon",
            gguf,
            names: Names {
                attn_norm,
                mlp_norm,
                ..names
            },
            hf_layer: HF_LAYER,
            projections: &PROJECTIONS,
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            ffn: self.ffn_hidden_size,
            layers: self.num_layers,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            eps: self.layer_norm_eps,
            norm: NormKind::LayerNorm,
            attention: Attention::Fused(self.qkv),
            mlp: Mlp::Gelu,
            residual: if self.parallel_attn {
                Residual::Parallel
            } else {
                Residual::Sequential
            },
            rope_scaling: arch::RopeScaling::None,
            gguf_qk_permuted: false,
            bias: if self.bias {
                &[Role::Qkv, Role::O, Role::Up, Role::Down]
            } else {
                &[]
            },
            sliding_window: None,
            // A separate lm_head appears only in GGUF files whose converter wrote `output`.
            tied_head: true,
        }
    }
}

impl FalconConfig {
    /// From a transformers `config.json` (`model_type` falcon, RefinedWeb or RefinedWebModel).
    pub fn from_hf(cfg: &serde_json::Value, path: &Path) -> Result<Self> {
        let k = HfKeys::new(cfg, path);
        let mt = k.str("model_type").unwrap_or("falcon");
        if !matches!(mt, "falcon" | "RefinedWeb" | "RefinedWebModel") {
            return Err(k.bad(format!(
                "model_type '{mt}' is not a Falcon; qtune's Falcon loader reads falcon, RefinedWeb and RefinedWebModel"
            )));
        }
        if k.flag("alibi", false) {
            return Err(k.bad(
                "ALiBi position biases (alibi: true) are not supported; qtune's Falcon uses rotary embeddings".into(),
            ));
        }
        if !k.flag("rotary", true) {
            return Err(k.bad("rotary: false without ALiBi is not a Falcon qtune can run".into()));
        }
        k.plain_rope()?;
        let act = k.str("activation").unwrap_or("gelu");
        if act != "gelu" {
            return Err(k.bad(format!(
                "activation '{act}' is not supported; Falcon's MLP uses exact GELU (\"gelu\")"
            )));
        }
        // Several key spellings: current transformers, then the RefinedWeb code's.
        let hidden = k.need(&["hidden_size", "d_model"])?;
        let heads = k.need(&["num_attention_heads", "n_head"])?;
        let new_arch = k.flag("new_decoder_architecture", mt == "RefinedWeb");
        let parallel = k.flag("parallel_attn", true);
        let n_ln = k.int(&["num_ln_in_parallel_attn"]);
        if new_arch && !parallel {
            return Err(k.bad(
                "new_decoder_architecture with parallel_attn false has no norm transformers can run"
                    .into(),
            ));
        }
        if !new_arch && parallel && n_ln.is_some_and(|n| n != 1) {
            return Err(
                k.bad("num_ln_in_parallel_attn 2 needs new_decoder_architecture: true".into())
            );
        }
        let (qkv, kvh) = if new_arch {
            let kv = k.int(&["num_kv_heads", "n_head_kv"]).unwrap_or(heads);
            (QkvLayout::Grouped, kv)
        } else if k.flag("multi_query", true) {
            // transformers ignores num_kv_heads here (small configs save it equal to H).
            (QkvLayout::MultiQuery, 1)
        } else {
            (QkvLayout::PerHead, heads)
        };
        let c = FalconConfig {
            vocab_size: k.need(&["vocab_size"])?,
            hidden_size: hidden,
            ffn_hidden_size: k.int(&["ffn_hidden_size"]).unwrap_or(4 * hidden),
            num_layers: k.need(&["num_hidden_layers", "n_layer"])?,
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: hidden / heads.max(1),
            rope_theta: k.float("rope_theta", 10000.0),
            layer_norm_eps: k.float("layer_norm_epsilon", 1e-5),
            qkv,
            parallel_attn: parallel,
            two_norms: new_arch && n_ln.unwrap_or(2) == 2,
            bias: k.flag("bias", false),
        };
        if !k.flag("tie_word_embeddings", true) {
            return Err(
                k.bad("tie_word_embeddings false: Falcon's lm_head is the word embedding".into())
            );
        }
        c.check().map_err(|m| k.bad(m))?;
        Ok(c)
    }

    /// From GGUF `falcon.*` metadata as llama.cpp writes it; the new layout is recognised by its
    /// `attn_norm_2` tensors (llama.cpp does the same), and llama.cpp runs Falcon in parallel only.
    pub fn from_gguf(store: &WeightStore) -> Result<Self> {
        let g = super::GgufHparams::new(store, "falcon", "Falcon")?;
        let hidden = g.int("embedding_length")?;
        let heads = g.int("attention.head_count")?;
        let kvh = g.int("attention.head_count_kv").unwrap_or(1);
        let embd = g.embedding()?;
        let new_arch = store.get("blk.0.attn_norm_2.weight").is_some();
        // llama.cpp's converter writes 4 x hidden here whatever ffn_hidden_size was: the tensor
        // is the truth.
        let ffn = match store.get("blk.0.ffn_up.weight") {
            Some(t) if t.shape.len() == 2 => t.shape[0],
            _ => g.int("feed_forward_length")?,
        };
        let c = FalconConfig {
            vocab_size: g.int("vocab_size").unwrap_or(embd.shape[0]),
            hidden_size: hidden,
            ffn_hidden_size: ffn,
            num_layers: g.int("block_count")?,
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: hidden / heads.max(1),
            rope_theta: g.float("rope.freq_base").unwrap_or(10000.0),
            layer_norm_eps: g.float("attention.layer_norm_epsilon").unwrap_or(1e-5),
            qkv: if new_arch || kvh > 1 {
                QkvLayout::Grouped
            } else {
                QkvLayout::MultiQuery
            },
            parallel_attn: true,
            two_norms: new_arch,
            bias: store.get("blk.0.attn_qkv.bias").is_some(),
        };
        c.check().map_err(|m| g.corrupt(m))?;
        Ok(c)
    }

    /// The config of a store: config.json for Hugging Face directories, metadata for GGUF.
    pub fn from_store(store: &WeightStore) -> Result<Self> {
        <Self as Architecture>::read(store)
    }

    /// Rows of the fused qkv projection: `(H + 2·KVH)·D`.
    pub fn qkv_rows(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    fn check(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.head_dim * c.num_heads != c.hidden_size {
            return Err(format!(
                "hidden size {} is not a whole number of {} heads",
                c.hidden_size, c.num_heads
            ));
        }
        arch::check_heads(c.num_heads, c.num_kv_heads, c.head_dim)?;
        if [c.vocab_size, c.ffn_hidden_size, c.num_layers].contains(&0) {
            return Err(format!("zero-sized dimension in {c:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::LoraSpec;

    fn cfg(j: serde_json::Value) -> Result<FalconConfig> {
        FalconConfig::from_hf(&j, Path::new("config.json"))
    }

    #[test]
    fn refined_web_keys() {
        // Falcon-7B's original config (RefinedWebModel): n_head, n_layer, no num_kv_heads.
        let c = cfg(serde_json::json!({
            "model_type": "RefinedWebModel", "hidden_size": 4544, "n_head": 71, "n_layer": 32,
            "multi_query": true, "parallel_attn": true, "vocab_size": 65024, "bias": false,
            "alibi": false, "layer_norm_epsilon": 1e-5
        }))
        .unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (71, 1, 64));
        assert_eq!((c.num_layers, c.ffn_hidden_size), (32, 4 * 4544));
        assert_eq!((c.qkv, c.two_norms), (QkvLayout::MultiQuery, false));
        assert_eq!(c.qkv_rows(), 73 * 64);
        // Falcon-40B's (RefinedWeb): new layout implied, n_head_kv groups.
        let c = cfg(serde_json::json!({
            "model_type": "RefinedWeb", "hidden_size": 8192, "n_head": 128, "n_head_kv": 8,
            "n_layer": 60, "parallel_attn": true, "vocab_size": 65024, "bias": false
        }))
        .unwrap();
        assert_eq!(
            (c.num_kv_heads, c.qkv, c.two_norms),
            (8, QkvLayout::Grouped, true)
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let base = serde_json::json!({
            "model_type": "falcon", "hidden_size": 192, "num_attention_heads": 3,
            "num_hidden_layers": 1, "vocab_size": 10
        });
        let with = |k: &str, v: serde_json::Value| {
            let mut j = base.clone();
            j[k] = v;
            cfg(j).unwrap_err().to_string()
        };
        assert!(with("alibi", true.into()).contains("ALiBi"));
        assert!(with("model_type", "llama".into()).contains("not a Falcon"));
        assert!(with("num_attention_heads", 5.into()).contains("whole number"));
        let mut j = base.clone();
        j["new_decoder_architecture"] = true.into();
        j["parallel_attn"] = false.into();
        assert!(cfg(j).unwrap_err().to_string().contains("parallel_attn"));
        assert!(cfg(base).is_ok());
    }

    #[test]
    fn lora_targets_are_peft_names() {
        use crate::lora::seam::AdapterMethod;
        let names = PROJECTIONS.map(|p| p.0);
        let t = |t: &[&str]| {
            let spec = LoraSpec {
                targets: t.iter().map(|s| s.to_string()).collect(),
                ..LoraSpec::default()
            };
            spec.targets(&names, "Falcon")
        };
        assert_eq!(t(&["all-linear"]).unwrap().len(), 4);
        assert_eq!(
            t(&["dense", "dense_4h_to_h"]).unwrap(),
            ["dense", "dense_4h_to_h"]
        );
        assert!(t(&["q_proj"]).is_err());
    }
}
