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
mod step;
pub mod transformer;
mod weights;

pub use arch::Architecture;
pub use falcon::{Falcon, FalconConfig, FalconOptions};
pub use llama::{Llama, LlamaConfig, LlamaOptions, LoraSpec};
pub use plan::MemoryPlan;
pub use step::{
    batch_streams, eval_loss, eval_row_losses, forward, loss, own_backward_walks, train_grads,
    train_grads_rows, RowLosses, RowWeights, Tokens, BATCH_STREAMS, OWN_BACKWARD,
    PIPELINED_RECOMPUTE,
};
pub use transformer::Transformer;

use crate::format::gguf::{self, Value};
use crate::lora::QLinear;
use crate::nn;
use crate::quant::QType;
use crate::store::{SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
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
        let must = format!("must be a float vector of head_dim/2 = {half}");
        let float = matches!(t.qtype, QType::F32 | QType::F16 | QType::BF16);
        let f = transformer::float_vector(self.store, t, half, float, &must)?;
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

/// A causal language model with LoRA adapters, as the trainer drives it: every model is its
/// shared decoder to the trainer.
pub trait CausalLm {
    /// The shared decoder behind the model.
    fn decoder(&self) -> &Transformer;
    /// Logits `(B, T, V)` f32 for `ids (B, T)` with optional padding `mask (B, T)` (eval mode).
    fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.decoder().forward(ids, mask)
    }
    /// Mean cross-entropy (transformers' shifted causal-LM loss, -100 ignored), eval mode.
    fn loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        self.decoder().loss(ids, mask, labels)
    }
    /// The same mean cross-entropy as [`CausalLm::loss`] as a number, keeping no graph: each
    /// layer's output is detached, so only one layer's intermediates exist at a time (evaluation,
    /// DPO's reference).
    fn eval_loss(&self, ids: &Tensor, mask: Option<&Tensor>, labels: &Tensor) -> Result<f32> {
        eval_loss(self.decoder(), Tokens::new(ids, mask, labels))
    }
    /// One training step's loss and every LoRA gradient by PEFT name (dropout on).
    fn train_grads(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, HashMap<String, Tensor>)> {
        self.decoder().train_grads(ids, mask, labels)
    }
    /// Each row's summed cross-entropy and target count, eval mode, keeping no graph (DPO's
    /// log-probabilities of whole sequences).
    fn eval_row_losses(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<RowLosses> {
        eval_row_losses(self.decoder(), Tokens::new(ids, mask, labels))
    }
    /// One training step (dropout on) whose loss is `Σ_r w_r·CE_r`, with the row weights that
    /// `weigh` returns for this forward's row values; gives those values and every gradient.
    fn train_grads_rows(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        labels: &Tensor,
        weigh: RowWeights<'_>,
    ) -> Result<(RowLosses, HashMap<String, Tensor>)> {
        train_grads_rows(self.decoder(), Tokens::new(ids, mask, labels), weigh)
    }
    /// Every LoRA tensor with its PEFT name, layer by layer, A then B.
    fn lora_params(&self) -> Vec<(String, Var)> {
        self.decoder().lora_params()
    }
    /// Whether rows come before the tokens (prompt tuning, P-tuning), so that the first label is
    /// a target too (predicted by the last virtual row).
    fn first_label_is_target(&self) -> bool {
        Decoder::prompt_len(self.decoder()) > 0
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

impl<M: AsRef<Transformer>> CausalLm for M {
    fn decoder(&self) -> &Transformer {
        self.as_ref()
    }
}

/// The blocks of a decoder-only architecture; [`CausalLm`] follows from them through
/// [`forward`], [`loss`] and [`train_grads`] in this module.
pub trait Decoder: Sync {
    /// Per-call constants shared by all layers (rotary tables, attention bias).
    type Ctx: Send + Sync;
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
    /// Whether a CPU batch of two sequences or more may run as two streams (see
    /// `step::streams`).
    fn split_batch(&self) -> bool {
        true
    }
    /// Activation dtype of the checkpointed backward's one-layer recompute.
    fn recompute_dtype(&self) -> DType;
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
/// Composite candle ops, for a GPU (the CPU runs `nn::fused::layer_norm`).
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
    check_prompt(p, spec, path)?;
    let dims = prompt_dims(spec);
    let rows = |ids: &[u32]| {
        let x = embed_rows(embed, ids, (1, ids.len()), DType::F32, &Device::Cpu, path)?;
        x.squeeze(0)
            .map_err(|e| Error::Invalid(format!("prompt init rows: {e}")))
    };
    Ok(Box::new(crate::lora::prompt::PromptAdapter::new(
        p,
        dims,
        rows,
        opts.dtype,
        &opts.device,
    )?))
}

/// Refuses a prompt-learning method PEFT 0.13.2 cannot run on a model of `spec` (prefix tuning
/// on Falcon); the plan and the loader both ask.
pub(crate) fn check_prompt(
    p: &crate::lora::prompt::PromptSpec,
    spec: &arch::Spec,
    path: &std::path::Path,
) -> Result<()> {
    use crate::lora::prompt::PromptMethod;
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
    Ok(())
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

pub(crate) fn cerr(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Invalid(format!("{what}: {e}"))
}
