//! `BertForSequenceClassification` and `RobertaForSequenceClassification`, written once over the
//! backend: weights under Hugging Face's names, the embeddings, the post-norm encoder and the
//! classification head, from right-padded ids to one logit per label.

use super::config::{Arch, ClassifierConfig};
use crate::backend::{Activation, AttnInputs, AttnSpec, Backend, Shaped};
use crate::checkpoint::{Checkpoint, HostTensor};
use anyhow::{Context, Result};
use std::path::Path;

/// A linear layer with bias, `[out, in]` and `[out]`.
pub struct Dense<B: Backend> {
    pub weight: B::Weight,
    pub bias: B::Weight,
}

pub struct LayerNorm<B: Backend> {
    pub weight: B::Weight,
    pub bias: B::Weight,
}

/// `{prefix}.encoder.layer.N`.
pub struct Layer<B: Backend> {
    pub query: Dense<B>,
    pub key: Dense<B>,
    pub value: Dense<B>,
    /// `attention.output.dense`
    pub attention_output: Dense<B>,
    /// `attention.output.LayerNorm`
    pub attention_norm: LayerNorm<B>,
    /// `intermediate.dense`
    pub intermediate: Dense<B>,
    /// `output.dense`
    pub output: Dense<B>,
    /// `output.LayerNorm`
    pub output_norm: LayerNorm<B>,
}

pub struct SequenceClassifier<B: Backend> {
    pub config: ClassifierConfig,
    pub word_embeddings: B::Weight,
    pub position_embeddings: B::Weight,
    /// Row 0 of `token_type_embeddings`: every input is a single segment of type 0, so the lookup is
    /// one bias added to every position.
    pub token_type: B::Weight,
    pub embeddings_norm: LayerNorm<B>,
    pub layers: Vec<Layer<B>>,
    /// BERT's `bert.pooler.dense`, RoBERTa's `classifier.dense`; both followed by tanh.
    pub head_dense: Dense<B>,
    /// BERT's `classifier`, RoBERTa's `classifier.out_proj`.
    pub head_out: Dense<B>,
}

impl<B: Backend> SequenceClassifier<B> {
    /// Loads `config.json` and the weights of a Hugging Face classifier directory onto `be`.
    pub fn load(be: &B, dir: &Path) -> Result<Self> {
        let config = ClassifierConfig::load(dir)?;
        let ckpt = Checkpoint::open_dir(dir)?;
        Self::from_checkpoint(be, config, &ckpt)
            .with_context(|| format!("loading classifier weights from {}", dir.display()))
    }

    pub fn from_checkpoint(be: &B, config: ClassifierConfig, ckpt: &Checkpoint) -> Result<Self> {
        let c = &config;
        let (d, ff, n) = (c.hidden_size, c.intermediate_size, c.labels.len());
        let p = c.arch.prefix();
        let get = |name: &str, shape: &[usize]| be.upload_weight(&ckpt.get_shaped(name, shape)?);
        let dense = |name: &str, out: usize, inp: usize| -> Result<Dense<B>> {
            Ok(Dense {
                weight: get(&format!("{name}.weight"), &[out, inp])?,
                bias: get(&format!("{name}.bias"), &[out])?,
            })
        };
        let norm = |name: &str| -> Result<LayerNorm<B>> {
            Ok(LayerNorm { weight: get(&format!("{name}.weight"), &[d])?, bias: get(&format!("{name}.bias"), &[d])? })
        };
        let types =
            ckpt.get_shaped(&format!("{p}.embeddings.token_type_embeddings.weight"), &[c.type_vocab_size, d])?;
        let row_shape = [d];
        let type0 = HostTensor { shape: &row_shape, bytes: &types.bytes[..d * types.dtype.size()], ..types };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = format!("{p}.encoder.layer.{i}");
            layers.push(Layer {
                query: dense(&format!("{l}.attention.self.query"), d, d)?,
                key: dense(&format!("{l}.attention.self.key"), d, d)?,
                value: dense(&format!("{l}.attention.self.value"), d, d)?,
                attention_output: dense(&format!("{l}.attention.output.dense"), d, d)?,
                attention_norm: norm(&format!("{l}.attention.output.LayerNorm"))?,
                intermediate: dense(&format!("{l}.intermediate.dense"), ff, d)?,
                output: dense(&format!("{l}.output.dense"), d, ff)?,
                output_norm: norm(&format!("{l}.output.LayerNorm"))?,
            });
        }
        let (head_dense, head_out) = match c.arch {
            Arch::Bert => (dense("bert.pooler.dense", d, d)?, dense("classifier", n, d)?),
            Arch::Roberta => (dense("classifier.dense", d, d)?, dense("classifier.out_proj", n, d)?),
        };
        Ok(SequenceClassifier {
            word_embeddings: get(&format!("{p}.embeddings.word_embeddings.weight"), &[c.vocab_size, d])?,
            position_embeddings: get(
                &format!("{p}.embeddings.position_embeddings.weight"),
                &[c.max_position_embeddings, d],
            )?,
            token_type: be.upload_weight(&type0)?,
            embeddings_norm: norm(&format!("{p}.embeddings.LayerNorm"))?,
            layers,
            head_dense,
            head_out,
            config,
        })
    }

    /// Position ids of right-padded `ids [rows, width]`. RoBERTa numbers only non-pad tokens, from
    /// `pad + 1`, and gives pad tokens `pad` (transformers' `create_position_ids_from_input_ids`);
    /// BERT numbers every slot from 0.
    pub fn position_ids(&self, ids: &[u32], width: usize) -> Vec<u32> {
        let pad = self.config.pad_token_id;
        match self.config.arch {
            Arch::Bert => (0..ids.len()).map(|i| (i % width.max(1)) as u32).collect(),
            Arch::Roberta => ids
                .chunks(width.max(1))
                .flat_map(|row| {
                    let mut seen = 0;
                    row.iter().map(move |&id| {
                        if id == pad {
                            pad
                        } else {
                            seen += 1;
                            pad + seen
                        }
                    })
                })
                .collect(),
        }
    }

    /// `ids` and `positions` `[B, L]`, `lengths [B]` real tokens per row (right padding) →
    /// logits `[B, labels]` from each row's first token.
    pub fn logits(&self, be: &B, ids: &B::Ids, positions: &B::Ids, lengths: &B::Ids) -> Result<B::Tensor> {
        let c = &self.config;
        let (b, l) = (ids.shape()[0], ids.shape()[1]);
        let mut h = be.embedding(&self.word_embeddings, ids)?;
        be.add_assign(&mut h, &be.embedding(&self.position_embeddings, positions)?)?;
        be.bias_add(&mut h, &self.token_type)?;
        let mut h = layer_norm(be, &h, &self.embeddings_norm, c.layer_norm_eps)?;
        let spec = AttnSpec {
            heads: c.num_attention_heads,
            d_kv: c.d_head(),
            scale: 1.0 / (c.d_head() as f32).sqrt(),
            kv_len: l,
            key_lengths: Some(lengths),
            causal: false,
            q_offset: crate::backend::Position::At(0),
            bias: None,
            dropout: None,
        };
        for layer in &self.layers {
            let (q, k, v) = (dense(be, &h, &layer.query)?, dense(be, &h, &layer.key)?, dense(be, &h, &layer.value)?);
            let mut a =
                dense(be, &be.attention(AttnInputs::Apart { q: &q, k: &k, v: &v }, &spec)?, &layer.attention_output)?;
            be.add_assign(&mut a, &h)?;
            h = layer_norm(be, &a, &layer.attention_norm, c.layer_norm_eps)?;
            let inner = be.activation(&dense(be, &h, &layer.intermediate)?, Activation::GeluErf)?;
            let mut f = dense(be, &inner, &layer.output)?;
            be.add_assign(&mut f, &h)?;
            h = layer_norm(be, &f, &layer.output_norm, c.layer_norm_eps)?;
        }
        let first: Vec<u32> = (0..b).map(|i| (i * l) as u32).collect();
        let cls = be.gather_rows(&h, &be.upload_ids(&first, &[b])?)?;
        let pooled = be.activation(&dense(be, &cls, &self.head_dense)?, Activation::Tanh)?;
        dense(be, &pooled, &self.head_out)
    }
}

fn dense<B: Backend>(be: &B, x: &B::Tensor, d: &Dense<B>) -> Result<B::Tensor> {
    let mut y = be.linear(x, &d.weight, &[])?;
    be.bias_add(&mut y, &d.bias)?;
    Ok(y)
}

fn layer_norm<B: Backend>(be: &B, x: &B::Tensor, n: &LayerNorm<B>, eps: f32) -> Result<B::Tensor> {
    be.layer_norm(x, &n.weight, &n.bias, eps)
}
