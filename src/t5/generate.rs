//! Batched generation with a KV cache: greedy or sampled, each row stopping at its own EOS, returning
//! the tokens with the policy's log-probabilities and the value head's estimates along the way.

use super::model::{Fwd, T5};
use super::value_head::ValueHead;
use crate::backend::{Backend, SampleSpec, Shaped};
use crate::text::Batch;
use anyhow::{Result, ensure};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// Draw from the distribution; false is greedy.
    pub sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, min_new_tokens: 0, sample: false, temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl GenConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_new_tokens > 0, "max_new_tokens must be at least 1");
        ensure!(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens ({}) exceeds max_new_tokens ({})",
            self.min_new_tokens,
            self.max_new_tokens
        );
        ensure!(self.temperature > 0.0 && self.temperature.is_finite(), "temperature must be positive");
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1]");
        Ok(())
    }
}

/// One row's output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    /// Generated ids without the decoder start token, up to and including EOS when produced.
    pub tokens: Vec<u32>,
    /// log p(token) under the model's own (unprocessed) distribution, one per token.
    pub logprobs: Vec<f32>,
    /// The value head's estimate at the state that chose each token (empty without a value head).
    pub values: Vec<f32>,
}

/// Prompts on the device: right-padded `ids [B, L]`, `lengths [B]`, and each row's index in the
/// whole data set (`streams [B]`), which keys its sampling RNG.
pub struct Prompts<B: Backend> {
    pub ids: B::Ids,
    pub lengths: B::Ids,
    pub streams: B::Ids,
}

impl<B: Backend> Prompts<B> {
    pub fn upload(be: &B, batch: &Batch, streams: &[u32]) -> Result<Self> {
        ensure!(streams.len() == batch.rows, "{} stream ids for {} rows", streams.len(), batch.rows);
        Ok(Self {
            ids: be.upload_ids(&batch.ids, &[batch.rows, batch.width])?,
            lengths: be.upload_ids(&batch.lengths, &[batch.rows])?,
            streams: be.upload_ids(streams, &[batch.rows])?,
        })
    }
}

pub fn generate<B: Backend>(
    be: &B,
    model: &T5<B>,
    value_head: Option<&ValueHead<B>>,
    prompts: &Prompts<B>,
    cfg: &GenConfig,
    f: Fwd,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let c = &model.config;
    let (ids, lengths) = (&prompts.ids, &prompts.lengths);
    let b = ids.shape()[0];
    let enc = model.encode(be, ids, lengths, f)?;
    let mut cache = model.start_decoding(be, &enc, lengths.clone(), cfg.max_new_tokens, f)?;
    let mut finished = be.upload_ids(&vec![0; b], &[b])?;
    let mut next = be.upload_ids(&vec![c.decoder_start_token_id; b], &[b, 1])?;
    let mut out = vec![Generation::default(); b];
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let hidden = model.decode(be, &next, &mut cache, f)?;
        let logits = model.lm_logits(be, &hidden)?;
        let spec = SampleSpec {
            greedy: !cfg.sample,
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            seed: cfg.seed,
            eos: c.eos_token_id,
            pad: c.pad_token_id,
            suppress_eos: step < cfg.min_new_tokens,
        };
        let sel = be.select_tokens(&logits, &spec, step, &prompts.streams, &mut finished)?;
        let tokens = be.download_ids(&sel.tokens)?;
        let logprobs = be.download(&sel.logprobs)?;
        let values = match value_head {
            Some(vh) => be.download(&vh.forward(be, &hidden)?)?,
            None => Vec::new(),
        };
        for row in 0..b {
            if done[row] {
                continue;
            }
            let g = &mut out[row];
            g.tokens.push(tokens[row]);
            g.logprobs.push(logprobs[row]);
            if let Some(v) = values.get(row) {
                g.values.push(*v);
            }
            done[row] = tokens[row] == c.eos_token_id;
        }
        if done.iter().all(|d| *d) {
            break;
        }
        next = sel.tokens;
    }
    Ok(out)
}
