//! A LoRA adapter on a frozen quantised linear: `y = base(x) + ((dropout(x)·Aᵀ)·Bᵀ)·scale`.
//!
//! A `(r, in)` and B `(out, r)` are candle [`Var`]s, the only trainable tensors; the base is a
//! [`QLinear`], whose backward gives x its gradient and W none. The formula, initialisation and
//! scaling follow PEFT 0.13's `lora.Linear`: A Kaiming-uniform with `a = sqrt(5)` (that is
//! `U(-1/sqrt(in), 1/sqrt(in))`), B zeros, `scale = alpha / r` or `alpha / sqrt(r)` (rsLoRA), the
//! and the dropout on the adapter's input only. (PEFT scales after B; we scale the rank-r product,
//! which differs only by f32 rounding and saves memory.)
use super::qlinear::QLinear;
use crate::nn::fused::DropoutMask;
use crate::rng::SplitMix64;
use crate::{Error, Result};
use candle_core::{DType, Module, ModuleT, Tensor, Var};
use std::sync::atomic::{AtomicU64, Ordering};

/// Hyper-parameters of one LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub r: usize,
    /// Scaling numerator alpha.
    pub alpha: f64,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// Dropout probability on the adapter's input, in [0, 1).
    pub dropout: f32,
    /// dtype of A and B: f32 (parity tests) or bf16 (training); f16 also works.
    pub dtype: DType,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            rslora: false,
            dropout: 0.0,
            dtype: DType::F32,
        }
    }
}

impl LoraConfig {
    /// The factor the adapter's output is multiplied by (PEFT's `scaling`).
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn check(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        check_dropout(self.dropout)?;
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Invalid(format!(
                "LoRA weights must be f32, bf16 or f16, not {:?}",
                self.dtype
            )));
        }
        Ok(())
    }
}

fn check_dropout(p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!(
            "LoRA dropout {p} is outside [0, 1)"
        )));
    }
    Ok(())
}

/// The trainable low-rank factors of one linear (the LoRA method behind
/// [`LinearAdapter`](super::LinearAdapter)): `z = ((dropout(x)·Aᵀ)·scale)·Bᵀ`, added to the base's output.
#[derive(Debug)]
pub struct Lora {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    seed: u64,
    // Dropout masks are keyed by (seed, call number), so a run is reproducible from its seed.
    calls: AtomicU64,
}

impl Lora {
    /// Fresh factors for `base` with PEFT's initialisation from `seed`: A ~ U(-1/sqrt(in),
    /// 1/sqrt(in)), B = 0.
    pub fn new(base: &QLinear, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        cfg.check()?;
        let (n_out, n_in, r) = (base.out_features(), base.in_features(), cfg.r);
        let bound = 1.0 / (n_in as f64).sqrt();
        // A and the dropout masks draw from separate streams of the same seed.
        let mut rng = SplitMix64(seed ^ 0x4c6f_5241_2d41);
        // A: (r, in)
        let a: Vec<f32> = (0..r * n_in)
            .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (r, n_in), &candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(cfg.dtype))
            .map_err(candle_err)?;
        // B: (out, r)
        let b =
            Tensor::zeros((n_out, r), cfg.dtype, &candle_core::Device::Cpu).map_err(candle_err)?;
        Self::from_weights(base, (a, b), cfg.scale(), cfg.dropout, seed)
    }

    /// Factors with given weights `(A (r, in), B (out, r))` for `base`, trained in their dtype.
    pub fn from_weights(
        base: &QLinear,
        (a, b): (Tensor, Tensor),
        scale: f64,
        dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        check_dropout(dropout)?;
        let name = &base.weight().name;
        let r = a.dims().first().copied().unwrap_or(0);
        if a.dims() != [r, base.in_features()] || b.dims() != [base.out_features(), r] || r == 0 {
            return Err(Error::Invalid(format!(
                "LoRA on '{name}': A {:?} and B {:?} do not fit a ({}, {}) base; expected A (r, {}) \
                 and B ({}, r) with r >= 1",
                a.dims(),
                b.dims(),
                base.out_features(),
                base.in_features(),
                base.in_features(),
                base.out_features()
            )));
        }
        if a.dtype() != b.dtype() {
            return Err(Error::Invalid(format!(
                "LoRA on '{name}': A is {:?} but B is {:?}",
                a.dtype(),
                b.dtype()
            )));
        }
        let a = Var::from_tensor(&a.detach()).map_err(candle_err)?;
        let b = Var::from_tensor(&b.detach()).map_err(candle_err)?;
        Ok(Lora {
            a,
            b,
            scale,
            dropout,
            seed,
            calls: AtomicU64::new(0),
        })
    }

    /// The same factors moved to `dev` (as new variables).
    pub fn on_device(self, base: &QLinear, dev: &candle_core::Device) -> Result<Self> {
        if self.a.device().same_device(dev) {
            return Ok(self);
        }
        let to = |v: &Var| v.as_tensor().to_device(dev).map_err(candle_err);
        let (a, b) = (to(&self.a)?, to(&self.b)?);
        Self::from_weights(base, (a, b), self.scale, self.dropout, self.seed)
    }

    /// A `(r, in)`.
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// B `(out, r)`.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The output scale s.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `y + z` for `base`'s output `y = base(x)` and this adapter's `z`: `y` as given, or (None)
    /// computed here, on the CPU in one op with the up projection where `base` has no bias
    /// ([`crate::nn::fused::lora_linear_up`]); `dropout_key` as in [`LoraLinear::forward_with`].
    pub fn add_to(
        &self,
        x: &Tensor,
        base: &QLinear,
        y: Option<Tensor>,
        dropout_key: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        let in_f = base.in_features();
        let mask = dropout_key
            .filter(|_| self.dropout > 0.0)
            .map(|k| self.mask(k));
        if x.device().is_cpu() && self.a.device().is_cpu() {
            // The fused ops (one pass a product, f32 sums, the mask redrawn in backward).
            // Both take the leading dims as rows: no reshape nodes, whose backward would be a
            // zero-filled gradient plus a whole-tensor add each.
            // h: (M, r) f32 = s·drop(x)·Aᵀ
            // (bf16 products where the base takes them: a bf16 step, also in its f32 recompute)
            let bf16 = base.takes_bf16_products();
            let h = crate::nn::fused::lora_down(x, self.a.as_tensor(), self.scale, mask, bf16)?;
            // y + h·Bᵀ: (.., out)
            let b = self.b.as_tensor();
            return match y {
                Some(y) => crate::nn::fused::lora_up_add(&y, &h, b, bf16),
                None if base.bias().is_none() => crate::nn::fused::lora_linear_up(x, base, &h, b),
                None => crate::nn::fused::lora_up_add(&base.forward(x)?, &h, b, bf16),
            };
        }
        let y = match y {
            Some(y) => y,
            None => base.forward(x)?,
        };
        let xd = match mask {
            Some(mask) => x.mul(&Self::mask_tensor(x, mask)?)?,
            None => x.clone(),
        };
        // xl: (M, in) in the adapter's dtype
        let m = x.elem_count() / in_f.max(1);
        let xl = xd.to_dtype(self.a.dtype())?.reshape((m, in_f))?;
        // h: (M, r) = (xl · Aᵀ) · scale; scaling the rank-r tensor rather than z keeps one (M, out)
        // tensor fewer alive in the graph until backward.
        let h = xl.matmul(&self.a.t()?)?.affine(self.scale, 0.0)?;
        // z: (M, out) = h · Bᵀ
        let z = h.matmul(&self.b.t()?)?;
        // y + z: (.., out)
        y.add(&z.to_dtype(y.dtype())?.reshape(y.shape())?)
    }

    /// The dropout mask of the call with dropout key `key` (counter-based: element i's draw
    /// depends on (seed, key, i) only).
    fn mask(&self, key: u64) -> DropoutMask {
        DropoutMask {
            key: SplitMix64::mix(self.seed ^ 0x6472_6f70).wrapping_add(SplitMix64::mix(key)),
            p: self.dropout as f64,
        }
    }

    /// The inverted-dropout mask for `key`: each element 0 with probability p, else 1/(1-p), in
    /// x's shape and dtype.
    pub fn dropout_mask(&self, x: &Tensor, key: u64) -> candle_core::Result<Tensor> {
        Self::mask_tensor(x, self.mask(key))
    }

    fn mask_tensor(x: &Tensor, mask: DropoutMask) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..x.elem_count() as u64).map(|i| mask.factor(i)).collect();
        Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())
    }
}

/// LoRA behind the adapter seam: PEFT's tensor names, and its forward beside the frozen base.
impl super::LinearAdapter for Lora {
    fn forward(&self, c: super::BaseCall<'_>, key: Option<u64>) -> candle_core::Result<Tensor> {
        self.add_to(c.x, c.base, c.y, key)
    }

    fn params(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("lora_A.weight", self.a.clone()),
            ("lora_B.weight", self.b.clone()),
        ]
    }

    fn peft_type(&self) -> &'static str {
        "LORA"
    }
}

/// A frozen quantised linear with a trainable low-rank adapter.
#[derive(Debug)]
pub struct LoraLinear {
    base: QLinear,
    lora: Lora,
}

impl LoraLinear {
    /// A fresh adapter with PEFT's initialisation from `seed`: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    pub fn new(base: QLinear, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let lora = Lora::new(&base, cfg, seed)?;
        Ok(LoraLinear { base, lora })
    }

    /// An adapter with given weights A `(r, in)` and B `(out, r)` (e.g. loaded from a PEFT file),
    /// trained in their dtype.
    pub fn from_weights(
        base: QLinear,
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        let lora = Lora::from_weights(&base, (a, b), scale, dropout, seed)?;
        Ok(LoraLinear { base, lora })
    }

    /// The same adapter with A and B moved to `dev` (as new variables; the base stays where it is).
    pub fn on_device(self, dev: &candle_core::Device) -> Result<Self> {
        let lora = self.lora.on_device(&self.base, dev)?;
        Ok(LoraLinear {
            base: self.base,
            lora,
        })
    }

    /// The frozen base layer.
    pub fn base(&self) -> &QLinear {
        &self.base
    }

    /// The adapter's factors.
    pub fn lora(&self) -> &Lora {
        &self.lora
    }

    /// A `(r, in)`, trainable.
    pub fn a(&self) -> &Var {
        &self.lora.a
    }

    /// B `(out, r)`, trainable.
    pub fn b(&self) -> &Var {
        &self.lora.b
    }

    /// The trainable tensors, A then B.
    pub fn vars(&self) -> [&Var; 2] {
        [&self.lora.a, &self.lora.b]
    }

    /// Rank r.
    pub fn r(&self) -> usize {
        self.lora.a.dims()[0]
    }

    /// The adapter's output scale.
    pub fn scale(&self) -> f64 {
        self.lora.scale
    }

    /// Dropout probability.
    pub fn dropout(&self) -> f32 {
        self.lora.dropout
    }

    /// Forward with an explicit dropout key: `None` is evaluation (no dropout); `Some(k)` draws the
    /// mask from (seed, k), so a recomputation (gradient checkpointing) can repeat the same mask.
    pub fn forward_with(
        &self,
        x: &Tensor,
        dropout_key: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        // base(x) + z: (.., out)
        self.lora.add_to(x, &self.base, None, dropout_key)
    }

    /// The inverted-dropout mask [`Self::forward_with`] multiplies x by for `key`: each element 0
    /// with probability p, else 1/(1-p), in x's shape and dtype.
    pub fn dropout_mask(&self, x: &Tensor, key: u64) -> candle_core::Result<Tensor> {
        self.lora.dropout_mask(x, key)
    }
}

impl ModuleT for LoraLinear {
    /// `train`: dropout on, with a fresh mask per call; otherwise the adapter is deterministic.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let key = train.then(|| self.lora.calls.fetch_add(1, Ordering::Relaxed));
        self.forward_with(x, key)
    }
}

fn candle_err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("LoRA adapter: {e}"))
}
