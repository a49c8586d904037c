//! Response masks of a batch of generated summaries: which of the `[rows, cols]` per-token slots
//! (log-probs, values, rewards) belong to a response, TRL 0.4.7's seq2seq way or with the first
//! generated token.
//!
//! Slot `s` of a row holds generated token `s` (the decoder start token is not a slot): its log-prob
//! and the value of the state that chose it, as `t5::generate` returns them. TRL 0.4.7's
//! `batched_forward_pass` lines its tensors up the same way (log-probs of `decoder_input_ids[:, 1:]`
//! from `logits[:, :-1]`, values `[:, :-1]`) and then masks slots `1..n` of an `n`-token response.

use super::FirstToken;
use anyhow::{Result, ensure};

/// The mask `[lengths.len(), cols]` for responses of `lengths[i]` generated tokens each (EOS
/// included when generated): slots `0..n` with `FirstToken::Keep`, `1..n` with `FirstToken::Drop`.
pub fn response_mask_from_lengths(lengths: &[usize], cols: usize, first: FirstToken) -> Result<Vec<f32>> {
    let start = match first {
        FirstToken::Keep => 0,
        FirstToken::Drop => 1,
    };
    let mut mask = vec![0.0; lengths.len() * cols];
    for (row, &n) in lengths.iter().enumerate() {
        ensure!(n <= cols, "response {row} has {n} tokens, more than the {cols} columns");
        mask[row * cols..][start.min(n)..n].fill(1.0);
    }
    Ok(mask)
}

/// The mask `[responses.len(), cols]` of generated responses (ids after the decoder start token).
/// A response ends at its first `eos`, inclusive, as TRL's `_generate_batched(remove_padding=True)`
/// cuts it; a response without `eos` (stopped at `max_new_tokens`) is all real, so pass such rows
/// unpadded, as `t5::generate` returns them.
pub fn response_mask<R: AsRef<[u32]>>(responses: &[R], cols: usize, eos: u32, first: FirstToken) -> Result<Vec<f32>> {
    let lengths: Vec<usize> = responses
        .iter()
        .map(|r| {
            let r = r.as_ref();
            r.iter().position(|&t| t == eos).map_or(r.len(), |i| i + 1)
        })
        .collect();
    response_mask_from_lengths(&lengths, cols, first)
}
