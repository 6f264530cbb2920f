//! bitsandbytes 4-bit checkpoints (`*-bnb-4bit`): NF4 tensors with double-quantised statistics.
//!
//! transformers saves each quantised `X.weight` as six tensors: `X.weight` (packed uint8 codes),
//! `X.weight.absmax` (uint8 codes of the absmax values), `X.weight.quant_map` (16 f32),
//! `X.weight.nested_absmax` (f32 per 256 absmax), `X.weight.nested_quant_map` (256 f32) and
//! `X.weight.quant_state.bitsandbytes__nf4` (the UTF-8 bytes of a JSON object: quant_type, blocksize,
//! dtype, shape, nested_blocksize, nested_offset, nested_dtype). [`group`] folds them into one NF4
//! [`StoredTensor`] named `X.weight`.
use super::safetensors::{float_qtype, RawTensor};
use crate::quant::nf4::{NF4_BLOCK, NF4_NESTED_BLOCK};
use crate::quant::QType;
use crate::store::{Nf4Stats, StoredTensor};
use crate::{Error, Result};
use safetensors::tensor::Dtype;
use std::collections::HashMap;

/// Suffix of the packed quant-state tensor of an NF4 weight.
pub const NF4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// Suffix of the quant-state tensor of an FP4 weight (rejected).
pub const FP4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__fp4";
/// The statistics tensors that sit beside a packed weight.
pub const PARTS: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

/// The JSON stored in `*.quant_state.bitsandbytes__nf4`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantStateJson {
    /// "nf4" (or "fp4", rejected).
    pub quant_type: String,
    /// Elements per block (64).
    pub blocksize: usize,
    /// The original dtype: "float16", "bfloat16" or "float32".
    pub dtype: String,
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// Absmax values per nested block (256); absent without double quant.
    pub nested_blocksize: Option<usize>,
    /// Mean removed from the absmax values.
    pub nested_offset: Option<f64>,
    /// dtype of the nested statistics ("float32").
    pub nested_dtype: Option<String>,
}

/// Splits raw tensors into plain float tensors and NF4 tensors assembled from their bnb parts, in
/// file order (an NF4 tensor takes the place of its packed weight). Returns whether any NF4 was found.
pub fn group(raw: Vec<RawTensor>) -> Result<(Vec<StoredTensor>, bool)> {
    let by_name: HashMap<&str, &RawTensor> = raw.iter().map(|t| (t.name.as_str(), t)).collect();
    if let Some(t) = raw.iter().find(|t| t.name.ends_with(FP4_STATE_SUFFIX)) {
        return Err(Error::UnsupportedType {
            path: t.path.clone(),
            tensor: t.name.trim_end_matches(FP4_STATE_SUFFIX).to_string(),
            type_name: "bitsandbytes FP4".into(),
            supported: "bitsandbytes NF4 with double quant (bnb_4bit_quant_type=\"nf4\")".into(),
        });
    }
    let bases: Vec<&str> = raw.iter().filter_map(|t| t.name.strip_suffix(NF4_STATE_SUFFIX)).collect();
    // Every tensor that belongs to an NF4 weight, mapped to its base name.
    let mut part_of: HashMap<String, &str> = HashMap::new();
    for &b in &bases {
        part_of.insert(format!("{b}{NF4_STATE_SUFFIX}"), b);
        for p in PARTS {
            part_of.insert(format!("{b}.{p}"), b);
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    for t in &raw {
        if part_of.contains_key(&t.name) {
            continue;
        }
        if bases.contains(&t.name.as_str()) {
            out.push(assemble(&t.name, &by_name)?);
        } else {
            let qtype = float_qtype(t)?;
            out.push(StoredTensor { name: t.name.clone(), qtype, shape: t.shape.clone(), data: t.data.clone(), nf4: None });
        }
    }
    // A quant state whose packed weight is missing.
    if let Some(b) = bases.iter().find(|b| !by_name.contains_key(*b)) {
        let st = by_name[format!("{b}{NF4_STATE_SUFFIX}").as_str()];
        return Err(missing(st, b, "the packed weight itself"));
    }
    Ok((out, !bases.is_empty()))
}

fn missing(near: &RawTensor, tensor: &str, what: &str) -> Error {
    Error::MissingTensor {
        path: near.path.clone(),
        tensor: tensor.to_string(),
        hint: format!(" ({what} of a bitsandbytes 4-bit weight; the checkpoint is incomplete)"),
    }
}

fn f32_vec(t: &RawTensor) -> Vec<f32> {
    t.data.as_slice().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Builds the NF4 tensor `base` from its parts, checking every size and setting.
fn assemble(base: &str, by_name: &HashMap<&str, &RawTensor>) -> Result<StoredTensor> {
    let packed = by_name[base];
    let get = |suffix: &str| -> Result<&RawTensor> {
        let name = format!("{base}.{suffix}");
        by_name.get(name.as_str()).copied().ok_or_else(|| missing(packed, &name, suffix))
    };
    let state_t = get(&NF4_STATE_SUFFIX[1..])?;
    let bad = |msg: String| Error::Shape { path: packed.path.clone(), tensor: base.to_string(), msg };
    if state_t.dtype != Dtype::U8 {
        return Err(bad(format!("quant_state must be U8 bytes of JSON, found {:?}", state_t.dtype)));
    }
    let st: QuantStateJson = serde_json::from_slice(state_t.data.as_slice()).map_err(|e| Error::Json {
        path: state_t.path.clone(),
        msg: format!("tensor '{}': bad bitsandbytes quant_state JSON: {e}", state_t.name),
    })?;
    let unsupported = |what: String| Error::UnsupportedType {
        path: packed.path.clone(),
        tensor: base.to_string(),
        type_name: what,
        supported: "bitsandbytes NF4, blocksize 64, double quant with nested blocksize 256 (float32)".into(),
    };
    if st.quant_type != "nf4" {
        return Err(unsupported(format!("bitsandbytes quant_type {}", st.quant_type)));
    }
    if st.blocksize != NF4_BLOCK {
        return Err(unsupported(format!("NF4 blocksize {}", st.blocksize)));
    }
    let (Some(nbs), Some(offset)) = (st.nested_blocksize, st.nested_offset) else {
        return Err(unsupported("NF4 without double quant (bnb_4bit_use_double_quant=False)".into()));
    };
    if nbs != NF4_NESTED_BLOCK {
        return Err(unsupported(format!("NF4 nested blocksize {nbs}")));
    }
    if st.nested_dtype.as_deref().is_some_and(|d| d != "float32") {
        return Err(unsupported(format!("NF4 nested dtype {:?}", st.nested_dtype)));
    }
    if !["float16", "bfloat16", "float32"].contains(&st.dtype.as_str()) {
        return Err(unsupported(format!("NF4 of original dtype {}", st.dtype)));
    }
    let absmax = get("absmax")?;
    let quant_map = get("quant_map")?;
    let nested_absmax = get("nested_absmax")?;
    let nested_map = get("nested_quant_map")?;
    let numel: usize = st.shape.iter().product();
    let nblocks = numel.div_ceil(NF4_BLOCK);
    let checks: [(&RawTensor, Dtype, usize); 5] = [
        (packed, Dtype::U8, numel.div_ceil(2)),
        (absmax, Dtype::U8, nblocks),
        (quant_map, Dtype::F32, 16),
        (nested_absmax, Dtype::F32, nblocks.div_ceil(NF4_NESTED_BLOCK)),
        (nested_map, Dtype::F32, 256),
    ];
    for (t, dtype, n) in checks {
        let got: usize = t.shape.iter().product();
        if t.dtype != dtype || got != n {
            return Err(Error::Shape {
                path: t.path.clone(),
                tensor: t.name.clone(),
                msg: format!(
                    "expected {n} values of {dtype:?} for an NF4 weight of shape {:?}, found {got} of {:?}",
                    st.shape, t.dtype
                ),
            });
        }
    }
    let code: [f32; 16] = f32_vec(quant_map).try_into().expect("length checked");
    let nested_code: [f32; 256] = f32_vec(nested_map).try_into().expect("length checked");
    Ok(StoredTensor {
        name: base.to_string(),
        qtype: QType::NF4,
        shape: st.shape.clone(),
        data: packed.data.clone(),
        nf4: Some(Nf4Stats {
            absmax_q: absmax.data.clone(),
            nested_absmax: f32_vec(nested_absmax),
            nested_code: Box::new(nested_code),
            code: Box::new(code),
            // bnb reads it back with torch.tensor(float(x)): an f32 rounding of the JSON number.
            offset: offset as f32,
        }),
    })
}
