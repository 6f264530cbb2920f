//! `qtune quantize`: writes a GGUF of a model (a GGUF, or a Hugging Face Llama directory) with its
//! matrices quantised to one type, streaming one tensor at a time, a few rows at a time.
//!
//! Which tensors get the target type: 2-D weights whose row length is a whole number of its blocks.
//! 1-D tensors (norms, biases) are written F32, as llama.cpp's converter does. For Q4_K/Q6_K, matrices
//! whose rows are not a multiple of 256 fall back to Q8_0 (llama.cpp would pick Q5_0, which we do not
//! write); any row length that is not a multiple of 32 stays F32. Each fallback is reported.
//!
//! From a Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` (llama.cpp's `llama`), names and
//! metadata follow llama.cpp's `convert_hf_to_gguf.py`, including its row permutation of `q_proj` /
//! `k_proj` (rotary pairs interleaved per head) and, for Llama 3.1's `rope_scaling`, its
//! `rope_freqs.weight`; a byte-level BPE `tokenizer.json` becomes `tokenizer.ggml.*`. From a
//! `Qwen2ForCausalLM` (`qwen2`): rows as stored, q/k/v biases. From a
//! Hugging Face `FalconForCausalLM` likewise, with its fused qkv rows regrouped as llama.cpp does.
use crate::error::{Error, Result};
use crate::format::gguf::{self, GgufWriter, TensorPlan, Value};
use crate::quant::{dispatch, QType};
use crate::store::{SourceFormat, StoredTensor, WeightStore};
use half::{bf16, f16};
use std::path::{Path, PathBuf};

mod hf;
mod tokenizer;

use hf::{falcon_hf_row, hf_falcon, hf_llama};

/// llama.cpp's `general.file_type` (`enum llama_ftype`) for a target type.
pub fn llama_ftype(qtype: QType) -> Option<u32> {
    Some(match qtype {
        QType::F32 => 0,
        QType::F16 => 1,
        QType::Q4_0 => 2,
        QType::Q8_0 => 7,
        // MOSTLY_Q4_K_S: ours is Q4_K throughout, closest to llama.cpp's "S" recipe (its "M" recipe
        // puts attn_v / ffn_down in Q6_K). The ftype is informational; readers use each tensor's type.
        QType::Q4_K => 14,
        QType::Q6_K => 18,
        QType::BF16 => 32,
        _ => return None,
    })
}

/// What was written for one tensor.
#[derive(Clone, Debug)]
pub struct TensorReport {
    /// Name in the output file.
    pub name: String,
    /// Name in the source.
    pub source_name: String,
    /// Source type.
    pub from: QType,
    /// Written type.
    pub to: QType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Bytes written (without padding).
    pub bytes: u64,
}

/// Summary of a `quantize_to_gguf` run.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    /// The file written.
    pub out: PathBuf,
    /// Requested type.
    pub qtype: QType,
    /// One entry per tensor, in file order.
    pub tensors: Vec<TensorReport>,
    /// Tensors that could not take the requested type, with the reason.
    pub fallbacks: Vec<String>,
    /// Weights written.
    pub params: u64,
    /// Size of the output file.
    pub file_bytes: u64,
}

impl QuantizeReport {
    /// Tensor bytes per weight, in bits, over the whole output.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.tensors.iter().map(|t| t.bytes).sum::<u64>() as f64 / self.params.max(1) as f64
    }
}

impl std::fmt::Display for QuantizeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "wrote {} ({} bytes): {} tensors, {} weights, {:.3} bits per weight, target {}",
            self.out.display(),
            self.file_bytes,
            self.tensors.len(),
            self.params,
            self.bits_per_weight(),
            self.qtype.name()
        )?;
        for s in &self.fallbacks {
            writeln!(f, "  fallback: {s}")?;
        }
        Ok(())
    }
}

/// GGUF metadata in file order.
type Metadata = Vec<(String, Value)>;

/// Tensors computed from the config rather than read (llama.cpp's `rope_freqs.weight`): name and
/// f32 values of a 1-D tensor, written F32 before the others, as llama.cpp's converter does.
type Extra = Vec<(String, Vec<f32>)>;

/// How one source tensor becomes one output tensor.
struct Job<'a> {
    src: &'a StoredTensor,
    name: String,
    to: QType,
    /// Heads of a Q/K projection whose rows llama.cpp permutes.
    permute_heads: Option<usize>,
    /// Falcon fused qkv (heads, KV heads, head dim): rows regrouped from per-KV-group
    /// `[q.., k, v]` to `[all q, all k, all v]`, as llama.cpp's converter does.
    qkv_groups: Option<(usize, usize, usize)>,
}

/// Writes `src` as a GGUF at `out`, 2-D weights in `qtype` (Q4_0, Q8_0, Q4_K, Q6_K, or F16/BF16/F32 for a
/// plain conversion). Streams: holds at most a few MB of f32 rows at a time.
pub fn quantize_to_gguf(src: &WeightStore, qtype: QType, out: &Path) -> Result<QuantizeReport> {
    let Some(ftype) = llama_ftype(qtype) else {
        return Err(Error::Invalid(format!(
            "cannot write a GGUF of type {}: choose one of Q4_0, Q8_0, Q4_K, Q6_K, F16, BF16, F32",
            qtype.name()
        )));
    };
    let mut fallbacks = Vec::new();
    let (mut metadata, jobs, extra) = match src.format {
        SourceFormat::Gguf => (
            src.gguf_metadata.clone(),
            gguf_jobs(src, qtype, &mut fallbacks),
            Vec::new(),
        ),
        _ if crate::models::plan::is_falcon(src) => hf_falcon(src, qtype, &mut fallbacks)?,
        _ => hf_llama(src, qtype, &mut fallbacks)?,
    };
    set_key(&mut metadata, "general.file_type", Value::U32(ftype));
    set_key(&mut metadata, "general.quantization_version", Value::U32(2));

    let plan: Vec<TensorPlan> = extra
        .iter()
        .map(|(name, v)| TensorPlan {
            name: name.clone(),
            qtype: QType::F32,
            shape: vec![v.len()],
        })
        .chain(jobs.iter().map(|j| TensorPlan {
            name: j.name.clone(),
            qtype: j.to,
            shape: j.src.shape.clone(),
        }))
        .collect();
    let mut w = GgufWriter::create(out, &metadata, plan)?;
    let mut tensors = Vec::with_capacity(extra.len() + jobs.len());
    for (name, v) in &extra {
        let mut b = vec![0u8; 4 * v.len()];
        encode(QType::F32, v, &mut b)?;
        w.write_tensor(&b)?;
        tensors.push(TensorReport {
            name: name.clone(),
            source_name: "config.json rope_scaling".into(),
            from: QType::F32,
            to: QType::F32,
            shape: vec![v.len()],
            bytes: b.len() as u64,
        });
    }
    for j in &jobs {
        let bytes = write_tensor(&mut w, j, out)?;
        // Done with this source tensor: its mapped pages leave our RSS (streaming, one at a time).
        j.src.data.release_pages();
        tensors.push(TensorReport {
            name: j.name.clone(),
            source_name: j.src.name.clone(),
            from: j.src.qtype,
            to: j.to,
            shape: j.src.shape.clone(),
            bytes,
        });
    }
    w.finish()?;
    let file_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let params = jobs.iter().map(|j| j.src.numel() as u64).sum::<u64>()
        + extra.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
    Ok(QuantizeReport {
        out: out.to_path_buf(),
        qtype,
        tensors,
        fallbacks,
        params,
        file_bytes,
    })
}

/// Replaces the value of `key` in place, or appends it.
fn set_key(meta: &mut Vec<(String, Value)>, key: &str, v: Value) {
    match meta.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = v,
        None => meta.push((key.to_string(), v)),
    }
}

/// The type a tensor of `shape` gets when the target is `qtype`, and why if it is not `qtype`.
fn choose_type(name: &str, shape: &[usize], qtype: QType) -> (QType, Option<String>) {
    if shape.len() != 2 {
        return (QType::F32, None);
    }
    let cols = shape[1];
    if cols.is_multiple_of(qtype.block_size()) {
        return (qtype, None);
    }
    let k_quant = matches!(qtype, QType::Q4_K | QType::Q6_K);
    let to = if k_quant && cols.is_multiple_of(QType::Q8_0.block_size()) {
        QType::Q8_0
    } else {
        QType::F32
    };
    let why = format!(
        "{name} {shape:?}: row length {cols} is not a multiple of {} ({}), written {}",
        qtype.block_size(),
        qtype.name(),
        to.name()
    );
    (to, Some(why))
}

fn gguf_jobs<'a>(src: &'a WeightStore, qtype: QType, fallbacks: &mut Vec<String>) -> Vec<Job<'a>> {
    src.tensors
        .iter()
        .map(|t| {
            let (to, why) = choose_type(&t.name, &t.shape, qtype);
            fallbacks.extend(why);
            Job {
                src: t,
                name: t.name.clone(),
                to,
                permute_heads: None,
                qkv_groups: None,
            }
        })
        .collect()
}

/// Dequantises, permutes and requantises one tensor into the writer; returns the bytes written.
fn write_tensor(w: &mut GgufWriter, j: &Job, out: &Path) -> Result<u64> {
    let m = j.src.matrix();
    // A 1-D bias is permuted as a column: one element per row.
    let reorder = j.permute_heads.is_some() || j.qkv_groups.is_some();
    let as_column = j.src.shape.len() == 1 && reorder;
    let (rows, cols) = if as_column {
        (m.cols, 1)
    } else {
        (m.rows, m.cols)
    };
    // Same type and no row permutation: the stored bytes are already what we would write.
    if j.src.qtype == j.to && !reorder && j.src.nf4.is_none() {
        w.write_tensor(j.src.data.as_slice())?;
        return Ok(j.src.data.len() as u64);
    }
    let src_row = |r: usize| -> usize {
        if let Some((h, kv, hd)) = j.qkv_groups {
            return falcon_hf_row(r, h, kv, hd);
        }
        match j.permute_heads {
            // Output row (h, i, pair j) <- source row (h, j, i): llama.cpp's
            // reshape(n_head, 2, half, cols).swapaxes(1, 2) of the HF layout.
            Some(n) => {
                let hd = rows / n;
                let half = hd / 2;
                let (h, rem) = (r / hd, r % hd);
                let (i, jj) = (rem / 2, rem % 2);
                h * hd + jj * half + i
            }
            None => r,
        }
    };
    // ~1M f32 per pass (4 MB), whole rows.
    let step = ((1 << 20) / cols.max(1)).max(1);
    let mut f = vec![0f32; step.min(rows.max(1)) * cols];
    let row_bytes =
        j.to.bytes_for(cols)
            .expect("row length checked by choose_type");
    let mut q = vec![0u8; step.min(rows.max(1)) * row_bytes];
    let mut written = 0u64;
    if as_column {
        let mut v = vec![0f32; rows];
        m.dequant_tile(0, 1, 0, rows, &mut v);
        let p: Vec<f32> = (0..rows).map(|r| v[src_row(r)]).collect();
        let mut b = vec![0u8; j.to.bytes_for(rows).expect("1-D tensors are written F32")];
        encode(j.to, &p, &mut b)?;
        w.write_tensor(&b)?;
        return Ok(b.len() as u64);
    }
    let mut r0 = 0;
    while r0 < rows {
        let n = step.min(rows - r0);
        let buf = &mut f[..n * cols];
        if reorder {
            for r in 0..n {
                m.dequant_tile(
                    src_row(r0 + r),
                    1,
                    0,
                    cols,
                    &mut buf[r * cols..(r + 1) * cols],
                );
            }
        } else {
            m.dequant_tile(r0, n, 0, cols, buf);
        }
        let qb = &mut q[..n * row_bytes];
        encode(j.to, buf, qb).map_err(|e| match e {
            Error::Invalid(msg) => {
                Error::Invalid(format!("{}: tensor '{}': {msg}", out.display(), j.name))
            }
            e => e,
        })?;
        w.write_chunk(qb)?;
        written += qb.len() as u64;
        r0 += n;
    }
    Ok(written)
}

/// f32 values to `to`'s bytes: plain floats here, block quants through the kernels' quantiser.
fn encode(to: QType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    match to {
        QType::F32 => src
            .iter()
            .zip(dst.chunks_exact_mut(4))
            .for_each(|(v, o)| o.copy_from_slice(&v.to_le_bytes())),
        QType::F16 => src
            .iter()
            .zip(dst.chunks_exact_mut(2))
            .for_each(|(v, o)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
        QType::BF16 => src
            .iter()
            .zip(dst.chunks_exact_mut(2))
            .for_each(|(v, o)| o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        t => dispatch::quantize(t, src, dst)?,
    }
    Ok(())
}

/// Convenience for callers holding a path: loads a GGUF and quantises it.
pub fn quantize_gguf_file(src: &Path, qtype: QType, out: &Path) -> Result<QuantizeReport> {
    let store = gguf::load(src)?;
    quantize_to_gguf(&store, qtype, out)
}

#[cfg(test)]
mod tests {
    use super::hf::llama_name;
    use super::*;

    #[test]
    fn hf_names() {
        assert_eq!(
            llama_name("model.layers.3.self_attn.k_proj.weight"),
            Some(Some("blk.3.attn_k.weight".into()))
        );
        assert_eq!(
            llama_name("model.layers.0.mlp.down_proj.weight"),
            Some(Some("blk.0.ffn_down.weight".into()))
        );
        assert_eq!(
            llama_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            Some(None)
        );
        assert_eq!(
            llama_name("lm_head.weight"),
            Some(Some("output.weight".into()))
        );
        assert_eq!(llama_name("model.layers.0.foo.weight"), None);
    }

    #[test]
    fn q4_k_fallback() {
        assert_eq!(choose_type("a", &[8, 4544], QType::Q4_K).0, QType::Q8_0);
        assert_eq!(
            choose_type("a", &[8, 4096], QType::Q4_K),
            (QType::Q4_K, None)
        );
        assert_eq!(choose_type("a", &[8, 33], QType::Q8_0).0, QType::F32);
        assert_eq!(choose_type("a", &[4096], QType::Q8_0), (QType::F32, None));
    }
}
