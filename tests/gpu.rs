//! Every GPU test: each body of tests/suites run on the CUDA backend. Without a usable GPU each
//! one is reported as ignored, with the reason, never as passed.

mod common;
// The model card's four-decimal values are checked on the CPU only.
#[path = "suites/backward_ops.rs"]
mod backward;
#[allow(dead_code)]
#[path = "suites/classifier.rs"]
mod classifier;
#[path = "suites/data_parallel.rs"]
mod data_parallel;
#[path = "suites/nccl.rs"]
mod nccl;
#[path = "suites/ops.rs"]
mod ops;
#[path = "suites/ppo_step.rs"]
mod ppo_step;
#[path = "suites/sft_step.rs"]
mod sft_step;
#[path = "suites/t5.rs"]
mod t5;

use detox::backend::cuda::Cuda;
use libtest_mimic::{Arguments, Trial};
use std::sync::Arc;

type Body = fn(&Cuda);

const BODIES: &[(&str, Body)] = &[
    ("ops::embedding_and_gather", ops::embedding_and_gather::<Cuda>),
    ("ops::linear_with_and_without_lora", ops::linear_with_and_without_lora::<Cuda>),
    ("ops::affine_and_elementwise", ops::affine_and_elementwise::<Cuda>),
    ("ops::split_and_gated_gelu", ops::split_and_gated_gelu::<Cuda>),
    ("ops::norms", ops::norms::<Cuda>),
    ("ops::attention", ops::attention::<Cuda>),
    ("ops::kv_writes_and_copies", ops::kv_writes_and_copies::<Cuda>),
    ("ops::log_softmax_and_token_choice", ops::log_softmax_and_token_choice::<Cuda>),
    ("backward::dropout_matches_cpu", backward::dropout_matches_cpu::<Cuda>),
    ("backward::linear_backward_matches_cpu", backward::linear_backward_matches_cpu::<Cuda>),
    ("backward::affine_backward_matches_cpu", backward::affine_backward_matches_cpu::<Cuda>),
    ("backward::rms_norm_backward_matches_cpu", backward::rms_norm_backward_matches_cpu::<Cuda>),
    ("backward::gated_gelu_backward_matches_cpu", backward::gated_gelu_backward_matches_cpu::<Cuda>),
    ("backward::attention_backward_matches_cpu", backward::attention_backward_matches_cpu::<Cuda>),
    ("backward::concat_last_matches_cpu", backward::concat_last_matches_cpu::<Cuda>),
    ("backward::token_logprobs_matches_cpu", backward::token_logprobs_matches_cpu::<Cuda>),
    ("backward::adam_matches_cpu", backward::adam_matches_cpu::<Cuda>),
    ("backward::sum_squares_matches_cpu", backward::sum_squares_matches_cpu::<Cuda>),
    ("backward::weight_grad_matches_cpu", backward::weight_grad_matches_cpu::<Cuda>),
    ("backward::rms_norm_weight_grad_matches_cpu", backward::rms_norm_weight_grad_matches_cpu::<Cuda>),
    ("backward::embedding_backward_matches_cpu", backward::embedding_backward_matches_cpu::<Cuda>),
    ("backward::cross_entropy_matches_cpu", backward::cross_entropy_matches_cpu::<Cuda>),
    ("backward::set_weight_matches_cpu", backward::set_weight_matches_cpu::<Cuda>),
    ("nccl::nccl_group_sums_and_gathers", nccl::nccl_group_sums_and_gathers),
    // Each worker makes its own backend on GPU 0: its own stream and cuBLAS handle, as on N GPUs.
    ("data_parallel::a_ppo_step_is_the_same_on_one_worker_and_on_two", |_| {
        data_parallel::a_ppo_step_is_the_same_on_one_worker_and_on_two(|| Cuda::new(0).unwrap())
    }),
    ("data_parallel::an_sft_step_is_the_same_on_one_worker_and_on_two_or_three", |_| {
        data_parallel::an_sft_step_is_the_same_on_one_worker_and_on_two_or_three(|| Cuda::new(0).unwrap())
    }),
    ("ppo_step::ppo_step_matches_trl", ppo_step::ppo_step_matches_trl::<Cuda>),
    ("ppo_step::rollout_dropout_applies_masks", ppo_step::rollout_dropout_applies_masks::<Cuda>),
    ("sft_step::sft_step_matches_pytorch", sft_step::sft_step_matches_pytorch::<Cuda>),
    ("t5::encoder_matches", t5::encoder_matches::<Cuda>),
    ("t5::logits_match", t5::logits_match::<Cuda>),
    ("t5::lora_logits_and_values_match", t5::lora_logits_and_values_match::<Cuda>),
    ("t5::greedy_generations_match", t5::greedy_generations_match::<Cuda>),
    (
        "t5::generation_logprobs_and_values_match_teacher_forcing",
        t5::generation_logprobs_and_values_match_teacher_forcing::<Cuda>,
    ),
    ("t5::merged_lora_matches_unmerged", t5::merged_lora_matches_unmerged::<Cuda>),
    ("t5::full_size_matches_transformers", t5::full_size_matches_transformers::<Cuda>),
    ("classifier::minilm_matches_transformers", classifier::minilm_matches_transformers::<Cuda>),
    ("classifier::truncation_keeps_the_closing_token", classifier::truncation_keeps_the_closing_token::<Cuda>),
    ("classifier::roberta_matches_transformers", classifier::roberta_matches_transformers::<Cuda>),
    (
        "classifier::converted_detoxify_matches_transformers",
        classifier::converted_detoxify_matches_transformers::<Cuda>,
    ),
    ("classifier::loader_errors_name_the_problem", classifier::loader_errors_name_the_problem::<Cuda>),
];

/// Bodies that need more than a GPU: the environment variables that name their inputs.
fn needs(name: &str) -> &'static [&'static str] {
    match name {
        "t5::full_size_matches_transformers" => &["DETOX_FULL_SIZE", "DETOX_FULL_SIZE_ORACLE"],
        _ => &[],
    }
}

fn main() {
    let mut args = Arguments::from_args();
    // One context, stream and cuBLAS handle serve every test, and a handle is not for concurrent use.
    args.test_threads = Some(1);
    let gpu = Cuda::new(0).map(Arc::new).map_err(|e| format!("{e:#}"));
    if let Err(r) = &gpu {
        eprintln!("GPU tests ignored: {r}");
    } else if let Err(r) = detox::parallel::nccl::available() {
        eprintln!("NCCL tests ignored: {r:#}");
    }
    let trials = BODIES
        .iter()
        .map(|&(name, body)| match &gpu {
            Ok(_) if name.starts_with("nccl::") && detox::parallel::nccl::available().is_err() => {
                Trial::test(format!("cuda::{name}"), || Ok(())).with_ignored_flag(true)
            }
            Ok(_) if needs(name).iter().any(|v| std::env::var_os(v).is_none()) => {
                Trial::test(format!("cuda::{name}"), || Ok(())).with_ignored_flag(true)
            }
            Ok(be) => {
                let be = be.clone();
                Trial::test(format!("cuda::{name}"), move || {
                    body(&be);
                    Ok(())
                })
            }
            Err(_) => Trial::test(format!("cuda::{name}"), || Ok(())).with_ignored_flag(true),
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
