//! How a model is loaded: quantisation at load, compute dtype, device, checkpointing, and the
//! LoRA adapters ([`LoraSpec`], the LoRA [`AdapterMethod`](crate::lora::seam::AdapterMethod)).
use crate::lora::seam::{AdapterMethod, BoxedAdapter};
use crate::lora::QLinear;
use crate::quant::QType;
use crate::{Error, Result};
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
    /// DoRA instead of LoRA on the same linears (PEFT's `use_dora`): a trainable magnitude per
    /// output row beside A and B.
    pub use_dora: bool,
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
            use_dora: false,
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
    /// Activation dtype of the checkpointed backward's one-layer recompute: `None` is auto (see
    /// [`LlamaOptions::recompute_dtype`]), else f32 or the compute dtype.
    pub recompute: Option<DType>,
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
            recompute: None,
        }
    }
}

impl LlamaOptions {
    /// The activation dtype each layer is recomputed and differentiated in: `recompute` when set;
    /// auto is f32 for a bf16 step on the CPU, the compute dtype elsewhere. Why f32 there: candle's
    /// backward gives every node's gradient a zero tensor and an add in the activation dtype, and
    /// its CPU bf16 add converts element by element through out-of-line calls (42 % of a 7B
    /// step's samples on an AMX CPU, session 10); in f32 those adds vectorise. The products stay
    /// bf16 (the layer linears take bf16 products for f32 activations, see
    /// [`QLinear::with_bf16_products`]), the checkpoints and the forward stay bf16, and the
    /// one recomputed layer's activations take twice the bytes (the plan counts them).
    pub fn recompute_dtype(&self) -> DType {
        match self.recompute {
            Some(d) => d,
            None if self.dtype == DType::BF16 && self.device.is_cpu() => DType::F32,
            None => self.dtype,
        }
    }

    /// The load options the decoder supports: f32 or bf16 compute, quantisation at load to a type
    /// we write, a recompute dtype [`LlamaOptions::check_recompute`] takes.
    pub fn check(&self) -> Result<()> {
        if !matches!(self.dtype, DType::F32 | DType::BF16) {
            return Err(Error::Invalid(format!(
                "compute dtype {:?} is not supported; use f32 or bf16",
                self.dtype
            )));
        }
        self.check_recompute()?;
        if let Some(q) = self.quant {
            if q != QType::NF4 && !crate::quant::dispatch::QUANTIZABLE.contains(&q) {
                return Err(Error::Invalid(format!(
                    "cannot quantise at load to {}; use Q4_0, Q8_0, Q4_K, Q6_K or NF4",
                    q.name()
                )));
            }
        }
        Ok(())
    }

    /// An error unless `recompute` is auto, the compute dtype, or f32 on the CPU (checked before
    /// the plan and the load).
    pub fn check_recompute(&self) -> Result<()> {
        match self.recompute {
            None => Ok(()),
            Some(d) if d == self.dtype => Ok(()),
            Some(DType::F32) if self.device.is_cpu() => Ok(()),
            Some(DType::F32) => Err(Error::Invalid(
                "an f32 recompute of a bf16 step runs on the CPU only; use --recompute-dtype \
                 auto or bf16 on a GPU"
                    .into(),
            )),
            Some(d) => Err(Error::Invalid(format!(
                "--recompute-dtype {}: use f32 or the compute dtype ({})",
                d.as_str(),
                self.dtype.as_str()
            ))),
        }
    }

    /// Whether the layer linears take bf16 products for f32 activations: a bf16 model whose
    /// layers are recomputed in f32.
    pub fn bf16_products(&self) -> bool {
        self.dtype == DType::BF16 && self.recompute_dtype() == DType::F32
    }
}

/// LoRA as an adapter method: `LoraSpec` places adapters by PEFT target names and layer range, and
/// seeds each from its place (`index` = layer · P + projection).
impl AdapterMethod for LoraSpec {
    fn targets(&self, projections: &[&'static str], label: &str) -> Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for t in &self.targets {
            if t == "all-linear" {
                return Ok(projections.to_vec());
            }
            match projections.iter().find(|p| *p == t) {
                Some(p) => out.push(*p),
                None => {
                    return Err(Error::Invalid(format!(
                        "LoRA target '{t}' is not a {label} linear; use one of {} or all-linear",
                        projections.join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }

    fn adapts_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|r| r.contains(&layer))
    }

    fn build(&self, base: &QLinear, i: usize, dt: DType, dev: &Device) -> Result<BoxedAdapter> {
        let lc = crate::lora::LoraConfig {
            r: self.r,
            alpha: self.alpha,
            rslora: self.rslora,
            dropout: self.dropout,
            dtype: dt,
        };
        let seed = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(i as u64);
        if self.use_dora {
            let dora = crate::lora::dora::Dora::new(base, &lc, seed)?.on_device(base, dev)?;
            return Ok(Box::new(dora));
        }
        let lora = crate::lora::lora::Lora::new(base, &lc, seed)?.on_device(base, dev)?;
        Ok(Box::new(lora))
    }

    fn numels(&self, out: usize, inp: usize) -> Vec<usize> {
        // A is (r, in), B is (out, r); DoRA's m is (out,).
        let mut v = vec![self.r * inp, out * self.r];
        if self.use_dora {
            v.push(out);
        }
        v
    }

    fn fused_only(&self) -> bool {
        // DoRA's weight norms are candle ops over the adapter's variables
        !self.use_dora
    }

    fn graph_bytes(&self, n: usize, out: usize, _inp: usize, s: usize) -> (usize, usize) {
        // On the CPU (nn::fused::lora_down / lora_up_add): h (N, r) in f32 and the sum with the
        // base output; the dropout mask is drawn again in backward, never stored, and no operand
        // is left with an unconsumed gradient. (A GPU runs candle's composite ops, which also keep
        // the (N, out) product and, with dropout, the mask and masked input: not counted here.)
        let mut graph = n * self.r * 4 + n * out * s;
        if self.use_dora {
            // u + (u - b) ⊙ (m/n - 1), one fused op's output on the CPU (the GPU's composite ops
            // keep a second (N, out) tensor: < 0.5 % of a 7B plan); n's terms are (out, r)-sized
            // and detached.
            graph += n * out * s;
        }
        (graph, 0)
    }

    fn frozen_bytes(&self, out: usize, _inp: usize) -> usize {
        // DoRA's ‖W‖² per row, f32.
        if self.use_dora {
            4 * out
        } else {
            0
        }
    }
}
