//! Batched generation with a KV cache, as Hugging Face's `generate` (transformers 5.17): greedy or
//! sampled, each row stopping at its own EOS, or beam search (beam.rs), with the logits processors
//! Hugging Face applies in each; returns the tokens with the policy's log-probabilities and the
//! value head's estimates along the way.

use super::model::{Fwd, T5};
use super::value_head::ValueHead;
use crate::backend::{Backend, Position, ProcessSpec, SampleSpec, Shaped};
use crate::text::Batch;
use anyhow::{Result, bail, ensure};

pub use crate::backend::EarlyStopping;

/// Generation settings with Hugging Face's names and defaults (greedy decoding), except
/// `max_new_tokens`, whose default here is 64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// Draw from the distribution (Hugging Face's `do_sample`); false is greedy.
    pub sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// Beams per prompt; 1 is greedy or sampled decoding.
    pub num_beams: usize,
    /// Beam search scores a finished hypothesis `Σ log-probs / length^length_penalty`.
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// No n-gram of this size occurs twice in the decoder ids (0: off).
    pub no_repeat_ngram_size: usize,
    /// Scores of tokens already in the decoder ids are divided (or, when negative, multiplied) by
    /// this (1.0: off).
    pub repetition_penalty: f32,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            min_new_tokens: 0,
            sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            no_repeat_ngram_size: 0,
            repetition_penalty: 1.0,
        }
    }
}

impl std::str::FromStr for EarlyStopping {
    type Err = anyhow::Error;

    /// Hugging Face's values: true, false or "never".
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "false" | "False" => Ok(Self::False),
            "true" | "True" => Ok(Self::True),
            "never" => Ok(Self::Never),
            _ => bail!("early_stopping is true, false or never, not {s:?}"),
        }
    }
}

impl serde::Serialize for EarlyStopping {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::False => s.serialize_bool(false),
            Self::True => s.serialize_bool(true),
            Self::Never => s.serialize_str("never"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for EarlyStopping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Given {
            Flag(bool),
            Word(String),
        }
        match Given::deserialize(d)? {
            Given::Flag(true) => Ok(Self::True),
            Given::Flag(false) => Ok(Self::False),
            Given::Word(w) if w == "never" => Ok(Self::Never),
            Given::Word(w) => {
                Err(serde::de::Error::custom(format!("early_stopping is true, false or \"never\", not {w:?}")))
            }
        }
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
        let most = crate::backend::cuda::launch::MAX_BEAMS as usize;
        ensure!((1..=most).contains(&self.num_beams), "num_beams must be between 1 and {most}, not {}", self.num_beams);
        ensure!(
            !(self.sample && self.num_beams > 1),
            "sampling with num_beams > 1 (beam sampling) is not supported: use num_beams 1 with do_sample, or beams without"
        );
        ensure!(self.length_penalty.is_finite(), "length_penalty must be a finite number");
        ensure!(
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "repetition_penalty must be a positive number, not {}",
            self.repetition_penalty
        );
        Ok(())
    }

    /// The processors that see the decoder ids. min-new-tokens is left to `select_tokens` in
    /// greedy and sampled decoding (it keeps its place in Hugging Face's order, since the
    /// processors before it only ban or rescale) and applied here in beam search.
    pub(super) fn process_spec(&self, eos: u32, decoder_start: u32, log_softmax: bool) -> ProcessSpec {
        ProcessSpec {
            log_softmax,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            min_new_tokens: if log_softmax { self.min_new_tokens } else { 0 },
            eos,
            decoder_start,
        }
    }
}

/// One row's output (in beam search, the prompt's best hypothesis).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    /// Generated ids without the decoder start token, up to and including EOS when produced.
    pub tokens: Vec<u32>,
    /// log p(token) under the model's own (unprocessed) distribution, one per token: in beam
    /// search too, not the beam's processed scores.
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

/// Runs a decoding `step` at most `t` times and returns how many ran. Everything a step touches
/// lives across steps, so the first runs eagerly (it builds lookup tables and warms the libraries
/// up), the second is recorded and every later one replays it. `all_done` reads the device's
/// finished flags after the first step and then every `CHECK_EVERY`.
pub(super) fn run_decoding<B: Backend>(
    be: &B,
    t: usize,
    step: &mut dyn FnMut() -> Result<()>,
    all_done: &dyn Fn() -> Result<bool>,
    on_token: &mut dyn FnMut(usize),
) -> Result<usize> {
    let mut graph = None;
    let mut steps = 0;
    while steps < t {
        if steps == 0 {
            step()?;
        } else {
            be.run_step(&mut graph, step)?;
        }
        steps += 1;
        on_token(steps);
        if (steps % CHECK_EVERY == 0 || steps == 1) && all_done()? {
            break;
        }
    }
    Ok(steps)
}

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
    if cfg.num_beams > 1 {
        ensure!(value_head.is_none(), "beam search does not compute value-head estimates");
        return super::beam::beam_search(be, model, prompts, cfg, f, on_token);
    }
    let c = &model.config;
    let b = prompts.ids.shape()[0];
    let t = cfg.max_new_tokens;
    let enc = model.encode(be, &prompts.ids, &prompts.lengths, f)?;
    let mut cache = model.start_decoding(be, &enc, &prompts.lengths, t, f)?;
    let spec = cfg.sample_spec(c.eos_token_id, c.pad_token_id);
    let process = cfg.process_spec(c.eos_token_id, c.decoder_start_token_id, false);
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
        // The processors read the tokens so far, which `tokens` holds.
        let processed = if process.any() { Some(be.process_logits(&logits, &tokens, &process, at)?) } else { None };
        let finished = &mut finished.borrow_mut();
        be.select_tokens(&logits, processed.as_ref(), &spec, at, &prompts.streams, finished, &mut next, &mut logprob)?;
        be.write_ids(&mut tokens, &next, at)?;
        be.write_rows(&mut logprobs, &logprob, at)?;
        if let Some(vh) = value_head {
            be.write_rows(&mut values, &vh.forward(be, &hidden)?, at)?;
        }
        be.advance(&mut step_counter, 1)
    };
    let all_done = || Ok(be.download_ids(&finished.borrow())?.iter().all(|&x| x != 0));
    let steps = run_decoding(be, t, &mut step, &all_done, on_token)?;
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
