//! How a model is loaded: quantisation at load, compute dtype, device, checkpointing, and the
//! LoRA adapters ([`LoraSpec`], the LoRA [`AdapterMethod`](crate::lora::seam::AdapterMethod)).
use crate::quant::QType;
use candle_core::{DType, Device};
use std::ops::Range;

/// Which linears get LoRA adapters, and how.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    /// PEFT module names (`q_proj` .. `down_proj`), or `all-linear` for all of them.
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

/// How to load a model (any architecture; the name is historical).
#[derive(Clone, Debug)]
pub struct LlamaOptions {
    /// Quantise f32/f16/bf16 decoder-layer linears to this type at load (stored quantised types are
    /// kept). Q4_0, Q8_0, Q4_K, Q6_K or NF4.
    pub quant: Option<QType>,
    /// Compute dtype of activations and adapters: F32 (parity) or BF16.
    pub dtype: DType,
    /// LoRA adapters (`None`: a frozen model).
    pub lora: Option<LoraSpec>,
    /// Gradient checkpointing per decoder layer in `train_grads`.
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
