//! `detox info`: what a checkpoint holds.

use crate::checkpoint::Checkpoint;
use crate::t5::T5Config;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (Hugging Face layout: config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = T5Config::load(&a.model)?;
    let ckpt = Checkpoint::open_dir(&a.model)?;
    // Every tensor the config implies, with its shape, and finite values.
    crate::t5::T5::load(&crate::backend::cpu::Cpu, &a.model)
        .with_context(|| format!("{} does not match its config.json", a.model.display()))?;
    super::check_finite_weights(&a.model, None)?;
    let mut params = 0usize;
    let mut dtypes = std::collections::BTreeSet::new();
    for name in ckpt.names() {
        let t = ckpt.get(name)?;
        params += t.numel();
        dtypes.insert(format!("{:?}", t.dtype));
    }
    println!("{}", serde_json::to_string_pretty(&cfg.to_json())?);
    println!("tensors: {}  parameters: {params}  dtypes: {dtypes:?}", ckpt.names().len());
    println!("weights: {}", ckpt.describe());
    Ok(())
}
