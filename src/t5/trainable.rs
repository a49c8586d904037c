//! One trainable tensor as every consumer sees it — the optimiser, checkpoints, the all-reduce, the
//! gradient norm and the tests: its name in PEFT / Hugging Face checkpoints, its f32 master, and the
//! product-precision copy an update rewrites in the same pass. The adapters' order is defined here
//! once (`a_then_b`); PPO appends the value head (`ppo::trainables`).

use crate::backend::{AdamSlot, Backend};
use anyhow::{Result, ensure};

pub struct Trainable<'a, B: Backend> {
    pub name: String,
    pub param: &'a mut B::Tensor,
    /// `Backend::matmul_copy`'s copy of `param`, where the backend's products read one.
    pub copy: Option<&'a mut B::Tensor>,
}

/// Every adapter's A then B, adapters in module order: the order of the adapters' tensors, their
/// gradients and their Adam moments everywhere.
pub fn a_then_b<T>(pairs: impl IntoIterator<Item = (T, T)>) -> impl Iterator<Item = T> {
    pairs.into_iter().flat_map(|(a, b)| [a, b])
}

/// Zero Adam moments `(m, v)` for tensors of these shapes.
pub fn zero_moments<'a, B: Backend>(
    be: &B,
    shapes: impl IntoIterator<Item = &'a [usize]>,
) -> Result<Vec<(B::Tensor, B::Tensor)>> {
    shapes.into_iter().map(|s| Ok((be.zeros(s)?, be.zeros(s)?))).collect()
}

/// `Backend::adam`'s slots: trainable `i` with gradient `grads[i]`, moments `moments[i]` and weight
/// decay `decay(i)`; all three must list the same tensors in the same order.
pub fn adam_slots<'a, B: Backend>(
    trainables: Vec<Trainable<'a, B>>,
    grads: Vec<&'a B::Tensor>,
    moments: &'a mut [(B::Tensor, B::Tensor)],
    decay: impl Fn(usize) -> f64,
) -> Result<Vec<AdamSlot<'a, B>>> {
    ensure!(
        trainables.len() == grads.len() && grads.len() == moments.len(),
        "optimizer state does not match the trainable tensors ({} tensors, {} gradients, {} moments)",
        trainables.len(),
        grads.len(),
        moments.len()
    );
    Ok(trainables
        .into_iter()
        .zip(grads)
        .zip(moments.iter_mut())
        .enumerate()
        .map(|(i, ((t, g), (m, v)))| AdamSlot { p: t.param, g, m, v, weight_decay: decay(i), copy: t.copy })
        .collect())
}
