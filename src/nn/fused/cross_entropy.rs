//! Cross-entropy through the frozen lm_head, chunk by chunk: logits never exist for all tokens.
use super::exp::exp_shift_sum;
use super::*;

/// `(Σ over tokens with label >= 0 of -log softmax(hidden·Wᵀ + bias)[label], that token count)`
/// for `hidden (N, C)` (or `(.., C)`: N rows however shaped) and `labels (N)` (-100, or any
/// negative, ignores a token), through the frozen `lm_head` (V, C).
/// Logits exist `chunk` rows at a time only: the forward keeps a logsumexp per token, the
/// backward recomputes each chunk's logits, forms `softmax - onehot` and maps it back through
/// lm_head's input-gradient kernel. The loss is an f32 scalar whatever hidden's dtype;
/// differentiable in hidden only.
pub fn cross_entropy_chunked(
    hidden: &Tensor,
    lm_head: &QLinear,
    labels: &[i64],
    chunk: usize,
) -> Result<(Tensor, usize)> {
    check_cpu_or_cuda("cross_entropy_chunked", &[hidden])?;
    let c = hidden.dims().last().copied().unwrap_or(0);
    let n = hidden.elem_count() / c.max(1);
    let v = lm_head.out_features();
    if c != lm_head.in_features() || labels.len() != n {
        bail!(
            "cross_entropy_chunked: hidden {:?} (N, C) and {} labels do not fit lm_head ({v} x {})",
            hidden.dims(),
            labels.len(),
            lm_head.in_features()
        );
    }
    let mut n_tokens = 0;
    for (i, &l) in labels.iter().enumerate() {
        if l >= 0 && l as usize >= v {
            bail!("cross_entropy_chunked: label {l} at token {i} is outside the vocabulary 0..{v}");
        }
        n_tokens += usize::from(l >= 0);
    }
    let bias = match lm_head.bias() {
        None => None,
        Some(b) => Some(Arc::new(const_f32(b, "cross_entropy_chunked")?)),
    };
    let op = CrossEntropyOp {
        w: lm_head.weight().clone(),
        bias,
        labels: Arc::new(labels.to_vec()),
        chunk: chunk.max(1),
        lse: Mutex::new(None),
        #[cfg(feature = "cuda")]
        gpu: lm_head.gpu_cache().clone(),
        #[cfg(feature = "cuda")]
        lse_gpu: Mutex::new(None),
    };
    let loss = tape::apply1(&hidden.contiguous()?, op)?;
    Ok((loss, n_tokens))
}

struct CrossEntropyOp {
    /// lm_head weight (V, C), quantised or f32, never a graph node.
    w: Arc<StoredTensor>,
    bias: Option<Arc<Vec<f32>>>,
    labels: Arc<Vec<i64>>,
    chunk: usize,
    /// (N) logsumexp of each token's logits, from the forward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
    /// lm_head's device copies (shared with its QLinear).
    #[cfg(feature = "cuda")]
    gpu: Arc<crate::cuda::GpuWeightCache>,
    /// The logsumexps of a forward on the GPU, kept there for the backward.
    #[cfg(feature = "cuda")]
    lse_gpu: Mutex<Option<Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>>,
}

impl CrossEntropyOp {
    /// logits (rows, V) = h (rows, C) · Wᵀ + bias. With bf16 activations (`half`) through the
    /// bf16 kernels, as every other linear of a bf16 step (h is exactly bf16 then; the logits stay
    /// f32): the head is 22 % of a ~100M model's linear FLOPs. The backward recomputes the logits
    /// the same way, so its softmax matches the forward's logsumexp; its f32 dlogits map back
    /// through the bf16 input-gradient kernel too (rounded to bf16 there, as every other linear's
    /// incoming gradient in a bf16 step; through the f32 kernel they were 15-18 % of the ~100M
    /// bf16 step in a profile, session 13).
    fn logits(&self, h: &[f32], rows: usize, out: &mut [f32], half: bool) {
        let w = self.w.matrix();
        if half {
            qmatmul_fwd_bf16(h, rows, &w, out);
        } else {
            qmatmul_fwd(h, rows, &w, out);
        }
        if let Some(b) = &self.bias {
            out.par_chunks_mut(w.rows)
                .for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(x, b)| *x += b));
        }
    }
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "qtune-cross-entropy-chunked"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        let h = f32_of(s, l, self.name())?;
        let half = s.dtype() == DType::BF16;
        let (vocab, c) = (self.w.shape[0], self.w.shape[1]);
        let n = self.labels.len();
        let mut lse = vec![0f32; n];
        // logits: (chunk, V), reused
        let mut logits = vec![0f32; self.chunk.min(n) * vocab];
        let mut loss = 0f64;
        for (ci, lse) in lse.chunks_mut(self.chunk).enumerate() {
            let (r0, rows) = (ci * self.chunk, lse.len());
            let lg = &mut logits[..rows * vocab];
            self.logits(&h[r0 * c..(r0 + rows) * c], rows, lg, half);
            loss += lg
                .par_chunks_mut(vocab)
                .zip(lse.par_iter_mut())
                .zip(self.labels[r0..r0 + rows].par_iter())
                .map(|((row, lse), &label)| {
                    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let picked = if label < 0 {
                        0.0
                    } else {
                        row[label as usize] as f64
                    };
                    // the row is not needed after (the backward recomputes the logits); an f32
                    // step keeps its f64 sum of libm's exps
                    let sum = match half {
                        true => exp_shift_sum(row, m, true) as f64,
                        false => row.iter().map(|&x| ((x - m) as f64).exp()).sum(),
                    };
                    let z = m as f64 + sum.ln();
                    *lse = z as f32;
                    if label < 0 {
                        0.0
                    } else {
                        z - picked
                    }
                })
                .sum::<f64>();
        }
        *self.lse.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    /// The same on the GPU (src/cuda/ops.rs `cross_entropy_fwd`); the loss is summed in f64 on the
    /// host from per-row values.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CudaOut {
        let head = ce_head(&self.gpu, &self.w, &self.bias, &self.labels, self.chunk);
        let (loss, lse) = crate::cuda::ops::cross_entropy_fwd(&head, (s, l))?;
        *self.lse_gpu.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        let out = s.device.clone_htod(&[loss as f32])?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, s.device.clone()),
            Shape::from(()),
        ))
    }

    /// dh = g·(softmax(logits) - onehot(label))·W per chunk; ignored rows give zero.
    fn bwd(&self, h: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() {
            let Some(lse) = self.lse_gpu.lock().expect("lse lock poisoned").clone() else {
                bail!("cross_entropy_chunked: backward before forward");
            };
            let g: f32 = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
            let op = CrossEntropyBwdCuda {
                gpu: self.gpu.clone(),
                w: self.w.clone(),
                bias: self.bias.clone(),
                labels: self.labels.clone(),
                chunk: self.chunk,
                lse,
                g,
            };
            return Ok(Some(h.contiguous()?.apply_op1_no_bwd(&op)?));
        }
        let Some(lse) = self.lse.lock().expect("lse lock poisoned").clone() else {
            bail!("cross_entropy_chunked: backward before forward");
        };
        let g: f32 = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
        let (vocab, c) = (self.w.shape[0], self.w.shape[1]);
        let n = self.labels.len();
        let half = h.dtype() == DType::BF16;
        let dh = with_f32(h, self.name(), |h| {
            let mut dh = zeroed(n * c, 0f32);
            let mut logits = vec![0f32; self.chunk.min(n) * vocab];
            let w = self.w.matrix();
            for (ci, dh) in dh.chunks_mut(self.chunk * c).enumerate() {
                let (r0, rows) = (ci * self.chunk, dh.len() / c);
                let lg = &mut logits[..rows * vocab];
                self.logits(&h[r0 * c..(r0 + rows) * c], rows, lg, half);
                // lg becomes dlogits in place: (rows, V)
                lg.par_chunks_mut(vocab)
                    .zip(self.labels[r0..r0 + rows].par_iter())
                    .zip(lse[r0..r0 + rows].par_iter())
                    .for_each(|((row, &label), &z)| {
                        if label < 0 {
                            row.fill(0.0);
                            return;
                        }
                        exp_shift_sum(row, z, half);
                        row.iter_mut().for_each(|x| *x *= g);
                        row[label as usize] -= g;
                    });
                if half {
                    qmatmul_bwd_input_bf16(lg, rows, &w, dh, false);
                } else {
                    qmatmul_bwd_input(lg, rows, &w, dh, false);
                }
            }
            dh
        })?;
        Ok(Some(tensor_of(dh, h.dims(), h.dtype())?))
    }
}

/// The cross-entropy's input gradient on the GPU, as an op over `hidden` (see
/// `CrossEntropyOp::bwd`).
#[cfg(feature = "cuda")]
struct CrossEntropyBwdCuda {
    gpu: Arc<crate::cuda::GpuWeightCache>,
    w: Arc<StoredTensor>,
    bias: Option<Arc<Vec<f32>>>,
    labels: Arc<Vec<i64>>,
    chunk: usize,
    lse: Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>,
    g: f32,
}

#[cfg(feature = "cuda")]
impl CustomOp1 for CrossEntropyBwdCuda {
    fn name(&self) -> &'static str {
        "qtune-cross-entropy-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CpuOut {
        bail!("qtune-cross-entropy-bwd: the CPU backward is CrossEntropyOp::bwd")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CudaOut {
        let head = ce_head(&self.gpu, &self.w, &self.bias, &self.labels, self.chunk);
        let dh = crate::cuda::ops::cross_entropy_bwd(&head, &self.lse, self.g, (s, l))?;
        Ok((dh, l.shape().clone()))
    }
}

/// lm_head as the CUDA cross-entropy kernels take it (forward and backward ops alike).
#[cfg(feature = "cuda")]
fn ce_head<'a>(
    gpu: &'a crate::cuda::GpuWeightCache,
    w: &'a StoredTensor,
    bias: &'a Option<Arc<Vec<f32>>>,
    labels: &'a [i64],
    chunk: usize,
) -> crate::cuda::ops::CeHead<'a> {
    let bias = bias.as_ref().map(|b| b.as_slice());
    crate::cuda::ops::CeHead {
        cache: gpu,
        w,
        bias,
        labels,
        chunk,
    }
}
