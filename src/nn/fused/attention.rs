//! Causal GQA attention with a key padding mask; probabilities recomputed block by block in backward.
use super::*;

/// Keys whose additive bias is at or below this are masked (transformers uses `f32::MIN`).
const MASKED: f32 = f32::MIN / 2.0;

/// Query rows per block: S and P of a block are (BQ × T) scratch, never kept.
const BQ: usize = 64;

/// `softmax(q·kᵀ/sqrt(D) + causal + padding) · v` for `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)`
/// (query head h reads kv head `h / (Hq/Hkv)`), `key_mask (B, T)` 1 = attend, 0 = padding;
/// returns `(B, Hq, T, D)`. The graph keeps q, k, v, the output and a per-row logsumexp (B·Hq·T);
/// probabilities are recomputed in backward, block by block, so no (T×T) matrix outlives the call.
/// A query row that sees no key at all (left padding) averages v over all T keys, as transformers'
/// additive `finfo.min` mask gives on CPU; its backward is that uniform softmax's (as torch's eager
/// autograd; torch's CPU SDPA backward gives T times that on such rows).
pub fn causal_attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t) = (q.dim(0)?, q.dim(2)?);
    let mask = match key_mask {
        None => AttnMask::Causal(None),
        Some(m) => {
            check_cpu("causal_attention", &[m])?;
            if m.dims() != [b, t] {
                bail!(
                    "causal_attention: key_mask of shape {:?}, expected [{b}, {t}]",
                    m.dims()
                );
            }
            let m = const_f32(m, "causal_attention")?;
            AttnMask::Causal(Some(m.iter().map(|&v| v != 0.0).collect()))
        }
    };
    attention_impl(q, k, v, mask)
}

/// [`causal_attention_masked`] with the mask given as transformers' additive bias
/// `(B or 1, 1, T, T)` (0 = attend, `f32::MIN` = masked; see `nn::attention_bias`): the same
/// signature as the composite `nn::causal_attention`. Entries at or below `f32::MIN / 2` are
/// skipped; others are added to the scaled scores. The bias is a constant (no gradient).
/// On the GPU (`--features cuda`) this is [`crate::nn::generic::causal_attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let generic = GENERIC_ATTENTION.load(std::sync::atomic::Ordering::Relaxed);
    if generic || (cfg!(feature = "cuda") && q.device().is_cuda()) {
        return crate::nn::generic::causal_attention(q, k, v, bias);
    }
    check_cpu("causal_attention", &[bias])?;
    let (b, t) = (q.dim(0)?, q.dim(2)?);
    let bb = bias_rows(bias, b, t)?;
    // shares the caller's storage when the bias is already f32 and contiguous (the usual case):
    // one bias serves every layer, and no op holds a copy of it
    let t_bias = bias.detach().to_dtype(DType::F32)?.contiguous()?;
    attention_impl(
        q,
        k,
        v,
        AttnMask::Bias {
            t: t_bias,
            batched: bb == b && b > 1,
        },
    )
}

/// When set (tests), [`causal_attention`] takes the device-generic path on the CPU too, so that a
/// whole training step can be checked with the attention the GPU runs.
pub static GENERIC_ATTENTION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Batch rows (B or 1) of an additive attention bias `(B or 1, 1, T, T)`, checked.
pub(crate) fn bias_rows(bias: &Tensor, b: usize, t: usize) -> Result<usize> {
    match bias.dims() {
        [bb, 1, t1, t2] if (*bb == b || *bb == 1) && *t1 == t && *t2 == t => Ok(*bb),
        d => bail!("causal_attention: bias of shape {d:?}, expected [{b}, 1, {t}, {t}]"),
    }
}

/// `(B, Hq, Hkv, T, D)` of attention operands `q (B, Hq, T, D)`, `k, v (B, Hkv, T, D)`, checked
/// to fit together (Hq a multiple of Hkv).
pub(crate) fn attention_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnDims> {
    let (b, hq, t, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if (bk, tk, dk) != (b, t, d) || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 {
        bail!(
            "causal_attention: q {:?} (B, Hq, T, D), k {:?} and v {:?} (B, Hkv, T, D) do not fit \
             (Hq must be a multiple of Hkv)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    Ok(AttnDims { b, hq, hkv, t, d })
}

fn attention_impl(q: &Tensor, k: &Tensor, v: &Tensor, mask: AttnMask) -> Result<Tensor> {
    check_cpu("causal_attention", &[q, k, v])?;
    let AttnDims { b, hq, hkv, t, d } = attention_dims(q, k, v)?;
    let op = AttentionOp {
        dims: AttnDims { b, hq, hkv, t, d },
        mask,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) b: usize,
    pub(crate) hq: usize,
    pub(crate) hkv: usize,
    pub(crate) t: usize,
    pub(crate) d: usize,
}

/// Which keys a query row sees, and what is added to their scores.
enum AttnMask {
    /// Keys `j <= i`, restricted to `mask[b·T + j]` when given; nothing added.
    Causal(Option<Vec<bool>>),
    /// Additive bias (B or 1, 1, T, T) f32, contiguous: keys whose bias is above [`MASKED`].
    Bias { t: Tensor, batched: bool },
}

impl AttnMask {
    /// Runs `f` with a borrowed view of the mask (the bias tensor's storage is read-locked).
    fn with_view<R>(&self, f: impl FnOnce(&MaskView) -> R) -> Result<R> {
        match self {
            AttnMask::Causal(m) => Ok(f(&MaskView::Causal(m.as_deref()))),
            AttnMask::Bias { t, batched } => {
                let (guard, layout) = t.storage_and_layout();
                let (Storage::Cpu(CpuStorage::F32(v)), Some((s, e))) =
                    (&*guard, layout.contiguous_offsets())
                else {
                    bail!("causal_attention: the bias must be a contiguous f32 CPU tensor");
                };
                Ok(f(&MaskView::Bias(&v[s..e], *batched)))
            }
        }
    }
}

/// [`AttnMask`] borrowed for one forward or backward pass.
enum MaskView<'a> {
    Causal(Option<&'a [bool]>),
    Bias(&'a [f32], bool),
}

impl MaskView<'_> {
    /// For query row i of batch b: clears `add` to length `t`, sets it to the additive term of each
    /// visible key and -inf elsewhere; returns 1 + the last visible key, or 0 when none is visible.
    fn row(&self, b: usize, i: usize, t: usize, add: &mut [f32]) -> usize {
        let mut end = 0;
        match self {
            MaskView::Causal(m) => {
                for (j, a) in add.iter_mut().enumerate() {
                    let on = j <= i && m.is_none_or(|m| m[b * t + j]);
                    *a = if on { 0.0 } else { f32::NEG_INFINITY };
                    if on {
                        end = j + 1;
                    }
                }
            }
            MaskView::Bias(v, batched) => {
                let bi = if *batched { b } else { 0 };
                let row = &v[(bi * t + i) * t..][..t];
                for (j, (a, &x)) in add.iter_mut().zip(row).enumerate() {
                    let on = x > MASKED;
                    *a = if on { x } else { f32::NEG_INFINITY };
                    if on {
                        end = j + 1;
                    }
                }
            }
        }
        end
    }
}

/// Products of a block of `rows` query rows with the first `kend` key (or value) rows, row-major
/// with D columns: `out (rows × D) = a (rows × kend) · b (kend × D)`, or with `grad` a key or value
/// gradient, `out (kend × D) += aᵀ (kend × rows) · b (rows × D)`.
fn block_product(out: &mut [f32], a: &[f32], b: &[f32], dims: (usize, usize, usize), grad: bool) {
    let (rows, kend, d) = dims;
    let (m, k) = if grad { (kend, rows) } else { (rows, kend) };
    let (out, b) = (&mut out[..m * d], &b[..k * d]);
    gemm_f32((m, d, k), out, d, grad, (a, kend, grad), (b, d, false), 1.0);
}

/// `c (m×n, row stride ldc) = [c +] beta·op(a)·op(b)` for row-major `a` (m×k, or k×m when `ta`)
/// and `b` (k×n, or n×k when `tb`) with row strides `lda`, `ldb`.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    ldc: usize,
    acc: bool,
    (a, lda, ta): (&[f32], usize, bool),
    (b, ldb, tb): (&[f32], usize, bool),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    assert!(
        ac <= lda && a.len() >= (ar - 1) * lda + ac,
        "gemm_f32: a out of bounds"
    );
    assert!(
        bc <= ldb && b.len() >= (br - 1) * ldb + bc,
        "gemm_f32: b out of bounds"
    );
    assert!(
        n <= ldc && c.len() >= (m - 1) * ldc + n,
        "gemm_f32: c out of bounds"
    );
    let (a_rs, a_cs) = if ta { (1, lda) } else { (lda, 1) };
    let (b_rs, b_cs) = if tb { (1, ldb) } else { (ldb, 1) };
    // SAFETY: the asserts above keep every index of op(a) (m×k), op(b) (k×n) and c (m×n) with the
    // strides below inside its slice; c is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

struct AttentionOp {
    dims: AttnDims,
    mask: AttnMask,
    /// (B, Hq, T) logsumexp of each row's scaled scores, written by the forward for the backward.
    /// Each call makes its own op, so this belongs to one graph node.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

impl AttentionOp {
    /// Probabilities of query rows `i0..i0+rows` of (batch b, query head slab `q`) against keys
    /// `0..kend` into `p (rows × kend)`. With `lse` None (forward) it normalises and writes each
    /// row's logsumexp into `lse_out`; with Some (backward) it uses those. `add` is (T) scratch.
    /// Returns kend: 1 + the last key any of these rows sees (T if a row sees none).
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        mask: &MaskView,
        bi: usize,
        i0: usize,
        rows: usize,
        q: &[f32],
        k: &[f32],
        p: &mut Vec<f32>,
        add: &mut [f32],
        lse_in: Option<&[f32]>,
        lse_out: &mut [f32],
    ) -> usize {
        let AttnDims { t, d, .. } = self.dims;
        let scale = 1.0 / (d as f32).sqrt();
        // key extent of the block first, so that S is only as wide as needed
        let mut kend = 0;
        for i in i0..i0 + rows {
            let e = mask.row(bi, i, t, add);
            kend = kend.max(if e == 0 { t } else { e });
        }
        p.clear();
        p.resize(rows * kend, 0.0);
        // s (rows × kend) = scale · q[i0..] · k[..kend]ᵀ
        gemm_f32(
            (rows, kend, d),
            p,
            kend,
            false,
            (&q[i0 * d..(i0 + rows) * d], d, false),
            (&k[..kend * d], d, true),
            scale,
        );
        for r in 0..rows {
            let s = &mut p[r * kend..(r + 1) * kend];
            if mask.row(bi, i0 + r, t, add) == 0 {
                // no visible key: transformers' finfo.min bias makes every score equal
                s.fill(1.0 / t as f32);
                lse_out[r] = (t as f32).ln();
                continue;
            }
            for (s, a) in s.iter_mut().zip(add.iter()) {
                *s += a;
            }
            match lse_in {
                Some(lse) => s.iter_mut().for_each(|x| *x = (*x - lse[r]).exp()),
                None => {
                    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut l = 0f32;
                    for x in s.iter_mut() {
                        *x = (*x - m).exp();
                        l += *x;
                    }
                    s.iter_mut().for_each(|x| *x /= l);
                    lse_out[r] = m + l.ln();
                }
            }
        }
        kend
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "qtune-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CpuOut {
        let AttnDims { hq, hkv, t, d, .. } = self.dims;
        let (q, k, v) = (
            f32_of(qs, ql, self.name())?,
            f32_of(ks, kl, self.name())?,
            f32_of(vs, vl, self.name())?,
        );
        let rep = hq / hkv;
        // o: (B, Hq, T, D); lse: (B, Hq, T); one task per (b, query head)
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; q.len() / d.max(1)];
        let (o_ref, lse_ref) = (&mut o, &mut lse);
        self.mask.with_view(|mask| {
            if t * d == 0 {
                return;
            }
            o_ref
                .par_chunks_mut(t * d)
                .zip(lse_ref.par_chunks_mut(t))
                .enumerate()
                .for_each(|(bh, (o, lse))| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let q = &q[bh * t * d..(bh + 1) * t * d];
                    let kv0 = (bi * hkv + h / rep) * t * d;
                    let (k, v) = (&k[kv0..kv0 + t * d], &v[kv0..kv0 + t * d]);
                    let (mut p, mut add) = (Vec::new(), vec![0f32; t]);
                    for i0 in (0..t).step_by(BQ) {
                        let rows = BQ.min(t - i0);
                        let lse = &mut lse[i0..i0 + rows];
                        let kend =
                            self.probs(mask, bi, i0, rows, q, k, &mut p, &mut add, None, lse);
                        // o[i0..] (rows × D) = p (rows × kend) · v[..kend]
                        block_product(
                            &mut o[i0 * d..(i0 + rows) * d],
                            &p,
                            v,
                            (rows, kend, d),
                            false,
                        );
                    }
                });
        })?;
        *self.lse.lock().expect("lse lock poisoned") = Some(Arc::new(lse));
        Ok((storage_of(o, qs.dtype()), ql.shape().clone()))
    }

    /// Flash-attention backward per query block: p = exp(s - lse), dp = dO·vᵀ,
    /// ds = p·(dp - rowsum(dO·O))·scale, dq = ds·k, dk += dsᵀ·q, dv += pᵀ·dO
    /// (GQA: kv grads summed over the query heads of the group).
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, d_o: &Tensor) -> Grads3 {
        let AttnDims { b, hq, hkv, t, d } = self.dims;
        let Some(lse) = self.lse.lock().expect("lse lock poisoned").clone() else {
            bail!("causal_attention: backward before forward");
        };
        let rep = hq / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        let name = self.name();
        let (q_dims, dtypes) = (q.dims().to_vec(), [q.dtype(), k.dtype(), v.dtype()]);
        let mut dq = vec![0f32; b * hq * t * d];
        let mut dk = vec![0f32; b * hkv * t * d];
        let mut dv = vec![0f32; b * hkv * t * d];
        let (q, k, v, o, d_o) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            o.contiguous()?,
            d_o.contiguous()?,
        );
        let guards = [&q, &k, &v, &o, &d_o].map(|t| t.storage_and_layout());
        let mut data: Vec<Cow<[f32]>> = Vec::with_capacity(5);
        for (s, l) in &guards {
            let Storage::Cpu(cpu) = &**s else {
                bail!("{name}: only the CPU kernels exist so far; move the tensors to the CPU");
            };
            data.push(f32_of(cpu, l, name)?);
        }
        let [q, k, v, o, d_o] = [0, 1, 2, 3, 4].map(|i| &*data[i]);
        let (dq_ref, dk_ref, dv_ref) = (&mut dq, &mut dk, &mut dv);
        self.mask.with_view(|mask| {
            if t * d == 0 {
                return;
            }
            // one task per (b, kv head): it owns that head's dk, dv and the dq of its `rep` query
            // heads, so no two tasks write the same memory
            dq_ref
                .par_chunks_mut(rep * t * d)
                .zip(
                    dk_ref
                        .par_chunks_mut(t * d)
                        .zip(dv_ref.par_chunks_mut(t * d)),
                )
                .enumerate()
                .for_each(|(bg, (dq, (dk, dv)))| {
                    let bi = bg / hkv;
                    let (k, v) = (&k[bg * t * d..][..t * d], &v[bg * t * d..][..t * d]);
                    let (mut p, mut dp, mut add) = (Vec::new(), Vec::new(), vec![0f32; t]);
                    let mut unused = vec![0f32; BQ];
                    for r in 0..rep {
                        let bh = bg * rep + r; // = bi·Hq + h
                        let slab = bh * t * d..(bh + 1) * t * d;
                        let (q, o, d_o) = (&q[slab.clone()], &o[slab.clone()], &d_o[slab]);
                        let dq = &mut dq[r * t * d..(r + 1) * t * d];
                        for i0 in (0..t).step_by(BQ) {
                            let rows = BQ.min(t - i0);
                            let lse = &lse[bh * t + i0..][..rows];
                            let kend = self.probs(
                                mask,
                                bi,
                                i0,
                                rows,
                                q,
                                k,
                                &mut p,
                                &mut add,
                                Some(lse),
                                &mut unused,
                            );
                            let (qb, ob, dob) = (
                                &q[i0 * d..(i0 + rows) * d],
                                &o[i0 * d..(i0 + rows) * d],
                                &d_o[i0 * d..(i0 + rows) * d],
                            );
                            // dv[..kend] += pᵀ (kend × rows) · dO (rows × D)
                            block_product(dv, &p, dob, (rows, kend, d), true);
                            // dp (rows × kend) = dO · v[..kend]ᵀ
                            dp.clear();
                            dp.resize(rows * kend, 0.0);
                            gemm_f32(
                                (rows, kend, d),
                                &mut dp,
                                kend,
                                false,
                                (dob, d, false),
                                (&v[..kend * d], d, true),
                                1.0,
                            );
                            // ds = p·(dp - dO·O)·scale, in place of dp
                            for r in 0..rows {
                                let dd = dot(&dob[r * d..(r + 1) * d], &ob[r * d..(r + 1) * d]);
                                let (pr, dpr) = (
                                    &p[r * kend..(r + 1) * kend],
                                    &mut dp[r * kend..(r + 1) * kend],
                                );
                                for (x, &pv) in dpr.iter_mut().zip(pr) {
                                    *x = pv * (*x - dd) * scale;
                                }
                            }
                            // dq[i0..] (rows × D) = ds · k[..kend]
                            let dqi = &mut dq[i0 * d..(i0 + rows) * d];
                            block_product(dqi, &dp, k, (rows, kend, d), false);
                            // dk[..kend] += dsᵀ (kend × rows) · q (rows × D)
                            block_product(dk, &dp, qb, (rows, kend, d), true);
                        }
                    }
                });
        })?;
        drop(data);
        drop(guards);
        let kd = [b, hkv, t, d];
        Ok((
            Some(tensor_of(dq, &q_dims, dtypes[0])?),
            Some(tensor_of(dk, &kd, dtypes[1])?),
            Some(tensor_of(dv, &kd, dtypes[2])?),
        ))
    }
}
