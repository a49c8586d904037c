//! From scores to advantages: TRL 0.4.7's `compute_rewards` (per-token KL penalty plus the score at
//! each response's last token) and the GAE, returns and masked whitening that TRL 0.4.7 computes at the
//! top of `loss`, once per minibatch.
//!
//! Outputs are 0 in masked-out slots. TRL leaves whatever the arithmetic gives there (it multiplies by
//! the mask only where the values are consumed), so the two agree on every masked-in slot and on every
//! quantity computed from them.

use super::trl_core::masked_whiten;
use super::{Dims, on};
use anyhow::{Result, ensure};

/// `compute_rewards`'s outputs, `[rows, cols]` each.
#[derive(Clone, Debug, PartialEq)]
pub struct Rewards {
    /// The KL penalty plus the score on each response's last masked-in token.
    pub rewards: Vec<f32>,
    /// The KL penalty alone, `−kl_coef · (logp − ref_logp)`.
    pub non_score_reward: Vec<f32>,
}

/// `PPOTrainer.compute_rewards` with `kl_penalty = "kl"`: `r_t = −kl_coef · (logp_t − ref_logp_t)` on
/// masked-in tokens, plus `scores[row]` on the row's last masked-in token. Rewards are not whitened.
///
/// A row with no masked-in token is an error: TRL 0.4.7 raises IndexError there (`mask.nonzero()[-1]`);
/// with `FirstToken::Drop` that is any one-token response, so keep `min_new_tokens` ≥ 2 then.
pub fn compute_rewards(
    scores: &[f32],
    logprobs: &[f32],
    ref_logprobs: &[f32],
    mask: &[f32],
    dims: Dims,
    kl_coef: f64,
) -> Result<Rewards> {
    dims.check("logprobs", logprobs)?;
    dims.check("ref_logprobs", ref_logprobs)?;
    dims.check_mask(mask)?;
    ensure!(scores.len() == dims.rows, "{} scores for {} responses", scores.len(), dims.rows);
    // TRL negates the Python float before the product: `-self.kl_ctl.value * kl`.
    let neg_coef = -kl_coef as f32;
    let non_score_reward: Vec<f32> =
        (0..dims.numel()).map(|i| if on(mask[i]) { neg_coef * (logprobs[i] - ref_logprobs[i]) } else { 0.0 }).collect();
    let mut rewards = non_score_reward.clone();
    for (row, &score) in scores.iter().enumerate() {
        let slots = row * dims.cols..(row + 1) * dims.cols;
        let Some(last) = mask[slots.clone()].iter().rposition(|&m| on(m)) else {
            anyhow::bail!(
                "response {row} has no masked-in token to receive its score (TRL 0.4.7 fails here too); \
                 with the first generated token dropped every response needs at least 2 tokens"
            );
        };
        rewards[slots.start + last] += score;
    }
    Ok(Rewards { rewards, non_score_reward })
}

/// GAE's outputs, `[rows, cols]` each.
#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    /// Whitened advantages (detached in TRL: they carry no gradient).
    pub advantages: Vec<f32>,
    /// Unwhitened advantages plus the rollout's values: the value head's regression target.
    pub returns: Vec<f32>,
}

/// The head of TRL 0.4.7's `PPOTrainer.loss`, on the rows it is given (for parity: one minibatch):
/// with values and rewards zeroed outside the mask,
/// `δ_t = r_t + γ V_{t+1} − V_t` (`V_cols = 0`), `A_t = δ_t + γλ A_{t+1}`, `returns = A + V`, then
/// `A ← masked_whiten(A, mask)`: `(A − μ) · (σ² + 1e-8)^−½` with the masked mean μ and the unbiased
/// masked variance σ² over all the rows given.
///
/// Fewer than two masked-in tokens is an error: the unbiased variance divides by zero and TRL's
/// advantages would be NaN.
pub fn compute_advantages(
    values: &[f32],
    rewards: &[f32],
    mask: &[f32],
    dims: Dims,
    gamma: f64,
    lam: f64,
) -> Result<Advantages> {
    dims.check("values", values)?;
    dims.check("rewards", rewards)?;
    dims.check_mask(mask)?;
    let count = mask.iter().filter(|&&m| on(m)).count();
    ensure!(count >= 2, "advantage whitening needs at least 2 masked-in tokens, these {} rows have {count}", dims.rows);
    let masked = |x: &[f32], i: usize| if on(mask[i]) { x[i] } else { 0.0 };
    let g = gamma as f32;
    // Python multiplies γ·λ as floats before the tensor product.
    let gl = (gamma * lam) as f32;
    let mut raw = vec![0.0f32; dims.numel()];
    let mut returns = vec![0.0f32; dims.numel()];
    for row in 0..dims.rows {
        let base = row * dims.cols;
        let mut lastgaelam = 0.0f32;
        for t in (0..dims.cols).rev() {
            let i = base + t;
            let next = if t + 1 < dims.cols { g * masked(values, i + 1) } else { 0.0 };
            let delta = masked(rewards, i) + next - masked(values, i);
            lastgaelam = delta + gl * lastgaelam;
            raw[i] = lastgaelam;
            returns[i] = if on(mask[i]) { lastgaelam + values[i] } else { 0.0 };
        }
    }
    let advantages =
        masked_whiten(&raw, mask, true).into_iter().zip(mask).map(|(a, &m)| if on(m) { a } else { 0.0 }).collect();
    Ok(Advantages { advantages, returns })
}
