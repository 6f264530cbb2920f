//! The set-up of a training run that is not the loop: the adapter an `--adapter-init` directory
//! holds (and the settings it brings), the memory plan and its `--max-memory` check, AdamW, and the
//! run directory's metrics file and progress bar.
use super::config::{Method, TrainConfig};
use super::trainer::{say, RunOptions};
use super::AdamW;
use super::AdamWConfig;
use crate::lora::adapter::{self, AdapterConfig};
use crate::lora::prompt::{self, PromptSpec};
use crate::models::plan::GpuTerms;
use crate::models::{LlamaOptions, MemoryPlan};
use crate::store::WeightStore;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use std::path::PathBuf;

/// A prompt-learning `--adapter-init`: its directory and what was loaded.
pub(super) type PromptInit = (PathBuf, prompt::Loaded);
/// A LoRA or DoRA `--adapter-init`: its directory, config and tensors.
pub(super) type LinearInit = (PathBuf, AdapterConfig, Vec<(String, Tensor)>);

/// The adapter of `--adapter-init`, prompt-learning or linear; its settings (method, sizes, rank,
/// alpha, targets, DoRA) replace `cfg`'s.
pub(super) fn adapter_inits(
    cfg: &mut TrainConfig,
    opts: &RunOptions,
) -> Result<(Option<PromptInit>, Option<LinearInit>)> {
    // A prompt-learning --adapter-init: its method and sizes win.
    let prompt_init = match cfg.adapter_init.clone() {
        Some(dir) if prompt::peft_type_of(&dir).is_some_and(|t| prompt::is_prompt_type(&t)) => {
            let l = prompt::load(&dir)?;
            adopt_prompt_settings(cfg, &l);
            cfg.check()?;
            Some((dir, l))
        }
        Some(dir) if cfg.method.is_prompt() => {
            return Err(Error::Invalid(format!(
                "--adapter-init {}: not a prompt-learning adapter (its adapter_config.json's \
                 peft_type is not PROMPT_TUNING, P_TUNING or PREFIX_TUNING), so it cannot \
                 start a --method {} run",
                dir.display(),
                cfg.method_name()
            )))
        }
        _ => None,
    };
    let init = match &cfg.adapter_init {
        Some(_) if prompt_init.is_some() => None,
        Some(dir) => {
            let (acfg, tensors) = adapter::load_peft(dir)?;
            if acfg.use_dora != (cfg.method == Method::Dora) {
                say(
                    opts,
                    format!(
                        "--adapter-init {} is a {} adapter: training it as one",
                        dir.display(),
                        if acfg.use_dora { "DoRA" } else { "LoRA" }
                    ),
                );
                cfg.method = if acfg.use_dora {
                    Method::Dora
                } else {
                    Method::Lora
                };
            }
            if cfg.method == Method::Dora && cfg.objective == "dpo" {
                let msg = super::config::DPO_DORA;
                return Err(Error::Invalid(format!(
                    "--adapter-init {}: {msg}",
                    dir.display()
                )));
            }
            cfg.rank = acfg.r;
            cfg.alpha = acfg.lora_alpha;
            cfg.targets = acfg.target_modules.as_targets();
            Some((dir.clone(), acfg, tensors))
        }
        None => None,
    };
    Ok((prompt_init, init))
}

/// The run directory's metrics file (appended to) and the progress bar.
pub(super) fn outputs(
    cfg: &TrainConfig,
    total_steps: usize,
    opts: &RunOptions,
) -> Result<(PathBuf, std::fs::File, indicatif::ProgressBar)> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let mpath = cfg.out.join("metrics.jsonl");
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&mpath)
        .map_err(|e| Error::io(&mpath, e))?;
    let pb = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total_steps as u64)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid template"),
    );
    Ok((mpath, metrics, pb))
}

/// The memory plan of the run, printed; on a GPU also its device terms and predicted peak.
/// `(micro, reference)`: the sequences of one model call, and whether the objective runs a
/// reference forward over them.
pub(super) fn plan_memory(
    cfg: &TrainConfig,
    store: &WeightStore,
    lopts: &LlamaOptions,
    prompt: Option<&PromptSpec>,
    (micro, reference): (usize, bool),
    gpu_baseline: Option<u64>,
    opts: &RunOptions,
) -> Result<(MemoryPlan, Option<u64>)> {
    let seq = cfg.seq_len;
    let plan = MemoryPlan::for_store_prompt(store, lopts, prompt, micro, seq)?
        .with_optimizer(cfg.moment_storage())
        .with_reference_forward(reference);
    say(
        opts,
        format!(
            "memory plan (batch {micro} x {seq} tokens, compute {}, {} threads):\n{plan}",
            lopts.dtype.as_str(),
            rayon::current_num_threads()
        ),
    );
    let Some(used) = gpu_baseline else {
        return Ok((plan, None));
    };
    let g = GpuTerms::new(store, &plan, micro, seq, lopts.dtype)?;
    let predicted = g.allocated_total(&plan) as u64;
    say(
        opts,
        format!(
            "on {}:\n{g}\ndevice: {:.1} MiB in use before loading; predicted allocated peak {:.1} MiB",
            cfg.device,
            used as f64 / 1048576.0,
            predicted as f64 / 1048576.0
        ),
    );
    Ok((plan, Some(predicted)))
}

/// Refuses a run whose predicted peak exceeds `--max-memory`, naming the levers.
pub(super) fn check_max_memory(
    cfg: &TrainConfig,
    store: &WeightStore,
    predicted: usize,
) -> Result<()> {
    let Some(limit) = cfg.max_memory_bytes()? else {
        return Ok(());
    };
    if predicted as u64 <= limit {
        return Ok(());
    }
    let gib = |b: f64| b / (1u64 << 30) as f64;
    Err(Error::Invalid(format!(
        "predicted peak {:.2} GiB exceeds --max-memory {} ({:.2} GiB); try a shorter \
         --seq-len (now {}), a smaller --batch-size (now {}), a lower --rank (now {}){}",
        gib(predicted as f64),
        cfg.max_memory.as_deref().unwrap_or(""),
        gib(limit as f64),
        cfg.seq_len,
        cfg.batch_size,
        cfg.rank,
        super::advice::quant_hint(store, &cfg.quant)
    )))
}

/// AdamW over the adapter's parameters, per the run's settings (8-bit moments reported).
pub(super) fn new_optimizer(
    cfg: &TrainConfig,
    params: &[(String, Var)],
    opts: &RunOptions,
) -> Result<AdamW> {
    let opt = AdamW::new(
        params.to_vec(),
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
        say(
            opts,
            format!(
                "AdamW: 8-bit moments for {eight} of {} LoRA tensors (those under {} elements \
                 stay 32-bit); optimizer state {:.1} MiB",
                params.len(),
                super::optim8::MIN_8BIT_SIZE,
                opt.state_bytes() as f64 / (1024.0 * 1024.0)
            ),
        );
    }
    Ok(opt)
}

/// The module names (PEFT's `target_modules`) that got an adapter, in first-seen order.
pub(super) fn adapted_modules(params: &[(String, Var)]) -> Vec<String> {
    params
        .iter()
        // `<module>.lora_A.weight` (a DoRA magnitude names the same module)
        .filter(|(n, _)| n.ends_with(".weight"))
        .filter_map(|(n, _)| n.rsplit('.').nth(2).map(String::from))
        .fold(Vec::new(), |mut v, t| {
            if !v.contains(&t) {
                v.push(t);
            }
            v
        })
}

/// A prompt-learning adapter's settings (method, virtual tokens, encoder width) over `cfg`'s.
fn adopt_prompt_settings(cfg: &mut TrainConfig, l: &prompt::Loaded) {
    use prompt::PromptMethod;
    cfg.method = match l.method {
        PromptMethod::PromptTuning => Method::PromptTuning,
        PromptMethod::PTuning => Method::PTuning,
        PromptMethod::PrefixTuning(_) => Method::PrefixTuning,
    };
    cfg.prefix_projection = l.method == PromptMethod::PrefixTuning(true);
    cfg.num_virtual_tokens = l.num_virtual_tokens;
    if l.encoder_hidden_size > 0 {
        cfg.encoder_hidden_size = Some(l.encoder_hidden_size);
    }
    // The rows come from the file, not from a text.
    cfg.prompt_init_text = None;
}
