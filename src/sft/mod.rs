//! Supervised fine-tuning (`detox sft`): teacher-forced cross-entropy on (dialogue, summary) pairs,
//! every weight or LoRA adapters only, AdamW or Adafactor with warmup and decay; the best model by
//! held-out ROUGE-L saved in Hugging Face layout, ready for `detox train`.

pub mod adafactor;
pub mod data;
pub mod export;
pub mod scaler;
pub mod settings;
pub mod step;
pub mod trainer;

pub use settings::SftSettings;
