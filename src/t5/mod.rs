//! FLAN-T5: configuration, weights, LoRA, value head, generation and random initialisation.

pub mod adapters;
mod beam;
pub mod config;
pub mod generate;
pub mod init;
pub mod lora;
pub mod model;
pub mod params;
pub mod train;
pub mod trainable;
pub mod value_head;

pub use config::T5Config;
pub use generate::{EarlyStopping, GenConfig, Generation, Prompts, generate};
pub use lora::{LoraSettings, Targets};
pub use model::{Fwd, T5};
pub use trainable::Trainable;
pub use value_head::ValueHead;
