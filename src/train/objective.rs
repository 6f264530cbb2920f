//! What a training run optimises: the objective seam of the trainer.
//!
//! An [`Objective`] owns everything that depends on what is being learned: the shape of an example
//! and of a micro-batch, how examples are cut to `--seq-len`, the loss of a micro-batch with its
//! gradients, the weight of a micro-batch in its optimizer step, and the metrics logged per step and
//! per evaluation. The loop in [`super::trainer`] (data order, accumulation, clipping, AdamW,
//! checkpoints, resume, reports) is the same for every objective.
//!
//! Supervised fine-tuning ([`Sft`]) is the first one. A preference objective (DPO) is a second
//! implementation: its example is a (prompt, chosen, rejected) triple, its micro-batch runs chosen
//! and rejected together, and its loss comes from per-sequence log-probabilities of the policy and
//! of the reference (the base with the adapter switched off).
use super::data::{fit_samples, make_batch, Batch, Fnv, Sample};
use crate::models::CausalLm;
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;

/// Named scalar metrics, in the order they are logged (keys of `metrics.jsonl`).
pub type Metrics = Vec<(&'static str, f64)>;

/// One micro-batch's result.
pub struct MicroStep {
    /// The micro-batch's loss (its own mean; the loop weights it by [`Objective::weight`]).
    pub loss: f64,
    /// The gradient of that loss for every trainable tensor, by PEFT name.
    pub grads: HashMap<String, Tensor>,
    /// Further per-micro-batch metrics (weighted like the loss).
    pub metrics: Metrics,
}

/// A training objective: the part of a run that depends on what is learned (see the module doc).
pub trait Objective {
    /// One tokenised example.
    type Example: Clone;
    /// A micro-batch of examples, ready for the model.
    type Batch;

    /// The objective's name (`sft`, ...), as `--objective` takes it.
    fn name(&self) -> &'static str;
    /// The examples cut to `seq_len`, those with nothing to learn dropped; also how many were cut.
    /// `what` names the data set in errors ("training", "eval").
    fn fit(
        &self,
        examples: Vec<Self::Example>,
        seq_len: usize,
        what: &str,
    ) -> Result<(Vec<Self::Example>, usize)>;
    /// Feeds every example into `h` (a resumed run must see the same data).
    fn fingerprint(&self, examples: &[Self::Example], h: &mut Fnv);
    /// Tensors of a micro-batch.
    fn batch(&self, examples: &[&Self::Example]) -> Result<Self::Batch>;
    /// The micro-batch's share of its optimizer step (the loss of a step is the mean over these
    /// units across its micro-batches: target tokens for SFT, pairs for DPO). 0: skipped.
    fn weight(&self, batch: &Self::Batch) -> usize;
    /// Sequences one training call of the model runs (the memory plan's batch): the micro-batch
    /// of `micro` examples for SFT.
    fn sequences_per_call(&self, micro: usize) -> usize {
        micro
    }
    /// Whether it runs a no-graph reference forward over a micro-batch's rows before each
    /// training call (the memory plan's `reference forward`).
    fn reference_forward(&self) -> bool {
        false
    }
    /// The log key of a step's total weight (`target_tokens` for SFT, `pairs` for DPO).
    fn weight_name(&self) -> &'static str {
        "target_tokens"
    }
    /// Real (unpadded) tokens the micro-batch runs through the model.
    fn tokens(&self, batch: &Self::Batch) -> usize;
    /// Loss, gradients and metrics of one micro-batch (training mode: dropout on).
    fn micro_step(&self, model: &dyn CausalLm, batch: &Self::Batch) -> Result<MicroStep>;
    /// Training-mode model calls (`train_grads`) one micro-batch of `micro` examples makes: a
    /// resumed run replays that many per micro-batch done, so dropout masks continue exactly.
    fn model_calls(&self, micro: usize) -> usize {
        let _ = micro;
        1
    }
    /// Runs once the model is built, before the first step (e.g. precomputing reference values
    /// into the examples, `micro` examples a model call); `run_dir` may cache what it computes.
    /// Nothing by default.
    fn setup(
        &self,
        model: &dyn CausalLm,
        train: &mut [Self::Example],
        eval: &mut [Self::Example],
        run_dir: &std::path::Path,
        micro: usize,
    ) -> Result<()> {
        let _ = (model, train, eval, run_dir, micro);
        Ok(())
    }
    /// The line an evaluation at `step` prints from its metrics.
    fn eval_line(&self, step: usize, m: &Metrics) -> String {
        format!("step {step}: {}", describe(m))
    }
    /// Metrics on held-out examples in micro-batches of `micro`, the first one being the loss
    /// (`eval_loss`).
    fn evaluate(
        &self,
        model: &dyn CausalLm,
        examples: &[Self::Example],
        micro: usize,
    ) -> Result<Metrics>;
}

/// Supervised fine-tuning: the mean next-token cross-entropy over every target token of a step
/// (transformers' shifted causal-LM loss, -100 ignored).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sft {
    /// Virtual tokens come first (prompt tuning, P-tuning): a row's first label is a target too.
    pub first_label: bool,
}

impl Objective for Sft {
    type Example = Sample;
    type Batch = Batch;

    fn name(&self) -> &'static str {
        "sft"
    }
    fn fit(
        &self,
        examples: Vec<Sample>,
        seq_len: usize,
        what: &str,
    ) -> Result<(Vec<Sample>, usize)> {
        fit_samples(examples, seq_len, what)
    }
    fn fingerprint(&self, examples: &[Sample], h: &mut Fnv) {
        h.eat(examples.len() as u64);
        examples.iter().for_each(|s| h.eat_sample(s));
    }
    fn batch(&self, examples: &[&Sample]) -> Result<Batch> {
        make_batch(examples)
    }
    fn weight(&self, batch: &Batch) -> usize {
        batch.targets
            + if self.first_label {
                batch.first_targets
            } else {
                0
            }
    }
    fn tokens(&self, batch: &Batch) -> usize {
        batch.tokens
    }
    fn micro_step(&self, model: &dyn CausalLm, b: &Batch) -> Result<MicroStep> {
        let (loss, grads) = model.train_grads(&b.ids, Some(&b.mask), &b.labels)?;
        Ok(MicroStep {
            loss: loss as f64,
            grads,
            metrics: Vec::new(),
        })
    }
    fn eval_line(&self, step: usize, m: &Metrics) -> String {
        let l = m.first().map_or(f64::NAN, |m| m.1);
        format!("step {step}: eval loss {l:.4}, perplexity {:.2}", l.exp())
    }
    fn evaluate(&self, model: &dyn CausalLm, examples: &[Sample], micro: usize) -> Result<Metrics> {
        let l = mean_loss(model, examples, micro)?.0 as f32 as f64;
        Ok(vec![("eval_loss", l), ("eval_ppl", l.exp())])
    }
}

/// Adds `w · grads` (as f32) into `acc`, name by name: how a step sums its micro-batches and DPO
/// its sequences. `w == 1` adds the gradients as they are.
pub fn add_weighted(
    acc: &mut HashMap<String, Tensor>,
    grads: HashMap<String, Tensor>,
    w: f64,
) -> Result<()> {
    for (name, g) in grads {
        let ge = |e: candle_core::Error| crate::Error::Invalid(format!("gradient '{name}': {e}"));
        let g = g.to_dtype(candle_core::DType::F32).map_err(ge)?;
        let g = if w == 1.0 {
            g
        } else {
            g.affine(w, 0.0).map_err(ge)?
        };
        let v = match acc.remove(&name) {
            Some(a) => (a + g).map_err(ge)?,
            None => g,
        };
        acc.insert(name, v);
    }
    Ok(())
}

/// The line an evaluation prints: `k v, k v`.
pub fn describe(m: &Metrics) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Mean loss over every target token of `samples`, in micro-batches of `micro` (each batch's mean
/// weighted by its target count, so the batch size does not change the figure).
pub fn mean_loss(model: &dyn CausalLm, samples: &[Sample], micro: usize) -> Result<(f64, usize)> {
    let (mut sum, mut cnt) = (0f64, 0usize);
    for chunk in samples.chunks(micro.max(1)) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let b = make_batch(&refs)?;
        let n = b.targets + usize::from(model.first_label_is_target()) * b.first_targets;
        if n == 0 {
            continue;
        }
        let l = model.eval_loss(&b.ids, Some(&b.mask), &b.labels)?;
        sum += l as f64 * n as f64;
        cnt += n;
    }
    Ok((sum / cnt.max(1) as f64, cnt))
}
