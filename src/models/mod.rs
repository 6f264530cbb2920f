//! Model architectures over the weight store: their configs, forward passes and LoRA training.
//!
//! An architecture is data: its config type implements [`arch::Architecture`] and describes itself
//! as an [`arch::Spec`] (tensor names, block variant, dimensions). One shared decoder,
//! [`transformer::Transformer`], loads, runs, trains (through [`Decoder`] and the checkpointed
//! step here), decodes with a KV cache, plans and names any spec; [`Model`] pairs it with its
//! config ([`Llama`], [`Falcon`]). [`CausalLm`] is what the trainer sees; [`load`] picks the
//! architecture of a store.
pub mod arch;
pub mod falcon;
pub mod generate;
pub mod llama;
mod options;
pub mod plan;
pub mod transformer;
mod weights;

pub use arch::Architecture;
pub use falcon::{Falcon, FalconConfig, FalconOptions};
pub use llama::{Llama, LlamaConfig, LlamaOptions, LoraSpec};
pub use plan::MemoryPlan;
pub use transformer::Transformer;

use crate::format::gguf::{self, Value};
use crate::lora::QLinear;
use crate::nn::{self, fused};
use crate::quant::QType;
use crate::store::{SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use std::collections::HashMap;

/// The model in `store` (Falcon by its config / GGUF architecture, else Llama) behind [`CausalLm`].
pub fn load(store: &WeightStore, opts: LlamaOptions) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(open(store, opts)?))
}

/// The description of the model in `store` (Falcon by its config / GGUF architecture, else Llama).
pub fn spec_of(store: &WeightStore) -> Result<arch::Spec> {
    let gguf = store.format == SourceFormat::Gguf;
    Ok(if plan::is_falcon(store) {
        FalconConfig::read(store)?.spec(gguf)
    } else {
        LlamaConfig::read(store)?.spec(gguf)
    })
}

/// The shared decoder of the model in `store`, whatever its architecture.
pub fn open(store: &WeightStore, opts: LlamaOptions) -> Result<Transformer> {
    Transformer::load(store, spec_of(store)?, opts)
}

/// An architecture's model: its config beside the shared decoder it runs on (which it derefs to:
/// `forward`, `loss`, `train_grads`, `lora_params`, `base_linear`, ...).
pub struct Model<C> {
    cfg: C,
    t: Transformer,
}

impl<C: Architecture> Model<C> {
    /// Loads the model in `store` (Hugging Face names or llama.cpp GGUF names).
    pub fn load(store: &WeightStore, opts: LlamaOptions) -> Result<Self> {
        let cfg = C::read(store)?;
        let spec = cfg.spec(store.format == SourceFormat::Gguf);
        let t = Transformer::load(store, spec, opts)?;
        Ok(Model { cfg, t })
    }
}

impl<C> Model<C> {
    /// The config.
    pub fn config(&self) -> &C {
        &self.cfg
    }

    /// The shared decoder, without the config.
    pub fn into_inner(self) -> Transformer {
        self.t
    }
}

impl<C> std::ops::Deref for Model<C> {
    type Target = Transformer;
    fn deref(&self) -> &Transformer {
        &self.t
    }
}

impl<C> std::ops::DerefMut for Model<C> {
    fn deref_mut(&mut self) -> &mut Transformer {
        &mut self.t
    }
}

/// A GGUF's `<arch>.*` hyper-parameters as llama.cpp writes them (keys given without the prefix);
/// every error names the file.
/// A GGUF's `general.architecture`.
pub(crate) fn gguf_arch(store: &WeightStore) -> Option<&str> {
    gguf::find(&store.gguf_metadata, "general.architecture").and_then(Value::as_str)
}

pub(crate) struct GgufHparams<'a> {
    store: &'a WeightStore,
    arch: &'static str,
}

impl<'a> GgufHparams<'a> {
    /// Checks `general.architecture` is `arch` (`loader`: the architecture's name for messages).
    pub(crate) fn new(store: &'a WeightStore, arch: &'static str, loader: &str) -> Result<Self> {
        let h = GgufHparams { store, arch };
        let found =
            gguf::find(&store.gguf_metadata, "general.architecture").and_then(Value::as_str);
        if found != Some(arch) {
            return Err(h.corrupt(format!(
                "general.architecture is {found:?}, not \"{arch}\"; qtune's {loader} loader reads {arch} files"
            )));
        }
        Ok(h)
    }

    /// llama.cpp's `rope_freqs.weight` (`(D/2,)` frequency divisors of Llama 3.1), if present.
    pub(crate) fn rope_freqs(&self) -> Result<arch::RopeScaling> {
        let Some(t) = self.store.get("rope_freqs.weight") else {
            return Ok(arch::RopeScaling::None);
        };
        let half = self.int("rope.dimension_count").map_or_else(
            |_| {
                Ok::<_, Error>(
                    self.int("embedding_length")? / self.int("attention.head_count")?.max(1),
                )
            },
            Ok,
        )? / 2;
        if t.shape != [half] || !matches!(t.qtype, QType::F32 | QType::F16 | QType::BF16) {
            return Err(Error::Shape {
                path: self.store.path.clone(),
                tensor: t.name.clone(),
                msg: format!(
                    "must be a float vector of head_dim/2 = {half}, found {} {:?}",
                    t.qtype.name(),
                    t.shape
                ),
            });
        }
        let mut f = vec![0f32; half];
        t.matrix().dequant_tile(0, 1, 0, half, &mut f);
        if f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(self.corrupt(
                "rope_freqs.weight holds a factor that is not positive and finite".into(),
            ));
        }
        Ok(arch::RopeScaling::Factors(f))
    }

    /// An error about the file's content.
    pub(crate) fn corrupt(&self, msg: String) -> Error {
        Error::corrupt(&self.store.path, "GGUF", msg)
    }

    /// Integer `<arch>.<key>`, required.
    pub(crate) fn int(&self, key: &str) -> Result<usize> {
        let k = format!("{}.{key}", self.arch);
        gguf::find(&self.store.gguf_metadata, &k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.corrupt(format!("metadata lacks integer '{k}'")))
    }

    /// Float `<arch>.<key>`, if present.
    pub(crate) fn float(&self, key: &str) -> Option<f64> {
        gguf::find(&self.store.gguf_metadata, &format!("{}.{key}", self.arch))
            .and_then(Value::as_f64)
    }

    /// `token_embd.weight`, which every llama.cpp model has.
    pub(crate) fn embedding(&self) -> Result<&'a StoredTensor> {
        self.store
            .get("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor {
                path: self.store.path.clone(),
                tensor: "token_embd.weight".into(),
                hint: format!(" (a {} GGUF needs its token embedding)", self.arch),
            })
    }
}

/// A causal language model with LoRA adapters, as the trainer drives it.
pub trait CausalLm {
    /// Logits `(B, T, V)` f32 for `ids (B, T)` with optional padding `mask (B, T)` (eval mode).
    fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor>;
    /// Mean cross-entropy (transformers' shifted causal-LM loss, -100 ignored), eval mode.
    fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor>;
    /// The same mean cross-entropy as [`CausalLm::loss`] as a number, keeping no graph: each
    /// layer's output is detached, so only one layer's intermediates exist at a time (evaluation,
    /// DPO's reference).
    fn eval_loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<f32>;
    /// One training step's loss and every LoRA gradient by PEFT name (dropout on).
    fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)>;
    /// Each row's summed cross-entropy and target count, eval mode, keeping no graph (DPO's
    /// log-probabilities of whole sequences).
    fn eval_row_losses(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<RowLosses>;
    /// One training step (dropout on) whose loss is `Σ_r w_r·CE_r`, with the row weights that
    /// `weigh` returns for this forward's row values; gives those values and every gradient.
    fn train_grads_rows(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
        weigh: RowWeights<'_>,
    ) -> Result<(RowLosses, HashMap<String, Tensor>)>;
    /// Every LoRA tensor with its PEFT name, layer by layer, A then B.
    fn lora_params(&self) -> Vec<(String, Var)>;
    /// Whether rows come before the tokens (prompt tuning, P-tuning), so that the first label is
    /// a target too (predicted by the last virtual row).
    fn first_label_is_target(&self) -> bool {
        false
    }
}

impl<C> AsRef<Transformer> for Model<C> {
    fn as_ref(&self) -> &Transformer {
        &self.t
    }
}

impl AsRef<Transformer> for Transformer {
    fn as_ref(&self) -> &Transformer {
        self
    }
}

/// Every model is its shared decoder to the trainer.
impl<M: AsRef<Transformer>> CausalLm for M {
    fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.as_ref().forward(ids, mask)
    }
    fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        self.as_ref().loss(ids, mask, labels)
    }
    fn eval_loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<f32> {
        eval_loss(self.as_ref(), ids, mask, labels)
    }
    fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)> {
        self.as_ref().train_grads(ids, mask, labels)
    }
    fn eval_row_losses(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<RowLosses> {
        eval_row_losses(self.as_ref(), ids, mask, labels)
    }
    fn train_grads_rows(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
        weigh: RowWeights<'_>,
    ) -> Result<(RowLosses, HashMap<String, Tensor>)> {
        train_grads_rows(self.as_ref(), ids, mask, labels, weigh)
    }
    fn lora_params(&self) -> Vec<(String, Var)> {
        self.as_ref().lora_params()
    }
    fn first_label_is_target(&self) -> bool {
        Decoder::prompt_len(self.as_ref()) > 0
    }
}

/// The blocks of a decoder-only architecture; [`CausalLm`] follows from them through
/// [`forward`], [`loss`] and [`train_grads`] in this module.
pub trait Decoder {
    /// Per-call constants shared by all layers (rotary tables, attention bias).
    type Ctx;
    /// Decoder layers.
    fn num_layers(&self) -> usize;
    /// Hidden size C.
    fn hidden_size(&self) -> usize;
    /// Vocabulary size V.
    fn vocab_size(&self) -> usize;
    /// Rows per cross-entropy chunk.
    fn ce_chunk(&self) -> usize;
    /// Gradient checkpointing per layer in training.
    fn checkpoint(&self) -> bool;
    /// Rows a sequence-level adapter puts before the tokens (prompt tuning; 0: none): the
    /// embedding and every layer see `N + T` positions, the loss the last `T + 1` (the last
    /// virtual row predicts the first token), the logits of `forward` the last `T`.
    fn prompt_len(&self) -> usize {
        0
    }
    /// Token embeddings `(B, N + T, C)` in the compute dtype for `ids` (B*T ids, checked against V),
    /// after any prompt rows.
    fn embed(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor>;
    /// The per-call constants for a `(B, T)` batch with optional padding mask (and any prompt rows).
    fn ctx(&self, b: usize, t: usize, mask: Option<&Tensor>) -> Result<Self::Ctx>;
    /// Decoder layer `li`: `x (B, T, C) -> (B, T, C)`; `key` is the dropout key base (None: eval).
    fn layer(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Self::Ctx,
        key: Option<u64>,
    ) -> candle_core::Result<Tensor>;
    /// The final norm `(.., C) -> (.., C)`.
    fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// The output projection C -> V.
    fn lm_head(&self) -> &QLinear;
    /// Every linear adapter's tensor with its PEFT name (of layer `layer` only, when given).
    fn lora_vars(&self, layer: Option<usize>) -> Vec<(String, Var)>;
    /// The sequence-level adapter's tensors (prompt rows, KV prefix), which every layer may use.
    fn sequence_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The key base of the next training step (dropout masks are replayed from it).
    fn next_step_key(&self) -> u64;
}

/// Token embeddings `(B, T, C)` in `dtype` for `ids` (B*T of them): rows of the stored table (any
/// type) dequantised by id; an id outside the vocabulary is an error naming `path`.
pub(crate) fn embed_rows(
    table: &crate::store::StoredTensor,
    ids: &[u32],
    (b, t): (usize, usize),
    dtype: DType,
    device: &Device,
    path: &std::path::Path,
) -> Result<Tensor> {
    let m = table.matrix();
    let (vocab, c) = (m.rows, m.cols);
    let mut out = vec![0f32; ids.len() * c];
    for (n, &id) in ids.iter().enumerate() {
        if id as usize >= vocab {
            return Err(Error::Invalid(format!(
                "token id {id} at position {n} is outside the vocabulary of {vocab} of {}",
                path.display()
            )));
        }
        m.dequant_tile(id as usize, 1, 0, c, &mut out[n * c..(n + 1) * c]);
    }
    Tensor::from_vec(out, (b, t, c), &Device::Cpu)
        .and_then(|x| x.to_dtype(dtype)?.to_device(device))
        .map_err(cerr("embedding"))
}

/// LayerNorm as torch's `nn.LayerNorm` over the last dim: `(x - mean) / sqrt(var + eps) * w + b`
/// with the biased variance; statistics in f32, result in x's dtype. `w` and `b` are constants.
pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    // mu, var: (.., 1)
    let mu = xf.mean_keepdim(candle_core::D::Minus1)?;
    let xc = xf.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = nn::add_const(&nn::mul_const(&y, w)?, b)?;
    y.to_dtype(dt)
}

/// The dimensions a prompt-learning adapter on a model of `spec` is shaped by.
pub fn prompt_dims(spec: &arch::Spec) -> crate::lora::prompt::PromptDims {
    crate::lora::prompt::PromptDims {
        layers: spec.layers,
        hidden: spec.hidden,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
    }
}

/// The prompt-learning adapter `p` on a model of `spec` (its TEXT init reads rows of `embed`);
/// prefix tuning is refused on Falcon as PEFT 0.13.2 cannot run it.
pub(crate) fn prompt_adapter(
    p: &crate::lora::prompt::PromptSpec,
    spec: &arch::Spec,
    embed: &crate::store::StoredTensor,
    opts: &LlamaOptions,
    path: &std::path::Path,
) -> Result<Box<dyn crate::lora::seam::SequenceAdapter>> {
    use crate::lora::prompt::{PromptAdapter, PromptMethod};
    if matches!(p.method, PromptMethod::PrefixTuning(_)) && spec.arch == "falcon" {
        return Err(Error::Invalid(format!(
            "prefix tuning on Falcon ({}): PEFT 0.13.2 cannot run it (FalconConfig names its KV \
             head count num_kv_heads, so PEFT sizes the prefix for {} heads while the model's \
             cache holds {}, and transformers fails in DynamicCache.update), so no PEFT adapter \
             could load what qtune trained; use --method prompt-tuning, p-tuning or lora on Falcon",
            path.display(),
            spec.heads,
            spec.kv_heads
        )));
    }
    let dims = prompt_dims(spec);
    let rows = |ids: &[u32]| {
        let x = embed_rows(embed, ids, (1, ids.len()), DType::F32, &Device::Cpu, path)?;
        x.squeeze(0)
            .map_err(|e| Error::Invalid(format!("prompt init rows: {e}")))
    };
    Ok(Box::new(PromptAdapter::new(
        p,
        dims,
        rows,
        opts.dtype,
        &opts.device,
    )?))
}

/// Rotary tables `(T, D/2)` (host) and the attention bias `(B, 1, T, T)` (on `device`) of one call:
/// the per-call constants of both architectures.
pub(crate) fn rope_and_bias(
    b: usize,
    t: usize,
    mask: Option<&Tensor>,
    inv_freq: &[f32],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    // The rotary tables stay on the host: the fused rope op reads them as host constants on any
    // device (its CUDA launcher uploads them), so a device copy would cost a download per call.
    let (cos, sin) = nn::rope_tables_of(t, inv_freq, dtype).map_err(cerr("rotary tables"))?;
    let bias = nn::attention_bias(mask, b, t)
        .and_then(|x| x.to_device(device))
        .map_err(cerr("attention mask"))?;
    Ok((cos, sin, bias))
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Invalid(format!("{what}: {e}"))
}

fn check_batch(ids: &Tensor) -> Result<(usize, usize, Vec<u32>)> {
    let (b, t) = ids
        .dims2()
        .map_err(|_| Error::Invalid(format!("input ids must be (B, T), got {:?}", ids.dims())))?;
    let v = ids
        .to_dtype(DType::U32)
        .and_then(|x| x.flatten_all()?.to_vec1::<u32>())
        .map_err(cerr("input ids"))?;
    Ok((b, t, v))
}

/// Shifted targets: row `b*T + t` predicts `labels[b, t+1]`; -100 where ignored or past the end.
fn targets(labels: &Tensor, b: usize, t: usize) -> Result<Vec<i64>> {
    if labels.dims() != [b, t] {
        return Err(Error::Invalid(format!(
            "labels have shape {:?}, expected ({b}, {t}) like the input ids",
            labels.dims()
        )));
    }
    let l = labels
        .to_dtype(DType::I64)
        .and_then(|x| x.flatten_all()?.to_vec1::<i64>())
        .map_err(cerr("labels"))?;
    Ok((0..b * t)
        .map(|n| if n % t + 1 < t { l[n + 1] } else { -100 })
        .collect())
}

/// With prompt rows (N > 0) the head reads positions N-1..N+T-1: the last virtual row predicts
/// the first token (PEFT prepends N labels of -100 and shifts), so row `b*(T+1) + j` predicts
/// `labels[b, j]` (j < T) and the last row nothing. Without: [`targets`] over `T` rows.
fn head_targets<M: Decoder>(
    m: &M,
    labels: &Tensor,
    b: usize,
    t: usize,
) -> Result<(Vec<i64>, usize)> {
    if m.prompt_len() == 0 {
        return Ok((targets(labels, b, t)?, t));
    }
    targets(labels, b, t)?; // the shape check
    let l = labels
        .to_dtype(DType::I64)
        .and_then(|x| x.flatten_all()?.to_vec1::<i64>())
        .map_err(cerr("labels"))?;
    let tg = (0..b * (t + 1))
        .map(|n| (n / (t + 1), n % (t + 1)))
        .map(|(r, j)| if j < t { l[r * t + j] } else { -100 })
        .collect();
    Ok((tg, t + 1))
}

/// The rows of `x (B, N + T, C)` the head reads for the loss (see [`head_targets`]).
fn head_rows<M: Decoder>(m: &M, x: Tensor, t: usize) -> Result<Tensor> {
    match m.prompt_len() {
        0 => Ok(x),
        n => x.narrow(1, n - 1, t + 1).map_err(cerr("prompt rows")),
    }
}

/// Final hidden states `(B, N + T, C)` before the last norm (N prompt rows), with the graph.
fn hidden<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    key: Option<u64>,
) -> Result<Tensor> {
    hidden_with(m, ids, mask, key, false)
}

/// [`hidden`], or with every layer's output `detach`ed (no graph survives a layer).
fn hidden_with<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    key: Option<u64>,
    detach: bool,
) -> Result<Tensor> {
    let (b, t, v) = check_batch(ids)?;
    let ctx = m.ctx(b, t, mask)?;
    let mut x = m.embed(&v, b, t)?;
    for li in 0..m.num_layers() {
        x = m.layer(li, &x, &ctx, key).map_err(cerr("forward"))?;
        if detach {
            x = x.detach();
        }
    }
    Ok(x)
}

/// [`CausalLm::eval_loss`] of a [`Decoder`]: [`loss`]'s value, computed without keeping a graph.
pub fn eval_loss<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    labels: &Tensor,
) -> Result<f32> {
    let (b, t, _) = check_batch(ids)?;
    let (tg, th) = head_targets(m, labels, b, t)?;
    let x = head_rows(m, hidden_with(m, ids, mask, None, true)?, t)?;
    loss_of(m, &x, &tg, b, th)?
        .to_dtype(DType::F32)
        .and_then(|l| l.to_scalar::<f32>())
        .map_err(cerr("loss"))
}

/// The last `t` positions of `x (B, N + T, C)`: the tokens' hidden states after any prompt rows.
fn drop_prompt<M: Decoder>(m: &M, x: Tensor, t: usize) -> Result<Tensor> {
    match m.prompt_len() {
        0 => Ok(x),
        n => x.narrow(1, n, t).map_err(cerr("prompt rows")),
    }
}

/// [`CausalLm::forward`] of a [`Decoder`]: all logits at once (tests, small inputs).
pub fn forward<M: Decoder>(m: &M, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (_, t, _) = check_batch(ids)?;
    let x = drop_prompt(m, hidden(m, ids, mask, None)?, t)?;
    m.final_norm(&x)
        .and_then(|x| m.lm_head().forward(&x))
        .and_then(|l| l.to_dtype(DType::F32))
        .map_err(cerr("lm_head"))
}

fn loss_of<M: Decoder>(m: &M, x: &Tensor, tg: &[i64], b: usize, t: usize) -> Result<Tensor> {
    let x = x
        .reshape((b * t, m.hidden_size()))
        .and_then(|x| m.final_norm(&x))
        .map_err(cerr("final norm"))?;
    let (sum, n) =
        fused::cross_entropy_chunked(&x, m.lm_head(), tg, m.ce_chunk()).map_err(cerr("loss"))?;
    if n == 0 {
        return Err(Error::Invalid(
            "no target tokens: every label is -100".into(),
        ));
    }
    (sum / n as f64).map_err(cerr("loss"))
}

/// [`CausalLm::loss`] of a [`Decoder`]: mean shifted cross-entropy, eval mode, with the graph.
pub fn loss<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    labels: &Tensor,
) -> Result<Tensor> {
    let (b, t, _) = check_batch(ids)?;
    let (tg, th) = head_targets(m, labels, b, t)?;
    let x = head_rows(m, hidden(m, ids, mask, None)?, t)?;
    loss_of(m, &x, &tg, b, th)
}

/// Adds the gradients in `grads` of the adapter tensors of `layer` (None: all) and of the
/// sequence-level tensors (shared by the layers: their parts are summed) to `out`.
fn collect<M: Decoder>(
    m: &M,
    grads: &GradStore,
    layer: Option<usize>,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let vars = match layer {
        Some(usize::MAX) => m.sequence_vars(),
        l => m
            .lora_vars(l)
            .into_iter()
            .chain(m.sequence_vars())
            .collect(),
    };
    for (name, var) in vars {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.zeros_like().map_err(cerr("grads"))?,
        };
        let g = match out.remove(&name) {
            Some(prev) => (prev + g).map_err(cerr("grads"))?,
            None => g,
        };
        out.insert(name, g);
    }
    Ok(())
}

/// Each row's summed cross-entropy and target count (`(Σ CE, n)`): a sequence's log-probability is
/// `-Σ CE`.
pub type RowLosses = Vec<(f64, usize)>;

/// The row weights of a training step, from its forward's per-row `(Σ CE, targets)`.
pub type RowWeights<'a> = &'a mut dyn FnMut(&[(f64, usize)]) -> Result<Vec<f64>>;

/// The head of one row per sequence: `(Σ CE of row r with its graph, its targets)` for
/// `x (B, T, C)` before the final norm; rows without a target give `None`.
fn row_heads<M: Decoder>(
    m: &M,
    x: &Tensor,
    tg: &[i64],
    b: usize,
    t: usize,
) -> Result<Vec<Option<(Tensor, usize)>>> {
    (0..b)
        .map(|r| {
            let labels = &tg[r * t..(r + 1) * t];
            if labels.iter().all(|&l| l < 0) {
                return Ok(None);
            }
            let xr = x
                .narrow(0, r, 1)
                .and_then(|x| x.reshape((t, m.hidden_size())))
                .and_then(|x| m.final_norm(&x))
                .map_err(cerr("final norm"))?;
            let (sum, n) = fused::cross_entropy_chunked(&xr, m.lm_head(), labels, m.ce_chunk())
                .map_err(cerr("loss"))?;
            Ok(Some((sum, n)))
        })
        .collect()
}

/// The values of [`row_heads`].
fn row_values(heads: &[Option<(Tensor, usize)>]) -> Result<RowLosses> {
    heads
        .iter()
        .map(|h| match h {
            None => Ok((0.0, 0)),
            Some((s, n)) => s
                .to_dtype(DType::F32)
                .and_then(|s| s.to_scalar::<f32>())
                .map(|v| (v as f64, *n))
                .map_err(cerr("loss")),
        })
        .collect()
}

/// [`CausalLm::eval_row_losses`] of a [`Decoder`]: per-row sums without keeping a graph.
pub fn eval_row_losses<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    labels: &Tensor,
) -> Result<RowLosses> {
    let (b, t, _) = check_batch(ids)?;
    let (tg, th) = head_targets(m, labels, b, t)?;
    let x = head_rows(m, hidden_with(m, ids, mask, None, true)?, t)?;
    row_values(&row_heads(m, &x, &tg, b, th)?)
}

/// How a training step turns the final hidden states `(B, T, C)` (with their graph) and the
/// shifted targets into the scalar to differentiate, and what it reports.
type Head<'a, M, R> = &'a mut dyn FnMut(&M, &Tensor, &[i64], usize, usize) -> Result<(R, Tensor)>;

/// [`CausalLm::train_grads`] of a [`Decoder`]: the mean cross-entropy over every target.
pub fn train_grads<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    labels: &Tensor,
) -> Result<(f32, HashMap<String, Tensor>)> {
    train_with(m, ids, mask, labels, &mut |m, x, tg, b, t| {
        let loss = loss_of(m, x, tg, b, t)?;
        Ok((loss.to_scalar::<f32>().map_err(cerr("loss"))?, loss))
    })
}

/// [`CausalLm::train_grads_rows`] of a [`Decoder`]: the loss `Σ_r w_r·CE_r` over the rows, with
/// the weights `weigh` gives for this forward's row values. Each row's cross-entropy runs as its
/// own head op (the same chunked kernel; a row's gradient depends on that row alone), so no
/// kernel needs per-row weights.
pub fn train_grads_rows<M: Decoder>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    labels: &Tensor,
    weigh: RowWeights<'_>,
) -> Result<(RowLosses, HashMap<String, Tensor>)> {
    train_with(m, ids, mask, labels, &mut |m, x, tg, b, t| {
        let heads = row_heads(m, x, tg, b, t)?;
        let values = row_values(&heads)?;
        let w = weigh(&values)?;
        let mut total: Option<Tensor> = None;
        for (h, &w) in heads.iter().zip(&w) {
            let Some((s, _)) = h else { continue };
            let term = s.affine(w, 0.0).map_err(cerr("loss"))?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term).map_err(cerr("loss"))?,
            });
        }
        let total =
            total.ok_or_else(|| Error::Invalid("no target tokens: every label is -100".into()))?;
        Ok((values, total))
    })
}

/// The training step under any [`Head`]: with checkpointing, only each layer's input is kept
/// through the forward; the backward recomputes one layer at a time (same dropout masks) and the
/// logits are made and freed chunk by chunk.
fn train_with<M: Decoder, R>(
    m: &M,
    ids: &Tensor,
    mask: Option<&Tensor>,
    labels: &Tensor,
    head: Head<'_, M, R>,
) -> Result<(R, HashMap<String, Tensor>)> {
    let key = Some(m.next_step_key());
    let (b, t, v) = check_batch(ids)?;
    let (tg, th) = head_targets(m, labels, b, t)?;
    if !m.checkpoint() {
        let x = head_rows(m, hidden(m, ids, mask, key)?, t)?;
        let (r, loss) = head(m, &x, &tg, b, th)?;
        let grads = loss.backward().map_err(cerr("backward"))?;
        let mut out = HashMap::new();
        collect(m, &grads, None, &mut out)?;
        return Ok((r, out));
    }
    if let Some(&l) = tg.iter().find(|&&l| l >= m.vocab_size() as i64) {
        return Err(Error::Invalid(format!(
            "label {l} is outside the vocabulary of {}",
            m.vocab_size()
        )));
    }
    let ctx = m.ctx(b, t, mask)?;
    // Forward without keeping any graph: only each layer's input survives (detached). On a GPU
    // those inputs wait in host memory (as Unsloth offloads its checkpoints): B·T·C values per
    // layer cross the bus twice, against a layer's worth of GEMMs, and device memory keeps only
    // the one being recomputed.
    let mut saved = Vec::with_capacity(m.num_layers());
    let mut x = m.embed(&v, b, t)?;
    let dev = x.device().clone();
    for li in 0..m.num_layers() {
        let y = m
            .layer(li, &x, &ctx, key)
            .map_err(cerr("forward"))?
            .detach();
        saved.push(x.to_device(&Device::Cpu).map_err(cerr("checkpoint"))?);
        x = y;
    }
    // Head: the fused cross-entropy makes each chunk's logits in turn and keeps one logsumexp per
    // token, so its backward needs no logits either; the same op as the uncheckpointed loss, so
    // both modes give the same gradient bit for bit.
    let xl = Var::from_tensor(&head_rows(m, x.clone(), t)?).map_err(cerr("head"))?;
    let (loss, loss_t) = head(m, xl.as_tensor(), &tg, b, th)?;
    let mut g = loss_t
        .backward()
        .map_err(cerr("head backward"))?
        .get(xl.as_tensor())
        .map(|g| g.detach())
        .ok_or_else(|| Error::Invalid("head backward: no gradient for the hidden state".into()))?;
    drop(loss_t);
    if m.prompt_len() > 1 {
        // The head reads the last prompt row and the tokens': zeros before them.
        let z = x
            .narrow(1, 0, m.prompt_len() - 1)
            .and_then(|p| p.zeros_like())
            .and_then(|z| Tensor::cat(&[&z, &g], 1))
            .map_err(cerr("prompt rows"))?;
        g = z;
    }
    drop(x);
    let mut out = HashMap::new();
    // Backward through the layers, last first: recompute, backprop sum(out * g), pass dx on.
    for li in (0..m.num_layers()).rev() {
        let xin = saved
            .pop()
            .expect("one saved input per layer")
            .to_device(&dev)
            .map_err(cerr("checkpoint"))?;
        let (gs, xv) = (|| -> candle_core::Result<_> {
            let xv = Var::from_tensor(&xin)?;
            let y = m.layer(li, xv.as_tensor(), &ctx, key)?;
            let s = nn::mul_const(&y.to_dtype(DType::F32)?, &g.to_dtype(DType::F32)?)?.sum_all()?;
            Ok((s.backward()?, xv))
        })()
        .map_err(cerr("recompute"))?;
        collect(m, &gs, Some(li), &mut out)?;
        if li > 0 || m.prompt_len() > 0 {
            g = match gs.get(xv.as_tensor()) {
                Some(gx) => gx.detach(),
                None => xin.zeros_like().map_err(cerr("grads"))?,
            };
        }
    }
    if m.prompt_len() > 0 {
        // Prompt rows: the embedding step again, with its graph, backpropagating layer 0's input
        // gradient into the sequence-level tensors.
        let x0 = m.embed(&v, b, t)?;
        let gs = (|| {
            let s = nn::mul_const(&x0.to_dtype(DType::F32)?, &g.to_dtype(DType::F32)?)?;
            s.sum_all()?.backward()
        })()
        .map_err(cerr("prompt rows"))?;
        collect(m, &gs, Some(usize::MAX), &mut out)?;
    }
    Ok((loss, out))
}
