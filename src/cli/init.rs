//! `detox init`: a random FLAN-T5-shaped checkpoint directory.

use crate::checkpoint::{DType, write_safetensors};
use crate::t5::T5Config;
use crate::t5::init::{InitScheme, random_weights};
use anyhow::{Context, Result, ensure};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// FLAN-T5 shape: tiny (d_model 64, 2 layers, the real 32,128 vocabulary), small, base, large or xl.
    #[arg(long, default_value = "small")]
    pub size: String,
    /// Output directory (created; existing files of the same name are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the deterministic initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype: f16 (the engine's own), bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Initialisation: hf (transformers' `_init_weights`: normals, std 1 for `shared` and the
    /// untied `lm_head`, so a fresh model's loss is near 95 on the real vocabulary) or mesh-tf (the
    /// same except `lm_head`, drawn as the original T5 in mesh-tensorflow draws its untied logits
    /// kernel: a normal truncated at 2σ with σ = d_model^-0.5, giving a first loss near ln(vocab);
    /// the one to train from scratch).
    #[arg(long, default_value = "hf")]
    pub init: InitScheme,
    /// config.json's `dropout_rate`, the probability T5's dropout zeroes an activation in training
    /// (`detox sft`); FLAN-T5's own is 0.1. Higher rates slow the overfitting of small data sets.
    #[arg(long, default_value_t = 0.1)]
    pub dropout_rate: f32,
    /// A tokenizer.json to copy beside the weights (e.g. ../shared/tokenizers/t5/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    ensure!((0.0..1.0).contains(&a.dropout_rate), "--dropout-rate must be in [0, 1), not {}", a.dropout_rate);
    let cfg = T5Config { dropout_rate: a.dropout_rate, ..T5Config::preset(&a.size)? };
    let dtype = DType::parse(&a.dtype)?;
    if let Some(t) = &a.tokenizer {
        crate::text::load_tokenizer(t)?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let weights = random_weights(&cfg, a.seed, dtype, a.init);
    let params: usize = weights.values().map(|t| t.shape.iter().product::<usize>()).sum();
    write_safetensors(&a.out.join("model.safetensors"), &weights, Some([("format".into(), "pt".into())].into()))?;
    crate::fsutil::write_atomic(&a.out.join("config.json"), serde_json::to_string_pretty(&cfg.to_json())?.as_bytes())?;
    if let Some(t) = &a.tokenizer {
        crate::fsutil::copy_file(t, &a.out.join("tokenizer.json"))?;
    }
    eprintln!(
        "wrote {} ({} parameters, {:?}, {:?} init, seed {}, dropout_rate {})",
        a.out.display(),
        params,
        dtype,
        a.init,
        a.seed,
        a.dropout_rate
    );
    Ok(())
}
