//! `qtune quantize`: writes a GGUF of a model (a GGUF, or a Hugging Face Llama directory) with its
//! matrices quantised to one type, streaming one tensor at a time, a few rows at a time.
//!
//! Which tensors get the target type: 2-D weights whose row length is a whole number of its blocks.
//! 1-D tensors (norms, biases) are written F32, as llama.cpp's converter does. For Q4_K/Q6_K, matrices
//! whose rows are not a multiple of 256 fall back to Q8_0 (llama.cpp would pick Q5_0, which we do not
//! write); any row length that is not a multiple of 32 stays F32. Each fallback is reported.
//!
//! From a Hugging Face `LlamaForCausalLM`, names and metadata follow llama.cpp's
//! `convert_hf_to_gguf.py`, including its row permutation of `q_proj` / `k_proj` (rotary pairs
//! interleaved per head), and a byte-level BPE `tokenizer.json` becomes `tokenizer.ggml.*`. From a
//! Hugging Face `FalconForCausalLM` likewise, with its fused qkv rows regrouped as llama.cpp does.
use crate::error::{Error, Result};
use crate::format::gguf::{self, GgufWriter, TensorPlan, Value};
use crate::quant::{dispatch, QType};
use crate::store::{SourceFormat, StoredTensor, WeightStore};
use half::{bf16, f16};
use std::path::{Path, PathBuf};

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
    let (mut metadata, jobs) = match src.format {
        SourceFormat::Gguf => (
            src.gguf_metadata.clone(),
            gguf_jobs(src, qtype, &mut fallbacks),
        ),
        _ if crate::models::plan::is_falcon(src) => hf_falcon(src, qtype, &mut fallbacks)?,
        _ => hf_llama(src, qtype, &mut fallbacks)?,
    };
    set_key(&mut metadata, "general.file_type", Value::U32(ftype));
    set_key(&mut metadata, "general.quantization_version", Value::U32(2));

    let plan: Vec<TensorPlan> = jobs
        .iter()
        .map(|j| TensorPlan {
            name: j.name.clone(),
            qtype: j.to,
            shape: j.src.shape.clone(),
        })
        .collect();
    let mut w = GgufWriter::create(out, &metadata, plan)?;
    let mut tensors = Vec::with_capacity(jobs.len());
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
    let params = jobs.iter().map(|j| j.src.numel() as u64).sum();
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

/// Reads an integer from config.json.
fn cfg_u64(cfg: &serde_json::Value, key: &str) -> Option<u64> {
    cfg.get(key).and_then(|v| v.as_u64())
}

/// The directory of a Hugging Face store (its path, or the folder of a single file).
fn model_dir(src: &WeightStore) -> PathBuf {
    if src.path.is_dir() {
        src.path.clone()
    } else {
        src.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// GGUF name of a Hugging Face Llama tensor (`None`: not written, e.g. rotary caches).
fn llama_name(hf: &str) -> Option<Option<String>> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(Some(n.to_string()));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if part == "self_attn.rotary_emb.inv_freq" {
        return Some(None);
    }
    let (stem, suffix) = part.rsplit_once('.')?;
    let g = match stem {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    Some(Some(format!("blk.{layer}.{g}.{suffix}")))
}

/// Metadata and tensor jobs for a Hugging Face `LlamaForCausalLM` store.
fn hf_llama<'a>(
    src: &'a WeightStore,
    qtype: QType,
    fallbacks: &mut Vec<String>,
) -> Result<(Metadata, Vec<Job<'a>>)> {
    let dir = model_dir(src);
    let cfg_path = dir.join("config.json");
    let Some(cfg) = src.config.as_ref() else {
        return Err(Error::Json {
            path: cfg_path,
            msg: "config.json is missing: it is needed to convert a Hugging Face model".into(),
        });
    };
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if arch != "LlamaForCausalLM" && !(arch.is_empty() && model_type == "llama") {
        return Err(Error::Invalid(format!(
            "{}: architecture '{}' is not supported by `qtune quantize` from Hugging Face (LlamaForCausalLM only); \
             convert it with llama.cpp's convert_hf_to_gguf.py and quantise the GGUF",
            cfg_path.display(),
            if arch.is_empty() { model_type } else { arch }
        )));
    }
    let need = |k: &str| {
        cfg_u64(cfg, k).ok_or_else(|| Error::Json {
            path: cfg_path.clone(),
            msg: format!("config.json lacks integer '{k}'"),
        })
    };
    let hidden = need("hidden_size")?;
    let n_layer = need("num_hidden_layers")?;
    let n_head = need("num_attention_heads")?;
    let n_kv = cfg_u64(cfg, "num_key_value_heads").unwrap_or(n_head);
    let ffn = need("intermediate_size")?;
    let vocab = need("vocab_size")?;
    let ctx = cfg_u64(cfg, "max_position_embeddings").unwrap_or(2048);
    let head_dim = cfg_u64(cfg, "head_dim").unwrap_or(hidden / n_head.max(1));
    let eps = cfg
        .get("rms_norm_eps")
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-6);
    let theta = cfg
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0);
    if n_head == 0 || n_kv == 0 || n_head % n_kv != 0 {
        return Err(Error::Json {
            path: cfg_path,
            msg: format!("bad head counts: {n_head} heads, {n_kv} KV heads"),
        });
    }
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());

    let u32v = |v: u64| Value::U32(v as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".to_string(), Value::String(name)),
        ("llama.vocab_size".to_string(), u32v(vocab)),
        ("llama.context_length".to_string(), u32v(ctx)),
        ("llama.embedding_length".to_string(), u32v(hidden)),
        ("llama.block_count".to_string(), u32v(n_layer)),
        ("llama.feed_forward_length".to_string(), u32v(ffn)),
        ("llama.rope.dimension_count".to_string(), u32v(head_dim)),
        ("llama.attention.head_count".to_string(), u32v(n_head)),
        ("llama.attention.head_count_kv".to_string(), u32v(n_kv)),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(eps as f32),
        ),
        ("llama.rope.freq_base".to_string(), Value::F32(theta as f32)),
    ];
    meta.extend(bpe_tokenizer(&dir, cfg, vocab as usize)?);

    let mut jobs = Vec::with_capacity(src.tensors.len());
    for t in &src.tensors {
        let Some(mapped) = llama_name(&t.name) else {
            return Err(Error::Invalid(format!(
                "{}: tensor '{}' has no GGUF name in llama.cpp's LlamaForCausalLM mapping",
                src.path.display(),
                t.name
            )));
        };
        let Some(gname) = mapped else { continue };
        // The converter permutes weights and biases of q_proj / k_proj alike.
        let heads = if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") {
            Some(n_head as usize)
        } else if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") {
            Some(n_kv as usize)
        } else {
            None
        };
        if let Some(h) = heads {
            if t.shape.is_empty() || t.shape.len() > 2 || t.shape[0] % (2 * h) != 0 {
                return Err(Error::Shape {
                    path: src.path.clone(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "shape {:?} cannot be split into {h} heads of rotary pairs",
                        t.shape
                    ),
                });
            }
        }
        let (to, why) = choose_type(&gname, &t.shape, qtype);
        fallbacks.extend(why);
        jobs.push(Job {
            src: t,
            name: gname,
            to,
            permute_heads: heads,
            qkv_groups: None,
        });
    }
    Ok((meta, jobs))
}

/// The Hugging Face row that row `r` of llama.cpp's Falcon qkv (`[all q, all k, all v]`) comes
/// from: HF groups rows per KV head as `[q x H/KV, k, v]`.
fn falcon_hf_row(r: usize, heads: usize, kv: usize, hd: usize) -> usize {
    let g = heads / kv;
    let (head, i) = (r / hd, r % hd);
    if head < heads {
        ((head / g) * (g + 2) + head % g) * hd + i
    } else if head < heads + kv {
        ((head - heads) * (g + 2) + g) * hd + i
    } else {
        ((head - heads - kv) * (g + 2) + g + 1) * hd + i
    }
}

/// GGUF name of a Hugging Face Falcon tensor, as llama.cpp's tensor map names it (`ln_mlp` is its
/// `attn_norm` and `ln_attn` its `attn_norm_2`).
fn falcon_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "transformer.word_embeddings.weight" => Some("token_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("transformer.h.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" | "ln_mlp" => "attn_norm",
        "ln_attn" => "attn_norm_2",
        "self_attention.query_key_value" => "attn_qkv",
        "self_attention.dense" => "attn_output",
        "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Metadata and tensor jobs for a Hugging Face `FalconForCausalLM` store, as llama.cpp's converter
/// writes them, except `falcon.feed_forward_length`, which is the real MLP size (the converter
/// writes 4 x hidden whatever `ffn_hidden_size` says) and the KV head count, which is the one
/// transformers uses (1 for multi-query, where small configs save `num_kv_heads` = heads).
fn hf_falcon<'a>(
    src: &'a WeightStore,
    qtype: QType,
    fallbacks: &mut Vec<String>,
) -> Result<(Metadata, Vec<Job<'a>>)> {
    let dir = model_dir(src);
    let c = crate::models::FalconConfig::from_store(src)?;
    if !c.parallel_attn {
        return Err(Error::Invalid(format!(
            "{}: a Falcon with parallel_attn false has no llama.cpp graph; it cannot be written as GGUF",
            dir.display()
        )));
    }
    let cfg = src.config.as_ref().expect("from_store read config.json");
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("falcon".into()),
        ),
        ("general.name".to_string(), Value::String(name)),
        ("falcon.context_length".to_string(), u32v(2048)),
        (
            "falcon.tensor_data_layout".to_string(),
            Value::String("jploski".into()),
        ),
        ("falcon.embedding_length".to_string(), u32v(c.hidden_size)),
        (
            "falcon.feed_forward_length".to_string(),
            u32v(c.ffn_hidden_size),
        ),
        ("falcon.block_count".to_string(), u32v(c.num_layers)),
        ("falcon.attention.head_count".to_string(), u32v(c.num_heads)),
        (
            "falcon.attention.head_count_kv".to_string(),
            u32v(c.num_kv_heads),
        ),
        (
            "falcon.attention.layer_norm_epsilon".to_string(),
            Value::F32(c.layer_norm_eps as f32),
        ),
    ];
    meta.extend(bpe_tokenizer(&dir, cfg, c.vocab_size)?);
    let mut jobs = Vec::with_capacity(src.tensors.len());
    for t in &src.tensors {
        let Some(gname) = falcon_name(&t.name) else {
            return Err(Error::Invalid(format!(
                "{}: tensor '{}' has no GGUF name in llama.cpp's Falcon mapping",
                src.path.display(),
                t.name
            )));
        };
        let groups =
            gname
                .contains(".attn_qkv.")
                .then_some((c.num_heads, c.num_kv_heads, c.head_dim));
        if groups.is_some() && t.shape.first() != Some(&c.qkv_rows()) {
            return Err(Error::Shape {
                path: src.path.clone(),
                tensor: t.name.clone(),
                msg: format!("{:?} is not a fused qkv of {} rows", t.shape, c.qkv_rows()),
            });
        }
        let (to, why) = choose_type(&gname, &t.shape, qtype);
        fallbacks.extend(why);
        jobs.push(Job {
            src: t,
            name: gname,
            to,
            permute_heads: None,
            qkv_groups: groups,
        });
    }
    Ok((meta, jobs))
}

/// `tokenizer.ggml.*` keys for a byte-level BPE `tokenizer.json` (llama.cpp model "gpt2").
fn bpe_tokenizer(
    dir: &Path,
    cfg: &serde_json::Value,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        let what = if dir.join("tokenizer.model").exists() {
            "a SentencePiece tokenizer.model (no tokenizer.json)"
        } else {
            "no tokenizer.json"
        };
        return Err(Error::Invalid(format!(
            "{}: {what}: qtune writes only byte-level BPE tokenizers (tokenizer.json, model type BPE) into GGUF",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tj: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let model = &tj["model"];
    let kind = model
        .get("type")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    if kind != "BPE" {
        return Err(Error::Invalid(format!(
            "{}: tokenizer model type '{kind}' is not supported; qtune writes only byte-level BPE tokenizers",
            path.display()
        )));
    }
    // SentencePiece-converted BPE (Llama 1/2) needs llama.cpp's "llama" tokenizer with scores.
    if model.get("byte_fallback").and_then(|v| v.as_bool()) == Some(true) {
        return Err(Error::Invalid(format!(
            "{}: SentencePiece-style BPE tokenizer (byte_fallback) is not supported; qtune writes only \
             byte-level (GPT-2 style) BPE tokenizers",
            path.display()
        )));
    }
    let Some(vocab) = model.get("vocab").and_then(|v| v.as_object()) else {
        return Err(Error::Json {
            path,
            msg: "model.vocab is missing".into(),
        });
    };
    let mut added: Vec<(usize, String, bool)> = Vec::new();
    if let Some(a) = tj.get("added_tokens").and_then(|v| v.as_array()) {
        for t in a {
            if let (Some(id), Some(c)) = (
                t.get("id").and_then(|v| v.as_u64()),
                t.get("content").and_then(|v| v.as_str()),
            ) {
                added.push((
                    id as usize,
                    c.to_string(),
                    t.get("special").and_then(|v| v.as_bool()).unwrap_or(false),
                ));
            }
        }
    }
    let max_id = vocab
        .values()
        .filter_map(|v| v.as_u64())
        .map(|v| v as usize)
        .chain(added.iter().map(|a| a.0))
        .max();
    let n = vocab_size.max(max_id.map_or(0, |m| m + 1));
    if n > vocab_size {
        return Err(Error::Json {
            path,
            msg: format!(
                "tokenizer has ids up to {} but config.json vocab_size is {vocab_size}",
                n - 1
            ),
        });
    }
    // Ids the tokenizer does not define are padding placeholders, as llama.cpp's converter writes.
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER_DEFINED: i32 = 4;
    const UNUSED: i32 = 5;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(tok.clone());
            types[id as usize] = NORMAL;
        }
    }
    for (id, c, special) in added {
        tokens[id] = Some(c);
        types[id] = if special { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    // Merges: "a b" strings (tokenizers < 0.20.4) or ["a", "b"] pairs (newer).
    let mut merges = Vec::new();
    for m in model
        .get("merges")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let s = match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(p) if p.len() == 2 => {
                format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )
            }
            _ => {
                return Err(Error::Json {
                    path,
                    msg: format!("unreadable merge {m}"),
                })
            }
        };
        merges.push(Value::String(s));
    }
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("gpt-2".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(8, tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(5, types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(8, merges)),
    ];
    for (k, g) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(id) = cfg_u64(cfg, k) {
            out.push((g.to_string(), Value::U32(id as u32)));
        }
    }
    Ok(out)
}

/// Convenience for callers holding a path: loads a GGUF and quantises it.
pub fn quantize_gguf_file(src: &Path, qtype: QType, out: &Path) -> Result<QuantizeReport> {
    let store = gguf::load(src)?;
    quantize_to_gguf(&store, qtype, out)
}

#[cfg(test)]
mod tests {
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
