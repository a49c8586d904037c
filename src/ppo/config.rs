//! PPO hyper-parameters: the fields of TRL 0.4.7's `PPOConfig` that change the arithmetic, with the
//! seed's settings as defaults, read from TOML and checked by `validate`.

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which generated tokens a seq2seq response mask covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstToken {
    /// Every generated token, the first one included. TRL's own decoder-only path covers the first
    /// response token too; this is the PPO objective as written, where every sampled action is
    /// penalised by the KL term and credited by the policy gradient.
    #[default]
    Keep,
    /// TRL 0.4.7's seq2seq mask: `batched_forward_pass` sets `start = 1` after already shifting the
    /// log-probs by one (`logits[:, :-1]` against `decoder_input_ids[:, 1:]`), so the first generated
    /// token's log-prob and value never enter the rewards, the losses or the statistics. Parity runs
    /// against the seed use this.
    Drop,
}

/// TRL 0.4.7 `PPOConfig` defaults except where the seed (50 PPO steps over 500 SAMSum dialogues)
/// set its own: `learning_rate`, `batch_size`, `mini_batch_size`, `ppo_epochs`. `first_token` is not a
/// TRL setting: its default departs from TRL 0.4.7's seq2seq mask (see `FirstToken`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Adam's learning rate. TRL default 1e-5; the seed 1.41e-5.
    pub learning_rate: f64,
    /// Rollouts per PPO step, and the `n_steps` the adaptive KL controller is advanced by. TRL 256;
    /// the seed 16.
    pub batch_size: usize,
    /// Rows per gradient step inside a PPO step; must divide `batch_size` (TRL 0.4.7's forward pass
    /// silently drops the remainder otherwise). TRL 1; the seed 4.
    pub mini_batch_size: usize,
    /// Passes over the batch per PPO step, each with freshly shuffled minibatches. TRL 4; the seed 1.
    pub ppo_epochs: usize,
    /// The KL penalty coefficient at the start of training. TRL 0.2.
    pub init_kl_coef: f64,
    /// Adapt the KL coefficient towards `target` (true) or keep it fixed. TRL true.
    pub adap_kl_ctrl: bool,
    /// The adaptive controller's target for the batch mean of each response's summed KL. TRL 6.
    pub target: f64,
    /// The adaptive controller's horizon, in rollouts. TRL 10000.
    pub horizon: f64,
    /// GAE discount. TRL 1.0.
    pub gamma: f64,
    /// GAE λ. TRL 0.95.
    pub lam: f64,
    /// PPO ratio clip ε: ratios are clipped to `[1 − ε, 1 + ε]`. TRL 0.2.
    pub cliprange: f64,
    /// Value clip: new values are clipped to the rollout's value ± this. TRL 0.2.
    pub cliprange_value: f64,
    /// Weight of the value loss in the total loss. TRL 0.1.
    pub vf_coef: f64,
    /// A minibatch whose masked mean ratio exceeds this has its losses (and so its gradients)
    /// multiplied by zero. TRL 10.0.
    pub ratio_threshold: f64,
    /// Clip the global L2 norm of the trainable parameters' gradients to this before each Adam step;
    /// absent, no clipping. TRL none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Stop a PPO step's remaining minibatches once a minibatch's policy KL exceeds 1.5 × `target_kl`.
    /// TRL false.
    pub early_stopping: bool,
    /// See `early_stopping`. TRL 0.1.
    pub target_kl: f64,
    /// Whether the seq2seq response mask covers the first generated token (see `FirstToken`; TRL 0.4.7
    /// drops it). Default `keep`.
    pub first_token: FirstToken,
    /// Apply the adapters' and the value head's dropout in the rollout pass that gives the old
    /// log-probabilities and values, as the seed's stack does: TRL 0.4.7 never switches its model to
    /// evaluation mode (REFERENCE.md), so the first minibatch's ratio is not 1 there. Default false:
    /// the old log-probs are then those of the policy that sampled, and PPO's ratio starts at 1.
    /// Sampling itself runs with the adapters merged and no dropout either way.
    pub rollout_dropout: bool,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1.41e-5,
            batch_size: 16,
            mini_batch_size: 4,
            ppo_epochs: 1,
            init_kl_coef: 0.2,
            adap_kl_ctrl: true,
            target: 6.0,
            horizon: 10000.0,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ratio_threshold: 10.0,
            max_grad_norm: None,
            early_stopping: false,
            target_kl: 0.1,
            first_token: FirstToken::Keep,
            rollout_dropout: false,
        }
    }
}

impl PpoConfig {
    /// Parses TOML (missing fields take their defaults, unknown ones are errors) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).context("invalid PPO config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).context("serialising the PPO config")
    }

    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: f64| -> Result<()> {
            ensure!(v.is_finite(), "{name} must be a finite number, got {v}");
            Ok(())
        };
        finite("learning_rate", self.learning_rate)?;
        ensure!(self.learning_rate > 0.0, "learning_rate must be positive, got {}", self.learning_rate);
        ensure!(self.batch_size >= 1, "batch_size must be at least 1");
        ensure!(self.mini_batch_size >= 1, "mini_batch_size must be at least 1");
        ensure!(
            self.batch_size.is_multiple_of(self.mini_batch_size),
            "mini_batch_size ({}) must divide batch_size ({})",
            self.mini_batch_size,
            self.batch_size
        );
        ensure!(self.ppo_epochs >= 1, "ppo_epochs must be at least 1");
        finite("init_kl_coef", self.init_kl_coef)?;
        ensure!(self.init_kl_coef >= 0.0, "init_kl_coef must not be negative, got {}", self.init_kl_coef);
        if self.adap_kl_ctrl {
            finite("target", self.target)?;
            ensure!(self.target > 0.0, "target must be positive with adap_kl_ctrl, got {}", self.target);
            finite("horizon", self.horizon)?;
            ensure!(self.horizon > 0.0, "horizon must be positive with adap_kl_ctrl, got {}", self.horizon);
        }
        for (name, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            ensure!((0.0..=1.0).contains(&v), "{name} must be in [0, 1], got {v}");
        }
        finite("cliprange", self.cliprange)?;
        ensure!(
            (0.0..1.0).contains(&self.cliprange),
            "cliprange must be in [0, 1) so that 1 − cliprange stays positive, got {}",
            self.cliprange
        );
        finite("cliprange_value", self.cliprange_value)?;
        ensure!(self.cliprange_value >= 0.0, "cliprange_value must not be negative, got {}", self.cliprange_value);
        finite("vf_coef", self.vf_coef)?;
        ensure!(self.vf_coef >= 0.0, "vf_coef must not be negative, got {}", self.vf_coef);
        ensure!(
            self.ratio_threshold > 0.0,
            "ratio_threshold must be positive (inf disables it), got {}",
            self.ratio_threshold
        );
        if let Some(n) = self.max_grad_norm {
            ensure!(n > 0.0 && n.is_finite(), "max_grad_norm must be a positive finite number when set, got {n}");
        }
        if self.early_stopping {
            finite("target_kl", self.target_kl)?;
            ensure!(self.target_kl > 0.0, "target_kl must be positive with early_stopping, got {}", self.target_kl);
        }
        Ok(())
    }
}
