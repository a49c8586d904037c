//! Adam over the policy's trainable tensors, as TRL 0.4.7 builds it when given no optimiser:
//! `torch.optim.Adam(lr)` with its defaults, one fused `Backend::adam` pass over every tensor in
//! `trainables`' order.

use super::policy::{Policy, PolicyGrads};
use super::trainables::{trainable_tensors, trainables};
use crate::backend::{AdamStep, Backend, Shaped};
use crate::t5::trainable::{adam_slots, zero_moments};
use anyhow::Result;

pub struct Optimizer<B: Backend> {
    /// `(exp_avg, exp_avg_sq)` of each trainable tensor, in `trainables`' order.
    pub moments: Vec<(B::Tensor, B::Tensor)>,
    pub steps: u64,
    pub lr: f64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, policy: &Policy<B>, lr: f64) -> Result<Self> {
        let moments = zero_moments(be, trainable_tensors(policy).into_iter().map(|(_, t)| t.shape()))?;
        Ok(Self { moments, steps: 0, lr })
    }

    /// One Adam step of every trainable tensor with `grads` times `grad_scale`, rewriting the
    /// adapters' half copies in the same pass.
    pub fn step(&mut self, be: &B, policy: &mut Policy<B>, grads: &PolicyGrads<B>, grad_scale: f32) -> Result<()> {
        self.steps += 1;
        let h = AdamStep { lr: self.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: self.steps, grad_scale };
        let mut slots = adam_slots(trainables(policy), grads.tensors(), &mut self.moments, |_| 0.0)?;
        be.adam(&mut slots, &h)?;
        policy.model.lora_updated(be)
    }
}
