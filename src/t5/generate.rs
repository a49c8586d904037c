//! Batched generation with a KV cache: greedy or sampled, each row stopping at its own EOS, returning
//! the tokens with the policy's log-probabilities and the value head's estimates along the way.

use super::model::{Fwd, T5};
use super::value_head::ValueHead;
use crate::backend::{Backend, Position, SampleSpec, Shaped};
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

impl GenConfig {
    /// The backend's sampling parameters for these settings.
    fn sample_spec(&self, eos: u32, pad: u32) -> SampleSpec {
        SampleSpec {
            greedy: !self.sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            eos,
            pad,
            min_new_tokens: self.min_new_tokens,
        }
    }
}

/// How often the host looks at the finished flags to stop early: each look waits for the GPU.
const CHECK_EVERY: usize = 4;

pub fn generate<B: Backend>(
    be: &B,
    model: &T5<B>,
    value_head: Option<&ValueHead<B>>,
    prompts: &Prompts<B>,
    cfg: &GenConfig,
    f: Fwd,
) -> Result<Vec<Generation>> {
    generate_reporting(be, model, value_head, prompts, cfg, f, &mut |_| {})
}

/// `generate`, calling `on_token(n)` once the `n`th token of every row has been queued, so that a
/// progress display can follow a long rollout (on the CPU a decoding step takes seconds).
pub fn generate_reporting<B: Backend>(
    be: &B,
    model: &T5<B>,
    value_head: Option<&ValueHead<B>>,
    prompts: &Prompts<B>,
    cfg: &GenConfig,
    f: Fwd,
    on_token: &mut dyn FnMut(usize),
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let c = &model.config;
    let b = prompts.ids.shape()[0];
    let t = cfg.max_new_tokens;
    let enc = model.encode(be, &prompts.ids, &prompts.lengths, f)?;
    let mut cache = model.start_decoding(be, &enc, &prompts.lengths, t, f)?;
    let spec = cfg.sample_spec(c.eos_token_id, c.pad_token_id);
    // Everything a step touches lives across steps, so the step can be recorded once and replayed.
    // Shared between the recorded step, which sets the flags, and the loop, which reads them.
    let finished = std::cell::RefCell::new(be.upload_ids(&vec![0; b], &[b])?);
    let mut next = be.upload_ids(&vec![c.decoder_start_token_id; b], &[b, 1])?;
    let mut step_counter = be.upload_ids(&[0], &[1])?;
    let mut logprob = be.zeros(&[b, 1, 1])?;
    let mut tokens = be.upload_ids(&vec![c.pad_token_id; b * t], &[b, t])?;
    let mut logprobs = be.zeros(&[b, t, 1])?;
    let mut values = be.zeros(&[b, t, 1])?;
    let mut step = || -> Result<()> {
        let hidden = model.decode(be, &next, &mut cache, f)?;
        let logits = model.lm_logits(be, &hidden)?;
        let at = Position::Counter(&step_counter);
        be.select_tokens(&logits, &spec, at, &prompts.streams, &mut finished.borrow_mut(), &mut next, &mut logprob)?;
        be.write_ids(&mut tokens, &next, at)?;
        be.write_rows(&mut logprobs, &logprob, at)?;
        if let Some(vh) = value_head {
            be.write_rows(&mut values, &vh.forward(be, &hidden)?, at)?;
        }
        be.advance(&mut step_counter, 1)
    };
    // The first step runs eagerly (it builds lookup tables and warms the libraries up); the
    // second is recorded and every later one replays it.
    let mut graph = None;
    let mut steps = 0;
    while steps < t {
        if steps == 0 {
            step()?;
        } else {
            be.run_step(&mut graph, &mut step)?;
        }
        steps += 1;
        on_token(steps);
        if (steps % CHECK_EVERY == 0 || steps == 1) && be.download_ids(&finished.borrow())?.iter().all(|&x| x != 0) {
            break;
        }
    }
    let tokens = be.download_ids(&tokens)?;
    let logprobs = be.download(&logprobs)?;
    let values = be.download(&values)?;
    Ok((0..b)
        .map(|row| {
            let mut g = Generation::default();
            for s in 0..steps {
                let tok = tokens[row * t + s];
                g.tokens.push(tok);
                g.logprobs.push(logprobs[row * t + s]);
                if value_head.is_some() {
                    g.values.push(values[row * t + s]);
                }
                if tok == c.eos_token_id {
                    break;
                }
            }
            g
        })
        .collect())
}
