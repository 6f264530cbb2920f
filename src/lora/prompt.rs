//! Prompt learning as PEFT 0.13.2 does it: prompt tuning, P-tuning (MLP encoder) and prefix tuning
//! (with or without its projection), as one [`SequenceAdapter`] of the shared decoder.
//!
//! - Prompt tuning / P-tuning: `(N, C)` rows before every sequence's token embeddings (rotary
//!   positions 0..N+T-1 over the joined sequence; the last virtual row predicts the first token).
//! - Prefix tuning: a `(KVH, N, D)` key and value prefix in every layer, keys without rotary, the
//!   tokens at positions N..N+T-1 (GQA: PEFT sizes the prefix by KV heads).
//!
//! PEFT saves only `prompt_embeddings` (the encoder's OUTPUT for P-tuning and a projected prefix);
//! our checkpoints add `prompt_encoder.safetensors` (the encoder's state under PEFT's names), which
//! `--adapter-init` also reads, so a run can continue from its encoder.
use super::seam::SequenceAdapter;
use crate::rng::SplitMix64;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The encoder's state beside the PEFT files (not read by PEFT).
pub const ENCODER_FILE: &str = "prompt_encoder.safetensors";
/// The one tensor PEFT saves for every prompt-learning method.
pub const PROMPT_TENSOR: &str = "prompt_embeddings";

/// A prompt-learning method (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptMethod {
    /// `PROMPT_TUNING`: the virtual rows themselves train.
    PromptTuning,
    /// `P_TUNING` with the MLP reparameterisation.
    PTuning,
    /// `PREFIX_TUNING`; `true`: with `prefix_projection` (an MLP over the prefix).
    PrefixTuning(bool),
}

impl PromptMethod {
    /// PEFT's `peft_type`.
    pub fn peft_type(self) -> &'static str {
        match self {
            PromptMethod::PromptTuning => "PROMPT_TUNING",
            PromptMethod::PTuning => "P_TUNING",
            PromptMethod::PrefixTuning(_) => "PREFIX_TUNING",
        }
    }
}

/// What a prompt-learning adapter is, before the model is loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSpec {
    /// The method.
    pub method: PromptMethod,
    /// Virtual tokens N.
    pub num_virtual_tokens: usize,
    /// The encoder's hidden size (P-tuning's MLP, prefix tuning's projection).
    pub encoder_hidden_size: usize,
    /// Prompt tuning's TEXT init: these token ids (repeated / cut to N), else RANDOM N(0, 1).
    pub init_ids: Option<Vec<u32>>,
    /// The text the ids came from (written to the adapter config).
    pub init_text: Option<String>,
    /// Seed of the initialisation.
    pub seed: u64,
}

/// The model dimensions a prompt adapter is shaped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptDims {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size C.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head size D.
    pub head_dim: usize,
}

impl PromptDims {
    /// PEFT's `token_dim`: C, or KVH·D for prefix tuning (its GQA rule, PEFT issue #1901).
    pub fn token_dim(&self, m: PromptMethod) -> usize {
        match m {
            PromptMethod::PrefixTuning(_) => self.kv_heads * self.head_dim,
            _ => self.hidden,
        }
    }
    /// PEFT's `num_attention_heads`: KV heads for prefix tuning.
    pub fn attention_heads(&self, m: PromptMethod) -> usize {
        match m {
            PromptMethod::PrefixTuning(_) => self.kv_heads,
            _ => self.heads,
        }
    }
    /// Width of a `prompt_embeddings` row: C, or layers·2·token_dim for prefix tuning.
    pub fn row_width(&self, m: PromptMethod) -> usize {
        match m {
            PromptMethod::PrefixTuning(_) => self.layers * 2 * self.token_dim(m),
            _ => self.hidden,
        }
    }
}

impl PromptSpec {
    /// Every trainable tensor's PEFT name (below `prompt_encoder.default`) and shape, in order.
    pub fn shapes(&self, d: &PromptDims) -> Vec<(String, Vec<usize>)> {
        let (n, h, m) = (
            self.num_virtual_tokens,
            self.encoder_hidden_size,
            self.method,
        );
        let (td, w) = (d.token_dim(m), d.row_width(m));
        let s = |name: &str, shape: Vec<usize>| (name.to_string(), shape);
        match m {
            PromptMethod::PromptTuning | PromptMethod::PrefixTuning(false) => {
                vec![s(PROMPT_TENSOR, vec![n, w])]
            }
            PromptMethod::PTuning => vec![
                s("embedding.weight", vec![n, td]),
                s("mlp_head.0.weight", vec![h, td]),
                s("mlp_head.0.bias", vec![h]),
                s("mlp_head.2.weight", vec![h, h]),
                s("mlp_head.2.bias", vec![h]),
                s("mlp_head.4.weight", vec![td, h]),
                s("mlp_head.4.bias", vec![td]),
            ],
            PromptMethod::PrefixTuning(true) => vec![
                s("embedding.weight", vec![n, td]),
                s("transform.0.weight", vec![h, td]),
                s("transform.0.bias", vec![h]),
                s("transform.2.weight", vec![w, h]),
                s("transform.2.bias", vec![w]),
            ],
        }
    }

    /// Whether the trainable state is an encoder (saved beside the PEFT output).
    pub fn has_encoder(&self) -> bool {
        matches!(
            self.method,
            PromptMethod::PTuning | PromptMethod::PrefixTuning(true)
        )
    }
}

/// A prompt-learning adapter on a loaded model.
pub struct PromptAdapter {
    spec: PromptSpec,
    dims: PromptDims,
    vars: Vec<(String, Var)>,
}

fn cerr(e: candle_core::Error) -> Error {
    Error::Invalid(format!("prompt adapter: {e}"))
}

impl PromptAdapter {
    /// A fresh adapter: RANDOM N(0, 1) rows (or the embedding rows `embed(ids)` `(N, C)` f32 of
    /// the TEXT init), PyTorch's default `Linear` init for encoder layers (weights and biases
    /// U(±1/√in)). Variables in `dtype` on `device`.
    pub fn new(
        spec: &PromptSpec,
        dims: PromptDims,
        embed: impl Fn(&[u32]) -> Result<Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = spec.num_virtual_tokens;
        if n == 0 {
            return Err(Error::Invalid(
                "--num-virtual-tokens must be at least 1".into(),
            ));
        }
        if spec.has_encoder() && spec.encoder_hidden_size == 0 {
            return Err(Error::Invalid(
                "--encoder-hidden-size must be at least 1".into(),
            ));
        }
        let mut rng = SplitMix64(spec.seed ^ 0x5072_6f6d_7074);
        let mut vars = Vec::new();
        for (name, shape) in spec.shapes(&dims) {
            let numel: usize = shape.iter().product();
            let t = if let (Some(ids), true) = (&spec.init_ids, name == PROMPT_TENSOR) {
                if ids.is_empty() {
                    return Err(Error::Invalid(
                        "--prompt-init-text tokenises to no tokens".into(),
                    ));
                }
                // PEFT: the text's ids repeated to at least N, then the first N.
                let ids: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
                embed(&ids)?
            } else if name.ends_with("embedding.weight") || name == PROMPT_TENSOR {
                let v: Vec<f32> = (0..numel).map(|_| rng.normal()).collect();
                Tensor::from_vec(v, shape.clone(), &Device::Cpu).map_err(cerr)?
            } else {
                // kaiming_uniform(a=√5) on (out, in) = U(±1/√in); the bias the same bound.
                let fan_in = if shape.len() == 2 {
                    shape[1]
                } else {
                    let w = name.replace(".bias", ".weight");
                    let ws = spec.shapes(&dims);
                    ws.iter().find(|(n, _)| *n == w).map_or(1, |(_, s)| s[1])
                };
                let b = 1.0 / (fan_in as f64).sqrt();
                let v: Vec<f32> = (0..numel)
                    .map(|_| ((2.0 * rng.next_f64() - 1.0) * b) as f32)
                    .collect();
                Tensor::from_vec(v, shape.clone(), &Device::Cpu).map_err(cerr)?
            };
            let t = t
                .to_dtype(dtype)
                .and_then(|t| t.to_device(device))
                .map_err(cerr)?;
            vars.push((name, Var::from_tensor(&t).map_err(cerr)?));
        }
        Ok(PromptAdapter {
            spec: spec.clone(),
            dims,
            vars,
        })
    }

    fn var(&self, i: usize) -> &Tensor {
        self.vars[i].1.as_tensor()
    }

    /// The virtual-token output `(N, width)`: the rows, or the encoder applied to its embedding.
    pub fn output(&self) -> candle_core::Result<Tensor> {
        encoder_output(self.spec.method, &self.vars)
    }

    /// Its dimensions.
    pub fn dims(&self) -> PromptDims {
        self.dims
    }
}

/// `x Wᵀ + b`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// The virtual-token output `(N, width)` of method `m`'s trainable tensors `vars` (in
/// [`PromptSpec::shapes`] order): P-tuning `mlp_head` (Linear, ReLU, Linear, ReLU, Linear),
/// prefix projection `transform` (Linear, Tanh, Linear).
pub fn encoder_output(m: PromptMethod, vars: &[(String, Var)]) -> candle_core::Result<Tensor> {
    let v = |i: usize| vars[i].1.as_tensor();
    match m {
        PromptMethod::PromptTuning | PromptMethod::PrefixTuning(false) => Ok(v(0).clone()),
        PromptMethod::PTuning => {
            let h = linear(v(0), v(1), v(2))?.relu()?;
            let h = linear(&h, v(3), v(4))?.relu()?;
            linear(&h, v(5), v(6))
        }
        PromptMethod::PrefixTuning(true) => {
            let h = linear(v(0), v(1), v(2))?.tanh()?;
            linear(&h, v(3), v(4))
        }
    }
}

impl SequenceAdapter for PromptAdapter {
    fn prompt_rows(&self) -> Option<Tensor> {
        match self.spec.method {
            PromptMethod::PrefixTuning(_) => None,
            PromptMethod::PromptTuning => Some(self.var(0).clone()),
            // An encoder failing on its own shapes is a bug of ours, not of the input.
            PromptMethod::PTuning => Some(self.output().expect("P-tuning encoder")),
        }
    }
    fn prompt_len(&self) -> usize {
        match self.spec.method {
            PromptMethod::PrefixTuning(_) => 0,
            _ => self.spec.num_virtual_tokens,
        }
    }
    fn kv_prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        if !matches!(self.spec.method, PromptMethod::PrefixTuning(_)) {
            return None;
        }
        // One row: [L0 key (KVH·D), L0 value, L1 key, ...] (PEFT's get_prompt view and permute).
        let d = self.dims;
        let run = || -> candle_core::Result<(Tensor, Tensor)> {
            let n = self.spec.num_virtual_tokens;
            let out = self
                .output()?
                .reshape((n, d.layers * 2, d.kv_heads, d.head_dim))?;
            // (N, KVH, D) -> (KVH, N, D)
            let part = |i: usize| {
                out.narrow(1, i, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .contiguous()
            };
            Ok((part(2 * layer)?, part(2 * layer + 1)?))
        };
        Some(run().expect("prefix shapes"))
    }
    fn prefix_len(&self) -> usize {
        match self.spec.method {
            PromptMethod::PrefixTuning(_) => self.spec.num_virtual_tokens,
            _ => 0,
        }
    }
    fn params(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
}

/// The `adapter_config.json` of a prompt-learning adapter, with PEFT 0.13.2's keys.
pub fn peft_config(spec: &PromptSpec, d: &PromptDims, base: Option<&str>) -> Value {
    let m = spec.method;
    let mut v = json!({
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "inference_mode": true,
        "num_attention_heads": d.attention_heads(m),
        "num_layers": d.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "peft_type": m.peft_type(),
        "revision": null,
        "task_type": "CAUSAL_LM",
        "token_dim": d.token_dim(m),
    });
    let o = v.as_object_mut().expect("an object");
    match m {
        PromptMethod::PromptTuning => {
            let text = spec.init_text.is_some() && spec.init_ids.is_some();
            o.insert(
                "prompt_tuning_init".into(),
                json!(if text { "TEXT" } else { "RANDOM" }),
            );
            o.insert("prompt_tuning_init_text".into(), json!(spec.init_text));
            o.insert("tokenizer_kwargs".into(), Value::Null);
            let tok = if text { json!(base) } else { Value::Null };
            o.insert("tokenizer_name_or_path".into(), tok);
        }
        PromptMethod::PTuning => {
            o.insert("encoder_dropout".into(), json!(0.0));
            o.insert(
                "encoder_hidden_size".into(),
                json!(spec.encoder_hidden_size),
            );
            o.insert("encoder_num_layers".into(), json!(2));
            o.insert("encoder_reparameterization_type".into(), json!("MLP"));
        }
        PromptMethod::PrefixTuning(p) => {
            o.insert(
                "encoder_hidden_size".into(),
                json!(spec.encoder_hidden_size),
            );
            o.insert("prefix_projection".into(), json!(p));
        }
    }
    v
}

/// Writes a PEFT prompt-learning directory `dir` (via `<dir>.tmp` and a rename):
/// `adapter_config.json`, `adapter_model.safetensors` with `prompt_embeddings` (the output, f32),
/// and, for an encoder, [`ENCODER_FILE`] with its state; `vars` in [`PromptSpec::shapes`] order.
pub fn save(
    dir: &Path,
    spec: &PromptSpec,
    d: &PromptDims,
    base: Option<&str>,
    vars: &[(String, Var)],
) -> Result<()> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    let out = encoder_output(spec.method, vars)
        .and_then(|t| f32(&t))
        .map_err(cerr)?;
    let tmp = super::adapter::sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let weights = tmp.join(super::adapter::WEIGHTS_FILE);
    let map: HashMap<String, Tensor> = [(PROMPT_TENSOR.to_string(), out)].into();
    candle_core::safetensors::save(&map, &weights)
        .map_err(|e| Error::Invalid(format!("{}: {e}", weights.display())))?;
    if spec.has_encoder() {
        let p = tmp.join(ENCODER_FILE);
        let mut map = HashMap::new();
        for (n, v) in vars {
            map.insert(n.clone(), f32(v.as_tensor()).map_err(cerr)?);
        }
        candle_core::safetensors::save(&map, &p)
            .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
    }
    let text = serde_json::to_string_pretty(&peft_config(spec, d, base)).expect("JSON");
    super::adapter::write_synced(&tmp.join(super::adapter::CONFIG_FILE), text.as_bytes())?;
    crate::train::manifest::write_manifest(&tmp)?;
    super::adapter::replace_dir_marked(&tmp, dir, super::adapter::CONFIG_FILE)
}

/// What a prompt-learning directory holds.
pub struct Loaded {
    /// The config as read.
    pub config: Value,
    /// The method its config names.
    pub method: PromptMethod,
    /// `num_virtual_tokens`.
    pub num_virtual_tokens: usize,
    /// `encoder_hidden_size` (0 where absent).
    pub encoder_hidden_size: usize,
    /// `prompt_embeddings` `(N, width)` f32.
    pub prompt_embeddings: Tensor,
    /// [`ENCODER_FILE`]'s tensors, when present.
    pub encoder: Option<HashMap<String, Tensor>>,
}

impl Loaded {
    /// The adapter as PEFT runs a loaded one (inference mode): its saved `prompt_embeddings` as
    /// fixed rows or a fixed prefix, whatever encoder made them.
    pub fn inference_spec(&self) -> PromptSpec {
        let method = match self.method {
            PromptMethod::PrefixTuning(_) => PromptMethod::PrefixTuning(false),
            _ => PromptMethod::PromptTuning,
        };
        PromptSpec {
            method,
            num_virtual_tokens: self.num_virtual_tokens,
            encoder_hidden_size: 0,
            init_ids: None,
            init_text: None,
            seed: 0,
        }
    }
}

/// Why `what` (a merge, a GGUF LoRA export) refuses a prompt-learning adapter of `method`, and
/// what to do instead.
pub fn refusal(what: &str, method: &str) -> String {
    format!(
        "{what}: a {method} adapter is virtual tokens (inputs to the model), not a change of its \
         weights: it cannot be merged into the weights, and llama.cpp's GGUF LoRA format holds only \
         LoRA A/B pairs per weight (llama.cpp loads no prompt-tuning, P-tuning or prefix \
         adapters). Use it unmerged: `qtune generate --adapter DIR`, `qtune eval --adapter DIR`, \
         or PEFT's PeftModel.from_pretrained; for a merged model or a llama.cpp file, train with \
         --method lora"
    )
}

/// The `peft_type` of the adapter directory `dir`, if its config reads.
pub fn peft_type_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(super::adapter::CONFIG_FILE)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("peft_type")?.as_str().map(str::to_string)
}

/// Whether `peft_type` is one of the prompt-learning methods.
pub fn is_prompt_type(peft_type: &str) -> bool {
    matches!(peft_type, "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING")
}

/// Reads a PEFT prompt-learning directory (ours or PEFT's), checking its config's keys.
pub fn load(dir: &Path) -> Result<Loaded> {
    if dir.join(crate::train::manifest::MANIFEST_FILE).exists() {
        crate::train::manifest::verify_manifest(dir)?;
    }
    let cpath = dir.join(super::adapter::CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
    let jerr = |msg: String| Error::Json {
        path: cpath.clone(),
        msg,
    };
    let config: Value =
        serde_json::from_str(&text).map_err(|e| jerr(format!("not valid JSON: {e}")))?;
    let int = |k: &str| config.get(k).and_then(Value::as_u64).map(|x| x as usize);
    let method = match config.get("peft_type").and_then(Value::as_str) {
        Some("PROMPT_TUNING") => PromptMethod::PromptTuning,
        Some("P_TUNING") => {
            let r = config.get("encoder_reparameterization_type");
            if r.and_then(Value::as_str).is_some_and(|r| r != "MLP") {
                return Err(jerr(format!(
                    "encoder_reparameterization_type {} is not supported; qtune runs PEFT's MLP encoder",
                    r.unwrap_or(&Value::Null)
                )));
            }
            PromptMethod::PTuning
        }
        Some("PREFIX_TUNING") => PromptMethod::PrefixTuning(
            config
                .get("prefix_projection")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        ),
        other => {
            return Err(jerr(format!(
                "peft_type {other:?} is not a prompt-learning method (PROMPT_TUNING, P_TUNING, PREFIX_TUNING)"
            )))
        }
    };
    let n = int("num_virtual_tokens")
        .filter(|&n| n > 0)
        .ok_or_else(|| jerr("num_virtual_tokens must be a positive integer".into()))?;
    if int("num_transformer_submodules").is_some_and(|s| s != 1) {
        return Err(jerr(
            "num_transformer_submodules must be 1 (a decoder-only model)".into(),
        ));
    }
    let wpath = dir.join(super::adapter::WEIGHTS_FILE);
    let mut w = candle_core::safetensors::load(&wpath, &Device::Cpu)
        .map_err(|e| Error::corrupt(&wpath, "safetensors", e.to_string()))?;
    let pe = w
        .remove(PROMPT_TENSOR)
        .ok_or_else(|| Error::MissingTensor {
            path: wpath.clone(),
            tensor: PROMPT_TENSOR.into(),
            hint: " (PEFT saves the virtual tokens under this one name)".into(),
        })?;
    if pe.dims().len() != 2 || pe.dim(0).ok() != Some(n) {
        return Err(Error::Shape {
            path: wpath,
            tensor: PROMPT_TENSOR.into(),
            msg: format!(
                "shape {:?}, expected [{n}, width] (num_virtual_tokens {n})",
                pe.dims()
            ),
        });
    }
    let pe = pe.to_dtype(DType::F32).map_err(cerr)?;
    let epath = dir.join(ENCODER_FILE);
    let encoder = if epath.is_file() {
        Some(
            candle_core::safetensors::load(&epath, &Device::Cpu)
                .map_err(|e| Error::corrupt(&epath, "safetensors", e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Loaded {
        method,
        num_virtual_tokens: n,
        encoder_hidden_size: int("encoder_hidden_size").unwrap_or(0),
        config,
        prompt_embeddings: pe,
        encoder,
    })
}

/// Sets `vars` (a fresh adapter's, [`PromptSpec::shapes`] order) from a loaded directory `dir`:
/// the encoder's state when the method has one (it must be there: PEFT's file holds only the
/// encoder's output), else `prompt_embeddings`. Every name and shape is checked.
pub fn set_vars(vars: &[(String, Var)], dir: &Path, l: &Loaded) -> Result<()> {
    let has_encoder = vars.len() > 1;
    let src: HashMap<String, Tensor> = if has_encoder {
        match &l.encoder {
            Some(e) => e.clone(),
            None => {
                return Err(Error::Invalid(format!(
                    "{}: no {ENCODER_FILE}: PEFT saves only the encoder's output \
                     (prompt_embeddings), so {} training cannot continue from it; give the \
                     directory of a qtune checkpoint, or put the encoder's state under PEFT's names \
                     (embedding.weight, mlp_head.N.* / transform.N.*) in {ENCODER_FILE} beside it",
                    dir.display(),
                    l.method.peft_type()
                )))
            }
        }
    } else {
        [(PROMPT_TENSOR.to_string(), l.prompt_embeddings.clone())].into()
    };
    let file = if has_encoder {
        dir.join(ENCODER_FILE)
    } else {
        dir.join(super::adapter::WEIGHTS_FILE)
    };
    for (name, var) in vars {
        let t = src.get(name).ok_or_else(|| Error::MissingTensor {
            path: file.clone(),
            tensor: name.clone(),
            hint: format!(" ({} adapter of this shape)", l.method.peft_type()),
        })?;
        if t.dims() != var.dims() {
            return Err(Error::Shape {
                path: file.clone(),
                tensor: name.clone(),
                msg: format!(
                    "shape {:?}, this model and method expect {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        t.to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .and_then(|t| var.set(&t))
            .map_err(cerr)?;
    }
    if let Some(extra) = src.keys().find(|k| !vars.iter().any(|(n, _)| n == *k)) {
        return Err(Error::Shape {
            path: file,
            tensor: extra.clone(),
            msg: "not a tensor of this method's encoder".into(),
        });
    }
    Ok(())
}
