//! The policy's trainable tensors in ONE order — every adapter's A and B in module order, then the
//! value head's weight and bias (torch.optim.Adam's parameter order for TRL's model) — with their
//! checkpoint names: PEFT's keys for the adapters, TRL's for the value head. The optimiser, the
//! checkpoints, the all-reduce, the gradient norm and the tests all take the order from `in_order`.

use super::policy::{Policy, PolicyGrads};
use crate::backend::Backend;
use crate::t5::Trainable;

/// TRL's names of the value head's weight and bias.
pub const VALUE_HEAD_NAMES: [&str; 2] = ["v_head.summary.weight", "v_head.summary.bias"];

/// The adapters' tensors (already in `a_then_b` order), then the value head's two.
fn in_order<T>(adapters: impl IntoIterator<Item = T>, value_head: [T; 2]) -> Vec<T> {
    adapters.into_iter().chain(value_head).collect()
}

/// Every trainable tensor, mutable, with its name and product-precision copy.
pub fn trainables<B: Backend>(policy: &mut Policy<B>) -> Vec<Trainable<'_, B>> {
    let Policy { model, value_head, .. } = policy;
    let [w, b] = VALUE_HEAD_NAMES.map(String::from);
    in_order(
        model.lora_trainables(),
        [
            Trainable { name: w, param: &mut value_head.weight, copy: None },
            Trainable { name: b, param: &mut value_head.bias, copy: None },
        ],
    )
}

/// `trainables`' names and tensors, read-only.
pub fn trainable_tensors<B: Backend>(policy: &Policy<B>) -> Vec<(String, &B::Tensor)> {
    let [w, b] = VALUE_HEAD_NAMES.map(String::from);
    in_order(policy.model.lora_tensors(), [(w, &policy.value_head.weight), (b, &policy.value_head.bias)])
}

/// `trainables`' names.
pub fn trainable_names<B: Backend>(policy: &Policy<B>) -> Vec<String> {
    trainable_tensors(policy).into_iter().map(|(name, _)| name).collect()
}

impl<B: Backend> PolicyGrads<B> {
    /// The gradients in `trainables`' order.
    pub fn tensors(&self) -> Vec<&B::Tensor> {
        in_order(self.lora.tensors(), [&self.value_weight, &self.value_bias])
    }

    /// `tensors`, mutable (the all-reduce).
    pub fn tensors_mut(&mut self) -> Vec<&mut B::Tensor> {
        let PolicyGrads { lora, value_weight, value_bias } = self;
        in_order(lora.tensors_mut(), [value_weight, value_bias])
    }
}
