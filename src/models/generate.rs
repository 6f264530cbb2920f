//! Text generation on the quantised base with the adapter unmerged: a KV cache, greedy or sampled
//! (temperature, top-k, top-p) decoding, for every architecture. Tokenisation stays with the caller
//! (the CLI).
//!
//! The model is the shared decoder ([`Transformer`]) with the adapter set in its LoRA linears, so
//! nothing is merged: the base linears are the frozen [`QLinear`](crate::lora::QLinear)s (fused
//! dequantising matmul), and each layer runs the training forward with its KV-cache slot
//! ([`Transformer::decode_step`]).
use crate::export::{Adapter, BaseConfig};
use crate::models::{LlamaOptions, Transformer};
use crate::store::WeightStore;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};

fn cerr(what: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| Error::Invalid(format!("generate: {what}: {e}"))
}

/// Keys and values of every layer so far: `(1, KVH, S, D)` each.
#[derive(Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A model ready to decode: frozen base, optional unmerged adapter.
pub struct Generator {
    model: Transformer,
}

impl Generator {
    /// Loads the base (weights stay as stored: quantised views) and the adapter's factors.
    pub fn new(store: &WeightStore, adapter: Option<&Adapter>) -> Result<Generator> {
        Self::with_options(store, adapter, LlamaOptions::default())
    }

    /// [`Self::new`] with load options (e.g. `quant` to quantise a float base at load); `lora` is
    /// replaced by the adapter's (f32, beside the frozen base).
    pub fn with_options(
        store: &WeightStore,
        adapter: Option<&Adapter>,
        opts: LlamaOptions,
    ) -> Result<Generator> {
        let arch = BaseConfig::from_store(store)?.arch();
        if let Some(a) = adapter.filter(|a| a.base.arch() != arch) {
            return Err(Error::Invalid(format!(
                "{}: the adapter was read for a {} base; {} is a {}",
                a.path.display(),
                a.base.arch().name(),
                store.path.display(),
                arch.name()
            )));
        }
        let opts = LlamaOptions {
            lora: adapter.map(Adapter::spec),
            dtype: DType::F32,
            ..opts
        };
        let model = crate::models::open(store, opts)?;
        if let Some(a) = adapter {
            a.apply(&model)?;
        }
        Ok(Generator { model })
    }

    /// [`Self::with_options`] with the prompt-learning adapter in `dir` (PEFT's or ours), run as
    /// PEFT runs a loaded one: its virtual tokens before the prompt, or its prefix in every
    /// layer's KV cache.
    pub fn with_prompt(
        store: &WeightStore,
        dir: &std::path::Path,
        opts: LlamaOptions,
    ) -> Result<Generator> {
        let l = crate::lora::prompt::load(dir)?;
        let opts = LlamaOptions {
            lora: None,
            dtype: DType::F32,
            ..opts
        };
        let mut model = crate::models::open(store, opts)?;
        model.install_prompt(&l.inference_spec())?;
        crate::lora::prompt::set_vars(&model.lora_params(), dir, &l)?;
        Ok(Generator { model })
    }

    /// Computes Q4_0/Q8_0/Q4_K base products with activations rounded to 8 bits (Q8_0 blocks), as
    /// llama.cpp does: several times faster at one token a step, logits within about 1e-2 of the
    /// exact f32 product. Off by default (tests compare exact logits); Llama bases only for now
    /// (Falcon's decode keeps exact products until it is checked against llama.cpp).
    pub fn set_int8_activations(&mut self, on: bool) {
        if self.model.spec().arch == "llama" {
            self.model.set_int8_activations(on);
        }
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys/values to `cache`, and
    /// returns the logits `(T, V)` f32 of every new position.
    pub fn step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::Invalid("generate: no tokens to run".into()));
        }
        let out = self.model.decode_step(tokens, cache.len, &mut cache.kv)?;
        cache.len += tokens.len();
        Ok(out)
    }
}

/// Decoding settings.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0: greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks each next token: exact argmax when greedy (the first maximum, as `torch.argmax`, so
/// greedy output matches transformers), else candle-transformers' seeded [`LogitsProcessor`]
/// (temperature, then top-k and/or top-p), so one `seed` reproduces a sample.
struct Sampler {
    lp: Option<LogitsProcessor>,
}

impl Sampler {
    fn new(s: &Sampling) -> Sampler {
        if s.temperature <= 0.0 {
            return Sampler { lp: None };
        }
        let temperature = s.temperature as f64;
        let (k, p) = (s.top_k, s.top_p as f64);
        let mode = match (k > 0, p < 1.0) {
            (true, true) => CandleSampling::TopKThenTopP { k, p, temperature },
            (true, false) => CandleSampling::TopK { k, temperature },
            (false, true) => CandleSampling::TopP { p, temperature },
            (false, false) => CandleSampling::All { temperature },
        };
        Sampler {
            lp: Some(LogitsProcessor::from_sampling(s.seed, mode)),
        }
    }

    /// The next token from one row of logits.
    fn pick(&mut self, logits: &[f32]) -> Result<u32> {
        let Some(lp) = &mut self.lp else {
            return Ok(argmax(logits));
        };
        let t = Tensor::from_slice(logits, logits.len(), &Device::Cpu).map_err(cerr("sampling"))?;
        lp.sample(&t).map_err(cerr("sampling"))
    }
}

/// Index of the first largest logit.
fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
            if v > b.1 {
                (i, v)
            } else {
                b
            }
        })
        .0 as u32
}

/// What [`generate`] produced.
#[derive(Clone, Debug)]
pub struct Generated {
    /// New token ids (the EOS that stopped it included).
    pub tokens: Vec<u32>,
    /// Decode speed: new tokens after the first per second.
    pub tokens_per_s: f64,
    /// Prompt processing time in seconds.
    pub prompt_s: f64,
}

/// Generates up to `max_tokens` after `prompt`, stopping after any of `eos`; `on_token` sees each
/// new id as it comes (for streaming).
pub fn generate(
    g: &Generator,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Generated> {
    let mut cache = KvCache::default();
    let mut sampler = Sampler::new(sampling);
    let t0 = std::time::Instant::now();
    let mut out = Vec::new();
    if max_tokens == 0 {
        return Ok(Generated {
            tokens: out,
            tokens_per_s: 0.0,
            prompt_s: 0.0,
        });
    }
    let logits = g.step(prompt, &mut cache)?;
    let last = |l: &Tensor| -> Result<Vec<f32>> {
        let n = l.dim(0).map_err(cerr("logits"))?;
        l.get(n - 1)
            .and_then(|r| r.to_vec1::<f32>())
            .map_err(cerr("logits"))
    };
    let mut next = sampler.pick(&last(&logits)?)?;
    let prompt_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    loop {
        out.push(next);
        on_token(next);
        if out.len() >= max_tokens || eos.contains(&next) {
            break;
        }
        let l = g.step(&[next], &mut cache)?;
        next = sampler.pick(&last(&l)?)?;
    }
    let dt = t1.elapsed().as_secs_f64();
    Ok(Generated {
        tokens_per_s: if out.len() > 1 && dt > 0.0 {
            (out.len() - 1) as f64 / dt
        } else {
            0.0
        },
        tokens: out,
        prompt_s,
    })
}
