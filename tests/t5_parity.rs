//! T5 parity with transformers + peft on the CPU reference (bodies in tests/suites/t5.rs; the same
//! bodies run on CUDA in tests/gpu.rs).

mod common;
// The full-size check needs a GPU-machine oracle and runs only in tests/gpu.rs.
#[allow(dead_code)]
#[path = "suites/t5.rs"]
mod t5;

use detox::backend::cpu::Cpu;

#[test]
fn encoder_matches_cpu() {
    t5::encoder_matches(&Cpu);
}

#[test]
fn logits_match_cpu() {
    t5::logits_match(&Cpu);
}

#[test]
fn lora_logits_and_values_match_cpu() {
    t5::lora_logits_and_values_match(&Cpu);
}

#[test]
fn greedy_generations_match_cpu() {
    t5::greedy_generations_match(&Cpu);
}

#[test]
fn generation_logprobs_and_values_match_teacher_forcing_cpu() {
    t5::generation_logprobs_and_values_match_teacher_forcing(&Cpu);
}

#[test]
fn merged_lora_matches_unmerged_cpu() {
    t5::merged_lora_matches_unmerged(&Cpu);
}
