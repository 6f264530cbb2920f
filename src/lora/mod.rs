//! Trainable layers over the frozen quantised base: the quantised linear with an input-only
//! backward ([`QLinear`]) and its LoRA adapter ([`LoraLinear`]).
pub mod adapter;
#[allow(clippy::module_inception)]
pub mod lora;
pub mod qlinear;

pub use lora::{LoraConfig, LoraLinear};
pub use qlinear::QLinear;
