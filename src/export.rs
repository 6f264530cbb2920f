//! Using a trained adapter outside qtune: llama.cpp's GGUF LoRA file and PEFT directories.
//!
//! qtune keeps LoRA factors in Hugging Face row order whatever the base (the Llama loader un-permutes
//! a GGUF base's Q/K rows, see src/models/llama.rs), so an adapter means the same thing on either
//! base. llama.cpp computes with the permuted Q/K rows of its converter: the B factor of q_proj and
//! k_proj (whose rows are output rows) is permuted on the way to a GGUF LoRA and back on the way out.
//! A is untouched (its columns are input features, which no permutation moves).
use crate::format::gguf::{self, GgufWriter, TensorPlan, Value};
use crate::lora::adapter::{self, AdapterConfig, LoraPart, TargetModules};
use crate::models::llama::{LlamaConfig, LoraSpec, PROJECTIONS};
use crate::models::Llama;
use crate::quant::QType;
use crate::store::{SourceFormat, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// One adapted projection: `W' = W + scale · B · A`, factors in f32, Hugging Face row order.
#[derive(Clone, Debug)]
pub struct AdapterModule {
    /// Decoder layer index.
    pub layer: usize,
    /// PEFT projection name (`q_proj` .. `down_proj`).
    pub proj: &'static str,
    /// A `(r, in)`, row-major.
    pub a: Vec<f32>,
    /// B `(out, r)`, row-major.
    pub b: Vec<f32>,
    /// Output features (rows of W).
    pub out_features: usize,
    /// Input features (columns of W).
    pub in_features: usize,
}

impl AdapterModule {
    /// The saved PEFT module path `model.layers.N.<group>.<proj>`.
    pub fn module_path(&self) -> String {
        let group = PROJECTIONS
            .iter()
            .find(|p| p.0 == self.proj)
            .map_or("", |p| p.1);
        format!("model.layers.{}.{group}.{}", self.layer, self.proj)
    }

    /// llama.cpp's name of the base weight, `blk.N.attn_q.weight`.
    pub fn gguf_name(&self) -> String {
        let g = PROJECTIONS
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

/// An adapter read from disk and checked against a base model.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Where it was read from (a PEFT directory or a GGUF LoRA file).
    pub path: PathBuf,
    /// Its hyper-parameters (for a GGUF LoRA: rebuilt from the file's alpha and tensors).
    pub cfg: AdapterConfig,
    /// Rank r.
    pub r: usize,
    /// Output scale (alpha/r, or alpha/sqrt(r) with rsLoRA).
    pub scale: f64,
    /// Adapted projections, by layer then projection order.
    pub modules: Vec<AdapterModule>,
}

/// The Llama projections a PEFT `target_modules` names; an entry that is none of them is an error.
fn targets_of(path: &Path, cfg: &AdapterConfig) -> Result<Vec<&'static str>> {
    let all: Vec<&'static str> = PROJECTIONS.iter().map(|p| p.0).collect();
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
                match PROJECTIONS.iter().find(|p| p.0 == last) {
                    Some(p) => out.push(p.0),
                    None => {
                        return Err(Error::Json {
                            path: path.join(adapter::CONFIG_FILE),
                            msg: format!(
                                "target module '{t}' is not a projection of this Llama base (it has {}); \
                                 the adapter was made for another model",
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
    let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    match proj {
        "q_proj" => (h * hd, c.hidden_size),
        "k_proj" | "v_proj" => (kvh * hd, c.hidden_size),
        "o_proj" => (c.hidden_size, h * hd),
        "gate_proj" | "up_proj" => (c.intermediate_size, c.hidden_size),
        _ => (c.hidden_size, c.intermediate_size),
    }
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

impl Adapter {
    /// Reads a PEFT directory or a llama.cpp GGUF LoRA file and checks it fits the base `cfg`:
    /// every target a projection of this model, every factor present with this model's shapes.
    pub fn load(path: &Path, cfg: &LlamaConfig) -> Result<Adapter> {
        if path.is_file() {
            return Self::load_gguf(path, cfg);
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
        cfg: &LlamaConfig,
    ) -> Result<Adapter> {
        let targets = targets_of(path, &acfg)?;
        let layers = layer_filter(path, &acfg)?;
        let r = acfg.r;
        // What this base expects of an adapter with these targets.
        let mut expected = Vec::new();
        for i in 0..cfg.num_layers {
            if layers.as_ref().is_some_and(|l| !l.contains(&i)) {
                continue;
            }
            for (p, group, _) in PROJECTIONS {
                if !targets.contains(&p) {
                    continue;
                }
                let (o, k) = proj_shape(cfg, p);
                let m = format!("model.layers.{i}.{group}.{p}");
                expected.push((adapter::peft_name(&m, LoraPart::A), vec![r, k]));
                expected.push((adapter::peft_name(&m, LoraPart::B), vec![o, r]));
            }
        }
        if let TargetModules::Regex(_) = acfg.target_modules {
            // A regex may name a subset: expect exactly the modules present.
            let have: std::collections::HashSet<&str> =
                tensors.iter().map(|(n, _)| n.as_str()).collect();
            expected.retain(|(n, _)| have.contains(n.as_str()));
        }
        adapter::check_compatible(path, &acfg, tensors, &expected)?;
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
        for (name, shape) in expected.iter().step_by(2) {
            let (module, _) = adapter::parse_peft_name(name).expect("names we built");
            let mut parts = module.split('.');
            let layer: usize = parts.nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
            let pname = module.rsplit('.').next().unwrap_or("");
            let proj = PROJECTIONS
                .iter()
                .find(|p| p.0 == pname)
                .map(|p| p.0)
                .expect("names we built");
            let (o, k) = proj_shape(cfg, proj);
            debug_assert_eq!(shape[1], k);
            modules.push(AdapterModule {
                layer,
                proj,
                a: get(name)?,
                b: get(&adapter::peft_name(module, LoraPart::B))?,
                out_features: o,
                in_features: k,
            });
        }
        if modules.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: the adapter adapts no projection of this model",
                path.display()
            )));
        }
        let scale = acfg.scale();
        Ok(Adapter {
            path: path.to_path_buf(),
            cfg: acfg,
            r,
            scale,
            modules,
        })
    }

    /// Reads a llama.cpp GGUF LoRA (`general.type = adapter`), un-permuting q/k B rows back to
    /// Hugging Face order.
    fn load_gguf(path: &Path, cfg: &LlamaConfig) -> Result<Adapter> {
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
        if s("general.architecture") != Some("llama") {
            return Err(bad(format!(
                "general.architecture is {:?}; this base is a llama",
                s("general.architecture")
            )));
        }
        let alpha = gguf::find(meta, "adapter.lora.alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("metadata lacks 'adapter.lora.alpha'".into()))?;
        let mut modules = Vec::new();
        let mut r = 0;
        for i in 0..cfg.num_layers {
            for (p, _, g) in PROJECTIONS {
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
                let (o, k) = proj_shape(cfg, p);
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
                let heads = match p {
                    "q_proj" => Some(cfg.num_heads),
                    "k_proj" => Some(cfg.num_kv_heads),
                    _ => None,
                };
                if let Some(h) = heads {
                    b = permute_rows(&b, rr, h, false);
                }
                modules.push(AdapterModule {
                    layer: i,
                    proj: p,
                    a: deq(ta),
                    b,
                    out_features: o,
                    in_features: k,
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
            r,
            modules,
        })
    }

    /// The [`LoraSpec`] a Llama must be loaded with to carry this adapter.
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
        }
    }

    /// Sets a Llama loaded with [`Self::spec`] to this adapter's weights; adapters the spec created
    /// in layers this adapter leaves out get B = 0 (no change to the base).
    pub fn apply(&self, model: &Llama) -> Result<()> {
        let cerr = |e: candle_core::Error| Error::Invalid(format!("setting adapter weights: {e}"));
        for (name, var) in model.lora_params() {
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
            var.set(&t.to_dtype(var.dtype()).map_err(cerr)?)
                .map_err(cerr)?;
        }
        Ok(())
    }
}

/// Permutes the rows of a q/k LoRA B `(rows, r)` between Hugging Face order and llama.cpp's
/// (`to_gguf`: HF -> GGUF). Within each head of `hd` rows, llama.cpp puts HF row `j*hd/2 + i` at
/// row `2i + j`: the two rotary halves interleaved.
pub fn permute_rows(b: &[f32], r: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let rows = b.len() / r;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; b.len()];
    for g in 0..rows {
        let (h, rem) = (g / hd, g % hd);
        let hf = h * hd + (rem % 2) * half + rem / 2;
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
/// (F32, F16 or BF16). `arch` is the base's `general.architecture`. rsLoRA is folded into alpha
/// (llama.cpp scales by alpha/r).
pub fn write_gguf_lora(
    adapter: &Adapter,
    cfg: &LlamaConfig,
    arch: &str,
    dtype: QType,
    out: &Path,
) -> Result<()> {
    if !matches!(dtype, QType::F32 | QType::F16 | QType::BF16) {
        return Err(Error::Invalid(format!(
            "--dtype {}: a GGUF LoRA is written as f32, f16 or bf16",
            dtype.name()
        )));
    }
    if arch != "llama" {
        return Err(Error::Invalid(format!(
            "{}: base architecture '{arch}' has no GGUF LoRA export yet (llama only)",
            adapter.path.display()
        )));
    }
    let alpha = adapter.scale * adapter.r as f64;
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
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
        let heads = match m.proj {
            "q_proj" => Some(cfg.num_heads),
            "k_proj" => Some(cfg.num_kv_heads),
            _ => None,
        };
        let b = match heads {
            Some(h) => permute_rows(&m.b, adapter.r, h, true),
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
    }
    adapter::save_peft(out, &adapter.cfg, &tensors)
}
