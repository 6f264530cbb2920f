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
    let bases: Vec<&str> = raw
        .iter()
        .filter_map(|t| t.name.strip_suffix(NF4_STATE_SUFFIX))
        .collect();
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
        // A statistics tensor whose weight has no quant state: the checkpoint lost that tensor.
        if let Some(base) = PARTS
            .iter()
            .find_map(|p| t.name.strip_suffix(&format!(".{p}")[..]))
        {
            if by_name.get(base).is_some_and(|w| w.dtype == Dtype::U8) {
                return Err(missing(
                    t,
                    &format!("{base}{NF4_STATE_SUFFIX}"),
                    "the quant state",
                ));
            }
        }
        if bases.contains(&t.name.as_str()) {
            out.push(assemble(&t.name, &by_name)?);
        } else {
            let qtype = float_qtype(t)?;
            out.push(StoredTensor {
                name: t.name.clone(),
                qtype,
                shape: t.shape.clone(),
                data: t.data.clone(),
                nf4: None,
            });
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
    t.data
        .as_slice()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Builds the NF4 tensor `base` from its parts, checking every size and setting.
fn assemble(base: &str, by_name: &HashMap<&str, &RawTensor>) -> Result<StoredTensor> {
    let packed = by_name[base];
    let get = |suffix: &str| -> Result<&RawTensor> {
        let name = format!("{base}.{suffix}");
        by_name
            .get(name.as_str())
            .copied()
            .ok_or_else(|| missing(packed, &name, suffix))
    };
    let state_t = get(&NF4_STATE_SUFFIX[1..])?;
    let bad = |msg: String| Error::Shape {
        path: packed.path.clone(),
        tensor: base.to_string(),
        msg,
    };
    if state_t.dtype != Dtype::U8 {
        return Err(bad(format!(
            "quant_state must be U8 bytes of JSON, found {:?}",
            state_t.dtype
        )));
    }
    let st: QuantStateJson =
        serde_json::from_slice(state_t.data.as_slice()).map_err(|e| Error::Json {
            path: state_t.path.clone(),
            msg: format!(
                "tensor '{}': bad bitsandbytes quant_state JSON: {e}",
                state_t.name
            ),
        })?;
    let unsupported = |what: String| Error::UnsupportedType {
        path: packed.path.clone(),
        tensor: base.to_string(),
        type_name: what,
        supported:
            "bitsandbytes NF4, blocksize 64, double quant with nested blocksize 256 (float32)"
                .into(),
    };
    if st.quant_type != "nf4" {
        return Err(unsupported(format!(
            "bitsandbytes quant_type {}",
            st.quant_type
        )));
    }
    if st.blocksize != NF4_BLOCK {
        return Err(unsupported(format!("NF4 blocksize {}", st.blocksize)));
    }
    let (Some(nbs), Some(offset)) = (st.nested_blocksize, st.nested_offset) else {
        return Err(unsupported(
            "NF4 without double quant (bnb_4bit_use_double_quant=False)".into(),
        ));
    };
    if nbs != NF4_NESTED_BLOCK {
        return Err(unsupported(format!("NF4 nested blocksize {nbs}")));
    }
    if st.nested_dtype.as_deref().is_some_and(|d| d != "float32") {
        return Err(unsupported(format!(
            "NF4 nested dtype {:?}",
            st.nested_dtype
        )));
    }
    if !["float16", "bfloat16", "float32"].contains(&st.dtype.as_str()) {
        return Err(unsupported(format!("NF4 of original dtype {}", st.dtype)));
    }
    let absmax = get("absmax")?;
    let quant_map = get("quant_map")?;
    let nested_absmax = get("nested_absmax")?;
    let nested_map = get("nested_quant_map")?;
    let numel = st.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let numel = numel.ok_or_else(|| bad(format!("quant_state shape {:?} overflows", st.shape)))?;
    let nblocks = numel.div_ceil(NF4_BLOCK);
    let checks: [(&RawTensor, Dtype, usize); 5] = [
        (packed, Dtype::U8, numel.div_ceil(2)),
        (absmax, Dtype::U8, nblocks),
        (quant_map, Dtype::F32, 16),
        (
            nested_absmax,
            Dtype::F32,
            nblocks.div_ceil(NF4_NESTED_BLOCK),
        ),
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

/// What [`write_nf4_dir`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nf4WriteReport {
    /// Weights quantised to NF4.
    pub nf4_tensors: usize,
    /// Tensors copied in their own dtype (or as F32 when the source was block-quantised).
    pub copied_tensors: usize,
    /// Bytes of model.safetensors.
    pub file_bytes: u64,
    /// Other files copied beside it (tokenizer, generation config).
    pub extra_files: Vec<String>,
}

/// Files copied from a source directory unchanged.
const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
];

/// Bytes reserved for the `nested_offset` number in a quant-state JSON (an f64's shortest text is at
/// most 24 characters); the header is written before the offset is known, so the JSON is padded
/// with trailing spaces to a fixed length (JSON parsers, bnb's included, accept them).
const OFFSET_PLACEHOLDER: &str = "-1.2345678901234567e-308";

/// True for the weights transformers quantises: 2-D `*.weight` inside the decoder layers.
pub fn is_nf4_target(t: &StoredTensor) -> bool {
    // Llama-family `model.layers.N.*`, Falcon `transformer.h.N.*`: the Linear layers transformers
    // quantises (lm_head and embeddings stay as they are).
    (t.name.starts_with("model.layers.") || t.name.starts_with("transformer.h."))
        && t.name.ends_with(".weight")
        && t.shape.len() == 2
        && t.numel().is_multiple_of(NF4_BLOCK)
}

/// One tensor of the output file: name, dtype, shape, byte length.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    len: usize,
}

fn state_json(t: &StoredTensor, dtype: &str, offset: &str) -> String {
    let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    // Key order and spelling as bnb's `pack_dict_to_tensor(json.dumps(...))` writes them.
    format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {NF4_BLOCK}, \"dtype\": \"{dtype}\", \"shape\": [{}], \
         \"nested_blocksize\": {NF4_NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {offset}}}",
        shape.join(", ")
    )
}

/// Writes `src` as a Hugging Face bitsandbytes-4bit directory (`qtune quantize --type nf4`):
/// decoder-layer linear weights become NF4 with double quant (bnb's key names and packed quant state,
/// bit-exact with bnb's quantiser), every other tensor is copied; config.json gains
/// transformers' `quantization_config`; tokenizer files are copied. The safetensors header is
/// computed first (all sizes are known), then tensors are streamed one at a time (one tensor in
/// f32 at most), into `<out>.tmp`, renamed to `out` at the end.
pub fn write_nf4_dir(
    src: &crate::store::WeightStore,
    out: &std::path::Path,
) -> Result<Nf4WriteReport> {
    if out.exists() {
        return Err(Error::Invalid(format!(
            "{}: output already exists; remove it or pick another path",
            out.display()
        )));
    }
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let orig_dtype = src
        .config
        .as_ref()
        .and_then(|c| c.get("torch_dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("float16")
        .to_string();
    let mut report = Nf4WriteReport::default();
    let plan = plan_entries(src, &orig_dtype, &mut report);
    report.file_bytes = write_safetensors(src, &plan, &orig_dtype, &tmp.join("model.safetensors"))?;
    // config.json with transformers' quantization_config.
    if let Some(cfg) = &src.config {
        let mut cfg = cfg.clone();
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert(
                "quantization_config".into(),
                quantization_config(&orig_dtype),
            );
        }
        let p = tmp.join("config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Json {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    if src.path.is_dir() {
        for f in COPIED_FILES {
            let s = src.path.join(f);
            if s.is_file() {
                std::fs::copy(&s, tmp.join(f)).map_err(|e| Error::io(&s, e))?;
                report.extra_files.push(f.to_string());
            }
        }
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(report)
}

/// Every output tensor with its size, in write order; counts them in `report`.
fn plan_entries(
    src: &crate::store::WeightStore,
    orig_dtype: &str,
    report: &mut Nf4WriteReport,
) -> Vec<Entry> {
    let mut plan = Vec::new();
    for t in &src.tensors {
        let n = t.numel();
        if is_nf4_target(t) {
            plan.extend(nf4_entries(t, &bnb_dtype_name(t.qtype, orig_dtype)));
            report.nf4_tensors += 1;
        } else {
            let (dtype, len) = match t.qtype {
                QType::F32 => ("F32", 4 * n),
                QType::F16 => ("F16", 2 * n),
                QType::BF16 => ("BF16", 2 * n),
                _ => ("F32", 4 * n),
            };
            plan.push(Entry {
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
                len,
            });
            report.copied_tensors += 1;
        }
    }
    plan
}

/// The six tensors bnb stores for the NF4 weight `t`, in its order.
fn nf4_entries(t: &StoredTensor, dtype: &str) -> [Entry; 6] {
    let n = t.numel();
    let nb = n / NF4_BLOCK;
    let nnb = nb.div_ceil(NF4_NESTED_BLOCK);
    let state_len = state_json(t, dtype, OFFSET_PLACEHOLDER).len();
    let w = &t.name;
    let e = |name: String, dtype, shape: Vec<usize>, len| Entry {
        name,
        dtype,
        shape,
        len,
    };
    [
        e(w.clone(), "U8", vec![n / 2, 1], n / 2),
        e(format!("{w}.absmax"), "U8", vec![nb], nb),
        e(format!("{w}.nested_absmax"), "F32", vec![nnb], 4 * nnb),
        e(format!("{w}.nested_quant_map"), "F32", vec![256], 1024),
        e(format!("{w}.quant_map"), "F32", vec![16], 64),
        e(
            format!("{w}{NF4_STATE_SUFFIX}"),
            "U8",
            vec![state_len],
            state_len,
        ),
    ]
}

/// Writes the safetensors file at `path`: the header of `plan`, then `src`'s tensors streamed one
/// at a time (NF4 targets quantised). Returns the file's size in bytes.
fn write_safetensors(
    src: &crate::store::WeightStore,
    plan: &[Entry],
    orig_dtype: &str,
    path: &std::path::Path,
) -> Result<u64> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for e in plan {
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + e.len]}),
        );
        off += e.len;
    }
    let mut htext = serde_json::Value::Object(header).to_string().into_bytes();
    while !htext.len().is_multiple_of(8) {
        htext.push(b' ');
    }
    let io = |e| Error::io(path, e);
    let mut w =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(io)?);
    w.write_all(&(htext.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&htext).map_err(io)?;
    let f32_le = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    for t in &src.tensors {
        let direct = matches!(t.qtype, QType::F32 | QType::F16 | QType::BF16);
        if !is_nf4_target(t) && direct {
            w.write_all(t.data.as_slice()).map_err(io)?;
            t.data.release_pages();
            continue;
        }
        let x = tensor_f32(t);
        // Read once into `x`: its mapped pages leave our RSS (streaming, one tensor at a time).
        t.data.release_pages();
        if !is_nf4_target(t) {
            w.write_all(&f32_le(&x)).map_err(io)?;
            continue;
        }
        let q = crate::quant::nf4::quantize_nf4(&x).map_err(|e| Error::Shape {
            path: src.path.clone(),
            tensor: t.name.clone(),
            msg: e.to_string(),
        })?;
        drop(x);
        w.write_all(&q.packed).map_err(io)?;
        w.write_all(&q.absmax_q).map_err(io)?;
        w.write_all(&f32_le(&q.nested_absmax)).map_err(io)?;
        w.write_all(&f32_le(&q.nested_code[..])).map_err(io)?;
        w.write_all(&f32_le(&q.code[..])).map_err(io)?;
        let dtype = bnb_dtype_name(t.qtype, orig_dtype);
        let offset = serde_json::Number::from_f64(q.offset as f64)
            .map(|n| n.to_string())
            .ok_or_else(|| Error::Invalid(format!("tensor '{}': non-finite NF4 offset", t.name)))?;
        let mut s = state_json(t, &dtype, &offset).into_bytes();
        let want = state_json(t, &dtype, OFFSET_PLACEHOLDER).len();
        debug_assert!(s.len() <= want);
        s.resize(want, b' ');
        w.write_all(&s).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok((8 + htext.len() + off) as u64)
}

/// bnb's dtype name for a tensor stored as `q` (the model's torch_dtype for block-quantised sources).
fn bnb_dtype_name(q: QType, model_dtype: &str) -> String {
    match q {
        QType::F32 => "float32".into(),
        QType::F16 => "float16".into(),
        QType::BF16 => "bfloat16".into(),
        _ => model_dtype.to_string(),
    }
}

/// The whole tensor in f32, read a tile of rows at a time through the kernels.
fn tensor_f32(t: &StoredTensor) -> Vec<f32> {
    let m = t.matrix();
    let mut x = vec![0f32; m.rows * m.cols];
    const ROWS: usize = 64;
    for r0 in (0..m.rows).step_by(ROWS) {
        let nr = ROWS.min(m.rows - r0);
        m.dequant_tile(r0, nr, 0, m.cols, &mut x[r0 * m.cols..(r0 + nr) * m.cols]);
    }
    x
}

/// transformers' `BitsAndBytesConfig(load_in_4bit, nf4, double quant).to_dict()`.
pub fn quantization_config(compute_dtype: &str) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}
