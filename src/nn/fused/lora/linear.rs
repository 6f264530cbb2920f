//! The frozen linear and LoRA's up projection as one op: `base(x) + h·Bᵀ`.
//!
//! Why: apart, the base's product is a tensor of its own (zero-filled, written, and in a bf16
//! step rounded to bf16), [`lora_up_add`] reads it and writes the sum into another, and candle's
//! backward accumulates that tensor's gradient onto a zero tensor before the base's input
//! gradient reads it. Here the base's f32 product stays in the thread's product buffer
//! ([`QLinear::with_product`]), `h·Bᵀ` is added to it in f32 and the sum is rounded once; the
//! backward takes x's gradient straight from the output's. With bf16 products the base's kernels
//! sum `h·Bᵀ` in the product's own accumulators, one more round of pairs a tile (the same bf16
//! operands as the two ops, other f32 sums); with f32 products the result is the two ops' to the
//! bit.
use super::*;
use crate::lora::qlinear::Rows;
use crate::quant::matmul::written;
use crate::quant::matmul_bf16::{LowRank, LowRankGrad};
use std::mem::MaybeUninit;

/// `base(x) + h·Bᵀ` in x's dtype for `x (.., I)` (M rows), `h (M, R)` f32 and `b (O, R)`, where
/// `base` has no bias: [`lora_up_add`] of the base's output without that output existing.
/// Backward: `dx = d·W` (the base's input gradient), `dh = d·B` (f32), `dB = dᵀ·h` in b's dtype.
/// The products take bf16 operands as the base does ([`QLinear::takes_bf16_products`]).
pub fn lora_linear_up(x: &Tensor, base: &QLinear, h: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_cpu("lora_linear_up", &[x, h, b])?;
    let ((m, i), (mh, r), (ob, rb)) = (rows_of(x.dims())?, h.dims2()?, b.dims2()?);
    let (o, fits) = (
        base.out_features(),
        i == base.in_features() && base.bias().is_none(),
    );
    if !fits || m != mh || o != ob || r != rb || h.dtype() != DType::F32 {
        bail!(
            "lora_linear_up: x {:?}, h {:?} ({:?}, must be f32) and B {:?} do not fit (.., I), \
             (M, R), (O, R) of a bias-free {o} x {} linear",
            x.dims(),
            h.dims(),
            h.dtype(),
            b.dims(),
            base.in_features()
        );
    }
    let bf16 = base.takes_bf16_products() || x.dtype() == DType::BF16;
    let op = LinearUpOp {
        base: base.clone(),
        up: UpOp {
            bf16: bf16::takes_bf16(bf16),
        },
    };
    tape::apply3(&x.contiguous()?, &h.contiguous()?, &b.contiguous()?, op)
}

struct LinearUpOp {
    base: QLinear,
    up: UpOp,
}

impl LinearUpOp {
    /// `x·Wᵀ + h·Bᵀ` (M, O) in T for x's `m` rows.
    /// With bf16 products the base's kernels sum `h·Bᵀ` in the product's own accumulators and
    /// write each tile straight into the output (`quant/matmul_bf16/direct.rs`); elsewhere
    /// (f32 products, f16, shapes the tiled kernels do not take) [`UpOp::forward`] adds it to the
    /// base's product.
    fn forward<T: Elem>(&self, x: &[T], h: &[f32], b: &[f32], m: usize) -> Vec<T> {
        let o = self.base.out_features();
        let rows = match (T::as_f32(x), T::as_bf16(x)) {
            (Some(x), _) => Some(Rows::F32(x)),
            (_, Some(x)) => Some(Rows::Bf16(x)),
            _ => None,
        };
        if let (Some(rows), true) = (rows, self.up.bf16) {
            let lr = LowRank {
                h,
                b,
                r: b.len() / o.max(1),
            };
            let write = |y: &mut [MaybeUninit<T>]| {
                T::fwd_out(y).is_some_and(|y| self.base.forward_plus_into(rows, m, lr, y))
            };
            if let Some(out) = written(m * o, write) {
                return out;
            }
        }
        let add = |y: &[f32]| self.up.forward::<f32, T>(y, h, b, o);
        match rows {
            Some(x) => self.base.with_product(x, m, add),
            // f16: the base's f32 kernels take it widened, as its own forward does.
            None => {
                let x: Vec<f32> = x.iter().map(|v| v.f()).collect();
                self.base.with_product(Rows::F32(&x), m, add)
            }
        }
    }
}

impl LinearUpOp {
    /// `dx = d·W` and `dh = d·B` from one rounding of d to bf16 ([`QLinear::input_grad_plus`]:
    /// B's columns beside W's in the input gradient's product), where d is f32 (a bf16 step's f32
    /// recompute) and the products bf16; None where they run apart.
    fn joined_input_grads(&self, d: &Tensor, b: &Tensor) -> Result<Option<(Tensor, Vec<f32>)>> {
        if !self.up.bf16 || d.dtype() != DType::F32 {
            return Ok(None);
        }
        let ((m, _), (_, r)) = (rows_of(d.dims())?, b.dims2()?);
        let b32 = const_f32(b, self.name())?;
        let mut dh = vec![0f32; m * r];
        let dx = with_f32(d, self.name(), |ds| {
            let lr = LowRankGrad {
                b: &b32,
                r,
                dh: &mut dh,
            };
            self.base.input_grad_plus(ds, m, lr)
        })?;
        let Some(dx) = dx else {
            return Ok(None);
        };
        let mut dims = d.dims().to_vec();
        *dims.last_mut().expect("rows_of checked the rank") = self.base.in_features();
        Ok(Some((Tensor::from_vec(dx, dims, &Device::Cpu)?, dh)))
    }
}

impl CustomOp3 for LinearUpOp {
    fn name(&self) -> &'static str {
        "qtune-lora-linear-up"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sh: &CpuStorage,
        lh: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CpuOut {
        let (m, _) = rows_of(lx.dims())?;
        let h = f32_of(sh, lh, self.name())?;
        let b = f32_of(sb, lb, self.name())?;
        let name = self.name();
        let out = map_float_storage!(sx, lx, name, |x| self.forward(x, &h, &b, m));
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("rows_of checked the rank") = self.base.out_features();
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, h: &Tensor, b: &Tensor, _out: &Tensor, d: &Tensor) -> Grads3 {
        let d = d.to_dtype(x.dtype())?.contiguous()?;
        let (dx, dh) = match self.joined_input_grads(&d, b)? {
            Some((dx, dh)) => (dx, Some(dh)),
            None => (self.base.input_grad(&d)?, None),
        };
        let (dh, db) = self.up.grads(self.name(), (h, b), &d, dh)?;
        Ok((Some(dx), Some(dh), db))
    }
}
