//! Training data: tokenizers (tokenizer.json or a GGUF's embedded vocabulary), chat templates, JSONL
//! loading with loss masks, and padded batches.
//!
//! Conventions (labels are aligned with ids, as in transformers; the model shifts them):
//! - `{"text"}`: encode(text, special) + EOS; loss on every token.
//! - `{"prompt","completion"}`: encode(prompt, special) + encode(completion, no special) + EOS; loss on
//!   the completion and EOS.
//! - alpaca `{"instruction","input","output"}`: the Stanford Alpaca prompt, then as prompt/completion.
//! - `{"messages"}`: rendered with the chat template one turn at a time; loss on each assistant
//!   turn's text as the template renders it (content and end-of-turn marker), not on the
//!   generation prompt that precedes it.
//! - preference pairs `{"prompt","chosen","rejected"}` for DPO: see [`pairs`].
//! - `train_on_prompt` puts the loss on every token instead; -100 marks tokens without loss.
pub mod batch;
pub(crate) mod guard;
pub mod jsonl;
pub mod pairs;
pub mod template;
mod template_check;
mod template_limits;
pub mod tokenizer;

pub use batch::{batches, pack, shuffle, shuffled_indices, Batch};
pub use jsonl::{load_examples, DataFormat, DataOptions, DataStats, Example};
pub use pairs::{load_pairs, Pair, PairFormat, PairStats};
pub use template::{Message, BUILTIN_TEMPLATES};
pub use tokenizer::Tokenizer;

/// Label of a token that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;
