//! The CUDA path (`--features cuda`): our kernels in kernels/*.cu, compiled to PTX by build.rs and
//! loaded into candle's CUDA device, and the frozen quantised linear on the GPU.
//!
//! A quantised weight is copied to the device once, as stored (quantised: 4.1–8.5 bits per
//! weight), the first time a layer runs there. Each product then dequantises it into one scratch
//! buffer per device, shared by every layer and grown to the largest, and multiplies with cuBLAS
//! (bf16 tensor cores with f32 accumulation for bf16 activations; f32 GEMM for f32 ones). The
//! scratch is reused by the next layer as soon as the GEMM that reads it has run (kernels and
//! GEMMs are ordered on the device's stream), so no dequantised copy of any weight persists and
//! none is ever a graph node: the weight still gets no gradient.
//!
//! Supported: compute capability 8.0 and newer (bf16 tensor cores). Everything here needs a GPU to
//! run; tests/cuda_kernels.rs checks it against the CPU path on one.
use crate::quant::QType;
use crate::store::StoredTensor;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;
use std::sync::{Arc, Mutex};

pub mod ops;

/// PTX of kernels/dequant.cu (dequantisers and dense conversions).
pub const DEQUANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequant.ptx"));
/// PTX of kernels/ops.cu (RMSNorm, rotary, SwiGLU, cross-entropy rows).
pub const OPS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));

/// When set (tests), every output buffer of our kernels and GEMMs is filled with 0xff bytes (NaN in
/// bf16 and f32) before the kernel runs, so that an element a kernel fails to write cannot pass a
/// comparison by chance.
pub static POISON_OUTPUTS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `n` elements of `T` for a kernel to write in full: uninitialised, or poisoned (see
/// [`POISON_OUTPUTS`]).
pub(crate) fn output<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    let n = n.max(1);
    if POISON_OUTPUTS.load(std::sync::atomic::Ordering::Relaxed) {
        let bytes = dev.clone_htod(&vec![0xffu8; n * std::mem::size_of::<T>()])?;
        // SAFETY: the byte buffer holds exactly n values of T; any bit pattern is a valid
        // float (this is only used for f32, bf16 and u8 outputs).
        let mut t = unsafe { dev.alloc::<T>(n) }?;
        // SAFETY: `bytes` holds n * size_of::<T>() bytes (made just above) and T is plain data.
        let v = unsafe { bytes.transmute::<T>(n) }.expect("sized above");
        dev.memcpy_dtod(&v, &mut t)?;
        return Ok(t);
    }
    // SAFETY: the caller launches a kernel that writes all n elements before anyone reads them.
    unsafe { dev.alloc::<T>(n) }
}

/// Threads per block of every launch (the kernels' `__launch_bounds__`).
const THREADS: u32 = 256;

/// Which of the two PTX modules a kernel lives in.
#[derive(Clone, Copy)]
pub(crate) enum Module {
    Dequant,
    Ops,
}

/// Loads (once per device) and returns kernel `name`.
pub(crate) fn func(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    let (mname, ptx) = match module {
        Module::Dequant => ("qtune_dequant", DEQUANT_PTX),
        Module::Ops => ("qtune_ops", OPS_PTX),
    };
    Ok(dev
        .get_or_load_custom_func(name, mname, ptx)?
        .into_cuda_function())
}

/// A grid for `n` independent work items of one thread each (grid-stride kernels cap it).
pub(crate) fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Errors for GPUs below compute capability 8.0 (no bf16 tensor cores: sm_75 / T4 unsupported).
pub fn check_device(dev: &CudaDevice) -> Result<()> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    if major < 8 {
        bail!(
            "this GPU has compute capability {major}.{minor}; qtune's CUDA path needs 8.0 or newer \
             (bf16 tensor cores: A100, RTX 30xx/40xx, L4, H100). T4 (7.5) is not supported; use \
             --device cpu"
        );
    }
    Ok(())
}

/// Bytes of device memory in use (total − free, as the driver reports for the whole GPU, so it
/// includes the CUDA context and cuBLAS workspaces).
pub fn device_used_bytes(dev: &CudaDevice) -> Result<u64> {
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let (free, total) = ctx.mem_get_info().w()?;
    Ok((total - free) as u64)
}

/// The default memory pool of the device's context: candle allocates every tensor from it
/// (`cuMemAllocAsync`, stream-ordered), and so do our kernels' outputs and scratch.
fn default_pool(
    dev: &CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    if !ctx.has_async_alloc() {
        bail!(
            "this GPU or driver has no stream-ordered allocator (memory pools); qtune's peak \
               device memory figure needs one"
        );
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the device handle comes from a live context.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuDeviceGetDefaultMemPool: {r:?}");
    }
    Ok(pool)
}

/// Peak bytes allocated from the device's pool since the last [`reset_pool_peak`]: every tensor,
/// quantised weight copy and scratch buffer at the worst moment, the figure PyTorch reports as
/// `max_memory_allocated`. The CUDA context and cuBLAS workspace are not in it (see
/// [`device_used_bytes`] before loading for those).
pub fn pool_peak_bytes(dev: &CudaDevice) -> Result<u64> {
    let mut v: u64 = 0;
    used_mem_high(dev, false, &mut v)?;
    Ok(v)
}

/// Starts a new peak for [`pool_peak_bytes`] at what is allocated now.
pub fn reset_pool_peak(dev: &CudaDevice) -> Result<()> {
    // the driver accepts only 0 for this attribute (reset to current)
    used_mem_high(dev, true, &mut 0)
}

/// Reads (or, with `set`, writes) the USED_MEM_HIGH attribute of the device's pool through `v`,
/// after the work queued so far.
fn used_mem_high(dev: &CudaDevice, set: bool, v: &mut u64) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    dev.cuda_stream().synchronize().w()?;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let p = v as *mut u64 as *mut std::ffi::c_void;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; `v` outlives the call.
    let (r, op) = unsafe {
        if set {
            (sys::cuMemPoolSetAttribute(pool, attr, p), "Set")
        } else {
            (sys::cuMemPoolGetAttribute(pool, attr, p), "Get")
        }
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuMemPool{op}Attribute(USED_MEM_HIGH): {r:?}");
    }
    Ok(())
}

/// NF4 statistics on the device.
struct GpuNf4 {
    absmax_q: CudaSlice<u8>,
    nested_absmax: CudaSlice<f32>,
    nested_code: CudaSlice<f32>,
    code: CudaSlice<f32>,
    offset: f32,
}

/// A stored weight on one device, still quantised, padded to a multiple of 16 bytes (the
/// dequantisers read whole 16-byte vectors).
pub struct GpuWeight {
    device: DeviceId,
    qtype: QType,
    numel: usize,
    data: CudaSlice<u8>,
    nf4: Option<GpuNf4>,
}

impl GpuWeight {
    /// Copies `w` to `dev` as stored.
    pub fn upload(dev: &CudaDevice, w: &StoredTensor) -> Result<Self> {
        if !supported(w.qtype) {
            bail!(
                "tensor '{}': {} weights have no CUDA dequantiser (supported: NF4, Q4_0, Q5_0, \
                 Q8_0, Q4_K, Q6_K, F16, BF16, F32); requantise it or use --device cpu",
                w.name,
                w.qtype.name()
            );
        }
        let bytes = w.data.as_slice();
        let mut padded = Vec::with_capacity(bytes.len().next_multiple_of(16));
        padded.extend_from_slice(bytes);
        padded.resize(bytes.len().next_multiple_of(16), 0);
        let data = dev.clone_htod(&padded)?;
        let nf4 = match &w.nf4 {
            None => None,
            Some(s) => Some(GpuNf4 {
                absmax_q: dev.clone_htod(s.absmax_q.as_slice())?,
                nested_absmax: dev.clone_htod(&s.nested_absmax)?,
                nested_code: dev.clone_htod(&s.nested_code[..])?,
                code: dev.clone_htod(&s.code[..])?,
                offset: s.offset,
            }),
        };
        Ok(GpuWeight {
            device: dev.id(),
            qtype: w.qtype,
            numel: w.numel(),
            data,
            nf4,
        })
    }

    /// Device bytes held (the quantised copy and its statistics).
    pub fn device_bytes(&self) -> usize {
        self.data.len()
            + self.nf4.as_ref().map_or(0, |s| {
                s.absmax_q.len() + 4 * (s.nested_absmax.len() + s.nested_code.len() + 16)
            })
    }
}

/// Types with a CUDA dequantiser or conversion.
pub fn supported(q: QType) -> bool {
    matches!(
        q,
        QType::NF4
            | QType::Q4_0
            | QType::Q5_0
            | QType::Q8_0
            | QType::Q4_K
            | QType::Q6_K
            | QType::F16
            | QType::BF16
            | QType::F32
    )
}

/// The device copies of one stored weight (usually one device), made on first use and shared by
/// the forward op, its backward and the cross-entropy.
#[derive(Default)]
pub struct GpuWeightCache(Mutex<Vec<Arc<GpuWeight>>>);

impl GpuWeightCache {
    /// The copy of `w` on `dev`, uploading it the first time.
    pub fn get(&self, dev: &CudaDevice, w: &StoredTensor) -> Result<Arc<GpuWeight>> {
        let mut v = self.0.lock().expect("GPU weight cache poisoned");
        if let Some(g) = v.iter().find(|g| g.device == dev.id()) {
            return Ok(g.clone());
        }
        check_device(dev)?;
        let g = Arc::new(GpuWeight::upload(dev, w)?);
        v.push(g.clone());
        Ok(g)
    }
}

impl std::fmt::Debug for GpuWeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "GpuWeightCache({n} devices)")
    }
}

/// The one dequantisation scratch per device: grown to the largest weight it has held, reused by
/// every layer.
static SCRATCH: Mutex<Vec<(DeviceId, CudaSlice<u8>)>> = Mutex::new(Vec::new());

/// Bytes of the scratch buffer on `dev` (0 before the first quantised product there).
pub fn scratch_bytes(dev: &CudaDevice) -> usize {
    let s = SCRATCH.lock().expect("scratch poisoned");
    s.iter()
        .find(|(id, _)| *id == dev.id())
        .map_or(0, |(_, b)| b.len())
}

/// Runs `f` with the scratch of `dev`, at least `bytes` long. The lock is held while `f` enqueues
/// its kernels: work is ordered on the device's stream, so the next user's writes run after this
/// user's reads.
fn with_scratch<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(&mut CudaSlice<u8>) -> Result<R>,
) -> Result<R> {
    let mut s = SCRATCH.lock().expect("scratch poisoned");
    let i = match s.iter().position(|(id, _)| *id == dev.id()) {
        Some(i) => i,
        None => {
            s.push((dev.id(), dev.alloc_zeros::<u8>(bytes.max(16))?));
            s.len() - 1
        }
    };
    if s[i].1.len() < bytes {
        // free the old buffer before allocating the larger one
        s[i].1 = dev.alloc_zeros::<u8>(16)?;
        s[i].1 = dev.alloc_zeros::<u8>(bytes)?;
    }
    f(&mut s[i].1)
}

/// Element type the weight is dequantised to (the activations' dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// bf16: for bf16 activations and the tensor-core GEMM.
    Bf16,
    /// f32: for f32 activations.
    F32,
}

impl Out {
    fn size(self) -> usize {
        match self {
            Out::Bf16 => 2,
            Out::F32 => 4,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Out::Bf16 => "bf16",
            Out::F32 => "f32",
        }
    }
}

/// Dequantises all of `w` into `dst` (at least `numel` elements of `out`, 16-byte aligned).
fn dequant_into(dev: &CudaDevice, w: &GpuWeight, out: Out, dst: &mut CudaSlice<u8>) -> Result<()> {
    let n = w.numel;
    let sfx = out.suffix();
    let ggml = |name: &str, elems: usize, dst: &mut CudaSlice<u8>| -> Result<()> {
        let f = func(dev, Module::Dequant, &format!("qt_dequant_{name}_{sfx}"))?;
        let nblocks = (n / elems) as i64;
        // one warp per group of 8 blocks, 8 warps per thread block
        let cfg = grid_for((n / elems).div_ceil(8) * 32);
        let st = dev.cuda_stream();
        let mut b = st.launch_builder(&f);
        b.arg(&w.data).arg(dst).arg(&nblocks);
        // SAFETY: the kernel reads `data` (padded to whole 16-byte vectors) and writes `n`
        // elements of `out` into `dst`, which the caller sized; arguments match its signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    };
    match w.qtype {
        QType::Q4_0 => ggml("q4_0", 32, dst)?,
        QType::Q5_0 => ggml("q5_0", 32, dst)?,
        QType::Q8_0 => ggml("q8_0", 32, dst)?,
        QType::Q4_K => ggml("q4_k", 256, dst)?,
        QType::Q6_K => ggml("q6_k", 256, dst)?,
        QType::NF4 => {
            let s = w.nf4.as_ref().expect("NF4 weights carry their statistics");
            let f = func(dev, Module::Dequant, &format!("qt_dequant_nf4_{sfx}"))?;
            let nelems = n as i64;
            let st = dev.cuda_stream();
            let mut b = st.launch_builder(&f);
            b.arg(&w.data)
                .arg(&s.absmax_q)
                .arg(&s.nested_absmax)
                .arg(&s.nested_code)
                .arg(&s.code)
                .arg(&s.offset)
                .arg(&nelems)
                .arg(&mut *dst);
            // SAFETY: n/32 chunks of 16 packed bytes each (QLinear checked the sizes); dst holds n.
            unsafe { b.launch(grid_for(n / 32)) }.w()?;
        }
        QType::F16 | QType::BF16 => {
            let is_f16 = i32::from(w.qtype == QType::F16);
            let nn = n as i64;
            let f = func(dev, Module::Dequant, &format!("qt_dense16_{sfx}"))?;
            let st = dev.cuda_stream();
            let mut b = st.launch_builder(&f);
            b.arg(&w.data).arg(&mut *dst).arg(&nn).arg(&is_f16);
            // SAFETY: n 16-bit elements in, n out.
            unsafe { b.launch(grid_for(n)) }.w()?;
        }
        QType::F32 => match out {
            Out::F32 => {
                let mut d = dst.slice_mut(..4 * n);
                dev.memcpy_dtod(&w.data.slice(..4 * n), &mut d)?;
            }
            Out::Bf16 => {
                let nn = n as i64;
                let f = func(dev, Module::Dequant, "qt_dense32_bf16")?;
                let st = dev.cuda_stream();
                let mut b = st.launch_builder(&f);
                b.arg(&w.data).arg(&mut *dst).arg(&nn);
                // SAFETY: n f32 elements in, n bf16 out.
                unsafe { b.launch(grid_for(n)) }.w()?;
            }
        },
        q => bail!("{}: no CUDA dequantiser", q.name()),
    }
    Ok(())
}

/// Dequantises `w` into a new `(rows, cols)` tensor on `dev` (tests and tools; the training path
/// never keeps one). With `poison`, the buffer is first filled with 0xff bytes (NaN in bf16 and
/// f32), so that an element the kernel fails to write shows up.
pub fn dequantize(
    dev: &CudaDevice,
    cache: &GpuWeightCache,
    w: &StoredTensor,
    out: Out,
    poison: bool,
) -> Result<CudaStorage> {
    let g = cache.get(dev, w)?;
    let bytes = g.numel * out.size();
    let mut buf = if poison {
        dev.clone_htod(&vec![0xffu8; bytes])?
    } else {
        output::<u8>(dev, bytes)?
    };
    dequant_into(dev, &g, out, &mut buf)?;
    // re-type the bytes: copy into a typed slice (a test/tool path; the GEMM path never does this)
    Ok(match out {
        Out::F32 => {
            let mut t = dev.alloc_zeros::<f32>(g.numel)?;
            // SAFETY: `buf` holds exactly numel f32 values.
            let v = unsafe { buf.transmute::<f32>(g.numel) }.expect("sized above");
            dev.memcpy_dtod(&v, &mut t)?;
            CudaStorage::wrap_cuda_slice(t, dev.clone())
        }
        Out::Bf16 => {
            let mut t = dev.alloc_zeros::<bf16>(g.numel)?;
            // SAFETY: `buf` holds exactly numel bf16 values.
            let v = unsafe { buf.transmute::<bf16>(g.numel) }.expect("sized above");
            dev.memcpy_dtod(&v, &mut t)?;
            CudaStorage::wrap_cuda_slice(t, dev.clone())
        }
    })
}

/// Which product with the frozen `W (N×K)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    /// `y (M×N) = x (M×K) · Wᵀ`.
    Forward,
    /// `dx (M×K) = dy (M×N) · W`.
    InputGrad,
}

/// The quantised linear on the GPU: dequantise W into the scratch, then one cuBLAS GEMM. `storage`
/// and `layout` are the contiguous argument (bf16 or f32), whose last dim is K (forward) or N
/// (input gradient); the result has the same leading dims.
pub fn qmatmul(
    cache: &GpuWeightCache,
    w: &StoredTensor,
    dir: Product,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &storage.device;
    let (n, k) = (w.shape[0], w.shape[1]);
    let (in_w, out_w) = match dir {
        Product::Forward => (k, n),
        Product::InputGrad => (n, k),
    };
    let dims = layout.shape().dims();
    if dims.last() != Some(&in_w) {
        bail!(
            "'{}' on CUDA: argument of shape {dims:?} does not end in {in_w}",
            w.name
        );
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("'{}' on CUDA: argument must be contiguous", w.name);
    };
    let m = (end - start) / in_w;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("checked non-empty") = out_w;
    let g = cache.get(dev, w)?;
    // column-major view of row-major buffers: W (N×K) row-major is Wᵀ (K×N) column-major
    let (transa, mm, nn, kk, lda, ldb, ldc) = match dir {
        // yᵀ (N×M) = W · xᵀ: A = Wᵀ(K×N) transposed, B = xᵀ (K×M)
        Product::Forward => (cublasOperation_t::CUBLAS_OP_T, n, m, k, k, k, n),
        // dxᵀ (K×M) = Wᵀ · dyᵀ: A = Wᵀ (K×N), B = dyᵀ (N×M)
        Product::InputGrad => (cublasOperation_t::CUBLAS_OP_N, k, m, n, k, n, k),
    };
    let to_i32 = |v: usize| -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("GEMM size {v} > i32")))
    };
    let (mm, nn, kk, lda, ldb, ldc) = (
        to_i32(mm)?,
        to_i32(nn)?,
        to_i32(kk)?,
        to_i32(lda)?,
        to_i32(ldb)?,
        to_i32(ldc)?,
    );
    let blas = dev.cublas_handle();
    let numel = n * k;
    // W dequantised to the activations' type `$t` in the scratch, then y = op(W)·x in `$t`.
    macro_rules! dequant_gemm {
        ($t:ty, $out:expr, $one:expr, $zero:expr) => {{
            let x = storage.as_cuda_slice::<$t>()?.slice(start..end);
            // every element is written by the GEMM (beta = 0)
            let mut y = output::<$t>(dev, m * out_w)?;
            with_scratch(dev, numel * std::mem::size_of::<$t>(), |s| {
                dequant_into(dev, &g, $out, s)?;
                // SAFETY: the scratch holds numel values of this type, just written.
                let wv = unsafe { s.transmute::<$t>(numel) }.expect("scratch sized");
                let cfg = GemmConfig {
                    transa,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: mm,
                    n: nn,
                    k: kk,
                    alpha: $one,
                    lda,
                    ldb,
                    beta: $zero,
                    ldc,
                };
                // SAFETY: the sizes above describe the three buffers exactly.
                unsafe { blas.gemm(cfg, &wv, &x, &mut y) }.w()
            })?;
            Ok((
                CudaStorage::wrap_cuda_slice(y, dev.clone()),
                Shape::from(out_dims),
            ))
        }};
    }
    match storage.dtype() {
        DType::BF16 => dequant_gemm!(bf16, Out::Bf16, bf16::ONE, bf16::ZERO),
        DType::F32 => dequant_gemm!(f32, Out::F32, 1.0f32, 0.0f32),
        d => bail!(
            "'{}' on CUDA: activations must be bf16 or f32, not {d:?}",
            w.name
        ),
    }
}
