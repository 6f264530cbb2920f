//! The optimizer's state on disk for `--resume`: [`AdamW::save_state`] and
//! [`AdamW::load_state`] (moments, master copies and step counts in one safetensors file, settings
//! and steps in a JSON file beside it).
use super::{AdamW, AdamWConfig, MomentStorage, Moments, STATE_JSON, STATE_TENSORS};
use crate::lora::adapter::{replace_dir_marked, sibling, sync_file, write_synced};
use crate::train::optim8::{self, Moments8};
use crate::{Error, Result};
use std::path::Path;

/// The `format` key of the state JSON.
const FORMAT: &str = "qtune-adamw-1";

impl AdamW {
    /// Writes the moments, master copies and step counts into directory `dir` (replaced whole via
    /// `<dir>.tmp` and a rename; an existing `dir` must be optimizer state or empty). 8-bit
    /// moments are saved as they are held: u8 codes (`<moment>.code/<name>`, the parameter's
    /// shape) and f32 absmax per block (`<moment>.absmax/<name>`).
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let mut views = Vec::with_capacity(5 * self.slots.len());
        let mut steps = serde_json::Map::new();
        let f32v = RawView::f32;
        for s in &self.slots {
            let dims = s.var.dims().to_vec();
            views.push((format!("master/{}", s.name), f32v(dims.clone(), &s.master)));
            match &s.moments {
                Moments::F32 {
                    exp_avg,
                    exp_avg_sq,
                } => {
                    views.push((format!("exp_avg/{}", s.name), f32v(dims.clone(), exp_avg)));
                    views.push((format!("exp_avg_sq/{}", s.name), f32v(dims, exp_avg_sq)));
                }
                Moments::Q8(q) => {
                    for (kind, code, absmax) in [
                        ("exp_avg", &q.exp_avg_code, &q.exp_avg_absmax),
                        ("exp_avg_sq", &q.exp_avg_sq_code, &q.exp_avg_sq_absmax),
                    ] {
                        let codes = RawView {
                            dtype: safetensors::Dtype::U8,
                            shape: dims.clone(),
                            data: code,
                        };
                        views.push((format!("{kind}.code/{}", s.name), codes));
                        views.push((
                            format!("{kind}.absmax/{}", s.name),
                            f32v(vec![absmax.len()], absmax),
                        ));
                    }
                }
            }
            steps.insert(s.name.clone(), serde_json::Value::from(s.step));
        }
        let json = serde_json::json!({
            "format": FORMAT,
            "beta1": self.cfg.beta1,
            "beta2": self.cfg.beta2,
            "eps": self.cfg.eps,
            "weight_decay": self.cfg.weight_decay,
            "moments": self.cfg.moments.key(),
            "block": optim8::BLOCK,
            "min_8bit_size": optim8::MIN_8BIT_SIZE,
            "steps": steps,
        });
        let tmp = sibling(dir, "tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // Streamed to the file: the state of a 7B adapter is hundreds of MB.
        let tpath = tmp.join(STATE_TENSORS);
        safetensors::serialize_to_file(views, None, &tpath).map_err(|e| {
            Error::Invalid(format!(
                "{}: cannot write optimizer state: {e}",
                tpath.display()
            ))
        })?;
        sync_file(&tpath)?;
        let text = serde_json::to_string_pretty(&json).expect("JSON values serialise");
        write_synced(&tmp.join(STATE_JSON), text.as_bytes())?;
        replace_dir_marked(&tmp, dir, STATE_JSON)
    }

    /// Checks that the state's JSON `v` (read from `jpath` in `dir`) was saved by this format
    /// with this run's moment storage (and, for 8-bit moments, this build's block sizes) and
    /// hyper-parameters.
    fn check_saved_settings(&self, dir: &Path, jpath: &Path, v: &serde_json::Value) -> Result<()> {
        let jerr = |msg: String| Error::Json {
            path: jpath.to_path_buf(),
            msg,
        };
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(jerr(format!(
                "key 'format' is {}; expected \"{FORMAT}\"",
                v.get("format").unwrap_or(&serde_json::Value::Null)
            )));
        }
        // State written before 8-bit moments existed has no 'moments' key: it is f32.
        let saved_moments = match v.get("moments").map(|m| m.as_str()) {
            None => MomentStorage::F32,
            Some(Some("f32")) => MomentStorage::F32,
            Some(Some("blockwise8")) => MomentStorage::Blockwise8,
            Some(other) => {
                return Err(jerr(format!(
                    "key 'moments' is {other:?}; expected \"f32\" or \"blockwise8\""
                )))
            }
        };
        if saved_moments != self.cfg.moments {
            return Err(Error::Invalid(format!(
                "{}: optimizer state holds {} but this run uses {}; resume with the same \
                 --optim-8bit setting",
                dir.display(),
                saved_moments.describe(),
                self.cfg.moments.describe()
            )));
        }
        if saved_moments == MomentStorage::Blockwise8 {
            let int = |k: &str| v.get(k).and_then(|x| x.as_u64());
            if int("block") != Some(optim8::BLOCK as u64)
                || int("min_8bit_size") != Some(optim8::MIN_8BIT_SIZE as u64)
            {
                return Err(jerr(format!(
                    "8-bit state with block {:?} and min_8bit_size {:?}; this build uses {} and {}",
                    v.get("block"),
                    v.get("min_8bit_size"),
                    optim8::BLOCK,
                    optim8::MIN_8BIT_SIZE
                )));
            }
        }
        let num = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| jerr(format!("key '{k}' is missing or not a number")))
        };
        let saved = AdamWConfig {
            beta1: num("beta1")?,
            beta2: num("beta2")?,
            eps: num("eps")?,
            weight_decay: num("weight_decay")?,
            moments: saved_moments,
        };
        if saved != self.cfg {
            return Err(Error::Invalid(format!(
                "{}: optimizer state was saved with {saved:?} but this run uses {:?}; resume with \
                 the same optimizer settings",
                dir.display(),
                self.cfg
            )));
        }
        Ok(())
    }

    /// Restores state saved by [`AdamW::save_state`] for the same parameters (names and shapes)
    /// and hyper-parameters, moment storage included, and writes the saved master copies into the
    /// Vars, so that training continues exactly as if it had not stopped.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let jpath = dir.join(STATE_JSON);
        let jerr = |msg: String| Error::Json {
            path: jpath.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&jpath).map_err(|e| Error::io(&jpath, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| jerr(format!("not valid JSON: {e}")))?;
        self.check_saved_settings(dir, &jpath, &v)?;
        let steps = v
            .get("steps")
            .and_then(|s| s.as_object())
            .ok_or_else(|| jerr("key 'steps' is missing or not an object".into()))?;
        let tpath = dir.join(STATE_TENSORS);
        let file = std::fs::File::open(&tpath).map_err(|e| Error::io(&tpath, e))?;
        // SAFETY: a read-only map of a file qtune wrote and nothing else modifies while it resumes;
        // dropped at the end of this function. Mapped rather than read: the state of a 7B adapter
        // is hundreds of MB.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&tpath, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::corrupt(&tpath, "safetensors", e.to_string()))?;
        if steps.len() != self.slots.len() {
            return Err(Error::Invalid(format!(
                "{}: optimizer state holds {} parameters, this run trains {}; resume with the \
                 same adapter configuration",
                dir.display(),
                steps.len(),
                self.slots.len()
            )));
        }
        // The raw bytes of tensor `name`, checked to be `dtype` of `shape`.
        let tensor = |name: String, dtype: safetensors::Dtype, shape: &[usize]| {
            let view = st.tensor(&name).map_err(|_| Error::MissingTensor {
                path: tpath.clone(),
                tensor: name.clone(),
                hint: " (the optimizer state is incomplete or for another adapter)".into(),
            })?;
            if view.dtype() != dtype || view.shape() != shape {
                return Err(Error::Shape {
                    path: tpath.clone(),
                    tensor: name,
                    msg: format!(
                        "is {:?} {:?}; this run's parameter needs {dtype:?} {shape:?}",
                        view.dtype(),
                        view.shape(),
                    ),
                });
            }
            Ok(view.data())
        };
        // The data may be unaligned in the file buffer: copy element by element.
        let f32s = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(tensor(name, safetensors::Dtype::F32, shape)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        // Read everything before changing anything, so a bad file leaves the optimizer intact.
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let step = steps.get(&s.name).and_then(|x| x.as_u64()).ok_or_else(|| {
                Error::MissingTensor {
                    path: jpath.clone(),
                    tensor: s.name.clone(),
                    hint: " (no step count for this parameter; the state belongs to another \
                           adapter)"
                        .into(),
                }
            })?;
            let dims = s.var.dims();
            let master = f32s(format!("master/{}", s.name), dims)?;
            let moments = match &s.moments {
                Moments::F32 { .. } => Moments::F32 {
                    exp_avg: f32s(format!("exp_avg/{}", s.name), dims)?,
                    exp_avg_sq: f32s(format!("exp_avg_sq/{}", s.name), dims)?,
                },
                Moments::Q8(q) => {
                    let blocks = [q.exp_avg_absmax.len()];
                    let code = |kind: &str| -> Result<Vec<u8>> {
                        let name = format!("{kind}.code/{}", s.name);
                        Ok(tensor(name, safetensors::Dtype::U8, dims)?.to_vec())
                    };
                    Moments::Q8(Moments8 {
                        exp_avg_code: code("exp_avg")?,
                        exp_avg_absmax: f32s(format!("exp_avg.absmax/{}", s.name), &blocks)?,
                        exp_avg_sq_code: code("exp_avg_sq")?,
                        exp_avg_sq_absmax: f32s(format!("exp_avg_sq.absmax/{}", s.name), &blocks)?,
                    })
                }
            };
            loaded.push((step, master, moments));
        }
        for (s, (step, master, moments)) in self.slots.iter_mut().zip(loaded) {
            s.master = master;
            s.moments = moments;
            s.step = step;
            s.write_back()?;
        }
        Ok(())
    }
}

/// A borrowed tensor for safetensors serialisation.
struct RawView<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl<'a> RawView<'a> {
    fn f32(shape: Vec<usize>, v: &'a [f32]) -> Self {
        RawView {
            dtype: safetensors::Dtype::F32,
            shape,
            data: bytemuck::cast_slice(v),
        }
    }
}

impl safetensors::View for RawView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
