//! The frozen quantised linear `y = x·Wᵀ + b` as a candle op with an input-only backward.
//!
//! W stays in the weight store (a memory-mapped or owned quantised tensor behind an `Arc`). The
//! forward is a [`CustomOp1`] over x alone, so candle's graph records x and nothing else: W is not a
//! tensor, cannot be a graph node, and so never gets a gradient. Its backward is a second
//! [`CustomOp1`] over `dy` that computes `dx = dy·W` with [`qmatmul_bwd_input`], re-dequantising W
//! tile by tile; nothing W-sized is ever allocated, and nothing is kept from the forward but x
//! (candle's graph holds the op's argument and result anyway).
//!
//! bf16 activations run the bf16 kernels (`quant::matmul_bf16`: bf16 products, f32 sums; the f32
//! kernels where the CPU lacks AVX-512 BF16); f16 ones are converted to f32 inside the op and the
//! result back. Either way the graph never holds an f32 copy of x.
use crate::nn::fused::tape;
use crate::quant::dequantize_f32;
use crate::quant::matmul::written;
use crate::quant::matmul::{qmatmul_bwd_input, qmatmul_fwd, with_thread_buffer};
use crate::quant::matmul_bf16::{
    qmatmul_bwd_input_bf16, qmatmul_bwd_input_bf16_into, qmatmul_fwd_bf16, qmatmul_fwd_bf16_into,
    FwdOut, LowRank, LowRankGrad,
};
use crate::quant::nf4::{NF4_BLOCK, NF4_NESTED_BLOCK};
use crate::quant::QType;
use crate::store::{StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, WithDType,
};
use half::{bf16, f16};
use std::sync::Arc;

/// A frozen linear layer whose weight `W (out, in)` stays quantised; optional f32 bias `(out,)`.
#[derive(Clone)]
pub struct QLinear {
    weight: Arc<StoredTensor>,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    fwd: Arc<Box<dyn CustomOp1 + Send + Sync>>,
    /// f32 activations take bf16 products too (see [`QLinear::with_bf16_products`]).
    bf16_products: bool,
    /// The weight's device copies (`--features cuda`), shared by forward, backward and the
    /// cross-entropy through this layer.
    #[cfg(feature = "cuda")]
    gpu: Arc<crate::cuda::GpuWeightCache>,
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QLinear({}: {} x {} {}, bias: {})",
            self.weight.name,
            self.out_features,
            self.in_features,
            self.weight.qtype.name(),
            self.bias.is_some()
        )
    }
}

impl QLinear {
    /// Wraps a stored 2-D weight `(out_features, in_features)` of any [`QType`] (NF4 included) and an
    /// optional bias of shape `(out_features,)` (kept in f32). Checks every size the kernels rely on,
    /// so a malformed tensor is an error here and never an out-of-bounds read later.
    pub fn new(weight: Arc<StoredTensor>, bias: Option<Tensor>) -> Result<Self> {
        let name = &weight.name;
        let bad = |msg: String| {
            Error::Invalid(format!(
                "tensor '{name}' cannot be a linear weight: {msg}; check the model file"
            ))
        };
        let (out_features, in_features) = match weight.shape.as_slice() {
            [o, i] => (*o, *i),
            s => return Err(bad(format!("shape {s:?} is not 2-D (out, in)"))),
        };
        let numel = out_features * in_features;
        let bs = weight.qtype.block_size();
        if in_features % bs != 0 {
            return Err(bad(format!(
                "{in_features} input features are not a multiple of the {} block size {bs}",
                weight.qtype.name()
            )));
        }
        match (&weight.nf4, weight.qtype) {
            (Some(s), QType::NF4) => {
                let blocks = numel / NF4_BLOCK;
                let want = [
                    ("packed codes", weight.data.len(), numel / 2),
                    ("absmax codes", s.absmax_q.len(), blocks),
                    (
                        "nested absmax",
                        s.nested_absmax.len(),
                        blocks.div_ceil(NF4_NESTED_BLOCK),
                    ),
                ];
                for (what, got, need) in want {
                    if got != need {
                        return Err(bad(format!(
                            "NF4 {what}: {got} entries, {need} expected for shape {:?}",
                            weight.shape
                        )));
                    }
                }
            }
            (None, QType::NF4) => return Err(bad("NF4 without its statistics".into())),
            (Some(_), q) => {
                return Err(bad(format!("NF4 statistics on a {} tensor", q.name())));
            }
            (None, q) => {
                let need = q.bytes_for(numel);
                if need != Some(weight.data.len()) {
                    return Err(bad(format!(
                        "{} bytes stored, {need:?} expected for {} {:?}",
                        weight.data.len(),
                        q.name(),
                        weight.shape
                    )));
                }
            }
        }
        let bias = match bias {
            None => None,
            Some(b) => {
                if b.dims() != [out_features] {
                    return Err(bad(format!(
                        "bias has shape {:?}, expected [{out_features}]",
                        b.dims()
                    )));
                }
                let b = b
                    .to_dtype(DType::F32)
                    .and_then(|b| b.detach().contiguous())
                    .map_err(|e| bad(format!("bias: {e}")))?;
                Some(b)
            }
        };
        #[cfg(feature = "cuda")]
        let gpu = Arc::new(crate::cuda::GpuWeightCache::default());
        let fwd: Arc<Box<dyn CustomOp1 + Send + Sync>> = Arc::new(Box::new(QMatMulOp {
            w: weight.clone(),
            dir: Dir::Forward,
            bf16_products: false,
            #[cfg(feature = "cuda")]
            gpu: gpu.clone(),
        }));
        Ok(QLinear {
            weight,
            bias,
            out_features,
            in_features,
            fwd,
            bf16_products: false,
            #[cfg(feature = "cuda")]
            gpu,
        })
    }

    /// This linear with f32 activations (CPU) multiplied as bf16 has them: operands rounded to
    /// bf16, f32 sums, on the bf16 kernels (AMX / AVX-512 BF16), forward and input gradient. A
    /// bf16 step recomputes its layers in f32 activations (`LlamaOptions::recompute_dtype`) and
    /// keeps its products bf16 this way. [`QLinear::matmul_t`] stays exact.
    pub fn with_bf16_products(mut self) -> Self {
        self.bf16_products = true;
        self.fwd = Arc::new(Box::new(self.op(Dir::Forward, true)));
        self
    }

    /// Whether this linear multiplies as bf16 ([`QLinear::with_bf16_products`]); an adapter beside
    /// it takes its products the same way.
    pub fn takes_bf16_products(&self) -> bool {
        self.bf16_products
    }

    /// The op computing `dir` with this weight.
    fn op(&self, dir: Dir, bf16_products: bool) -> QMatMulOp {
        QMatMulOp {
            w: self.weight.clone(),
            dir,
            bf16_products,
            #[cfg(feature = "cuda")]
            gpu: self.gpu.clone(),
        }
    }

    /// The linear named `weight` in `store` (e.g. `model.layers.0.self_attn.q_proj.weight`), with
    /// the bias named `bias` if given; the weight stays a view of the store's bytes, the bias (small)
    /// is dequantised to f32.
    pub fn from_store(store: &WeightStore, weight: &str, bias: Option<&str>) -> Result<Self> {
        let get = |name: &str| {
            store.get(name).ok_or_else(|| Error::MissingTensor {
                path: store.path.clone(),
                tensor: name.to_string(),
                hint: String::new(),
            })
        };
        let w = Arc::new(get(weight)?.clone());
        let bias = match bias {
            None => None,
            Some(name) => {
                let t = get(name)?;
                let n = t.numel();
                if t.qtype == QType::NF4 || t.qtype.bytes_for(n) != Some(t.data.len()) {
                    return Err(Error::Shape {
                        path: store.path.clone(),
                        tensor: name.to_string(),
                        msg: format!(
                            "a {} bias of shape {:?} in {} bytes cannot be read as a vector \
                             (NF4 biases are not supported)",
                            t.qtype.name(),
                            t.shape,
                            t.data.len()
                        ),
                    });
                }
                let mut v = vec![0f32; n];
                dequantize_f32(t.qtype, t.data.as_slice(), &mut v);
                Some(
                    Tensor::from_vec(v, n, &Device::Cpu).map_err(|e| Error::Shape {
                        path: store.path.clone(),
                        tensor: name.to_string(),
                        msg: e.to_string(),
                    })?,
                )
            }
        };
        QLinear::new(w, bias)
    }

    /// The stored weight.
    pub fn weight(&self) -> &Arc<StoredTensor> {
        &self.weight
    }

    /// The bias, if any (f32).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Output features (rows of W).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns of W).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// `x (.., in) · Wᵀ` without the bias, differentiable in x only (DoRA's `A·Wᵀ`).
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.bf16_products {
            false => tape::apply1_arc(&x.contiguous()?, self.fwd.clone()),
            true => tape::apply1(&x.contiguous()?, self.op(Dir::Forward, false)),
        }
    }

    /// Runs `f` on `x·Wᵀ` (`m` rows of `out_features`, f32, no bias) as this layer's forward
    /// computes it before rounding to the activation dtype, in the thread's product buffer (the
    /// one the bf16 forward rounds from). x: f32 or bf16 rows.
    pub(crate) fn with_product<R>(&self, x: Rows<'_>, m: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        let op = self.op(Dir::Forward, self.bf16_products);
        let run = |out: &mut [f32]| {
            op.product_into(x, m, out);
            f(out)
        };
        with_thread_buffer(&PRODUCT, m * self.out_features, PRODUCT_KEEP, run)
    }

    /// `x·Wᵀ + h·Bᵀ` written straight into `y` (f32 or bf16, may be uninitialised) where this
    /// layer's forward takes the tiled bf16 kernels (bf16 rows, or f32 rows with bf16 products):
    /// [`qmatmul_fwd_bf16_into`]. Returns false, y untouched, where it does not.
    pub(crate) fn forward_plus_into(
        &self,
        x: Rows<'_>,
        m: usize,
        lr: LowRank<'_>,
        y: FwdOut<'_>,
    ) -> bool {
        let op = self.op(Dir::Forward, self.bf16_products);
        op.forward_into(x, m, Some(lr), y)
    }

    /// `dy·W` (`m` f32 rows of `out_features` in, f32 out) as [`QLinear::input_grad`] computes it
    /// with bf16 products, and from the same bf16 rows of dy a low-rank term's `dh = dy·B` into
    /// `lr.dh` ([`qmatmul_bwd_input_bf16_into`]); None, dh untouched, where this layer's input
    /// gradient does not take the tiled bf16 kernels (the caller then runs the two apart).
    pub(crate) fn input_grad_plus(
        &self,
        dy: &[f32],
        m: usize,
        lr: LowRankGrad<'_>,
    ) -> Option<Vec<f32>> {
        if !self.bf16_products {
            return None;
        }
        let w = self.weight.matrix();
        written(m * self.in_features, |dx| {
            qmatmul_bwd_input_bf16_into(dy, m, &w, dx, Some(lr))
        })
    }

    /// `dy (.., out) · W` in dy's dtype: the forward's input gradient, as an op (no gradient for W).
    pub(crate) fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        dy.contiguous()?
            .apply_op1(self.op(Dir::InputGrad, self.bf16_products))
    }

    /// The weight's device copies (made on first use on a GPU).
    #[cfg(feature = "cuda")]
    pub fn gpu_cache(&self) -> &Arc<crate::cuda::GpuWeightCache> {
        &self.gpu
    }
}

impl Module for QLinear {
    /// `x (.., in) -> y (.., out)` in x's dtype (f32, bf16 or f16); differentiable in x only.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let supported = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
        if !supported {
            bail!(
                "QLinear '{}': no kernels for {:?}; use the CPU{}",
                self.weight.name,
                x.device(),
                if cfg!(feature = "cuda") {
                    " or CUDA"
                } else {
                    ""
                }
            );
        }
        match x.dims().last() {
            Some(&k) if k == self.in_features => {}
            _ => bail!(
                "QLinear '{}': input of shape {:?} does not end in {} input features",
                self.weight.name,
                x.dims(),
                self.in_features
            ),
        }
        // y: (.., out) = x: (.., in) · Wᵀ
        let y = tape::apply1_arc(&x.contiguous()?, self.fwd.clone())?;
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.to_device(y.device())?.to_dtype(y.dtype())?),
        }
    }
}

/// Activation rows as the quantised products take them.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    /// f32 rows.
    F32(&'a [f32]),
    /// bf16 rows.
    Bf16(&'a [bf16]),
}

std::thread_local! {
    /// A thread's f32 product buffer: a bf16 forward's result before rounding, and the fused
    /// LoRA linear's base product ([`QLinear::with_product`]); reused, since a fresh
    /// activation-sized buffer a call faulted in fresh pages every time.
    static PRODUCT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees this thread's product buffer ([`QLinear::with_product`]), as a step ends: a step's
/// products grow it again, so it counts in the step's memory rather than staying between steps
/// (and a memory plan's step part holds it).
pub(crate) fn release_product_buffer() {
    PRODUCT.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            *b = Vec::new();
        }
    });
}

/// Elements of [`PRODUCT`] a thread keeps (16 MiB: a decoder layer's outputs; a head's logits
/// chunk is not kept).
const PRODUCT_KEEP: usize = 4 << 20;

/// Which product the op computes with the frozen W (N×K).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// `y (M×N) = x (M×K) · Wᵀ`.
    Forward,
    /// `dx (M×K) = dy (M×N) · W`.
    InputGrad,
}

/// One direction of the quantised matmul as a candle op; the other direction is its backward.
struct QMatMulOp {
    w: Arc<StoredTensor>,
    dir: Dir,
    /// f32 arguments run the bf16 kernels (bf16 operands, f32 sums).
    bf16_products: bool,
    #[cfg(feature = "cuda")]
    gpu: Arc<crate::cuda::GpuWeightCache>,
}

impl QMatMulOp {
    /// (width of the argument's last dim, width of the result's last dim).
    fn widths(&self) -> (usize, usize) {
        let (n, k) = (self.w.shape[0], self.w.shape[1]);
        match self.dir {
            Dir::Forward => (k, n),
            Dir::InputGrad => (n, k),
        }
    }

    /// The product of `m` rows of `arg` into `out` (f32, every element written): the f32 kernels
    /// for f32 rows, the bf16 ones for bf16 rows and where the op takes bf16 products.
    fn product_into(&self, arg: Rows<'_>, m: usize, out: &mut [f32]) {
        let w = self.w.matrix();
        match (self.dir, arg, self.bf16_products) {
            (Dir::Forward, Rows::F32(x), false) => qmatmul_fwd(x, m, &w, out),
            (Dir::InputGrad, Rows::F32(x), false) => qmatmul_bwd_input(x, m, &w, out, false),
            (Dir::Forward, Rows::F32(x), true) => qmatmul_fwd_bf16(x, m, &w, out),
            (Dir::InputGrad, Rows::F32(x), true) => qmatmul_bwd_input_bf16(x, m, &w, out, false),
            (Dir::Forward, Rows::Bf16(x), _) => qmatmul_fwd_bf16(x, m, &w, out),
            (Dir::InputGrad, Rows::Bf16(x), _) => qmatmul_bwd_input_bf16(x, m, &w, out, false),
        }
    }

    /// The forward (this op's direction must be it) written straight into `y` where the tiled bf16
    /// kernels run it (bf16 rows, or f32 rows with bf16 products; [`qmatmul_fwd_bf16_into`], with
    /// an optional low-rank term); false, y untouched, elsewhere. The same rule as
    /// [`QMatMulOp::product_into`]'s.
    fn forward_into(&self, x: Rows<'_>, m: usize, lr: Option<LowRank<'_>>, y: FwdOut<'_>) -> bool {
        debug_assert_eq!(self.dir, Dir::Forward);
        let w = self.w.matrix();
        match (x, self.bf16_products) {
            (Rows::Bf16(x), _) => qmatmul_fwd_bf16_into(x, m, &w, lr, y),
            (Rows::F32(x), true) => qmatmul_fwd_bf16_into(x, m, &w, lr, y),
            (Rows::F32(_), false) => false,
        }
    }

    /// Runs the kernel on a contiguous f32 argument of `m` rows.
    fn run(&self, arg: &[f32], m: usize) -> Vec<f32> {
        let (_, out_w) = self.widths();
        // Where the tiled bf16 kernels run, straight into a fresh output (no zero fill).
        let tiled = match (self.dir, self.bf16_products) {
            (Dir::Forward, _) => written(m * out_w, |y| {
                self.forward_into(Rows::F32(arg), m, None, FwdOut::F32(y))
            }),
            (Dir::InputGrad, true) => written(m * out_w, |dx| {
                qmatmul_bwd_input_bf16_into(arg, m, &self.w.matrix(), dx, None)
            }),
            (Dir::InputGrad, false) => None,
        };
        if let Some(v) = tiled {
            return v;
        }
        let mut out = crate::quant::matmul::zeroed(m * out_w, 0f32);
        self.product_into(Rows::F32(arg), m, &mut out);
        out
    }

    /// Runs the bf16 kernel on a bf16 argument of `m` rows; the f32 result rounded back to bf16.
    fn run_bf16(&self, arg: &[bf16], m: usize) -> Vec<bf16> {
        let (_, out_w) = self.widths();
        // The forward, where the tiled kernels run: rounded straight into a fresh output.
        if self.dir == Dir::Forward {
            let y = |y: &mut _| self.forward_into(Rows::Bf16(arg), m, None, FwdOut::Bf16(y));
            if let Some(v) = written(m * out_w, y) {
                return v;
            }
        }
        let mut res = crate::quant::matmul::zeroed(m * out_w, bf16::ZERO);
        // The f32 result lives in a buffer this thread reuses (a fresh activation-sized one per
        // call faulted in fresh pages every time), then is rounded into the bf16 result.
        let run = |out: &mut [f32]| {
            self.product_into(Rows::Bf16(arg), m, out);
            crate::quant::simd::f32_to_bf16_fn(crate::quant::dispatch::active_level())(
                out, &mut res,
            );
        };
        with_thread_buffer(&PRODUCT, m * out_w, PRODUCT_KEEP, run);
        res
    }

    /// Converts a half-precision argument to f32, runs, converts the result back.
    fn run_half<T: WithDType>(
        &self,
        arg: &[T],
        m: usize,
        to: impl Fn(f32) -> T,
        from: impl Fn(T) -> f32,
    ) -> Vec<T> {
        let a: Vec<f32> = arg.iter().map(|&v| from(v)).collect();
        self.run(&a, m).into_iter().map(to).collect()
    }
}

impl CustomOp1 for QMatMulOp {
    fn name(&self) -> &'static str {
        match self.dir {
            Dir::Forward => "qtune-qlinear-fwd",
            Dir::InputGrad => "qtune-qlinear-bwd-input",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (in_w, out_w) = self.widths();
        let dims = layout.shape().dims();
        if dims.last() != Some(&in_w) {
            bail!(
                "{} ('{}'): argument of shape {dims:?} does not end in {in_w}",
                self.name(),
                self.w.name
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!(
                "{} ('{}'): argument must be contiguous",
                self.name(),
                self.w.name
            );
        };
        // m: every leading dim flattened into rows.
        let m: usize = dims[..dims.len() - 1].iter().product();
        debug_assert_eq!(end - start, m * in_w);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked non-empty above") = out_w;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], m)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run_bf16(&v[start..end], m)),
            CpuStorage::F16(v) => {
                CpuStorage::F16(self.run_half(&v[start..end], m, f16::from_f32, f32::from))
            }
            s => bail!(
                "{} ('{}'): unsupported activation dtype {:?}; use f32, bf16 or f16",
                self.name(),
                self.w.name,
                s.dtype()
            ),
        };
        Ok((out, Shape::from(out_dims)))
    }

    /// Dequantises W into the device's shared scratch with our kernels (kernels/dequant.cu), then
    /// one cuBLAS GEMM (src/cuda/); bf16 or f32 activations.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dir = match self.dir {
            Dir::Forward => crate::cuda::Product::Forward,
            Dir::InputGrad => crate::cuda::Product::InputGrad,
        };
        crate::cuda::qmatmul(&self.gpu, &self.w, dir, storage, layout)
    }

    /// d(arg) = the other direction applied to d(result): `dx = dy·W` for the forward, and
    /// `d(dy) = d(dx)·Wᵀ` for the input gradient (second order, used only when candle is told not to
    /// detach gradients). Never a gradient for W.
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let other = QMatMulOp {
            w: self.w.clone(),
            dir: match self.dir {
                Dir::Forward => Dir::InputGrad,
                Dir::InputGrad => Dir::Forward,
            },
            bf16_products: self.bf16_products,
            #[cfg(feature = "cuda")]
            gpu: self.gpu.clone(),
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(other)?))
    }
}
