//! Trainable layers over the frozen quantised base: the quantised linear with an input-only
//! backward ([`QLinear`]), its LoRA adapter ([`LoraLinear`]), DoRA ([`dora::Dora`]) and the adapter seam the models call
//! ([`seam`]).
pub mod adapter;
pub mod dora;
#[allow(clippy::module_inception)]
pub mod lora;
pub mod prompt;
pub mod qlinear;

pub mod seam;

pub use lora::{Lora, LoraConfig, LoraLinear};
pub use qlinear::QLinear;
pub use seam::{AdapterMethod, BaseCall, BoxedAdapter, LinearAdapter, SequenceAdapter};
