//! PEFT LoRA adapter directories: `adapter_config.json` + `adapter_model.safetensors`, as PEFT
//! 0.13's `save_pretrained` writes them and `PeftModel.from_pretrained` reads them.
//!
//! Tensor names are the saved form, without the adapter name:
//! `base_model.model.<module path>.lora_A.weight` `(r, in)` and `...lora_B.weight` `(out, r)`;
//! with `use_dora`, also `...lora_magnitude_vector` `(out,)` (no `.weight`).
//! [`save_peft`] writes into `<dir>.tmp` and renames it into place, so a crash mid-save never leaves
//! a half-written adapter where a good one was.
pub use super::dora::{magnitude_name, parse_magnitude_name};
use super::lora::LoraConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name of the adapter's hyper-parameters.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's `target_modules`: a list of module-name suffixes, or one regular expression.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module names (a module matches if its path equals or ends with `.name`).
    List(Vec<String>),
    /// A regular expression over the full module path (kept as text; we do not evaluate it).
    Regex(String),
}

impl TargetModules {
    /// As `--targets` takes them: the names, or `all-linear` for a regex (PEFT writes one for
    /// `all-linear`; a narrower regex is refused later by the shape check).
    pub fn as_targets(&self) -> Vec<String> {
        match self {
            TargetModules::List(v) => v.clone(),
            TargetModules::Regex(_) => vec!["all-linear".into()],
        }
    }
}

/// The contents of a LoRA `adapter_config.json` (PEFT 0.13.2's `LoraConfig`). Keys we do not model
/// are kept in `extra` and written back unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// Always "LORA".
    pub peft_type: String,
    /// "CAUSAL_LM" for a model PEFT wraps in `PeftModelForCausalLM`; null for a plain `PeftModel`.
    pub task_type: Option<String>,
    /// Rank r.
    pub r: usize,
    /// Scaling numerator alpha.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input.
    pub lora_dropout: f64,
    /// Which modules carry an adapter.
    pub target_modules: TargetModules,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Bias training: only "none" is supported.
    pub bias: String,
    /// Hub id or path of the base model.
    pub base_model_name_or_path: Option<String>,
    /// Base model revision.
    pub revision: Option<String>,
    /// Conv1D-style transposed weights (GPT-2); must be false.
    pub fan_in_fan_out: bool,
    /// PEFT's init scheme (true, "gaussian", "pissa", ...): informative once weights exist.
    pub init_lora_weights: Value,
    /// Layer indices that carry adapters (null = all).
    pub layers_to_transform: Value,
    /// Name of the layer list for `layers_to_transform`.
    pub layers_pattern: Value,
    /// Fully trained extra modules; must be null (we save none).
    pub modules_to_save: Option<Vec<String>>,
    /// Whether PEFT loads the adapter frozen.
    pub inference_mode: bool,
    /// Weight-decomposed LoRA (DoRA): a magnitude vector per module beside A and B.
    pub use_dora: bool,
    /// Per-module rank overrides; must be empty.
    pub rank_pattern: Map<String, Value>,
    /// Per-module alpha overrides; must be empty.
    pub alpha_pattern: Map<String, Value>,
    /// Every other key, written back as read (auto_mapping, loftq_config, megatron_*, ...).
    pub extra: BTreeMap<String, Value>,
}

impl AdapterConfig {
    /// A config for a fresh adapter with `lora`'s hyper-parameters on `target_modules`, with the
    /// defaults PEFT 0.13.2 writes for a causal LM.
    pub fn new(lora: &LoraConfig, target_modules: Vec<String>, base_model: Option<String>) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert("layer_replication".into(), Value::Null);
        extra.insert("loftq_config".into(), Value::Object(Map::new()));
        extra.insert("megatron_config".into(), Value::Null);
        extra.insert(
            "megatron_core".into(),
            Value::String("megatron.core".into()),
        );
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: lora.r,
            lora_alpha: lora.alpha,
            // Via its shortest decimal, so 0.05f32 is written 0.05 and not 0.05000000074505806.
            lora_dropout: lora
                .dropout
                .to_string()
                .parse()
                .unwrap_or(lora.dropout as f64),
            target_modules: TargetModules::List(target_modules),
            use_rslora: lora.rslora,
            bias: "none".into(),
            base_model_name_or_path: base_model,
            revision: None,
            fan_in_fan_out: false,
            init_lora_weights: Value::Bool(true),
            layers_to_transform: Value::Null,
            layers_pattern: Value::Null,
            modules_to_save: None,
            inference_mode: true,
            use_dora: false,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            extra,
        }
    }

    /// The [`LoraConfig`] this adapter trains with, weights in `dtype`.
    pub fn lora_config(&self, dtype: DType) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            rslora: self.use_rslora,
            dropout: self.lora_dropout as f32,
            dtype,
        }
    }

    /// The adapter output scale (PEFT's `scaling`).
    pub fn scale(&self) -> f64 {
        self.lora_config(DType::F32).scale()
    }

    /// Parses `adapter_config.json` text; `path` is only for messages, which name the key at fault.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let err = |msg: String| Error::Json {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(mut obj) = v else {
            return Err(err("expected a JSON object at the top level".into()));
        };
        let mut f = Fields {
            path,
            obj: &mut obj,
        };
        let peft_type: String = f.req("peft_type", "a string such as \"LORA\"")?;
        if peft_type != "LORA" {
            return Err(err(format!(
                "key 'peft_type' is \"{peft_type}\"; qtune reads LoRA adapters only (\"LORA\")"
            )));
        }
        let r: usize = f.req("r", "a positive integer")?;
        if r == 0 {
            return Err(err("key 'r' is 0; the LoRA rank must be at least 1".into()));
        }
        let lora_alpha: f64 = f.req("lora_alpha", "a number")?;
        let lora_dropout: f64 = f.opt("lora_dropout", "a number in [0, 1)")?.unwrap_or(0.0);
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(err(format!(
                "key 'lora_dropout' is {lora_dropout}, outside [0, 1)"
            )));
        }
        let target_modules = match f.obj.remove("target_modules") {
            Some(Value::String(s)) => TargetModules::Regex(s),
            Some(Value::Array(a)) => TargetModules::List(
                a.into_iter()
                    .map(|x| match x {
                        Value::String(s) => Ok(s),
                        other => Err(err(format!(
                            "key 'target_modules' holds {other}; expected module names (strings)"
                        ))),
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(other) => {
                return Err(err(format!(
                    "key 'target_modules' is {other}; expected a list of module names or a regex string"
                )))
            }
            None => return Err(err("key 'target_modules' is missing".into())),
        };
        let task_type: Option<String> = f.opt("task_type", "a string or null")?;
        let use_rslora: bool = f.opt("use_rslora", "true or false")?.unwrap_or(false);
        let bias: String = f.opt("bias", "a string")?.unwrap_or_else(|| "none".into());
        if bias != "none" {
            return Err(err(format!(
                "key 'bias' is \"{bias}\"; qtune trains and loads adapters without biases (\"none\")"
            )));
        }
        let base_model_name_or_path = f.opt("base_model_name_or_path", "a string or null")?;
        let revision = f.opt("revision", "a string or null")?;
        let fan_in_fan_out: bool = f.opt("fan_in_fan_out", "true or false")?.unwrap_or(false);
        if fan_in_fan_out {
            return Err(err(
                "key 'fan_in_fan_out' is true (transposed Conv1D weights, GPT-2 style); qtune's \
                 models use nn.Linear layout"
                    .into(),
            ));
        }
        let init_lora_weights = f
            .obj
            .remove("init_lora_weights")
            .unwrap_or(Value::Bool(true));
        let layers_to_transform = f.obj.remove("layers_to_transform").unwrap_or(Value::Null);
        let layers_pattern = f.obj.remove("layers_pattern").unwrap_or(Value::Null);
        let modules_to_save: Option<Vec<String>> =
            f.opt("modules_to_save", "a list of module names or null")?;
        if let Some(m) = &modules_to_save {
            if !m.is_empty() {
                return Err(err(format!(
                    "key 'modules_to_save' lists {m:?}; qtune loads only LoRA A/B weights, not fully \
                     trained modules"
                )));
            }
        }
        let inference_mode: bool = f.opt("inference_mode", "true or false")?.unwrap_or(false);
        let use_dora: bool = f.opt("use_dora", "true or false")?.unwrap_or(false);
        let rank_pattern: Map<String, Value> =
            f.opt("rank_pattern", "an object")?.unwrap_or_default();
        let alpha_pattern: Map<String, Value> =
            f.opt("alpha_pattern", "an object")?.unwrap_or_default();
        for (key, m) in [
            ("rank_pattern", &rank_pattern),
            ("alpha_pattern", &alpha_pattern),
        ] {
            if !m.is_empty() {
                return Err(err(format!(
                    "key '{key}' is not empty ({}); qtune supports one rank and alpha for every module",
                    Value::Object(m.clone())
                )));
            }
        }
        Ok(AdapterConfig {
            peft_type,
            task_type,
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            use_rslora,
            bias,
            base_model_name_or_path,
            revision,
            fan_in_fan_out,
            init_lora_weights,
            layers_to_transform,
            layers_pattern,
            modules_to_save,
            inference_mode,
            use_dora,
            rank_pattern,
            alpha_pattern,
            extra: obj.into_iter().collect(),
        })
    }

    /// The JSON object PEFT writes (keys sorted, two-space indent).
    pub fn to_json(&self) -> String {
        let mut m: BTreeMap<String, Value> = self.extra.clone();
        let s = |x: &str| Value::String(x.to_string());
        let opt_s = |x: &Option<String>| x.as_deref().map_or(Value::Null, s);
        m.insert("peft_type".into(), s(&self.peft_type));
        m.insert("task_type".into(), opt_s(&self.task_type));
        m.insert("r".into(), Value::from(self.r));
        m.insert("lora_alpha".into(), number(self.lora_alpha));
        m.insert("lora_dropout".into(), Value::from(self.lora_dropout));
        m.insert(
            "target_modules".into(),
            match &self.target_modules {
                TargetModules::List(l) => Value::from(l.clone()),
                TargetModules::Regex(r) => s(r),
            },
        );
        m.insert("use_rslora".into(), Value::Bool(self.use_rslora));
        m.insert("bias".into(), s(&self.bias));
        m.insert(
            "base_model_name_or_path".into(),
            opt_s(&self.base_model_name_or_path),
        );
        m.insert("revision".into(), opt_s(&self.revision));
        m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        m.insert("init_lora_weights".into(), self.init_lora_weights.clone());
        m.insert(
            "layers_to_transform".into(),
            self.layers_to_transform.clone(),
        );
        m.insert("layers_pattern".into(), self.layers_pattern.clone());
        m.insert(
            "modules_to_save".into(),
            self.modules_to_save
                .as_ref()
                .map_or(Value::Null, |v| Value::from(v.clone())),
        );
        m.insert("inference_mode".into(), Value::Bool(self.inference_mode));
        m.insert("use_dora".into(), Value::Bool(self.use_dora));
        m.insert(
            "rank_pattern".into(),
            Value::Object(self.rank_pattern.clone()),
        );
        m.insert(
            "alpha_pattern".into(),
            Value::Object(self.alpha_pattern.clone()),
        );
        let obj: Map<String, Value> = m.into_iter().collect();
        // A Map of Values always serialises.
        serde_json::to_string_pretty(&Value::Object(obj)).expect("JSON values serialise")
    }

    /// Whether a module path (`model.layers.0.self_attn.q_proj`) is one `target_modules` names.
    /// A regex `target_modules` is not evaluated: every module is accepted.
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::List(l) => l
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::Regex(_) => true,
        }
    }
}

/// An integral alpha is written as an integer, as PEFT (whose `lora_alpha` is an int) does.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Typed access to the keys of a JSON object, with errors that name the file and key.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a mut Map<String, Value>,
}

impl Fields<'_> {
    fn parse<T: serde::de::DeserializeOwned>(&self, key: &str, v: Value, want: &str) -> Result<T> {
        serde_json::from_value(v.clone()).map_err(|_| Error::Json {
            path: self.path.to_path_buf(),
            msg: format!("key '{key}' is {v}; expected {want}"),
        })
    }

    fn req<T: serde::de::DeserializeOwned>(&mut self, key: &str, want: &str) -> Result<T> {
        match self.obj.remove(key) {
            Some(v) => self.parse(key, v, want),
            None => Err(Error::Json {
                path: self.path.to_path_buf(),
                msg: format!("key '{key}' is missing; expected {want}"),
            }),
        }
    }

    /// Absent or null -> None (PEFT's default applies).
    fn opt<T: serde::de::DeserializeOwned>(&mut self, key: &str, want: &str) -> Result<Option<T>> {
        match self.obj.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.parse(key, v, want).map(Some),
        }
    }
}

/// Which LoRA factor a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPart {
    /// A `(r, in)`.
    A,
    /// B `(out, r)`.
    B,
}

/// Splits a saved PEFT name `base_model.model.<module>.lora_{A,B}.weight` into (module, part).
pub fn parse_peft_name(name: &str) -> Option<(&str, LoraPart)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let (module, part) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, LoraPart::A)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, LoraPart::B)
    };
    (!module.is_empty()).then_some((module, part))
}

/// The saved PEFT name for a module's factor: `base_model.model.<module>.lora_A.weight`.
pub fn peft_name(module: &str, part: LoraPart) -> String {
    let p = match part {
        LoraPart::A => "A",
        LoraPart::B => "B",
    };
    format!("base_model.model.{module}.lora_{p}.weight")
}

/// Drops the adapter-name segment of an in-memory PEFT parameter name
/// (`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`,
/// `...lora_magnitude_vector.default.weight` -> `...lora_magnitude_vector`); other names are
/// returned as is.
pub fn strip_adapter_name(name: &str) -> String {
    if let Some((head, tail)) = name.rsplit_once(".lora_magnitude_vector.") {
        if tail
            .strip_suffix(".weight")
            .is_some_and(|a| !a.is_empty() && !a.contains('.'))
        {
            return format!("{head}.lora_magnitude_vector");
        }
    }
    for part in ["lora_A", "lora_B"] {
        let tag = format!(".{part}.");
        if let Some(i) = name.rfind(&tag) {
            let after = &name[i + tag.len()..];
            if let Some(adapter) = after.strip_suffix(".weight") {
                if !adapter.is_empty() && !adapter.contains('.') {
                    return format!("{}.{part}.weight", &name[..i]);
                }
            }
        }
    }
    name.to_string()
}

/// Writes `cfg` and `tensors` (saved PEFT names, f32/bf16/f16, any device) as a PEFT adapter
/// directory `dir`, via `<dir>.tmp` and a rename. An existing `dir` is replaced only if it is empty
/// or holds an adapter (an `adapter_config.json`), so a wrong path never deletes unrelated files.
pub fn save_peft(dir: &Path, cfg: &AdapterConfig, tensors: &[(String, Tensor)]) -> Result<()> {
    check_tensors(
        dir,
        cfg,
        tensors.iter().map(|(n, t)| (n.as_str(), t.dims())),
    )?;
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        views.push((name.clone(), RawView::from_tensor(name, t)?));
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| {
        Error::Invalid(format!(
            "{}: cannot serialise the adapter: {e}",
            dir.display()
        ))
    })?;

    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_synced(&tmp.join(WEIGHTS_FILE), &bytes)?;
    write_synced(&tmp.join(CONFIG_FILE), cfg.to_json().as_bytes())?;
    // Checksums beside the PEFT files (PEFT ignores the extra file): a damaged copy is refused.
    crate::train::manifest::write_manifest(&tmp)?;
    replace_dir_marked(&tmp, dir, CONFIG_FILE)
}

/// [`save_peft`] for trainable variables (e.g. every [`super::LoraLinear::vars`] under its saved
/// PEFT name).
pub fn save_peft_vars(
    dir: &Path,
    cfg: &AdapterConfig,
    vars: &[(String, candle_core::Var)],
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_peft(dir, cfg, &tensors)
}

/// Reads a PEFT adapter directory: its config and its tensors (on the CPU, in the file's dtype,
/// sorted by name), checked to be complete LoRA A/B pairs of rank `r`.
pub fn load_peft(dir: &Path) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
    // Adapters qtune wrote carry checksums; those from elsewhere (PEFT) do not.
    if dir.join(crate::train::manifest::MANIFEST_FILE).exists() {
        crate::train::manifest::verify_manifest(dir)?;
    }
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = AdapterConfig::from_json(&cfg_path, &text)?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::corrupt(&path, "safetensors", e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(Error::UnsupportedType {
                    path: path.clone(),
                    tensor: name,
                    type_name: format!("{other:?}"),
                    supported: "F32, BF16, F16".into(),
                })
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu).map_err(
            |e| Error::Shape {
                path: path.clone(),
                tensor: name.clone(),
                msg: e.to_string(),
            },
        )?;
        out.push((name, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    check_tensors(&path, &cfg, out.iter().map(|(n, t)| (n.as_str(), t.dims())))?;
    Ok((cfg, out))
}

/// Checks that an adapter's tensors are exactly what a model expects (`expected`: saved PEFT name
/// and shape of every factor), naming what is missing, extra or of another shape. An adapter made
/// for another model (other layer count, hidden size, targets or rank) fails here.
pub fn check_compatible(
    dir: &Path,
    cfg: &AdapterConfig,
    tensors: &[(String, Tensor)],
    expected: &[(String, Vec<usize>)],
) -> Result<()> {
    let have: BTreeMap<&str, &[usize]> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.dims()))
        .collect();
    let want: BTreeMap<&str, &[usize]> = expected
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let base = cfg
        .base_model_name_or_path
        .as_deref()
        .filter(|s| !s.is_empty())
        .map_or(String::new(), |b| format!(" (it was made for '{b}')"));
    let mut problems = Vec::new();
    for (name, shape) in &want {
        match have.get(name) {
            None => problems.push(format!("'{name}' is missing (expected shape {shape:?})")),
            Some(s) if s != shape => problems.push(format!(
                "'{name}' has shape {s:?}, this model expects {shape:?}"
            )),
            Some(_) => {}
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!("'{name}' is not a LoRA factor of this model"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(5);
    Err(Error::Invalid(format!(
        "{}: adapter does not fit this model{base}: {}{}; load it with the base model it was trained on",
        dir.display(),
        problems.join("; "),
        if n > 5 { format!("; and {} more", n - 5) } else { String::new() }
    )))
}

/// Every name a LoRA A/B name of a targeted module, both factors present, 2-D, ranks equal to `r`,
/// A's rank dim is rows and B's is columns.
fn check_tensors<'a>(
    path: &Path,
    cfg: &AdapterConfig,
    tensors: impl Iterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    let shape_err = |tensor: &str, msg: String| Error::Shape {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        msg,
    };
    // module -> (A shape, B shape); module -> magnitude shape (DoRA)
    let mut pairs: BTreeMap<&str, [Option<&[usize]>; 2]> = BTreeMap::new();
    let mut mags: BTreeMap<&str, &[usize]> = BTreeMap::new();
    for (name, dims) in tensors {
        if let Some(module) = parse_magnitude_name(name) {
            if !cfg.use_dora {
                return Err(shape_err(
                    name,
                    "a DoRA magnitude in an adapter whose config has use_dora false; set \
                     \"use_dora\": true in adapter_config.json if it is a DoRA adapter"
                        .into(),
                ));
            }
            if dims.len() != 1 || mags.insert(module, dims).is_some() {
                return Err(shape_err(
                    name,
                    format!("shape {dims:?}: a DoRA magnitude is one vector (out,) per module"),
                ));
            }
            continue;
        }
        let Some((module, part)) = parse_peft_name(name) else {
            return Err(shape_err(
                name,
                "not a LoRA weight name; expected 'base_model.model.<module>.lora_A.weight' or \
                 '...lora_B.weight' (PEFT's saved form, without the adapter name)"
                    .into(),
            ));
        };
        if !cfg.targets(module) {
            return Err(shape_err(
                name,
                format!(
                    "module '{module}' is not among target_modules {:?} of the adapter config",
                    cfg.target_modules
                ),
            ));
        }
        let (i, rank_dim) = match part {
            LoraPart::A => (0, 0),
            LoraPart::B => (1, 1),
        };
        if dims.len() != 2 {
            return Err(shape_err(name, format!("shape {dims:?} is not 2-D")));
        }
        if dims[rank_dim] != cfg.r {
            let (what, want) = match part {
                LoraPart::A => ("A", format!("({}, in)", cfg.r)),
                LoraPart::B => ("B", format!("(out, {})", cfg.r)),
            };
            return Err(shape_err(
                name,
                format!(
                    "rank mismatch: LoRA {what} has shape {dims:?} but the config says r = {}, so \
                     {want} was expected",
                    cfg.r
                ),
            ));
        }
        let slot = &mut pairs.entry(module).or_default()[i];
        if slot.is_some() {
            return Err(shape_err(name, "appears twice".into()));
        }
        *slot = Some(dims);
    }
    if pairs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: the adapter holds no LoRA weights; it is empty or not a LoRA adapter",
            path.display()
        )));
    }
    if cfg.use_dora {
        super::dora::check_magnitudes(path, &pairs, &mags)?;
    }
    for (module, [a, b]) in &pairs {
        let (have, missing) = match (a, b) {
            (Some(_), Some(_)) => continue,
            (Some(_), None) => (LoraPart::A, LoraPart::B),
            (None, Some(_)) => (LoraPart::B, LoraPart::A),
            (None, None) => unreachable!("a module enters the map with one factor"),
        };
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: peft_name(module, missing),
            hint: format!(
                " (its pair '{}' is present; an adapter needs both A and B)",
                peft_name(module, have)
            ),
        });
    }
    Ok(())
}

/// A tensor's bytes in safetensors layout (little-endian, row-major).
struct RawView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawView {
    fn from_tensor(name: &str, t: &Tensor) -> Result<Self> {
        let e = |e: candle_core::Error| Error::Invalid(format!("tensor '{name}': {e}"));
        let flat = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .map_err(e)?;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                bytemuck::cast_slice(&flat.to_vec1::<f32>().map_err(e)?).to_vec(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                bytemuck::cast_slice(&flat.to_vec1::<half::bf16>().map_err(e)?).to_vec(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                bytemuck::cast_slice(&flat.to_vec1::<half::f16>().map_err(e)?).to_vec(),
            ),
            other => {
                return Err(Error::Invalid(format!(
                    "tensor '{name}' is {other:?}; adapters are saved as f32, bf16 or f16"
                )))
            }
        };
        Ok(RawView {
            dtype,
            shape: t.dims().to_vec(),
            data,
        })
    }
}

impl safetensors::View for RawView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

// safetensors is little-endian; the byte casts above write native order.
#[cfg(target_endian = "big")]
compile_error!("qtune writes safetensors with native byte order and needs a little-endian target");

/// `<dir>.<suffix>` beside `dir`.
pub(crate) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_os_string();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes a file and flushes it to disk, so the rename that publishes it publishes whole data.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Flushes a file written by someone else's writer to disk.
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Moves the finished directory `tmp` to `dir`, replacing an old `dir` that holds `marker` (the
/// file that shows it is ours) or nothing; a directory with other contents is refused. Should the
/// process die between the two renames, the old contents survive as `<dir>.old`, the new as
/// `<dir>.tmp`.
pub(crate) fn replace_dir_marked(tmp: &Path, dir: &Path, marker: &str) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_none();
        if !empty && !dir.join(marker).exists() {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a directory qtune wrote (no {marker}); refusing to replace \
                 it: choose another output path",
                dir.display()
            )));
        }
        let old = sibling(dir, "old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(tmp, dir).map_err(|e| Error::io(tmp, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
    } else {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::rename(tmp, dir).map_err(|e| Error::io(tmp, e))
    }
}
