//! File formats, parsed without copying tensor data: each returns views into one memory map.
pub mod bnb;
pub mod gguf;
pub mod inspect;
pub mod safetensors;
