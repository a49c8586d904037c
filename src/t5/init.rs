//! Deterministic random T5 checkpoints of FLAN-T5's shapes, initialised as transformers initialises
//! T5 (so attention is sharp enough that outputs depend on the input), for tests and benchmarks
//! where no pretrained weights can be downloaded.

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

/// Draws every tensor of `c` in `dtype`.
pub fn random_weights(c: &T5Config, seed: u64, dtype: DType) -> BTreeMap<String, OwnedTensor> {
    tensor_specs(c)
        .into_par_iter()
        .map(|(name, shape, std)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = match std {
                None => vec![1.0; n],
                Some(s) => {
                    let mut rng = ChaCha8Rng::seed_from_u64(crate::seeds::tensor(seed, &name));
                    let normal = Normal::new(0.0f32, s).expect("positive std");
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
            };
            let t = OwnedTensor::from_f32(&values, &shape, dtype);
            (name, t)
        })
        .collect()
}
