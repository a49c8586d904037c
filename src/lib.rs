//! detox: FLAN-T5 + LoRA + PPO detoxification of dialogue summaries, on the CPU or CUDA.

pub mod backend;
pub mod checkpoint;
pub mod classifier;
pub mod cli;
pub mod device;
pub mod fsutil;
pub mod parallel;
pub mod plot;
pub mod ppo;
pub mod progress;
pub mod rouge;
pub mod seeds;
pub mod sft;
pub mod summaries;
pub mod t5;
pub mod text;
