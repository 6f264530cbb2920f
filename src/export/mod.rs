//! Using a trained adapter outside qtune: llama.cpp's GGUF LoRA file and PEFT directories, for
//! every architecture qtune trains (Llama and Falcon; [`BaseConfig`] holds what differs).
//!
//! qtune keeps LoRA factors in Hugging Face row order whatever the base (the loaders put a GGUF
//! base's rows back in that order: Llama's Q/K, src/models/llama.rs; Falcon's fused qkv,
//! src/models/falcon.rs), so an adapter means the same thing on either base. llama.cpp computes with
//! the reordered rows of its converter: the B factor of those projections (whose rows are output
//! rows) is reordered on the way to a GGUF LoRA and back on the way out ([`BaseConfig::gguf_rows`]).
//! A is untouched (its columns are input features, which no reordering moves).
pub mod merge;
pub mod quantize;

use crate::format::gguf::{self, GgufWriter, TensorPlan, Value};
use crate::lora::adapter::{self, AdapterConfig, LoraPart, TargetModules};
use crate::models::arch::{Architecture, Projections, Spec};
use crate::models::llama::LoraSpec;
use crate::models::{CausalLm, FalconConfig, LlamaConfig};
use crate::quant::QType;
use crate::store::{SourceFormat, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// One adapted projection: `W' = W + scale · B · A`, factors in f32, Hugging Face row order.
#[derive(Clone, Debug)]
pub struct AdapterModule {
    /// The architecture whose projection this is.
    pub arch: Arch,
    /// Decoder layer index.
    pub layer: usize,
    /// PEFT projection name (Llama `q_proj` .. `down_proj`, Falcon `query_key_value` ..).
    pub proj: &'static str,
    /// A `(r, in)`, row-major.
    pub a: Vec<f32>,
    /// B `(out, r)`, row-major.
    pub b: Vec<f32>,
    /// Output features (rows of W).
    pub out_features: usize,
    /// Input features (columns of W).
    pub in_features: usize,
    /// DoRA's magnitude m `(out,)` (None: plain LoRA).
    pub magnitude: Option<Vec<f32>>,
}

impl AdapterModule {
    /// The saved PEFT module path (`model.layers.N.<group>.<proj>`, Falcon `transformer.h.N...`).
    pub fn module_path(&self) -> String {
        self.arch.module_path(self.layer, self.proj)
    }

    /// llama.cpp's name of the base weight, `blk.N.attn_q.weight`.
    pub fn gguf_name(&self) -> String {
        let g = self
            .arch
            .projections()
            .iter()
            .find(|p| p.0 == self.proj)
            .map_or("", |p| p.2);
        format!("blk.{}.{g}.weight", self.layer)
    }

    /// `delta (out, in) = scale · B · A` in f32, Hugging Face row order.
    pub fn delta(&self, scale: f32) -> Vec<f32> {
        use rayon::prelude::*;
        let (n, k, r) = (
            self.out_features,
            self.in_features,
            self.a.len() / self.in_features,
        );
        let mut d = vec![0f32; n * k];
        // One output row at a time: row o = sum_j B[o, j] * A[j, :], a rank-r axpy chain.
        d.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
            for j in 0..r {
                let s = self.b[o * r + j] * scale;
                let arow = &self.a[j * k..(j + 1) * k];
                for (x, a) in row.iter_mut().zip(arow) {
                    *x += s * a;
                }
            }
        });
        d
    }
}

/// The decoder families qtune exports adapters for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Mistral-style GQA (llama.cpp's `llama`).
    Llama,
    /// Falcon (llama.cpp's `falcon`).
    Falcon,
}

impl Arch {
    /// The static part of the family's description: llama.cpp's `general.architecture`, the
    /// adaptable linears, the Hugging Face layer stem.
    fn statics(self) -> (&'static str, Projections, &'static str) {
        use crate::models::{falcon, llama};
        match self {
            Arch::Llama => ("llama", &llama::PROJECTIONS, llama::HF_LAYER),
            Arch::Falcon => ("falcon", &falcon::PROJECTIONS, falcon::HF_LAYER),
        }
    }

    /// llama.cpp's `general.architecture`.
    pub fn name(self) -> &'static str {
        self.statics().0
    }

    /// The adaptable linears of a decoder layer: (PEFT name, module group, llama.cpp name).
    pub fn projections(self) -> Projections {
        self.statics().1
    }

    /// The saved PEFT module path of projection `proj` in layer `layer`.
    pub fn module_path(self, layer: usize, proj: &str) -> String {
        let (_, projs, stem) = self.statics();
        let group = projs.iter().find(|p| p.0 == proj).map_or("", |p| p.1);
        format!("{stem}.{layer}.{group}.{proj}")
    }
}

/// The base model an adapter is checked against, exported for and merged into.
#[derive(Clone, Debug, PartialEq)]
pub enum BaseConfig {
    /// A Llama-family base.
    Llama(LlamaConfig),
    /// A Falcon base.
    Falcon(FalconConfig),
}

impl From<&LlamaConfig> for BaseConfig {
    fn from(c: &LlamaConfig) -> Self {
        BaseConfig::Llama(c.clone())
    }
}

impl From<&FalconConfig> for BaseConfig {
    fn from(c: &FalconConfig) -> Self {
        BaseConfig::Falcon(c.clone())
    }
}

impl From<&BaseConfig> for BaseConfig {
    fn from(c: &BaseConfig) -> Self {
        c.clone()
    }
}

impl BaseConfig {
    /// The config of the model in `store` (a Falcon by config.json's model_type or GGUF
    /// architecture, otherwise a Llama).
    pub fn from_store(store: &WeightStore) -> Result<Self> {
        Ok(if crate::models::plan::is_falcon(store) {
            BaseConfig::Falcon(FalconConfig::from_store(store)?)
        } else {
            BaseConfig::Llama(LlamaConfig::from_store(store)?)
        })
    }

    /// Its architecture.
    pub fn arch(&self) -> Arch {
        match self {
            BaseConfig::Llama(_) => Arch::Llama,
            BaseConfig::Falcon(_) => Arch::Falcon,
        }
    }

    /// llama.cpp's `general.architecture` of this base (`llama` for Llama 1-3, Mistral, SmolLM2;
    /// `qwen2`; `falcon`), which its GGUF LoRA files must carry.
    pub fn gguf_arch(&self) -> &'static str {
        self.spec().arch
    }

    /// Its description, with Hugging Face tensor names.
    pub fn spec(&self) -> Spec {
        match self {
            BaseConfig::Llama(c) => c.spec(false),
            BaseConfig::Falcon(c) => c.spec(false),
        }
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.spec().layers
    }

    /// `(out, in)` of projection `proj` (PEFT name).
    pub fn proj_shape(&self, proj: &str) -> (usize, usize) {
        let s = self.spec();
        s.index(proj).map_or((s.hidden, s.ffn), |pi| s.shape(pi))
    }

    /// Where llama.cpp's converter moves the output rows of `proj`: for each GGUF row, the Hugging
    /// Face row it holds; `None` where the orders agree ([`Spec::gguf_rows`]: Llama's q/k rows
    /// interleaved per head for llama.cpp's rotary, Falcon's fused qkv regrouped).
    pub fn gguf_rows(&self, proj: &str) -> Option<Vec<usize>> {
        let s = self.spec();
        s.gguf_rows(s.index(proj)?)
    }
}

/// An adapter read from disk and checked against a base model.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Where it was read from (a PEFT directory or a GGUF LoRA file).
    pub path: PathBuf,
    /// Its hyper-parameters (for a GGUF LoRA: rebuilt from the file's alpha and tensors).
    pub cfg: AdapterConfig,
    /// The base it was checked against.
    pub base: BaseConfig,
    /// Rank r.
    pub r: usize,
    /// Output scale (alpha/r, or alpha/sqrt(r) with rsLoRA).
    pub scale: f64,
    /// Adapted projections, by layer then projection order.
    pub modules: Vec<AdapterModule>,
}

/// The projections of `arch` a PEFT `target_modules` names; an entry that is none of them is an
/// error.
fn targets_of(path: &Path, cfg: &AdapterConfig, arch: Arch) -> Result<Vec<&'static str>> {
    let projs = arch.projections();
    let all: Vec<&'static str> = projs.iter().map(|p| p.0).collect();
    match &cfg.target_modules {
        TargetModules::Regex(r) if r == "all-linear" => Ok(all),
        // Not evaluated: the tensors present decide.
        TargetModules::Regex(_) => Ok(all),
        TargetModules::List(l) => {
            let mut out = Vec::new();
            for t in l {
                if t == "all-linear" {
                    return Ok(all);
                }
                let last = t.rsplit('.').next().unwrap_or(t);
                match projs.iter().find(|p| p.0 == last) {
                    Some(p) => out.push(p.0),
                    None => {
                        return Err(Error::Json {
                            path: path.join(adapter::CONFIG_FILE),
                            msg: format!(
                            "target module '{t}' is not a projection of this {} base (it has {}); \
                                 the adapter was made for another model",
                            arch.name(),
                            all.join(", ")
                        ),
                        })
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Layers `layers_to_transform` restricts the adapter to (`None`: all).
fn layer_filter(path: &Path, cfg: &AdapterConfig) -> Result<Option<Vec<usize>>> {
    let bad = || Error::Json {
        path: path.join(adapter::CONFIG_FILE),
        msg: format!(
            "key 'layers_to_transform' is {}; expected null, an integer or a list of integers",
            cfg.layers_to_transform
        ),
    };
    match &cfg.layers_to_transform {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => Ok(Some(vec![n.as_u64().ok_or_else(bad)? as usize])),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(bad))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        _ => Err(bad()),
    }
}

/// `(out, in)` of a Llama projection.
pub fn proj_shape(c: &LlamaConfig, proj: &str) -> (usize, usize) {
    BaseConfig::from(c).proj_shape(proj)
}

fn to_f32(path: &Path, name: &str, t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| Error::Shape {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            msg: e.to_string(),
        })
}

/// The architecture name of a base store (`general.architecture`, or config.json's model_type).
pub fn base_architecture(store: &WeightStore) -> String {
    match store.format {
        SourceFormat::Gguf => gguf::find(&store.gguf_metadata, "general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => store
            .config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
    }
}

pub use crate::lora::prompt::refusal as prompt_refusal;

impl Adapter {
    /// Reads a PEFT directory or a llama.cpp GGUF LoRA file and checks it fits the base `cfg` (a
    /// [`LlamaConfig`], [`FalconConfig`] or [`BaseConfig`]): every target a projection of this
    /// model, every factor present with this model's shapes.
    pub fn load(path: &Path, cfg: impl Into<BaseConfig>) -> Result<Adapter> {
        let cfg = cfg.into();
        if path.is_file() {
            return Self::load_gguf(path, cfg);
        }
        if let Some(t) = crate::lora::prompt::peft_type_of(path) {
            if crate::lora::prompt::is_prompt_type(&t) {
                return Err(Error::Invalid(prompt_refusal(
                    &path.display().to_string(),
                    &t,
                )));
            }
        }
        let (acfg, tensors) = adapter::load_peft(path)?;
        Self::from_tensors(path, acfg, &tensors, cfg)
    }

    /// An adapter from its config and saved-PEFT-named tensors (e.g. a trained model's
    /// `lora_params()` at the end of `qtune train`), checked against the base `cfg` like [`Self::load`];
    /// `path` is only for messages.
    pub fn from_tensors(
        path: &Path,
        acfg: AdapterConfig,
        tensors: &[(String, Tensor)],
        cfg: impl Into<BaseConfig>,
    ) -> Result<Adapter> {
        let cfg = cfg.into();
        let arch = cfg.arch();
        let targets = targets_of(path, &acfg, arch)?;
        let layers = layer_filter(path, &acfg)?;
        let r = acfg.r;
        // What this base expects of an adapter with these targets: (layer, projection, A name,
        // A shape, B name, B shape).
        let mut expected = Vec::new();
        for i in 0..cfg.num_layers() {
            if layers.as_ref().is_some_and(|l| !l.contains(&i)) {
                continue;
            }
            for (p, _, _) in arch.projections() {
                if !targets.contains(p) {
                    continue;
                }
                let (o, k) = cfg.proj_shape(p);
                let m = arch.module_path(i, p);
                expected.push((
                    i,
                    *p,
                    (adapter::peft_name(&m, LoraPart::A), vec![r, k]),
                    (adapter::peft_name(&m, LoraPart::B), vec![o, r]),
                ));
            }
        }
        if let TargetModules::Regex(_) = acfg.target_modules {
            // A regex may name a subset: expect exactly the modules present.
            let have: std::collections::HashSet<&str> =
                tensors.iter().map(|(n, _)| n.as_str()).collect();
            expected.retain(|e| have.contains(e.2 .0.as_str()) || have.contains(e.3 .0.as_str()));
        }
        let mag = |e: &(usize, &str, _, _)| {
            (
                adapter::magnitude_name(&arch.module_path(e.0, e.1)),
                vec![cfg.proj_shape(e.1).0],
            )
        };
        let names: Vec<(String, Vec<usize>)> = expected
            .iter()
            .flat_map(|e| [e.2.clone(), e.3.clone()])
            .chain(expected.iter().filter(|_| acfg.use_dora).map(mag))
            .collect();
        adapter::check_compatible(path, &acfg, tensors, &names)?;
        let get = |n: &str| -> Result<Vec<f32>> {
            let t = tensors
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: n.to_string(),
                    hint: String::new(),
                })?;
            to_f32(path, n, t)
        };
        let mut modules = Vec::new();
        for (layer, proj, (a, _), (b, _)) in &expected {
            let (o, k) = cfg.proj_shape(proj);
            modules.push(AdapterModule {
                arch,
                layer: *layer,
                proj,
                a: get(a)?,
                b: get(b)?,
                out_features: o,
                in_features: k,
                magnitude: match acfg.use_dora {
                    true => Some(get(&adapter::magnitude_name(
                        &arch.module_path(*layer, proj),
                    ))?),
                    false => None,
                },
            });
        }
        if modules.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: the adapter adapts no projection of this {} model",
                path.display(),
                arch.name()
            )));
        }
        let scale = acfg.scale();
        Ok(Adapter {
            path: path.to_path_buf(),
            cfg: acfg,
            base: cfg,
            r,
            scale,
            modules,
        })
    }

    /// Reads a llama.cpp GGUF LoRA (`general.type = adapter`), putting the B rows llama.cpp's
    /// converter reorders back in Hugging Face order.
    fn load_gguf(path: &Path, cfg: BaseConfig) -> Result<Adapter> {
        let store = gguf::load(path)?;
        let meta = &store.gguf_metadata;
        let bad = |msg: String| Error::corrupt(path, "GGUF LoRA", msg);
        let s = |k: &str| gguf::find(meta, k).and_then(Value::as_str);
        if s("general.type") != Some("adapter") || s("adapter.type") != Some("lora") {
            return Err(bad(
                "not a LoRA adapter (general.type must be \"adapter\" and adapter.type \"lora\")"
                    .into(),
            ));
        }
        let arch = cfg.arch();
        if s("general.architecture") != Some(cfg.gguf_arch()) {
            return Err(bad(format!(
                "general.architecture is {:?}; this base is a {}: the adapter was made for another model",
                s("general.architecture"),
                cfg.gguf_arch()
            )));
        }
        let alpha = gguf::find(meta, "adapter.lora.alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("metadata lacks 'adapter.lora.alpha'".into()))?;
        let mut modules = Vec::new();
        let mut r = 0;
        for i in 0..cfg.num_layers() {
            for (p, _, g) in arch.projections() {
                let base = format!("blk.{i}.{g}.weight");
                let (ta, tb) = (
                    store.get(&format!("{base}.lora_a")),
                    store.get(&format!("{base}.lora_b")),
                );
                let (ta, tb) = match (ta, tb) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(bad(format!("{base}: lora_a and lora_b must come in pairs"))),
                };
                let (o, k) = cfg.proj_shape(p);
                let rr = ta.shape.first().copied().unwrap_or(0);
                if ta.shape != [rr, k] || tb.shape != [o, rr] || rr == 0 || (r != 0 && rr != r) {
                    return Err(Error::Shape {
                        path: path.to_path_buf(),
                        tensor: base,
                        msg: format!(
                            "lora_a {:?} / lora_b {:?}, this model expects [r, {k}] / [{o}, r] with one r",
                            ta.shape, tb.shape
                        ),
                    });
                }
                r = rr;
                let deq = |t: &crate::store::StoredTensor| {
                    let m = t.matrix();
                    let mut v = vec![0f32; m.rows * m.cols];
                    m.dequant_tile(0, m.rows, 0, m.cols, &mut v);
                    v
                };
                let mut b = deq(tb);
                if let Some(rows) = cfg.gguf_rows(p) {
                    b = reorder_rows(&b, rr, &rows, false);
                }
                modules.push(AdapterModule {
                    arch,
                    layer: i,
                    proj: p,
                    a: deq(ta),
                    b,
                    out_features: o,
                    in_features: k,
                    magnitude: None,
                });
            }
        }
        let known = modules.len() * 2;
        if known != store.tensors.len() {
            let extra: Vec<&str> = store
                .tensors
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| {
                    !modules.iter().any(|m| {
                        let g = m.gguf_name();
                        *n == format!("{g}.lora_a") || *n == format!("{g}.lora_b")
                    })
                })
                .take(5)
                .collect();
            return Err(bad(format!(
                "tensors this model has no place for: {}; the adapter was made for another model",
                extra.join(", ")
            )));
        }
        if modules.is_empty() {
            return Err(bad("no LoRA tensors".into()));
        }
        let mut targets: Vec<String> = Vec::new();
        for m in &modules {
            if !targets.iter().any(|t| t == m.proj) {
                targets.push(m.proj.to_string());
            }
        }
        let lc = crate::lora::LoraConfig {
            r,
            alpha,
            rslora: false,
            dropout: 0.0,
            dtype: DType::F32,
        };
        let mut acfg = AdapterConfig::new(&lc, targets, None);
        acfg.task_type = Some("CAUSAL_LM".into());
        Ok(Adapter {
            path: path.to_path_buf(),
            scale: alpha / r as f64,
            cfg: acfg,
            base: cfg,
            r,
            modules,
        })
    }

    /// The [`LoraSpec`] a model must be loaded with to carry this adapter.
    pub fn spec(&self) -> LoraSpec {
        let mut targets: Vec<String> = Vec::new();
        for m in &self.modules {
            if !targets.iter().any(|t| t == m.proj) {
                targets.push(m.proj.to_string());
            }
        }
        LoraSpec {
            targets,
            r: self.r,
            alpha: self.cfg.lora_alpha,
            rslora: self.cfg.use_rslora,
            dropout: 0.0,
            layers: None,
            seed: 0,
            use_dora: self.cfg.use_dora,
        }
    }

    /// Sets a model (Llama or Falcon) loaded with [`Self::spec`] to this adapter's weights;
    /// adapters the spec created in layers this adapter leaves out get B = 0 (no change to the base).
    pub fn apply<M: CausalLm + ?Sized>(&self, model: &M) -> Result<()> {
        let cerr = |e: candle_core::Error| Error::Invalid(format!("setting adapter weights: {e}"));
        for (name, var) in model.lora_params() {
            if let Some(module) = adapter::parse_magnitude_name(&name) {
                // DoRA: a module this adapter leaves out keeps its fresh m = ‖W‖ (with B = 0, the base).
                if let Some(mag) = self.modules.iter().find(|m| m.module_path() == module) {
                    let t = Tensor::from_slice(
                        mag.magnitude.as_deref().unwrap_or(&[]),
                        var.dims(),
                        &Device::Cpu,
                    );
                    var.set(
                        &t.and_then(|t| t.to_dtype(var.dtype())?.to_device(var.device()))
                            .map_err(cerr)?,
                    )
                    .map_err(cerr)?;
                }
                continue;
            }
            let Some((module, part)) = adapter::parse_peft_name(&name) else {
                continue;
            };
            let m = self.modules.iter().find(|m| m.module_path() == module);
            let dims = var.dims().to_vec();
            let t = match (m, part) {
                (Some(m), LoraPart::A) => Tensor::from_slice(
                    &m.a,
                    (m.a.len() / m.in_features, m.in_features),
                    &Device::Cpu,
                ),
                (Some(m), LoraPart::B) => Tensor::from_slice(
                    &m.b,
                    (m.out_features, m.b.len() / m.out_features),
                    &Device::Cpu,
                ),
                (None, LoraPart::A) => continue,
                (None, LoraPart::B) => Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu),
            }
            .map_err(cerr)?;
            var.set(
                &t.to_dtype(var.dtype())
                    .and_then(|t| t.to_device(var.device()))
                    .map_err(cerr)?,
            )
            .map_err(cerr)?;
        }
        Ok(())
    }
}

/// Reorders the rows of a LoRA B `(rows, r)` between Hugging Face order and llama.cpp's
/// (`to_gguf`: HF -> GGUF); `hf_of_gguf[g]` is the HF row at GGUF row g ([`BaseConfig::gguf_rows`]).
pub fn reorder_rows(b: &[f32], r: usize, hf_of_gguf: &[usize], to_gguf: bool) -> Vec<f32> {
    let mut out = vec![0f32; b.len()];
    for (g, &hf) in hf_of_gguf.iter().enumerate() {
        let (dst, src) = if to_gguf { (g, hf) } else { (hf, g) };
        out[dst * r..(dst + 1) * r].copy_from_slice(&b[src * r..(src + 1) * r]);
    }
    out
}

/// Encodes f32 values as `dtype` (F32, F16 or BF16) little-endian bytes.
pub fn encode_float(dtype: QType, v: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        QType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        QType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        QType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        t => {
            return Err(Error::Invalid(format!(
                "{} is not a float type; use f32, f16 or bf16",
                t.name()
            )))
        }
    })
}

/// Writes `adapter` as llama.cpp's GGUF LoRA at `out` (via `<out>.tmp`), factors in `dtype`
/// (F32, F16 or BF16), for the base `cfg` (the adapter's own architecture). `arch` is the base's
/// `general.architecture` (or config.json model_type): a Llama-family base is `llama`, `mistral`
/// or `qwen2`; any Falcon spelling (falcon, RefinedWeb, RefinedWebModel) is written as `falcon`.
/// The file carries llama.cpp's architecture of the base ([`BaseConfig::gguf_arch`]: `llama` for
/// Llama 1-3, Mistral and SmolLM2, as its converter writes them; `qwen2`; `falcon`) and B rows in
/// the order its converter gives that base ([`BaseConfig::gguf_rows`]: q/k permuted for `llama`,
/// not for `qwen2`). rsLoRA is folded into alpha (llama.cpp scales by alpha/r).
pub fn write_gguf_lora(
    adapter: &Adapter,
    cfg: impl Into<BaseConfig>,
    arch: &str,
    dtype: QType,
    out: &Path,
) -> Result<()> {
    let cfg = cfg.into();
    if adapter.cfg.use_dora {
        return Err(Error::Invalid(format!(
            "{}: a DoRA adapter (use_dora) has no GGUF LoRA form: llama.cpp has no DoRA, only \
             plain LoRA; fold it into the base with `qtune merge` and use the merged model instead",
            adapter.path.display()
        )));
    }
    if !matches!(dtype, QType::F32 | QType::F16 | QType::BF16) {
        return Err(Error::Invalid(format!(
            "--dtype {}: a GGUF LoRA is written as f32, f16 or bf16",
            dtype.name()
        )));
    }
    if cfg.arch() != adapter.base.arch() {
        return Err(Error::Invalid(format!(
            "{}: the adapter was read for a {} base, not this {}",
            adapter.path.display(),
            adapter.base.arch().name(),
            cfg.arch().name()
        )));
    }
    if cfg.arch() == Arch::Llama && !matches!(arch, "llama" | "mistral" | "qwen2") {
        return Err(Error::Invalid(format!(
            "{}: base architecture '{arch}' has no GGUF LoRA export yet (llama, mistral, qwen2 \
             and falcon)",
            adapter.path.display()
        )));
    }
    let alpha = adapter.scale * adapter.r as f64;
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(cfg.gguf_arch().into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        (
            "general.name".to_string(),
            Value::String("qtune LoRA".into()),
        ),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    let mut plan = Vec::new();
    for m in &adapter.modules {
        let g = m.gguf_name();
        plan.push(TensorPlan {
            name: format!("{g}.lora_a"),
            qtype: dtype,
            shape: vec![adapter.r, m.in_features],
        });
        plan.push(TensorPlan {
            name: format!("{g}.lora_b"),
            qtype: dtype,
            shape: vec![m.out_features, adapter.r],
        });
    }
    let mut w = GgufWriter::create(out, &meta, plan)?;
    for m in &adapter.modules {
        w.write_tensor(&encode_float(dtype, &m.a)?)?;
        let b = match cfg.gguf_rows(m.proj) {
            Some(rows) => reorder_rows(&m.b, adapter.r, &rows, true),
            None => m.b.clone(),
        };
        w.write_tensor(&encode_float(dtype, &b)?)?;
    }
    w.finish()
}

/// Writes `adapter` as a PEFT directory at `out` (Hugging Face row order; loads in PEFT on the
/// Hugging Face base), factors in `dtype` (F32, F16 or BF16).
pub fn write_peft(adapter: &Adapter, dtype: QType, out: &Path) -> Result<()> {
    let dt = match dtype {
        QType::F32 => DType::F32,
        QType::F16 => DType::F16,
        QType::BF16 => DType::BF16,
        t => {
            return Err(Error::Invalid(format!(
                "--dtype {}: a PEFT adapter is written as f32, f16 or bf16",
                t.name()
            )))
        }
    };
    let cerr = |e: candle_core::Error| Error::Invalid(format!("{}: {e}", out.display()));
    let mut tensors = Vec::new();
    for m in &adapter.modules {
        let path = m.module_path();
        let a = Tensor::from_slice(&m.a, (adapter.r, m.in_features), &Device::Cpu)
            .and_then(|t| t.to_dtype(dt))
            .map_err(cerr)?;
        let b = Tensor::from_slice(&m.b, (m.out_features, adapter.r), &Device::Cpu)
            .and_then(|t| t.to_dtype(dt))
            .map_err(cerr)?;
        tensors.push((adapter::peft_name(&path, LoraPart::A), a));
        tensors.push((adapter::peft_name(&path, LoraPart::B), b));
        if let Some(mag) = &m.magnitude {
            let t = Tensor::from_slice(mag, m.out_features, &Device::Cpu)
                .and_then(|t| t.to_dtype(dt))
                .map_err(cerr)?;
            tensors.push((adapter::magnitude_name(&path), t));
        }
    }
    adapter::save_peft(out, &adapter.cfg, &tensors)
}
