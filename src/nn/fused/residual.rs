//! The decoder's residual adds fused into the norms, a fused LayerNorm, and the block's last
//! residual add as one op (CPU), each with a hand-written backward.
//!
//! Why: candle runs `x + a` as an element-wise op, LayerNorm as nine ops with their f32
//! intermediates kept by the graph, and its backward accumulates every gradient a node receives
//! with one more add (the first into a fresh zero tensor): in bf16 those adds were the largest
//! item of a step's profile outside the matmuls (docs/BENCHMARKS.md, session 10). A sequential
//! block (`h = x + a; y = norm(h); out = h + mlp(y)`) is here two ops: [`add_rms_norm`] /
//! [`add_layer_norm`] read x and a and write y (h lives only in a row buffer), and
//! [`Residual::output`] writes `out = (x + a) + m` from x, a and m. The graph keeps no h at all
//! (one activation-sized tensor less per layer). In backward, as llm.c's fused residual +
//! LayerNorm does, the norm's op adds its input gradient into the residual path's gradient in the
//! same pass:
//! the output op hands its incoming gradient to the norm op through a shared slot instead of to
//! x and a (candle runs a consumer's backward before its producers', and the output depends on y
//! through the MLP), so x and a each receive one gradient, `dout + norm'(h)·dy`, where the
//! composite adds gave candle five accumulations (h twice, x, a, m) and now three (x, a, m).
//!
//! Why not an op that outputs h too: candle's custom ops return one tensor, so h and y would be
//! narrow views of a `(2, .., C)` output, and candle's backward of each view pads its gradient
//! with zeros to the whole output and concatenates (two full-size tensors and an add per block)
//! before the op's backward sees it. Why not a one-pass add for h with the norm reading it: h is
//! then stored, and its gradient takes two accumulations before the add's backward passes it on
//! (five in all, as the composite). Recomputing `x + a` (one rounding) in the ops that need it
//! costs a read of x and a instead.
use super::*;
use candle_core::{CustomOp2, CustomOp3};

/// The norm of a fused op, with its frozen constants (f32 here; rounded to the activation dtype
/// where torch holds them in it).
#[derive(Clone)]
enum Kind {
    /// transformers' LlamaRMSNorm: `w · (h / sqrt(mean(h²) + eps))`.
    Rms,
    /// torch's `nn.LayerNorm`: `(h − mean) / sqrt(var + eps) · w + b` (biased variance).
    Layer(Arc<Vec<f32>>),
}

/// A norm over the last dim with frozen weight (and bias), optionally of `x + a`.
struct NormOp {
    kind: Kind,
    w: Arc<Vec<f32>>,
    eps: f64,
    /// The gradient slot shared with the block's output op (x + a only).
    link: Option<Link>,
}

/// Where the output op's incoming gradient waits for the norm op's backward.
type Link = Arc<Mutex<Slot>>;

/// The state of a [`Link`] within a backward pass.
enum Slot {
    /// Neither backward has run.
    Empty,
    /// The output op's backward ran first (the usual order) and left its gradient here.
    Grad(Tensor),
    /// The norm op's backward ran first (the output does not depend on y): the output op passes
    /// its gradient to x and a itself.
    NormDone,
}

/// A sequential block's residual `h = x + a` after its norm ([`add_rms_norm`],
/// [`add_layer_norm`]): [`Residual::output`] gives the block's output `h + m`.
pub struct Residual {
    x: Tensor,
    a: Tensor,
    link: Link,
}

impl Residual {
    /// `(x + a) + m`, each sum rounded to the dtype as torch's two adds round, in one pass. Its
    /// backward gives m the incoming gradient, and x and a the same added to the norm's input
    /// gradient (in the norm op's backward pass). CPU only.
    pub fn output(self, m: &Tensor) -> Result<Tensor> {
        add3(&self.x, &self.a, m, Some(self.link))
    }
}

/// `y = layer_norm(x) · w + b` over the last dim, as torch's `nn.LayerNorm` computes it on the CPU:
/// mean, biased variance and `rstd = 1 / sqrt(var + eps)` in f32, `y = (x · rstd − mean · rstd)
/// · w + b` in f32 rounded once to x's dtype (f32, bf16 or f16), with `w` and `b` (frozen
/// constants: no gradient, not graph nodes) rounded to x's dtype first, as a model in that dtype
/// holds them. Backward (torch's): with
/// `g = dy · w`, `dx = rstd · g + k1 · x + k2`, `k1 = (mean · Σg − Σg·x) · rstd³ / C`,
/// `k2 = −k1 · mean − Σg · rstd / C`, where for half-precision x the mean and rstd are rounded
/// to x's dtype first (torch 2.5's CPU `native_layer_norm` returns them in x's dtype and its
/// backward reads those). The graph keeps x only. CPU only: on a GPU the caller runs the
/// composite `models::layer_norm`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let op = NormOp::new("layer_norm", x, w, Some(b), eps)?;
    tape::apply1(&x.contiguous()?, op)
}

/// `y = rms_norm(x + a)` (see [`rms_norm`]) with the sum `h = x + a` rounded to the activation
/// dtype first, as torch's `residual + hidden_states`, and h's other use: [`Residual::output`]
/// gives the block's output `h + m` (h itself is never stored). Backward: `dx = da = dh`, the norm's
/// input gradient rounded to the dtype, plus the output's gradient (rounded again: torch's
/// accumulation of h's two gradients in the dtype).
pub fn add_rms_norm(x: &Tensor, a: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Residual)> {
    NormOp::new("add_rms_norm", x, w, None, eps)?.apply2(x, a)
}

/// `layer_norm(x + a)` (see [`layer_norm`]) with the sum rounded to the activation dtype first;
/// as [`add_rms_norm`] otherwise.
pub fn add_layer_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, Residual)> {
    NormOp::new("add_layer_norm", x, w, Some(b), eps)?.apply2(x, a)
}

/// `(p + q) + r` in one pass, each sum rounded to the dtype as torch's two adds round: a
/// sequential block's output `(x + a) + m`, or a parallel one's `(m + a) + x` (transformers'
/// Falcon: `mlp_output += attention_output; residual + mlp_output`). Backward: the incoming
/// gradient to all three. One shape and float dtype; CPU only.
pub fn residual_add3(p: &Tensor, q: &Tensor, r: &Tensor) -> Result<Tensor> {
    add3(p, q, r, None)
}

fn add3(p: &Tensor, q: &Tensor, r: &Tensor, link: Option<Link>) -> Result<Tensor> {
    check_cpu("residual_add3", &[p, q, r])?;
    for t in [q, r] {
        if t.dims() != p.dims() || t.dtype() != p.dtype() {
            bail!(
                "residual_add3: operands {:?} {:?} and {:?} {:?} must share shape and dtype",
                p.dims(),
                p.dtype(),
                t.dims(),
                t.dtype()
            );
        }
    }
    tape::apply3(
        &p.contiguous()?,
        &q.contiguous()?,
        &r.contiguous()?,
        Add3Op { link },
    )
}

/// Rows a parallel task takes at least (a row is one token's C values).
const MIN_ROWS: usize = 4;

impl NormOp {
    /// The op for `x`'s last dim with weight `w` and (LayerNorm) bias `b`, shapes checked.
    fn new(op: &str, x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Self> {
        check_cpu(op, &[x])?;
        let c = x.dims().last().copied().unwrap_or(0);
        for t in std::iter::once(w).chain(b) {
            if t.dims() != [c] {
                bail!(
                    "{op}: weight or bias of shape {:?} does not match the last dim of x {:?}",
                    t.dims(),
                    x.dims()
                );
            }
        }
        let kind = match b {
            Some(b) => Kind::Layer(Arc::new(const_f32(b, op)?)),
            None => Kind::Rms,
        };
        let w = Arc::new(const_f32(w, op)?);
        Ok(NormOp {
            kind,
            w,
            eps,
            link: None,
        })
    }

    /// The op on `x + a`, linked to the [`Residual`] it returns.
    fn apply2(mut self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Residual)> {
        check_cpu(self.name(), &[a])?;
        if a.dims() != x.dims() || a.dtype() != x.dtype() {
            bail!(
                "{}: x {:?} {:?} and a {:?} {:?} must share shape and dtype",
                self.name(),
                x.dims(),
                x.dtype(),
                a.dims(),
                a.dtype()
            );
        }
        let (x, a) = (x.contiguous()?, a.contiguous()?);
        let link = Arc::new(Mutex::new(Slot::Empty));
        self.link = Some(link.clone());
        let y = tape::apply2(&x, &a, self)?;
        Ok((y, Residual { x, a, link }))
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Rms => "qtune-add-rms-norm",
            Kind::Layer(_) => "qtune-layer-norm",
        }
    }

    /// The weight and bias as a model in dtype T holds them (rounded; exact for f32).
    fn consts<T: Elem>(&self) -> (Vec<f32>, Vec<f32>) {
        let round = |v: &f32| T::of(*v).f();
        let b = match &self.kind {
            Kind::Layer(b) => b.iter().map(round).collect(),
            Kind::Rms => Vec::new(),
        };
        (self.w.iter().map(round).collect(), b)
    }

    /// (mean, rstd) of a row: mean 0 for RMSNorm (its rstd is over mean(h²)); sums in f32 with
    /// eight accumulators, the variance two-pass (around the mean).
    fn stats(&self, h: &[f32]) -> (f32, f32) {
        let c = h.len() as f64;
        match self.kind {
            Kind::Rms => {
                let ms = dot(h, h) as f64 / c;
                (0.0, (1.0 / (ms + self.eps).sqrt()) as f32)
            }
            // torch's float kernel: variance, + eps, sqrt and reciprocal in f32
            Kind::Layer(_) => {
                let mean = (sum(h) as f64 / c) as f32;
                let var = (sum_sq_dev(h, mean) as f64 / c) as f32;
                (mean, 1.0 / (var + self.eps as f32).sqrt())
            }
        }
    }

    /// y of one row of h (f32 values already in the activation dtype) with torch's roundings.
    fn fwd_row<T: Elem>(&self, h: &[f32], w: &[f32], b: &[f32], y: &mut Span<'_, T>) {
        let (mean, r) = self.stats(h);
        let (c, w) = (h.len(), &w[..h.len()]);
        match self.kind {
            // transformers rounds h·rstd to the dtype, multiplies by w in it and rounds again
            Kind::Rms => y.put_blocks(c, T::put_row, |j0, out| {
                let (h, w) = (&h[j0..j0 + out.len()], &w[j0..j0 + out.len()]);
                for ((o, &h), &w) in out.iter_mut().zip(h).zip(w) {
                    *o = w * T::of(h * r).f();
                }
            }),
            // torch's CPU kernel: (h·scale + bias)·w + b in f32, one rounding
            Kind::Layer(_) => {
                let (bias, b) = (-r * mean, &b[..c]);
                y.put_blocks(c, T::put_row, |j0, out| {
                    let n = out.len();
                    let (h, w, b) = (&h[j0..j0 + n], &w[j0..j0 + n], &b[j0..j0 + n]);
                    for (((o, &h), &w), &b) in out.iter_mut().zip(h).zip(w).zip(b) {
                        *o = (h * r + bias) * w + b;
                    }
                });
            }
        }
    }

    /// dh of one row (f32) from h and dy. RMSNorm: with g = dy·w rounded to the dtype (torch's
    /// backward of its product in that dtype), dh = r·g − h·r³·mean(g·h). LayerNorm: see
    /// [`layer_norm`].
    fn bwd_row<T: Elem>(&self, h: &[f32], dy: &[f32], w: &[f32], g: &mut [f32], dh: &mut [f32]) {
        let (mean, r) = self.stats(h);
        let c = h.len() as f32;
        match self.kind {
            Kind::Rms => {
                for ((g, &d), &w) in g.iter_mut().zip(dy).zip(w) {
                    *g = T::of(d * w).f();
                }
                let k = ((r as f64).powi(3) * dot(g, h) as f64 / c as f64) as f32;
                for ((dh, &g), &h) in dh.iter_mut().zip(g.iter()).zip(h) {
                    *dh = r * g - k * h;
                }
            }
            Kind::Layer(_) => {
                // torch keeps a half-precision input's mean and rstd in its dtype for backward
                let (mean, r) = (T::of(mean).f(), T::of(r).f());
                for ((g, &d), &w) in g.iter_mut().zip(dy).zip(w) {
                    *g = d * w;
                }
                let (sg, sgh) = (sum(g), dot(g, h));
                let k1 = (mean * sg - sgh) * r * r * r / c;
                let k2 = -k1 * mean - sg * r / c;
                for ((dh, &g), &h) in dh.iter_mut().zip(g.iter()).zip(h) {
                    *dh = r * g + k1 * h + k2;
                }
            }
        }
    }

    /// Row `i`'s h: x's row, plus a's rounded to T where there is one.
    fn h_row<T: Elem>(x: &[T], a: Option<&[T]>, h: &mut [f32]) {
        match a {
            Some(a) => {
                for ((h, &x), &a) in h.iter_mut().zip(x).zip(a) {
                    *h = T::of(x.f() + a.f()).f();
                }
            }
            None => {
                for (h, &x) in h.iter_mut().zip(x) {
                    *h = x.f();
                }
            }
        }
    }

    /// A tensor of `len` elements of T computed a row of C at a time, rows in parallel: `f(buf,
    /// rows, out)` writes into `out` the row of the element range `rows` of row-major inputs,
    /// with a task's scratch of `scratch` rows of f32 (reused across its rows).
    fn by_rows<T: Elem>(
        &self,
        len: usize,
        scratch: usize,
        f: impl Fn(&mut [f32], std::ops::Range<usize>, &mut Span<'_, T>) + Sync + Send,
    ) -> Vec<T> {
        let c = self.w.len();
        if c == 0 {
            return vec![T::of(0.0); len];
        }
        par_spans_init(
            len,
            (c, MIN_ROWS),
            T::of(0.0),
            || vec![0f32; scratch * c],
            |buf, i, out| f(buf, i * c..(i + 1) * c, out),
        )
    }

    fn forward<T: Elem>(&self, x: &[T], a: Option<&[T]>) -> Vec<T> {
        let (w, b) = self.consts::<T>();
        self.by_rows(x.len(), 1, |h, rows, y| {
            Self::h_row(&x[rows.clone()], a.map(|a| &a[rows]), h);
            self.fwd_row(h, &w, &b, y);
        })
    }

    /// The input gradient rounded to T, for x alone or for x + a, plus the residual path's
    /// gradient `res` where given (rounded again, as torch accumulates h's two gradients).
    fn backward<T: Elem>(&self, x: &[T], a: Option<&[T]>, dy: &[T], res: Option<&[T]>) -> Vec<T> {
        let (c, (w, _)) = (self.w.len(), self.consts::<T>());
        self.by_rows(x.len(), 4, |buf, rows, dx| {
            let (h, rest) = buf.split_at_mut(c);
            let (d, rest) = rest.split_at_mut(c);
            let (g, out) = rest.split_at_mut(c);
            Self::h_row(&x[rows.clone()], a.map(|a| &a[rows.clone()]), h);
            for (d, &v) in d.iter_mut().zip(&dy[rows.clone()]) {
                *d = v.f();
            }
            self.bwd_row::<T>(h, d, &w, g, out);
            match res {
                Some(res) => {
                    let res = &res[rows];
                    dx.put_with(c, |j| T::of(res[j].f() + T::of(out[j]).f()));
                }
                None => T::put_row(dx, out),
            }
        })
    }

    /// The input gradient as a tensor of x's shape and dtype (x, a, dy, res on the CPU).
    fn grad(
        &self,
        x: &Tensor,
        a: Option<&Tensor>,
        dy: &Tensor,
        res: Option<&Tensor>,
    ) -> Result<Tensor> {
        let name = self.name();
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let res = res
            .map(|r| r.to_dtype(x.dtype())?.contiguous())
            .transpose()?;
        let (sx, lx) = x.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        let sa = a.map(|a| a.storage_and_layout());
        let sr = res.as_ref().map(|r| r.storage_and_layout());
        let ca = match &sa {
            None => None,
            Some((s, l)) => Some((cpu_storage(s, name)?, *l)),
        };
        let cr = match &sr {
            None => None,
            Some((s, l)) => Some((cpu_storage(s, name)?, *l)),
        };
        let (Storage::Cpu(cx), Storage::Cpu(cd)) = (&*sx, &*sd) else {
            bail!("{name}: only the CPU kernels exist");
        };
        macro_rules! grad {
            ($v:ident) => {{
                let (CpuStorage::$v(x), CpuStorage::$v(d)) = (cx, cd) else {
                    bail!("{name}: x and its gradient must share one dtype")
                };
                let a = match ca {
                    Some((CpuStorage::$v(a), la)) => Some(slice_of(a, la, name)?),
                    Some(_) => bail!("{name}: x and a must share one dtype"),
                    None => None,
                };
                let r = match cr {
                    Some((CpuStorage::$v(r), lr)) => Some(slice_of(r, lr, name)?),
                    Some(_) => bail!("{name}: x and the residual gradient must share one dtype"),
                    None => None,
                };
                let (x, d) = (slice_of(x, lx, name)?, slice_of(d, ld, name)?);
                Tensor::from_vec(self.backward(x, a, d, r), lx.dims(), &Device::Cpu)
            }};
        }
        match x.dtype() {
            DType::F32 => grad!(F32),
            DType::BF16 => grad!(BF16),
            DType::F16 => grad!(F16),
            d => bail!("{name}: unsupported dtype {d:?}; use f32, bf16 or f16"),
        }
    }
}

/// The CPU storage behind a tensor's storage, or an error naming the op.
fn cpu_storage<'a>(s: &'a Storage, op: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(s) => Ok(s),
        _ => bail!("{op}: only the CPU kernels exist"),
    }
}

/// The forward of a norm op on storages: x alone or x + a.
fn norm_fwd(
    op: &NormOp,
    sx: &CpuStorage,
    lx: &Layout,
    a: Option<(&CpuStorage, &Layout)>,
) -> CpuOut {
    let name = op.name();
    macro_rules! fwd {
        ($v:ident, $x:expr) => {{
            let a = match a {
                Some((CpuStorage::$v(a), la)) => Some(slice_of(a, la, name)?),
                Some(_) => bail!("{name}: x and a must share one dtype"),
                None => None,
            };
            CpuStorage::$v(op.forward(slice_of($x, lx, name)?, a))
        }};
    }
    let y = match sx {
        CpuStorage::F32(x) => fwd!(F32, x),
        CpuStorage::BF16(x) => fwd!(BF16, x),
        CpuStorage::F16(x) => fwd!(F16, x),
        s => bail!(
            "{name}: unsupported dtype {:?}; use f32, bf16 or f16",
            s.dtype()
        ),
    };
    Ok((y, lx.shape().clone()))
}

impl CustomOp1 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        norm_fwd(self, s, l, None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(x, None, dy, None)?))
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sa: &CpuStorage, la: &Layout) -> CpuOut {
        norm_fwd(self, sx, lx, Some((sa, la)))
    }

    /// One input gradient, the same for both operands, with the output op's gradient added
    /// where it left it in the link.
    fn bwd(&self, x: &Tensor, a: &Tensor, _y: &Tensor, dy: &Tensor) -> Grads2 {
        let res = match &self.link {
            None => None,
            Some(link) => {
                let mut slot = link.lock().expect("the residual link's lock");
                match std::mem::replace(&mut *slot, Slot::Empty) {
                    Slot::Grad(g) => Some(g),
                    _ => {
                        *slot = Slot::NormDone;
                        None
                    }
                }
            }
        };
        let dh = self.grad(x, Some(a), dy, res.as_ref())?;
        Ok((Some(dh.clone()), Some(dh)))
    }
}

/// `(p + q) + r`; linked to a norm op of `p + q` (a [`Residual`]) or not.
struct Add3Op {
    link: Option<Link>,
}

/// Elements a parallel task of [`Add3Op`] takes.
const CHUNK: usize = 4096;

impl Add3Op {
    fn forward<T: Elem>(p: &[T], q: &[T], r: &[T]) -> Vec<T> {
        par_spans(p.len(), CHUNK, T::of(0.0), |_, y| {
            let span = y.range();
            let (p, q, r) = (&p[span.clone()], &q[span.clone()], &r[span]);
            y.put_blocks(p.len(), T::put_row, |j0, out| {
                let n = out.len();
                let (p, q, r) = (&p[j0..j0 + n], &q[j0..j0 + n], &r[j0..j0 + n]);
                for (((o, p), q), r) in out.iter_mut().zip(p).zip(q).zip(r) {
                    // (p + q) rounded to T, as two adds in T round
                    *o = T::of(p.f() + q.f()).f() + r.f();
                }
            });
        })
    }
}

impl CustomOp3 for Add3Op {
    fn name(&self) -> &'static str {
        "qtune-residual-add3"
    }

    fn cpu_fwd(
        &self,
        sp: &CpuStorage,
        lp: &Layout,
        sq: &CpuStorage,
        lq: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> CpuOut {
        let name = self.name();
        macro_rules! fwd {
            ($p:expr, $q:expr, $r:expr) => {
                Self::forward(
                    slice_of($p, lp, name)?,
                    slice_of($q, lq, name)?,
                    slice_of($r, lr, name)?,
                )
            };
        }
        let y = match (sp, sq, sr) {
            (CpuStorage::F32(p), CpuStorage::F32(q), CpuStorage::F32(r)) => {
                CpuStorage::F32(fwd!(p, q, r))
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(q), CpuStorage::BF16(r)) => {
                CpuStorage::BF16(fwd!(p, q, r))
            }
            (CpuStorage::F16(p), CpuStorage::F16(q), CpuStorage::F16(r)) => {
                CpuStorage::F16(fwd!(p, q, r))
            }
            _ => bail!("{name}: operands must share one float dtype (f32, bf16 or f16)"),
        };
        Ok((y, lp.shape().clone()))
    }

    /// The incoming gradient, unchanged, for each operand (one tensor, shared); linked to a
    /// norm op whose backward is still to run, p's and q's share goes to it instead.
    fn bwd(&self, p: &Tensor, _q: &Tensor, _r: &Tensor, _y: &Tensor, dy: &Tensor) -> Grads3 {
        let g = dy.to_dtype(p.dtype())?;
        if let Some(link) = &self.link {
            let mut slot = link.lock().expect("the residual link's lock");
            if !matches!(*slot, Slot::NormDone) {
                *slot = Slot::Grad(g.clone());
                return Ok((None, None, Some(g)));
            }
        }
        Ok((Some(g.clone()), Some(g.clone()), Some(g)))
    }
}

/// Σ a with eight independent accumulators (vectorised).
#[inline]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ch = a.chunks_exact(8);
    let tail: f32 = ch.remainder().iter().sum();
    for x in ch {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ (a − m)² with eight independent accumulators.
#[inline]
fn sum_sq_dev(a: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let ch = a.chunks_exact(8);
    let tail: f32 = ch.remainder().iter().map(|x| (x - m) * (x - m)).sum();
    for x in ch {
        for l in 0..8 {
            let d = x[l] - m;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}
