//! The PPO arithmetic between the model and the optimiser, as TRL 0.4.7's `PPOTrainer` does it for a
//! seq2seq policy with a value head: response masks, KL-shaped rewards, GAE and advantage whitening,
//! the clipped policy and value losses with their gradients per token, the statistics TRL logs, the
//! KL controllers. Everything here is a plain f32 CPU reference over
//! row-major `[rows, cols]` slices (one row per response, one column per generated token) with a
//! response mask of 1 on real response tokens and 0 elsewhere; it is what the GPU kernels are checked
//! against.
//!
//! One TRL 0.4.7 PPO step in these terms (`PPOTrainer.step`):
//! 1. `response_mask` for the batch; `compute_rewards` with the controller's current coefficient.
//! 2. For each of `ppo_epochs` passes, for each shuffled minibatch of `mini_batch_size` rows:
//!    `compute_advantages` on the minibatch's rows (TRL 0.4.7 runs GAE and the whitening inside
//!    `loss`, so the whitening statistics are the minibatch's), a forward pass giving new log-probs and
//!    values, `ppo_loss`, backward from its `d_logprobs` / `d_vpreds`, clipping when
//!    `max_grad_norm` is set, an `Optimizer` (Adam) step; then `early_stop` when `early_stopping` is on.
//! 3. `record_step_stats`, then `KlController::update` with its `kl` and `batch_size`.

pub mod advantages;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod kl;
pub mod loss;
pub mod mask;
pub mod optim;
pub mod phases;
pub mod policy;
pub mod settings;
pub mod stats;
pub mod step;
pub mod trainables;
pub mod trainer;
pub mod trl_core;

pub use advantages::{Advantages, Rewards, compute_advantages, compute_rewards};
pub use config::{FirstToken, PpoConfig};
pub use kl::{KlController, early_stop};
pub use loss::{LossOutput, LossStats, MinibatchInputs, ppo_loss};
pub use mask::{response_mask, response_mask_from_lengths};
pub use optim::Optimizer;
pub use stats::{StepStats, record_step_stats};
pub use trl_core::{masked_mean, masked_var, masked_whiten};

use anyhow::{Result, ensure};

/// The shape of the per-token tensors: `rows` responses of `cols` token slots each, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub rows: usize,
    pub cols: usize,
}

impl Dims {
    pub fn new(rows: usize, cols: usize) -> Self {
        Self { rows, cols }
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Fails, naming the tensor, when `values` does not hold exactly `rows × cols` elements.
    pub(crate) fn check(&self, name: &str, values: &[f32]) -> Result<()> {
        ensure!(
            values.len() == self.numel(),
            "{name} has {} elements, expected {} rows × {} columns = {}",
            values.len(),
            self.rows,
            self.cols,
            self.numel()
        );
        Ok(())
    }

    /// `check`, plus every element being exactly 0 or 1: the functions select on the mask rather than
    /// multiply by it, so that whatever sits in masked-out slots (padding garbage, even NaN) never leaks.
    pub(crate) fn check_mask(&self, mask: &[f32]) -> Result<()> {
        self.check("mask", mask)?;
        if let Some(i) = mask.iter().position(|&m| m != 0.0 && m != 1.0) {
            anyhow::bail!(
                "mask holds {} at row {}, column {}; a response mask holds only 0 and 1",
                mask[i],
                i / self.cols.max(1),
                i % self.cols.max(1)
            );
        }
        Ok(())
    }
}

/// Whether the slot is a real response token.
#[inline]
pub(crate) fn on(m: f32) -> bool {
    m != 0.0
}
