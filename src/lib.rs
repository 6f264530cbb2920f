//! qtune: LoRA fine-tuning on a frozen, memory-mapped, 4/8-bit base model.
//!
//! The data path, one folder each (docs/ARCHITECTURE.md walks it): `format` (file layouts, and
//! `inspect`) -> `store` (memory-mapped tensors) -> `quant` (block formats and the kernels that
//! dequantise them on the fly) -> `lora` (the frozen quantised linear and its adapters) -> `nn`
//! (building blocks with backward, the compute device) -> `models` (architectures, generation) ->
//! `train` (optimizer, schedules, the loop, `bench`) -> `export` (adapters for PEFT and llama.cpp,
//! merged and quantised models). `cli` (in the binary) maps each command onto these.
/// The GPU path (`--features cuda`): kernels/*.cu loaded into candle's CUDA device.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod error;
pub mod export;
pub mod format;
pub mod lora;
pub mod models;
pub mod nn;
pub mod quant;
pub mod rng;
pub mod store;
pub mod train;

pub use error::{Error, Result};
// The task modules under their data-path folders, also at their earlier top-level paths.
pub use export::{merge, quantize};
pub use format::inspect;
pub use models::generate;
pub use nn::device;
pub use train::bench;
