//! The one decoder every architecture runs on: loading (with quantisation at load and llama.cpp's
//! row orders undone), adapter placement through the seam ([`crate::lora::seam`]), the layer
//! forward for every block variant of a [`Spec`], the KV-cached decode step, and the per-call
//! constants. [`super::Decoder`] gives it the shared loss and checkpointed training step.
//!
//! GGUF bases: llama.cpp's converter permutes the rows of split `attn_q` / `attn_k` (rotary pairs
//! adjacent) and regroups a grouped fused qkv (`[all q, all k, all v]`). We put the rows back in
//! Hugging Face order at load by copying whole rows (each row is a whole number of quantisation
//! blocks, so the copy is exact in any type): the LoRA B matrices stay in Hugging Face row order, so
//! one adapter file means the same thing on a safetensors and a GGUF base. The price is that those
//! projections become owned copies instead of file views.
use super::arch::{Attention, Mlp, NormKind, QkvLayout, Residual, Spec};
use super::options::LlamaOptions;
use super::weights::load_linear;
use crate::lora::seam::{AdapterMethod, BaseCall, LinearAdapter, SequenceAdapter};
use crate::lora::QLinear;
use crate::nn::{self, fused};
use crate::quant::QType;
use crate::store::{StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A frozen linear and its adapter, if any.
pub struct Linear {
    base: QLinear,
    adapter: Option<Box<dyn LinearAdapter>>,
}

/// A norm's constant weight and (LayerNorm) bias, `(C,)` f32 each.
struct Norm {
    w: Tensor,
    b: Option<Tensor>,
}

struct Layer {
    attn_norm: Norm,
    /// None: the MLP reads the attention norm's output (parallel blocks with one norm).
    mlp_norm: Option<Norm>,
    /// In `Spec::projections` order.
    linears: Vec<Linear>,
}

/// Per-call constants shared by all layers: rotary tables and the attention bias.
pub struct Ctx {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

/// A decoder-only causal LM of any [`Spec`] over a weight store.
pub struct Transformer {
    spec: Spec,
    opts: LlamaOptions,
    path: std::path::PathBuf,
    embed: Arc<StoredTensor>,
    layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: QLinear,
    step: AtomicU64,
    int8: bool,
    /// Decode-layout copies of the base weights (keyed by their `StoredTensor`'s address), built
    /// while 8-bit activations are on; their file pages are released.
    packed: HashMap<usize, crate::quant::dot8_pack::Packed>,
    hooks: Option<Box<dyn SequenceAdapter>>,
}

/// Float vector `t` of `n` elements as f32 (norm weights, biases, rotary factors): an error saying
/// what it `must` be when its shape is not `[n]` or its type is not `type_ok`.
pub(crate) fn float_vector(
    store: &WeightStore,
    t: &StoredTensor,
    n: usize,
    type_ok: bool,
    must: &str,
) -> Result<Vec<f32>> {
    if t.shape != [n] || !type_ok {
        return Err(Error::Shape {
            path: store.path.clone(),
            tensor: t.name.clone(),
            msg: format!("{must}, found {} {:?}", t.qtype.name(), t.shape),
        });
    }
    let mut w = vec![0f32; n];
    t.matrix().dequant_tile(0, 1, 0, n, &mut w);
    Ok(w)
}

/// The token embedding `embed` checked against the config, and the lm_head (stored, or the
/// embedding itself when `spec.tied_head` and none is stored).
fn embedding_and_head(
    store: &WeightStore,
    spec: &Spec,
    embed: &StoredTensor,
) -> Result<(Arc<StoredTensor>, QLinear)> {
    let (names, c, v) = (&spec.names, spec.hidden, spec.vocab);
    if embed.shape != [v, c] {
        return Err(Error::Shape {
            path: store.path.clone(),
            tensor: names.embed.into(),
            msg: format!(
                "shape {:?}, expected [{v}, {c}] from the config",
                embed.shape
            ),
        });
    }
    if embed.qtype == QType::NF4 {
        return Err(Error::UnsupportedType {
            path: store.path.clone(),
            tensor: names.embed.into(),
            type_name: "NF4".into(),
            supported: "any ggml type or float for the embedding".into(),
        });
    }
    let embed = Arc::new(embed.clone());
    let lm_head = match store.get(names.head) {
        Some(t) => QLinear::new(Arc::new(t.clone()), None)?,
        None if spec.tied_head => QLinear::new(embed.clone(), None)?,
        None => {
            return Err(Error::MissingTensor {
                path: store.path.clone(),
                tensor: names.head.into(),
                hint: " (config.json says the embedding is not tied, so lm_head must be stored)"
                    .into(),
            })
        }
    };
    Ok((embed, lm_head))
}

impl Transformer {
    /// Loads the model `spec` describes from `store`.
    pub fn load(store: &WeightStore, spec: Spec, opts: LlamaOptions) -> Result<Self> {
        opts.check()?;
        let get = |name: &str| -> Result<&StoredTensor> {
            store.get(name).ok_or_else(|| Error::MissingTensor {
                path: store.path.clone(),
                tensor: name.to_string(),
                hint: format!(" (not a complete {} checkpoint?)", spec.label),
            })
        };
        let cerr = |what: &'static str| {
            let arch = spec.arch;
            move |e: candle_core::Error| Error::Invalid(format!("{arch} {what}: {e}"))
        };
        // A float vector of n: norms and biases.
        let vec_of = |name: &str, n: usize, dev: &Device| -> Result<Tensor> {
            let t = get(name)?;
            let must = format!("a norm weight or bias must be a float vector of {n}");
            let w = float_vector(store, t, n, t.qtype != QType::NF4, &must)?;
            Tensor::from_vec(w, n, dev).map_err(cerr("norm"))
        };
        let c = spec.hidden;
        // The fused RMSNorm reads its weight on the host (its CUDA launcher uploads it), so a device
        // copy would cost a download per call; LayerNorm's constants live on the device.
        let norm_dev = match spec.norm {
            NormKind::Rms => Device::Cpu,
            NormKind::LayerNorm => opts.device.clone(),
        };
        let norm = |stem: &str| -> Result<Norm> {
            Ok(Norm {
                w: vec_of(&format!("{stem}.weight"), c, &norm_dev)?,
                b: match spec.norm {
                    NormKind::Rms => None,
                    NormKind::LayerNorm => Some(vec_of(&format!("{stem}.bias"), c, &norm_dev)?),
                },
            })
        };
        let names = &spec.names;
        let (embed, lm_head) = embedding_and_head(store, &spec, get(names.embed)?)?;
        let final_norm = norm(names.final_norm)?;
        let method: Option<&dyn AdapterMethod> = opts.lora.as_ref().map(|s| s as _);
        let pnames: Vec<&'static str> = spec.projections.iter().map(|p| p.0).collect();
        let targets = match method {
            Some(m) => m.targets(&pnames, spec.label)?,
            None => vec![],
        };
        let np = spec.projections.len();
        let mut layers = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let stem = |n: &str| format!("{}.{i}.{n}", names.layer);
            let mut linears = Vec::with_capacity(np);
            for (pi, &(pname, ..)) in spec.projections.iter().enumerate() {
                let name = spec.linear_name(i, pi);
                let (out_f, in_f) = spec.shape(pi);
                let stored = get(&name)?;
                let msg = match stored.shape.as_slice() {
                    [o, i] if (*o, *i) == (out_f, in_f) => None,
                    [o, i] => Some(format!(
                        "shape [{o}, {i}], expected {:?} from the config",
                        (out_f, in_f)
                    )),
                    s => Some(format!("shape {s:?} is not 2-D (out, in)")),
                };
                if let Some(msg) = msg {
                    let (path, tensor) = (store.path.clone(), name);
                    return Err(Error::Shape { path, tensor, msg });
                }
                let rows = if spec.gguf { spec.gguf_rows(pi) } else { None };
                let w = load_linear(store, stored, rows.as_deref(), opts.quant)?;
                let bias = if spec.has_bias(pi) {
                    let b = name.strip_suffix(".weight").unwrap_or(&name);
                    Some(vec_of(&format!("{b}.bias"), out_f, &opts.device)?)
                } else {
                    None
                };
                let mut base = QLinear::new(Arc::new(w), bias)?;
                if opts.bf16_products() {
                    base = base.with_bf16_products();
                }
                let adapter = match method {
                    Some(m) if targets.contains(&pname) && m.adapts_layer(i) => {
                        Some(m.build(&base, i * np + pi, opts.dtype, &opts.device)?)
                    }
                    _ => None,
                };
                linears.push(Linear { base, adapter });
            }
            layers.push(Layer {
                attn_norm: norm(&stem(names.attn_norm))?,
                mlp_norm: names.mlp_norm.map(|n| norm(&stem(n))).transpose()?,
                linears,
            });
        }
        Ok(Transformer {
            spec,
            opts,
            path: store.path.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            step: AtomicU64::new(0),
            int8: false,
            packed: HashMap::new(),
            hooks: None,
        })
    }

    /// The description it was loaded from.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The load options.
    pub fn options(&self) -> &LlamaOptions {
        &self.opts
    }

    /// The frozen base linear of projection `proj` (PEFT name) in layer `layer`.
    pub fn base_linear(&self, layer: usize, proj: &str) -> Option<&QLinear> {
        let pi = self.spec.index(proj)?;
        Some(&self.layers.get(layer)?.linears.get(pi)?.base)
    }

    /// The output projection.
    pub fn lm_head(&self) -> &QLinear {
        &self.lm_head
    }

    /// Installs a fresh prompt-learning adapter `p` as the sequence-level hooks (load dtype and
    /// device); refused where PEFT cannot run it (prefix tuning on Falcon).
    pub fn install_prompt(&mut self, p: &crate::lora::prompt::PromptSpec) -> Result<()> {
        let a = super::prompt_adapter(p, &self.spec, &self.embed, &self.opts, &self.path)?;
        self.hooks = Some(a);
        Ok(())
    }

    /// Installs the sequence-level adapter hooks (prompt rows, KV prefix).
    pub fn set_sequence_adapter(&mut self, hooks: Option<Box<dyn SequenceAdapter>>) {
        self.hooks = hooks;
    }

    /// Base products of Q4_0/Q8_0/Q4_K weights with activations rounded to 8 bits, as llama.cpp
    /// does (decoding; off by default). On a CPU with the packed kernels, Q4_0/Q4_K weights are
    /// repacked into the decode layout here (`quant::dot8_pack`) and their file pages released.
    pub fn set_int8_activations(&mut self, on: bool) {
        use crate::quant::dot8_pack::{worth_packing, Packed};
        self.int8 = on;
        self.packed.clear();
        if !on || !worth_packing() {
            return;
        }
        let lins = self
            .layers
            .iter()
            .flat_map(|l| l.linears.iter().map(|l| &l.base));
        for lin in lins.chain([&self.lm_head]) {
            let w = lin.weight();
            let key = Arc::as_ptr(w) as usize;
            if lin.bias().is_some() || self.packed.contains_key(&key) {
                continue;
            }
            if let Some(p) = Packed::new(&w.matrix()) {
                w.data.release_pages();
                self.packed.insert(key, p);
            }
        }
    }

    /// Every adapter tensor with its PEFT name
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), layer by layer, in
    /// projection order, each adapter's tensors in its own order (LoRA: A then B); then the
    /// sequence-level adapter's.
    pub fn lora_params(&self) -> Vec<(String, Var)> {
        let mut out = self.adapter_vars(None);
        if let Some(h) = &self.hooks {
            out.extend(h.params());
        }
        out
    }

    fn adapter_vars(&self, layer: Option<usize>) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if layer.is_some_and(|x| x != i) {
                continue;
            }
            for (pi, lin) in l.linears.iter().enumerate() {
                if let Some(a) = &lin.adapter {
                    let pre = format!("base_model.model.{}", self.spec.module_path(i, pi));
                    out.extend(
                        a.params()
                            .into_iter()
                            .map(|(n, v)| (format!("{pre}.{n}"), v)),
                    );
                }
            }
        }
        out
    }

    /// Logits `(B, T, V)` f32 for `ids (B, T)` with optional `mask (B, T)` (1 real, 0 pad).
    /// Evaluation mode (no dropout); all logits exist at once (tests, small inputs).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        super::forward(self, ids, mask)
    }

    /// Mean cross-entropy over target tokens (transformers' causal-LM loss: logits shifted by one,
    /// labels -100 ignored), as an f32 scalar with the graph (eval mode).
    pub fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        super::loss(self, super::Tokens::new(ids, mask, labels))
    }

    /// One training step's loss and the gradient of every adapter tensor (PEFT names), dropout on,
    /// checkpointed per layer when the options say so (the shared step in `models`).
    pub fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)> {
        super::train_grads(self, super::Tokens::new(ids, mask, labels))
    }

    fn cerr(&self, what: &'static str) -> impl Fn(candle_core::Error) -> Error + '_ {
        move |e| Error::Invalid(format!("{} {what}: {e}", self.spec.arch))
    }

    fn prompt_rows(&self) -> usize {
        self.hooks.as_ref().map_or(0, |h| h.prompt_len())
    }

    fn prefix_len(&self) -> usize {
        self.hooks.as_ref().map_or(0, |h| h.prefix_len())
    }

    /// The per-call constants of a decode step: `t` new positions after `pos` cached ones (rotary
    /// angles of positions `pos..pos+t`, and a `(1, 1, t, pos+t)` causal bias over all keys).
    /// With prompt rows, `pos` counts cache slots, rows included (see [`Self::decode_step`]).
    pub fn decode_ctx(&self, pos: usize, t: usize) -> Result<Ctx> {
        let (n, s) = (self.prefix_len(), pos + t);
        let (cos, sin) = nn::rope_tables_of(n + s, &self.spec.inv_freq(), self.opts.dtype)
            .and_then(|(cos, sin)| Ok((cos.narrow(0, n + pos, t)?, sin.narrow(0, n + pos, t)?)))
            .map_err(self.cerr("rotary tables"))?;
        // A sliding window (Mistral) hides keys `window` or more positions back, as transformers'
        // mask does (`j <= i - window`); the cache keeps them.
        let w = self.spec.sliding_window.unwrap_or(usize::MAX);
        let seen = move |i: usize, j: usize| j <= i && i - j < w;
        let bias: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..n + s).map(move |j| if seen(n + pos + i, j) { 0.0 } else { f32::MIN })
            })
            .collect();
        let bias =
            Tensor::from_vec(bias, (1, 1, t, n + s), &Device::Cpu).map_err(self.cerr("mask"))?;
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

    /// Runs `tokens` (one sequence) after the `cache`d positions of every layer and returns the
    /// logits `(T, V)` f32 of the new positions; `pos` positions are cached so far.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut Vec<Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let t = tokens.len();
        // Prompt rows (N) run before the first tokens and stay in the cache: the tokens sit at
        // cache slots N + pos.. after them.
        let np = self.prompt_rows();
        let (mut x, ctx) = if np > 0 && pos == 0 {
            (
                super::Decoder::embed(self, tokens, 1, t)?,
                self.decode_ctx(0, np + t)?,
            )
        } else {
            let (dt, dev) = (self.opts.dtype, &self.opts.device);
            let x = super::embed_rows(&self.embed, tokens, (1, t), dt, dev, &self.path)?;
            (x, self.decode_ctx(np + pos, t)?)
        };
        let n = self.layers.len();
        if cache.len() != n {
            *cache = vec![None; n];
        }
        let run = || -> candle_core::Result<Tensor> {
            for (li, slot) in cache.iter_mut().enumerate() {
                x = self.layer_cached(li, &x, &ctx, slot)?;
            }
            let x = match x.dim(1)? {
                n if n > t => x.narrow(1, n - t, t)?,
                _ => x,
            };
            let x = super::Decoder::final_norm(self, &x)?;
            self.base_fwd(&self.lm_head, &x)?
                .squeeze(0)?
                .to_dtype(DType::F32)
        };
        run().map_err(self.cerr("decode"))
    }

    /// `x · Wᵀ (+ bias)` of a frozen linear: with 8-bit activations where enabled and the weight's
    /// type has that path, else the exact product.
    fn base_fwd(&self, lin: &QLinear, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = lin.weight().matrix();
        if !self.int8 || lin.bias().is_some() || !crate::quant::dot8::supported(&w) {
            return lin.forward(x);
        }
        let (b, t, k) = x.dims3()?;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; b * t * w.rows];
        match self.packed.get(&(Arc::as_ptr(lin.weight()) as usize)) {
            Some(p) => crate::quant::dot8_pack::gemv_packed(&xs, b * t, p, &mut y, None),
            None => {
                crate::quant::dot8::gemv_q8(&xs, b * t, &w, &mut y);
            }
        }
        debug_assert_eq!(k, w.cols);
        Tensor::from_vec(y, (b, t, w.rows), x.device())
    }

    fn linear(&self, l: &Linear, x: &Tensor, key: Option<u64>) -> candle_core::Result<Tensor> {
        let base = &l.base;
        match &l.adapter {
            None => self.base_fwd(base, x),
            // The adapter runs the base product itself (fused with its own on the CPU), unless
            // decoding takes the 8-bit path for it.
            Some(a) => {
                let y = self.int8.then(|| self.base_fwd(base, x)).transpose()?;
                a.forward(BaseCall { x, base, y }, key)
            }
        }
    }

    fn norm(&self, x: &Tensor, n: &Norm) -> candle_core::Result<Tensor> {
        match &n.b {
            None => fused::rms_norm(x, &n.w, self.spec.eps),
            // the fused LayerNorm is CPU-only: a GPU runs the composite one
            Some(b) if !x.device().is_cpu() => super::layer_norm(x, &n.w, b, self.spec.eps),
            Some(b) => fused::layer_norm(x, &n.w, b, self.spec.eps),
        }
    }

    /// `norm(x + a)` of a sequential block's second norm, the sum rounded to the dtype, in one
    /// op that keeps no sum, and the residual that gives the block's output (CPU only: the
    /// caller adds on a GPU).
    fn add_norm(
        &self,
        x: &Tensor,
        a: &Tensor,
        n: &Norm,
    ) -> candle_core::Result<(Tensor, fused::Residual)> {
        match &n.b {
            None => fused::add_rms_norm(x, a, &n.w, self.spec.eps),
            Some(b) => fused::add_layer_norm(x, a, &n.w, b, self.spec.eps),
        }
    }

    /// One decoder layer `x (B, T, C) -> (B, T, C)` of any block variant; `key`: dropout key base
    /// (None: eval); `cache`: decoding with a KV cache.
    fn layer_kv(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        key: Option<u64>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (s, l) = (&self.spec, &self.layers[li]);
        let (b, t, _) = x.dims3()?;
        let (h, hd) = (s.heads, s.head_dim);
        // Dropout key of linear pi: li·P + pi (P linears a layer), as its seed.
        let np = l.linears.len();
        let proj = |pi: usize, x: &Tensor| {
            let k = key.map(|k| k.wrapping_add((li * np + pi) as u64));
            self.linear(&l.linears[pi], x, k)
        };
        let xa = self.norm(x, &l.attn_norm)?;
        // q: (B, H, T, D); k, v: (B, KVH, T, D)
        let (q, k, v, o) = self.qkv(&xa, &proj)?;
        let q = fused::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = fused::rope(&k, &ctx.cos, &ctx.sin)?;
        // Prefix tuning: keys and values before the sequence's, without rotary.
        let prefix = match self.hooks.as_ref().and_then(|hk| hk.kv_prefix(li)) {
            Some((pk, pv)) => {
                let bc = |p: Tensor, like: &Tensor| -> candle_core::Result<Tensor> {
                    let (kh, n, d) = p.dims3()?;
                    p.to_dtype(like.dtype())?
                        .to_device(like.device())?
                        .unsqueeze(0)?
                        .broadcast_as((b, kh, n, d))?
                        .contiguous()
                };
                Some((bc(pk, &k)?, bc(pv, &v)?))
            }
            None => None,
        };
        let with_prefix = |k: Tensor, v: Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            match &prefix {
                Some((pk, pv)) => Ok((Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)),
                None => Ok((k, v)),
            }
        };
        // Training and full forwards: the fused attention (no T×T matrix kept). Decoding with a
        // cache or a prefix: more keys than queries, which only the composite attention takes.
        let composite = cache.is_some() || prefix.is_some();
        let (k, v) = match cache {
            None => with_prefix(k, v)?,
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => with_prefix(k, v)?,
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        // a: (B, H, T, D) -> (B, T, H*D)
        let a = if composite {
            nn::causal_attention(&q, &k, &v, &ctx.bias)?
        } else {
            fused::causal_attention_with(&q, &k, &v, &ctx.bias, self.opts.bf16_products())?
        };
        let a = if a.device().is_cpu() {
            fused::merge_heads(&a)?
        } else {
            a.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))?
        };
        let a = proj(o, &a)?;
        let mlp = |xn: &Tensor| self.mlp(xn, &|pi, x| proj(o + pi, x));
        // On the CPU the residual adds are fused ops (nn::fused::residual): the sequential
        // block's sum h = x + a is never stored (its norm and the block's output each add x and
        // a again; in backward the norm's op adds h's two gradients in its own pass), and either
        // block's output is one pass over its three terms, rounded as torch's two adds. A GPU
        // runs candle's adds.
        let cpu = x.device().is_cpu();
        match (s.residual, &l.mlp_norm) {
            (Residual::Parallel, n) => {
                let xm = match n {
                    Some(n) => self.norm(x, n)?,
                    None => xa,
                };
                let m = mlp(&xm)?;
                match cpu {
                    true => fused::residual_add3(&m, &a, x),
                    false => x + (m + a)?,
                }
            }
            (Residual::Sequential, n) => {
                let n = n.as_ref().expect("sequential blocks have a second norm");
                if cpu {
                    let (y, residual) = self.add_norm(x, &a, n)?;
                    return residual.output(&mlp(&y)?);
                }
                let x = (x + a)?;
                let m = mlp(&self.norm(&x, n)?)?;
                x + m
            }
        }
    }

    /// The attention's inputs from the normed `xa (B, T, C)` through `proj` (the layer's linear
    /// `pi`): q `(B, H, T, D)`, k and v `(B, KVH, T, D)` before rotary, and the index of the
    /// output projection.
    fn qkv(
        &self,
        xa: &Tensor,
        proj: &dyn Fn(usize, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor, usize)> {
        let s = &self.spec;
        let (b, t, _) = xa.dims3()?;
        let (h, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
        Ok(match s.attention {
            Attention::Split => {
                // On the CPU one op each way (nn::fused::split_heads: no reshape, transpose and
                // copy nodes, each a zero-filled gradient plus an add in candle's backward).
                let heads = |y: Tensor, n: usize| {
                    if y.device().is_cpu() {
                        fused::split_heads(&y, n)
                    } else {
                        y.reshape((b, t, n, hd))?.transpose(1, 2)
                    }
                };
                let q = heads(proj(0, xa)?, h)?;
                let k = heads(proj(1, xa)?, kvh)?;
                (q, k, heads(proj(2, xa)?, kvh)?, 3)
            }
            Attention::Fused(layout) => {
                let (q, k, v) = split_qkv(&proj(0, xa)?, layout, h, kvh, hd)?;
                (q, k, v, 1)
            }
        })
    }

    /// The MLP of `xn (B, T, C)` through `proj` (its linears, numbered from 1 after the
    /// attention's output projection).
    fn mlp(
        &self,
        xn: &Tensor,
        proj: &dyn Fn(usize, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self.spec.mlp {
            Mlp::SwiGlu => {
                // gate, up: (B, T, I)
                let (g, u) = (proj(1, xn)?, proj(2, xn)?);
                let h = if !g.device().is_cpu() {
                    (nn::silu(&g)? * u)?
                } else {
                    fused::swiglu_with(&g, &u, self.opts.bf16_products())?
                };
                proj(3, &h)
            }
            Mlp::Gelu => {
                // up: (B, T, I); exact GELU, fused (one pass each way) on the CPU
                let u = proj(1, xn)?;
                let h = if !u.device().is_cpu() {
                    u.gelu_erf()?
                } else {
                    fused::gelu_erf(&u)?
                };
                proj(2, &h)
            }
        }
    }
}

/// q `(B, H, T, D)`, k and v `(B, KVH, T, D)` from a fused projection `(B, T, (H+2KVH)·D)`.
fn split_qkv(
    y: &Tensor,
    layout: QkvLayout,
    h: usize,
    kvh: usize,
    hd: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, t, f) = y.dims3()?;
    if y.device().is_cpu() {
        // one op a part (see `fused::take_heads`): where each part's heads sit in a row
        let at = |off: usize, group: usize, outer: usize| fused::HeadCols {
            width: f,
            off,
            group,
            outer,
        };
        let (q, k, v) = match layout {
            QkvLayout::MultiQuery => (at(0, h, 0), at(h * hd, kvh, 0), at((h + kvh) * hd, kvh, 0)),
            QkvLayout::PerHead => (at(0, 1, 3 * hd), at(hd, 1, 3 * hd), at(2 * hd, 1, 3 * hd)),
            QkvLayout::Grouped => {
                let (g, outer) = (h / kvh, (h / kvh + 2) * hd);
                (
                    at(0, g, outer),
                    at(g * hd, 1, outer),
                    at((g + 1) * hd, 1, outer),
                )
            }
        };
        return Ok((
            fused::take_heads(y, h, hd, q)?,
            fused::take_heads(y, kvh, hd, k)?,
            fused::take_heads(y, kvh, hd, v)?,
        ));
    }
    let (q, k, v) = match layout {
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

#[path = "transformer_decoder.rs"]
mod decoder;

#[cfg(test)]
#[path = "transformer_tests.rs"]
mod tests;
