//! Llama (LlamaForCausalLM) on a frozen quantised base with LoRA adapters: load from a Hugging Face
//! directory or a llama.cpp GGUF, forward to logits, loss, and LoRA gradients with per-layer
//! gradient checkpointing.
//!
//! GGUF bases: llama.cpp's converter permutes the rows of `attn_q` / `attn_k` within each head so
//! that rotary pairs are adjacent. We undo that at load by copying whole rows (each row is a whole
//! number of quantisation blocks, so the copy is exact in any type) rather than switching to an
//! interleaved rotary: this keeps the LoRA B matrices of q/k in Hugging Face row order, so one
//! adapter file means the same thing on a safetensors and a GGUF base (PEFT and llama.cpp's LoRA
//! converter both expect HF order). The price is that q/k become owned copies instead of file views
//! (2 of the 7 projections, smaller still with GQA).
use crate::lora::{LoraConfig, LoraLinear, QLinear};
use crate::nn::{self, fused};
use crate::quant::{dispatch, nf4, QType};
use crate::store::{Bytes, Nf4Stats, SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

impl LlamaConfig {
    /// From a transformers `config.json` (`path` names it in errors).
    pub fn from_hf(cfg: &serde_json::Value, path: &std::path::Path) -> Result<Self> {
        let bad = |msg: String| Error::Json {
            path: path.to_path_buf(),
            msg,
        };
        let int = |k: &str| -> Result<usize> {
            cfg.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("config.json lacks integer '{k}'")))
        };
        if let Some(t) = cfg.get("model_type").and_then(|v| v.as_str()) {
            if t != "llama" && t != "mistral" {
                return Err(bad(format!(
                    "model_type '{t}' is not a Llama; qtune's Llama loader reads llama models"
                )));
            }
        }
        if let Some(s) = cfg.get("rope_scaling") {
            if !s.is_null() {
                return Err(bad(format!(
                    "rope_scaling {s} is not supported yet; only plain rotary embeddings are"
                )));
            }
        }
        for k in ["attention_bias", "mlp_bias"] {
            if cfg.get(k).and_then(|v| v.as_bool()) == Some(true) {
                return Err(bad(format!(
                    "{k} = true: Llama linears with biases are not supported yet"
                )));
            }
        }
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let c = LlamaConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: int("num_key_value_heads").unwrap_or(heads),
            head_dim: int("head_dim").unwrap_or(hidden / heads.max(1)),
            rope_theta: cfg
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0),
            rms_norm_eps: cfg
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            tie_word_embeddings: cfg
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        c.check().map_err(bad)?;
        Ok(c)
    }

    /// From GGUF `llama.*` metadata; the vocabulary size falls back to `token_embd`'s rows and the
    /// tie to the absence of `output.weight` (both as llama.cpp reads them).
    pub fn from_gguf(store: &WeightStore) -> Result<Self> {
        let g = super::GgufHparams::new(store, "llama", "Llama")?;
        let hidden = g.int("embedding_length")?;
        let heads = g.int("attention.head_count")?;
        let embd = g.embedding()?;
        let vocab = g.int("vocab_size").unwrap_or(embd.shape[0]);
        let c = LlamaConfig {
            vocab_size: vocab,
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
                    msg: "no config.json beside the weights; a Llama needs its config".into(),
                })?;
                Self::from_hf(cfg, &store.path.join("config.json"))
            }
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(format!(
                "{} heads is not a multiple of {} KV heads",
                c.num_heads, c.num_kv_heads
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return Err(format!("head dim {} must be even and positive", c.head_dim));
        }
        if [
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
        ]
        .contains(&0)
        {
            return Err(format!("zero-sized dimension in {c:?}"));
        }
        Ok(())
    }
}

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

/// Which linears get LoRA adapters, and how.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    /// PEFT module names (`q_proj` .. `down_proj`), or `all-linear` for all seven.
    pub targets: Vec<String>,
    /// Rank r.
    pub r: usize,
    /// Scaling numerator.
    pub alpha: f64,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub rslora: bool,
    /// Dropout on the adapter input during training.
    pub dropout: f32,
    /// Layers that get adapters (`None`: all).
    pub layers: Option<Range<usize>>,
    /// Seed of A's initialisation and of the dropout masks.
    pub seed: u64,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            targets: vec!["all-linear".into()],
            r: 8,
            alpha: 16.0,
            rslora: false,
            dropout: 0.0,
            layers: None,
            seed: 0,
        }
    }
}

impl LoraSpec {
    fn targets(&self) -> Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for t in &self.targets {
            if t == "all-linear" {
                return Ok(PROJECTIONS.iter().map(|p| p.0).collect());
            }
            match PROJECTIONS.iter().find(|p| p.0 == t) {
                Some(p) => out.push(p.0),
                None => {
                    return Err(Error::Invalid(format!(
                        "LoRA target '{t}' is not a Llama projection; use one of {} or all-linear",
                        PROJECTIONS.map(|p| p.0).join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// How to load a Llama.
#[derive(Clone, Debug)]
pub struct LlamaOptions {
    /// Quantise f32/f16/bf16 decoder-layer linears to this type at load (stored quantised types are
    /// kept). Q4_0, Q8_0, Q4_K, Q6_K or NF4.
    pub quant: Option<QType>,
    /// Compute dtype of activations and adapters: F32 (parity) or BF16.
    pub dtype: DType,
    /// LoRA adapters (`None`: a frozen model).
    pub lora: Option<LoraSpec>,
    /// Gradient checkpointing per decoder layer in [`Llama::train_grads`].
    pub checkpoint: bool,
    /// Rows per cross-entropy chunk (the logits of this many tokens exist at once).
    pub ce_chunk: usize,
    /// Where activations, adapters and norms live: the CPU, or a GPU (`--features cuda`; frozen
    /// weights stay memory-mapped on the host and are copied to it once, still quantised).
    pub device: Device,
}

impl Default for LlamaOptions {
    fn default() -> Self {
        LlamaOptions {
            quant: None,
            dtype: DType::F32,
            lora: None,
            checkpoint: true,
            ce_chunk: 256,
            device: Device::Cpu,
        }
    }
}

/// A projection: frozen, or with an adapter.
pub(crate) enum Proj {
    Base(QLinear),
    Lora(LoraLinear),
}

impl Proj {
    pub(crate) fn forward(&self, x: &Tensor, key: Option<u64>) -> candle_core::Result<Tensor> {
        match self {
            Proj::Base(l) => l.forward(x),
            Proj::Lora(l) => l.forward_with(x, key),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    mlp_norm: Tensor,
    // In PROJECTIONS order.
    proj: Vec<Proj>,
}

/// Per-call constants shared by all layers.
pub struct Ctx {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

/// A Llama causal LM over a weight store.
pub struct Llama {
    cfg: LlamaConfig,
    opts: LlamaOptions,
    path: std::path::PathBuf,
    embed: Arc<StoredTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QLinear,
    step: AtomicU64,
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Invalid(format!("llama {what}: {e}"))
}

impl Llama {
    /// Loads the model in `store` (Hugging Face names or llama.cpp GGUF names).
    pub fn load(store: &WeightStore, opts: LlamaOptions) -> Result<Self> {
        let cfg = LlamaConfig::from_store(store)?;
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
                hint: " (not a complete Llama checkpoint?)".into(),
            })
        };
        let (embd_name, norm_name, head_name) = if gguf {
            ("token_embd.weight", "output_norm.weight", "output.weight")
        } else {
            (
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
            )
        };
        let embed = get(embd_name)?;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
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
        let lm_head =
            match store.get(head_name) {
                Some(t) => QLinear::new(Arc::new(t.clone()), None)?,
                None if cfg.tie_word_embeddings || gguf => QLinear::new(embed.clone(), None)?,
                None => return Err(Error::MissingTensor {
                    path: store.path.clone(),
                    tensor: head_name.into(),
                    hint:
                        " (config.json says the embedding is not tied, so lm_head must be stored)"
                            .into(),
                }),
            };
        let norm_vec = |name: &str| -> Result<Tensor> {
            let t = get(name)?;
            if t.shape != [c] || t.qtype == QType::NF4 {
                return Err(Error::Shape {
                    path: store.path.clone(),
                    tensor: name.into(),
                    msg: format!(
                        "a norm weight must be a float vector of {c}, found {} {:?}",
                        t.qtype.name(),
                        t.shape
                    ),
                });
            }
            let mut w = vec![0f32; c];
            t.matrix().dequant_tile(0, 1, 0, c, &mut w);
            // Host constants on any device: the fused RMSNorm reads its weight on the host (its
            // CUDA launcher uploads it), so a device copy would cost a download per call.
            Tensor::from_vec(w, c, &Device::Cpu).map_err(cerr("norm"))
        };
        let norm = norm_vec(norm_name)?;
        let spec = opts.lora.clone();
        let targets = match &spec {
            Some(s) => s.targets()?,
            None => vec![],
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let (an, mn) = if gguf {
                (
                    format!("blk.{i}.attn_norm.weight"),
                    format!("blk.{i}.ffn_norm.weight"),
                )
            } else {
                (
                    format!("model.layers.{i}.input_layernorm.weight"),
                    format!("model.layers.{i}.post_attention_layernorm.weight"),
                )
            };
            let mut proj = Vec::with_capacity(7);
            for (pi, (pname, group, gname)) in PROJECTIONS.iter().enumerate() {
                let name = if gguf {
                    format!("blk.{i}.{gname}.weight")
                } else {
                    format!("model.layers.{i}.{group}.{pname}.weight")
                };
                let permute = match (gguf, *pname) {
                    (true, "q_proj") => Some(cfg.num_heads),
                    (true, "k_proj") => Some(cfg.num_kv_heads),
                    _ => None,
                };
                let w = load_linear(store, get(&name)?, permute, opts.quant)?;
                let (out_f, in_f) = (w.shape[0], w.shape[1]);
                let (hd, h, kvh, inter) = (
                    cfg.head_dim,
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.intermediate_size,
                );
                let want = match *pname {
                    "q_proj" => (h * hd, c),
                    "k_proj" | "v_proj" => (kvh * hd, c),
                    "o_proj" => (c, h * hd),
                    "gate_proj" | "up_proj" => (inter, c),
                    _ => (c, inter),
                };
                if (out_f, in_f) != want {
                    return Err(Error::Shape {
                        path: store.path.clone(),
                        tensor: name,
                        msg: format!("shape [{out_f}, {in_f}], expected {want:?} from the config"),
                    });
                }
                let base = QLinear::new(Arc::new(w), None)?;
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
                        .wrapping_add((i * 7 + pi) as u64);
                    Proj::Lora(LoraLinear::new(base, &lc, seed)?.on_device(&opts.device)?)
                } else {
                    Proj::Base(base)
                });
            }
            layers.push(Layer {
                attn_norm: norm_vec(&an)?,
                mlp_norm: norm_vec(&mn)?,
                proj,
            });
        }
        Ok(Llama {
            cfg,
            opts,
            path: store.path.clone(),
            embed,
            layers,
            norm,
            lm_head,
            step: AtomicU64::new(0),
        })
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The load options.
    pub fn options(&self) -> &LlamaOptions {
        &self.opts
    }

    /// The frozen base linear of projection `proj` (PEFT name) in layer `layer`.
    pub fn base_linear(&self, layer: usize, proj: &str) -> Option<&QLinear> {
        let pi = PROJECTIONS.iter().position(|p| p.0 == proj)?;
        Some(match self.layers.get(layer)?.proj.get(pi)? {
            Proj::Base(l) => l,
            Proj::Lora(l) => l.base(),
        })
    }

    /// The output projection.
    pub fn lm_head(&self) -> &QLinear {
        &self.lm_head
    }

    /// Every LoRA tensor with its PEFT name
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), layer by layer, A then B.
    pub fn lora_params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (p, (pname, group, _)) in l.proj.iter().zip(PROJECTIONS) {
                if let Proj::Lora(a) = p {
                    let pre = format!("base_model.model.model.layers.{i}.{group}.{pname}");
                    out.push((format!("{pre}.lora_A.weight"), a.a().clone()));
                    out.push((format!("{pre}.lora_B.weight"), a.b().clone()));
                }
            }
        }
        out
    }

    /// Token embeddings `(B, T, C)` in the compute dtype: rows of the stored table dequantised by id.
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

    /// One decoder layer: `x (B, T, C) -> (B, T, C)`. `key`: dropout key base (None: no dropout).
    fn layer_fwd(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        key: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        let l = &self.layers[li];
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let eps = self.cfg.rms_norm_eps;
        let k_of = |pi: usize| key.map(|k| k.wrapping_add((li * 7 + pi) as u64));
        let xn = fused::rms_norm(x, &l.attn_norm, eps)?;
        // q: (B, T, H*D) -> (B, H, T, D); k, v: (B, KVH, T, D)
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let q = heads(l.proj[0].forward(&xn, k_of(0))?, h)?;
        let k = heads(l.proj[1].forward(&xn, k_of(1))?, kvh)?;
        let v = heads(l.proj[2].forward(&xn, k_of(2))?, kvh)?;
        let q = fused::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = fused::rope(&k, &ctx.cos, &ctx.sin)?;
        // a: (B, H, T, D) -> (B, T, H*D)
        let a = fused::causal_attention(&q, &k, &v, &ctx.bias)?;
        let a = a.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))?;
        let x = (x + l.proj[3].forward(&a, k_of(3))?)?;
        let xn = fused::rms_norm(&x, &l.mlp_norm, eps)?;
        let g = nn::silu(&l.proj[4].forward(&xn, k_of(4))?)?;
        let u = l.proj[5].forward(&xn, k_of(5))?;
        let m = l.proj[6].forward(&(g * u)?, k_of(6))?;
        x + m
    }

    /// Logits `(B, T, V)` f32 for `ids (B, T)` (u32/i64) with optional `mask (B, T)` (1 real, 0 pad).
    /// Evaluation mode (no dropout); meant for tests and small inputs: all logits exist at once.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        super::forward(self, ids, mask)
    }

    /// Mean cross-entropy over target tokens (transformers' causal-LM loss: logits shifted by one,
    /// labels -100 ignored), as an f32 scalar with the graph (eval mode).
    pub fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        super::loss(self, ids, mask, labels)
    }

    /// One training step's loss and the gradient of every LoRA tensor (PEFT names), with dropout
    /// on. With `checkpoint`, only each layer's input is kept through the forward; the backward
    /// recomputes one layer at a time (same dropout masks) and the logits are made and freed chunk by
    /// chunk (the shared step in `models`).
    pub fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)> {
        super::train_grads(self, ids, mask, labels)
    }
}

/// Llama's blocks; the checkpointed step, forward and loss are the shared ones in `models`.
impl super::Decoder for Llama {
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
        Llama::embed(self, ids, b, t)
    }
    fn ctx(&self, b: usize, t: usize, mask: Option<&Tensor>) -> Result<Ctx> {
        Llama::ctx(self, b, t, mask)
    }
    fn layer(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        key: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        self.layer_fwd(li, x, ctx, key)
    }
    fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        fused::rms_norm(x, &self.norm, self.cfg.rms_norm_eps)
    }
    fn lm_head(&self) -> &QLinear {
        &self.lm_head
    }
    fn lora_vars(&self, layer: Option<usize>) -> Vec<(String, Var)> {
        self.lora_params()
            .into_iter()
            .filter(|(n, _)| layer.is_none_or(|li| n.contains(&format!(".layers.{li}."))))
            .collect()
    }
    fn next_step_key(&self) -> u64 {
        // One key range per step; layer li, projection pi adds li*7+pi.
        self.step
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(1 << 32)
    }
}

/// The HF row that GGUF row `r` of a permuted Q/K holds is `hf_row(r)`; this is its inverse: the
/// GGUF row holding HF row `r` (llama.cpp interleaves the two rotary halves of each head).
fn gguf_row_of_hf(r: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let half = hd / 2;
    let (h, rem) = (r / hd, r % hd);
    let (jj, i) = (rem / half, rem % half);
    h * hd + 2 * i + jj
}

/// A decoder-layer weight ready for [`QLinear`]: the stored view, or an owned copy when its rows
/// must be un-permuted (GGUF Q/K) or it is quantised at load (float types only, with `quant`).
pub(crate) fn load_linear(
    store: &WeightStore,
    t: &StoredTensor,
    permute_heads: Option<usize>,
    quant: Option<QType>,
) -> Result<StoredTensor> {
    let bad = |msg: String| Error::Shape {
        path: store.path.clone(),
        tensor: t.name.clone(),
        msg,
    };
    let (rows, cols) = match t.shape.as_slice() {
        [r, c] => (*r, *c),
        s => return Err(bad(format!("shape {s:?} is not 2-D (out, in)"))),
    };
    let mut t = t.clone();
    if let Some(heads) = permute_heads {
        if t.qtype == QType::NF4 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2)
        {
            return Err(bad(format!(
                "cannot undo llama.cpp's rotary row permutation on {} [{rows}, {cols}] with {heads} heads",
                t.qtype.name()
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
            let g = gguf_row_of_hf(r, rows, heads);
            v[r * rb..(r + 1) * rb].copy_from_slice(&src[g * rb..(g + 1) * rb]);
        }
        // The mapped rows were read once; the owned copy replaces them.
        t.data.release_pages();
        t.data = Bytes::from_vec(v);
    }
    let Some(q) = quant else { return Ok(t) };
    if !matches!(t.qtype, QType::F32 | QType::F16 | QType::BF16) {
        return Ok(t);
    }
    let n = rows * cols;
    let mut f = vec![0f32; n];
    t.matrix().dequant_tile(0, rows, 0, cols, &mut f);
    // The float source is read once: drop its file pages so loading streams one tensor at a time.
    t.data.release_pages();
    let wrap = |e: Error| bad(format!("quantising to {} at load: {e}", q.name()));
    if q == QType::NF4 {
        let o = nf4::quantize_nf4(&f).map_err(wrap)?;
        t.qtype = QType::NF4;
        t.data = Bytes::from_vec(o.packed);
        t.nf4 = Some(Nf4Stats {
            absmax_q: Bytes::from_vec(o.absmax_q),
            nested_absmax: o.nested_absmax,
            nested_code: o.nested_code,
            code: o.code,
            offset: o.offset,
        });
    } else {
        let nb = q.bytes_for(cols).ok_or_else(|| {
            bad(format!(
                "rows of {cols} are not whole {} blocks; pick another --quant type",
                q.name()
            ))
        })? * rows;
        let mut d = vec![0u8; nb];
        dispatch::quantize(q, &f, &mut d).map_err(wrap)?;
        t.qtype = q;
        t.data = Bytes::from_vec(d);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_unpermute_inverts_llama_cpp() {
        // llama.cpp: GGUF row (h, i, j) <- HF row (h, j, i), per head of hd rows.
        let (rows, heads) = (16, 2);
        let hd = rows / heads;
        let fwd = |r: usize| {
            let (h, rem) = (r / hd, r % hd);
            h * hd + (rem % 2) * (hd / 2) + rem / 2
        };
        for r in 0..rows {
            assert_eq!(fwd(gguf_row_of_hf(r, rows, heads)), r);
        }
    }
}
