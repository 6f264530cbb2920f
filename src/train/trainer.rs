//! The training loop: model and adapters from a [`TrainConfig`], AdamW with a warmup schedule,
//! gradient accumulation, clipping, evaluation, metrics, checkpoints and bit-identical resume.
//!
//! Conventions. A sample is token ids and labels of the same length (-100: no loss); the model
//! predicts `labels[t + 1]` from position t. Micro-batches are right-padded and masked. The loss of
//! an optimizer step is the mean over all its target tokens across its micro-batches, so each
//! micro-batch's mean loss (and gradient) is weighted by its share of the step's target tokens.
use super::config::{TrainConfig, CONFIG_FILE};
use super::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::lora::adapter::{self, AdapterConfig};
use crate::lora::LoraConfig;
use crate::models::plan::GpuTerms;
use crate::models::{CausalLm, LlamaOptions, LoraSpec, MemoryPlan};
use crate::store::WeightStore;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One tokenised training example.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Label per position (-100: ignored); position t+1's label is the target at t.
    pub labels: Vec<i64>,
}

impl Sample {
    /// Target tokens this sample contributes (shifted labels that are not -100).
    pub fn targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

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

/// The checkpoint's trainer state file.
pub const STATE_FILE: &str = "trainer_state.json";
const STATE_FORMAT: &str = "qtune-trainer-1";

/// Current resident set size of this process (VmRSS), 0 where /proc is unavailable.
pub fn current_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident set size of this process (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// SplitMix64: the data order's generator (stateless per epoch, so a position is a step count).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The example order of `epoch`: identity without shuffling, else a Fisher-Yates permutation seeded
/// by (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut s = mix(seed ^ 0x6461_7461) ^ mix(epoch);
        for i in (1..n).rev() {
            s = mix(s);
            v.swap(i, (s % (i as u64 + 1)) as usize);
        }
    }
    v
}

/// FNV-1a over the samples: a resumed run must see the same data.
fn fingerprint(samples: &[Sample]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(samples.len() as u64);
    for s in samples {
        eat(s.ids.len() as u64);
        s.ids.iter().for_each(|&i| eat(i as u64));
        s.labels.iter().for_each(|&l| eat(l as u64));
    }
    format!("{h:016x}")
}

/// A micro-batch as tensors: ids (B, T) u32, mask (B, T) u32, labels (B, T) i64, target count.
pub(crate) struct Batch {
    pub(crate) ids: Tensor,
    pub(crate) mask: Tensor,
    pub(crate) labels: Tensor,
    pub(crate) targets: usize,
    tokens: usize,
}

pub(crate) fn make_batch(samples: &[&Sample]) -> Result<Batch> {
    let t = samples
        .iter()
        .map(|s| s.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let b = samples.len();
    let (mut ids, mut mask, mut labels) =
        (vec![0u32; b * t], vec![0u32; b * t], vec![-100i64; b * t]);
    let (mut targets, mut tokens) = (0, 0);
    for (r, s) in samples.iter().enumerate() {
        ids[r * t..r * t + s.ids.len()].copy_from_slice(&s.ids);
        mask[r * t..r * t + s.ids.len()].fill(1);
        labels[r * t..r * t + s.labels.len()].copy_from_slice(&s.labels);
        targets += s.targets();
        tokens += s.ids.len();
    }
    let e = |e: candle_core::Error| Error::Invalid(format!("batch: {e}"));
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).map_err(e)?,
        mask: Tensor::from_vec(mask, (b, t), &Device::Cpu).map_err(e)?,
        labels: Tensor::from_vec(labels, (b, t), &Device::Cpu).map_err(e)?,
        targets,
        tokens,
    })
}

/// Samples cut to `seq_len` (ids and labels alike); returns how many were cut. Samples without any
/// target are dropped (they cannot contribute a loss).
fn prepare(samples: Vec<Sample>, seq_len: usize, what: &str) -> Result<(Vec<Sample>, usize)> {
    let mut cut = 0;
    let mut out = Vec::with_capacity(samples.len());
    for (i, mut s) in samples.into_iter().enumerate() {
        if s.ids.len() != s.labels.len() {
            return Err(Error::Invalid(format!(
                "{what} example {i}: {} ids but {} labels",
                s.ids.len(),
                s.labels.len()
            )));
        }
        if s.ids.len() > seq_len {
            s.ids.truncate(seq_len);
            s.labels.truncate(seq_len);
            cut += 1;
        }
        if s.targets() > 0 {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{what} data has no example with a target token (after truncation to --seq-len {seq_len})"
        )));
    }
    Ok((out, cut))
}

/// The settings a checkpoint must share with the run that resumes it: everything that shapes the
/// trajectory.
fn trajectory_keys(cfg: &TrainConfig, total_steps: usize) -> serde_json::Value {
    serde_json::json!({
        "model": cfg.model, "quant": cfg.quant, "rank": cfg.rank, "alpha": cfg.alpha,
        "dropout": cfg.dropout, "targets": cfg.targets, "lr": cfg.lr, "schedule": cfg.schedule,
        "warmup": cfg.warmup, "total-steps": total_steps, "batch-size": cfg.batch_size,
        "grad-accum": cfg.grad_accum, "max-grad-norm": cfg.max_grad_norm, "seq-len": cfg.seq_len,
        "seed": cfg.seed, "shuffle": cfg.shuffle, "weight-decay": cfg.weight_decay,
        "adam-beta1": cfg.adam_beta1, "adam-beta2": cfg.adam_beta2, "adam-eps": cfg.adam_eps,
        "dtype": cfg.dtype,
    })
}

/// A checkpoint directory: `dir` itself if it holds a trainer state, else its newest
/// `checkpoint-N` subdirectory.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let best = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse::<usize>()
                .ok()?;
            e.path().join(STATE_FILE).is_file().then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n);
    best.map(|(_, p)| p).ok_or_else(|| {
        Error::Invalid(format!(
            "--resume {}: no {STATE_FILE} there and no checkpoint-N directory holding one; \
             give a checkpoint directory written by qtune train",
            dir.display()
        ))
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Trains per `cfg` on `train_data` (evaluating on `eval_data`), writing metrics, checkpoints and
/// the final adapter under `cfg.out`.
pub fn train(
    cfg: &TrainConfig,
    train_data: Vec<Sample>,
    eval_data: Vec<Sample>,
    opts: &RunOptions,
) -> Result<TrainReport> {
    cfg.check()?;
    let say = |s: String| {
        if !opts.quiet {
            eprintln!("{s}");
        }
    };
    let model_path = cfg
        .model
        .clone()
        .ok_or_else(|| Error::Invalid("--model: no base model given".into()))?;
    let (train_data, cut) = prepare(train_data, cfg.seq_len, "training")?;
    let (eval_data, cut_eval) = if eval_data.is_empty() {
        (Vec::new(), 0)
    } else {
        prepare(eval_data, cfg.seq_len, "eval")?
    };
    if cut + cut_eval > 0 {
        say(format!(
            "{cut} training and {cut_eval} eval examples were longer than --seq-len {} and were truncated",
            cfg.seq_len
        ));
    }
    let micro = cfg.batch_size;
    let per_step = micro * cfg.grad_accum;
    let total_steps = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, e) => ((e.unwrap_or(1.0) * train_data.len() as f64) / per_step as f64)
            .ceil()
            .max(1.0) as usize,
    };

    // Adapter shape: from --adapter-init when given (its rank, alpha and targets win).
    let mut cfg = cfg.clone();
    let init = match &cfg.adapter_init {
        Some(dir) => {
            let (acfg, tensors) = adapter::load_peft(dir)?;
            cfg.rank = acfg.r;
            cfg.alpha = acfg.lora_alpha;
            cfg.targets = acfg.target_modules.as_targets();
            Some((dir.clone(), acfg, tensors))
        }
        None => None,
    };
    let dtype = cfg.compute_dtype()?;
    let spec = LoraSpec {
        targets: cfg.targets.clone(),
        r: cfg.rank,
        alpha: cfg.alpha,
        rslora: init.as_ref().is_some_and(|i| i.1.use_rslora),
        dropout: cfg.dropout,
        layers: None,
        seed: cfg.seed,
    };
    let device = crate::nn::device::open(&cfg.device)?;
    let gpu_baseline = crate::nn::device::used_bytes(&device)?;
    crate::nn::device::reset_peak(&device)?;
    let lopts = LlamaOptions {
        quant: cfg.quant_type()?,
        dtype,
        lora: Some(spec.clone()),
        checkpoint: true,
        device: device.clone(),
        ..LlamaOptions::default()
    };

    // Memory plan before anything is loaded; the process so far (binary, tokenizer, data) is the
    // baseline the plan's parts add to.
    crate::train::bench::tune_allocator();
    let baseline = current_rss_bytes() as usize;
    let store = WeightStore::open(&model_path)?;
    let plan = MemoryPlan::for_store(&store, &lopts, micro, cfg.seq_len)?
        .with_optimizer(cfg.moment_storage());
    say(format!(
        "memory plan (batch {micro} x {} tokens):\n{plan}",
        cfg.seq_len
    ));
    let gpu_predicted = match gpu_baseline {
        Some(used) => {
            let g = GpuTerms::new(&store, &plan, micro, cfg.seq_len, dtype)?;
            let predicted = g.allocated_total(&plan) as u64;
            say(format!(
                "on {}:\n{g}\ndevice: {:.1} MiB in use before loading; predicted allocated peak \
                 {:.1} MiB",
                cfg.device,
                used as f64 / 1048576.0,
                predicted as f64 / 1048576.0
            ));
            Some(predicted)
        }
        None => None,
    };
    if let Some(limit) = cfg.max_memory_bytes()? {
        if (plan.total() + baseline) as u64 > limit {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            return Err(Error::Invalid(format!(
                "predicted peak {:.2} GiB exceeds --max-memory {} ({:.2} GiB); try a shorter \
                 --seq-len (now {}), a smaller --batch-size (now {}), a lower --rank (now {}) or \
                 --quant nf4 (now {})",
                gib((plan.total() + baseline) as f64),
                cfg.max_memory.as_deref().unwrap_or(""),
                gib(limit as f64),
                cfg.seq_len,
                cfg.batch_size,
                cfg.rank,
                cfg.quant
            )));
        }
    }
    // Llama and Falcon differ only in their decoder blocks; the loop drives either.
    let model = crate::models::load(&store, lopts)?;
    let params = model.lora_params();
    if let Some((dir, acfg, tensors)) = &init {
        super::eval::set_adapter(&params, dir, acfg, tensors)?;
    }
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            moments: cfg.moment_storage(),
        },
    )?;
    if cfg.optim_8bit {
        let eight = opt
            .names()
            .filter(|n| opt.moments_8bit(n).is_some())
            .count();
        say(format!(
            "AdamW: 8-bit moments for {eight} of {} LoRA tensors (those under {} elements stay \
             32-bit); optimizer state {:.1} MiB",
            params.len(),
            super::optim8::MIN_8BIT_SIZE,
            opt.state_bytes() as f64 / (1024.0 * 1024.0)
        ));
    }
    let sched = LrSchedule {
        kind: cfg.schedule_kind()?,
        base_lr: cfg.lr,
        warmup_steps: cfg.warmup,
        total_steps,
    };
    let traj = trajectory_keys(&cfg, total_steps);
    let data_fp = fingerprint(&train_data);
    let expanded_targets: Vec<String> = params
        .iter()
        .filter_map(|(n, _)| n.rsplit('.').nth(2).map(String::from))
        .fold(Vec::new(), |mut v, t| {
            if !v.contains(&t) {
                v.push(t);
            }
            v
        });
    let acfg = AdapterConfig::new(
        &LoraConfig {
            r: cfg.rank,
            alpha: cfg.alpha,
            rslora: spec.rslora,
            dropout: cfg.dropout,
            dtype,
        },
        expanded_targets,
        Some(model_path.display().to_string()),
    );

    // Resume.
    let mut step = 0usize;
    if let Some(r) = &cfg.resume {
        let ck = find_checkpoint(r)?;
        let spath = ck.join(STATE_FILE);
        let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
        let st: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: spath.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        if st.get("format").and_then(|v| v.as_str()) != Some(STATE_FORMAT) {
            return Err(Error::Json {
                path: spath,
                msg: format!("key 'format' is not \"{STATE_FORMAT}\""),
            });
        }
        let saved = st.get("run").cloned().unwrap_or_default();
        let mut diffs = Vec::new();
        if let (Some(a), Some(b)) = (saved.as_object(), traj.as_object()) {
            for (k, v) in b {
                if a.get(k) != Some(v) {
                    diffs.push(format!(
                        "{k} was {} and is now {v}",
                        a.get(k).unwrap_or(&serde_json::Value::Null)
                    ));
                }
            }
        } else {
            diffs.push("the saved settings are missing".into());
        }
        if st.get("data").and_then(|v| v.as_str()) != Some(data_fp.as_str()) {
            diffs.push("the training data differ".into());
        }
        if !diffs.is_empty() {
            return Err(Error::Invalid(format!(
                "--resume {}: this checkpoint belongs to another run: {}; resume with the same \
                 model, data and settings, or start a new run without --resume",
                ck.display(),
                diffs.join("; ")
            )));
        }
        step = st
            .get("step")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::Json {
                path: spath.clone(),
                msg: "key 'step' is missing".into(),
            })? as usize;
        let adir = ck.join("adapter");
        let (_, tensors) = adapter::load_peft(&adir)?;
        let expected: Vec<(String, Vec<usize>)> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        adapter::check_compatible(&adir, &acfg, &tensors, &expected)?;
        opt.load_state(&ck.join("optimizer"))?;
        // The model's dropout keys count train_grads calls; a call whose labels are all ignored
        // advances the count and returns before any compute, so replay one per micro-batch done.
        if cfg.dropout > 0.0 {
            let z = |d| Tensor::zeros((1, 2), d, &Device::Cpu);
            let (ids, lab) = (z(DType::U32), (z(DType::I64).and_then(|t| t - 100.0)));
            if let (Ok(ids), Ok(lab)) = (ids, lab) {
                for _ in 0..step * cfg.grad_accum {
                    let _ = model.train_grads(&ids, None, &lab);
                }
            }
        }
        say(format!("resumed from {} at step {step}", ck.display()));
    }

    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let mpath = cfg.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&mpath)
        .map_err(|e| Error::io(&mpath, e))?;
    let log = |metrics: &mut std::fs::File, v: serde_json::Value| -> Result<()> {
        writeln!(metrics, "{v}").map_err(|e| Error::io(&mpath, e))
    };

    let n = train_data.len();
    let micro_at = |k: usize| -> Vec<&Sample> {
        (k * micro..(k + 1) * micro)
            .map(|p| {
                let (e, i) = (p / n, p % n);
                // Orders are cheap at these sizes; recomputing keeps the position a pure step count.
                &train_data[epoch_order(n, cfg.seed, e as u64, cfg.shuffle)[i]]
            })
            .collect()
    };
    let evaluate = |model: &dyn CausalLm| -> Result<f32> {
        Ok(super::eval::mean_loss(model, &eval_data, micro)?.0 as f32)
    };

    let pb = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total_steps as u64)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid template"),
    );
    pb.set_position(step as u64);
    let mut report = TrainReport {
        losses: Vec::new(),
        evals: Vec::new(),
        total_steps,
        predicted_peak: plan.total() + baseline,
        peak_rss: 0,
        gpu_memory: None,
        truncated: cut + cut_eval,
        adapter_dir: cfg.out.join("adapter"),
    };
    let do_eval = |model: &dyn CausalLm,
                   step: usize,
                   report: &mut TrainReport,
                   metrics: &mut std::fs::File|
     -> Result<()> {
        if eval_data.is_empty() {
            return Ok(());
        }
        let l = evaluate(model)?;
        let ppl = (l as f64).exp();
        let line = format!("step {step}: eval loss {l:.4}, perplexity {ppl:.2}");
        if pb.is_hidden() {
            if !opts.quiet {
                eprintln!("{line}");
            }
        } else {
            pb.println(line);
        }
        report.evals.push((step, l));
        log(
            metrics,
            serde_json::json!({"step": step, "eval_loss": l, "eval_ppl": ppl}),
        )
    };
    let save = |model: &dyn CausalLm, opt: &AdamW, step: usize| -> Result<()> {
        let _ = model;
        let dir = cfg.out.join(format!("checkpoint-{step}"));
        let tmp = cfg.out.join(format!(".checkpoint-{step}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        adapter::save_peft_vars(&tmp.join("adapter"), &acfg, &params)?;
        opt.save_state(&tmp.join("optimizer"))?;
        let st = serde_json::json!({
            "format": STATE_FORMAT, "step": step, "total_steps": total_steps,
            "micro_batches_done": step * cfg.grad_accum, "examples_seen": step * per_step,
            "epoch": (step * per_step) / n, "rng": {"seed": cfg.seed, "shuffle": cfg.shuffle},
            "lr_next": sched.lr(step), "data": data_fp, "run": traj,
        });
        write_file(
            &tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&st).expect("json").as_bytes(),
        )?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
    };

    if step == 0 {
        do_eval(model.as_ref(), 0, &mut report, &mut metrics)?;
    }
    let t_run = Instant::now();
    let mut tokens_total = 0usize;
    while step < total_steps {
        let t0 = Instant::now();
        let batches: Vec<Batch> = (0..cfg.grad_accum)
            .map(|a| make_batch(&micro_at(step * cfg.grad_accum + a)))
            .collect::<Result<_>>()?;
        let n_step: usize = batches.iter().map(|b| b.targets).sum();
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let mut acc: HashMap<String, Tensor> = HashMap::new();
        let mut loss = 0f64;
        for b in &batches {
            if b.targets == 0 {
                continue;
            }
            let (l, g) = model.train_grads(&b.ids, Some(&b.mask), &b.labels)?;
            let w = b.targets as f64 / n_step as f64;
            loss += l as f64 * w;
            for (name, g) in g {
                let ge = |e: candle_core::Error| Error::Invalid(format!("gradient '{name}': {e}"));
                let g = g.to_dtype(DType::F32).map_err(ge)?;
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
        }
        let gnorm = if cfg.max_grad_norm > 0.0 {
            Some(clip_grad_norm(&mut acc, cfg.max_grad_norm)?)
        } else {
            None
        };
        let lr = sched.lr(step);
        if gnorm.is_some_and(|g| !g.is_finite()) || !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "step {}: the loss or gradient norm is not finite (loss {loss}); lower --lr \
                 (now {}) or use --dtype f32",
                step + 1,
                cfg.lr
            )));
        }
        opt.step(&acc, lr)?;
        step += 1;
        tokens_total += tokens;
        let dt = t0.elapsed().as_secs_f64();
        let peak = peak_rss_bytes();
        report.losses.push(loss as f32);
        let mut m = serde_json::json!({
            "step": step, "loss": loss, "lr": lr, "tokens": tokens, "target_tokens": n_step,
            "tokens_per_s": tokens as f64 / dt.max(1e-9), "peak_mem_bytes": peak,
        });
        if let Some(g) = gnorm {
            m["grad_norm"] = serde_json::json!(g);
        }
        log(&mut metrics, m)?;
        pb.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s  peak {:.0} MiB",
            tokens_total as f64 / t_run.elapsed().as_secs_f64().max(1e-9),
            peak as f64 / (1u64 << 20) as f64
        ));
        pb.set_position(step as u64);
        if step.is_multiple_of(cfg.eval_every) && step < total_steps {
            do_eval(model.as_ref(), step, &mut report, &mut metrics)?;
        }
        if opts.stop_after == Some(step) {
            if step.is_multiple_of(cfg.save_every) {
                save(model.as_ref(), &opt, step)?;
            }
            pb.abandon();
            report.peak_rss = peak_rss_bytes();
            return Ok(report);
        }
        if step == total_steps || step.is_multiple_of(cfg.save_every) {
            save(model.as_ref(), &opt, step)?;
        }
    }
    pb.finish();
    do_eval(model.as_ref(), step, &mut report, &mut metrics)?;
    adapter::save_peft_vars(&report.adapter_dir, &acfg, &params)?;
    let mut resolved = cfg.clone();
    resolved.resume = None;
    resolved.steps = Some(total_steps);
    write_file(
        &report.adapter_dir.join(CONFIG_FILE),
        resolved.to_toml().as_bytes(),
    )?;
    // The whole run's curve, a resumed run included: from metrics.jsonl.
    let (mut curve, mut ecurve) = (Vec::new(), Vec::new());
    if let Ok(text) = std::fs::read_to_string(&mpath) {
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
    crate::train::chart::write_loss_charts(
        &cfg.out,
        &crate::train::chart::title(&cfg),
        &curve,
        &ecurve,
    )?;
    report.peak_rss = peak_rss_bytes();
    if let (Some(used), Some(pred), Some(peak)) = (
        gpu_baseline,
        gpu_predicted,
        crate::nn::device::peak_allocated(&device)?,
    ) {
        report.gpu_memory = Some((used, pred, peak));
        say(format!(
            "device memory: peak allocated {:.1} MiB, predicted {pred_mib:.1} MiB; with the {:.1} \
             MiB in use before loading, device peak {:.1} MiB",
            peak as f64 / 1048576.0,
            used as f64 / 1048576.0,
            (used + peak) as f64 / 1048576.0,
            pred_mib = pred as f64 / 1048576.0
        ));
    }
    say(format!(
        "adapter saved to {}, loss chart in loss.png / loss.svg beside it\npeak memory: measured {:.1} MiB RSS, \
         predicted {:.1} MiB (plan {:.1} + process before loading {:.1})",
        report.adapter_dir.display(),
        report.peak_rss as f64 / (1u64 << 20) as f64,
        report.predicted_peak as f64 / (1u64 << 20) as f64,
        plan.total() as f64 / (1u64 << 20) as f64,
        baseline as f64 / (1u64 << 20) as f64
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_and_seeded() {
        let a = epoch_order(50, 7, 0, true);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(50, 7, 1, true));
        assert_ne!(a, epoch_order(50, 8, 0, true));
        assert_eq!(a, epoch_order(50, 7, 0, true));
        assert_eq!(epoch_order(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn batches_pad_right_and_count_targets() {
        let a = Sample {
            ids: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
        };
        let b = Sample {
            ids: vec![8],
            labels: vec![8],
        };
        let m = make_batch(&[&a, &b]).unwrap();
        assert_eq!(m.targets, 2);
        assert_eq!(
            m.mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!(
            m.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, 6, 7], vec![8, -100, -100]]
        );
    }
}
