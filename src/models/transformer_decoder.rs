//! [`crate::models::Decoder`] for [`Transformer`]: the blocks the shared loss and checkpointed training
//! step (`models::step`) run.
use super::*;

/// The shared blocks behind the checkpointed step, forward and loss in `models`.
impl crate::models::Decoder for Transformer {
    type Ctx = Ctx;

    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn hidden_size(&self) -> usize {
        self.spec.hidden
    }
    fn vocab_size(&self) -> usize {
        self.spec.vocab
    }
    fn ce_chunk(&self) -> usize {
        self.opts.ce_chunk
    }
    fn checkpoint(&self) -> bool {
        self.opts.checkpoint
    }
    fn split_batch(&self) -> bool {
        // Parallel blocks (Falcon) gained nothing from the streams at Falcon-7B (0.95-1.00x,
        // session 20), and at tests/falcon_rss.rs's shape they moved the measured step peak
        // ~1 MiB further under the plan: one stream there.
        self.spec.residual == Residual::Sequential
    }
    fn recompute_dtype(&self) -> DType {
        self.opts.recompute_dtype()
    }
    fn prompt_len(&self) -> usize {
        self.prompt_rows()
    }
    fn embed(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let (dt, dev) = (self.opts.dtype, &self.opts.device);
        let x = crate::models::embed_rows(&self.embed, ids, (b, t), dt, dev, &self.path)?;
        let Some(rows) = self.hooks.as_ref().and_then(|h| h.prompt_rows()) else {
            return Ok(x);
        };
        // Prompt tuning: (N, C) rows before every sequence.
        (|| {
            let (n, c) = rows.dims2()?;
            let r = rows.to_dtype(dt)?.to_device(dev)?.unsqueeze(0)?;
            Tensor::cat(&[&r.broadcast_as((b, n, c))?.contiguous()?, &x], 1)
        })()
        .map_err(self.cerr("prompt rows"))
    }
    fn ctx(&self, b: usize, t: usize, mask: Option<&Tensor>) -> Result<Ctx> {
        let (np, nk) = (self.prompt_rows(), self.prefix_len());
        let (inv, dt) = (self.spec.inv_freq(), self.opts.dtype);
        self.spec.check_window(nk + np + t)?;
        if np == 0 && nk == 0 {
            let (cos, sin, bias) =
                crate::models::rope_and_bias(b, t, mask, &inv, dt, &self.opts.device)?;
            return Ok(Ctx { cos, sin, bias });
        }
        // Prompt rows are real positions (unmasked); a KV prefix shifts rotary by its length and
        // is visible to every query.
        let t2 = np + t;
        let run = || -> candle_core::Result<Ctx> {
            let mask = match mask {
                Some(m) if np > 0 => {
                    let ones = Tensor::ones((b, np), m.dtype(), m.device())?;
                    Some(Tensor::cat(&[&ones, m], 1)?)
                }
                m => m.cloned(),
            };
            let (cos, sin) = nn::rope_tables_of(nk + t2, &inv, dt)?;
            let (cos, sin) = (cos.narrow(0, nk, t2)?, sin.narrow(0, nk, t2)?);
            let mut bias = nn::attention_bias(mask.as_ref(), b, t2)?;
            if nk > 0 {
                let (bb, one, _, _) = bias.dims4()?;
                let z = Tensor::zeros((bb, one, t2, nk), bias.dtype(), bias.device())?;
                bias = Tensor::cat(&[&z, &bias], 3)?;
            }
            let bias = bias.to_device(&self.opts.device)?;
            Ok(Ctx { cos, sin, bias })
        };
        run().map_err(self.cerr("per-call constants"))
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
        self.norm(x, &self.final_norm)
    }
    fn lm_head(&self) -> &QLinear {
        &self.lm_head
    }
    fn lora_vars(&self, layer: Option<usize>) -> Vec<(String, Var)> {
        self.adapter_vars(layer)
    }
    fn sequence_vars(&self) -> Vec<(String, Var)> {
        self.hooks.as_ref().map_or_else(Vec::new, |h| h.params())
    }
    fn next_step_key(&self) -> u64 {
        // One key range per step; layer li, linear pi adds li*P+pi.
        self.step
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(1 << 32)
    }
}
