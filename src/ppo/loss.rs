//! TRL 0.4.7's clipped PPO policy and value losses on one minibatch (`PPOTrainer.loss`, after the
//! advantages), their analytic gradients with respect to each token's new log-prob and new value
//! (what the backward pass pushes into the network), the statistics TRL logs for the minibatch, and
//! the `ratio_threshold` skip.
//!
//! The gradients are PyTorch autograd's, branch for branch: `torch.max` / `torch.min` between two
//! tensors send half the gradient to each side on a tie, and `torch.clamp` between scalar bounds
//! passes the gradient on the bounds themselves.

use super::trl_core::{masked_mean, masked_var};
use super::{Dims, PpoConfig, on};
use anyhow::{Result, ensure};
use serde::Serialize;

/// One minibatch, `[rows, cols]` each.
#[derive(Clone, Copy, Debug)]
pub struct MinibatchInputs<'a> {
    /// Log-probs of the sampled tokens at rollout time.
    pub old_logprobs: &'a [f32],
    /// The value head at rollout time.
    pub values: &'a [f32],
    /// From `compute_advantages` on these rows.
    pub advantages: &'a [f32],
    pub returns: &'a [f32],
    /// Log-probs of the sampled tokens under the policy being optimised.
    pub logprobs: &'a [f32],
    /// The value head being optimised.
    pub vpreds: &'a [f32],
    pub mask: &'a [f32],
    /// Per-token entropy of the current policy (`entropy_from_logits`), for the statistics only.
    pub entropy: Option<&'a [f32]>,
}

/// The scalars TRL 0.4.7 logs for a minibatch, named by their TRL keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LossStats {
    /// The policy loss (0 when skipped).
    #[serde(rename = "ppo/loss/policy")]
    pub policy_loss: f32,
    /// The value loss before `vf_coef` (0 when skipped).
    #[serde(rename = "ppo/loss/value")]
    pub value_loss: f32,
    /// policy + vf_coef · value (0 when skipped).
    #[serde(rename = "ppo/loss/total")]
    pub total_loss: f32,
    /// Masked mean of the policy's per-token entropy, when given.
    #[serde(rename = "ppo/policy/entropy", skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f32>,
    /// `0.5 · masked_mean((logp − old_logp)²)`.
    #[serde(rename = "ppo/policy/approxkl")]
    pub approxkl: f32,
    /// `masked_mean(old_logp − logp)`: what early stopping watches.
    #[serde(rename = "ppo/policy/policykl")]
    pub policykl: f32,
    /// Fraction of tokens where the clipped policy term is strictly the larger.
    #[serde(rename = "ppo/policy/clipfrac")]
    pub clipfrac: f32,
    #[serde(rename = "ppo/policy/advantages_mean")]
    pub advantages_mean: f32,
    /// Masked mean of `exp(logp − old_logp)`: what `ratio_threshold` is compared with.
    #[serde(rename = "ppo/policy/ratio_mean")]
    pub ratio_mean: f32,
    #[serde(rename = "ppo/returns/mean")]
    pub returns_mean: f32,
    /// Unbiased masked variance of the returns.
    #[serde(rename = "ppo/returns/var")]
    pub returns_var: f32,
    /// Masked mean of the new values.
    #[serde(rename = "ppo/val/vpred")]
    pub vpred: f32,
    /// `masked_mean((vpred − returns)²)`.
    #[serde(rename = "ppo/val/error")]
    pub val_error: f32,
    /// Fraction of tokens where the clipped value term is strictly the larger.
    #[serde(rename = "ppo/val/clipfrac")]
    pub val_clipfrac: f32,
    /// Masked mean of the rollout's values.
    #[serde(rename = "ppo/val/mean")]
    pub val_mean: f32,
    /// Unbiased masked variance of the rollout's values.
    #[serde(rename = "ppo/val/var")]
    pub val_var: f32,
    /// The mean ratio exceeded `ratio_threshold`, so the losses and gradients are zero.
    #[serde(rename = "ppo/skipped")]
    pub skipped: bool,
}

/// The minibatch's losses, their gradients and statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    pub pg_loss: f32,
    /// Before `vf_coef`.
    pub vf_loss: f32,
    /// `pg_loss + vf_coef · vf_loss`, the loss TRL differentiates.
    pub loss: f32,
    /// ∂loss/∂logprobs `[rows, cols]`.
    pub d_logprobs: Vec<f32>,
    /// ∂loss/∂vpreds `[rows, cols]`.
    pub d_vpreds: Vec<f32>,
    pub stats: LossStats,
}

/// `torch.maximum(a, b)`: NaN when either is, where `f32::max` would drop it and hide a NaN input.
fn maximum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b) }
}

/// `torch.minimum(a, b)`, NaN-propagating like `maximum`.
fn minimum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() { f32::NAN } else { a.min(b) }
}

/// `torch.maximum(a, b)`'s backward: the share of the incoming gradient each operand receives.
fn max_shares(a: f32, b: f32) -> (f32, f32) {
    if a > b {
        (1.0, 0.0)
    } else if a == b {
        (0.5, 0.5)
    } else {
        (0.0, 1.0)
    }
}

/// `torch.minimum(a, b)`'s backward: the share of the incoming gradient `a` receives.
fn min_share(a: f32, b: f32) -> f32 {
    max_shares(b, a).0
}

/// TRL 0.4.7's `PPOTrainer.loss` from the advantages on, with `V` the rollout values zeroed outside
/// the mask, `A` the advantages, `R` the returns and `M` the number of masked-in tokens:
/// - `ρ = exp(logp − old_logp)`;
///   `pg_loss = masked_mean(max(−A·ρ, −A·clamp(ρ, 1 − ε, 1 + ε)))`;
/// - `V̂ = clip_by_value(vpred, V − ε_v, V + ε_v)` (= `max(min(vpred, V + ε_v), V − ε_v)`);
///   `vf_loss = 0.5 · masked_mean(max((vpred − R)², (V̂ − R)²))`;
/// - `loss = pg_loss + vf_coef · vf_loss`; when `masked_mean(ρ) > ratio_threshold` TRL multiplies the
///   three losses by 0 (its optimiser still steps, with zero gradients), so they and the gradients
///   here are 0.
///
/// A minibatch with no masked-in token is an error (TRL's means would be NaN).
pub fn ppo_loss(x: &MinibatchInputs<'_>, dims: Dims, cfg: &PpoConfig) -> Result<LossOutput> {
    let count = check_inputs(x, dims, cfg)?;
    let c = Clip::new(cfg);
    let t = LossTerms::new(x, dims, &c);
    let mask = x.mask;
    let mut pg_loss = masked_mean(&t.pg_losses, mask);
    let mut vf_loss = 0.5 * masked_mean(&t.vf_losses, mask);
    let mut loss = pg_loss + c.vf_coef * vf_loss;
    let ratio_mean = masked_mean(&t.ratio, mask);
    let skipped = ratio_mean as f64 > cfg.ratio_threshold;
    let (d_logprobs, d_vpreds) = if skipped {
        pg_loss *= 0.0;
        vf_loss *= 0.0;
        loss *= 0.0;
        (vec![0.0f32; dims.numel()], vec![0.0f32; dims.numel()])
    } else {
        t.gradients(x, &c, count)
    };
    let stats = t.stats(x, [pg_loss, vf_loss, loss], ratio_mean, skipped);
    Ok(LossOutput { pg_loss, vf_loss, loss, d_logprobs, d_vpreds, stats })
}

/// Checks every input's shape and the mask; returns the number of masked-in tokens.
fn check_inputs(x: &MinibatchInputs<'_>, dims: Dims, cfg: &PpoConfig) -> Result<usize> {
    for (name, t) in [
        ("old_logprobs", x.old_logprobs),
        ("values", x.values),
        ("advantages", x.advantages),
        ("returns", x.returns),
        ("logprobs", x.logprobs),
        ("vpreds", x.vpreds),
    ] {
        dims.check(name, t)?;
    }
    if let Some(e) = x.entropy {
        dims.check("entropy", e)?;
    }
    dims.check_mask(x.mask)?;
    let count = x.mask.iter().filter(|&&m| on(m)).count();
    ensure!(count > 0, "the minibatch's {} rows have no masked-in token", dims.rows);
    ensure!(cfg.cliprange >= 0.0, "cliprange must not be negative, got {}", cfg.cliprange);
    Ok(count)
}

/// The clipping bands and the value coefficient as f32 (Python floats meet f32 tensors as f32
/// scalars).
struct Clip {
    lo: f32,
    hi: f32,
    cv: f32,
    vf_coef: f32,
}

impl Clip {
    fn new(cfg: &PpoConfig) -> Self {
        Self {
            lo: (1.0 - cfg.cliprange) as f32,
            hi: (1.0 + cfg.cliprange) as f32,
            cv: cfg.cliprange_value as f32,
            vf_coef: cfg.vf_coef as f32,
        }
    }
}

/// The per-token terms of the two losses (0 outside the mask).
struct LossTerms {
    /// The rollout values zeroed outside the mask.
    values: Vec<f32>,
    ratio: Vec<f32>,
    pg_losses: Vec<f32>,
    pg_clipped: Vec<f32>,
    vf_losses: Vec<f32>,
    vf_clipped: Vec<f32>,
    vpredclipped: Vec<f32>,
}

impl LossTerms {
    fn new(x: &MinibatchInputs<'_>, dims: Dims, c: &Clip) -> Self {
        let (mask, n) = (x.mask, dims.numel());
        let values: Vec<f32> = (0..n).map(|i| if on(mask[i]) { x.values[i] } else { 0.0 }).collect();
        let zeros = || vec![0.0f32; n];
        let mut t = Self {
            values,
            ratio: zeros(),
            pg_losses: zeros(),
            pg_clipped: zeros(),
            vf_losses: zeros(),
            vf_clipped: zeros(),
            vpredclipped: zeros(),
        };
        for i in (0..n).filter(|&i| on(mask[i])) {
            let neg_a = -x.advantages[i];
            t.ratio[i] = (x.logprobs[i] - x.old_logprobs[i]).exp();
            let pg1 = neg_a * t.ratio[i];
            let pg2 = neg_a * t.ratio[i].clamp(c.lo, c.hi);
            t.pg_losses[i] = maximum(pg1, pg2);
            t.pg_clipped[i] = if pg2 > pg1 { 1.0 } else { 0.0 };

            t.vpredclipped[i] = maximum(minimum(x.vpreds[i], t.values[i] + c.cv), t.values[i] - c.cv);
            let vf1 = (x.vpreds[i] - x.returns[i]) * (x.vpreds[i] - x.returns[i]);
            let vf2 = (t.vpredclipped[i] - x.returns[i]) * (t.vpredclipped[i] - x.returns[i]);
            t.vf_losses[i] = maximum(vf1, vf2);
            t.vf_clipped[i] = if vf2 > vf1 { 1.0 } else { 0.0 };
        }
        t
    }

    /// The loss's gradients with respect to each log-prob and each value prediction, over
    /// `count` masked-in tokens.
    fn gradients(&self, x: &MinibatchInputs<'_>, c: &Clip, count: usize) -> (Vec<f32>, Vec<f32>) {
        let n = self.ratio.len();
        let (lo, hi, cv) = (c.lo, c.hi, c.cv);
        let mut d_logprobs = vec![0.0f32; n];
        let mut d_vpreds = vec![0.0f32; n];
        let m = count as f32;
        let g_pg = 1.0 / m;
        let g_vf = c.vf_coef * 0.5 / m;
        for i in (0..n).filter(|&i| on(x.mask[i])) {
            let (ratio, values) = (self.ratio[i], self.values[i]);
            let neg_a = -x.advantages[i];
            let (w1, w2) = max_shares(neg_a * ratio, neg_a * ratio.clamp(lo, hi));
            let in_band = if (lo..=hi).contains(&ratio) { 1.0 } else { 0.0 };
            let d_ratio = g_pg * w1 * neg_a + g_pg * w2 * neg_a * in_band;
            d_logprobs[i] = d_ratio * ratio;

            let vp = x.vpreds[i];
            let r = x.returns[i];
            let vc = self.vpredclipped[i];
            let (w1, w2) = max_shares((vp - r) * (vp - r), (vc - r) * (vc - r));
            let through_min = min_share(vp, values + cv);
            let through_max = max_shares(minimum(vp, values + cv), values - cv).0;
            d_vpreds[i] = g_vf * w1 * (2.0 * (vp - r)) + g_vf * w2 * (2.0 * (vc - r)) * through_max * through_min;
        }
        (d_logprobs, d_vpreds)
    }

    /// The statistics TRL's `loss` returns, with the (possibly zeroed) policy, value and total losses.
    fn stats(
        &self,
        x: &MinibatchInputs<'_>,
        [pg_loss, vf_loss, loss]: [f32; 3],
        ratio_mean: f32,
        skipped: bool,
    ) -> LossStats {
        let mask = x.mask;
        let old_minus_new: Vec<f32> = x.old_logprobs.iter().zip(x.logprobs).map(|(o, l)| o - l).collect();
        let sq = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).collect() };
        LossStats {
            policy_loss: pg_loss,
            value_loss: vf_loss,
            total_loss: loss,
            entropy: x.entropy.map(|e| masked_mean(e, mask)),
            approxkl: 0.5 * masked_mean(&sq(x.logprobs, x.old_logprobs), mask),
            policykl: masked_mean(&old_minus_new, mask),
            clipfrac: masked_mean(&self.pg_clipped, mask),
            advantages_mean: masked_mean(x.advantages, mask),
            ratio_mean,
            returns_mean: masked_mean(x.returns, mask),
            returns_var: masked_var(x.returns, mask, true),
            vpred: masked_mean(x.vpreds, mask),
            val_error: masked_mean(&sq(x.vpreds, x.returns), mask),
            val_clipfrac: masked_mean(&self.vf_clipped, mask),
            val_mean: masked_mean(&self.values, mask),
            val_var: masked_var(&self.values, mask, true),
            skipped,
        }
    }
}
