//! The resolved settings of a `qtune train` run: defaults, overlaid by a `qtune.toml`, overlaid by
//! command-line flags. Keys are the flag names (`batch-size`; `batch_size` is accepted too).
use crate::quant::QType;
use crate::train::ScheduleKind;
use crate::{Error, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why `--objective dpo` refuses DoRA.
pub const DPO_DORA: &str = "dora with --objective dpo is not supported yet: DPO's reference \
    switches the adapter off by zeroing every LoRA B, which for DoRA leaves the trained magnitude \
    scaling the base; train DPO with --method lora";

/// What is trained over the frozen base (`method` in TOML, `--method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// LoRA: `W + s·B·A` on the target linears.
    #[default]
    Lora,
    /// DoRA: LoRA plus a trained magnitude per output row, `(m / ‖W + s·B·A‖) ⊙ (W + s·B·A)`.
    Dora,
    /// PEFT's prompt tuning: N trainable rows before every sequence.
    PromptTuning,
    /// PEFT's P-tuning: the rows are an MLP encoder's output.
    PTuning,
    /// PEFT's prefix tuning: a trainable key/value prefix in every layer.
    PrefixTuning,
}

/// Every `--method` value.
pub const METHODS: [&str; 5] = ["lora", "dora", "prompt-tuning", "p-tuning", "prefix-tuning"];

impl Method {
    /// The name the flag and the TOML key take.
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Dora => "dora",
            Method::PromptTuning => "prompt-tuning",
            Method::PTuning => "p-tuning",
            Method::PrefixTuning => "prefix-tuning",
        }
    }

    /// The prompt-learning methods (no linear adapters).
    pub fn is_prompt(self) -> bool {
        matches!(
            self,
            Method::PromptTuning | Method::PTuning | Method::PrefixTuning
        )
    }
}

/// Every setting of a training run: the flags of `qtune train` (each field's doc is its `--help`
/// text), the keys of a `--config` file and of the [`CONFIG_FILE`] saved with a run (kebab-case).
/// A field's `default_value` is its [`Default`]; a field without one is unset unless given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model: Hugging Face directory, .safetensors or .gguf, or a Hub id (org/name[@rev],
    /// org/name:QUANT for a GGUF repository) (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (JSONL: text, prompt/completion, messages or alpaca lines).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation data (JSONL), for eval loss and perplexity.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory (metrics.jsonl, checkpoint-N/, adapter/).
    #[arg(long, default_value = "qtune-out", hide_default_value = true)]
    pub out: PathBuf,
    /// Quantise a float base at load: nf4, q4_0, q8_0, q4_k, q6_k or none [default: none].
    #[arg(long, default_value = "none", hide_default_value = true)]
    pub quant: String,
    /// What trains: lora; dora (LoRA plus a trained magnitude per output row, PEFT's use_dora;
    /// takes the LoRA flags); prompt-tuning, p-tuning or prefix-tuning (PEFT's prompt-learning
    /// methods, saving PEFT's prompt_embeddings) [default: lora].
    #[arg(long, value_enum, default_value = "lora", hide_default_value = true)]
    pub method: Method,
    /// Virtual tokens of prompt-tuning, p-tuning and prefix-tuning [default: 20].
    #[arg(long, default_value = "20", hide_default_value = true)]
    pub num_virtual_tokens: usize,
    /// Width of P-tuning's MLP encoder, and of prefix tuning's projection.
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: the prefix is the output of an MLP (PEFT's prefix_projection).
    #[arg(long)]
    pub prefix_projection: bool,
    /// Prompt tuning: start the virtual tokens from this text's token embeddings (PEFT's TEXT
    /// init) instead of N(0, 1).
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// LoRA rank [default: 8].
    #[arg(long, default_value = "8", hide_default_value = true)]
    pub rank: usize,
    /// LoRA alpha [default: 16].
    #[arg(long, default_value = "16", hide_default_value = true)]
    pub alpha: f64,
    /// LoRA dropout [default: 0].
    #[arg(long, default_value = "0", hide_default_value = true)]
    pub dropout: f32,
    /// LoRA targets, comma-separated PEFT names (q_proj,v_proj) or all-linear [default: all-linear].
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all-linear",
        hide_default_value = true
    )]
    pub targets: Vec<String>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long, default_value = "2e-4", hide_default_value = true)]
    pub lr: f64,
    /// constant, linear or cosine [default: linear].
    #[arg(long, default_value = "linear", hide_default_value = true)]
    pub schedule: String,
    /// Warmup steps [default: 0].
    #[arg(long, default_value = "0", hide_default_value = true)]
    pub warmup: usize,
    /// Optimizer steps (wins over --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the data [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch [default: 4].
    #[arg(long, default_value = "4", hide_default_value = true)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long, default_value = "1", hide_default_value = true)]
    pub grad_accum: usize,
    /// Global gradient-norm clip, 0 = off [default: 1].
    #[arg(long, default_value = "1", hide_default_value = true)]
    pub max_grad_norm: f64,
    /// Tokens per sequence; longer examples are truncated [default: 512].
    #[arg(long, default_value = "512", hide_default_value = true)]
    pub seq_len: usize,
    /// Seed of LoRA init, dropout and data order [default: 42].
    #[arg(long, default_value = "42", hide_default_value = true)]
    pub seed: u64,
    /// Shuffle examples each epoch: true or false [default: true].
    #[arg(long, action = clap::ArgAction::Set, default_value = "true", hide_default_value = true)]
    pub shuffle: bool,
    /// Evaluate every N steps (and at start and end) [default: 0: start and end only].
    #[arg(long, default_value = "0", hide_default_value = true)]
    pub eval_every: usize,
    /// Checkpoint every N steps (and at the end) [default: 0: end only].
    #[arg(long, default_value = "0", hide_default_value = true)]
    pub save_every: usize,
    /// Worker threads, 0 = all cores [default: 0].
    #[arg(long, default_value = "0", hide_default_value = true)]
    pub threads: usize,
    /// Refuse a run predicted to need more (8G, 512M, bytes).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long, default_value = "0", hide_default_value = true)]
    pub weight_decay: f64,
    /// AdamW beta1 [default: 0.9].
    #[arg(long, default_value = "0.9", hide_default_value = true)]
    pub adam_beta1: f64,
    /// AdamW beta2 [default: 0.999].
    #[arg(long, default_value = "0.999", hide_default_value = true)]
    pub adam_beta2: f64,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long, default_value = "1e-8", hide_default_value = true)]
    pub adam_eps: f64,
    /// Keep AdamW's moments 8-bit, blockwise as bitsandbytes' AdamW8bit (~2 bytes per LoRA
    /// parameter instead of 8; tensors under 4096 elements stay 32-bit).
    #[arg(long)]
    pub optim_8bit: bool,
    /// Compute and adapter dtype: auto (bf16 on a GPU and on a CPU with AVX-512 BF16, AMX or not;
    /// else f32), bf16 or f32 [default: auto].
    #[arg(long, default_value = "auto", hide_default_value = true)]
    pub dtype: String,
    /// Activation dtype of the checkpointed backward's one-layer recompute: auto (f32 when a bf16
    /// step runs on the CPU, where candle's element-wise bf16 backward is slow; products stay
    /// bf16), f32 or the compute dtype [default: auto].
    #[arg(long, default_value = "auto", hide_default_value = true)]
    pub recompute_dtype: String,
    /// cpu, cuda or cuda:N (a build with `--features cuda`; compute capability 8.0+)
    /// [default: cpu].
    #[arg(long, default_value = "cpu", hide_default_value = true)]
    pub device: String,
    /// Start from this PEFT adapter directory (its rank, alpha and targets are used).
    #[arg(long)]
    pub adapter_init: Option<PathBuf>,
    /// Continue from a checkpoint directory (or an --out directory: its newest checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Also put the loss on prompt / user tokens.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Pack short examples together into --seq-len sequences.
    #[arg(long)]
    pub packing: bool,
    /// Chat template for `messages` data: a built-in name, a Jinja file or Jinja text.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// What to learn: sft (next-token loss on examples) or dpo (preference pairs
    /// {"prompt","chosen","rejected"}) [default: sft].
    #[arg(long, default_value = "sft", hide_default_value = true)]
    pub objective: String,
    /// DPO's β: how far the policy may move from the reference [default: 0.1].
    #[arg(long, default_value = "0.1", hide_default_value = true)]
    pub beta: f64,
    /// DPO's reference: the base plus this frozen PEFT adapter (e.g. the SFT adapter the DPO run
    /// starts from with --adapter-init) [default: the base alone].
    #[arg(long)]
    pub ref_adapter: Option<PathBuf>,
    /// DPO: compute every pair's reference log-probs once before training (kept in the run
    /// directory, reused on resume), then run the policy only.
    #[arg(long)]
    pub precompute_ref: bool,
}

impl Default for TrainConfig {
    /// The flags' `default_value`s: the settings of a run given nothing.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let cmd = Self::augment_args(clap::Command::new("defaults"));
        cmd.try_get_matches_from(["defaults"])
            .and_then(|m| Self::from_arg_matches(&m))
            .expect("every setting's default parses")
    }
}

/// The name of the resolved config written beside the adapter.
pub const CONFIG_FILE: &str = "qtune.toml";

fn bad(key: &str, msg: String) -> Error {
    Error::Invalid(format!("--{key}: {msg}"))
}

impl TrainConfig {
    /// Reads a TOML config; keys may use `-` or `_`. `path` is named in every error.
    pub fn table_from_file(path: &Path) -> Result<toml::Table> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let t: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Json {
            path: path.to_path_buf(),
            msg: format!("not valid TOML: {e}"),
        })?;
        Ok(normalise_keys(t))
    }

    /// Defaults overlaid by `layers` in order (later wins), then checked. `path` names the config
    /// file in errors about unknown keys or wrong types.
    pub fn resolve(layers: &[toml::Table], path: Option<&Path>) -> Result<Self> {
        let mut merged = toml::Table::new();
        for l in layers {
            for (k, v) in normalise_keys(l.clone()) {
                merged.insert(k, v);
            }
        }
        if let Some(m) = merged.get("method").and_then(|v| v.as_str()) {
            if !METHODS.contains(&m) {
                return Err(bad("method", format!("'{m}': use {}", METHODS.join(", "))));
            }
        }
        let cfg: TrainConfig =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    let at = path.map_or("config".into(), |p| p.display().to_string());
                    Error::Invalid(format!("{at}: {}", e.message().trim()))
                })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The config as TOML text (what [`CONFIG_FILE`] holds).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises")
    }

    /// Checks every value and its relations to the others.
    pub fn check(&self) -> Result<()> {
        self.quant_type()?;
        self.schedule_kind()?;
        self.compute_dtype(None)?;
        self.recompute()?;
        self.max_memory_bytes()?;
        if self.rank == 0 {
            return Err(bad("rank", "must be at least 1".into()));
        }
        match self.objective.as_str() {
            "sft" => {
                if self.ref_adapter.is_some() || self.precompute_ref {
                    return Err(bad(
                        "objective",
                        "--ref-adapter and --precompute-ref belong to --objective dpo".into(),
                    ));
                }
            }
            "dpo" => {
                if self.method == Method::Dora {
                    return Err(bad("method", DPO_DORA.into()));
                }
                if !(self.beta.is_finite() && self.beta > 0.0) {
                    return Err(bad("beta", format!("{} must be > 0", self.beta)));
                }
            }
            o => return Err(bad("objective", format!("'{o}': use sft or dpo"))),
        }
        self.check_method()?;
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad("alpha", format!("{} must be > 0", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("{} is outside [0, 1)", self.dropout),
            ));
        }
        if self.targets.is_empty() {
            return Err(bad(
                "targets",
                "name at least one projection or all-linear".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(bad("lr", format!("{} must be finite and >= 0", self.lr)));
        }
        if self.steps == Some(0) {
            return Err(bad("steps", "must be at least 1".into()));
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                return Err(bad("epochs", format!("{e} must be > 0")));
            }
        }
        for (k, v) in [
            ("batch-size", self.batch_size),
            ("grad-accum", self.grad_accum),
        ] {
            if v == 0 {
                return Err(bad(k, "must be at least 1".into()));
            }
        }
        if self.seq_len < 2 {
            return Err(bad("seq-len", "must be at least 2 tokens".into()));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(bad(
                "max-grad-norm",
                format!("{} must be >= 0 (0 = off)", self.max_grad_norm),
            ));
        }
        for (k, v, lo, hi) in [
            ("adam-beta1", self.adam_beta1, 0.0, 1.0),
            ("adam-beta2", self.adam_beta2, 0.0, 1.0),
        ] {
            if !(lo..hi).contains(&v) {
                return Err(bad(k, format!("{v} is outside [0, 1)")));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(bad("adam-eps", format!("{} must be > 0", self.adam_eps)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(
                "weight-decay",
                format!("{} must be >= 0", self.weight_decay),
            ));
        }
        Ok(())
    }

    /// `method` as its flag value.
    pub fn method_name(&self) -> &'static str {
        self.method.name()
    }

    /// The prompt-learning settings and their relations to the method and objective.
    fn check_method(&self) -> Result<()> {
        let m = self.method;
        if !m.is_prompt() {
            return match (self.prompt_init_text.is_some(), self.prefix_projection) {
                (true, _) => Err(bad(
                    "prompt-init-text",
                    "belongs to --method prompt-tuning".into(),
                )),
                (_, true) => Err(bad(
                    "prefix-projection",
                    "belongs to --method prefix-tuning".into(),
                )),
                _ => Ok(()),
            };
        }
        if self.objective != "sft" {
            return Err(bad(
                "method",
                "prompt-tuning, p-tuning and prefix-tuning train with --objective sft; DPO trains \
                 LoRA (--method lora)"
                    .into(),
            ));
        }
        if self.num_virtual_tokens == 0 {
            return Err(bad("num-virtual-tokens", "must be at least 1".into()));
        }
        if self.prompt_init_text.is_some() && m != Method::PromptTuning {
            return Err(bad(
                "prompt-init-text",
                "belongs to --method prompt-tuning".into(),
            ));
        }
        if self.prefix_projection && m != Method::PrefixTuning {
            return Err(bad(
                "prefix-projection",
                "belongs to --method prefix-tuning".into(),
            ));
        }
        let needs_encoder = m == Method::PTuning || self.prefix_projection;
        match self.encoder_hidden_size {
            None | Some(0) if needs_encoder => Err(bad(
                "encoder-hidden-size",
                "P-tuning's MLP and prefix tuning's projection need a width (e.g. the hidden size)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// The prompt-learning adapter these settings describe (`None` for LoRA); `init_ids`: the
    /// tokenised `prompt-init-text`.
    pub fn prompt_spec(
        &self,
        init_ids: Option<Vec<u32>>,
    ) -> Option<crate::lora::prompt::PromptSpec> {
        use crate::lora::prompt::{PromptMethod, PromptSpec};
        let method = match self.method {
            Method::Lora | Method::Dora => return None,
            Method::PromptTuning => PromptMethod::PromptTuning,
            Method::PTuning => PromptMethod::PTuning,
            Method::PrefixTuning => PromptMethod::PrefixTuning(self.prefix_projection),
        };
        Some(PromptSpec {
            method,
            num_virtual_tokens: self.num_virtual_tokens,
            encoder_hidden_size: self.encoder_hidden_size.unwrap_or(0),
            init_ids,
            init_text: self.prompt_init_text.clone(),
            seed: self.seed,
        })
    }

    /// `quant` as a type (`None`: keep the stored types).
    pub fn quant_type(&self) -> Result<Option<QType>> {
        let q = self.quant.to_ascii_lowercase();
        if q == "none" {
            return Ok(None);
        }
        match QType::parse(&q) {
            Some(t) if t == QType::NF4 || crate::quant::dispatch::QUANTIZABLE.contains(&t) => {
                Ok(Some(t))
            }
            _ => Err(bad(
                "quant",
                format!(
                    "'{}' is not one of nf4, q4_0, q8_0, q4_k, q6_k, none",
                    self.quant
                ),
            )),
        }
    }

    /// `schedule` parsed.
    pub fn schedule_kind(&self) -> Result<ScheduleKind> {
        self.schedule.parse().map_err(|_| {
            bad(
                "schedule",
                format!("'{}' is not constant, linear or cosine", self.schedule),
            )
        })
    }

    /// How AdamW stores its moments (`optim-8bit`).
    pub fn moment_storage(&self) -> crate::train::MomentStorage {
        if self.optim_8bit {
            crate::train::MomentStorage::Blockwise8
        } else {
            crate::train::MomentStorage::F32
        }
    }

    /// `recompute-dtype` parsed (`None`: auto).
    pub fn recompute(&self) -> Result<Option<DType>> {
        crate::nn::device::recompute_dtype(&self.recompute_dtype).map_err(|_| {
            bad(
                "recompute-dtype",
                format!("'{}' is not auto, f32 or bf16", self.recompute_dtype),
            )
        })
    }

    /// `dtype` parsed on `device`, for a model of `hidden` size when known (`auto`: see
    /// [`crate::nn::device::compute_dtype`]).
    pub fn compute_dtype(&self, hidden: Option<usize>) -> Result<DType> {
        crate::nn::device::compute_dtype(&self.dtype, &self.device, hidden).map_err(|_| {
            bad(
                "dtype",
                format!("'{}' is not auto, bf16 or f32", self.dtype),
            )
        })
    }

    /// `max-memory` in bytes.
    pub fn max_memory_bytes(&self) -> Result<Option<u64>> {
        self.max_memory
            .as_deref()
            .map(|s| {
                parse_bytes(s).ok_or_else(|| {
                    bad(
                        "max-memory",
                        format!("'{s}' is not a size like 8G, 512M or 1000000"),
                    )
                })
            })
            .transpose()
    }
}

/// `8G`, `1.5GiB`, `512M`, `64k`, `1000` (bytes); binary units.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then_some((n * mul as f64) as u64)
}

fn normalise_keys(t: toml::Table) -> toml::Table {
    t.into_iter()
        .map(|(k, v)| (k.replace('_', "-"), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order_and_round_trip() {
        let file: toml::Table = "batch_size = 2\nlr = 0.5\nschedule = \"cosine\""
            .parse()
            .unwrap();
        let cli: toml::Table = "lr = 0.25".parse().unwrap();
        let c = TrainConfig::resolve(&[file, cli], None).unwrap();
        assert_eq!(
            (c.batch_size, c.lr, c.schedule.as_str()),
            (2, 0.25, "cosine")
        );
        let back: toml::Table = c.to_toml().parse().unwrap();
        assert_eq!(TrainConfig::resolve(&[back], None).unwrap(), c);
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("schedule = \"step\"", "--schedule"),
            ("dtype = \"f16\"", "--dtype"),
            ("recompute-dtype = \"f16\"", "--recompute-dtype"),
            ("quant = \"q3_k\"", "--quant"),
            ("max-memory = \"lots\"", "--max-memory"),
            ("rank = 0", "--rank"),
            ("dropout = 1.0", "--dropout"),
            ("bogus = 1", "bogus"),
        ] {
            let t: toml::Table = text.parse().unwrap();
            let e = TrainConfig::resolve(&[t], None).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
    }
}
