//! DoRA (weight-decomposed low-rank adaptation) on a frozen quantised linear, as PEFT 0.13.2's
//! `DoraLinearLayer` computes it:
//!
//! ```text
//! y = (m / n) ⊙ (W·x + s·B·A·drop(x)) + b,   n = ‖W + s·B·A‖ per output row, DETACHED
//! ```
//!
//! m `(out,)` (PEFT's `lora_magnitude_vector`) trains with A `(r, in)` and B `(out, r)`; n carries
//! no gradient (paper §4.3, PEFT's `weight_norm.detach()`). A fresh adapter has B = 0 and m = ‖W‖,
//! so it starts as the base; a loaded one keeps its stored m.
//!
//! n is never computed from a dequantised W. With ‖W‖²_row fixed (computed once here, tile by tile
//! from the quantised weight),
//!
//! ```text
//! n² = ‖W‖² + 2s·rowsum((W·Aᵀ) ⊙ B) + s²·rowsum((B·(A·Aᵀ)) ⊙ B)
//! ```
//!
//! where `W·Aᵀ = (A·Wᵀ)ᵀ` is the frozen [`QLinear`] applied to A's r rows, once per change of A
//! and B: a separate call of r rows, which costs a whole dequantisation pass over W (the kernels'
//! cost at a few rows). Joining them into the layer's own call would save that pass; it was
//! tried (session 6) and taken out because `--resume` stopped being bit-identical in f32. n is cached with a hash of A and B, so the recompute, evaluation and decoding reuse it.
//!
//! The output scaling `y' = u + (u − b) ⊙ (m/n − 1)` (u the LoRA output) is one fused op on the
//! CPU ([`crate::nn::fused::scale_residual`]): one pass forward and one backward, where candle's
//! composite ops took six activation-sized passes per linear and step.
//!
//! Dropout: PEFT (training, dropout > 0) runs the base term on `drop(x)` too, at the price of a
//! second base product; we keep the base on x and drop only the adapter's input (the same
//! expectation, no extra product). With dropout 0 (and in evaluation) the two are identical.
use super::lora::{Lora, LoraConfig};
use super::qlinear::QLinear;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Rows dequantised at once when measuring ‖W‖² (a tile of this many rows is the only f32 copy).
const NORM_TILE_ROWS: usize = 16;

/// The DoRA adapter of one linear: LoRA's factors plus the magnitude m.
#[derive(Debug)]
pub struct Dora {
    lora: Lora,
    /// m `(out,)`, trainable, in the factors' dtype.
    m: Var,
    /// ‖W‖² per row `(out,)`, f32, constant (on the adapter's device).
    w_norm2: Tensor,
    /// The last n with a hash of the A and B bits it was computed from (CPU only): the
    /// checkpointed recompute, evaluation and decoding reuse it instead of another product.
    norm_cache: std::sync::Mutex<Option<(u64, Tensor)>>,
}

/// ‖W_row‖² of every row of a frozen linear's weight, in f64 sums per row, dequantising
/// [`NORM_TILE_ROWS`] rows at a time (in parallel over tiles).
pub fn row_norms2(base: &QLinear) -> Vec<f32> {
    let w = base.weight().matrix();
    let (rows, cols) = (w.rows, w.cols);
    let mut out = vec![0f32; rows];
    out.par_chunks_mut(NORM_TILE_ROWS)
        .enumerate()
        .for_each(|(t, dst)| {
            let row0 = t * NORM_TILE_ROWS;
            let mut tile = vec![0f32; dst.len() * cols];
            w.dequant_tile(row0, dst.len(), 0, cols, &mut tile);
            for (o, row) in dst.iter_mut().zip(tile.chunks_exact(cols.max(1))) {
                *o = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32;
            }
        });
    out
}

impl Dora {
    /// A fresh adapter on `base`: LoRA's initialisation from `seed` (A uniform, B = 0) and m = ‖W‖
    /// per row, so its output equals the base's.
    pub fn new(base: &QLinear, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let lora = Lora::new(base, cfg, seed)?;
        let n2 = row_norms2(base);
        let m: Vec<f32> = n2.iter().map(|v| v.sqrt()).collect();
        let m = Tensor::from_vec(m, n2.len(), &Device::Cpu)
            .and_then(|t| t.to_dtype(cfg.dtype))
            .map_err(candle_err)?;
        Self::assemble(base, lora, m, n2)
    }

    /// An adapter with given A `(r, in)`, B `(out, r)` and m `(out,)` (e.g. from a PEFT DoRA
    /// directory; m is kept as given, never recomputed), trained in A's dtype.
    pub fn from_weights(
        base: &QLinear,
        a: Tensor,
        b: Tensor,
        m: Tensor,
        scale: f64,
        dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        let dtype = a.dtype();
        let lora = Lora::from_weights(base, (a, b), scale, dropout, seed)?;
        let m = m.to_dtype(dtype).map_err(candle_err)?;
        Self::assemble(base, lora, m, row_norms2(base))
    }

    fn assemble(base: &QLinear, lora: Lora, m: Tensor, n2: Vec<f32>) -> Result<Self> {
        let out = base.out_features();
        if m.dims() != [out] {
            return Err(Error::Invalid(format!(
                "DoRA on '{}': magnitude of shape {:?}, expected [{out}] (one per output row)",
                base.weight().name,
                m.dims()
            )));
        }
        let dev = lora.a().device().clone();
        let w_norm2 = Tensor::from_vec(n2, out, &dev).map_err(candle_err)?;
        let m = Var::from_tensor(&m.detach().to_device(&dev).map_err(candle_err)?)
            .map_err(candle_err)?;
        Ok(Dora {
            lora,
            m,
            w_norm2,
            norm_cache: std::sync::Mutex::new(None),
        })
    }

    /// The same adapter with its tensors on `dev` (as new variables).
    pub fn on_device(self, base: &QLinear, dev: &Device) -> Result<Self> {
        if self.m.device().same_device(dev) {
            return Ok(self);
        }
        let lora = self.lora.on_device(base, dev)?;
        let m = self.m.as_tensor().clone();
        let n2 = self.w_norm2.to_vec1::<f32>().map_err(candle_err)?;
        Self::assemble(base, lora, m, n2)
    }

    /// The LoRA factors.
    pub fn lora(&self) -> &Lora {
        &self.lora
    }

    /// The magnitude m `(out,)`.
    pub fn magnitude(&self) -> &Var {
        &self.m
    }

    /// n = ‖W + s·B·A‖ per row `(out,)`, f32, detached, from the current A and B without
    /// dequantising W (see the module comment).
    pub fn weight_norm(&self, base: &QLinear) -> candle_core::Result<Tensor> {
        if !self.m.device().is_cpu() {
            return self.compute_norm(base);
        }
        let key = self.factors_hash()?;
        if let Some(n) = self.cached_norm(key) {
            return Ok(n);
        }
        let n = self.compute_norm(base)?;
        self.store_norm(key, &n);
        Ok(n)
    }

    /// The cached n if it was computed from factors hashing to `key`.
    fn cached_norm(&self, key: u64) -> Option<Tensor> {
        let cache = self.norm_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, n)| n.clone())
    }

    fn store_norm(&self, key: u64, n: &Tensor) {
        *self.norm_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, n.clone()));
    }

    /// A 64-bit hash of the bits of A and B (r·(in + out) elements: small beside W).
    fn factors_hash(&self) -> candle_core::Result<u64> {
        let mut h = 0x243f_6a88_85a3_08d3u64;
        for v in [self.lora.a(), self.lora.b()] {
            let t = v.as_tensor().flatten_all()?;
            let bits: Vec<u64> = match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect(),
                _ => (t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect(),
            };
            for (i, b) in bits.into_iter().enumerate() {
                h = (h ^ b ^ ((i as u64) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                h ^= h >> 29;
            }
        }
        Ok(h)
    }

    fn compute_norm(&self, base: &QLinear) -> candle_core::Result<Tensor> {
        // a: (r, in) f32, no graph; aw: (r, out) = A·Wᵀ, the frozen product on A's r rows
        let a = self.lora.a().as_tensor().detach().to_dtype(DType::F32)?;
        self.norm_from(&base.matmul_t(&a)?)
    }

    /// n from `aw = A·Wᵀ (r, out)` (f32) and the current A and B.
    fn norm_from(&self, aw: &Tensor) -> candle_core::Result<Tensor> {
        let s = self.lora.scale();
        // a: (r, in), b: (out, r), f32, no graph
        let a = self.lora.a().as_tensor().detach().to_dtype(DType::F32)?;
        let b = self.lora.b().as_tensor().detach().to_dtype(DType::F32)?;
        // cross: (out,) = rowsum((W·Aᵀ) ⊙ B)
        let cross = aw.t()?.mul(&b)?.sum(1)?;
        // ba2: (out,) = rowsum((B·(A·Aᵀ)) ⊙ B) = ‖B·A‖² per row
        let aat = a.matmul(&a.t()?)?;
        let ba2 = b.matmul(&aat)?.mul(&b)?.sum(1)?;
        let n2 = (self.w_norm2.add(&cross.affine(2.0 * s, 0.0)?)? + ba2.affine(s * s, 0.0)?)?;
        // Rounding can take an exactly-zero row a hair below 0.
        n2.clamp(0f32, f32::INFINITY)?.sqrt()
    }

    /// `(m / n) ⊙ (y - b + s·B·A·drop(x)) + b` for the base output `y = W·x + b` (None: computed
    /// with the LoRA term, as [`Lora::add_to`] does) and the norm n.
    fn scale_output(
        &self,
        x: &Tensor,
        base: &QLinear,
        y: Option<Tensor>,
        n: &Tensor,
        dropout_key: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        // u: (.., out) = W·x + b + s·B·A·drop(x)
        let u = self.lora.add_to(x, base, y, dropout_key)?;
        // g: (out,) = m / n - 1, f32: near 0, so the scaled term keeps its relative precision in
        // a half-precision u (m / n itself near 1 would not).
        let g = self
            .m
            .as_tensor()
            .to_dtype(DType::F32)?
            .div(n)?
            .affine(1.0, -1.0)?;
        if u.device().is_cpu() {
            // y' = u + (u - b) ⊙ g in one pass each way (the composite below takes six)
            return crate::nn::fused::scale_residual(&u, &g, base.bias());
        }
        scale_residual_composite(&u, &g, base.bias())
    }
}

/// `u + (u - b) ⊙ g` with candle's ops (any device; the reference the fused op is tested against):
/// `(m / n) ⊙ v + b` for `v = u - b`, PEFT not scaling the bias.
pub fn scale_residual_composite(
    u: &Tensor,
    g: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    // v: (.., out) = u without the bias
    let v = match bias {
        Some(b) => u.broadcast_sub(&b.to_device(u.device())?.to_dtype(u.dtype())?)?,
        None => u.clone(),
    };
    u.add(&v.broadcast_mul(&g.to_dtype(u.dtype())?)?)
}

/// DoRA behind the adapter seam: PEFT's tensor names (`lora_magnitude_vector`, no `.weight`).
impl super::LinearAdapter for Dora {
    fn forward(&self, c: super::BaseCall<'_>, key: Option<u64>) -> candle_core::Result<Tensor> {
        let n = self.weight_norm(c.base)?;
        self.scale_output(c.x, c.base, c.y, &n, key)
    }

    fn params(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("lora_A.weight", self.lora.a().clone()),
            ("lora_B.weight", self.lora.b().clone()),
            ("lora_magnitude_vector", self.m.clone()),
        ]
    }

    fn peft_type(&self) -> &'static str {
        "LORA"
    }
}

/// The saved PEFT name of a module's DoRA magnitude: `base_model.model.<module>.lora_magnitude_vector`.
pub fn magnitude_name(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// The module of a saved DoRA magnitude name ([`magnitude_name`]).
pub fn parse_magnitude_name(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("base_model.model.")?;
    rest.strip_suffix(".lora_magnitude_vector")
        .filter(|m| !m.is_empty())
}

/// With `use_dora`: every adapted module of `pairs` (module -> [A shape, B shape]) has its
/// magnitude in `mags` (module -> shape), of B's row count, and no magnitude lacks its factors.
pub(crate) fn check_magnitudes(
    path: &Path,
    pairs: &BTreeMap<&str, [Option<&[usize]>; 2]>,
    mags: &BTreeMap<&str, &[usize]>,
) -> Result<()> {
    let shape_err = |module: &str, msg: String| Error::Shape {
        path: path.to_path_buf(),
        tensor: magnitude_name(module),
        msg,
    };
    if let Some(m) = mags.keys().find(|m| !pairs.contains_key(*m)) {
        return Err(shape_err(
            m,
            "a DoRA magnitude without its LoRA A and B".into(),
        ));
    }
    for (module, [_, b]) in pairs {
        match (mags.get(module), b) {
            (None, _) => {
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: magnitude_name(module),
                    hint: " (the config says use_dora: every adapted module needs its magnitude)"
                        .into(),
                })
            }
            (Some(d), Some(b)) if d[0] != b[0] => {
                return Err(shape_err(
                    module,
                    format!(
                        "shape {d:?}; its B has {} rows, so [{}] was expected",
                        b[0], b[0]
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

fn candle_err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("DoRA adapter: {e}"))
}
