//! Learning-rate schedules with linear warmup, as transformers 4.46's
//! `get_{constant,linear,cosine}_schedule_with_warmup` (a `LambdaLR`: `lr = base_lr * factor(step)`,
//! where `step` counts the optimizer steps already taken, so the first step uses `factor(0)`, which
//! is 0 whenever there is a warmup).
use crate::{Error, Result};

/// The shape of the schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// `base_lr` after warmup.
    Constant,
    /// Linear decay to 0 at `total_steps`.
    Linear,
    /// Half a cosine period down to 0 at `total_steps` (transformers' default `num_cycles = 0.5`).
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::Invalid(format!(
                "unknown LR schedule '{s}'; expected constant, linear or cosine"
            ))),
        }
    }
}

/// A learning rate for every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Schedule shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Steps of linear warmup from 0.
    pub warmup_steps: usize,
    /// Steps of the whole run (the decay ends here; unused by `Constant`).
    pub total_steps: usize,
}

impl LrSchedule {
    /// The multiplier of `base_lr` for the optimizer step that follows `step` completed steps.
    pub fn factor(&self, step: usize) -> f64 {
        // Same operations, in the same order and precision, as transformers' lr_lambda functions.
        let (w, t) = (self.warmup_steps, self.total_steps);
        if step < w {
            return step as f64 / (w.max(1) as f64);
        }
        // Step counts stay far below 2^52, so the integer differences are exact in f64.
        let span = (t as f64 - w as f64).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t as f64 - step as f64) / span).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (step - w) as f64 / span;
                let num_cycles = 0.5f64;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate for the optimizer step that follows `step` completed steps.
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}
