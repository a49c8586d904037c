//! The statistics TRL 0.4.7 reports for a whole PPO step (`PPOTrainer.record_step_stats`): the
//! batch's KL, entropy estimate, scores and KL penalty, and the minibatches' `LossStats` averaged
//! over the step.

use super::loss::LossStats;
use super::trl_core::masked_mean;
use super::{Dims, on};
use anyhow::{Result, ensure};
use serde::Serialize;

/// One PPO step's statistics, named by their TRL keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepStats {
    /// The batch mean of each response's summed `logp − ref_logp`: what the KL controller follows.
    #[serde(rename = "objective/kl")]
    pub kl: f32,
    /// Each response's summed `logp − ref_logp`.
    #[serde(rename = "objective/kl_dist")]
    pub kl_dist: Vec<f32>,
    /// The coefficient the step's rewards were shaped with.
    #[serde(rename = "objective/kl_coef")]
    pub kl_coef: f64,
    /// The batch mean of each response's summed `−logp` (a sampled estimate of the entropy).
    #[serde(rename = "objective/entropy")]
    pub entropy: f32,
    #[serde(rename = "ppo/mean_non_score_reward")]
    pub mean_non_score_reward: f32,
    #[serde(rename = "ppo/mean_scores")]
    pub mean_scores: f32,
    /// Unbiased standard deviation of the scores.
    #[serde(rename = "ppo/std_scores")]
    pub std_scores: f32,
    /// The minibatches' statistics, each averaged over the minibatches (`skipped`: any was).
    #[serde(flatten)]
    pub train: LossStats,
    /// `1 − val/error / returns/var`, of the averages.
    #[serde(rename = "ppo/val/var_explained")]
    pub var_explained: f32,
    #[serde(rename = "ppo/minibatches")]
    pub minibatches: usize,
    #[serde(rename = "ppo/skipped_minibatches")]
    pub skipped_minibatches: usize,
}

fn mean(xs: impl Iterator<Item = f32>) -> f32 {
    let (s, n) = xs.fold((0.0f64, 0usize), |(s, n), x| (s + x as f64, n + 1));
    s as f32 / n as f32
}

impl LossStats {
    /// The element-wise mean over minibatches, as TRL's `stack_dicts` then `torch.mean(axis=0)`;
    /// `skipped` when any minibatch was. None for no minibatches.
    pub fn mean(all: &[LossStats]) -> Option<LossStats> {
        if all.is_empty() {
            return None;
        }
        let m = |f: fn(&LossStats) -> f32| mean(all.iter().map(f));
        Some(LossStats {
            policy_loss: m(|s| s.policy_loss),
            value_loss: m(|s| s.value_loss),
            total_loss: m(|s| s.total_loss),
            entropy: all.iter().map(|s| s.entropy).collect::<Option<Vec<f32>>>().map(|e| mean(e.into_iter())),
            approxkl: m(|s| s.approxkl),
            policykl: m(|s| s.policykl),
            clipfrac: m(|s| s.clipfrac),
            advantages_mean: m(|s| s.advantages_mean),
            ratio_mean: m(|s| s.ratio_mean),
            returns_mean: m(|s| s.returns_mean),
            returns_var: m(|s| s.returns_var),
            vpred: m(|s| s.vpred),
            val_error: m(|s| s.val_error),
            val_clipfrac: m(|s| s.val_clipfrac),
            val_mean: m(|s| s.val_mean),
            val_var: m(|s| s.val_var),
            skipped: all.iter().any(|s| s.skipped),
        })
    }
}

/// `PPOTrainer.record_step_stats` over the whole batch `[rows, cols]`, with `kl_coef` the coefficient
/// `compute_rewards` used and `minibatches` the `ppo_loss` statistics of every minibatch the step ran.
#[allow(clippy::too_many_arguments)]
pub fn record_step_stats(
    scores: &[f32],
    logprobs: &[f32],
    ref_logprobs: &[f32],
    non_score_reward: &[f32],
    mask: &[f32],
    dims: Dims,
    kl_coef: f64,
    minibatches: &[LossStats],
) -> Result<StepStats> {
    dims.check("logprobs", logprobs)?;
    dims.check("ref_logprobs", ref_logprobs)?;
    dims.check("non_score_reward", non_score_reward)?;
    dims.check_mask(mask)?;
    ensure!(scores.len() == dims.rows, "{} scores for {} responses", scores.len(), dims.rows);
    let train = LossStats::mean(minibatches).ok_or_else(|| anyhow::anyhow!("a PPO step ran no minibatch"))?;
    let row_sum = |row: usize, f: &dyn Fn(usize) -> f32| -> f32 {
        (row * dims.cols..(row + 1) * dims.cols).filter(|&i| on(mask[i])).map(|i| f(i) as f64).sum::<f64>() as f32
    };
    let kl_dist: Vec<f32> = (0..dims.rows).map(|r| row_sum(r, &|i| logprobs[i] - ref_logprobs[i])).collect();
    let entropy = mean((0..dims.rows).map(|r| row_sum(r, &|i| -logprobs[i])));
    let mean_scores = mean(scores.iter().copied());
    let sq_dev: f64 = scores.iter().map(|&s| ((s - mean_scores) as f64).powi(2)).sum();
    let std_scores = (sq_dev / (scores.len() as f64 - 1.0)).sqrt() as f32;
    Ok(StepStats {
        kl: mean(kl_dist.iter().copied()),
        kl_dist,
        kl_coef,
        entropy,
        mean_non_score_reward: masked_mean(non_score_reward, mask),
        mean_scores,
        std_scores,
        var_explained: 1.0 - train.val_error / train.returns_var,
        train,
        minibatches: minibatches.len(),
        skipped_minibatches: minibatches.iter().filter(|s| s.skipped).count(),
    })
}
