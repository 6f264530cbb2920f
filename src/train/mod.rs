//! Training around the model: the loop ([`trainer`]) over an objective ([`objective`]: SFT), its
//! data order ([`data`]), checkpoints ([`checkpoint`]), the optimizer ([`AdamW`], with gradient
//! clipping), the learning-rate schedules ([`LrSchedule`]), evaluation, and `qtune bench`.
pub mod advice;
pub mod bench;
pub mod chart;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dpo;
pub mod eval;
pub mod manifest;
pub mod objective;
pub mod optim;
pub mod optim8;
pub mod schedule;
mod setup;
pub mod trainer;

pub use optim::{clip_grad_norm, AdamW, AdamWConfig, MomentStorage};
pub use schedule::{LrSchedule, ScheduleKind};
