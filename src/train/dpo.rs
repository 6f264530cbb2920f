//! Direct Preference Optimization as TRL's `DPOTrainer` computes it with `loss_type="sigmoid"`:
//! per pair, `loss = -logsigmoid(β·((πc − rc) − (πr − rr)))`, where each term is the **sum** of the
//! completion tokens' log-probabilities (EOS included, prompt masked) under the policy π (the base
//! with the trained adapter) or the reference r; a step's loss is the mean over its pairs.
//!
//! Every pair's chosen and rejected sequences run as rows of one right-padded batch
//! (`[chosen₁, rejected₁, chosen₂, …]`: a micro-batch of p pairs is one model call of 2p rows).
//! The gradient needs no new model op. With S the summed log-probability of one row,
//! `∇L = Σ_rows ∂L/∂S · ∇S`, and `S = −Σ CE` of the row; so the checkpointed step differentiates
//! `Σ_rows w·CE` with `w = −∂L/∂S = ±β·σ(−z)/pairs`, weights it takes from the same forward's row
//! values ([`CausalLm::train_grads_rows`]).
//!
//! The reference costs no second model: it is the same quantised base with every LoRA B set to zero
//! (the adapter's output is then exactly zero, so the logits are the base's), evaluated without
//! dropout, every step — what TRL does for a PEFT model with `ref_model=None`. `--ref-adapter` sets
//! the adapter to a frozen PEFT adapter instead (SFT then DPO), and `--precompute-ref` computes every
//! pair's reference once before training and keeps it in the run directory.
use super::data::{make_batch, Batch, Fnv, Sample};
use super::objective::{Metrics, MicroStep, Objective};
use crate::data::pairs::{fit_pair, Pair};
use crate::models::CausalLm;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// A preference pair in training, with its reference log-probs once known (chosen, rejected).
#[derive(Clone, Debug, PartialEq)]
pub struct PairExample {
    /// The tokenised pair.
    pub pair: Pair,
    /// Precomputed reference log-probs (`--precompute-ref`).
    pub reference: Option<(f64, f64)>,
}

/// The DPO objective (see the module doc).
pub struct Dpo {
    /// β.
    pub beta: f64,
    /// The reference adapter's tensors by PEFT name (`None`: the base alone, every B zero).
    pub reference_adapter: Option<Vec<(String, Tensor)>>,
    /// Compute every pair's reference once before training.
    pub precompute: bool,
}

/// The file in the run directory that keeps precomputed reference log-probs.
pub const REF_FILE: &str = "ref_logps.json";

/// The sequence `prompt + completion`, loss on the completion.
fn sequence(p: &Pair, chosen: bool) -> Sample {
    let c = if chosen { &p.chosen } else { &p.rejected };
    let ids: Vec<u32> = p.prompt.iter().chain(c).copied().collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(t, &i)| if t < p.prompt.len() { -100 } else { i as i64 })
        .collect();
    Sample { ids, labels }
}

fn cerr(what: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| Error::Invalid(format!("dpo {what}: {e}"))
}

/// The rows `[chosen₁, rejected₁, chosen₂, …]` of `pairs` as one right-padded batch.
fn pair_batch(pairs: &[PairExample]) -> Result<Batch> {
    let rows: Vec<Sample> = pairs
        .iter()
        .flat_map(|e| [sequence(&e.pair, true), sequence(&e.pair, false)])
        .collect();
    make_batch(&rows.iter().collect::<Vec<_>>())
}

/// The (chosen, rejected) log-probabilities of the pairs from the batch's row losses.
fn pair_logps(rows: &[(f64, usize)]) -> Vec<(f64, f64)> {
    rows.chunks(2).map(|c| (-c[0].0, -c[1].0)).collect()
}

/// Summed log-probabilities (chosen, rejected) of pairs under the model as it is, eval mode, no
/// graph kept; `micro` pairs a model call.
fn logps(model: &dyn CausalLm, pairs: &[PairExample], micro: usize) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(micro.max(1)) {
        let b = pair_batch(chunk)?;
        out.extend(pair_logps(&model.eval_row_losses(
            &b.ids,
            Some(&b.mask),
            &b.labels,
        )?));
    }
    Ok(out)
}

/// The per-pair values of DPO's sigmoid loss: (loss, ∂loss/∂πc, reward c, reward r).
fn pair_loss(beta: f64, pc: f64, pr: f64, rc: f64, rr: f64) -> (f64, f64, f64, f64) {
    let (wc, wr) = (beta * (pc - rc), beta * (pr - rr));
    let z = wc - wr;
    // -logsigmoid(z) = softplus(-z), stable for either sign.
    let loss = (-z).max(0.0) + (-z.abs()).exp().ln_1p();
    let s = 1.0 / (1.0 + z.exp()); // σ(−z)
    (loss, -beta * s, wc, wr)
}

impl Dpo {
    /// Runs `f` with the adapter replaced by the reference: every LoRA B zero (the base), or the
    /// reference adapter's tensors; the trained values are put back whatever `f` returns.
    fn with_reference<R>(&self, model: &dyn CausalLm, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let params = model.lora_params();
        let saved: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()
            .map_err(cerr("reference"))?;
        let set = |v: &Var, t: &Tensor| -> Result<()> {
            t.to_dtype(v.dtype())
                .and_then(|t| t.to_device(v.device()))
                .and_then(|t| v.set(&t))
                .map_err(cerr("reference"))
        };
        let by: HashMap<&str, &Tensor> = self
            .reference_adapter
            .iter()
            .flatten()
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        let mut swapped = Ok(());
        for (name, v) in &params {
            let r = match by.get(name.as_str()) {
                Some(t) => set(v, t),
                None if self.reference_adapter.is_none() && name.contains("lora_B") => v
                    .zeros_like()
                    .map_err(cerr("reference"))
                    .and_then(|z| set(v, &z)),
                None => Ok(()),
            };
            if r.is_err() {
                swapped = r;
                break;
            }
        }
        let out = swapped.and_then(|_| f());
        for ((_, v), t) in params.iter().zip(&saved) {
            v.set(t).map_err(cerr("reference"))?;
        }
        out
    }

    /// Reference log-probs (chosen, rejected) of every pair: precomputed, or computed now under
    /// one swap of the adapter for the reference, `micro` pairs a call.
    fn references(
        &self,
        model: &dyn CausalLm,
        pairs: &[PairExample],
        micro: usize,
    ) -> Result<Vec<(f64, f64)>> {
        if let Some(r) = pairs
            .iter()
            .map(|e| e.reference)
            .collect::<Option<Vec<_>>>()
        {
            return Ok(r);
        }
        self.with_reference(model, || logps(model, pairs, micro))
    }

    /// Loss and metrics of pairs under the current adapter, eval mode (no gradient).
    fn eval_pairs(
        &self,
        model: &dyn CausalLm,
        pairs: &[PairExample],
        micro: usize,
    ) -> Result<Metrics> {
        let mut m = Accum::default();
        let refs = self.references(model, pairs, micro)?;
        for ((pc, pr), (rc, rr)) in logps(model, pairs, micro)?.into_iter().zip(refs) {
            m.add(self.beta, pc, pr, rc, rr);
        }
        Ok(m.metrics(pairs.len(), "eval_"))
    }
}

/// Sums of the logged per-pair values.
#[derive(Default)]
struct Accum {
    loss: f64,
    rc: f64,
    rr: f64,
    acc: f64,
    pc: f64,
    pr: f64,
}

impl Accum {
    fn add(&mut self, beta: f64, pc: f64, pr: f64, rc: f64, rr: f64) -> f64 {
        let (loss, dpc, wc, wr) = pair_loss(beta, pc, pr, rc, rr);
        self.loss += loss;
        self.rc += wc;
        self.rr += wr;
        self.acc += (wc > wr) as u8 as f64;
        self.pc += pc;
        self.pr += pr;
        dpc
    }

    /// Means over `n` pairs, TRL's names (with `/` as `_`), prefixed for eval.
    fn metrics(&self, n: usize, pre: &str) -> Metrics {
        let n = n.max(1) as f64;
        let key = |k: &'static str| -> &'static str {
            match (pre, k) {
                ("", k) => k,
                (_, "loss") => "eval_loss",
                (_, "rewards_chosen") => "eval_rewards_chosen",
                (_, "rewards_rejected") => "eval_rewards_rejected",
                (_, "rewards_margin") => "eval_rewards_margin",
                (_, "rewards_accuracy") => "eval_rewards_accuracy",
                (_, "logps_chosen") => "eval_logps_chosen",
                (_, _) => "eval_logps_rejected",
            }
        };
        vec![
            (key("loss"), self.loss / n),
            (key("rewards_chosen"), self.rc / n),
            (key("rewards_rejected"), self.rr / n),
            (key("rewards_margin"), (self.rc - self.rr) / n),
            (key("rewards_accuracy"), self.acc / n),
            (key("logps_chosen"), self.pc / n),
            (key("logps_rejected"), self.pr / n),
        ]
    }
}

impl Objective for Dpo {
    type Example = PairExample;
    type Batch = Vec<PairExample>;

    fn name(&self) -> &'static str {
        "dpo"
    }
    fn fit(
        &self,
        examples: Vec<PairExample>,
        seq_len: usize,
        what: &str,
    ) -> Result<(Vec<PairExample>, usize)> {
        if examples.is_empty() {
            return Err(Error::Invalid(format!(
                "{what} data has no preference pair"
            )));
        }
        let mut cut = 0;
        let out = examples
            .into_iter()
            .map(|mut e| {
                cut += fit_pair(&mut e.pair, seq_len) as usize;
                e
            })
            .collect();
        Ok((out, cut))
    }
    fn fingerprint(&self, examples: &[PairExample], h: &mut Fnv) {
        h.eat(examples.len() as u64);
        for e in examples {
            h.eat_sample(&sequence(&e.pair, true));
            h.eat_sample(&sequence(&e.pair, false));
        }
    }
    fn batch(&self, examples: &[&PairExample]) -> Result<Vec<PairExample>> {
        Ok(examples.iter().map(|&e| e.clone()).collect())
    }
    fn weight_name(&self) -> &'static str {
        "pairs"
    }
    fn weight(&self, batch: &Vec<PairExample>) -> usize {
        batch.len()
    }
    fn tokens(&self, batch: &Vec<PairExample>) -> usize {
        batch
            .iter()
            .map(|e| 2 * e.pair.prompt.len() + e.pair.chosen.len() + e.pair.rejected.len())
            .sum()
    }
    /// Chosen and rejected of every pair of a micro-batch run as one call (see the module doc).
    fn sequences_per_call(&self, micro: usize) -> usize {
        2 * micro
    }
    /// The reference forward of every micro-batch (or, with `--precompute-ref`, of every pair
    /// once before training, in micro-batches of the same size).
    fn reference_forward(&self) -> bool {
        true
    }
    fn micro_step(&self, model: &dyn CausalLm, batch: &Vec<PairExample>) -> Result<MicroStep> {
        let refs = self.references(model, batch, batch.len())?;
        let b = pair_batch(batch)?;
        let n = batch.len() as f64;
        let mut m = Accum::default();
        let (_, grads) = model.train_grads_rows(&b.ids, Some(&b.mask), &b.labels, &mut |rows| {
            let mut w = Vec::with_capacity(rows.len());
            for ((pc, pr), (rc, rr)) in pair_logps(rows).into_iter().zip(&refs) {
                let dpc = m.add(self.beta, pc, pr, *rc, *rr);
                // ∂L/∂πc = dpc/pairs, ∂L/∂πr = -dpc/pairs, and S = -Σ CE: the weights of the
                // rows' summed cross-entropies (dpc < 0: chosen's CE descends, rejected's ascends).
                w.extend([-dpc / n, dpc / n]);
            }
            Ok(w)
        })?;
        let metrics = m.metrics(batch.len(), "");
        Ok(MicroStep {
            loss: metrics[0].1,
            grads,
            metrics: metrics[1..].to_vec(),
        })
    }
    fn setup(
        &self,
        model: &dyn CausalLm,
        train: &mut [PairExample],
        eval: &mut [PairExample],
        run_dir: &Path,
        micro: usize,
    ) -> Result<()> {
        if !self.precompute {
            return Ok(());
        }
        let path = run_dir.join(REF_FILE);
        let key = |ex: &[PairExample]| {
            let mut h = Fnv::new();
            self.fingerprint(ex, &mut h);
            h.hex()
        };
        let (kt, ke) = (key(train), key(eval));
        let cached: Option<serde_json::Value> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|v: &serde_json::Value| v["train_data"] == kt && v["eval_data"] == ke);
        let values = |v: &serde_json::Value, k: &str| -> Option<Vec<(f64, f64)>> {
            serde_json::from_value(v[k].clone()).ok()
        };
        let (rt, re) = match cached
            .as_ref()
            .and_then(|v| Some((values(v, "train")?, values(v, "eval")?)))
        {
            Some(r) if r.0.len() == train.len() && r.1.len() == eval.len() => r,
            _ => {
                let (rt, re) = (
                    self.references(model, train, micro)?,
                    self.references(model, eval, micro)?,
                );
                let v =
                    serde_json::json!({"train_data": kt, "eval_data": ke, "train": rt, "eval": re});
                std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
                let tmp = path.with_extension("json.tmp");
                super::checkpoint::write_file(&tmp, v.to_string().as_bytes())?;
                std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                (rt, re)
            }
        };
        for (e, r) in train.iter_mut().zip(rt).chain(eval.iter_mut().zip(re)) {
            e.reference = Some(r);
        }
        Ok(())
    }
    fn evaluate(
        &self,
        model: &dyn CausalLm,
        examples: &[PairExample],
        micro: usize,
    ) -> Result<Metrics> {
        self.eval_pairs(model, examples, micro)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_loss_and_its_gradient() {
        // z = 0.1·((−3 − (−4)) − (−5 − (−4))) = 0.2
        let (loss, d, wc, wr) = pair_loss(0.1, -3.0, -5.0, -4.0, -4.0);
        let z: f64 = 0.2;
        assert!((loss - (1.0 + (-z).exp()).ln()).abs() < 1e-15);
        assert!((wc - 0.1).abs() < 1e-15 && (wr + 0.1).abs() < 1e-15);
        // d loss / d πc by central differences
        let h = 1e-6;
        let f = |pc: f64| pair_loss(0.1, pc, -5.0, -4.0, -4.0).0;
        let num = (f(-3.0 + h) - f(-3.0 - h)) / (2.0 * h);
        assert!((d - num).abs() < 1e-9, "{d} vs {num}");
        // large margins stay finite
        assert!(pair_loss(1.0, 1e4, -1e4, 0.0, 0.0).0.is_finite());
        assert!(pair_loss(1.0, -1e4, 1e4, 0.0, 0.0).0 > 1e3);
    }

    #[test]
    fn sequences_mask_the_prompt() {
        let p = Pair {
            prompt: vec![1, 5],
            chosen: vec![7, 2],
            rejected: vec![8, 9, 2],
        };
        let s = sequence(&p, false);
        assert_eq!(s.ids, vec![1, 5, 8, 9, 2]);
        assert_eq!(s.labels, vec![-100, -100, 8, 9, 2]);
        assert_eq!(s.targets(), 3);
    }
}
