//! Model architectures over the weight store: their configs, forward passes and LoRA training.
pub mod llama;
pub mod plan;

pub use llama::{Llama, LlamaConfig, LlamaOptions, LoraSpec};
pub use plan::MemoryPlan;
