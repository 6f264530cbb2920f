//! The training loop: a run of any [`Objective`] as a sequence of named steps.
//!
//! [`train_with`] = [`Run::prepare`] (cut the data, count steps) -> [`Run::build`] (memory plan,
//! model with adapters, AdamW) -> [`Run::resume`] (a checkpoint's adapter, optimizer and step) ->
//! [`Run::step`] per optimizer step (micro-batches, accumulation, clipping, AdamW) with
//! [`Run::evaluate`] and [`Run::save`] at their intervals -> [`Run::finish`] (adapter, chart,
//! report). The loss of an optimizer step is the mean over the objective's units (target tokens for
//! SFT) across its micro-batches, so each micro-batch's mean loss (and gradient) is weighted by its
//! share of the step.
use super::checkpoint::{self, write_file, State};
use super::config::{Method, TrainConfig, CONFIG_FILE};
use super::data::{DataOrder, Fnv};
use super::objective::{add_weighted, Metrics, Objective, Sft};
use super::setup::{
    adapted_modules, adapter_inits, check_max_memory, new_optimizer, outputs, plan_memory,
};
use super::{clip_grad_norm, AdamW, LrSchedule};
use crate::lora::adapter::{self, AdapterConfig};
use crate::lora::prompt::{self, PromptDims, PromptSpec};
use crate::lora::LoraConfig;
use crate::models::{CausalLm, LlamaOptions, LoraSpec};
use crate::store::WeightStore;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub use super::checkpoint::{find_checkpoint, STATE_FILE};
pub use super::data::Sample;
pub use super::data::{make_batch, Batch};
pub use crate::nn::device::{current_rss_bytes, peak_rss_bytes};

/// What [`train`] did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Loss of every optimizer step this run took (a resumed run: only its own steps).
    pub losses: Vec<f32>,
    /// (step, eval loss) of every evaluation.
    pub evals: Vec<(usize, f32)>,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// The predicted peak (bytes).
    pub predicted_peak: usize,
    /// The measured peak RSS (bytes; 0 where unknown).
    pub peak_rss: u64,
    /// On a GPU: (device memory in use before loading, predicted and measured peak allocated
    /// bytes; see `bench::GpuReport`).
    pub gpu_memory: Option<(u64, u64, u64)>,
    /// Examples truncated to `seq-len`.
    pub truncated: usize,
    /// The final adapter directory.
    pub adapter_dir: PathBuf,
}

/// Options of a run beyond the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// No progress bar and no printing.
    pub quiet: bool,
    /// Stop (as if killed) right after step N, without the final save: for resume tests.
    pub stop_after: Option<usize>,
}

/// Trains per `cfg` on `train_data` (evaluating on `eval_data`) with the supervised objective,
/// writing metrics, checkpoints and the final adapter under `cfg.out`.
pub fn train(
    cfg: &TrainConfig,
    train_data: Vec<Sample>,
    eval_data: Vec<Sample>,
    opts: &RunOptions,
) -> Result<TrainReport> {
    let first_label = matches!(cfg.method, Method::PromptTuning | Method::PTuning);
    train_with(&Sft { first_label }, cfg, train_data, eval_data, opts)
}

/// Trains per `cfg` with objective `obj`: the named steps of the module doc, in order.
pub fn train_with<O: Objective>(
    obj: &O,
    cfg: &TrainConfig,
    train_data: Vec<O::Example>,
    eval_data: Vec<O::Example>,
    opts: &RunOptions,
) -> Result<TrainReport> {
    let data = Run::prepare(obj, cfg, train_data, eval_data, opts)?;
    let mut run = Run::build(obj, cfg, data, opts)?;
    obj.setup(
        run.model.as_ref(),
        &mut run.train,
        &mut run.eval,
        &run.cfg.out,
        run.cfg.batch_size,
    )?;
    run.resume()?;
    if run.step == 0 {
        run.evaluate()?;
    }
    let t_run = Instant::now();
    let mut tokens_total = 0usize;
    while run.step < run.total_steps {
        tokens_total += run.step(t_run, tokens_total)?;
        let step = run.step;
        if step.is_multiple_of(cfg.eval_every) && step < run.total_steps {
            run.evaluate()?;
        }
        if opts.stop_after == Some(step) {
            if step.is_multiple_of(cfg.save_every) {
                run.save()?;
            }
            run.pb.abandon();
            run.report.peak_rss = peak_rss_bytes();
            return Ok(run.report);
        }
        if step == run.total_steps || step.is_multiple_of(cfg.save_every) {
            run.save()?;
        }
    }
    run.finish()
}

/// The cut data of a run (the first step's output).
pub struct Prepared<E> {
    train: Vec<E>,
    eval: Vec<E>,
    total_steps: usize,
    truncated: usize,
}

/// A run in progress: everything the named steps share.
struct Run<'a, O: Objective> {
    obj: &'a O,
    /// The settings, with the adapter shape of `--adapter-init` applied.
    cfg: TrainConfig,
    opts: &'a RunOptions,
    train: Vec<O::Example>,
    eval: Vec<O::Example>,
    order: DataOrder,
    total_steps: usize,
    /// Optimizer steps done.
    step: usize,
    model: Box<dyn CausalLm>,
    params: Vec<(String, Var)>,
    opt: AdamW,
    sched: LrSchedule,
    acfg: AdapterConfig,
    /// A prompt-learning run's adapter (saved in PEFT's prompt-learning layout instead of LoRA's).
    prompt: Option<(PromptSpec, PromptDims)>,
    traj: serde_json::Value,
    data_fp: String,
    mpath: PathBuf,
    metrics: std::fs::File,
    pb: indicatif::ProgressBar,
    report: TrainReport,
    plan_total: usize,
    baseline: usize,
    device: Device,
    gpu: Option<(u64, u64)>,
}

pub(super) fn say(opts: &RunOptions, s: String) {
    if !opts.quiet {
        eprintln!("{s}");
    }
}

/// The run's compute dtype for a model of width `hidden`: `--dtype`, with `auto` resolved for this
/// machine, except that `auto` resumes in the dtype its run resolved to (another CPU, device or
/// qtune version may pick another for a new run); a checkpoint that does not record it, in what
/// `auto` resolved to when it was written.
fn compute_dtype(cfg: &TrainConfig, hidden: usize, opts: &RunOptions) -> Result<DType> {
    let dtype = cfg.compute_dtype(Some(hidden))?;
    let (true, Some(r)) = (cfg.dtype.eq_ignore_ascii_case("auto"), &cfg.resume) else {
        return Ok(dtype);
    };
    let saved = checkpoint::saved_compute_dtype(&find_checkpoint(r)?)?.unwrap_or_else(|| {
        crate::nn::device::auto_dtype_before_recorded(&cfg.device, Some(hidden))
    });
    if saved != dtype {
        say(
            opts,
            format!(
                "note: --dtype auto resumes in {saved:?}, the dtype this run started in \
                 ({dtype:?} would be this machine's pick for a new run)"
            ),
        );
    }
    Ok(saved)
}

impl<'a, O: Objective> Run<'a, O> {
    /// Step 1: the data cut to `--seq-len` (empty sets refused), and the number of steps.
    fn prepare(
        obj: &O,
        cfg: &TrainConfig,
        train: Vec<O::Example>,
        eval: Vec<O::Example>,
        opts: &RunOptions,
    ) -> Result<Prepared<O::Example>> {
        cfg.check()?;
        let (train, cut) = obj.fit(train, cfg.seq_len, "training")?;
        let (eval, cut_eval) = if eval.is_empty() {
            (Vec::new(), 0)
        } else {
            obj.fit(eval, cfg.seq_len, "eval")?
        };
        if cut + cut_eval > 0 {
            say(opts, format!(
                "{cut} training and {cut_eval} eval examples were longer than --seq-len {} and were truncated",
                cfg.seq_len
            ));
        }
        let per_step = cfg.batch_size * cfg.grad_accum;
        let total_steps = match (cfg.steps, cfg.epochs) {
            (Some(s), _) => s,
            (None, e) => ((e.unwrap_or(1.0) * train.len() as f64) / per_step as f64)
                .ceil()
                .max(1.0) as usize,
        };
        Ok(Prepared {
            train,
            eval,
            total_steps,
            truncated: cut + cut_eval,
        })
    }

    /// Step 2: the adapter's shape, the memory plan (refused over `--max-memory`), the model with
    /// its adapters (initialised from `--adapter-init` when given), AdamW and the schedule.
    fn build(
        obj: &'a O,
        cfg: &TrainConfig,
        data: Prepared<O::Example>,
        opts: &'a RunOptions,
    ) -> Result<Self> {
        let model_path = cfg
            .model
            .clone()
            .ok_or_else(|| Error::Invalid("--model: no base model given".into()))?;
        // Adapter shape: from --adapter-init when given (its rank, alpha, targets and DoRA win).
        let mut cfg = cfg.clone();
        let (prompt_init, init) = adapter_inits(&mut cfg, opts)?;
        // The store (headers parsed, tensors mapped, nothing read): `auto` needs the model's width.
        let store = WeightStore::open(&model_path)?;
        let dtype = compute_dtype(&cfg, crate::models::spec_of(&store)?.hidden, opts)?;
        let spec = LoraSpec {
            targets: cfg.targets.clone(),
            r: cfg.rank,
            alpha: cfg.alpha,
            rslora: init.as_ref().is_some_and(|i| i.1.use_rslora),
            dropout: cfg.dropout,
            layers: None,
            seed: cfg.seed,
            use_dora: cfg.method == Method::Dora,
        };
        let device = crate::nn::device::open(&cfg.device)?;
        let gpu_baseline = crate::nn::device::used_bytes(&device)?;
        crate::nn::device::reset_peak(&device)?;
        // Prompt tuning's TEXT init: the text's ids with the tokenizer's special tokens (as PEFT).
        let init_ids = match (&cfg.prompt_init_text, &prompt_init) {
            (Some(text), None) => {
                Some(crate::data::Tokenizer::for_model(&model_path)?.encode(text, true)?)
            }
            _ => None,
        };
        let pspec = cfg.prompt_spec(init_ids);
        let lopts = LlamaOptions {
            quant: cfg.quant_type()?,
            dtype,
            lora: pspec.is_none().then(|| spec.clone()),
            checkpoint: true,
            device: device.clone(),
            recompute: cfg.recompute()?,
            ..LlamaOptions::default()
        };
        // Memory plan before anything is loaded; the process so far (binary, tokenizer, data) is
        // the baseline the plan's parts add to.
        crate::train::bench::tune_allocator();
        let baseline = current_rss_bytes() as usize;
        let shape = (
            obj.sequences_per_call(cfg.batch_size),
            obj.reference_forward(),
        );
        let (plan, gpu_predicted) = plan_memory(
            &cfg,
            &store,
            &lopts,
            pspec.as_ref(),
            shape,
            gpu_baseline,
            opts,
        )?;
        check_max_memory(&cfg, &store, plan.total() + baseline)?;
        // Llama and Falcon differ only in their decoder blocks; the loop drives either.
        let mut model = crate::models::open(&store, lopts)?;
        if let Some(p) = &pspec {
            model.install_prompt(p)?;
        }
        let dims = crate::models::prompt_dims(model.spec());
        let model: Box<dyn CausalLm> = Box::new(model);
        let params = model.lora_params();
        if let Some((dir, acfg, tensors)) = &init {
            super::eval::set_adapter(&params, dir, acfg, tensors)?;
        }
        if let Some((dir, l)) = &prompt_init {
            prompt::set_vars(&params, dir, l)?;
        }
        let prompt = pspec.map(|p| (p, dims));
        let opt = new_optimizer(&cfg, &params, opts)?;
        let sched = LrSchedule {
            kind: cfg.schedule_kind()?,
            base_lr: cfg.lr,
            warmup_steps: cfg.warmup,
            total_steps: data.total_steps,
        };
        let mut acfg = AdapterConfig::new(
            &LoraConfig {
                r: cfg.rank,
                alpha: cfg.alpha,
                rslora: spec.rslora,
                dropout: cfg.dropout,
                dtype,
            },
            adapted_modules(&params),
            Some(model_path.display().to_string()),
        );
        acfg.use_dora = spec.use_dora;
        let mut fp = Fnv::new();
        obj.fingerprint(&data.train, &mut fp);
        let (mpath, metrics, pb) = outputs(&cfg, data.total_steps, opts)?;
        Ok(Run {
            obj,
            traj: checkpoint::trajectory_keys(&cfg, data.total_steps, dtype),
            order: DataOrder::new(data.train.len(), cfg.batch_size, cfg.seed, cfg.shuffle),
            report: TrainReport {
                losses: Vec::new(),
                evals: Vec::new(),
                total_steps: data.total_steps,
                predicted_peak: plan.total() + baseline,
                peak_rss: 0,
                gpu_memory: None,
                truncated: data.truncated,
                adapter_dir: cfg.out.join("adapter"),
            },
            cfg,
            opts,
            train: data.train,
            eval: data.eval,
            total_steps: data.total_steps,
            step: 0,
            model,
            params,
            opt,
            sched,
            acfg,
            prompt,
            data_fp: fp.hex(),
            mpath,
            metrics,
            pb,
            plan_total: plan.total(),
            baseline,
            device,
            gpu: gpu_baseline.zip(gpu_predicted),
        })
    }

    /// Step 3 (with `--resume`): the checkpoint's adapter, optimizer state and step, after checking
    /// that it belongs to this run (same trajectory settings and data).
    fn resume(&mut self) -> Result<()> {
        let Some(r) = &self.cfg.resume else {
            return Ok(());
        };
        let ck = find_checkpoint(r)?;
        super::manifest::verify_manifest(&ck)?;
        self.step = checkpoint::check_resume(&ck, &self.traj, &self.data_fp)?;
        let adir = ck.join("adapter");
        if self.prompt.is_some() {
            // The encoder's state (or the rows) with every name and shape checked.
            prompt::set_vars(&self.params, &adir, &prompt::load(&adir)?)?;
        } else {
            let (_, tensors) = adapter::load_peft(&adir)?;
            let expected: Vec<(String, Vec<usize>)> = self
                .params
                .iter()
                .map(|(n, v)| (n.clone(), v.dims().to_vec()))
                .collect();
            adapter::check_compatible(&adir, &self.acfg, &tensors, &expected)?;
        }
        self.opt.load_state(&ck.join("optimizer"))?;
        self.truncate_log()?;
        // The model's dropout keys count train_grads calls; a call whose labels are all ignored
        // advances the count and returns before any compute, so replay one per micro-batch done.
        if self.cfg.dropout > 0.0 {
            let z = |d| Tensor::zeros((1, 2), d, &Device::Cpu);
            let (ids, lab) = (z(DType::U32), (z(DType::I64).and_then(|t| t - 100.0)));
            if let (Ok(ids), Ok(lab)) = (ids, lab) {
                let calls = self.obj.model_calls(self.cfg.batch_size);
                for _ in 0..self.step * self.cfg.grad_accum * calls {
                    let _ = self.model.train_grads(&ids, None, &lab);
                }
            }
        }
        self.pb.set_position(self.step as u64);
        say(
            self.opts,
            format!("resumed from {} at step {}", ck.display(), self.step),
        );
        Ok(())
    }

    /// One optimizer step: its micro-batches' losses and gradients, weighted and accumulated,
    /// clipped, and applied by AdamW; logged. Returns the tokens it ran.
    fn step(&mut self, t_run: Instant, tokens_before: usize) -> Result<usize> {
        let t0 = Instant::now();
        let ga = self.cfg.grad_accum;
        let batches: Vec<O::Batch> = (0..ga)
            .map(|a| {
                let idx = self.order.micro_batch(self.step * ga + a);
                let ex: Vec<&O::Example> = idx.iter().map(|&i| &self.train[i]).collect();
                self.obj.batch(&ex)
            })
            .collect::<Result<_>>()?;
        let n_step: usize = batches.iter().map(|b| self.obj.weight(b)).sum();
        let tokens: usize = batches.iter().map(|b| self.obj.tokens(b)).sum();
        let mut acc: HashMap<String, Tensor> = HashMap::new();
        let mut loss = 0f64;
        let mut extra: Metrics = Vec::new();
        for b in &batches {
            if self.obj.weight(b) == 0 {
                continue;
            }
            let ms = self.obj.micro_step(self.model.as_ref(), b)?;
            let w = self.obj.weight(b) as f64 / n_step as f64;
            loss += ms.loss * w;
            accumulate_metrics(&mut extra, &ms.metrics, w);
            add_weighted(&mut acc, ms.grads, w)?;
        }
        let gnorm = if self.cfg.max_grad_norm > 0.0 {
            Some(clip_grad_norm(&mut acc, self.cfg.max_grad_norm)?)
        } else {
            None
        };
        let lr = self.sched.lr(self.step);
        if gnorm.is_some_and(|g| !g.is_finite()) || !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "step {}: the loss or gradient norm is not finite (loss {loss}); lower --lr \
                 (now {}) or use --dtype f32",
                self.step + 1,
                self.cfg.lr
            )));
        }
        self.opt.step(&acc, lr)?;
        self.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        let peak = peak_rss_bytes();
        self.report.losses.push(loss as f32);
        let mut m = serde_json::json!({
            "step": self.step, "loss": loss, "lr": lr, "tokens": tokens,
            "tokens_per_s": tokens as f64 / dt.max(1e-9), "peak_mem_bytes": peak,
        });
        m[self.obj.weight_name()] = serde_json::json!(n_step);
        if let Some(g) = gnorm {
            m["grad_norm"] = serde_json::json!(g);
        }
        for (k, v) in &extra {
            m[*k] = serde_json::json!(v);
        }
        self.log(m)?;
        let rate = (tokens_before + tokens) as f64 / t_run.elapsed().as_secs_f64().max(1e-9);
        self.pb.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {rate:.0} tok/s  peak {:.0} MiB",
            peak as f64 / (1u64 << 20) as f64
        ));
        self.pb.set_position(self.step as u64);
        Ok(tokens)
    }

    /// The objective's metrics on the eval set (none without one), printed and logged.
    fn evaluate(&mut self) -> Result<()> {
        if self.eval.is_empty() {
            return Ok(());
        }
        let metrics = self
            .obj
            .evaluate(self.model.as_ref(), &self.eval, self.cfg.batch_size)?;
        let l = metrics.first().map_or(f64::NAN, |m| m.1) as f32;
        let line = self.obj.eval_line(self.step, &metrics);
        if self.pb.is_hidden() {
            say(self.opts, line);
        } else {
            self.pb.println(line);
        }
        self.report.evals.push((self.step, l));
        let mut v = serde_json::json!({"step": self.step});
        for (k, x) in &metrics {
            v[*k] = if *k == "eval_loss" {
                serde_json::json!(l)
            } else {
                serde_json::json!(x)
            };
        }
        self.log(v)
    }

    /// Checkpoint `checkpoint-<step>`: adapter, optimizer state, trainer state and settings.
    fn save(&self) -> Result<()> {
        let per_step = self.cfg.batch_size * self.cfg.grad_accum;
        let st = State {
            step: self.step,
            total_steps: self.total_steps,
            grad_accum: self.cfg.grad_accum,
            per_step,
            n: self.order.n,
            seed: self.cfg.seed,
            shuffle: self.cfg.shuffle,
            lr_next: self.sched.lr(self.step),
            data: &self.data_fp,
            run: &self.traj,
        };
        checkpoint::save(&self.cfg.out, &st, &self.resolved(), |tmp| {
            self.save_adapter(&tmp.join("adapter"))?;
            self.opt.save_state(&tmp.join("optimizer"))
        })
    }

    /// The adapter in PEFT's layout: LoRA factors, or a prompt-learning directory (with the
    /// encoder's state beside it, for resume and `--adapter-init`).
    fn save_adapter(&self, dir: &std::path::Path) -> Result<()> {
        match &self.prompt {
            Some((p, d)) => {
                let base = self.acfg.base_model_name_or_path.as_deref();
                prompt::save(dir, p, d, base, &self.params)
            }
            None => adapter::save_peft_vars(dir, &self.acfg, &self.params),
        }
    }

    /// The settings as a fresh run would give them to reproduce this one.
    fn resolved(&self) -> TrainConfig {
        let mut r = self.cfg.clone();
        r.resume = None;
        r.steps = Some(self.total_steps);
        r
    }

    /// Last step: the final eval, the adapter and its settings, the loss chart, the memory report.
    fn finish(mut self) -> Result<TrainReport> {
        self.pb.finish();
        self.evaluate()?;
        let adir = self.report.adapter_dir.clone();
        self.save_adapter(&adir)?;
        write_file(
            &adir.join(CONFIG_FILE),
            self.resolved().to_toml().as_bytes(),
        )?;
        self.write_chart()?;
        self.report.peak_rss = peak_rss_bytes();
        if let (Some((used, pred)), Some(peak)) =
            (self.gpu, crate::nn::device::peak_allocated(&self.device)?)
        {
            self.report.gpu_memory = Some((used, pred, peak));
            say(self.opts, format!(
                "device memory: peak allocated {:.1} MiB, predicted {pred_mib:.1} MiB; with the {:.1} \
                 MiB in use before loading, device peak {:.1} MiB",
                peak as f64 / 1048576.0,
                used as f64 / 1048576.0,
                (used + peak) as f64 / 1048576.0,
                pred_mib = pred as f64 / 1048576.0
            ));
        }
        let mib = |b: f64| b / (1u64 << 20) as f64;
        say(
            self.opts,
            format!(
                "adapter saved to {}, loss chart in loss.png / loss.svg beside it\npeak memory: \
                 measured \
{:.1} MiB RSS, predicted {:.1} MiB (plan {:.1} + process before loading {:.1})",
                adir.display(),
                mib(self.report.peak_rss as f64),
                mib(self.report.predicted_peak as f64),
                mib(self.plan_total as f64),
                mib(self.baseline as f64)
            ),
        );
        Ok(self.report)
    }

    /// `loss.png` from the whole run's curve (a resumed run included), read back from
    /// metrics.jsonl.
    fn write_chart(&self) -> Result<()> {
        let (mut curve, mut ecurve) = (Vec::new(), Vec::new());
        if let Ok(text) = std::fs::read_to_string(&self.mpath) {
            for v in text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                let s = v["step"].as_u64().unwrap_or(0) as usize;
                if let Some(l) = v.get("loss").and_then(|x| x.as_f64()) {
                    curve.push((s, l as f32));
                }
                if let Some(l) = v.get("eval_loss").and_then(|x| x.as_f64()) {
                    ecurve.push((s, l as f32));
                }
            }
        }
        let title = super::chart::title(&self.cfg);
        super::chart::write_loss_charts(&self.cfg.out, &title, &curve, &ecurve)
    }

    /// Drops the log lines of steps after the resumed one (a killed run may have logged steps past
    /// its last checkpoint; they are run again), so the log reads as one uninterrupted run.
    fn truncate_log(&mut self) -> Result<()> {
        let text = std::fs::read_to_string(&self.mpath).map_err(|e| Error::io(&self.mpath, e))?;
        let keep: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= self.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if keep.len() == text.len() {
            return Ok(());
        }
        let tmp = self.mpath.with_extension("jsonl.tmp");
        write_file(&tmp, keep.as_bytes())?;
        std::fs::rename(&tmp, &self.mpath).map_err(|e| Error::io(&self.mpath, e))?;
        self.metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.mpath)
            .map_err(|e| Error::io(&self.mpath, e))?;
        Ok(())
    }

    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{v}").map_err(|e| Error::io(&self.mpath, e))
    }
}

/// Adds `w`-weighted micro-batch metrics into a step's.
fn accumulate_metrics(acc: &mut Metrics, m: &Metrics, w: f64) {
    for (k, v) in m {
        match acc.iter_mut().find(|(a, _)| a == k) {
            Some(e) => e.1 += v * w,
            None => acc.push((k, v * w)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_metrics_are_weighted_means() {
        let mut acc = Vec::new();
        accumulate_metrics(&mut acc, &vec![("acc", 1.0)], 0.25);
        accumulate_metrics(&mut acc, &vec![("acc", 0.0), ("x", 2.0)], 0.75);
        assert_eq!(acc, vec![("acc", 0.25), ("x", 1.5)]);
        assert_eq!(
            super::super::objective::describe(&acc),
            "acc 0.2500, x 1.5000"
        );
    }
}
