//! The KL penalty coefficient's controllers (TRL 0.4.7 `AdaptiveKLController` and
//! `FixedKLController`) and the early-stopping rule of `PPOTrainer._early_stop`.

use super::PpoConfig;
use serde::{Deserialize, Serialize};

/// The coefficient of the per-token KL penalty, carried across PPO steps (and checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KlController {
    /// Ziegler et al. (2019): moves the coefficient so that the batch KL approaches `target`.
    Adaptive {
        value: f64,
        target: f64,
        horizon: f64,
    },
    Fixed {
        value: f64,
    },
}

impl KlController {
    pub fn from_config(cfg: &PpoConfig) -> Self {
        if cfg.adap_kl_ctrl {
            Self::Adaptive { value: cfg.init_kl_coef, target: cfg.target, horizon: cfg.horizon }
        } else {
            Self::Fixed { value: cfg.init_kl_coef }
        }
    }

    /// The coefficient to shape this step's rewards with.
    pub fn value(&self) -> f64 {
        match self {
            Self::Adaptive { value, .. } | Self::Fixed { value } => *value,
        }
    }

    /// After a PPO step, with `current` = that step's `objective/kl` (the batch mean of each response's
    /// summed KL) and `n_steps` = the rollouts in the step (TRL passes `batch_size` × processes):
    /// `value *= 1 + clip(current / target − 1, −0.2, 0.2) · n_steps / horizon`. Fixed: no change.
    pub fn update(&mut self, current: f64, n_steps: usize) {
        if let Self::Adaptive { value, target, horizon } = self {
            let proportional_error = (current / *target - 1.0).clamp(-0.2, 0.2);
            *value *= 1.0 + proportional_error * n_steps as f64 / *horizon;
        }
    }
}

/// `PPOTrainer._early_stop`: with `early_stopping` on, stop the step's remaining minibatches and
/// epochs once a minibatch's `policykl` exceeds 1.5 × `target_kl`. TRL 0.4.7 checks this after the
/// minibatch's optimiser step, so the minibatch that trips it has already updated the parameters
/// (its docstring's "the optimization step is skipped" does not happen). The comparison is in f32, as
/// TRL's tensor-against-Python-float comparison is.
pub fn early_stop(cfg: &PpoConfig, policykl: f32) -> bool {
    cfg.early_stopping && policykl > (1.5 * cfg.target_kl) as f32
}
