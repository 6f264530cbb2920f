//! The streaming GGUF writer (gguf-py's layout), and [`rewrite`].
use super::*;
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

/// One tensor the writer will write: name, type, PyTorch-order shape.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// Tensor name.
    pub name: String,
    /// Stored type.
    pub qtype: QType,
    /// Shape, outermost first (the file stores it reversed).
    pub shape: Vec<usize>,
}

impl TensorPlan {
    /// The plan of a tensor `name` of `qtype` and `shape` (outermost first).
    pub fn new(name: &str, qtype: QType, shape: &[usize]) -> Self {
        TensorPlan {
            name: name.to_string(),
            qtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of the tensor's data, or `None` if the row length is not a whole number of blocks.
    pub fn nbytes(&self) -> Option<usize> {
        let row = *self.shape.last().unwrap_or(&1);
        if !row.is_multiple_of(self.qtype.block_size()) {
            return None;
        }
        self.qtype.bytes_for(self.shape.iter().product())
    }
}

/// Streaming GGUF v3 writer with the layout gguf-py's `GGUFWriter` produces: header, metadata,
/// tensor infos, padding, then each tensor's data padded to the alignment. Writes `<out>.tmp` and
/// renames it on [`GgufWriter::finish`]; dropped unfinished, it deletes the temporary file.
pub struct GgufWriter {
    out: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    plan: Vec<(TensorPlan, usize)>,
    alignment: usize,
    /// Index of the tensor being written and bytes of it written so far.
    cur: usize,
    cur_written: usize,
}

impl GgufWriter {
    /// Creates `<out>.tmp` and writes header, metadata and tensor infos. The alignment is taken
    /// from `general.alignment` in `metadata` if present, else 32.
    pub fn create(out: &Path, metadata: &[(String, Value)], plan: Vec<TensorPlan>) -> Result<Self> {
        let alignment = match find(metadata, KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: {KEY_ALIGNMENT} = {v} is not a power of two",
                        out.display()
                    ))
                })?,
        } as usize;
        let mut names = HashSet::new();
        let mut sized = Vec::with_capacity(plan.len());
        for t in plan {
            if !names.insert(t.name.clone()) {
                return Err(Error::Invalid(format!(
                    "{}: tensor '{}' planned twice",
                    out.display(),
                    t.name
                )));
            }
            if t.shape.len() > MAX_DIMS || t.shape.contains(&0) {
                return Err(Error::Shape {
                    path: out.to_path_buf(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "shape {:?} cannot be stored in GGUF (1 to 4 non-zero dims)",
                        t.shape
                    ),
                });
            }
            if t.qtype.ggml_id().is_none() {
                return Err(Error::Invalid(format!(
                    "{}: tensor '{}': {} cannot be stored in GGUF",
                    out.display(),
                    t.name,
                    t.qtype.name()
                )));
            }
            let n = t.nbytes().ok_or_else(|| Error::Shape {
                path: out.to_path_buf(),
                tensor: t.name.clone(),
                msg: format!(
                    "row length is not a multiple of the {} block size {}",
                    t.qtype.name(),
                    t.qtype.block_size()
                ),
            })?;
            sized.push((t, n));
        }

        let mut head = Vec::with_capacity(
            24 + metadata
                .iter()
                .map(|(k, v)| 12 + k.len() + v.encoded_len())
                .sum::<usize>()
                + sized.iter().map(|(t, _)| 60 + t.name.len()).sum::<usize>(),
        );
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        head.extend_from_slice(&(sized.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            encode_str(k, &mut head);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut offset = 0usize;
        for (t, n) in &sized {
            encode_str(&t.name, &mut head);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.qtype.ggml_id().unwrap_or(0).to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += n.div_ceil(alignment) * alignment;
        }
        head.resize(head.len().div_ceil(alignment) * alignment, 0);

        let mut tmp_name = out.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = GgufWriter {
            out: out.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
            plan: sized,
            alignment,
            cur: 0,
            cur_written: 0,
        };
        w.write_raw(&head)?;
        Ok(w)
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        let tmp = &self.tmp;
        match self.file.as_mut() {
            Some(f) => f.write_all(b).map_err(|e| Error::io(tmp, e)),
            None => Err(Error::Invalid(format!(
                "{}: writer already finished",
                self.out.display()
            ))),
        }
    }

    /// The tensor whose bytes are expected next, if any.
    pub fn next_tensor(&self) -> Option<&TensorPlan> {
        self.plan.get(self.cur).map(|(t, _)| t)
    }

    /// Appends `bytes` to the current tensor (a tensor may arrive in any number of chunks, in plan
    /// order); when its last byte arrives, pads to the alignment and moves to the next tensor.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((t, n)) = self.plan.get(self.cur) else {
            return Err(Error::Invalid(format!(
                "{}: more tensor data than planned",
                self.out.display()
            )));
        };
        let n = *n;
        if self.cur_written + bytes.len() > n {
            return Err(Error::Shape {
                path: self.out.clone(),
                tensor: t.name.clone(),
                msg: format!(
                    "got {} bytes, the plan says {n}",
                    self.cur_written + bytes.len()
                ),
            });
        }
        self.write_raw(bytes)?;
        self.cur_written += bytes.len();
        if self.cur_written == n {
            let pad = n.div_ceil(self.alignment) * self.alignment - n;
            self.write_raw(&vec![0u8; pad])?;
            self.cur += 1;
            self.cur_written = 0;
        }
        Ok(())
    }

    /// Writes one whole tensor (the next in plan order).
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some((t, n)) = self.plan.get(self.cur) {
            if self.cur_written != 0 || bytes.len() != *n {
                return Err(Error::Shape {
                    path: self.out.clone(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "got {} bytes for a whole tensor, the plan says {n}",
                        bytes.len()
                    ),
                });
            }
        }
        self.write_chunk(bytes)
    }

    /// Checks every planned tensor was written, flushes, syncs and renames `<out>.tmp` to `<out>`.
    pub fn finish(mut self) -> Result<()> {
        if let Some((t, n)) = self.plan.get(self.cur) {
            return Err(Error::Invalid(format!(
                "{}: tensor '{}' incomplete ({} of {n} bytes written); file not written",
                self.out.display(),
                t.name,
                self.cur_written
            )));
        }
        let f = self.file.take().expect("finish runs once");
        let f = f
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Unfinished: leave no half-written file behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Rewrites a parsed GGUF store with our writer (same metadata, tensors, order and alignment).
pub fn rewrite(store: &WeightStore, out: &Path) -> Result<()> {
    let plan = store
        .tensors
        .iter()
        .map(|t| TensorPlan::new(&t.name, t.qtype, &t.shape))
        .collect();
    let mut w = GgufWriter::create(out, &store.gguf_metadata, plan)?;
    for t in &store.tensors {
        w.write_tensor(t.data.as_slice())?;
    }
    w.finish()
}
