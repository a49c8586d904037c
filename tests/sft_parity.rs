//! One full-parameter SFT step on the CPU against PyTorch (body in tests/suites/sft_step.rs, which
//! tests/gpu.rs also runs on CUDA).

mod common;
#[path = "suites/sft_step.rs"]
mod sft_step;

use detox::backend::cpu::Cpu;

#[test]
fn sft_step_matches_pytorch_cpu() {
    sft_step::sft_step_matches_pytorch(&Cpu);
}
