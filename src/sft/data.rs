//! The (dialogue, summary) pairs supervised fine-tuning reads: tokenized once, then served as
//! teacher-forcing batches in a fresh seeded order every epoch, similar lengths grouped so that
//! padding costs little.

use crate::text::{self, Prompter};
use anyhow::{Result, anyhow, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// One tokenized pair: the prompt's ids and the summary's, both ending in EOS.
#[derive(Clone, Debug)]
pub struct Pair {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

pub struct Pairs {
    pub pairs: Vec<Pair>,
    /// The raw texts, for ROUGE.
    pub dialogues: Vec<String>,
    pub summaries: Vec<String>,
}

/// A teacher-forcing batch on the host: prompts right-padded, the decoder's inputs (the start
/// token, then the target shifted right), the labels, and each label's weight (1, or 0 on padding).
#[derive(Clone, Debug, PartialEq)]
pub struct SftBatch {
    pub source: text::Batch,
    pub decoder_input: Vec<u32>,
    pub labels: Vec<u32>,
    pub mask: Vec<f32>,
    /// Target positions per row.
    pub width: usize,
}

impl SftBatch {
    /// `start` is the decoder start token, `pad` pads both sides.
    pub fn new(pairs: &[&Pair], start: u32, pad: u32) -> Self {
        let sources: Vec<Vec<u32>> = pairs.iter().map(|p| p.source.clone()).collect();
        let width = pairs.iter().map(|p| p.target.len()).max().unwrap_or(1).max(1);
        let n = pairs.len() * width;
        let (mut decoder_input, mut labels, mut mask) = (vec![pad; n], vec![pad; n], vec![0.0; n]);
        for (row, p) in pairs.iter().enumerate() {
            for (i, &t) in p.target.iter().enumerate() {
                let at = row * width + i;
                decoder_input[at] = if i == 0 { start } else { p.target[i - 1] };
                labels[at] = t;
                mask[at] = 1.0;
            }
        }
        Self { source: text::pad_batch(&sources, pad), decoder_input, labels, mask, width }
    }

    /// Label positions that count.
    pub fn tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// Tokenizes a summary as the labels of one row: its ids with EOS last, cut to `max_len`.
pub fn encode_target(prompter: &Prompter, summary: &str, max_len: usize) -> Result<Vec<u32>> {
    let mut ids = prompter.tokenize(summary)?;
    let eos = prompter.eos();
    if ids.last() != Some(&eos) {
        ids.push(eos);
    }
    if ids.len() > max_len {
        ids.truncate(max_len - 1);
        ids.push(eos);
    }
    Ok(ids)
}

impl Pairs {
    /// Rows with a non-empty dialogue, up to `limit` of them (0: all); an empty summary trains the
    /// model to stop at once. Errors name the file, the row and the field.
    pub fn load(
        path: &Path,
        (dialogue_field, summary_field): (&str, &str),
        limit: usize,
        prompter: &Prompter,
        max_target_len: usize,
    ) -> Result<Self> {
        let name = path.to_string_lossy();
        let rows = text::read_jsonl(&name)?;
        let (mut pairs, mut dialogues, mut summaries) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in rows.iter().enumerate() {
            let d = text::string_field(r, dialogue_field, i, &name)?;
            let s = text::string_field(r, summary_field, i, &name)?;
            if d.trim().is_empty() {
                continue;
            }
            pairs.push(Pair {
                source: prompter.encode(d)?,
                target: encode_target(prompter, s, max_target_len).map_err(|e| anyhow!("{name} row {}: {e}", i + 1))?,
            });
            dialogues.push(d.to_string());
            summaries.push(s.to_string());
            if pairs.len() == limit {
                break;
            }
        }
        ensure!(!pairs.is_empty(), "{name} holds no row with a non-empty \"{dialogue_field}\"");
        Ok(Self { pairs, dialogues, summaries })
    }

    /// Epoch `epoch`'s batches as indices: a seeded shuffle, then within windows of 50 batches the
    /// rows sorted by length and the batches shuffled again, so a batch holds similar lengths and
    /// the order stays random. Depends only on (seed, epoch).
    pub fn epoch(&self, epoch: usize, batch: usize, seed: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(crate::seeds::sft_epoch(seed, epoch));
        let mut order: Vec<usize> = (0..self.pairs.len()).collect();
        order.shuffle(&mut rng);
        let mut batches = Vec::new();
        for window in order.chunks(batch * 50) {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| self.pairs[i].source.len() + self.pairs[i].target.len());
            batches.extend(w.chunks(batch).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_inputs_are_the_labels_shifted_right() {
        let a = Pair { source: vec![5, 1], target: vec![7, 8, 1] };
        let b = Pair { source: vec![6, 6, 1], target: vec![9, 1] };
        let batch = SftBatch::new(&[&a, &b], 0, 0);
        assert_eq!(batch.width, 3);
        assert_eq!(batch.decoder_input, vec![0, 7, 8, 0, 9, 0]);
        assert_eq!(batch.labels, vec![7, 8, 1, 9, 1, 0]);
        assert_eq!(batch.mask, vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        assert_eq!(batch.tokens(), 5);
        assert_eq!(batch.source.lengths, vec![2, 3]);
    }

    #[test]
    fn every_epoch_visits_each_pair_once() {
        let p = Pairs {
            pairs: (0..237).map(|i| Pair { source: vec![1; i % 17 + 1], target: vec![1] }).collect(),
            dialogues: Vec::new(),
            summaries: Vec::new(),
        };
        for epoch in 0..2 {
            let mut seen: Vec<usize> = p.epoch(epoch, 4, 3).concat();
            seen.sort();
            assert_eq!(seen, (0..237).collect::<Vec<_>>());
        }
        assert_ne!(p.epoch(0, 4, 3), p.epoch(1, 4, 3));
        assert_eq!(p.epoch(1, 4, 3), p.epoch(1, 4, 3));
    }
}
