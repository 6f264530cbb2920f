//! qtune: LoRA fine-tuning on a frozen, memory-mapped, 4/8-bit base model.
//!
//! The data path, one folder each: `format` (file layouts) -> `store` (memory-mapped tensors) ->
//! `quant` (block formats and the kernels that dequantise them on the fly) -> `lora` (the frozen
//! quantised linear and its adapters) -> `nn` (building blocks with backward) -> `models` ->
//! `train` (optimizer, schedules).
pub mod bench;
/// The GPU path (`--features cuda`): kernels/*.cu loaded into candle's CUDA device.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod format;
pub mod generate;
pub mod inspect;
pub mod lora;
pub mod merge;
pub mod models;
pub mod nn;
pub mod quant;
pub mod quantize;
pub mod store;
pub mod train;

pub use error::{Error, Result};
