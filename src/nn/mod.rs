//! Model building blocks.
pub mod fused;
