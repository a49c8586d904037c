//! T5 parity with transformers + peft on the CPU reference: the `#[test]` twins that
//! `common::suite!` makes of the bodies in tests/suites/t5.rs (the same bodies run on CUDA in
//! tests/gpu.rs).

mod common;
#[path = "suites/t5.rs"]
mod t5;
