//! Every seed a run derives from its settings, each named once: `derive(seed, x) = mix64(seed ^
//! mix64(x))` over SplitMix64's finaliser, with a distinct offset per use so that no two uses draw
//! the same stream. The values are part of a run's reproducibility (and of the tests' fixtures):
//! change none of them.

use crate::backend::rng::mix64;

/// `mix64(seed ^ mix64(x))`: an independent seed for use `x` of `seed`.
pub fn derive(seed: u64, x: u64) -> u64 {
    mix64(seed ^ mix64(x))
}

/// PPO step `step`'s sampling in the rollout (`[run] seed`).
pub fn rollout(run_seed: u64, step: usize) -> u64 {
    derive(run_seed, step as u64)
}

/// PPO step `step`'s own seed (`StepOptions::seed`), from which its shuffles and dropout masks come.
pub fn ppo_step(run_seed: u64, step: usize) -> u64 {
    derive(run_seed, step as u64 + 0x5eed)
}

/// The minibatch permutation of epoch `epoch` of a PPO step seeded `step_seed`.
pub fn ppo_shuffle(step_seed: u64, epoch: usize) -> u64 {
    derive(step_seed, epoch as u64)
}

/// The dropout masks of minibatch `minibatch` of epoch `epoch` of a PPO step seeded `step_seed`.
pub fn ppo_dropout(step_seed: u64, epoch: usize, minibatch: usize) -> u64 {
    derive(step_seed, (epoch * 1_000_003 + minibatch) as u64 + 1)
}

/// The dropout masks of the rollout pass's chunk starting at row `first_row`, under
/// `[ppo] rollout_dropout` (the minibatches' seeds use offsets from 1 up; this sits far above them).
pub fn ppo_rollout_dropout(step_seed: u64, first_row: usize) -> u64 {
    derive(step_seed, first_row as u64 + (1 << 48))
}

/// The value head's initialisation, from `[lora] init_seed` (which also draws the adapters' A).
pub fn value_head_init(init_seed: u64) -> u64 {
    mix64(init_seed ^ 0x76)
}

/// The dialogue order of pass `pass` over the PPO data set.
pub fn ppo_data_pass(run_seed: u64, pass: usize) -> u64 {
    derive(run_seed, pass as u64)
}

/// The shuffle of SFT epoch `epoch`.
pub fn sft_epoch(run_seed: u64, epoch: usize) -> u64 {
    derive(run_seed, epoch as u64 + 0x5f7)
}

/// The dropout masks of SFT step `step`.
pub fn sft_dropout(run_seed: u64, step: usize) -> u64 {
    derive(run_seed, step as u64 + 0xd50)
}

/// T5's own dropout masks (`Fwd::model_dropout`) of a training pass whose adapters' masks come
/// from `dropout_seed`: one seed per step (and per worker) serves both, apart.
pub fn model_dropout(dropout_seed: u64) -> u64 {
    derive(dropout_seed, 0x7d5)
}

/// Data-parallel worker `rank`'s seed (rank 0 keeps `seed`, so a single worker is unchanged).
pub fn worker(seed: u64, rank: usize) -> u64 {
    if rank == 0 { seed } else { derive(seed, rank as u64) }
}

/// A stable per-tensor seed for random weights, depending only on (seed, name).
pub fn tensor(seed: u64, name: &str) -> u64 {
    name.bytes().fold(mix64(seed), |h, b| mix64(h ^ b as u64))
}
