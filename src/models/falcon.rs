//! Falcon (FalconForCausalLM, and the older RefinedWeb / RefinedWebModel checkpoints) on a frozen
//! quantised base with LoRA adapters, as transformers 4.46 computes it: LayerNorms with bias, one
//! fused `query_key_value` projection, rotary embeddings, an exact-erf GELU MLP, attention and MLP
//! in parallel (or in sequence where the config says so), lm_head tied to the word embeddings.
//!
//! Everything but the decoder block is shared with Llama through [`super::Decoder`]: the store,
//! [`QLinear`] kernels, LoRA, chunked cross-entropy and the checkpointed training step.
//!
//! GGUF bases: llama.cpp's converter reorders the new layout's fused qkv rows from KV groups
//! (`[q.., k, v]` per group) to `[all q, all k, all v]`. We put the rows back in Hugging Face order
//! at load (whole-row copies, exact in any type), so one PEFT adapter for `query_key_value` means the
//! same thing on a safetensors and on a GGUF base. Falcon's rotary is rotate-half in both.
use super::llama::{load_linear, LlamaOptions, LoraSpec, Proj};
use super::{CausalLm, Decoder};
use crate::lora::{LoraConfig, LoraLinear, QLinear};
use crate::nn::{self, fused};
use crate::quant::{dispatch, QType};
use crate::store::{Bytes, SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Load options: the same as Llama's (quantisation at load, dtype, LoRA, checkpointing, CE chunk).
pub type FalconOptions = LlamaOptions;

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

impl FalconConfig {
    /// From a transformers `config.json` (`model_type` falcon, RefinedWeb or RefinedWebModel).
    pub fn from_hf(cfg: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Json {
            path: path.to_path_buf(),
            msg,
        };
        let mt = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("falcon");
        if !matches!(mt, "falcon" | "RefinedWeb" | "RefinedWebModel") {
            return Err(bad(format!(
                "model_type '{mt}' is not a Falcon; qtune's Falcon loader reads falcon, RefinedWeb and RefinedWebModel"
            )));
        }
        // First of several key spellings (current transformers, then the RefinedWeb code's).
        let int = |keys: &[&str]| -> Option<usize> {
            keys.iter()
                .find_map(|k| cfg.get(*k).and_then(|v| v.as_u64()))
                .map(|v| v as usize)
        };
        let need = |keys: &[&str]| -> Result<usize> {
            int(keys).ok_or_else(|| bad(format!("config.json lacks integer '{}'", keys[0])))
        };
        let flag = |k: &str, d: bool| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(d);
        if flag("alibi", false) {
            return Err(bad(
                "ALiBi position biases (alibi: true) are not supported; qtune's Falcon uses rotary embeddings".into(),
            ));
        }
        if !flag("rotary", true) {
            return Err(bad(
                "rotary: false without ALiBi is not a Falcon qtune can run".into(),
            ));
        }
        if let Some(s) = cfg.get("rope_scaling") {
            if !s.is_null() {
                return Err(bad(format!(
                    "rope_scaling {s} is not supported yet; only plain rotary embeddings are"
                )));
            }
        }
        let act = cfg
            .get("activation")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(bad(format!(
                "activation '{act}' is not supported; Falcon's MLP uses exact GELU (\"gelu\")"
            )));
        }
        let hidden = need(&["hidden_size", "d_model"])?;
        let heads = need(&["num_attention_heads", "n_head"])?;
        let new_arch = flag("new_decoder_architecture", mt == "RefinedWeb");
        let multi_query = flag("multi_query", true);
        let parallel = flag("parallel_attn", true);
        let n_ln = int(&["num_ln_in_parallel_attn"]);
        if new_arch && !parallel {
            return Err(bad(
                "new_decoder_architecture with parallel_attn false has no norm transformers can run"
                    .into(),
            ));
        }
        if !new_arch && parallel && n_ln.is_some_and(|n| n != 1) {
            return Err(bad(
                "num_ln_in_parallel_attn 2 needs new_decoder_architecture: true".into(),
            ));
        }
        let (qkv, kvh) = if new_arch {
            let k = int(&["num_kv_heads", "n_head_kv"]).unwrap_or(heads);
            (QkvLayout::Grouped, k)
        } else if multi_query {
            // transformers ignores num_kv_heads here (small configs save it equal to H).
            (QkvLayout::MultiQuery, 1)
        } else {
            (QkvLayout::PerHead, heads)
        };
        let c = FalconConfig {
            vocab_size: need(&["vocab_size"])?,
            hidden_size: hidden,
            ffn_hidden_size: int(&["ffn_hidden_size"]).unwrap_or(4 * hidden),
            num_layers: need(&["num_hidden_layers", "n_layer"])?,
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: hidden / heads.max(1),
            rope_theta: cfg
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0),
            layer_norm_eps: cfg
                .get("layer_norm_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            qkv,
            parallel_attn: parallel,
            two_norms: new_arch && n_ln.unwrap_or(2) == 2,
            bias: flag("bias", false),
        };
        if !flag("tie_word_embeddings", true) {
            return Err(bad(
                "tie_word_embeddings false: Falcon's lm_head is the word embedding".into(),
            ));
        }
        c.check().map_err(bad)?;
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
        match store.format {
            SourceFormat::Gguf => Self::from_gguf(store),
            _ => {
                let cfg = store.config.as_ref().ok_or_else(|| Error::Json {
                    path: store.path.join("config.json"),
                    msg: "no config.json beside the weights; a Falcon needs its config".into(),
                })?;
                Self::from_hf(cfg, &store.path.join("config.json"))
            }
        }
    }

    /// Rows of the fused qkv projection: `(H + 2·KVH)·D`.
    pub fn qkv_rows(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    fn check(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(format!(
                "{} heads is not a multiple of {} KV heads",
                c.num_heads, c.num_kv_heads
            ));
        }
        if c.head_dim * c.num_heads != c.hidden_size {
            return Err(format!(
                "hidden size {} is not a whole number of {} heads",
                c.hidden_size, c.num_heads
            ));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(format!("head dim {} must be even for rotary", c.head_dim));
        }
        if [c.vocab_size, c.ffn_hidden_size, c.num_layers].contains(&0) {
            return Err(format!("zero-sized dimension in {c:?}"));
        }
        Ok(())
    }
}

/// The four linears of a decoder layer by PEFT name, with their module group and GGUF name.
pub const PROJECTIONS: [(&str, &str, &str); 4] = [
    ("query_key_value", "self_attention", "attn_qkv"),
    ("dense", "self_attention", "attn_output"),
    ("dense_h_to_4h", "mlp", "ffn_up"),
    ("dense_4h_to_h", "mlp", "ffn_down"),
];

fn lora_targets(spec: &LoraSpec) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for t in &spec.targets {
        if t == "all-linear" {
            return Ok(PROJECTIONS.iter().map(|p| p.0).collect());
        }
        match PROJECTIONS.iter().find(|p| p.0 == t) {
            Some(p) => out.push(p.0),
            None => {
                return Err(Error::Invalid(format!(
                    "LoRA target '{t}' is not a Falcon linear; use one of {} or all-linear",
                    PROJECTIONS.map(|p| p.0).join(", ")
                )))
            }
        }
    }
    Ok(out)
}

/// A LayerNorm's constant weight and bias, `(C,)` f32 each.
struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Layer {
    /// `input_layernorm`, or `ln_attn` with two norms.
    attn_norm: Norm,
    /// `ln_mlp` (two norms) or `post_attention_layernorm` (sequential); None: the MLP reads the
    /// attention norm's output.
    mlp_norm: Option<Norm>,
    // In PROJECTIONS order.
    proj: Vec<Proj>,
}

/// Per-call constants shared by all layers.
pub struct Ctx {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

/// A Falcon causal LM over a weight store.
pub struct Falcon {
    cfg: FalconConfig,
    opts: FalconOptions,
    path: std::path::PathBuf,
    embed: Arc<StoredTensor>,
    layers: Vec<Layer>,
    ln_f: Norm,
    lm_head: QLinear,
    step: AtomicU64,
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Invalid(format!("falcon {what}: {e}"))
}

/// LayerNorm as torch's `nn.LayerNorm` over the last dim: `(x - mean) / sqrt(var + eps) * w + b`
/// with the biased variance; statistics in f32, result in x's dtype. `w` and `b` are constants.
fn layer_norm(x: &Tensor, n: &Norm, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    // mu, var: (.., 1)
    let mu = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = nn::add_const(&nn::mul_const(&y, &n.w)?, &n.b)?;
    y.to_dtype(dt)
}

/// GGUF row order of the new layout's fused qkv (`[all q, all k, all v]`) -> Hugging Face's (per KV
/// group `[q.., k, v]`): the GGUF row holding HF row `r`.
pub(crate) fn gguf_row_of_hf(r: usize, heads: usize, kvh: usize, hd: usize) -> usize {
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

/// Reorders the rows of a GGUF fused qkv to Hugging Face's grouped order (an owned copy).
fn regroup_qkv(store: &WeightStore, t: &StoredTensor, cfg: &FalconConfig) -> Result<StoredTensor> {
    let bad = |msg: String| Error::Shape {
        path: store.path.clone(),
        tensor: t.name.clone(),
        msg,
    };
    let (rows, cols) = match t.shape.as_slice() {
        [r, c] => (*r, *c),
        s => return Err(bad(format!("shape {s:?} is not 2-D (out, in)"))),
    };
    if rows != cfg.qkv_rows() || t.qtype == QType::NF4 {
        return Err(bad(format!(
            "cannot regroup {} [{rows}, {cols}] as a fused qkv of {} rows",
            t.qtype.name(),
            cfg.qkv_rows()
        )));
    }
    let rb = t.qtype.bytes_for(cols).ok_or_else(|| {
        bad(format!(
            "rows of {cols} are not whole {} blocks",
            t.qtype.name()
        ))
    })?;
    if t.data.len() != rb * rows {
        return Err(bad(format!(
            "{} bytes stored, {} expected",
            t.data.len(),
            rb * rows
        )));
    }
    let src = t.data.as_slice();
    let mut v = vec![0u8; rb * rows];
    for r in 0..rows {
        let g = gguf_row_of_hf(r, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        v[r * rb..(r + 1) * rb].copy_from_slice(&src[g * rb..(g + 1) * rb]);
    }
    let mut t = t.clone();
    t.data.release_pages();
    t.data = Bytes::from_vec(v);
    Ok(t)
}

impl Falcon {
    /// Loads the model in `store` (Hugging Face names or llama.cpp GGUF names).
    pub fn load(store: &WeightStore, opts: FalconOptions) -> Result<Self> {
        let cfg = FalconConfig::from_store(store)?;
        if !matches!(opts.dtype, DType::F32 | DType::BF16) {
            return Err(Error::Invalid(format!(
                "compute dtype {:?} is not supported; use f32 or bf16",
                opts.dtype
            )));
        }
        if let Some(q) = opts.quant {
            if q != QType::NF4 && !dispatch::QUANTIZABLE.contains(&q) {
                return Err(Error::Invalid(format!(
                    "cannot quantise at load to {}; use Q4_0, Q8_0, Q4_K, Q6_K or NF4",
                    q.name()
                )));
            }
        }
        let gguf = store.format == SourceFormat::Gguf;
        let get = |name: &str| -> Result<&StoredTensor> {
            store.get(name).ok_or_else(|| Error::MissingTensor {
                path: store.path.clone(),
                tensor: name.to_string(),
                hint: " (not a complete Falcon checkpoint?)".into(),
            })
        };
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let vec_of = |name: &str| -> Result<Tensor> {
            let t = get(name)?;
            if t.shape != [c] || t.qtype == QType::NF4 {
                return Err(Error::Shape {
                    path: store.path.clone(),
                    tensor: name.into(),
                    msg: format!(
                        "a norm or bias must be a float vector of {c}, found {} {:?}",
                        t.qtype.name(),
                        t.shape
                    ),
                });
            }
            let mut w = vec![0f32; c];
            t.matrix().dequant_tile(0, 1, 0, c, &mut w);
            Tensor::from_vec(w, c, &opts.device).map_err(cerr("norm"))
        };
        let norm = |stem: &str| -> Result<Norm> {
            Ok(Norm {
                w: vec_of(&format!("{stem}.weight"))?,
                b: vec_of(&format!("{stem}.bias"))?,
            })
        };
        let embd_name = if gguf {
            "token_embd.weight"
        } else {
            "transformer.word_embeddings.weight"
        };
        let embed = get(embd_name)?;
        if embed.shape != [v, c] {
            return Err(Error::Shape {
                path: store.path.clone(),
                tensor: embd_name.into(),
                msg: format!(
                    "shape {:?}, expected [{v}, {c}] from the config",
                    embed.shape
                ),
            });
        }
        if embed.qtype == QType::NF4 {
            return Err(Error::UnsupportedType {
                path: store.path.clone(),
                tensor: embd_name.into(),
                type_name: "NF4".into(),
                supported: "any ggml type or float for the embedding".into(),
            });
        }
        let embed = Arc::new(embed.clone());
        // Tied: a separate lm_head appears only in GGUF files whose converter wrote `output`.
        let head_name = if gguf {
            "output.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = match store.get(head_name) {
            Some(t) => QLinear::new(Arc::new(t.clone()), None)?,
            None => QLinear::new(embed.clone(), None)?,
        };
        let ln_f = norm(if gguf {
            "output_norm"
        } else {
            "transformer.ln_f"
        })?;
        let spec = opts.lora.clone();
        let targets = match &spec {
            Some(s) => lora_targets(s)?,
            None => vec![],
        };
        let (h, hd, ffn) = (cfg.num_heads, cfg.head_dim, cfg.ffn_hidden_size);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let hf = format!("transformer.h.{i}");
            let (attn_norm, mlp_norm) = if gguf && cfg.two_norms {
                // llama.cpp maps ln_mlp to attn_norm and ln_attn to attn_norm_2 (its Falcon graph
                // feeds attn_norm_2 to attention and attn_norm to the MLP).
                (
                    norm(&format!("blk.{i}.attn_norm_2"))?,
                    Some(norm(&format!("blk.{i}.attn_norm"))?),
                )
            } else if gguf {
                (norm(&format!("blk.{i}.attn_norm"))?, None)
            } else if cfg.two_norms {
                (
                    norm(&format!("{hf}.ln_attn"))?,
                    Some(norm(&format!("{hf}.ln_mlp"))?),
                )
            } else if cfg.parallel_attn {
                (norm(&format!("{hf}.input_layernorm"))?, None)
            } else {
                (
                    norm(&format!("{hf}.input_layernorm"))?,
                    Some(norm(&format!("{hf}.post_attention_layernorm"))?),
                )
            };
            let mut proj = Vec::with_capacity(PROJECTIONS.len());
            for (pi, (pname, group, gname)) in PROJECTIONS.iter().enumerate() {
                let (name, bias_name) = if gguf {
                    (
                        format!("blk.{i}.{gname}.weight"),
                        format!("blk.{i}.{gname}.bias"),
                    )
                } else {
                    (
                        format!("{hf}.{group}.{pname}.weight"),
                        format!("{hf}.{group}.{pname}.bias"),
                    )
                };
                let stored = get(&name)?;
                let w = if gguf && *pname == "query_key_value" && cfg.qkv == QkvLayout::Grouped {
                    let t = regroup_qkv(store, stored, &cfg)?;
                    load_linear(store, &t, None, opts.quant)?
                } else {
                    load_linear(store, stored, None, opts.quant)?
                };
                let (out_f, in_f) = (w.shape[0], w.shape[1]);
                let want = match *pname {
                    "query_key_value" => (cfg.qkv_rows(), c),
                    "dense" => (c, h * hd),
                    "dense_h_to_4h" => (ffn, c),
                    _ => (c, ffn),
                };
                if (out_f, in_f) != want {
                    return Err(Error::Shape {
                        path: store.path.clone(),
                        tensor: name,
                        msg: format!("shape [{out_f}, {in_f}], expected {want:?} from the config"),
                    });
                }
                let bias = if cfg.bias {
                    let t = get(&bias_name)?;
                    if t.shape != [out_f] || t.qtype == QType::NF4 {
                        return Err(Error::Shape {
                            path: store.path.clone(),
                            tensor: bias_name,
                            msg: format!("a bias must be a float vector of {out_f}"),
                        });
                    }
                    let mut b = vec![0f32; out_f];
                    t.matrix().dequant_tile(0, 1, 0, out_f, &mut b);
                    Some(Tensor::from_vec(b, out_f, &opts.device).map_err(cerr("bias"))?)
                } else {
                    None
                };
                let base = QLinear::new(Arc::new(w), bias)?;
                let adapt = match &spec {
                    Some(s) if targets.contains(pname) => {
                        s.layers.as_ref().is_none_or(|r| r.contains(&i))
                    }
                    _ => false,
                };
                proj.push(if adapt {
                    let s = spec.as_ref().expect("adapt implies a spec");
                    let lc = LoraConfig {
                        r: s.r,
                        alpha: s.alpha,
                        rslora: s.rslora,
                        dropout: s.dropout,
                        dtype: opts.dtype,
                    };
                    let seed = s
                        .seed
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .wrapping_add((i * PROJECTIONS.len() + pi) as u64);
                    Proj::Lora(LoraLinear::new(base, &lc, seed)?.on_device(&opts.device)?)
                } else {
                    Proj::Base(base)
                });
            }
            layers.push(Layer {
                attn_norm,
                mlp_norm,
                proj,
            });
        }
        Ok(Falcon {
            cfg,
            opts,
            path: store.path.clone(),
            embed,
            layers,
            ln_f,
            lm_head,
            step: AtomicU64::new(0),
        })
    }

    /// The config.
    pub fn config(&self) -> &FalconConfig {
        &self.cfg
    }

    /// The load options.
    pub fn options(&self) -> &FalconOptions {
        &self.opts
    }

    /// The frozen base linear of `proj` (PEFT name) in layer `layer`.
    pub fn base_linear(&self, layer: usize, proj: &str) -> Option<&QLinear> {
        let pi = PROJECTIONS.iter().position(|p| p.0 == proj)?;
        Some(match self.layers.get(layer)?.proj.get(pi)? {
            Proj::Base(l) => l,
            Proj::Lora(l) => l.base(),
        })
    }

    /// Logits `(B, T, V)` f32 (eval mode; all logits at once).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        super::forward(self, ids, mask)
    }

    /// Mean shifted cross-entropy as transformers computes it (eval mode), with the graph.
    pub fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        super::loss(self, ids, mask, labels)
    }

    /// One training step's loss and every LoRA gradient by PEFT name (checkpointed per layer when
    /// the options say so).
    pub fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)> {
        super::train_grads(self, ids, mask, labels)
    }

    /// Every LoRA tensor with its PEFT name
    /// (`base_model.model.transformer.h.N.self_attention.query_key_value.lora_A.weight`).
    pub fn lora_params(&self) -> Vec<(String, Var)> {
        self.lora_vars(None)
    }

    /// The per-call constants of a decode step: `t` new positions after `pos` cached ones (rotary
    /// angles of positions `pos..pos+t`, and a `(1, 1, t, pos+t)` causal bias over all keys).
    pub fn decode_ctx(&self, pos: usize, t: usize) -> Result<Ctx> {
        let c = &self.cfg;
        let (cos, sin) = nn::rope_tables(pos + t, c.head_dim, c.rope_theta, self.opts.dtype)
            .and_then(|(cos, sin)| Ok((cos.narrow(0, pos, t)?, sin.narrow(0, pos, t)?)))
            .map_err(cerr("rotary tables"))?;
        let s = pos + t;
        let bias: Vec<f32> = (0..t)
            .flat_map(|i| (0..s).map(move |j| if j <= pos + i { 0.0 } else { f32::MIN }))
            .collect();
        let bias = Tensor::from_vec(bias, (1, 1, t, s), &Device::Cpu).map_err(cerr("mask"))?;
        Ok(Ctx { cos, sin, bias })
    }

    /// Decoder layer `li` with a KV cache: this call's keys and values (after rotary) are appended
    /// to `cache` (`(B, KVH, S, D)` each) and attention reads all of them; `ctx` from
    /// [`Self::decode_ctx`]. The training forward is this with no cache.
    pub fn layer_cached(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        self.layer_kv(li, x, ctx, None, Some(cache))
    }

    fn layer_kv(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        key: Option<u64>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let l = &self.layers[li];
        let (b, t, _) = x.dims3()?;
        let (h, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        let eps = self.cfg.layer_norm_eps;
        let k_of = |pi: usize| key.map(|k| k.wrapping_add((li * PROJECTIONS.len() + pi) as u64));
        let xa = layer_norm(x, &l.attn_norm, eps)?;
        let (q, k, v) = self.split_qkv(&l.proj[0].forward(&xa, k_of(0))?)?;
        let q = fused::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = fused::rope(&k, &ctx.cos, &ctx.sin)?;
        // Training and full forwards: the fused attention (no T×T matrix kept). Decoding with a
        // cache: more keys than queries, which only the composite attention takes.
        let cached = cache.is_some();
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        // a: (B, H, T, D) -> (B, T, H*D)
        let a = if cached {
            nn::causal_attention(&q, &k, &v, &ctx.bias)?
        } else {
            fused::causal_attention(&q, &k, &v, &ctx.bias)?
        };
        let a = a.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))?;
        let a = l.proj[1].forward(&a, k_of(1))?;
        let mlp = |xn: &Tensor| -> candle_core::Result<Tensor> {
            let u = l.proj[2].forward(xn, k_of(2))?.gelu_erf()?;
            l.proj[3].forward(&u, k_of(3))
        };
        if self.cfg.parallel_attn {
            let xm = match &l.mlp_norm {
                Some(n) => layer_norm(x, n, eps)?,
                None => xa,
            };
            x + (mlp(&xm)? + a)?
        } else {
            let x = (x + a)?;
            let n = l
                .mlp_norm
                .as_ref()
                .expect("sequential layers have a second norm");
            let m = mlp(&layer_norm(&x, n, eps)?)?;
            x + m
        }
    }

    /// q `(B, H, T, D)`, k and v `(B, KVH, T, D)` from the fused projection `(B, T, (H+2KVH)·D)`.
    fn split_qkv(&self, y: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = y.dims3()?;
        let (h, kvh, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let (q, k, v) = match self.cfg.qkv {
            QkvLayout::MultiQuery => (
                y.narrow(2, 0, h * hd)?.reshape((b, t, h, hd))?,
                y.narrow(2, h * hd, kvh * hd)?.reshape((b, t, kvh, hd))?,
                y.narrow(2, (h + kvh) * hd, kvh * hd)?
                    .reshape((b, t, kvh, hd))?,
            ),
            QkvLayout::PerHead => {
                // (B, T, H, 3, D)
                let y = y.reshape((b, t, h, 3, hd))?;
                let part = |i| y.narrow(3, i, 1)?.squeeze(3);
                (part(0)?, part(1)?, part(2)?)
            }
            QkvLayout::Grouped => {
                let g = h / kvh;
                // (B, T, KVH, G+2, D); query head kv*G + j reads KV head kv, as causal_attention does.
                let y = y.reshape((b, t, kvh, g + 2, hd))?;
                (
                    y.narrow(3, 0, g)?.reshape((b, t, h, hd))?,
                    y.narrow(3, g, 1)?.squeeze(3)?,
                    y.narrow(3, g + 1, 1)?.squeeze(3)?,
                )
            }
        };
        // (B, T, n, D) -> (B, n, T, D)
        let heads = |x: Tensor| x.transpose(1, 2)?.contiguous();
        Ok((heads(q)?, heads(k)?, heads(v)?))
    }
}

impl Decoder for Falcon {
    type Ctx = Ctx;

    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn ce_chunk(&self) -> usize {
        self.opts.ce_chunk
    }
    fn checkpoint(&self) -> bool {
        self.opts.checkpoint
    }

    fn embed(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        super::embed_rows(
            &self.embed,
            ids,
            (b, t),
            self.opts.dtype,
            &self.opts.device,
            &self.path,
        )
    }

    fn ctx(&self, b: usize, t: usize, mask: Option<&Tensor>) -> Result<Ctx> {
        let (cos, sin, bias) = super::rope_and_bias(
            b,
            t,
            mask,
            self.cfg.head_dim,
            self.cfg.rope_theta,
            self.opts.dtype,
            &self.opts.device,
        )?;
        Ok(Ctx { cos, sin, bias })
    }

    fn layer(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        key: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        self.layer_kv(li, x, ctx, key, None)
    }

    fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, &self.ln_f, self.cfg.layer_norm_eps)
    }

    fn lm_head(&self) -> &QLinear {
        &self.lm_head
    }

    fn lora_vars(&self, layer: Option<usize>) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if layer.is_some_and(|x| x != i) {
                continue;
            }
            for (p, (pname, group, _)) in l.proj.iter().zip(PROJECTIONS) {
                if let Proj::Lora(a) = p {
                    let pre = format!("base_model.model.transformer.h.{i}.{group}.{pname}");
                    out.push((format!("{pre}.lora_A.weight"), a.a().clone()));
                    out.push((format!("{pre}.lora_B.weight"), a.b().clone()));
                }
            }
        }
        out
    }

    fn next_step_key(&self) -> u64 {
        // One key range per step; layer li, projection pi adds li*4+pi.
        self.step
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(1 << 32)
    }
}

impl CausalLm for Falcon {
    fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Falcon::forward(self, ids, mask)
    }
    fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        Falcon::loss(self, ids, mask, labels)
    }
    fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)> {
        Falcon::train_grads(self, ids, mask, labels)
    }
    fn lora_params(&self) -> Vec<(String, Var)> {
        Falcon::lora_params(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_regroup_is_a_permutation_matching_llama_cpp() {
        // llama.cpp: for each KV group its G query heads go to the q block, its k and v heads to the
        // k and v blocks, groups in order.
        let (h, kvh, hd) = (4, 2, 3);
        let rows = (h + 2 * kvh) * hd;
        let mut seen = vec![false; rows];
        for r in 0..rows {
            let g = gguf_row_of_hf(r, h, kvh, hd);
            assert!(!seen[g]);
            seen[g] = true;
        }
        // HF group 1 = rows 12..24: q heads 2,3 then k1 then v1.
        assert_eq!(gguf_row_of_hf(12, h, kvh, hd), 2 * hd);
        assert_eq!(gguf_row_of_hf(18, h, kvh, hd), (4 + 1) * hd);
        assert_eq!(gguf_row_of_hf(21, h, kvh, hd), (4 + 2 + 1) * hd);
    }

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
        let spec = |t: &[&str]| LoraSpec {
            targets: t.iter().map(|s| s.to_string()).collect(),
            ..LoraSpec::default()
        };
        assert_eq!(lora_targets(&spec(&["all-linear"])).unwrap().len(), 4);
        assert_eq!(
            lora_targets(&spec(&["dense", "dense_4h_to_h"])).unwrap(),
            ["dense", "dense_4h_to_h"]
        );
        assert!(lora_targets(&spec(&["q_proj"])).is_err());
    }
}
