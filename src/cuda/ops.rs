//! Launchers of the fused-op kernels (kernels/ops.cu) on candle CUDA storages: RMSNorm forward and
//! backward, rotary embedding, SwiGLU forward and backward, and the cross-entropy row kernels.
//! Each takes contiguous bf16 or f32 arguments and returns new storages of the same dtype; small
//! constants (norm weight, cos/sin tables, labels) are copied to the device per call.
use super::{func, grid_for, output, Module, THREADS};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};
use half::bf16;

/// A contiguous argument: its storage and layout.
pub type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn view<'a, T: CudaDType>(a: Arg<'a>, op: &str) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = a.1.contiguous_offsets() else {
        bail!("{op}: argument must be contiguous");
    };
    Ok(a.0.as_cuda_slice::<T>()?.slice(start..end))
}

/// "bf16" or "f32": the kernel suffix for a storage dtype.
fn suffix(d: DType, op: &str) -> Result<&'static str> {
    match d {
        DType::BF16 => Ok("bf16"),
        DType::F32 => Ok("f32"),
        d => bail!("{op} on CUDA: activations must be bf16 or f32, not {d:?}"),
    }
}

/// One thread block per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Runs `$body` with `$T` bound to the element type of dtype `$d` (bf16 or f32).
macro_rules! with_t {
    ($d:expr, $T:ident, $body:block) => {
        match $d {
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            _ => {
                type $T = f32;
                $body
            }
        }
    };
}

/// RMSNorm forward over the last dim `c` of `x` (rows × c): `w · (x / rms(x))`.
pub fn rms_norm_fwd(x: Arg, w: &[f32], eps: f64) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let sfx = suffix(x.0.dtype(), "rms_norm")?;
    let c = w.len();
    let n = x.1.shape().elem_count();
    let rows = n / c.max(1);
    let wd = dev.clone_htod(w)?;
    let f = func(dev, Module::Ops, &format!("qt_rmsnorm_fwd_{sfx}"))?;
    let (ci, e) = (c as i32, eps as f32);
    with_t!(x.0.dtype(), T, {
        let xv = view::<T>(x, "rms_norm")?;
        let mut y = output::<T>(dev, n)?;
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&xv).arg(&wd).arg(&mut y).arg(&ci).arg(&e);
        // SAFETY: x and y hold rows × c elements; w holds c.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// RMSNorm input gradient: `dx = r·dy·w − x·r³·mean(dy·w·x)` per row.
pub fn rms_norm_bwd(x: Arg, dy: Arg, w: &[f32], eps: f64) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let sfx = suffix(x.0.dtype(), "rms_norm backward")?;
    if dy.0.dtype() != x.0.dtype() {
        bail!("rms_norm backward on CUDA: x and dy dtypes differ");
    }
    let c = w.len();
    let n = x.1.shape().elem_count();
    let wd = dev.clone_htod(w)?;
    let f = func(dev, Module::Ops, &format!("qt_rmsnorm_bwd_{sfx}"))?;
    let (ci, e) = (c as i32, eps as f32);
    with_t!(x.0.dtype(), T, {
        let (xv, dyv) = (view::<T>(x, "rms_norm")?, view::<T>(dy, "rms_norm")?);
        let mut dx = output::<T>(dev, n)?;
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&xv).arg(&wd).arg(&dyv).arg(&mut dx).arg(&ci).arg(&e);
        // SAFETY: x, dy, dx hold rows × c elements; w holds c.
        unsafe { b.launch(per_row(n / c.max(1))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    })
}

/// Rotary embedding of `x (B·H, T, 2·half)` with `cos, sin (T, half)`; `interleaved` pairs
/// (2i, 2i+1) instead of (i, i+half); `inverse` rotates by −θ (the backward).
pub fn rope(
    x: Arg,
    cos: &[f32],
    sin: &[f32],
    t: usize,
    half: usize,
    interleaved: bool,
    inverse: bool,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let sfx = suffix(x.0.dtype(), "rope")?;
    let n = x.1.shape().elem_count();
    let bh = (n / (t * 2 * half).max(1)) as i64;
    let (cd, sd) = (dev.clone_htod(cos)?, dev.clone_htod(sin)?);
    let f = func(dev, Module::Ops, &format!("qt_rope_{sfx}"))?;
    let (ti, hi, il) = (t as i32, half as i32, i32::from(interleaved));
    let sign = if inverse { -1.0f32 } else { 1.0 };
    with_t!(x.0.dtype(), T, {
        let xv = view::<T>(x, "rope")?;
        let mut y = output::<T>(dev, n)?;
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&xv)
            .arg(&cd)
            .arg(&sd)
            .arg(&mut y)
            .arg(&bh)
            .arg(&ti)
            .arg(&hi)
            .arg(&il)
            .arg(&sign);
        // SAFETY: x, y hold bh·t·2·half elements; cos, sin t·half.
        unsafe { b.launch(grid_for(n / 2)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// SwiGLU forward `h = silu(g)·u` (same shapes).
pub fn swiglu_fwd(g: Arg, u: Arg) -> Result<CudaStorage> {
    let dev = &g.0.device;
    let sfx = suffix(g.0.dtype(), "swiglu")?;
    let n = g.1.shape().elem_count();
    if u.1.shape().elem_count() != n || u.0.dtype() != g.0.dtype() {
        bail!("swiglu on CUDA: gate and up differ in size or dtype");
    }
    let f = func(dev, Module::Ops, &format!("qt_swiglu_fwd_{sfx}"))?;
    let nn = n as i64;
    with_t!(g.0.dtype(), T, {
        let (gv, uv) = (view::<T>(g, "swiglu")?, view::<T>(u, "swiglu")?);
        let mut h = output::<T>(dev, n)?;
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&gv).arg(&uv).arg(&mut h).arg(&nn);
        // SAFETY: all three hold n elements.
        unsafe { b.launch(grid_for(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(h, dev.clone()))
    })
}

/// SwiGLU backward: `(dg, du)` from `dh`.
pub fn swiglu_bwd(g: Arg, u: Arg, dh: Arg) -> Result<(CudaStorage, CudaStorage)> {
    let dev = &g.0.device;
    let sfx = suffix(g.0.dtype(), "swiglu backward")?;
    let n = g.1.shape().elem_count();
    if u.1.shape().elem_count() != n || dh.1.shape().elem_count() != n {
        bail!("swiglu backward on CUDA: gate, up and dh differ in size");
    }
    let f = func(dev, Module::Ops, &format!("qt_swiglu_bwd_{sfx}"))?;
    let nn = n as i64;
    with_t!(g.0.dtype(), T, {
        let (gv, uv, dhv) = (
            view::<T>(g, "swiglu")?,
            view::<T>(u, "swiglu")?,
            view::<T>(dh, "swiglu")?,
        );
        let (mut dg, mut du) = (output::<T>(dev, n)?, output::<T>(dev, n)?);
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&gv)
            .arg(&uv)
            .arg(&dhv)
            .arg(&mut dg)
            .arg(&mut du)
            .arg(&nn);
        // SAFETY: all five hold n elements.
        unsafe { b.launch(grid_for(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(dg, dev.clone()),
            CudaStorage::wrap_cuda_slice(du, dev.clone()),
        ))
    })
}

/// Cross-entropy rows of one chunk of logits `(rows, v)`: `(lse, loss)` per row (f32), loss 0 for
/// a negative label. `labels` are the chunk's labels.
pub fn ce_fwd(logits: Arg, labels: &[i64], v: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let dev = &logits.0.device;
    let sfx = suffix(logits.0.dtype(), "cross-entropy")?;
    let rows = labels.len();
    if logits.1.shape().elem_count() != rows * v {
        bail!("cross-entropy on CUDA: logits are not {rows} x {v}");
    }
    let ld = dev.clone_htod(labels)?;
    let f = func(dev, Module::Ops, &format!("qt_ce_fwd_{sfx}"))?;
    let vi = v as i32;
    let (mut lse, mut loss) = (output::<f32>(dev, rows)?, output::<f32>(dev, rows)?);
    with_t!(logits.0.dtype(), T, {
        let lv = view::<T>(logits, "cross-entropy")?;
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&lv).arg(&ld).arg(&mut lse).arg(&mut loss).arg(&vi);
        // SAFETY: logits hold rows × v; labels, lse, loss hold rows.
        unsafe { b.launch(per_row(rows)) }.w()?;
    });
    Ok((lse, loss))
}

/// Turns a chunk of logits `(rows, v)` into `g·(softmax − onehot(label))` in place (0 on rows with
/// a negative label), given each row's logsumexp from [`ce_fwd`].
pub fn ce_grad_in_place(
    logits: &mut CudaStorage,
    labels: &[i64],
    lse: &CudaView<f32>,
    g: f32,
    v: usize,
) -> Result<()> {
    let dev = logits.device.clone();
    let sfx = suffix(logits.dtype(), "cross-entropy")?;
    let rows = labels.len();
    let ld = dev.clone_htod(labels)?;
    let f = func(&dev, Module::Ops, &format!("qt_ce_grad_{sfx}"))?;
    let vi = v as i32;
    with_t!(logits.dtype(), T, {
        let lg = logits.as_cuda_slice_mut::<T>()?;
        if lg.len() < rows * v {
            bail!("cross-entropy on CUDA: logits are not {rows} x {v}");
        }
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&mut *lg).arg(&ld).arg(lse).arg(&g).arg(&vi);
        // SAFETY: logits hold rows × v; labels and lse hold rows.
        unsafe { b.launch(per_row(rows)) }.w()?;
    });
    Ok(())
}

/// Adds the lm_head bias `(v)` to every row of a chunk of logits `(rows, v)` in place.
pub fn add_bias_in_place(logits: &mut CudaStorage, bias: &CudaSlice<f32>, v: usize) -> Result<()> {
    let dev = logits.device.clone();
    let sfx = suffix(logits.dtype(), "lm_head bias")?;
    let f = func(&dev, Module::Ops, &format!("qt_add_bias_{sfx}"))?;
    let vi = v as i32;
    with_t!(logits.dtype(), T, {
        let lg = logits.as_cuda_slice_mut::<T>()?;
        let n = lg.len();
        let rows = (n / v.max(1)) as i64;
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&mut *lg).arg(bias).arg(&rows).arg(&vi);
        // SAFETY: logits hold rows × v elements, bias v.
        unsafe { b.launch(grid_for(n)) }.w()?;
    });
    Ok(())
}

/// The frozen lm_head and the labels of a chunked cross-entropy on the GPU.
#[derive(Clone, Copy)]
pub struct CeHead<'a> {
    /// lm_head's device copies.
    pub cache: &'a super::GpuWeightCache,
    /// lm_head's stored weight `(V, C)`.
    pub w: &'a crate::store::StoredTensor,
    /// Its bias `(V)`, if any.
    pub bias: Option<&'a [f32]>,
    /// One label per token; negative = ignored.
    pub labels: &'a [i64],
    /// Tokens per chunk of logits.
    pub chunk: usize,
}

/// What both passes of the chunked cross-entropy start from: shapes, hidden's offset, the bias
/// on the device.
struct CeRun<'a> {
    dev: &'a candle_core::cuda_backend::CudaDevice,
    /// Vocabulary, hidden width, tokens, tokens per chunk.
    v: usize,
    c: usize,
    n: usize,
    chunk: usize,
    /// Hidden's first element in its storage.
    start: usize,
    bias: Option<CudaSlice<f32>>,
}

impl CeHead<'_> {
    fn run<'h>(&self, h: Arg<'h>) -> Result<CeRun<'h>> {
        let dev = &h.0.device;
        let Some((start, _)) = h.1.contiguous_offsets() else {
            bail!("cross-entropy on CUDA: hidden must be contiguous");
        };
        Ok(CeRun {
            dev,
            v: self.w.shape[0],
            c: self.w.shape[1],
            n: self.labels.len(),
            chunk: self.chunk.max(1),
            start,
            bias: self.bias.map(|b| dev.clone_htod(b)).transpose()?,
        })
    }

    /// The logits `(rows, V)` of the `rows` tokens from `r0`: dequantise + GEMM, bias.
    fn logits(&self, run: &CeRun, h: Arg, r0: usize, rows: usize) -> Result<CudaStorage> {
        let sub = Layout::contiguous_with_offset((rows, run.c), run.start + r0 * run.c);
        let (mut lg, _) = super::qmatmul(self.cache, self.w, super::Product::Forward, h.0, &sub)?;
        if let Some(b) = &run.bias {
            add_bias_in_place(&mut lg, b, run.v)?;
        }
        Ok(lg)
    }
}

/// The chunked cross-entropy through a frozen lm_head `w (V, C)` on the GPU, forward: the summed
/// loss over tokens with a label >= 0 and each token's logsumexp (kept for the backward). Logits
/// exist `chunk` rows at a time: dequantise + GEMM, bias, row kernel; nothing V-sized per token
/// survives a chunk.
pub fn cross_entropy_fwd(head: &CeHead, h: Arg) -> Result<(f64, CudaSlice<f32>)> {
    let run = head.run(h)?;
    let (dev, v, n) = (run.dev, run.v, run.n);
    let mut lse = output::<f32>(dev, n)?;
    let mut loss = 0f64;
    for r0 in (0..n).step_by(run.chunk) {
        let rows = run.chunk.min(n - r0);
        let lg = head.logits(&run, h, r0, rows)?;
        let ll = Layout::contiguous((rows, v));
        let (lse_c, loss_c) = ce_fwd((&lg, &ll), &head.labels[r0..r0 + rows], v)?;
        dev.memcpy_dtod(&lse_c, &mut lse.slice_mut(r0..r0 + rows))?;
        loss += dev
            .clone_dtoh(&loss_c)?
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
    }
    Ok((loss, lse))
}

/// Its backward: `dh = g·(softmax − onehot)·W` chunk by chunk (logits recomputed, turned into
/// their gradient in place, mapped back through the input-gradient product).
pub fn cross_entropy_bwd(
    head: &CeHead,
    lse: &CudaSlice<f32>,
    g: f32,
    h: Arg,
) -> Result<CudaStorage> {
    let run = head.run(h)?;
    let (dev, v, c, n) = (run.dev, run.v, run.c, run.n);
    with_t!(h.0.dtype(), T, {
        let mut dh = output::<T>(dev, n * c)?;
        for r0 in (0..n).step_by(run.chunk) {
            let rows = run.chunk.min(n - r0);
            let mut lg = head.logits(&run, h, r0, rows)?;
            let (labels, lse) = (&head.labels[r0..r0 + rows], &lse.slice(r0..r0 + rows));
            ce_grad_in_place(&mut lg, labels, lse, g, v)?;
            let ll = Layout::contiguous((rows, v));
            let (dhc, _) = super::qmatmul(head.cache, head.w, super::Product::InputGrad, &lg, &ll)?;
            let src = dhc.as_cuda_slice::<T>()?;
            dev.memcpy_dtod(src, &mut dh.slice_mut(r0 * c..(r0 + rows) * c))?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dh, dev.clone()))
    })
}
