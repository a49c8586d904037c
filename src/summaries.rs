//! Summaries of many dialogues at once: prompts, longest-first batches (little padding, the slowest
//! batch early), generation on the device, decoding; results in input order.

use crate::backend::Backend;
use crate::t5::{Fwd, GenConfig, Prompts, T5, generate};
use crate::text::{Prompter, pad_batch};
use anyhow::{Result, ensure};

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
    ensure!(batch_size > 0, "the batch size must be at least 1");
    let encoded: Vec<Vec<u32>> = dialogues.iter().map(|d| prompter.encode(d.as_ref())).collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
    let mut results = vec![(String::new(), Vec::new()); encoded.len()];
    for chunk in order.chunks(batch_size) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
        let streams: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
        let prompts = Prompts::upload(be, &pad_batch(&seqs, model.config.pad_token_id), &streams)?;
        for (&i, g) in chunk.iter().zip(generate(be, model, None, &prompts, generation, f)?) {
            results[i] = (prompter.decode(&g.tokens)?, g.tokens);
        }
        done(chunk.len());
    }
    Ok(results)
}
