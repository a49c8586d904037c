//! The generation options `detox summarize` and `detox eval` share, with Hugging Face's names and
//! defaults (greedy decoding; `max_new_tokens` 64).

use crate::t5::{EarlyStopping, GenConfig};
use anyhow::{Context, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    /// Longest summary, in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Shortest summary, in tokens (EOS is suppressed before it).
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Sample instead of greedy decoding (Hugging Face's do_sample; seeded, see --seed).
    #[arg(long, visible_alias = "do-sample")]
    pub sample: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens when sampling (0 keeps all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p when sampling.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling seed; a row's sample depends only on the seed and the row's position in the input.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Beam search with this many beams per dialogue (1: greedy, or sampling with --do-sample; beams
    /// do not sample).
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Beam search scores a finished summary by its summed log-probability over length^this: above
    /// 0 favours longer summaries, below 0 shorter ones.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub length_penalty: f64,
    /// When beam search stops a dialogue: false (once num_beams summaries are finished and no
    /// running beam can score better at its current length), true (once num_beams are finished) or
    /// never (as false, but a positive length penalty scores running beams at the longest length).
    #[arg(long, default_value = "false")]
    pub early_stopping: EarlyStopping,
    /// No n-gram of this many tokens occurs twice in a summary (0: off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram_size: usize,
    /// Penalise tokens already in the summary: their scores are divided by this (multiplied when
    /// negative); 1.0 is off, above 1 discourages repetition.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
}

impl GenArgs {
    /// The settings these options give, checked.
    pub fn config(&self) -> Result<GenConfig> {
        let g = GenConfig {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            sample: self.sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            repetition_penalty: self.repetition_penalty,
        };
        g.validate().context("invalid generation options")?;
        Ok(g)
    }
}
