//! A test oracle: the optimiser side of a PPO minibatch as TRL 0.4.7 runs it, per element on the host: `torch.optim.Adam` with its default
//! settings over f32 parameters (the optimiser TRL builds when given none), and
//! `torch.nn.utils.clip_grad_norm_` for `max_grad_norm`.
//!
//! The arithmetic follows PyTorch's single-tensor Adam (what runs on CPU tensors) operation for
//! operation: bias corrections in f64 as Python computes them, everything per element in f32.

use anyhow::{Result, ensure};

/// `torch.optim.Adam(params, lr)`: betas (0.9, 0.999), eps 1e-8, no weight decay, no AMSGrad.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// One parameter tensor's Adam state (PyTorch keeps a step count per tensor).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamState {
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl AdamState {
    /// The state of a tensor of `numel` elements before its first step.
    pub fn new(numel: usize) -> Self {
        Self { step: 0, exp_avg: vec![0.0; numel], exp_avg_sq: vec![0.0; numel] }
    }
}

impl Adam {
    pub fn new(lr: f64) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    /// One step on one tensor:
    /// `m ← lerp(m, g, 1 − β₁)`, `v ← β₂·v + (1 − β₂)·g²`,
    /// `p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)`.
    /// A zero gradient still moves `p` along the momentum and advances `t`, as in PyTorch; this is
    /// what a minibatch skipped by `ratio_threshold` does in TRL 0.4.7.
    pub fn step(&self, param: &mut [f32], grad: &[f32], state: &mut AdamState) -> Result<()> {
        let n = param.len();
        ensure!(grad.len() == n, "gradient has {} elements for a parameter of {n}", grad.len());
        ensure!(
            state.exp_avg.len() == n && state.exp_avg_sq.len() == n,
            "Adam state holds {} / {} elements for a parameter of {n}",
            state.exp_avg.len(),
            state.exp_avg_sq.len()
        );
        state.step += 1;
        let t = state.step as f64;
        let weight = (1.0 - self.beta1) as f32;
        let beta2 = self.beta2 as f32;
        let one_minus_beta2 = (1.0 - self.beta2) as f32;
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        let neg_step_size = -(self.lr / bias_correction1) as f32;
        let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
        let eps = self.eps as f32;
        for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(&mut state.exp_avg).zip(&mut state.exp_avg_sq) {
            // PyTorch's lerp takes this branch for weights below one half.
            *m += weight * (g - *m);
            *v = *v * beta2 + one_minus_beta2 * g * g;
            let denom = v.sqrt() / bias_correction2_sqrt + eps;
            *p += neg_step_size * *m / denom;
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` with the L2 norm: the norm of the per-tensor
/// norms, then every gradient times `min(max_norm / (norm + 1e-6), 1)`. Returns the norm before
/// clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f32 {
    let norms: Vec<f32> =
        grads.iter().map(|g| g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32).collect();
    let total = norms.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
    let coef = max_norm as f32 / (total + 1e-6);
    // torch.clamp keeps a NaN norm's NaN, where f32::min would turn it into 1.
    let coef = if coef > 1.0 { 1.0 } else { coef };
    for g in grads.iter_mut() {
        g.iter_mut().for_each(|x| *x *= coef);
    }
    total
}
