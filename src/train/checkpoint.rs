//! Checkpoints: what a run writes every `--save-every` steps, and what `--resume` reads back.
//!
//! A checkpoint is a directory `<run>/checkpoint-N` holding the adapter (PEFT layout), the
//! optimizer state, the resolved settings of the run (`qtune.toml`) and `trainer_state.json` (step,
//! data fingerprint, the settings that shape the trajectory). It is written as a hidden temporary
//! directory and renamed into place, so a kill leaves either the old checkpoint or the new one.
use super::config::{TrainConfig, CONFIG_FILE};
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The checkpoint's trainer state file.
pub const STATE_FILE: &str = "trainer_state.json";
const STATE_FORMAT: &str = "qtune-trainer-1";

/// The settings a checkpoint must share with the run that resumes it: everything that shapes the
/// trajectory.
pub(crate) fn trajectory_keys(
    cfg: &TrainConfig,
    total_steps: usize,
    dtype: candle_core::DType,
) -> serde_json::Value {
    let mut k = serde_json::json!({
        "model": cfg.model, "quant": cfg.quant, "rank": cfg.rank, "alpha": cfg.alpha,
        "dropout": cfg.dropout, "targets": cfg.targets, "lr": cfg.lr, "schedule": cfg.schedule,
        "warmup": cfg.warmup, "total-steps": total_steps, "batch-size": cfg.batch_size,
        "grad-accum": cfg.grad_accum, "max-grad-norm": cfg.max_grad_norm, "seq-len": cfg.seq_len,
        "seed": cfg.seed, "shuffle": cfg.shuffle, "weight-decay": cfg.weight_decay,
        "adam-beta1": cfg.adam_beta1, "adam-beta2": cfg.adam_beta2, "adam-eps": cfg.adam_eps,
        "dtype": cfg.dtype,
    });
    // What `dtype` resolved to: `auto` depends on the CPU, the device and the model's width, and a
    // resumed run must go on in the dtype it started in (see [`saved_compute_dtype`]).
    k[COMPUTE_DTYPE] = serde_json::json!(dtype.as_str());
    // The recompute's dtype changes a bf16 step's gradients; auto (the default) adds no key, so
    // checkpoints of earlier runs resume as they were.
    if cfg.recompute_dtype != "auto" {
        k["recompute-dtype"] = serde_json::json!(cfg.recompute_dtype);
    }
    // Only a DoRA or prompt-learning run has these (a LoRA checkpoint's keys stay as they were).
    if cfg.method != super::config::Method::Lora {
        k["method"] = serde_json::json!(cfg.method);
    }
    if cfg.method.is_prompt() {
        k["num-virtual-tokens"] = serde_json::json!(cfg.num_virtual_tokens);
        k["encoder-hidden-size"] = serde_json::json!(cfg.encoder_hidden_size);
        k["prefix-projection"] = serde_json::json!(cfg.prefix_projection);
        k["prompt-init-text"] = serde_json::json!(cfg.prompt_init_text);
    }
    // Only a run of another objective has these (an SFT checkpoint's keys stay as they were).
    if cfg.objective != "sft" {
        k["objective"] = serde_json::json!(cfg.objective);
        k["beta"] = serde_json::json!(cfg.beta);
        k["ref-adapter"] = serde_json::json!(cfg.ref_adapter);
        k["precompute-ref"] = serde_json::json!(cfg.precompute_ref);
    }
    k
}

/// The trajectory key of the resolved compute dtype (absent in checkpoints of qtune before it).
const COMPUTE_DTYPE: &str = "compute-dtype";

/// The compute dtype checkpoint `ck`'s run resolved its `dtype` to, where the checkpoint says
/// (`None` for one written before qtune recorded it: see
/// [`crate::nn::device::auto_dtype_before_recorded`]): `auto` resumes in it, whatever this CPU,
/// device or qtune version would pick for a new run.
pub(crate) fn saved_compute_dtype(ck: &Path) -> Result<Option<candle_core::DType>> {
    let (spath, st) = read_state(ck)?;
    match st.get("run").and_then(|r| r.get(COMPUTE_DTYPE)) {
        None => Ok(None),
        Some(v) => match v.as_str() {
            Some("bf16") => Ok(Some(candle_core::DType::BF16)),
            Some("f32") => Ok(Some(candle_core::DType::F32)),
            _ => Err(Error::Json {
                path: spath,
                msg: format!("run.{COMPUTE_DTYPE} is {v}, not \"f32\" or \"bf16\""),
            }),
        },
    }
}

/// A checkpoint directory: `dir` itself if it holds a trainer state, else its newest
/// `checkpoint-N` subdirectory.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        return Err(Error::Invalid(format!(
            "--resume {}: no such directory; give the --out directory of a run (or one of its \
             checkpoint-N directories)",
            dir.display()
        )));
    }
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

/// The run directory a checkpoint belongs to (where the resumed run goes on writing): the parent
/// of a `checkpoint-N` directory.
pub fn run_dir_of(checkpoint: &Path) -> PathBuf {
    let named = checkpoint
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("checkpoint-"));
    match checkpoint.parent() {
        Some(p) if named => {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        }
        _ => checkpoint.to_path_buf(),
    }
}

/// The resolved settings saved in a checkpoint (`qtune.toml`), as a TOML table.
pub fn saved_settings(checkpoint: &Path) -> Result<toml::Table> {
    let p = checkpoint.join(CONFIG_FILE);
    if !p.is_file() {
        return Err(Error::Invalid(format!(
            "--resume {}: the checkpoint has no {CONFIG_FILE} (written by qtune before its \
             settings were kept in checkpoints); resume it with the run's flags given again",
            checkpoint.display()
        )));
    }
    TrainConfig::table_from_file(&p)
}

/// Settings a resumed run may change: they do not move the trajectory (the data's content is
/// checked by its fingerprint, so its path may move).
pub const RESUME_MAY_CHANGE: [&str; 7] = [
    "data",
    "eval-data",
    "eval-every",
    "save-every",
    "threads",
    "max-memory",
    "device",
];

/// The directory a resumed run writes to: the run's own, found from `--resume DIR`. An `--out`
/// given beside it must name that same directory (nothing outside the run is ever written).
pub fn resume_out(resume: &Path, given_out: Option<&Path>) -> Result<PathBuf> {
    let run = run_dir_of(&find_checkpoint(resume)?);
    if let Some(o) = given_out {
        let same = match (o.canonicalize(), run.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => o == run,
        };
        if !same {
            return Err(Error::Invalid(format!(
                "--out {}: a resumed run goes on in its own directory {}; drop --out (to branch \
                 a run, copy its directory and resume the copy)",
                o.display(),
                run.display()
            )));
        }
    }
    Ok(run)
}

/// The settings of `qtune train --resume DIR`: the run's own, saved in the checkpoint, overlaid by
/// `given` (a config file's keys, then flags). A given setting that would change the trajectory is
/// refused by name; only [`RESUME_MAY_CHANGE`] may differ. The run goes on in its own directory.
/// `None` for a checkpoint written before settings were saved in it (the caller then needs every
/// setting given again). `path` names the config file in errors.
pub fn resume_config(
    resume: &Path,
    given: &[toml::Table],
    path: Option<&Path>,
) -> Result<Option<TrainConfig>> {
    let ck = find_checkpoint(resume)?;
    // Nothing of a damaged checkpoint is read, its settings included.
    super::manifest::verify_manifest(&ck)?;
    if !ck.join(CONFIG_FILE).is_file() {
        return Ok(None);
    }
    let saved = saved_settings(&ck)?;
    let old = TrainConfig::resolve(std::slice::from_ref(&saved), Some(&ck.join(CONFIG_FILE)))?;
    let mut layers = vec![saved];
    layers.extend(given.iter().cloned());
    let mut new = TrainConfig::resolve(&layers, path)?;
    let table = |c: &TrainConfig| toml::Table::try_from(c).expect("the config serialises");
    let (a, b) = (table(&old), table(&new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| !["out", "resume"].contains(&k.as_str()))
        .filter(|k| !RESUME_MAY_CHANGE.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("--{k} {} (the run has {})", show(b.get(k)), show(a.get(k))))
        .collect();
    if !diffs.is_empty() {
        return Err(Error::Invalid(format!(
            "--resume {}: {} would make this another run (its settings are in {}); only {} may \
             change when resuming",
            resume.display(),
            diffs.join(", "),
            ck.join(CONFIG_FILE).display(),
            RESUME_MAY_CHANGE.join(", ")
        )));
    }
    let given_out = given
        .iter()
        .rev()
        .find_map(|t| t.get("out").and_then(|v| v.as_str()).map(PathBuf::from));
    new.out = resume_out(resume, given_out.as_deref())?;
    new.resume = Some(resume.to_path_buf());
    Ok(Some(new))
}

/// Writes `bytes` to `path` and syncs it.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Where a run is in its trajectory, as a checkpoint records it.
pub(crate) struct State<'a> {
    /// Optimizer steps done.
    pub(crate) step: usize,
    /// Steps of the whole run.
    pub(crate) total_steps: usize,
    /// Micro-batches per step and examples per step.
    pub(crate) grad_accum: usize,
    pub(crate) per_step: usize,
    /// Training examples.
    pub(crate) n: usize,
    /// Seed and shuffling of the data order.
    pub(crate) seed: u64,
    pub(crate) shuffle: bool,
    /// The learning rate of the next step.
    pub(crate) lr_next: f64,
    /// The data fingerprint and the trajectory settings.
    pub(crate) data: &'a str,
    pub(crate) run: &'a serde_json::Value,
}

/// Writes checkpoint `<out>/checkpoint-<step>`: `fill` writes the adapter and optimizer state into
/// the temporary directory it is given; the trainer state and `settings` (the run's resolved
/// config) go beside them, then the directory is renamed into place.
pub(crate) fn save(
    out: &Path,
    st: &State,
    settings: &TrainConfig,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let step = st.step;
    let dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    let json = serde_json::json!({
        "format": STATE_FORMAT, "step": step, "total_steps": st.total_steps,
        "micro_batches_done": step * st.grad_accum, "examples_seen": step * st.per_step,
        "epoch": (step * st.per_step) / st.n.max(1), "rng": {"seed": st.seed, "shuffle": st.shuffle},
        "lr_next": st.lr_next, "data": st.data, "run": st.run,
    });
    write_file(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(&json)
            .expect("json")
            .as_bytes(),
    )?;
    write_file(&tmp.join(CONFIG_FILE), settings.to_toml().as_bytes())?;
    // Checksums of everything above, last: a truncated or flipped file is refused on --resume.
    super::manifest::write_manifest(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
}

/// Checkpoint `ck`'s trainer state file and its JSON, whose format is checked.
fn read_state(ck: &Path) -> Result<(PathBuf, serde_json::Value)> {
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
    Ok((spath, st))
}

/// Reads checkpoint `ck`'s trainer state, checks that it belongs to this run (same trajectory
/// settings `run`, same data fingerprint `data`), and returns the step it reached.
pub(crate) fn check_resume(ck: &Path, run: &serde_json::Value, data: &str) -> Result<usize> {
    let (spath, st) = read_state(ck)?;
    let saved = st.get("run").cloned().unwrap_or_default();
    let mut diffs = Vec::new();
    if let (Some(a), Some(b)) = (saved.as_object(), run.as_object()) {
        for (k, v) in b {
            // A checkpoint from before the resolved dtype was recorded resumes as it always did.
            let unrecorded = k == COMPUTE_DTYPE && !a.contains_key(k);
            if a.get(k) != Some(v) && !unrecorded {
                diffs.push(format!(
                    "{k} was {} and is now {v}",
                    a.get(k).unwrap_or(&serde_json::Value::Null)
                ));
            }
        }
    } else {
        diffs.push("the saved settings are missing".into());
    }
    if st.get("data").and_then(|v| v.as_str()) != Some(data) {
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
    st.get("step")
        .and_then(|v| v.as_u64())
        .map(|s| s as usize)
        .ok_or_else(|| Error::Json {
            path: spath,
            msg: "key 'step' is missing".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_belongs_to_its_run_directory() {
        assert_eq!(
            run_dir_of(Path::new("runs/r1/checkpoint-10")),
            Path::new("runs/r1")
        );
        assert_eq!(run_dir_of(Path::new("checkpoint-3")), Path::new("."));
        assert_eq!(run_dir_of(Path::new("runs/ck")), Path::new("runs/ck"));
    }

    #[test]
    fn a_missing_resume_directory_is_named() {
        let e = find_checkpoint(Path::new("/nonexistent/run")).unwrap_err();
        assert!(e
            .to_string()
            .contains("/nonexistent/run: no such directory"));
    }
}
