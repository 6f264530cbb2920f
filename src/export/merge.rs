//! Merging an adapter into its base: `W' = W + scale · B · A` (DoRA: each row of that times
//! `m / ‖row‖`), in f32, one tensor at a time.
//!
//! Outputs: a GGUF (`.gguf`; merged projections requantised, every other tensor and the metadata
//! kept) or a Hugging Face safetensors directory (float, or NF4 in the bitsandbytes layout). A
//! bitsandbytes NF4 base merges like a float one: its weights are dequantised, the delta added in
//! f32, and the result written as floats or requantised. Each source tensor's mapped pages are released
//! after use, so the peak RSS is a few tensors, not the model.
use crate::export::{encode_float, Adapter, AdapterModule, BaseConfig};
use crate::format::gguf::{GgufWriter, TensorPlan, Value};
use crate::lora::adapter::{replace_dir_marked, sibling};
use crate::quant::{dispatch, QType};
use crate::store::{SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// What a merge wrote.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// Projections that received an adapter delta.
    pub merged: usize,
    /// Tensors written in all.
    pub tensors: usize,
    /// Output size in bytes (file, or model.safetensors of a directory).
    pub bytes: u64,
}

/// Which adapter module, if any, adds to the stored tensor `name` (HF or GGUF naming).
fn module_for<'a>(adapter: &'a Adapter, name: &str, gguf: bool) -> Option<&'a AdapterModule> {
    adapter.modules.iter().find(|m| {
        if gguf {
            m.gguf_name() == name
        } else {
            format!("{}.weight", m.module_path()) == name
        }
    })
}

/// The merged f32 weight `(out, in)` of `t`: dequantised, plus the delta (rows moved into
/// llama.cpp's order for a GGUF base: Llama's q/k, Falcon's fused qkv).
fn merged_f32(
    t: &StoredTensor,
    m: &AdapterModule,
    scale: f32,
    cfg: &BaseConfig,
    gguf: bool,
) -> Vec<f32> {
    let mx = t.matrix();
    let mut w = vec![0f32; mx.rows * mx.cols];
    mx.dequant_tile(0, mx.rows, 0, mx.cols, &mut w);
    t.data.release_pages();
    let d = m.delta(scale);
    let rows = if gguf { cfg.gguf_rows(m.proj) } else { None };
    let k = m.in_features;
    match &rows {
        Some(rows) => {
            for (g, &hf) in rows.iter().enumerate() {
                for (x, y) in w[g * k..(g + 1) * k]
                    .iter_mut()
                    .zip(&d[hf * k..(hf + 1) * k])
                {
                    *x += y;
                }
            }
        }
        None => w.iter_mut().zip(&d).for_each(|(x, y)| *x += y),
    }
    if let Some(mag) = &m.magnitude {
        dora_rescale(&mut w, mag, k, rows.as_deref());
    }
    w
}

/// DoRA's fold, row by row of the merged `w = W + s·B·A`: `w_row · m_row / ‖w_row‖` (PEFT's
/// `Linear.merge`); `rows[g]` is the Hugging Face row (m's index) at stored row g.
fn dora_rescale(w: &mut [f32], mag: &[f32], k: usize, rows: Option<&[usize]>) {
    use rayon::prelude::*;
    w.par_chunks_mut(k.max(1)).enumerate().for_each(|(g, row)| {
        let hf = rows.map_or(g, |r| r[g]);
        let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let f = if n > 0.0 {
            (mag[hf] as f64 / n) as f32
        } else {
            0.0
        };
        row.iter_mut().for_each(|v| *v *= f);
    });
}

fn dequant_all(t: &StoredTensor) -> Vec<f32> {
    let mx = t.matrix();
    let mut w = vec![0f32; mx.rows * mx.cols];
    mx.dequant_tile(0, mx.rows, 0, mx.cols, &mut w);
    w
}

/// Encodes f32 values as any writable type (floats, or a ggml quantisation).
fn encode(qtype: QType, v: &[f32], cols: usize) -> Result<Vec<u8>> {
    match qtype {
        QType::F32 | QType::F16 | QType::BF16 => encode_float(qtype, v),
        q => {
            let rb = q.bytes_for(cols).ok_or_else(|| {
                Error::Invalid(format!("rows of {cols} are not whole {} blocks", q.name()))
            })?;
            let mut out = vec![0u8; rb * (v.len() / cols.max(1))];
            dispatch::quantize(q, v, &mut out)?;
            Ok(out)
        }
    }
}

/// Merges `adapter` into `base` and writes `out`: a GGUF if it ends in `.gguf`, else a safetensors
/// directory. `qtype`: the merged projections' type (GGUF: default their stored type; a directory:
/// f32/f16/bf16 for every tensor, default f32, or nf4 for a bitsandbytes directory).
pub fn merge(
    base: &WeightStore,
    cfg: impl Into<BaseConfig>,
    adapter: &Adapter,
    out: &Path,
    qtype: Option<QType>,
) -> Result<MergeReport> {
    let cfg = &cfg.into();
    if cfg.arch() != adapter.base.arch() {
        return Err(Error::Invalid(format!(
            "{}: the adapter was read for a {} base; {} is a {}",
            adapter.path.display(),
            adapter.base.arch().name(),
            base.path.display(),
            cfg.arch().name()
        )));
    }
    let to_gguf = out.extension().and_then(|e| e.to_str()) == Some("gguf");
    match (base.format, to_gguf) {
        (SourceFormat::Gguf, true) => merge_gguf(base, cfg, adapter, out, qtype),
        (SourceFormat::Safetensors | SourceFormat::BnbNf4, false) => match qtype {
            Some(QType::NF4) => via_f32_dir(base, cfg, adapter, out, |s, o| {
                crate::format::bnb::write_nf4_dir(s, o).map(|_| ())
            }),
            q => merge_hf_dir(base, cfg, adapter, out, q.unwrap_or(QType::F32)),
        },
        (SourceFormat::Safetensors | SourceFormat::BnbNf4, true) => {
            let q = qtype.unwrap_or(QType::F32);
            if crate::export::quantize::llama_ftype(q).is_none() {
                return Err(Error::Invalid(format!(
                    "--type {}: a merged GGUF is f32, f16, bf16, q8_0, q4_0, q4_k or q6_k",
                    q.name()
                )));
            }
            via_f32_dir(base, cfg, adapter, out, |s, o| {
                crate::export::quantize::quantize_to_gguf(s, q, o).map(|_| ())
            })
        }
        (SourceFormat::Gguf, false) => Err(Error::Invalid(format!(
            "{}: a GGUF base merges into a GGUF; give --out a path ending in .gguf",
            out.display()
        ))),
    }
}

/// Hugging Face base to a GGUF or NF4 output: merge into an f32 directory beside `out`, convert it
/// with the quantiser (itself streaming), then delete it.
fn via_f32_dir(
    base: &WeightStore,
    cfg: &BaseConfig,
    adapter: &Adapter,
    out: &Path,
    convert: impl Fn(&WeightStore, &Path) -> Result<()>,
) -> Result<MergeReport> {
    let tmp = sibling(out, "merge-f32");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let mut rep = merge_hf_dir(base, cfg, adapter, &tmp, QType::F32)?;
    let res = WeightStore::open(&tmp).and_then(|s| convert(&s, out));
    let _ = std::fs::remove_dir_all(&tmp);
    res?;
    rep.bytes = dir_or_file_bytes(out);
    Ok(rep)
}

fn dir_or_file_bytes(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }
}

fn merge_gguf(
    base: &WeightStore,
    cfg: &BaseConfig,
    adapter: &Adapter,
    out: &Path,
    qtype: Option<QType>,
) -> Result<MergeReport> {
    if let Some(q) = qtype {
        if crate::export::quantize::llama_ftype(q).is_none() {
            return Err(Error::Invalid(format!(
                "--type {}: a merged GGUF is f32, f16, bf16, q8_0, q4_0, q4_k or q6_k",
                q.name()
            )));
        }
    }
    let scale = adapter.scale as f32;
    let mut meta = base.gguf_metadata.clone();
    if let Some(q) = qtype.and_then(crate::export::quantize::llama_ftype) {
        match meta.iter_mut().find(|(k, _)| k == "general.file_type") {
            Some(e) => e.1 = Value::U32(q),
            None => meta.push(("general.file_type".into(), Value::U32(q))),
        }
    }
    let mut plan = Vec::new();
    for t in &base.tensors {
        let to = match (module_for(adapter, &t.name, true), qtype) {
            (Some(_), Some(q)) if t.shape.last().is_some_and(|c| c % q.block_size() == 0) => q,
            (Some(_), Some(_)) => QType::F32,
            _ => t.qtype,
        };
        plan.push(TensorPlan {
            name: t.name.clone(),
            qtype: to,
            shape: t.shape.clone(),
        });
    }
    let types: Vec<QType> = plan.iter().map(|p| p.qtype).collect();
    let mut w = GgufWriter::create(out, &meta, plan)?;
    let mut merged = 0;
    for (t, to) in base.tensors.iter().zip(types) {
        match module_for(adapter, &t.name, true) {
            Some(m) => {
                let v = merged_f32(t, m, scale, cfg, true);
                w.write_tensor(&encode(to, &v, m.in_features)?)?;
                merged += 1;
            }
            None => {
                w.write_tensor(t.data.as_slice())?;
                t.data.release_pages();
            }
        }
    }
    w.finish()?;
    check_all_merged(adapter, merged)?;
    Ok(MergeReport {
        merged,
        tensors: base.tensors.len(),
        bytes: dir_or_file_bytes(out),
    })
}

fn check_all_merged(adapter: &Adapter, merged: usize) -> Result<()> {
    if merged != adapter.modules.len() {
        return Err(Error::Invalid(format!(
            "{}: only {merged} of the adapter's {} projections were found in the base",
            adapter.path.display(),
            adapter.modules.len()
        )));
    }
    Ok(())
}

/// A Hugging Face base to a safetensors directory, every tensor as `dtype` (F32/F16/BF16).
fn merge_hf_dir(
    base: &WeightStore,
    cfg: &BaseConfig,
    adapter: &Adapter,
    out: &Path,
    dtype: QType,
) -> Result<MergeReport> {
    let st_dtype = match dtype {
        QType::F32 => "F32",
        QType::F16 => "F16",
        QType::BF16 => "BF16",
        q => {
            return Err(Error::Invalid(format!(
            "--type {}: a safetensors directory is f32, f16, bf16 or nf4; give a .gguf path for {}",
            q.name(),
            q.name()
        )))
        }
    };
    // Before anything is written: every adapted module exists in the base.
    let found = base
        .tensors
        .iter()
        .filter(|t| module_for(adapter, &t.name, false).is_some())
        .count();
    check_all_merged(adapter, found)?;
    let tmp = sibling(out, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // Header first (every size is known), then the data, one tensor at a time.
    let esize = if dtype == QType::F32 { 4 } else { 2 };
    let mut hdr = serde_json::Map::new();
    hdr.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "merged_by": "qtune"}),
    );
    let mut off = 0usize;
    for t in &base.tensors {
        let n = t.numel() * esize;
        hdr.insert(
            t.name.clone(),
            serde_json::json!({"dtype": st_dtype, "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(hdr))
        .map_err(|e| Error::Invalid(format!("safetensors header: {e}")))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let file = tmp.join("model.safetensors");
    let f = std::fs::File::create(&file).map_err(|e| Error::io(&file, e))?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
    let io = |e| Error::io(&file, e);
    f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&h).map_err(io)?;
    let scale = adapter.scale as f32;
    let mut merged = 0;
    for t in &base.tensors {
        let v = match module_for(adapter, &t.name, false) {
            Some(m) => {
                merged += 1;
                merged_f32(t, m, scale, cfg, false)
            }
            None => {
                let v = dequant_all(t);
                t.data.release_pages();
                v
            }
        };
        f.write_all(&encode_float(dtype, &v)?).map_err(io)?;
    }
    let f = f
        .into_inner()
        .map_err(|e| Error::io(&file, e.into_error()))?;
    f.sync_all().map_err(io)?;
    drop(f);
    // Config and tokenizer travel with the weights.
    let src_dir = if base.path.is_dir() {
        base.path.clone()
    } else {
        base.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    if let Ok(rd) = std::fs::read_dir(&src_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let keep = name.ends_with(".json") && !name.ends_with(".index.json")
                || name == "tokenizer.model";
            if keep && e.path().is_file() {
                std::fs::copy(e.path(), tmp.join(&name)).map_err(|x| Error::io(e.path(), x))?;
            }
        }
    }
    // The weights written are floats: a bitsandbytes base's quantization_config no longer holds.
    let cp = tmp.join("config.json");
    if let Ok(text) = std::fs::read_to_string(&cp) {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(o) = v.as_object_mut() {
                o.remove("quantization_config");
            }
            v["torch_dtype"] = serde_json::Value::String(
                match dtype {
                    QType::F16 => "float16",
                    QType::BF16 => "bfloat16",
                    _ => "float32",
                }
                .into(),
            );
            let s = serde_json::to_string_pretty(&v).unwrap_or(text);
            std::fs::write(&cp, s).map_err(|e| Error::io(&cp, e))?;
        }
    }
    replace_dir_marked(&tmp, out, "model.safetensors")?;
    Ok(MergeReport {
        merged,
        tensors: base.tensors.len(),
        bytes: off as u64 + 8 + h.len() as u64,
    })
}
