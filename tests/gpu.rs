//! Every GPU test: every case the suites in tests/suites register (`common::suite!`) run on the
//! CUDA backend. This file lists suites, never cases: a case added to a suite runs here by itself.
//! Without a usable GPU, or without what a case needs besides, each is reported as ignored, with
//! the reason, never as passed.

#[path = "suites/backward_ops.rs"]
mod backward;
#[path = "suites/classifier.rs"]
mod classifier;
mod common;
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

use common::Case;
use detox::backend::cuda::Cuda;
use libtest_mimic::{Arguments, Trial};
use std::sync::Arc;

/// Every suite's cases; `make` gives a worker its own backend on GPU 0 (its own stream and cuBLAS
/// handle, as on N GPUs).
fn cases() -> Vec<Case<Cuda>> {
    let make: fn() -> Cuda = || Cuda::new(0).unwrap();
    [
        ops::cases(make),
        backward::cases(make),
        nccl::cases(make),
        data_parallel::cases(make),
        ppo_step::cases(make),
        sft_step::cases(make),
        t5::cases(make),
        classifier::cases(make),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn main() {
    let mut args = Arguments::from_args();
    // One context, stream and cuBLAS handle serve every test, and a handle is not for concurrent use.
    args.test_threads = Some(1);
    let gpu = Cuda::new(0).map(Arc::new).map_err(|e| format!("{e:#}"));
    if let Err(r) = &gpu {
        eprintln!("GPU tests ignored: {r}");
    }
    let trials = cases()
        .into_iter()
        .map(|Case { name, body, skip }| {
            let name = format!("cuda::{name}");
            let ignored = || Trial::test(name.clone(), || Ok(())).with_ignored_flag(true);
            match &gpu {
                Err(_) => ignored(),
                Ok(be) => match skip.and_then(|why| why()) {
                    Some(reason) => {
                        eprintln!("{name} ignored: {reason}");
                        ignored()
                    }
                    None => {
                        let be = be.clone();
                        Trial::test(name, move || {
                            body(&be);
                            Ok(())
                        })
                    }
                },
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
