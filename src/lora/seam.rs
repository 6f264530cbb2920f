//! The adapter seam: how an adapter method plugs into the shared decoder
//! ([`crate::models::transformer::Transformer`]).
//!
//! - [`LinearAdapter`]: an adapter on one frozen linear (LoRA, and DoRA: each gets the frozen
//!   base and its output).
//! - [`AdapterMethod`]: where a method puts its linear adapters, how it builds one, and what they
//!   cost in the memory plan (before anything is loaded).
//! - [`SequenceAdapter`]: the two other entry points: rows prepended to the token embeddings
//!   (prompt tuning / P-tuning) and a per-layer key/value prefix (prefix tuning).
use super::QLinear;
use crate::Result;
use candle_core::{DType, Device, Tensor, Var};

/// One call of a frozen linear, as an adapter on it sees it.
pub struct BaseCall<'a> {
    /// The input `(.., in)`.
    pub x: &'a Tensor,
    /// The frozen linear.
    pub base: &'a QLinear,
    /// Its output `base(x) (.., out)`, which the adapter adds to or rescales, where the caller
    /// computed it; None: the adapter computes it (LoRA and DoRA in one op with their up
    /// projection, on the CPU).
    pub y: Option<Tensor>,
}

/// A boxed adapter on one linear, as an [`AdapterMethod`] builds it.
pub type BoxedAdapter = Box<dyn LinearAdapter>;

/// An adapter on one frozen linear, as the shared block calls it.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// The adapted output of `call`; `key`: None in evaluation, else the key the dropout masks are
    /// drawn from (a checkpointed recompute passes the same key again).
    fn forward(&self, call: BaseCall<'_>, key: Option<u64>) -> candle_core::Result<Tensor>;
    /// The trainable tensors with their PEFT names below the module (`lora_A.weight`).
    fn params(&self) -> Vec<(&'static str, Var)>;
    /// PEFT's `peft_type` of the method (`LORA`).
    fn peft_type(&self) -> &'static str;
}

/// An adapter method's placement and plan terms.
pub trait AdapterMethod {
    /// The linears of `projections` (PEFT names of an architecture called `label`) it adapts; an
    /// unknown name is an error.
    fn targets(&self, projections: &[&'static str], label: &str) -> Result<Vec<&'static str>>;
    /// Whether it adapts layer `layer` at all.
    fn adapts_layer(&self, layer: usize) -> bool;
    /// A fresh adapter on `base` in dtype `dt` on `dev`; `i` is the linear's place in the model
    /// (layer · projections + projection), which seeds it.
    fn build(&self, base: &QLinear, i: usize, dt: DType, dev: &Device) -> Result<BoxedAdapter>;
    /// Elements of each trainable tensor of an adapter on an `(out, in)` linear.
    fn numels(&self, out: usize, inp: usize) -> Vec<usize>;
    /// Bytes its forward adds to a layer's recompute graph for `n` tokens on an `(out, in)` linear
    /// (`s` bytes an element), and the gradients its backward leaves unconsumed until the layer's
    /// backward ends.
    fn graph_bytes(&self, n: usize, out: usize, inp: usize, s: usize) -> (usize, usize);
    /// Bytes of constant (not trained) state an adapter on an `(out, in)` linear keeps.
    fn frozen_bytes(&self, _out: usize, _inp: usize) -> usize {
        0
    }
    /// Whether its forward on the CPU runs our fused ops alone, so that the checkpointed step
    /// walks an adapted layer's backward itself (`nn::fused::tape`; the plan counts that walk).
    fn fused_only(&self) -> bool {
        false
    }
}

/// Sequence-level adapter entry points of the shared model (prompt learning,
/// [`super::prompt::PromptAdapter`]); the model calls them where their methods need it.
pub trait SequenceAdapter: Send + Sync {
    /// Rows `(N, C)` prepended to every sequence's token embeddings (prompt tuning / P-tuning);
    /// their outputs are dropped before the head.
    fn prompt_rows(&self) -> Option<Tensor> {
        None
    }
    /// Rows [`SequenceAdapter::prompt_rows`] gives (0: none), without computing them.
    fn prompt_len(&self) -> usize {
        self.prompt_rows()
            .map_or(0, |r| r.dims().first().copied().unwrap_or(0))
    }
    /// Keys and values `(KVH, N, D)` prepended in layer `layer`'s attention (prefix tuning), with
    /// no rotary on them; the tokens then sit at rotary positions N.. as in transformers.
    fn kv_prefix(&self, _layer: usize) -> Option<(Tensor, Tensor)> {
        None
    }
    /// Rows of the KV prefix (0: none).
    fn prefix_len(&self) -> usize {
        0
    }
    /// The trainable tensors with their PEFT names.
    fn params(&self) -> Vec<(String, Var)>;
}
