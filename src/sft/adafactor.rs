//! Adafactor's state for SFT's trainables (transformers' `Adafactor`): per weight the factored row
//! and column statistics (2-D) or the unfactored second moment (1-D), the optional first moment,
//! and the parts a stacked weight splits into, so that q, k and v of a fused projection are each
//! their own Adafactor tensor as they are in Hugging Face's model.

use crate::backend::{AdafactorSlot, Backend};
use crate::t5::trainable::Trainable;
use anyhow::{Result, bail, ensure};

/// One weight's Adafactor statistics (`AdafactorSlot` says their shapes).
pub struct AdafactorState<B: Backend> {
    pub parts: Vec<usize>,
    pub row: B::Tensor,
    pub col: B::Tensor,
    pub m: Option<B::Tensor>,
}

impl<B: Backend> AdafactorState<B> {
    /// Zero statistics of a weight of `shape` stacking `parts` rows (ignored for 1-D), with a
    /// first moment when `first_moment`.
    pub fn zeros(be: &B, shape: &[usize], parts: &[usize], first_moment: bool) -> Result<Self> {
        let (parts, row, col) = match *shape {
            [n] => (vec![n], be.zeros(&[n])?, be.zeros(&[0])?),
            [r, c] => {
                ensure!(parts.iter().sum::<usize>() == r, "parts {parts:?} do not cover a weight of {shape:?}");
                (parts.to_vec(), be.zeros(&[r])?, be.zeros(&[parts.len(), c])?)
            }
            _ => bail!("Adafactor takes 1-D and 2-D weights, not {shape:?}"),
        };
        let m = if first_moment { Some(be.zeros(shape)?) } else { None };
        Ok(Self { parts, row, col, m })
    }

    /// Every statistic, for checkpoints and tests.
    pub fn tensors(&self) -> Vec<&B::Tensor> {
        [&self.row, &self.col].into_iter().chain(self.m.as_ref()).collect()
    }
}

/// `Backend::adafactor`'s slots: trainable `i` with gradient `grads[i]`, state `states[i]` and
/// weight decay `decay(i)`, all in one order.
pub fn adafactor_slots<'a, B: Backend>(
    trainables: Vec<Trainable<'a, B>>,
    grads: Vec<&'a B::Tensor>,
    states: &'a mut [AdafactorState<B>],
    decay: impl Fn(usize) -> f64,
) -> Result<Vec<AdafactorSlot<'a, B>>> {
    ensure!(
        trainables.len() == grads.len() && grads.len() == states.len(),
        "optimizer state does not match the trainable tensors ({} tensors, {} gradients, {} states)",
        trainables.len(),
        grads.len(),
        states.len()
    );
    Ok(trainables
        .into_iter()
        .zip(grads)
        .zip(states.iter_mut())
        .enumerate()
        .map(|(i, ((t, g), s))| AdafactorSlot {
            p: t.param,
            g,
            parts: s.parts.clone(),
            row: &mut s.row,
            col: &mut s.col,
            m: s.m.as_mut(),
            weight_decay: decay(i),
            copy: t.copy,
        })
        .collect())
}

/// Zero states for weights of these `(shape, parts)`.
pub fn zero_states<B: Backend>(
    be: &B,
    tensors: &[(Vec<usize>, Vec<usize>)],
    first_moment: bool,
) -> Result<Vec<AdafactorState<B>>> {
    tensors.iter().map(|(shape, parts)| AdafactorState::zeros(be, shape, parts, first_moment)).collect()
}
