//! TRL's value head: `Dropout(0.1)` then `Linear(d_model, 1)` on the decoder's final states
//! (`v_head.summary.*`), kept as f32 trainable parameters and saved beside the adapter.

use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, DType, OwnedTensor, write_safetensors};
use anyhow::Result;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;

pub const FILE: &str = "value_head.safetensors";
const WEIGHT: &str = "v_head.summary.weight";
const BIAS: &str = "v_head.summary.bias";

pub struct ValueHead<B: Backend> {
    /// `[1, d_model]`
    pub weight: B::Tensor,
    /// `[1]`
    pub bias: B::Tensor,
}

impl<B: Backend> ValueHead<B> {
    /// torch's default Linear init, U(±1/√d) for weight and bias, which TRL keeps.
    pub fn init(be: &B, d_model: usize, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (d_model as f32).sqrt();
        let w: Vec<f32> = (0..d_model).map(|_| rng.random_range(-bound..bound)).collect();
        let b = [rng.random_range(-bound..bound)];
        Ok(Self { weight: be.upload(&w, &[1, d_model])?, bias: be.upload(&b, &[1])? })
    }

    pub fn load(be: &B, path: &Path, d_model: usize) -> Result<Self> {
        let ckpt = Checkpoint::open_file(path)?;
        let w = ckpt.get_shaped(WEIGHT, &[1, d_model])?.to_f32();
        let b = ckpt.get_shaped(BIAS, &[1])?.to_f32();
        Ok(Self { weight: be.upload(&w, &[1, d_model])?, bias: be.upload(&b, &[1])? })
    }

    pub fn save(&self, be: &B, path: &Path) -> Result<()> {
        let d = be.download(&self.weight)?;
        let mut t = BTreeMap::new();
        t.insert(WEIGHT.to_string(), OwnedTensor::from_f32(&d, &[1, d.len()], DType::F32));
        t.insert(BIAS.to_string(), OwnedTensor::from_f32(&be.download(&self.bias)?, &[1], DType::F32));
        write_safetensors(path, &t, None)
    }

    /// Values of decoder states `[.., d] → [.., 1]`.
    pub fn forward(&self, be: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        be.affine(hidden, &self.weight, Some(&self.bias))
    }
}
