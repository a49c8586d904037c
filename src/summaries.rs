//! Summaries of many dialogues at once: prompts, longest-first batches (little padding, the slowest
//! batch early), generation on the device, decoding; results in input order.

use crate::backend::Backend;
use crate::t5::{Fwd, GenConfig, Prompts, T5, generate};
use crate::text::{Prompter, pad_batch};
use anyhow::{Result, ensure};

/// Rows sorted longest first together: a window of this many batches is summarized before the
/// next, so that results can stream out in input order.
pub const WINDOW_BATCHES: usize = 8;

/// `(summary, generated ids)` per dialogue. Row i samples from RNG stream i, so a sample depends on
/// the seed and the dialogue's position only. `done(n)` reports progress.
#[allow(clippy::too_many_arguments)]
pub fn summarize<B: Backend, S: AsRef<str>>(
    be: &B,
    model: &T5<B>,
    prompter: &Prompter,
    dialogues: &[S],
    generation: &GenConfig,
    batch_size: usize,
    f: Fwd,
    mut done: impl FnMut(usize),
) -> Result<Vec<(String, Vec<u32>)>> {
    let mut results = Vec::with_capacity(dialogues.len());
    summarize_each(be, model, prompter, dialogues, generation, batch_size, f, |_, r| {
        results.push(r);
        done(1);
        Ok(())
    })?;
    Ok(results)
}

/// As `summarize`, but hands each `(summary, ids)` to `each(row, result)` in input order as soon as
/// its window of `WINDOW_BATCHES` batches is done; an error from `each` stops the work.
#[allow(clippy::too_many_arguments)]
pub fn summarize_each<B: Backend, S: AsRef<str>>(
    be: &B,
    model: &T5<B>,
    prompter: &Prompter,
    dialogues: &[S],
    generation: &GenConfig,
    batch_size: usize,
    f: Fwd,
    mut each: impl FnMut(usize, (String, Vec<u32>)) -> Result<()>,
) -> Result<()> {
    ensure!(batch_size > 0, "the batch size must be at least 1");
    let encoded: Vec<Vec<u32>> = dialogues.iter().map(|d| prompter.encode(d.as_ref())).collect::<Result<_>>()?;
    let window = batch_size * WINDOW_BATCHES;
    for start in (0..encoded.len()).step_by(window) {
        let end = (start + window).min(encoded.len());
        let mut order: Vec<usize> = (start..end).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let mut results = vec![(String::new(), Vec::new()); end - start];
        for chunk in order.chunks(batch_size) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let streams: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
            let prompts = Prompts::upload(be, &pad_batch(&seqs, model.config.pad_token_id), &streams)?;
            for (&i, g) in chunk.iter().zip(generate(be, model, None, &prompts, generation, f)?) {
                results[i - start] = (prompter.decode(&g.tokens)?, g.tokens);
            }
        }
        for (k, r) in results.into_iter().enumerate() {
            each(start + k, r)?;
        }
    }
    Ok(())
}
