//! Memory plan of a LoRA training step on any architecture: bytes by part, before anything is
//! loaded, from the model's [`Spec`].
//!
//! Weights are exact (the store's bytes, or the bytes quantisation at load will produce). The
//! activation terms count the tensors [`super::Transformer::train_grads`] keeps alive: the
//! checkpointed layer inputs, the candle graph of the one layer being recomputed (every
//! intermediate tensor of the shared layer forward is held by the graph until its backward ends)
//! plus the gradients in flight during that backward, and the logits of one cross-entropy chunk
//! with their graph. The parts are not all alive at once: the total takes the larger of the
//! step's two phases (the head, then the layers' backward; see `MemoryPlan::step_activations`).
use super::arch::{Architecture, Attention, Mlp, NormKind, Spec};
use super::falcon::FalconConfig;
use super::llama::{LlamaConfig, LlamaOptions};
use crate::lora::{prompt::PromptSpec, seam::AdapterMethod};
use crate::quant::{matmul::TILE_BYTES, nf4, QType};
use crate::store::{SourceFormat, WeightStore};
use crate::train::MomentStorage;
use crate::Result;

/// Bytes by part of one training step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Frozen weights as the kernels read them (quantised linears, embedding, norms, lm_head).
    pub weights: usize,
    /// LoRA A and B in the compute dtype.
    pub adapters: usize,
    /// The LoRA gradients a step returns (compute dtype).
    pub adapter_grads: usize,
    /// AdamW state: the f32 master copy `train::optim` keeps of every LoRA parameter, plus its two
    /// moments: f32 (8 bytes per parameter), or with 8-bit moments 2 bytes per parameter and two
    /// f32 absmax per block of 256 for tensors of at least 4096 elements (see
    /// [`MemoryPlan::with_optimizer`]).
    pub optimizer: usize,
    /// Checkpointed layer inputs, the final hidden state and the gradient passed between layers.
    pub checkpoints: usize,
    /// One layer's recompute graph and its backward's gradients in flight.
    pub recompute: usize,
    /// Quantised-matmul tiles per thread, and f32 copies of half-precision activations.
    pub kernel_scratch: usize,
    /// One cross-entropy chunk: its f32 logits, their softmax intermediates and gradient.
    pub logits_chunk: usize,
    /// The reference forward an objective runs before each step (DPO: the same rows, no graph
    /// kept beyond one layer; with `--precompute-ref` once per pair before training, and the
    /// log-probabilities live in the examples, 24 bytes a pair, in the baseline), 0 for SFT.
    /// Transient: it ends before the step's activations exist, so the total counts the larger
    /// of the two.
    pub reference: usize,
    /// Checkpoints and adapter gradients alive together at the worst layer of the backward
    /// (at most `checkpoints + adapter_grads`: early layers' checkpoints are consumed as later
    /// layers' gradients arrive).
    layer_phase: usize,
    /// What [`MemoryPlan::reference`] would be: one layer's forward graph, its input and output,
    /// and one cross-entropy chunk, over the step's rows.
    reference_bytes: usize,
    /// Elements of each LoRA tensor (every adapter's A and B): the optimizer term depends on them
    /// one by one, since small tensors keep f32 moments.
    lora_numels: Vec<usize>,
    /// Virtual rows before every sequence (prompt tuning / P-tuning): each layer sees them as
    /// positions, so every sequence-sized term above is for `seq + prompt_rows`.
    pub prompt_rows: usize,
    /// Key/value slots a prefix adds to every layer's attention (prefix tuning).
    pub kv_prefix: usize,
}

/// Optimizer-state bytes of LoRA tensors of these sizes.
fn optimizer_bytes(numels: &[usize], moments: MomentStorage) -> usize {
    numels.iter().map(|&n| moments.state_bytes(n)).sum()
}

/// The loaded weights: as stored, but for the float linears `opts.quant` quantises at load.
fn weight_bytes(store: &WeightStore, spec: &Spec, opts: &LlamaOptions) -> usize {
    let mut weights = 0;
    for t in &store.tensors {
        let float = matches!(t.qtype, QType::F32 | QType::F16 | QType::BF16);
        weights += match opts.quant {
            Some(q) if float && spec.is_linear(&t.name) => quantised_bytes(q, t.numel()),
            _ => t.nbytes(),
        };
    }
    weights
}

impl MemoryPlan {
    /// The plan for a step on `batch` sequences of `seq` tokens of the Llama in `store`, loaded
    /// with `opts` (adapter parameters count as zero without a LoRA spec).
    pub fn new(store: &WeightStore, opts: &LlamaOptions, batch: usize, seq: usize) -> Result<Self> {
        let spec = LlamaConfig::read(store)?.spec(store.format == SourceFormat::Gguf);
        Self::of_spec(store, &spec, opts, batch, seq)
    }

    /// The plan for a step of the model `spec` describes in `store`. Weights are exact; the
    /// recompute graph counts the tensors the shared layer
    /// ([`Transformer`](super::transformer::Transformer)) keeps for each block variant on the
    /// CPU: the norms (the fused RMSNorm and LayerNorm keep their output), the linears and their
    /// adapters, a fused qkv's per-head copies, rotary, attention, the MLP and the block's
    /// residual sum (the fused ops store no other). Calibrated on measured peaks for Llama
    /// (tests/llama_rss.rs) and Falcon (tests/falcon_rss.rs).
    pub fn of_spec(
        store: &WeightStore,
        spec: &Spec,
        opts: &LlamaOptions,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        Self::of_spec_prompt(store, spec, opts, None, (batch, seq))
    }

    /// [`Self::of_spec`] with a prompt-learning adapter `prompt` installed on the model: its rows
    /// lengthen every sequence by N (each layer sees N + T positions), its KV prefix adds N keys
    /// to every layer's attention (the generic attention op), and its tensors train.
    fn of_spec_prompt(
        store: &WeightStore,
        spec: &Spec,
        opts: &LlamaOptions,
        prompt: Option<&PromptSpec>,
        (batch, seq): (usize, usize),
    ) -> Result<Self> {
        // A sequence past a sliding window, or a prompt method PEFT cannot run on this model, is
        // refused before anything is loaded or planned.
        spec.check_window(seq)?;
        opts.check_recompute()?;
        if let Some(p) = prompt {
            super::check_prompt(p, spec, &store.path)?;
        }
        let weights = weight_bytes(store, spec, opts);
        let s = opts.dtype.size_in_bytes();
        // The recomputed layer's activations (f32 for a bf16 step on the CPU).
        let rs = opts.recompute_dtype().size_in_bytes();
        // Prompt learning: N rows before every sequence (every layer sees N + T positions), or an
        // N-slot KV prefix per layer; and its trainable tensors.
        let (prompt_rows, prefix, prompt_numels) = prompt_terms(prompt, spec);
        let seq = seq + prompt_rows;
        let n = batch * seq;
        let hidden = n * spec.hidden * s;
        // (out, in) per linear, in the spec's order.
        let dims: Vec<(usize, usize)> =
            (0..spec.projections.len()).map(|p| spec.shape(p)).collect();
        let method: Option<&dyn AdapterMethod> = opts.lora.as_ref().map(|x| x as _);
        let (mut lora_params, per_layer_lora, mut lora_numels) =
            adapter_layout(method, spec, &dims)?;
        let frozen = frozen_bytes(method, &per_layer_lora, &dims);
        let prompt_grads = prompt_numels.iter().sum::<usize>() * s;
        let layer_phase = backward_carry(method, &per_layer_lora, &dims, prompt_grads, hidden, s);
        lora_params += prompt_numels.iter().sum::<usize>();
        lora_numels.extend(prompt_numels);
        let shape = StepShape {
            spec,
            dims: &dims,
            method,
            batch,
            seq,
            s,
            rs,
            prefix,
            rank: opts.lora.as_ref().map_or(0, |l| l.r),
            cpu: opts.device.is_cpu(),
            // what `step::backward_layer` finds: a layer of fused ops alone (a linear's bias is
            // candle's add; so are a prefix's joins)
            own_walk: opts.device.is_cpu()
                && prefix == 0
                && method.is_none_or(|m| m.fused_only())
                && !(0..dims.len()).any(|pi| spec.has_bias(pi))
                && super::step::own_backward(),
        };
        // (graph, leftovers) of every adapter layout among the layers (none: no adapter), for a
        // layer recomputed in `rs` bytes an element, and run forward in `s` (the reference).
        let layouts = |shape: &StepShape| -> Vec<(usize, usize)> {
            match per_layer_lora.is_empty() {
                true => vec![shape.layer(&vec![false; dims.len()])],
                false => per_layer_lora.iter().map(|x| shape.layer(x)).collect(),
            }
        };
        let recomputed = layouts(&shape);
        let graph = recomputed.iter().map(|(g, lo)| g + lo).max().unwrap_or(0);
        let graph_rs = recomputed.iter().map(|(g, _)| *g).max().unwrap_or(0);
        let forward_shape = StepShape { rs: s, ..shape };
        let graph_only = layouts(&forward_shape)
            .iter()
            .map(|(g, _)| *g)
            .max()
            .unwrap_or(0);
        let rows = opts.ce_chunk.max(1).min(n);
        let ce_chunk = fused_ce_chunk(rows, spec.vocab, n, spec.hidden, shape.norm_elem(s));
        let (head_kept, head_transient) = match opts.device.is_cpu() {
            true => shape.head_pack(rows),
            false => (0, 0),
        };
        Ok(MemoryPlan {
            weights,
            adapters: lora_params * s + frozen,
            adapter_grads: lora_params * s,
            // `train::AdamW` keeps an f32 master copy beside the two moments (measured by
            // `qtune bench`: without it the plan missed the peak by 3 % on a 110M shape).
            optimizer: optimizer_bytes(&lora_numels, MomentStorage::F32),
            // l layer inputs, the final hidden state, its head gradient and the gradient passed on.
            checkpoints: (spec.layers + 3) * hidden,
            layer_phase,
            // A wider recompute also widens the layer's input, its variable copy and the
            // gradient coming in (the checkpoints above count them in the forward's dtype).
            // With the recompute pipelined (`step::pipelined`), the next layer's forward graph
            // exists beside this one's backward, and its input twice in `rs` (the checkpoint
            // widened and its variable copy) as that forward starts.
            recompute: graph
                + shape.in_flight()
                + 3 * n * spec.hidden * (rs - s)
                + usize::from(super::step::pipelined(shape.cpu))
                    * (graph_rs + 2 * n * spec.hidden * rs),
            // The f32 conversions of half-precision products count whole, beside the gradients
            // in flight: their buffers are thread-local and kept between calls (QLinear's f32
            // output, the bf16 kernels' packed activations), resident from the first product
            // on. Subtracting them from the in-flight gradients (as a measured overlap within a
            // step, where kept buffers never show as growth) left the ~100M shape's bf16 step
            // over the plan by 16 KiB a token with glibc's mmap threshold pinned (seq 128 / 256
            // / 512: +6.3 / +8.6 / +12.1 MiB; f32 within 0.3 %) (session 8).
            kernel_scratch: shape.kernel_scratch() + head_kept,
            // logits, shifted, exp (graph) and the gradient of the logits with one temporary; the
            // final norm's graph as one decoder norm per element.
            logits_chunk: ce_chunk + head_transient,
            reference: 0,
            // A no-graph forward (each layer's output detached) holds one layer's graph while it
            // runs, its input and output, the kernels' scratch, and a cross-entropy chunk's forward.
            reference_bytes: graph_only + 2 * hidden + ce_chunk,
            lora_numels,
            prompt_rows,
            kv_prefix: prefix,
        })
    }

    /// Everything but the weights: what a training step adds on top of the loaded model.
    pub fn step_bytes(&self) -> usize {
        self.total() - self.weights
    }

    /// Sum of all parts; the transient reference forward counts only where it exceeds the
    /// step's activations (it ends before they exist).
    pub fn total(&self) -> usize {
        self.weights
            + self.adapters
            + self.optimizer
            + self.kernel_scratch
            + self.step_activations().max(self.reference)
    }

    /// What exists only during the training step, at its larger phase: the head (every
    /// checkpoint, the final hidden state and its gradient, one cross-entropy chunk: nothing of
    /// the layers' backward exists yet) or the layers' backward (one layer's recompute graph and
    /// gradients in flight, over the checkpoints and adapter gradients alive at its worst layer).
    /// The adapter gradients a step returns outlive both (the step ends holding all of them).
    /// Adding the phases (the logits chunk to the backward) overstated tests/llama_rss.rs's f32
    /// step by 4.0 MiB; its head phase is 15 MiB, its backward 59 MiB.
    fn step_activations(&self) -> usize {
        let head = self.checkpoints + self.logits_chunk;
        let layers = self.layer_phase + self.recompute;
        head.max(layers).max(self.adapter_grads)
    }
}

/// True when `store` holds a Falcon (config `model_type` falcon/RefinedWeb*, or GGUF `falcon`).
pub fn is_falcon(store: &WeightStore) -> bool {
    match store.format {
        SourceFormat::Gguf => {
            crate::format::gguf::find(&store.gguf_metadata, "general.architecture")
                .and_then(crate::format::gguf::Value::as_str)
                == Some("falcon")
        }
        _ => store
            .config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(|v| v.as_str())
            .is_some_and(|t| matches!(t, "falcon" | "RefinedWeb" | "RefinedWebModel")),
    }
}

impl MemoryPlan {
    /// This plan with (or without) an objective's reference forward before each step (the
    /// constructors count none).
    pub fn with_reference_forward(mut self, yes: bool) -> Self {
        self.reference = if yes { self.reference_bytes } else { 0 };
        self
    }

    /// This plan with the optimizer term for moments stored as `moments` (the constructors count
    /// f32 moments).
    pub fn with_optimizer(mut self, moments: MomentStorage) -> Self {
        self.optimizer = optimizer_bytes(&self.lora_numels, moments);
        self
    }

    /// The plan for the model in `store`, Llama or Falcon by its config / GGUF architecture.
    pub fn for_store(
        store: &WeightStore,
        opts: &LlamaOptions,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        Self::of_spec(store, &super::spec_of(store)?, opts, batch, seq)
    }

    /// [`Self::for_store`] with a prompt-learning adapter `prompt` installed on the model: its rows
    /// lengthen every sequence by N (each layer sees N + T positions), its KV prefix adds N keys
    /// to every layer's attention (the generic attention op), and its tensors train.
    pub fn for_store_prompt(
        store: &WeightStore,
        opts: &LlamaOptions,
        prompt: Option<&PromptSpec>,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        Self::of_spec_prompt(store, &super::spec_of(store)?, opts, prompt, (batch, seq))
    }

    /// The plan for a step of the Falcon in `store` (same parts as [`MemoryPlan::new`]).
    pub fn falcon(
        store: &WeightStore,
        opts: &LlamaOptions,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        let spec = FalconConfig::read(store)?.spec(store.format == SourceFormat::Gguf);
        Self::of_spec(store, &spec, opts, batch, seq)
    }
}

/// The shape of one training step as the activation terms read it: the model, its linears and
/// their adapter method, `batch` sequences of `seq` positions (prompt rows included), `s` bytes
/// an element, and a KV prefix of `prefix` slots (0: none).
struct StepShape<'a> {
    spec: &'a Spec,
    /// (out, in) per linear, in the spec's order.
    dims: &'a [(usize, usize)],
    method: Option<&'a dyn AdapterMethod>,
    batch: usize,
    seq: usize,
    s: usize,
    /// Bytes an element of the recomputed layer (`LlamaOptions::recompute_dtype`).
    rs: usize,
    prefix: usize,
    /// LoRA's rank (0: no LoRA).
    rank: usize,
    /// The step runs on the CPU (the fused ops; a GPU runs candle's composite ones).
    cpu: bool,
    /// The layers' backward is our walk over their fused ops (`nn::fused::tape`), not candle's.
    own_walk: bool,
}

impl StepShape<'_> {
    /// Whether the forward's activations are in half precision (the f32 kernels convert them).
    fn half(&self) -> bool {
        self.s < 4
    }

    /// Bytes a norm keeps per hidden element of `s` bytes.
    fn norm_elem(&self, s: usize) -> usize {
        match self.spec.norm {
            // The fused RMSNorm's and LayerNorm's output only (nn::fused; statistics are
            // recomputed in backward; a GPU's composite LayerNorm is in `GpuTerms`).
            NormKind::Rms | NormKind::LayerNorm => s,
        }
    }

    /// (graph, leftovers) of one layer whose linears carry an adapter where `lora` is set (bytes),
    /// recomputed in `rs` bytes an element.
    fn layer(&self, lora: &[bool]) -> (usize, usize) {
        let (spec, s) = (self.spec, self.rs);
        let half = s < 4;
        let (b, t) = (self.batch, self.seq);
        let (n, c, i) = (b * t, spec.hidden, spec.ffn);
        let (h, k, d) = (spec.heads, spec.kv_heads, spec.head_dim);
        let (mut proj, mut left) = (0, 0);
        for (pi, &(o, inp)) in self.dims.iter().enumerate() {
            // The base output, except where an adapter on the CPU runs a bias-free base's product
            // inside its own op (`nn::fused::lora_linear_up`): then it is never a tensor.
            let fused = lora[pi] && self.method.is_some() && self.cpu && !spec.has_bias(pi);
            if !fused {
                proj += n * o * s;
            }
            if let (true, Some(m)) = (lora[pi], self.method) {
                let (g, lo) = m.graph_bytes(n, o, inp, s);
                proj += g;
                left += lo;
            }
        }
        let (qs, ks) = (n * h * d * s, n * k * d * s);
        // A fused qkv: the reshape of a narrowed view copies, the per-head transpose again.
        let split = match spec.attention {
            Attention::Fused(_) => 2 * (qs + 2 * ks),
            Attention::Split => 0,
        };
        let [rope, heads, scores, _] = fused_attention_terms(b, t, h, k, d, s);
        // A KV prefix: the broadcast prefix and the keys/values joined with it (B, KVH, N+T,
        // D) twice each, the f32 bias over N + T keys, and the composite attention
        // (`nn::causal_attention`, the only one taking more keys than queries) in the graph.
        let scores = scores
            + match self.prefix {
                0 => 0,
                p => {
                    2 * b * k * (2 * p + t) * d * s
                        + b * t * (p + t) * 4
                        + composite_attention_graph(b, t, p + t, h, k, d, s)
                }
            };
        // SwiGLU: the fused gate's output; GELU: its output; then the block's output, one
        // fused residual sum (a sequential block's `x + a` is never stored; a GPU's two candle
        // sums are in `GpuTerms`).
        let mlp = match spec.mlp {
            Mlp::SwiGlu => n * i * s,
            Mlp::Gelu => n * i * s,
        } + n * c * s;
        // the surrogate's f32 copies (half) and product.
        let surrogate = n * c * 4 * if half { 3 } else { 1 };
        let norms = (1 + usize::from(spec.names.mlp_norm.is_some())) * n * c * self.norm_elem(s);
        let graph = norms + proj + split + rope + heads + scores + mlp + surrogate;
        // candle's backward gives every operand of its own binary ops a gradient, wanted or
        // not; one nothing consumes stays in the gradient store until the layer's backward
        // ends. Our nn ops pass constants through `mul_const` / `add_const` (no such
        // gradient); what remains is the adapters' (`left`) and the layer input's own
        // gradient, summed over its two consumers.
        (graph, left + 3 * n * c * s)
    }

    /// Gradients in flight during one layer's backward (bytes).
    fn in_flight(&self) -> usize {
        let spec = self.spec;
        let (b, t, s) = (self.batch, self.seq, self.rs);
        let (n, c, i) = (b * t, spec.hidden, spec.ffn);
        let (h, k, d) = (spec.heads, spec.kv_heads, spec.head_dim);
        // Backward in flight: candle frees a node's gradient once it is passed on, but a binary
        // op's backward holds the incoming gradient, the product for each operand and a
        // zero-initialised accumulator: about four of the largest activation gradients coexist.
        // Our walk keeps a first part as the sum (no zero tensor): three, where a second part
        // meets the first (measured, tests/falcon_rss.rs: its peak 2.5 MiB under candle's walk,
        // N·I f32 being 4.25 MiB there).
        let parts = if self.own_walk { 3 } else { 4 };
        // With a prefix the composite attention's (B, H, T, N+T) f32 score gradients join them.
        let score_grad = match self.prefix {
            0 => 0,
            p => b * h * t * (p + t) * 4,
        };
        // The MLP activation's backward adds nothing here: on the CPU both are fused ops with
        // their own one-pass backward (`nn::fused::swiglu`, `nn::fused::gelu_erf`) that keep
        // only their inputs, and whose gradient is one of these tensors. (Until session 9
        // Falcon ran candle's `gelu_erf`, whose composite backward peaked at 10 N·I more than
        // its graph, measured alone in tests/falcon_rss.rs's shape; a GPU still runs candle's
        // ops: `GpuTerms::mlp_backward` counts them there.)
        parts * (n * i * s).max(n * c * 4).max(score_grad)
            + fused_attention_terms(b, t, h, k, d, s)[3]
    }

    /// The head's dlogits packed in bf16 by the bf16 input-gradient kernel (a bf16 step on a CPU
    /// with bf16 kernels; the caller asks on the CPU only), as (kept, transient) bytes: a pack within the kept size stays in the
    /// calling thread's pack buffer, which the layers' packs (`n × widest × 2` bytes, in
    /// `kernel_scratch`) already hold part of; a larger one exists during the head's backward.
    fn head_pack(&self, rows: usize) -> (usize, usize) {
        use crate::quant::matmul_bf16::{bwd_pack_bytes, has_bf16_kernels, PACK_KEEP_WORDS};
        if !self.half() || !has_bf16_kernels() {
            return (0, 0);
        }
        let pack = bwd_pack_bytes(rows, self.spec.vocab);
        if pack > PACK_KEEP_WORDS * 4 {
            return (0, pack);
        }
        let layers = self.batch * self.seq * self.widest() * 2;
        (pack.saturating_sub(layers), 0)
    }

    /// The widest side of any layer linear (the hidden size without linears).
    fn widest(&self) -> usize {
        let sides = self.dims.iter().map(|&(o, inp)| o.max(inp));
        sides.max().unwrap_or(self.spec.hidden)
    }

    /// Quantised-matmul tiles per thread, and the f32 copies of a half-precision input and output
    /// QLinear converts around the kernel (bytes).
    fn kernel_scratch(&self) -> usize {
        let (dims, c, i) = (self.dims, self.spec.hidden, self.spec.ffn);
        let widest = self.widest();
        let (n, half) = (self.batch * self.seq, self.half());
        // The f32 product a half step's products round from, which is also the one an adapted
        // linear's fused op adds its up projection to (`QLinear::with_product`, any dtype): one
        // buffer of the widest output; and a half step's f32 copy of the widest input.
        let product = match half || (self.rank > 0 && self.cpu) {
            true => n * widest * 4,
            false => 0,
        };
        // With the recompute pipelined (`step::pipelined`) a second thread runs whole forward
        // ops beside the backward's: two sets. A batch's two streams (`step::streams`) need no
        // term: each thread's buffers then hold its half's rows, one batch's between them, as
        // the two halves' graphs, which meet at every layer of the backward, are one batch's
        // graph (tests/llama_rss.rs runs at batch 2).
        let convert = (product + if half { n * c.max(i) * 4 } else { 0 })
            * (1 + usize::from(super::step::pipelined(self.cpu)));
        // AMX's bf16 tiles (64 rows of W) can be larger than the f32 kernels' budget.
        let k = dims.iter().map(|&(_, inp)| inp).max().unwrap_or(c);
        // AMX's tiles, and every bf16 kernel's staging block of x rows.
        let amx = if half {
            use crate::quant::matmul_bf16::{amx_scratch_bytes, fwd_stage_bytes};
            amx_scratch_bytes(k) + fwd_stage_bytes(k)
        } else {
            0
        };
        // One fused-attention task a thread: its score blocks and, in a half step, bf16 packs.
        let attn = crate::nn::fused::attention_task_bytes(self.seq, self.spec.head_dim, half);
        // LoRA's bf16 products (a half step): a weight operand and a task's packs a thread.
        let lora = match half && self.rank > 0 {
            true => crate::nn::fused::lora_bf16_scratch_bytes(widest, self.rank),
            false => 0,
        };
        rayon::current_num_threads() * ((2 * TILE_BYTES).max(amx) + attn) + convert + lora
    }
}

/// The adapters' constant state (DoRA's ‖W‖² rows) over every layer (bytes).
fn frozen_bytes(
    method: Option<&dyn AdapterMethod>,
    per_layer_lora: &[Vec<bool>],
    dims: &[(usize, usize)],
) -> usize {
    method.map_or(0, |m| {
        let per = |row: &Vec<bool>| -> usize {
            (row.iter().zip(dims))
                .filter(|(on, _)| **on)
                .map(|(_, &(o, i))| m.frozen_bytes(o, i))
                .sum()
        };
        per_layer_lora.iter().map(per).sum()
    })
}

/// A prompt-learning adapter's rows before the tokens, its KV prefix length, and its trainable
/// tensors' element counts (none without one).
fn prompt_terms(
    prompt: Option<&crate::lora::prompt::PromptSpec>,
    spec: &Spec,
) -> (usize, usize, Vec<usize>) {
    use crate::lora::prompt::PromptMethod;
    let Some(p) = prompt else {
        return (0, 0, Vec::new());
    };
    let d = super::prompt_dims(spec);
    let numels = p
        .shapes(&d)
        .iter()
        .map(|(_, s)| s.iter().product())
        .collect();
    match p.method {
        PromptMethod::PrefixTuning(_) => (0, p.num_virtual_tokens, numels),
        _ => (p.num_virtual_tokens, 0, numels),
    }
}

/// Which linears of each layer carry an adapter of `method` (shapes `dims[p] = (out, in)`), the
/// adapter parameter count, and every trainable tensor's element count (LoRA: A then B).
fn adapter_layout(
    method: Option<&dyn AdapterMethod>,
    spec: &Spec,
    dims: &[(usize, usize)],
) -> Result<(usize, Vec<Vec<bool>>, Vec<usize>)> {
    let (mut params, mut rows, mut numels) = (
        0usize,
        vec![vec![false; dims.len()]; spec.layers],
        Vec::new(),
    );
    let Some(m) = method else {
        return Ok((params, rows, numels));
    };
    let names: Vec<&'static str> = spec.projections.iter().map(|p| p.0).collect();
    let targets = m.targets(&names, spec.label)?;
    for (li, row) in rows.iter_mut().enumerate() {
        if !m.adapts_layer(li) {
            continue;
        }
        for (pi, name) in names.iter().enumerate() {
            if targets.contains(name) {
                row[pi] = true;
                let e = m.numels(dims[pi].0, dims[pi].1);
                params += e.iter().sum::<usize>();
                numels.extend(e);
            }
        }
    }
    Ok((params, rows, numels))
}

/// Checkpoints and adapter gradients alive together at the worst layer of the backward (bytes),
/// for `hidden` bytes a checkpoint (B·T·C·s) and `prompt_grads` bytes of prompt-tensor gradients
/// (every layer's backward adds to those, so they exist from the first one on).
///
/// While layer li is recomputed (the backward runs L-1 down to 0) the checkpoints
/// still saved are li + 1 (its own input included) and the variable copy of that input
/// the recompute differentiates, plus the final hidden state (the head's input
/// variable) and the gradient g coming in; the adapter gradients are
/// those of layers li..L (and the prompt tensors'). Both ends of that trade matter:
/// the last layer has every checkpoint and one layer's gradients, the first every
/// gradient and four checkpoint-sized tensors. Counting both terms whole overstated a step by
/// 7.0 MiB (of 55) in tests/llama_rss.rs (f32), where a probe of the step measured
/// 55 MiB = 3 checkpoint-sized tensors + 7 layers' gradients + one layer's backward
/// (43.8 MiB, the layer's input copy and gradients included).
fn backward_carry(
    method: Option<&dyn AdapterMethod>,
    per_layer_lora: &[Vec<bool>],
    dims: &[(usize, usize)],
    prompt_grads: usize,
    hidden: usize,
    s: usize,
) -> usize {
    let grads = |row: &Vec<bool>| -> usize {
        (row.iter().zip(dims))
            .filter(|(on, _)| **on)
            .map(|(_, &(o, i))| method.map_or(0, |m| m.numels(o, i).iter().sum::<usize>()))
            .sum::<usize>()
            * s
    };
    let layer_grads: Vec<usize> = per_layer_lora.iter().map(grads).collect();
    (0..layer_grads.len())
        .map(|li| (li + 4) * hidden + prompt_grads + layer_grads[li..].iter().sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// Rotary, attention and attention-backward terms (bytes) with the fused ops of `nn::fused`, for
/// `n = b·t` tokens, `h` query and `k` kv heads of `d` (`s` bytes an element).
/// Rotary keeps its output and the contiguous copy of its input (a transposed head view);
/// attention keeps its output, the transposed copy the output projection reads, the contiguous
/// copy of V and one f32 logsumexp per query row: no (T×T) matrix outlives a block of query rows,
/// and K/V are read per group without being repeated. Its backward holds dQ, dK, dV in f32.
fn fused_attention_terms(b: usize, t: usize, h: usize, k: usize, d: usize, s: usize) -> [usize; 4] {
    let n = b * t;
    let (qs, ks) = (n * h * d * s, n * k * d * s);
    [
        2 * (qs + ks),
        2 * qs + ks,
        b * h * t * 4,
        n * (h + 2 * k) * d * 4,
    ]
}

/// Bytes the composite attention's graph keeps for `b` rows of `t` queries over `sk` keys (`h`
/// query heads, `k` KV heads, head size `d`, `s` bytes an element): the transposed keys' copy (and
/// the repeated keys and values with GQA), the scores in the compute dtype, their f32 copy in half
/// precision, the scaled, masked, shifted, exponentiated and normalised f32 scores, the
/// probabilities cast back in half precision, and the output.
fn composite_attention_graph(
    b: usize,
    t: usize,
    sk: usize,
    h: usize,
    k: usize,
    d: usize,
    s: usize,
) -> usize {
    let e = b * h * t * sk;
    let rep = if k != h { 2 * b * h * sk * d * s } else { 0 };
    let half = if s < 4 { 4 + s } else { 0 };
    b * h * sk * d * s + rep + e * (s + 5 * 4 + half) + b * h * t * d * s
}

/// The head's working set (bytes): the fused cross-entropy's one buffer of `rows` f32 logits
/// (reused in place for their gradient), the f32 copy of the `n` normalised hidden rows it reads
/// and their f32 gradient, plus `norm_graph` bytes per hidden element that the final norm's graph
/// keeps over all `n` rows.
fn fused_ce_chunk(rows: usize, v: usize, n: usize, c: usize, norm_graph: usize) -> usize {
    rows * v * 4 + n * c * (8 + norm_graph)
}

/// Bytes `numel` weights take once quantised to `q` at load.
fn quantised_bytes(q: QType, numel: usize) -> usize {
    if q == QType::NF4 {
        let blocks = numel.div_ceil(nf4::NF4_BLOCK);
        numel / 2 + blocks + 4 * blocks.div_ceil(nf4::NF4_NESTED_BLOCK) + 4 * (256 + 16 + 1)
    } else {
        q.bytes_for(numel).unwrap_or(numel * 4)
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rows = vec![
            ("quantised weights", self.weights),
            ("LoRA adapters", self.adapters),
            ("LoRA gradients", self.adapter_grads),
            ("optimizer state", self.optimizer),
            ("checkpointed activations", self.checkpoints),
            ("one-layer recompute", self.recompute),
            ("kernel scratch", self.kernel_scratch),
            ("logits chunk", self.logits_chunk),
        ];
        // The parts above that are never alive together (see `step_activations`).
        let parts = self.adapter_grads + self.checkpoints + self.recompute + self.logits_chunk;
        rows.push(("less: not alive at once", parts - self.step_activations()));
        if self.reference > 0 {
            rows.push(("reference fwd (transient)", self.reference));
        }
        rows.push(("total", self.total()));
        mib_rows(f, &rows)
    }
}

/// One `name  size MiB` line a row, no newline after the last.
fn mib_rows(f: &mut std::fmt::Formatter<'_>, rows: &[(&str, usize)]) -> std::fmt::Result {
    for (i, (name, b)) in rows.iter().enumerate() {
        let nl = if i + 1 < rows.len() { "\n" } else { "" };
        write!(f, "{name:<26} {:>10.1} MiB{nl}", *b as f64 / 1048576.0)?;
    }
    Ok(())
}

mod gpu;
pub use gpu::{GpuTerms, CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES};

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
