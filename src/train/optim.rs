//! AdamW exactly as `torch.optim.AdamW` (torch 2.5, single-tensor path), global gradient-norm
//! clipping as `torch.nn.utils.clip_grad_norm_`, and optimizer state for `--resume`.
//!
//! Precision: the moments and an f32 master copy of every parameter live in host memory; the
//! update runs on the master and its rounding is written back into the parameter's [`Var`] (in the
//! Var's dtype and device). For f32 parameters the master equals the Var bit for bit. For bf16
//! parameters the master is what makes training work at all: bf16 keeps 8 significant bits, so an
//! update smaller than 2^-9 of a weight (lr 1e-4 x Adam's unit-sized step) would round away and the
//! weight would never move. The master costs 4 bytes per LoRA parameter, a fraction of a percent of
//! a model. Keeping the state on the host also keeps it out of GPU memory; the price is a
//! parameter-sized copy each way per step, small for LoRA.
//!
//! With [`MomentStorage::Blockwise8`] (`--optim-8bit`) the moments of every parameter with at least
//! [`optim8::MIN_8BIT_SIZE`] elements are kept as bitsandbytes' blockwise 8-bit state and updated
//! as its `AdamW8bit` does (see [`super::optim8`]): 2 bytes per element plus 8 per block of 256
//! instead of 8. The f32 master copy stays (bnb updates bf16 parameters in place; without a master
//! small updates would round away, as above). Smaller parameters keep the f32 path above, torch's
//! arithmetic (bnb's own 32-bit kernel for them applies the weight decay after the update instead
//! of before: a difference of lr * weight_decay times the update).
use super::optim8::{self, Moments8};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;

/// State file names inside an optimizer-state directory.
pub const STATE_TENSORS: &str = "optimizer.safetensors";
/// Step counts and hyper-parameters; its presence marks the directory as optimizer state.
pub const STATE_JSON: &str = "optimizer.json";

mod state;

/// AdamW hyper-parameters (the learning rate is given per step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected sqrt of the second moment.
    pub eps: f64,
    /// Decoupled weight decay: `p *= 1 - lr * weight_decay` before the Adam update (after it,
    /// for 8-bit moments, as bitsandbytes does).
    pub weight_decay: f64,
    /// How the moments are stored.
    pub moments: MomentStorage,
}

/// How AdamW stores its two moments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MomentStorage {
    /// f32, updated exactly as torch's AdamW.
    #[default]
    F32,
    /// bitsandbytes' blockwise 8-bit state (`AdamW8bit`) for parameters of at least
    /// [`optim8::MIN_8BIT_SIZE`] elements; f32 for smaller ones.
    Blockwise8,
}

impl MomentStorage {
    /// The name saved in optimizer.json.
    fn key(self) -> &'static str {
        match self {
            MomentStorage::F32 => "f32",
            MomentStorage::Blockwise8 => "blockwise8",
        }
    }

    /// How a run selects this storage (for error messages).
    fn describe(self) -> &'static str {
        match self {
            MomentStorage::F32 => "32-bit moments (no --optim-8bit)",
            MomentStorage::Blockwise8 => "8-bit moments (--optim-8bit)",
        }
    }

    /// Whether a parameter of `numel` elements gets 8-bit moments.
    pub fn is_8bit_for(self, numel: usize) -> bool {
        self == MomentStorage::Blockwise8 && numel >= optim8::MIN_8BIT_SIZE
    }

    /// Host bytes of the optimizer state of one parameter of `numel` elements: its f32 master
    /// copy plus its two moments.
    pub fn state_bytes(self, numel: usize) -> usize {
        let moments = if self.is_8bit_for(numel) {
            Moments8::bytes_for(numel)
        } else {
            2 * 4 * numel
        };
        4 * numel + moments
    }
}

impl Default for AdamWConfig {
    /// torch's defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            moments: MomentStorage::F32,
        }
    }
}

/// One parameter and its state. Vecs are the row-major elements of `var`.
struct Slot {
    name: String,
    var: Var,
    master: Vec<f32>,
    moments: Moments,
    // Steps this parameter took (torch keeps one per parameter: a step without its gradient
    // leaves it unchanged).
    step: u64,
}

/// First and second moments as f32: borrowed, or dequantised from 8-bit state.
pub type MomentsF32<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// A parameter's moments.
enum Moments {
    F32 {
        exp_avg: Vec<f32>,
        exp_avg_sq: Vec<f32>,
    },
    Q8(Moments8),
}

impl Moments {
    fn zeros(n: usize, storage: MomentStorage) -> Self {
        if storage.is_8bit_for(n) {
            Moments::Q8(Moments8::zeros(n))
        } else {
            Moments::F32 {
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
            }
        }
    }
}

/// AdamW over named parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdamW({:?}, {} parameters)", self.cfg, self.slots.len())
    }
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Invalid(format!("{what}: {e}"))
}

/// A tensor's elements as host f32, row-major.
///
/// Half-precision values are widened straight from the tensor's storage into the result: going
/// through `to_dtype(F32)` made an f32 tensor per parameter and freed it, and glibc handed those
/// freed chunks to the zeroed moments [`AdamW::new`] allocates next, which it then had to clear
/// by hand. Measured (tests/llama_rss.rs, bf16, `bench::tune_allocator`'s settings): 8.2 MiB more
/// RSS after `AdamW::new` than in f32 (moment pages written at construction instead of at the
/// first update), on top of the step's own peak.
fn host_f32(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    use candle_core::{CpuStorage, Storage};
    let t = t
        .to_device(&Device::Cpu)
        .and_then(|t| t.contiguous())
        .map_err(cerr(what))?;
    let (storage, layout) = t.storage_and_layout();
    let range = layout.contiguous_offsets().map(|(a, b)| a..b);
    let widened = match (&*storage, range) {
        (Storage::Cpu(CpuStorage::F32(v)), Some(r)) => Some(v[r].to_vec()),
        (Storage::Cpu(CpuStorage::BF16(v)), Some(r)) => {
            Some(v[r].iter().map(|x| x.to_f32()).collect())
        }
        (Storage::Cpu(CpuStorage::F16(v)), Some(r)) => {
            Some(v[r].iter().map(|x| x.to_f32()).collect())
        }
        _ => None,
    };
    drop(storage);
    match widened {
        Some(v) => Ok(v),
        None => t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(cerr(what)),
    }
}

fn check_cfg(c: &AdamWConfig) -> Result<()> {
    let ok = (0.0..1.0).contains(&c.beta1)
        && (0.0..1.0).contains(&c.beta2)
        && c.eps >= 0.0
        && c.weight_decay >= 0.0
        && c.eps.is_finite()
        && c.weight_decay.is_finite();
    if !ok {
        return Err(Error::Invalid(format!(
            "AdamW: betas must lie in [0, 1) and eps, weight_decay be finite and >= 0; got {c:?}"
        )));
    }
    Ok(())
}

impl AdamW {
    /// An optimizer over `params` (unique names, f32/bf16/f16 Vars), with zero moments.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        check_cfg(&cfg)?;
        let mut slots = Vec::with_capacity(params.len());
        let mut index = HashMap::new();
        for (name, var) in params {
            if !matches!(var.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                return Err(Error::Invalid(format!(
                    "AdamW: parameter '{name}' is {:?}; only f32, bf16 and f16 parameters train",
                    var.dtype()
                )));
            }
            if index.insert(name.clone(), slots.len()).is_some() {
                return Err(Error::Invalid(format!(
                    "AdamW: parameter name '{name}' is given twice"
                )));
            }
            let master = host_f32(var.as_tensor(), &name)?;
            let moments = Moments::zeros(master.len(), cfg.moments);
            slots.push(Slot {
                name,
                var,
                master,
                moments,
                step: 0,
            });
        }
        Ok(AdamW { cfg, slots, index })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Parameter names, in the order given to [`AdamW::new`].
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Steps taken by parameter `name` (None if there is no such parameter).
    pub fn step_count(&self, name: &str) -> Option<u64> {
        self.index.get(name).map(|&i| self.slots[i].step)
    }

    /// The f32 master copy of parameter `name` (what the Var holds, before rounding to its dtype).
    pub fn master(&self, name: &str) -> Option<&[f32]> {
        self.index
            .get(name)
            .map(|&i| self.slots[i].master.as_slice())
    }

    /// First and second moments of parameter `name` (dequantised when they are 8-bit).
    pub fn moments(&self, name: &str) -> Option<MomentsF32<'_>> {
        self.index.get(name).map(|&i| match &self.slots[i].moments {
            Moments::F32 {
                exp_avg,
                exp_avg_sq,
            } => (Cow::Borrowed(&exp_avg[..]), Cow::Borrowed(&exp_avg_sq[..])),
            Moments::Q8(q) => {
                let (m, v) = q.dequantize();
                (Cow::Owned(m), Cow::Owned(v))
            }
        })
    }

    /// The 8-bit moments of parameter `name` (None if it has f32 moments or does not exist).
    pub fn moments_8bit(&self, name: &str) -> Option<&Moments8> {
        self.index
            .get(name)
            .and_then(|&i| match &self.slots[i].moments {
                Moments::Q8(q) => Some(q),
                Moments::F32 { .. } => None,
            })
    }

    /// Host bytes of the whole state: master copies and moments (what the memory plan predicts).
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| {
                4 * s.master.len()
                    + match &s.moments {
                        Moments::F32 { exp_avg, .. } => 8 * exp_avg.len(),
                        Moments::Q8(q) => q.bytes(),
                    }
            })
            .sum()
    }

    /// The gradients of this optimizer's parameters found in a backward pass's store, by name.
    pub fn grads_by_name(&self, store: &GradStore) -> HashMap<String, Tensor> {
        self.slots
            .iter()
            .filter_map(|s| store.get(&s.var).map(|g| (s.name.clone(), g.clone())))
            .collect()
    }

    /// One AdamW step at learning rate `lr`. A parameter without an entry in `grads` is left as is
    /// and its step count does not advance (torch's `grad is None`); a name in `grads` that is no
    /// parameter, or a gradient of the wrong size, is an error and nothing is updated.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::Invalid(format!(
                "AdamW: learning rate {lr} must be finite and >= 0"
            )));
        }
        for (name, g) in grads {
            let Some(&i) = self.index.get(name) else {
                return Err(Error::Invalid(format!(
                    "AdamW: gradient for '{name}', which is not a parameter of this optimizer"
                )));
            };
            if g.dims() != self.slots[i].var.dims() {
                return Err(Error::Invalid(format!(
                    "AdamW: gradient for '{name}' has shape {:?}, the parameter {:?}",
                    g.dims(),
                    self.slots[i].var.dims()
                )));
            }
        }
        let cfg = self.cfg;
        let maps = optim8::Maps::new();
        let on_cpu = self.slots.iter().all(|s| s.var.device().is_cpu())
            && grads.values().all(|g| g.device().is_cpu());
        if on_cpu {
            // One parameter at a time per worker: only a few f32 gradient copies exist at once.
            return self
                .slots
                .par_iter_mut()
                .filter_map(|s| grads.get(&s.name).map(|g| (s, g)))
                .try_for_each(|(s, g)| {
                    s.update(&cfg, &maps, lr, &host_f32(g, &s.name)?);
                    s.write_back()
                });
        }
        // On a GPU, gradients come to the host and updated parameters go back on the calling
        // thread: each thread has its own stream (candle's per-thread default stream), so a copy
        // issued from a rayon worker would not wait for the backward's kernels, nor the next
        // forward for it. Only the host arithmetic runs in parallel.
        let host: Vec<Option<Vec<f32>>> = self
            .slots
            .iter()
            .map(|s| grads.get(&s.name).map(|g| host_f32(g, &s.name)).transpose())
            .collect::<Result<_>>()?;
        self.slots
            .par_iter_mut()
            .zip(host)
            .filter_map(|(s, g)| g.map(|g| (s, g)))
            .for_each(|(s, g)| s.update(&cfg, &maps, lr, &g));
        self.slots
            .iter()
            .filter(|s| grads.contains_key(&s.name))
            .try_for_each(Slot::write_back)
    }
}

impl Slot {
    /// One AdamW update of the master copy and moments with gradient `g` (host f32).
    fn update(&mut self, cfg: &AdamWConfig, maps: &optim8::Maps, lr: f64, g: &[f32]) {
        self.step += 1;
        match &mut self.moments {
            Moments::F32 {
                exp_avg,
                exp_avg_sq,
            } => adamw_update(cfg, lr, self.step, &mut self.master, exp_avg, exp_avg_sq, g),
            Moments::Q8(q) => {
                let k = optim8::Coeffs8::new(
                    cfg.beta1,
                    cfg.beta2,
                    cfg.eps,
                    cfg.weight_decay,
                    lr,
                    self.step,
                );
                optim8::update(&k, maps, &mut self.master, q, g)
            }
        }
    }

    /// Sets the Var to the master copy, rounded to the Var's dtype, on the Var's device.
    fn write_back(&self) -> Result<()> {
        let t = Tensor::from_slice(&self.master, self.var.dims(), &Device::Cpu)
            .and_then(|t| t.to_dtype(self.var.dtype()))
            .and_then(|t| t.to_device(self.var.device()))
            .map_err(cerr(&self.name))?;
        self.var.set(&t).map_err(cerr(&self.name))
    }
}

/// torch's `_single_tensor_adamw` for one parameter, element by element in f32, with its scalars
/// computed in f64 as Python does and rounded to f32 where torch's kernels round them.
fn adamw_update(
    cfg: &AdamWConfig,
    lr: f64,
    step: u64,
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
) {
    let decay = (1.0 - lr * cfg.weight_decay) as f32;
    // exp_avg.lerp_(grad, 1 - beta1)
    let w = (1.0 - cfg.beta1) as f32;
    let b2 = cfg.beta2 as f32;
    let c2 = (1.0 - cfg.beta2) as f32;
    let t = step as f64;
    let bias_correction1 = 1.0 - cfg.beta1.powf(t);
    let bias_correction2 = 1.0 - cfg.beta2.powf(t);
    let step_size = lr / bias_correction1;
    let bc2_sqrt = bias_correction2.powf(0.5) as f32;
    let neg_step = (-step_size) as f32;
    let eps = cfg.eps as f32;
    let k = Coeffs {
        decay,
        w,
        b2,
        c2,
        bc2_sqrt,
        neg_step,
        eps,
    };
    // Without FMA in the compile-time target, `mul_add` is a call to a software fmaf per element;
    // with the feature enabled for this function LLVM inlines and vectorises it. Same results:
    // an FMA rounds once either way.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        unsafe { adamw_elems_avx2(&k, p, m, v, g) };
        return;
    }
    adamw_elems(&k, p, m, v, g);
}

/// The f32 scalars of one step.
struct Coeffs {
    decay: f32,
    w: f32,
    b2: f32,
    c2: f32,
    bc2_sqrt: f32,
    neg_step: f32,
    eps: f32,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn adamw_elems_avx2(k: &Coeffs, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    adamw_elems(k, p, m, v, g)
}

#[inline(always)]
fn adamw_elems(k: &Coeffs, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    let n = p.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    let small = k.w.abs() < 0.5;
    for i in 0..n {
        // param.mul_(1 - lr * weight_decay)
        let pi = p[i] * k.decay;
        // torch's vectorised CPU lerp: fma(w, end - start, start) for |w| < 0.5, else
        // fma(w - 1, end - start, end).
        let mi = if small {
            k.w.mul_add(g[i] - m[i], m[i])
        } else {
            (k.w - 1.0).mul_add(g[i] - m[i], g[i])
        };
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let vi = v[i] * k.b2;
        let vi = vi + k.c2 * g[i] * g[i];
        // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
        // param.addcdiv_(exp_avg, denom, value=-step_size)
        p[i] = pi + k.neg_step * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

/// Scales all gradients together so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` (norm_type 2): coefficient `max_norm / (norm + 1e-6)` clamped
/// to 1, applied to every gradient. Returns the norm before clipping. As in torch, a non-finite norm
/// is returned, not an error (and makes the gradients non-finite): skip such a step.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Invalid(format!(
            "gradient clipping: max_norm {max_norm} must be > 0"
        )));
    }
    if grads.is_empty() {
        return Ok(0.0);
    }
    // Per-tensor norms in f32 (as torch's reductions produce them), then the norm of those norms.
    let mut sq = 0.0f64;
    for (name, g) in grads.iter() {
        let n = host_f32(g, name)?
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt() as f32;
        sq += n as f64 * n as f64;
    }
    let total = sq.sqrt() as f32;
    let coef = (max_norm as f32 / (total + 1e-6f32)).min(1.0);
    for (name, g) in grads.iter_mut() {
        // Multiply in f32 and round to the gradient's dtype once.
        let scaled = g
            .to_dtype(DType::F32)
            .and_then(|x| x.affine(coef as f64, 0.0))
            .and_then(|x| x.to_dtype(g.dtype()))
            .map_err(cerr(name))?;
        *g = scaled;
    }
    Ok(total as f64)
}
