//! Data parallelism on the CPU: one worker against groups of workers (tests/suites/data_parallel.rs;
//! tests/gpu.rs runs the same bodies with a CUDA backend per worker).

mod common;
#[path = "suites/data_parallel.rs"]
mod data_parallel;

use detox::backend::cpu::Cpu;

#[test]
fn a_ppo_step_is_the_same_on_one_worker_and_on_two() {
    data_parallel::a_ppo_step_is_the_same_on_one_worker_and_on_two(|| Cpu);
}

#[test]
fn an_sft_step_is_the_same_on_one_worker_and_on_two_or_three() {
    data_parallel::an_sft_step_is_the_same_on_one_worker_and_on_two_or_three(|| Cpu);
}
