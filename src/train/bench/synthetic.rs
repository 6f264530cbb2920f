//! Random weights generated directly in their quantised form, tensor by tensor, as owned buffers:
//! no full-precision copy of any matrix ever exists.

use super::shapes::BENCH_QUANTS;
use crate::models::llama::PROJECTIONS;
use crate::models::{FalconConfig, LlamaConfig};
use crate::quant::{nf4, QType};
use crate::store::{Bytes, Nf4Stats, SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// A small, fast PRNG (xorshift64*): the values only need to look like weights.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Standard deviation of the generated weights (transformers' `initializer_range`).
const STD: f32 = 0.02;

/// Fills `out` with random blocks of `q` (one `block_bytes` block each), in parallel, so that
/// every element dequantises to a finite value of roughly `STD` standard deviation.
fn random_blocks(q: QType, out: &mut [u8], seed: u64) {
    let bb = q.type_size();
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    // Blocks per parallel chunk (~1 MiB) so the seed of a chunk depends only on its position.
    let per = (1 << 20) / bb;
    out.par_chunks_mut(per * bb)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut r = Rng::new(seed ^ (ci as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
            r.fill(chunk);
            for b in chunk.chunks_exact_mut(bb) {
                match q {
                    // d, then 16 bytes of nibbles: (q - 8)·d, uniform over 16 levels (std ≈ 4.6 d).
                    QType::Q4_0 => b[..2].copy_from_slice(&f16(STD / 4.6)),
                    // d, then 32 int8: uniform over 256 levels (std ≈ 74 d).
                    QType::Q8_0 => b[..2].copy_from_slice(&f16(STD / 74.0)),
                    // d, dmin, 12 bytes of 6-bit scales/mins (random), 128 bytes of nibbles:
                    // d·sc·q - dmin·m with sc, m ~ U[0, 63], q ~ U[0, 15].
                    QType::Q4_K => {
                        b[..2].copy_from_slice(&f16(STD / 150.0));
                        b[2..4].copy_from_slice(&f16(STD / 150.0 * 7.5));
                    }
                    QType::BF16 => {
                        for e in b.chunks_exact_mut(2) {
                            let x = half::bf16::from_f32(r.unit() * STD * 1.7);
                            e.copy_from_slice(&x.to_le_bytes());
                        }
                    }
                    QType::F32 => {
                        let x = r.unit() * STD * 1.7;
                        b.copy_from_slice(&x.to_le_bytes());
                    }
                    _ => unreachable!("random_blocks: {q:?} is not a bench type"),
                }
            }
        });
}

/// A random tensor of `shape` stored as `q` (NF4 with double-quantised statistics).
pub fn random_tensor(name: &str, shape: Vec<usize>, q: QType, seed: u64) -> Result<StoredTensor> {
    let numel: usize = shape.iter().product();
    let cols = *shape.last().unwrap_or(&1);
    if q == QType::NF4 {
        if !numel.is_multiple_of(nf4::NF4_BLOCK) {
            return Err(Error::Invalid(format!(
                "{name}: {numel} weights are not whole NF4 blocks of {}",
                nf4::NF4_BLOCK
            )));
        }
        let blocks = numel / nf4::NF4_BLOCK;
        let mut packed = vec![0u8; numel / 2];
        let mut absmax_q = vec![0u8; blocks];
        packed
            .par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, c)| {
                Rng::new(seed ^ (i as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).fill(c)
            });
        Rng::new(!seed).fill(&mut absmax_q);
        // absmax = code8[q]·nested + offset, code8 in [-1, 1]: absmax in [0.02, 0.04]; NF4 codes
        // in [-1, 1] then give values of roughly STD deviation.
        let nested = vec![0.01f32; blocks.div_ceil(nf4::NF4_NESTED_BLOCK)];
        return Ok(StoredTensor {
            name: name.into(),
            qtype: QType::NF4,
            shape,
            data: Bytes::from_vec(packed),
            nf4: Some(Nf4Stats {
                absmax_q: Bytes::from_vec(absmax_q),
                nested_absmax: nested,
                nested_code: Box::new(nf4::dynamic_map()),
                code: Box::new(nf4::NF4_CODE),
                offset: 0.03,
            }),
        });
    }
    let row = q.bytes_for(cols).ok_or_else(|| {
        Error::Invalid(format!(
            "{name}: rows of {cols} are not whole {} blocks of {}; pick another --quant",
            q.name(),
            q.block_size()
        ))
    })?;
    let mut data = vec![0u8; row * (numel / cols.max(1))];
    random_blocks(q, &mut data, seed);
    Ok(StoredTensor {
        name: name.into(),
        qtype: q,
        shape,
        data: Bytes::from_vec(data),
        nf4: None,
    })
}

/// A Llama-family model (Llama, Mistral, Qwen2 with its zero q/k/v biases) of the shape in
/// `config` (transformers names) with random weights: decoder linears in
/// `quant`; the embedding and lm_head in `quant` too, or BF16 for NF4 (as bitsandbytes leaves
/// them); norms f32 ones. Generated tensor by tensor, never through full precision.
pub fn synthetic_store(config: &serde_json::Value, quant: QType, seed: u64) -> Result<WeightStore> {
    if !BENCH_QUANTS.contains(&quant) {
        return Err(Error::Invalid(format!(
            "--quant {}: bench weights are one of nf4, q4_0, q8_0, q4_k, bf16",
            quant.name()
        )));
    }
    let path = PathBuf::from("synthetic/config.json");
    if config["model_type"] == "falcon" {
        return synthetic_falcon(config, quant, seed);
    }
    let cfg = LlamaConfig::from_hf(config, &path)?;
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let outer = outer_type(quant);
    let mut tensors = Vec::with_capacity(cfg.num_layers * 9 + 3);
    let mut next = seeds(seed);
    let ones = |name: String| filled(name, c, 1.0);
    tensors.push(random_tensor(
        "model.embed_tokens.weight",
        vec![v, c],
        outer,
        next(),
    )?);
    for l in 0..cfg.num_layers {
        let pre = format!("model.layers.{l}");
        tensors.push(ones(format!("{pre}.input_layernorm.weight")));
        tensors.push(ones(format!("{pre}.post_attention_layernorm.weight")));
        for (name, group, _) in PROJECTIONS {
            let shape = match name {
                "q_proj" => vec![q, c],
                "k_proj" | "v_proj" => vec![kv, c],
                "o_proj" => vec![c, q],
                "gate_proj" | "up_proj" => vec![i, c],
                _ => vec![c, i],
            };
            let rows = shape[0];
            let n = format!("{pre}.{group}.{name}.weight");
            tensors.push(random_tensor(&n, shape, quant, next())?);
            // Qwen2's q/k/v biases (f32, as in its checkpoints after our load).
            if cfg.family.qwen2 && matches!(name, "q_proj" | "k_proj" | "v_proj") {
                tensors.push(filled(format!("{pre}.{group}.{name}.bias"), rows, 0.0));
            }
        }
    }
    tensors.push(ones("model.norm.weight".into()));
    if !cfg.tie_word_embeddings {
        tensors.push(random_tensor("lm_head.weight", vec![v, c], outer, next())?);
    }
    Ok(store_of(tensors, config))
}

/// A Falcon of `config`'s shape with Hugging Face names (fused qkv, LayerNorm weight and bias, tied
/// head), weights generated in `quant` like [`synthetic_store`]'s.
fn synthetic_falcon(config: &serde_json::Value, quant: QType, seed: u64) -> Result<WeightStore> {
    let cfg = FalconConfig::from_hf(config, Path::new("synthetic/config.json"))?;
    let (v, c, f) = (cfg.vocab_size, cfg.hidden_size, cfg.ffn_hidden_size);
    let qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
    let outer = outer_type(quant);
    let mut next = seeds(seed);
    let vec1 = |name: String, x: f32| filled(name, c, x);
    let mut tensors = vec![random_tensor(
        "transformer.word_embeddings.weight",
        vec![v, c],
        outer,
        next(),
    )?];
    for l in 0..cfg.num_layers {
        let pre = format!("transformer.h.{l}");
        tensors.push(vec1(format!("{pre}.input_layernorm.weight"), 1.0));
        tensors.push(vec1(format!("{pre}.input_layernorm.bias"), 0.0));
        for (name, shape) in [
            ("self_attention.query_key_value", vec![qkv, c]),
            ("self_attention.dense", vec![c, c]),
            ("mlp.dense_h_to_4h", vec![f, c]),
            ("mlp.dense_4h_to_h", vec![c, f]),
        ] {
            tensors.push(random_tensor(
                &format!("{pre}.{name}.weight"),
                shape,
                quant,
                next(),
            )?);
        }
    }
    tensors.push(vec1("transformer.ln_f.weight".into(), 1.0));
    tensors.push(vec1("transformer.ln_f.bias".into(), 0.0));
    Ok(store_of(tensors, config))
}

/// The type of the embedding and lm_head: `quant`, or BF16 for NF4 (as bitsandbytes leaves them).
fn outer_type(quant: QType) -> QType {
    if quant == QType::NF4 {
        QType::BF16
    } else {
        quant
    }
}

/// One seed per tensor, in order: `seed + 1`, `seed + 2`, ...
fn seeds(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed = seed.wrapping_add(1);
        seed
    }
}

/// An f32 vector of `n` copies of `x` (norm weights and biases).
fn filled(name: String, n: usize, x: f32) -> StoredTensor {
    StoredTensor {
        name,
        qtype: QType::F32,
        shape: vec![n],
        data: Bytes::from_vec(x.to_le_bytes().repeat(n)),
        nf4: None,
    }
}

/// The synthetic store holding `tensors`, with `config` as its `config.json`.
fn store_of(tensors: Vec<StoredTensor>, config: &serde_json::Value) -> WeightStore {
    WeightStore {
        path: PathBuf::from("synthetic"),
        format: SourceFormat::Safetensors,
        tensors,
        gguf_metadata: Vec::new(),
        alignment: 32,
        config: Some(config.clone()),
    }
}
