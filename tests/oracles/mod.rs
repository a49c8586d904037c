//! Independent host references of what the engine computes on a backend, for the tests only:
//! PyTorch's single-tensor Adam and `clip_grad_norm_`, and TRL's log-prob and entropy helpers.
#![allow(dead_code, unused_imports)]

pub mod optim;
pub mod trl_core;

pub use optim::{Adam, AdamState, clip_grad_norm};
pub use trl_core::{entropy_from_logits, logprobs_from_logits, logprobs_from_logits_backward};
