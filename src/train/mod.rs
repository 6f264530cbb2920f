//! Training machinery around the model: the optimizer ([`AdamW`], with gradient clipping) and the
//! learning-rate schedules ([`LrSchedule`]).
pub mod bench;
pub mod chart;
pub mod config;
pub mod eval;
pub mod optim;
pub mod optim8;
pub mod schedule;
pub mod trainer;

pub use optim::{clip_grad_norm, AdamW, AdamWConfig, MomentStorage};
pub use schedule::{LrSchedule, ScheduleKind};
