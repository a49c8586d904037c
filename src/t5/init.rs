//! Deterministic random T5 checkpoints of FLAN-T5's shapes, for tests, benchmarks and training from
//! scratch, in one of two schemes:
//!
//! - `hf`: transformers' `T5PreTrainedModel._init_weights` (factor 1): normals with std 1 for
//!   `shared` and the untied `lm_head`, (d_model·d_kv)^-½ for q, d_model^-½ for k, v, wi_0, wi_1
//!   and the relative-attention bias, (heads·d_kv)^-½ for o, d_ff^-½ for wo; norms at 1.
//!   Attention is then sharp enough that outputs depend on the input. With an untied head of std 1
//!   the logits' std is √d_model (≈ 22.6 for small), so a fresh model's loss is near 95, not ln V.
//! - `mesh-tf`: the same except `lm_head`, which is drawn as the original T5 (mesh-tensorflow)
//!   draws its untied `logits` kernel: `mtf.layers.dense`'s default `VarianceScalingInitializer`
//!   (scale 1, fan_in, normal), a truncated normal (values beyond 2σ redrawn, as
//!   `tf.truncated_normal_initializer`) with σ = d_model^-½. The logits then have std ≈ 1 and a
//!   fresh model's loss is near ln V. Everything else keeps transformers' plain normals (its stds
//!   are mesh-tensorflow's; mesh-tensorflow's dense kernels are truncated, which only `lm_head`
//!   reproduces here).

use super::config::T5Config;
use crate::checkpoint::{DType, OwnedTensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Every tensor's name, shape and init standard deviation (`None`: ones, for norms).
pub fn tensor_specs(c: &T5Config) -> Vec<(String, Vec<usize>, Option<f32>)> {
    let (d, inner, ff, v) = (c.d_model, c.inner_dim(), c.d_ff, c.vocab_size);
    let df = d as f32;
    let mut specs = vec![("shared.weight".to_string(), vec![v, d], Some(1.0))];
    for (stack, layers) in [("encoder", c.num_layers), ("decoder", c.num_decoder_layers)] {
        for i in 0..layers {
            let p = format!("{stack}.block.{i}.layer");
            let attn = |specs: &mut Vec<_>, prefix: String, bias: bool| {
                specs.push((format!("{prefix}.q.weight"), vec![inner, d], Some((df * c.d_kv as f32).powf(-0.5))));
                specs.push((format!("{prefix}.k.weight"), vec![inner, d], Some(df.powf(-0.5))));
                specs.push((format!("{prefix}.v.weight"), vec![inner, d], Some(df.powf(-0.5))));
                specs.push((format!("{prefix}.o.weight"), vec![d, inner], Some((inner as f32).powf(-0.5))));
                if bias {
                    specs.push((
                        format!("{prefix}.relative_attention_bias.weight"),
                        vec![c.relative_attention_num_buckets, c.num_heads],
                        Some(df.powf(-0.5)),
                    ));
                }
            };
            attn(&mut specs, format!("{p}.0.SelfAttention"), i == 0);
            specs.push((format!("{p}.0.layer_norm.weight"), vec![d], None));
            let ff_layer = if stack == "decoder" {
                attn(&mut specs, format!("{p}.1.EncDecAttention"), false);
                specs.push((format!("{p}.1.layer_norm.weight"), vec![d], None));
                2
            } else {
                1
            };
            let q = format!("{p}.{ff_layer}");
            specs.push((format!("{q}.DenseReluDense.wi_0.weight"), vec![ff, d], Some(df.powf(-0.5))));
            specs.push((format!("{q}.DenseReluDense.wi_1.weight"), vec![ff, d], Some(df.powf(-0.5))));
            specs.push((format!("{q}.DenseReluDense.wo.weight"), vec![d, ff], Some((ff as f32).powf(-0.5))));
            specs.push((format!("{q}.layer_norm.weight"), vec![d], None));
        }
        specs.push((format!("{stack}.final_layer_norm.weight"), vec![d], None));
    }
    if !c.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, d], Some(1.0)));
    }
    specs
}

/// Which initialisation `random_weights` follows (the module's comment says what each draws).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitScheme {
    Hf,
    MeshTf,
}

impl std::str::FromStr for InitScheme {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "hf" => Ok(Self::Hf),
            "mesh-tf" => Ok(Self::MeshTf),
            _ => anyhow::bail!("unknown init {s:?}: expected hf or mesh-tf"),
        }
    }
}

/// Draws every tensor of `c` in `dtype`.
pub fn random_weights(c: &T5Config, seed: u64, dtype: DType, scheme: InitScheme) -> BTreeMap<String, OwnedTensor> {
    tensor_specs(c)
        .into_par_iter()
        .map(|(name, shape, std)| {
            let n: usize = shape.iter().product();
            let mut rng = ChaCha8Rng::seed_from_u64(crate::seeds::tensor(seed, &name));
            let values: Vec<f32> = match std {
                None => vec![1.0; n],
                Some(_) if scheme == InitScheme::MeshTf && name == "lm_head.weight" => {
                    let sigma = (c.d_model as f32).powf(-0.5);
                    let normal = Normal::new(0.0f32, sigma).expect("positive std");
                    (0..n)
                        .map(|_| {
                            loop {
                                let x = normal.sample(&mut rng);
                                if x.abs() <= 2.0 * sigma {
                                    break x;
                                }
                            }
                        })
                        .collect()
                }
                Some(s) => {
                    let normal = Normal::new(0.0f32, s).expect("positive std");
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
            };
            let t = OwnedTensor::from_f32(&values, &shape, dtype);
            (name, t)
        })
        .collect()
}
