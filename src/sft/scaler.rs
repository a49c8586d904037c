//! SFT's dynamic loss scale for the half-precision gradient products: halved when a step's
//! gradients overflow (that step makes no update), doubled after `growth_interval` finite steps in a
//! row, never above 2^24 — torch's `GradScaler` policy (backoff 0.5, growth 2), with its own interval.

use anyhow::{Result, bail};

/// The largest scale: 2^24, beyond which f32 gradients of the usual size lose their low bits.
pub const MAX_LOSS_SCALE: f32 = 16_777_216.0;

#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    scale: f32,
    /// Finite steps in a row before the scale doubles (0: it never grows).
    growth_interval: usize,
    /// Finite steps since the last change.
    good: usize,
}

impl LossScaler {
    pub fn new(scale: f32, growth_interval: usize) -> Self {
        Self { scale: scale.min(MAX_LOSS_SCALE), growth_interval, good: 0 }
    }

    /// The scale the next step multiplies its loss by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Records whether the step at `step` (for the message) overflowed, and moves the scale.
    /// Overflow at scale 1 cannot be cured by scaling: an error.
    pub fn update(&mut self, overflowed: bool, step: usize) -> Result<()> {
        if overflowed {
            if self.scale <= 1.0 {
                bail!("non-finite gradients at step {step} with no loss scaling left to reduce");
            }
            self.scale = (self.scale / 2.0).max(1.0);
            self.good = 0;
            return Ok(());
        }
        self.good += 1;
        if self.growth_interval > 0 && self.good >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(MAX_LOSS_SCALE);
            self.good = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the scaler with a stream of outcomes and returns the scale before each step.
    fn scales(s: &mut LossScaler, overflows: &[bool]) -> Vec<f32> {
        overflows
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                let used = s.scale();
                s.update(o, i + 1).unwrap();
                used
            })
            .collect()
    }

    #[test]
    fn halves_on_overflow_and_doubles_after_the_interval_of_good_steps() {
        let mut s = LossScaler::new(8.0, 3);
        let got = scales(&mut s, &[true, false, false, false, false, true, false, false, true, false]);
        assert_eq!(got, [8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 4.0, 4.0, 4.0, 2.0]);
    }

    #[test]
    fn growth_stops_at_two_to_the_24_and_zero_interval_never_grows() {
        let mut s = LossScaler::new(MAX_LOSS_SCALE / 2.0, 1);
        scales(&mut s, &[false; 5]);
        assert_eq!(s.scale(), MAX_LOSS_SCALE);
        let mut fixed = LossScaler::new(4.0, 0);
        scales(&mut fixed, &[false; 100]);
        assert_eq!(fixed.scale(), 4.0);
    }

    #[test]
    fn overflow_at_scale_one_is_an_error() {
        let mut s = LossScaler::new(2.0, 10);
        s.update(true, 1).unwrap();
        let e = s.update(true, 2).unwrap_err().to_string();
        assert!(e.contains("step 2"), "{e}");
    }
}
