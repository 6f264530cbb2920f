//! Text generation on the quantised base with the adapter unmerged: a KV cache, greedy or sampled
//! (temperature, top-k, top-p) decoding, for Llama and Falcon. Tokenisation stays with the caller
//! (the CLI).
//!
//! The base linears are the model's own frozen [`QLinear`](crate::lora::QLinear)s (fused
//! dequantising matmul); the adapter adds `scale · (x · Aᵀ) · Bᵀ` beside each, so nothing is merged.
//! Falcon decodes through its training layer ([`Falcon::layer_cached`]) with the adapter set in its
//! LoRA linears.
use crate::export::{Adapter, Arch};
use crate::models::llama::PROJECTIONS;
use crate::models::{Decoder, Falcon, Llama, LlamaConfig, LlamaOptions};
use crate::nn;
use crate::store::{SourceFormat, StoredTensor, WeightStore};
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use std::sync::Arc;

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
    inner: Inner,
}

enum Inner {
    Llama(Box<LlamaGen>),
    Falcon(Box<Falcon>),
}

/// Llama's decoder: the base linears of a [`Llama`] with the adapter's factors beside them.
struct LlamaGen {
    model: Llama,
    cfg: LlamaConfig,
    embed: Arc<StoredTensor>,
    attn_norm: Vec<Tensor>,
    mlp_norm: Vec<Tensor>,
    norm: Tensor,
    /// Per layer, per projection (PROJECTIONS order): `(Aᵀ · scale (in, r), Bᵀ (r, out))`.
    lora: Vec<Vec<Option<(Tensor, Tensor)>>>,
    /// Q4_0/Q8_0 base products with 8-bit activations ([`crate::quant::dot8`]).
    int8: bool,
}

impl Generator {
    /// Loads the base (weights stay as stored: quantised views) and the adapter's factors.
    pub fn new(store: &WeightStore, adapter: Option<&Adapter>) -> Result<Generator> {
        Self::with_options(store, adapter, LlamaOptions::default())
    }

    /// [`Self::new`] with load options (e.g. `quant` to quantise a float base at load); `lora` is
    /// ignored: the adapter stays beside the frozen base.
    pub fn with_options(
        store: &WeightStore,
        adapter: Option<&Adapter>,
        opts: LlamaOptions,
    ) -> Result<Generator> {
        let arch = if crate::models::plan::is_falcon(store) {
            Arch::Falcon
        } else {
            Arch::Llama
        };
        if let Some(a) = adapter.filter(|a| a.base.arch() != arch) {
            return Err(Error::Invalid(format!(
                "{}: the adapter was read for a {} base; {} is a {}",
                a.path.display(),
                a.base.arch().name(),
                store.path.display(),
                arch.name()
            )));
        }
        let inner = match arch {
            Arch::Llama => Inner::Llama(Box::new(LlamaGen::new(store, adapter, opts)?)),
            Arch::Falcon => {
                let model = Falcon::load(
                    store,
                    LlamaOptions {
                        lora: adapter.map(Adapter::spec),
                        dtype: DType::F32,
                        ..opts
                    },
                )?;
                if let Some(a) = adapter {
                    a.apply(&model)?;
                }
                Inner::Falcon(Box::new(model))
            }
        };
        Ok(Generator { inner })
    }

    /// Computes Q4_0/Q8_0/Q4_K base products with activations rounded to 8 bits (Q8_0 blocks), as
    /// llama.cpp does: several times faster at one token a step, logits within about 1e-2 of the
    /// exact f32 product. Off by default (tests compare exact logits); Llama bases only for now
    /// (a Falcon decodes through its training layers, exactly).
    pub fn set_int8_activations(&mut self, on: bool) {
        if let Inner::Llama(g) = &mut self.inner {
            g.int8 = on;
        }
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys/values to `cache`, and
    /// returns the logits `(T, V)` f32 of every new position.
    pub fn step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::Invalid("generate: no tokens to run".into()));
        }
        let out = match &self.inner {
            Inner::Llama(g) => g.step(tokens, cache)?,
            Inner::Falcon(m) => falcon_step(m, tokens, cache)?,
        };
        cache.len += tokens.len();
        Ok(out)
    }
}

/// One Falcon decode step: the layers of the training forward, each with its KV cache slot.
fn falcon_step(m: &Falcon, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
    let (t, pos) = (tokens.len(), cache.len);
    let mut x = m.embed(tokens, 1, t)?;
    let ctx = m.decode_ctx(pos, t)?;
    let n = m.num_layers();
    if cache.kv.len() != n {
        cache.kv = vec![None; n];
    }
    let mut run = || -> candle_core::Result<Tensor> {
        for (li, slot) in cache.kv.iter_mut().enumerate() {
            x = m.layer_cached(li, &x, &ctx, slot)?;
        }
        m.lm_head()
            .forward(&m.final_norm(&x)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)
    };
    run().map_err(cerr("forward"))
}

impl LlamaGen {
    fn new(store: &WeightStore, adapter: Option<&Adapter>, opts: LlamaOptions) -> Result<Self> {
        let model = Llama::load(
            store,
            LlamaOptions {
                lora: None,
                dtype: DType::F32,
                ..opts
            },
        )?;
        let cfg = model.config().clone();
        let gguf = store.format == SourceFormat::Gguf;
        let get = |n: &str| {
            store.get(n).ok_or_else(|| Error::MissingTensor {
                path: store.path.clone(),
                tensor: n.to_string(),
                hint: String::new(),
            })
        };
        let vec = |n: &str| -> Result<Tensor> {
            let t = get(n)?;
            let c = t.numel();
            let mut w = vec![0f32; c];
            t.matrix().dequant_tile(0, 1, 0, c, &mut w);
            Tensor::from_vec(w, c, &Device::Cpu).map_err(cerr("norm"))
        };
        let (embd, norm) = if gguf {
            ("token_embd.weight", "output_norm.weight")
        } else {
            ("model.embed_tokens.weight", "model.norm.weight")
        };
        let embed = Arc::new(get(embd)?.clone());
        let (mut attn_norm, mut mlp_norm) = (Vec::new(), Vec::new());
        for i in 0..cfg.num_layers {
            if gguf {
                attn_norm.push(vec(&format!("blk.{i}.attn_norm.weight"))?);
                mlp_norm.push(vec(&format!("blk.{i}.ffn_norm.weight"))?);
            } else {
                attn_norm.push(vec(&format!("model.layers.{i}.input_layernorm.weight"))?);
                mlp_norm.push(vec(&format!(
                    "model.layers.{i}.post_attention_layernorm.weight"
                ))?);
            }
        }
        let mut lora = vec![vec![None; PROJECTIONS.len()]; cfg.num_layers];
        if let Some(ad) = adapter {
            for m in &ad.modules {
                let pi = PROJECTIONS
                    .iter()
                    .position(|p| p.0 == m.proj)
                    .expect("adapter projections are Llama's");
                let r = ad.r;
                // at: (in, r) = Aᵀ · scale; bt: (r, out) = Bᵀ
                let at = Tensor::from_slice(&m.a, (r, m.in_features), &Device::Cpu)
                    .and_then(|a| a.t()?.affine(ad.scale, 0.0)?.contiguous())
                    .map_err(cerr("adapter"))?;
                let bt = Tensor::from_slice(&m.b, (m.out_features, r), &Device::Cpu)
                    .and_then(|b| b.t()?.contiguous())
                    .map_err(cerr("adapter"))?;
                if let Some(l) = lora.get_mut(m.layer) {
                    l[pi] = Some((at, bt));
                }
            }
        }
        Ok(LlamaGen {
            model,
            cfg,
            embed,
            attn_norm,
            mlp_norm,
            norm: vec(norm)?,
            lora,
            int8: false,
        })
    }

    /// `x (1, T, in) · Wᵀ` of a frozen linear: with 8-bit activations where enabled and the
    /// weight's type has that path, else the exact f32 product.
    fn base(&self, lin: &crate::lora::QLinear, x: &Tensor) -> candle_core::Result<Tensor> {
        let st = lin.weight();
        let w = st.matrix();
        if !self.int8 || lin.bias().is_some() || !crate::quant::dot8::supported(&w) {
            return lin.forward(x);
        }
        let (b, t, k) = x.dims3()?;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; b * t * w.rows];
        crate::quant::dot8::gemv_q8(&xs, b * t, &w, &mut y);
        debug_assert_eq!(k, w.cols);
        Tensor::from_vec(y, (b, t, w.rows), x.device())
    }

    fn proj(&self, li: usize, pi: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let base = self
            .model
            .base_linear(li, PROJECTIONS[pi].0)
            .expect("every layer has every projection");
        let y = self.base(base, x)?;
        match &self.lora[li][pi] {
            None => Ok(y),
            // x (1, T, in) · Aᵀs (in, r) · Bᵀ (r, out)
            Some((at, bt)) => y + x.broadcast_matmul(at)?.broadcast_matmul(bt)?,
        }
    }

    fn step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.cfg;
        let (t, pos) = (tokens.len(), cache.len);
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let mut xs = vec![0f32; t * c.hidden_size];
        let m = self.embed.matrix();
        for (n, &id) in tokens.iter().enumerate() {
            if id as usize >= c.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            m.dequant_tile(
                id as usize,
                1,
                0,
                c.hidden_size,
                &mut xs[n * c.hidden_size..(n + 1) * c.hidden_size],
            );
        }
        if cache.kv.len() != c.num_layers {
            cache.kv = vec![None; c.num_layers];
        }
        let run = || -> candle_core::Result<Tensor> {
            let dev = Device::Cpu;
            // x: (1, T, C)
            let mut x = Tensor::from_vec(xs, (1, t, c.hidden_size), &dev)?;
            let (cos, sin) = nn::rope_tables(pos + t, hd, c.rope_theta, DType::F32)?;
            let (cos, sin) = (cos.narrow(0, pos, t)?, sin.narrow(0, pos, t)?);
            // mask: (T, S) additive, query i (position pos+i) sees keys 0..=pos+i
            let s = pos + t;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..s).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, s), &dev)?;
            let heads =
                |y: Tensor, n: usize| y.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous();
            for li in 0..c.num_layers {
                let xn = nn::rms_norm(&x, &self.attn_norm[li], c.rms_norm_eps)?;
                let q = nn::rope(&heads(self.proj(li, 0, &xn)?, h)?, &cos, &sin)?;
                let k = nn::rope(&heads(self.proj(li, 1, &xn)?, kvh)?, &cos, &sin)?;
                let v = heads(self.proj(li, 2, &xn)?, kvh)?;
                // k, v: (1, KVH, S, D) with the cache
                let (k, v) = match cache.kv[li].take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                cache.kv[li] = Some((k.clone(), v.clone()));
                // GQA: (1, KVH, S, D) -> (1, H, S, D)
                let rep = h / kvh;
                let expand = |z: &Tensor| -> candle_core::Result<Tensor> {
                    if rep == 1 {
                        return Ok(z.clone());
                    }
                    z.unsqueeze(2)?
                        .expand((1, kvh, rep, s, hd))?
                        .reshape((1, h, s, hd))
                };
                let (k, v) = (expand(&k)?, expand(&v)?);
                // att: (1, H, T, S)
                let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                // a: (1, H, T, D) -> (1, T, H*D)
                let a = att
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((1, t, h * hd))?;
                x = (x + self.proj(li, 3, &a)?)?;
                let xn = nn::rms_norm(&x, &self.mlp_norm[li], c.rms_norm_eps)?;
                let g = nn::silu(&self.proj(li, 4, &xn)?)?;
                let u = self.proj(li, 5, &xn)?;
                x = (x + self.proj(li, 6, &(g * u)?)?)?;
            }
            let x = nn::rms_norm(&x, &self.norm, c.rms_norm_eps)?;
            self.base(self.model.lm_head(), &x)?
                .squeeze(0)?
                .to_dtype(DType::F32)
        };
        run().map_err(cerr("forward"))
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
