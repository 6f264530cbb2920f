//! Evaluation: the mean next-token loss (and perplexity) of a base model, with or without an
//! adapter, over tokenised samples. The training loop's periodic eval and `qtune eval` share it, so
//! the figures printed while training and those of a merged or requantised model are comparable.
use super::data::Sample;
use crate::lora::adapter;
use crate::models::{CausalLm, LlamaOptions, LoraSpec};
use crate::store::WeightStore;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// What [`evaluate`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean loss over all target tokens (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens counted.
    pub tokens: usize,
}

pub use super::objective::mean_loss;

/// Sets the model's LoRA parameters `params` to a PEFT adapter's tensors, after checking that the
/// adapter (read from `dir`) has exactly these names and shapes.
pub(crate) fn set_adapter(
    params: &[(String, Var)],
    dir: &Path,
    acfg: &adapter::AdapterConfig,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let expected: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    adapter::check_compatible(dir, acfg, tensors, &expected)?;
    let by: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (n, v) in params {
        by[n.as_str()]
            .to_dtype(v.dtype())
            .and_then(|t| t.to_device(v.device()))
            .and_then(|t| v.set(&t))
            .map_err(|e| Error::Invalid(format!("{}: setting '{n}': {e}", dir.display())))?;
    }
    Ok(())
}

/// Loads the model at `model_path` (weights as stored: GGUF, bitsandbytes NF4, or a float
/// directory) for evaluation, with the PEFT adapter in `adapter_dir` applied unmerged if given.
pub fn load_for_eval(
    model_path: &Path,
    adapter_dir: Option<&Path>,
    dtype: DType,
) -> Result<Box<dyn CausalLm>> {
    if let Some(dir) = adapter_dir.filter(|d| {
        crate::lora::prompt::peft_type_of(d)
            .is_some_and(|t| crate::lora::prompt::is_prompt_type(&t))
    }) {
        return load_prompt_for_eval(model_path, dir, dtype);
    }
    let loaded = adapter_dir.map(adapter::load_peft).transpose()?;
    let lora = loaded.as_ref().map(|(acfg, _)| LoraSpec {
        targets: acfg.target_modules.as_targets(),
        r: acfg.r,
        alpha: acfg.lora_alpha,
        rslora: acfg.use_rslora,
        dropout: 0.0,
        use_dora: acfg.use_dora,
        ..LoraSpec::default()
    });
    let opts = LlamaOptions {
        dtype,
        lora,
        checkpoint: false,
        ..LlamaOptions::default()
    };
    let store = WeightStore::open(model_path)?;
    // A load that fails with an adapter's targets is (almost always) an adapter for another model.
    let model = crate::models::load(&store, opts).map_err(|e| match adapter_dir {
        Some(d) => Error::Invalid(format!(
            "adapter {} does not fit the model {}: {e}",
            d.display(),
            model_path.display()
        )),
        None => e,
    })?;
    if let (Some(dir), Some((acfg, tensors))) = (adapter_dir, &loaded) {
        set_adapter(&model.lora_params(), dir, acfg, tensors)?;
    }
    Ok(model)
}

/// [`load_for_eval`] with a prompt-learning directory: its saved rows or prefix, fixed.
fn load_prompt_for_eval(model_path: &Path, dir: &Path, dtype: DType) -> Result<Box<dyn CausalLm>> {
    let l = crate::lora::prompt::load(dir)?;
    let opts = LlamaOptions {
        dtype,
        checkpoint: false,
        ..LlamaOptions::default()
    };
    let store = WeightStore::open(model_path)?;
    let mut model = crate::models::open(&store, opts)?;
    model.install_prompt(&l.inference_spec())?;
    crate::lora::prompt::set_vars(&model.lora_params(), dir, &l)?;
    Ok(Box::new(model))
}

/// Loads the model at `model_path`, applies the PEFT adapter in `adapter_dir` if given, and
/// evaluates `samples` (mean next-token loss).
pub fn evaluate(
    model_path: &Path,
    adapter_dir: Option<&Path>,
    samples: &[Sample],
    micro: usize,
    dtype: DType,
) -> Result<EvalReport> {
    if samples.is_empty() {
        return Err(Error::Invalid(
            "eval: no samples (is the data file empty?)".into(),
        ));
    }
    let model = load_for_eval(model_path, adapter_dir, dtype)?;
    let (loss, tokens) = mean_loss(model.as_ref(), samples, micro)?;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}
