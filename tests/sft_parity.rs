//! One full-parameter SFT step on the CPU against PyTorch, and with T5's dropout on against itself
//! (bodies in tests/suites/sft_step.rs, which tests/gpu.rs also runs on CUDA).

mod common;
#[path = "suites/sft_step.rs"]
mod sft_step;

use detox::backend::cpu::Cpu;

#[test]
fn sft_step_matches_pytorch_cpu() {
    sft_step::sft_step_matches_pytorch(&Cpu);
}

#[test]
fn sft_step_with_dropout_is_deterministic_and_moves_the_loss_cpu() {
    sft_step::sft_step_with_dropout_matches_cpu(&Cpu);
}
