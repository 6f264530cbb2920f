//! Architectures as data: what one decoder family is, in a [`Spec`] its config builds — tensor
//! names (Hugging Face and llama.cpp GGUF), the block variant (norm kind, attention layout, MLP
//! kind, residual wiring, biases, tied head) and the dimensions. The shared model
//! ([`super::transformer::Transformer`]) loads, runs, plans and exports any [`Spec`]; an
//! architecture's own file holds its config reader and its [`Spec`].
use crate::store::{SourceFormat, WeightStore};
use crate::{Error, Result};
use std::path::Path;

/// How the fused `query_key_value` output is laid out, in Hugging Face row order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvLayout {
    /// Falcon-7B (`multi_query`): all H query heads, then one key head, then one value head.
    MultiQuery,
    /// Old layout without multi-query: per head, its query, key and value (`(H, 3, D)`).
    PerHead,
    /// `new_decoder_architecture`: per KV group, its H/KVH query heads, its key, its value.
    Grouped,
}

/// The norm of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm with a weight (fused op; its weight stays a host constant).
    Rms,
    /// torch's LayerNorm with weight and bias (statistics in f32).
    LayerNorm,
}

/// The attention projections of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// Separate q, k, v, o; a GGUF's q/k rows carry llama.cpp's rotary permutation.
    Split,
    /// One fused qkv and o; a GGUF's grouped qkv rows carry llama.cpp's regrouping.
    Fused(QkvLayout),
}

/// The MLP of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu,
    /// `down(gelu_erf(up(x)))`.
    Gelu,
}

/// How attention and MLP meet the residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// `x += attn(norm1(x)); x += mlp(norm2(x))`.
    Sequential,
    /// `x += attn(norm1(x)) + mlp(norm2(x))`, or `mlp(norm1(x))` without a second norm.
    Parallel,
}

/// What a linear of a block does (its shape and place in the forward follow from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Query `(H·D, C)`.
    Q,
    /// Key `(KVH·D, C)`.
    K,
    /// Value `(KVH·D, C)`.
    V,
    /// Fused query, key and value `((H + 2·KVH)·D, C)`.
    Qkv,
    /// Attention output `(C, H·D)`.
    O,
    /// SwiGLU gate `(F, C)`.
    Gate,
    /// MLP up `(F, C)`.
    Up,
    /// MLP down `(C, F)`.
    Down,
}

/// Rotary frequencies beyond the plain `1/θ^(2i/D)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// Plain rotary.
    #[default]
    None,
    /// Llama 3.1's `rope_scaling` (`rope_type: llama3`), computed as transformers'
    /// `_compute_llama3_parameters` does, in f32.
    Llama3 {
        /// `factor` (8 in Llama 3.1).
        factor: f32,
        /// `low_freq_factor`.
        low_freq_factor: f32,
        /// `high_freq_factor`.
        high_freq_factor: f32,
        /// `original_max_position_embeddings`.
        original_max: f32,
    },
    /// llama.cpp's `rope_freqs.weight`: each plain frequency divided by its factor (`(D/2,)`).
    Factors(Vec<f32>),
}

/// An architecture's adaptable linears: (PEFT name, module group, llama.cpp name), attention
/// first, then the MLP, in the order of [`Spec::roles`].
pub type Projections = &'static [(&'static str, &'static str, &'static str)];

/// Tensor names of one naming scheme (Hugging Face or GGUF); norms are stems (`.weight`, `.bias`).
#[derive(Clone, Debug, PartialEq)]
pub struct Names {
    /// Token embedding.
    pub embed: &'static str,
    /// Final norm stem.
    pub final_norm: &'static str,
    /// Untied output projection.
    pub head: &'static str,
    /// Layer stem: `model.layers`, `transformer.h`, `blk`.
    pub layer: &'static str,
    /// Norm before attention, under the layer stem.
    pub attn_norm: &'static str,
    /// Norm before the MLP (None: the MLP reads the attention norm's output).
    pub mlp_norm: Option<&'static str>,
}

/// llama.cpp's names, shared by every architecture it writes.
pub const GGUF_NAMES: Names = Names {
    embed: "token_embd.weight",
    final_norm: "output_norm",
    head: "output.weight",
    layer: "blk",
    attn_norm: "attn_norm",
    mlp_norm: Some("ffn_norm"),
};

/// One decoder architecture with its dimensions: everything the shared model needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// llama.cpp's `general.architecture`.
    pub arch: &'static str,
    /// The name in messages ("Llama").
    pub label: &'static str,
    /// The tensors are named as in a GGUF (else Hugging Face).
    pub gguf: bool,
    /// Tensor names in the store.
    pub names: Names,
    /// Layer stem of the Hugging Face names (PEFT module paths use it whatever the store).
    pub hf_layer: &'static str,
    /// Adaptable linears.
    pub projections: Projections,
    /// Vocabulary V.
    pub vocab: usize,
    /// Hidden C.
    pub hidden: usize,
    /// MLP inner size F.
    pub ffn: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads KVH.
    pub kv_heads: usize,
    /// Head dim D.
    pub head_dim: usize,
    /// Rotary base (rotate-half rotary on q and k).
    pub rope_theta: f64,
    /// Norm epsilon.
    pub eps: f64,
    /// Norm kind.
    pub norm: NormKind,
    /// Attention projections.
    pub attention: Attention,
    /// MLP kind.
    pub mlp: Mlp,
    /// Residual wiring.
    pub residual: Residual,
    /// Rotary scaling of the frequencies.
    pub rope_scaling: RopeScaling,
    /// A GGUF's q/k rows carry llama.cpp's rotary permutation (its `llama` family; not `qwen2`,
    /// which llama.cpp runs with NeoX rotary on unpermuted rows).
    pub gguf_qk_permuted: bool,
    /// The linears (by role) that carry biases (`<stem>.bias`).
    pub bias: &'static [Role],
    /// Sliding-window attention of this many tokens: decoding (generation) applies the window
    /// mask; the training forward and the plan refuse longer sequences (up to the window the mask
    /// is the causal one).
    pub sliding_window: Option<usize>,
    /// Without a stored head, the embedding is the head (else a missing head is an error).
    pub tied_head: bool,
}

impl Spec {
    /// The role of each linear, in [`Spec::projections`] order.
    pub fn roles(&self) -> Vec<Role> {
        let mut r = match self.attention {
            Attention::Split => vec![Role::Q, Role::K, Role::V, Role::O],
            Attention::Fused(_) => vec![Role::Qkv, Role::O],
        };
        r.extend_from_slice(match self.mlp {
            Mlp::SwiGlu => &[Role::Gate, Role::Up, Role::Down],
            Mlp::Gelu => &[Role::Up, Role::Down],
        });
        r
    }

    /// Does linear `pi` carry a bias?
    pub fn has_bias(&self, pi: usize) -> bool {
        self.bias.contains(&self.roles()[pi])
    }

    /// The rotary inverse frequencies `(D/2,)` in f32, as transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let plain =
            (0..d / 2).map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32));
        match &self.rope_scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Factors(f) => plain.zip(f).map(|(p, f)| p / f).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max: old,
            } => {
                // transformers' f32 tensor arithmetic, term by term.
                let (low_wl, high_wl) = (old / lo, old / hi);
                plain
                    .map(|f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wl > low_wl { f / factor } else { f };
                        if wl < high_wl || wl > low_wl {
                            return scaled;
                        }
                        let s = (old / wl - lo) / (hi - lo);
                        (1.0 - s) * scaled / factor + s * scaled
                    })
                    .collect()
            }
        }
    }

    /// Refuses `t` positions beyond the sliding window (`what` names the setting in the message).
    pub fn check_window(&self, t: usize) -> Result<()> {
        match self.sliding_window {
            Some(w) if t > w => Err(Error::Invalid(format!(
                "{} attends within a sliding window of {w} tokens and qtune's training forward does \
                 not implement the window mask: a sequence of {t} positions is refused; use \
                 --seq-len {w} or less",
                self.label
            ))),
            _ => Ok(()),
        }
    }

    /// Index of the linear named `proj` (PEFT name).
    pub fn index(&self, proj: &str) -> Option<usize> {
        self.projections.iter().position(|p| p.0 == proj)
    }

    /// `(out, in)` of linear `pi`.
    pub fn shape(&self, pi: usize) -> (usize, usize) {
        let (c, f, d) = (self.hidden, self.ffn, self.head_dim);
        match self.roles()[pi] {
            Role::Q => (self.heads * d, c),
            Role::K | Role::V => (self.kv_heads * d, c),
            Role::Qkv => (self.qkv_rows(), c),
            Role::O => (c, self.heads * d),
            Role::Gate | Role::Up => (f, c),
            Role::Down => (c, f),
        }
    }

    /// Rows of a fused qkv: `(H + 2·KVH)·D`.
    pub fn qkv_rows(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// The stored weight name of linear `pi` in layer `i`.
    pub fn linear_name(&self, i: usize, pi: usize) -> String {
        let (p, group, g) = self.projections[pi];
        if self.gguf {
            format!("blk.{i}.{g}.weight")
        } else {
            format!("{}.{i}.{group}.{p}.weight", self.names.layer)
        }
    }

    /// The PEFT module path of linear `pi` in layer `i` (`model.layers.N.self_attn.q_proj`).
    pub fn module_path(&self, i: usize, pi: usize) -> String {
        let (p, group, _) = self.projections[pi];
        format!("{}.{i}.{group}.{p}", self.hf_layer)
    }

    /// Is `name` the stored weight of a decoder linear?
    pub fn is_linear(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(self.names.layer) else {
            return false;
        };
        let i = rest
            .trim_start_matches('.')
            .split('.')
            .next()
            .and_then(|s| s.parse::<usize>().ok());
        i.is_some_and(|i| {
            i < self.layers && (0..self.projections.len()).any(|p| self.linear_name(i, p) == name)
        })
    }

    /// Where llama.cpp's converter moves the output rows of linear `pi`: for each GGUF row, the
    /// Hugging Face row it holds; `None` where the orders agree. Split q/k: the rows of each head
    /// interleaved for llama.cpp's rotary (HF row `j·D/2 + i` at row `2i + j`). Fused qkv: regrouped
    /// from per-KV-group `[q.., k, v]` to `[all q, all k, all v]` (identity for multi-query).
    pub fn gguf_rows(&self, pi: usize) -> Option<Vec<usize>> {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        let permuted = |heads: usize| {
            (0..heads * hd)
                .map(|g| (g / hd) * hd + (g % hd % 2) * half + g % hd / 2)
                .collect()
        };
        match (self.roles()[pi], self.attention) {
            (Role::Q | Role::K, _) if !self.gguf_qk_permuted => None,
            (Role::Q, _) => Some(permuted(self.heads)),
            (Role::K, _) => Some(permuted(self.kv_heads)),
            (Role::Qkv, Attention::Fused(QkvLayout::MultiQuery)) => None,
            (Role::Qkv, _) => {
                let mut hf = vec![0; self.qkv_rows()];
                for r in 0..hf.len() {
                    hf[regrouped_row(r, self.heads, self.kv_heads, hd)] = r;
                }
                Some(hf)
            }
            _ => None,
        }
    }
}

/// GGUF row order of a grouped fused qkv (`[all q, all k, all v]`) -> Hugging Face's (per KV group
/// `[q.., k, v]`): the GGUF row holding HF row `r`.
pub(crate) fn regrouped_row(r: usize, heads: usize, kvh: usize, hd: usize) -> usize {
    let g = heads / kvh;
    let (grp, rem) = (r / ((g + 2) * hd), r % ((g + 2) * hd));
    let (slot, i) = (rem / hd, rem % hd);
    if slot < g {
        (grp * g + slot) * hd + i
    } else if slot == g {
        (heads + grp) * hd + i
    } else {
        (heads + kvh + grp) * hd + i
    }
}

/// A config type that describes one architecture.
pub trait Architecture: Clone + std::fmt::Debug {
    /// The config of a store: config.json for Hugging Face directories, metadata for GGUF.
    fn read(store: &WeightStore) -> Result<Self>;
    /// The description of this model, with tensor names as in a GGUF (`gguf`) or Hugging Face.
    fn spec(&self, gguf: bool) -> Spec;
}

/// The config in `store` through `from_gguf` or, from config.json, `from_hf` (`label` names the
/// architecture in the error when config.json is missing).
pub(crate) fn read_config<C>(
    store: &WeightStore,
    label: &str,
    from_hf: impl Fn(&serde_json::Value, &Path) -> Result<C>,
    from_gguf: impl Fn(&WeightStore) -> Result<C>,
) -> Result<C> {
    match store.format {
        SourceFormat::Gguf => from_gguf(store),
        _ => {
            let cfg = store.config.as_ref().ok_or_else(|| Error::Json {
                path: store.path.join("config.json"),
                msg: format!("no config.json beside the weights; a {label} needs its config"),
            })?;
            from_hf(cfg, &store.path.join("config.json"))
        }
    }
}

/// The checks every attention config passes: whole KV groups, an even positive head dim.
pub(crate) fn check_heads(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> std::result::Result<(), String> {
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!(
            "{heads} heads is not a multiple of {kv_heads} KV heads"
        ));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(format!(
            "head dim {head_dim} must be even and positive for rotary"
        ));
    }
    Ok(())
}

/// A `config.json` reader: typed getters whose errors name the file.
pub(crate) struct HfKeys<'a> {
    cfg: &'a serde_json::Value,
    path: &'a Path,
}

impl<'a> HfKeys<'a> {
    pub(crate) fn new(cfg: &'a serde_json::Value, path: &'a Path) -> Self {
        HfKeys { cfg, path }
    }

    /// An error about the file.
    pub(crate) fn bad(&self, msg: String) -> Error {
        Error::Json {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    /// The first integer among `keys` (several spellings of one key).
    pub(crate) fn int(&self, keys: &[&str]) -> Option<usize> {
        keys.iter()
            .find_map(|k| self.cfg.get(*k).and_then(|v| v.as_u64()))
            .map(|v| v as usize)
    }

    /// [`Self::int`], required.
    pub(crate) fn need(&self, keys: &[&str]) -> Result<usize> {
        self.int(keys)
            .ok_or_else(|| self.bad(format!("config.json lacks integer '{}'", keys[0])))
    }

    /// Float `key`, or `default`.
    pub(crate) fn float(&self, key: &str, default: f64) -> f64 {
        self.cfg
            .get(key)
            .and_then(|v| v.as_f64())
            .unwrap_or(default)
    }

    /// Boolean `key`, or `default`.
    pub(crate) fn flag(&self, key: &str, default: bool) -> bool {
        self.cfg
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    /// String `key`.
    pub(crate) fn str(&self, key: &str) -> Option<&'a str> {
        self.cfg.get(key).and_then(|v| v.as_str())
    }

    /// Refuses a non-null `rope_scaling` (plain rotary only).
    pub(crate) fn plain_rope(&self) -> Result<()> {
        match self.rope_scaling()? {
            RopeScaling::None => Ok(()),
            _ => Err(self.bad("rope_scaling is not supported for this architecture".into())),
        }
    }

    /// `rope_scaling`: null, or Llama 3.1's `llama3` (`rope_type`, or the older `type`); any other
    /// type is refused by name.
    pub(crate) fn rope_scaling(&self) -> Result<RopeScaling> {
        let s = match self.cfg.get("rope_scaling") {
            Some(s) if !s.is_null() => s,
            _ => return Ok(RopeScaling::None),
        };
        let ty = s.get("rope_type").or_else(|| s.get("type"));
        match ty.and_then(|t| t.as_str()) {
            Some("llama3") => {}
            Some("default") => return Ok(RopeScaling::None),
            t => {
                return Err(self.bad(format!(
                "rope_scaling type {t:?} is not supported; qtune reads plain rotary and 'llama3'"
            )))
            }
        }
        let num = |k: &str| {
            s.get(k)
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
                .ok_or_else(|| {
                    self.bad(format!(
                        "rope_scaling of type llama3 lacks the number '{k}'"
                    ))
                })
        };
        let (lo, hi) = (num("low_freq_factor")?, num("high_freq_factor")?);
        let (factor, old) = (num("factor")?, num("original_max_position_embeddings")?);
        if !(factor > 0.0 && lo > 0.0 && hi > lo && old > 0.0) {
            return Err(self.bad(format!(
                "rope_scaling {s}: needs factor > 0, 0 < low_freq_factor < high_freq_factor"
            )));
        }
        Ok(RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max: old,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_unpermute_inverts_llama_cpp() {
        // llama.cpp: GGUF row (h, i, j) <- HF row (h, j, i), per head of hd rows.
        let (heads, hd) = (2, 8);
        let spec = crate::models::LlamaConfig {
            vocab_size: 4,
            hidden_size: 16,
            intermediate_size: 4,
            num_layers: 1,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: hd,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            family: Default::default(),
        }
        .spec(true);
        let rows = spec.gguf_rows(0).unwrap();
        for (g, &hf) in rows.iter().enumerate() {
            let (h, rem) = (g / hd, g % hd);
            assert_eq!(hf, h * hd + (rem % 2) * (hd / 2) + rem / 2);
        }
        assert!(spec.gguf_rows(2).is_none());
    }

    #[test]
    fn gguf_regroup_is_a_permutation_matching_llama_cpp() {
        // llama.cpp: for each KV group its G query heads go to the q block, its k and v heads to the
        // k and v blocks, groups in order.
        let (h, kvh, hd) = (4, 2, 3);
        let rows = (h + 2 * kvh) * hd;
        let mut seen = vec![false; rows];
        for r in 0..rows {
            let g = regrouped_row(r, h, kvh, hd);
            assert!(!seen[g]);
            seen[g] = true;
        }
        // HF group 1 = rows 12..24: q heads 2,3 then k1 then v1.
        assert_eq!(regrouped_row(12, h, kvh, hd), 2 * hd);
        assert_eq!(regrouped_row(18, h, kvh, hd), (4 + 1) * hd);
        assert_eq!(regrouped_row(21, h, kvh, hd), (4 + 2 + 1) * hd);
    }
}
