//! One PPO step on the CPU against PyTorch's TRL 0.4.7 (body in tests/suites/ppo_step.rs, which
//! tests/gpu.rs also runs on CUDA).

mod common;
#[path = "suites/ppo_step.rs"]
mod ppo_step;

use detox::backend::cpu::Cpu;

#[test]
fn ppo_step_matches_trl_cpu() {
    ppo_step::ppo_step_matches_trl(&Cpu);
}

#[test]
fn rollout_dropout_applies_masks_cpu() {
    ppo_step::rollout_dropout_applies_masks(&Cpu);
}
