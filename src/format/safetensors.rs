//! safetensors (single file and sharded) as memory-mapped views.
//!
//! One read-only map per file (shared through an `Arc`); the header is parsed with the `safetensors`
//! crate's `read_metadata`, which copies no tensor data. When it rejects a file we re-read the header
//! ourselves only to say which tensor is at fault. bitsandbytes 4-bit parts are grouped into NF4
//! tensors by [`super::bnb`].
use crate::quant::QType;
use crate::store::{Bytes, SourceFormat, WeightStore};
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FMT: &str = "safetensors";

/// A tensor as the file declares it, before dtype checks or bnb grouping.
#[derive(Clone)]
pub struct RawTensor {
    /// Name in the file.
    pub name: String,
    /// The file it lives in.
    pub path: PathBuf,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Its bytes (a view of the file's map).
    pub data: Bytes,
}

/// Opens a `.safetensors` file, or a directory holding `model.safetensors` or a sharded
/// `model.safetensors.index.json` (plus `config.json`, kept as `store.config`).
pub fn load(path: &Path) -> Result<WeightStore> {
    let (raw, config) = if path.is_dir() {
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        let raw = if single.is_file() {
            read_file(&single)?
        } else if index.is_file() {
            read_sharded(&index)?
        } else {
            return Err(Error::Invalid(format!(
                "{}: no model.safetensors or model.safetensors.index.json in this directory",
                path.display()
            )));
        };
        let cfg = path.join("config.json");
        let config = if cfg.is_file() {
            Some(read_json(&cfg)?)
        } else {
            None
        };
        (raw, config)
    } else {
        (read_file(path)?, None)
    };
    let (tensors, any_bnb) = super::bnb::group(raw)?;
    Ok(WeightStore {
        path: path.to_path_buf(),
        format: if any_bnb {
            SourceFormat::BnbNf4
        } else {
            SourceFormat::Safetensors
        },
        tensors,
        gguf_metadata: Vec::new(),
        alignment: 8,
        config,
    })
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: format!("bad JSON: {e}"),
    })
}

/// The qtype of a plain float tensor, or an UnsupportedType error naming it.
pub(crate) fn float_qtype(t: &RawTensor) -> Result<QType> {
    match t.dtype {
        Dtype::F32 => Ok(QType::F32),
        Dtype::F16 => Ok(QType::F16),
        Dtype::BF16 => Ok(QType::BF16),
        d => Err(Error::UnsupportedType {
            path: t.path.clone(),
            tensor: t.name.clone(),
            type_name: format!("{d:?}"),
            supported: "F32, F16, BF16 (U8 only as bitsandbytes 4-bit parts)".into(),
        }),
    }
}

/// Maps one file and lists its tensors in file (offset) order.
pub fn read_file(path: &Path) -> Result<Vec<RawTensor>> {
    let map = super::map_file(path, 8, "the 8-byte header length")?;
    let buf: &[u8] = &map[..];
    let (n, meta) = match SafeTensors::read_metadata(buf) {
        Ok(v) => v,
        Err(e) => return Err(diagnose(path, buf, e)),
    };
    let data_start = 8 + n;
    let infos = meta.tensors();
    let mut out = Vec::with_capacity(infos.len());
    for name in meta.offset_keys() {
        let info = infos[&name];
        let (s, e) = info.data_offsets;
        out.push(RawTensor {
            name,
            path: path.to_path_buf(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: Bytes::from_map(map.clone(), data_start + s, e - s),
        });
    }
    Ok(out)
}

/// Turns a `read_metadata` failure into an error naming the file and, where we can, the tensor.
fn diagnose(path: &Path, buf: &[u8], err: safetensors::SafeTensorError) -> Error {
    let len = buf.len() as u64;
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes checked by caller"));
    if n.checked_add(8).is_none_or(|end| end > len) {
        return Error::Truncated {
            path: path.into(),
            what: format!("a header of {n} bytes"),
            len,
        };
    }
    let header = &buf[8..8 + n as usize];
    let json: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(header) {
        Ok(j) => j,
        Err(e) => {
            return Error::Json {
                path: path.into(),
                msg: format!("bad safetensors header JSON: {e}"),
            }
        }
    };
    let data_len = len - 8 - n;
    for (name, v) in &json {
        if name == "__metadata__" {
            continue;
        }
        let dtype: Option<Dtype> = v
            .get("dtype")
            .and_then(|d| serde_json::from_value(d.clone()).ok());
        let shape: Option<Vec<usize>> = v
            .get("shape")
            .and_then(|d| serde_json::from_value(d.clone()).ok());
        let offs: Option<(u64, u64)> = v
            .get("data_offsets")
            .and_then(|d| serde_json::from_value(d.clone()).ok());
        let (Some(dtype), Some(shape), Some((s, e))) = (dtype, shape, offs) else {
            return Error::corrupt(
                path,
                FMT,
                format!("tensor '{name}' has a malformed entry: {v}"),
            );
        };
        if e < s {
            return Error::corrupt(
                path,
                FMT,
                format!("tensor '{name}' ends before it starts ({s}..{e})"),
            );
        }
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize() as u128, |a, &d| a.checked_mul(d as u128));
        if bits != Some((e - s) as u128 * 8) {
            return Error::Shape {
                path: path.into(),
                tensor: name.clone(),
                msg: format!(
                    "shape {shape:?} of {dtype:?} does not fill its {} bytes",
                    e - s
                ),
            };
        }
        if e > data_len {
            return Error::DataPastEnd {
                path: path.into(),
                tensor: name.clone(),
                start: (8 + n).saturating_add(s),
                end: (8 + n).saturating_add(e),
                len,
            };
        }
    }
    Error::corrupt(path, FMT, format!("{err}"))
}

/// Reads every shard named by an index, checking each listed tensor is present in its shard.
fn read_sharded(index: &Path) -> Result<Vec<RawTensor>> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Json {
            path: index.into(),
            msg: "no \"weight_map\" object; is this a safetensors index?".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    // Shards in name order (model-00001-of-0000N, ...), each with the tensors the index puts there.
    let mut shards: Vec<(String, Vec<String>)> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| Error::Json {
            path: index.into(),
            msg: format!("weight_map entry for '{tensor}' is not a file name"),
        })?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(Error::Json {
                path: index.into(),
                msg: format!("shard name '{shard}' is not a plain file name"),
            });
        }
        match shards.iter_mut().find(|(s, _)| s == shard) {
            Some((_, ts)) => ts.push(tensor.clone()),
            None => shards.push((shard.to_string(), vec![tensor.clone()])),
        }
    }
    shards.sort();
    let mut out = Vec::new();
    for (shard, listed) in shards {
        let p = dir.join(&shard);
        if !p.is_file() {
            return Err(Error::MissingShard {
                index: index.into(),
                shard,
                tensor: listed[0].clone(),
            });
        }
        let got = read_file(&p)?;
        let names: HashMap<&str, ()> = got.iter().map(|t| (t.name.as_str(), ())).collect();
        if let Some(t) = listed.iter().find(|t| !names.contains_key(t.as_str())) {
            return Err(Error::MissingTensor {
                path: p,
                tensor: t.clone(),
                hint: format!(" (the index {} lists it in this shard)", index.display()),
            });
        }
        out.extend(got);
    }
    Ok(out)
}
