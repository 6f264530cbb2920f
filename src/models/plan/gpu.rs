//! What of a [`MemoryPlan`] lives on a GPU, and the device-only terms beside it.
use super::*;

/// The device-only parts of a plan on a GPU (`--device cuda`), and what of a [`MemoryPlan`] lives
/// on the device. Estimates from the design, not yet calibrated on a GPU (no GPU run exists): the
/// context and workspace figures are typical sizes for CUDA 12/13 on A100/H100-class cards; the
/// real context is measured (`qtune::nn::device::used_bytes`) before loading, and the peak of
/// everything allocated from candle's pool next to [`GpuTerms::device_total`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuTerms {
    /// CUDA context, loaded kernel modules (candle's and ours) and the cuBLAS handle.
    pub context: usize,
    /// cuBLAS workspace of the one stream.
    pub cublas_workspace: usize,
    /// The one dequantisation scratch per device: the largest 2-D weight it dequantises, in the
    /// compute dtype.
    pub dequant_scratch: usize,
    /// Score blocks of the device-generic attention (`nn::generic`): four live f32 (heads × T × T)
    /// blocks in its backward, T counting prompt rows (none with a KV prefix: the composite
    /// attention runs, counted in the plan).
    pub attention_scores: usize,
    /// The MLP activation's backward, which a GPU runs as candle's composite ops (the CPU plan
    /// counts the fused ones, nothing beyond their gradient): SwiGLU's `silu` and `mul` keep
    /// sigmoid(x), 1 - y and their product alive at once (3 N·I); exact GELU's `gelu_erf`
    /// builds its derivative from MLP-sized temporaries (10 N·I, measured on the CPU before
    /// the fused op replaced it there).
    pub mlp_backward: usize,
    /// What a GPU's composite ops keep beyond the CPU's fused ones (the plan counts those): a
    /// LayerNorm's f32 intermediates (five f32 values per element; in half precision its input's
    /// f32 copy and the cast back too) for each of a layer's norms, and the residual sum the
    /// fused ops do not store (a sequential block's `x + a`, a parallel one's `m + a`).
    pub composite_norms: usize,
    /// Stream-ordered allocator slack: freed blocks not yet reused, taken as 1/8 of the step's
    /// activation terms.
    pub allocator: usize,
    /// Plan bytes that stay in host memory: the token embedding table when it is not also the
    /// lm_head (rows are dequantised on the host and uploaded), AdamW's f32 state, and the
    /// checkpointed layer inputs (offloaded between forward and recompute).
    pub host_only: usize,
}

/// Estimated CUDA context with lazy module loading, modules and cuBLAS handle (bytes).
pub const CUDA_CONTEXT_BYTES: usize = 512 << 20;
/// cuBLAS's default workspace on Hopper (32 MiB; 4 MiB before), the larger one.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl GpuTerms {
    /// The terms for training `store` with `plan` on one GPU, `batch` sequences of `seq` tokens,
    /// activations in `dtype` (the dequantisation scratch holds weights in it).
    pub fn new(
        store: &WeightStore,
        plan: &MemoryPlan,
        batch: usize,
        seq: usize,
        dtype: candle_core::DType,
    ) -> Result<Self> {
        let spec = crate::models::spec_of(store)?;
        let (heads, layers) = (spec.heads, spec.layers);
        // checkpoints = (layers + 3) hidden states; the layers' inputs go to the host
        let offloaded = plan.checkpoints / (layers + 3) * layers;
        let [embed_name, head_name] = [spec.names.embed, spec.names.head];
        // a separate lm_head leaves the table on the host; a tied one is uploaded as the head
        let host_table = store.get(head_name).and(store.get(embed_name));
        let embed_host = host_table.map_or(0, |e| e.data.len());
        // the scratch grows to the largest weight a product dequantises
        let largest = store
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2 && host_table.is_none_or(|e| e.name != t.name))
            .map(|t| t.numel())
            .max()
            .unwrap_or(0);
        let activations = plan.checkpoints + plan.recompute + plan.logits_chunk;
        Ok(GpuTerms {
            context: CUDA_CONTEXT_BYTES,
            cublas_workspace: CUBLAS_WORKSPACE_BYTES,
            dequant_scratch: largest
                * if dtype == candle_core::DType::F32 {
                    4
                } else {
                    2
                },
            // The blocked attention sees the prompt rows as positions; with a prefix the composite
            // attention runs instead, its scores already in the plan's recompute graph.
            attention_scores: match plan.kv_prefix {
                0 => {
                    4 * 4
                        * crate::nn::generic::score_block_elems(
                            batch,
                            seq + plan.prompt_rows,
                            heads,
                        )
                }
                _ => 0,
            },
            mlp_backward: batch
                * (seq + plan.prompt_rows)
                * spec.ffn
                * dtype.size_in_bytes()
                * match spec.mlp {
                    Mlp::SwiGlu => 3,
                    Mlp::Gelu => 10,
                },
            composite_norms: {
                let (n, s) = (batch * (seq + plan.prompt_rows), dtype.size_in_bytes());
                let norms = 1 + usize::from(spec.names.mlp_norm.is_some());
                let ln = match spec.norm {
                    NormKind::Rms => 0,
                    // the composite's bytes per element less the fused one's output
                    NormKind::LayerNorm => norms * (20 + if s < 4 { 4 + s } else { 0 } - s),
                };
                n * spec.hidden * (ln + s)
            },
            allocator: activations / 8,
            host_only: embed_host + plan.optimizer + offloaded,
        })
    }

    /// Sum of the GPU-only terms.
    pub fn total(&self) -> usize {
        self.context
            + self.cublas_workspace
            + self.dequant_scratch
            + self.attention_scores
            + self.mlp_backward
            + self.composite_norms
            + self.allocator
    }

    /// Predicted peak allocated from the device's pool: [`GpuTerms::device_total`] without the
    /// context and cuBLAS workspace, which exist before loading and are measured then instead.
    pub fn allocated_total(&self, plan: &MemoryPlan) -> usize {
        self.device_total(plan) - self.context - self.cublas_workspace
    }

    /// Predicted device memory: the plan's device part (without the host-only bytes and the CPU
    /// kernels' tiles) plus the GPU-only terms.
    pub fn device_total(&self, plan: &MemoryPlan) -> usize {
        (plan.total() - plan.kernel_scratch).saturating_sub(self.host_only) + self.total()
    }
}

impl std::fmt::Display for GpuTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        mib_rows(
            f,
            &[
                ("CUDA context (estimate)", self.context),
                ("cuBLAS workspace", self.cublas_workspace),
                ("dequantisation scratch", self.dequant_scratch),
                ("attention score blocks", self.attention_scores),
                ("MLP activation backward", self.mlp_backward),
                ("composite norms and residual sums", self.composite_norms),
                ("allocator slack", self.allocator),
                ("(stays on the host)", self.host_only),
            ],
        )
    }
}
