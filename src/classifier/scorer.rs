//! Texts in, per-label probabilities out: the classifier's tokenizer with Detoxify's truncation,
//! length-sorted right-padded batches through the model, sigmoid, results in input order.

use super::config::ClassifierConfig;
use super::model::SequenceClassifier;
use crate::backend::Backend;
use crate::text::{load_tokenizer, pad_batch, tokenizer_path};
use anyhow::{Result, anyhow, ensure};
use rayon::prelude::*;
use std::path::Path;
use tokenizers::{PostProcessor, Tokenizer, TruncationParams};

/// A loaded reward model: the network and its tokenizer.
pub struct Classifier<B: Backend> {
    pub model: SequenceClassifier<B>,
    tokenizer: Tokenizer,
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl<B: Backend> Classifier<B> {
    /// Loads a classifier directory (config.json, safetensors, tokenizer.json), or its weights with
    /// an explicit tokenizer file.
    pub fn load(be: &B, dir: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        let model = SequenceClassifier::load(be, dir)?;
        let path = tokenizer_path(dir, tokenizer);
        let mut tokenizer = load_tokenizer(&path)?;
        let c = &model.config;
        let size = tokenizer.get_vocab_size(true);
        ensure!(
            size <= c.vocab_size,
            "tokenizer {} has {size} tokens but the classifier's embedding has only {} rows",
            path.display(),
            c.vocab_size
        );
        let added = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        ensure!(
            c.max_tokens() > added,
            "the classifier takes {} tokens, no more than the {added} special tokens tokenizer {} adds",
            c.max_tokens(),
            path.display()
        );
        // Padding is done per batch below; truncation keeps the closing special token, as
        // Detoxify's `tokenizer(text, truncation=True)` does.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: c.max_tokens(), ..TruncationParams::default() }))
            .map_err(|e| anyhow!("setting truncation on tokenizer {}: {e}", path.display()))?;
        Ok(Self { model, tokenizer })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.model.config
    }

    /// The labels worth reporting: all of them, except Detoxify `unbiased`'s identity outputs.
    pub fn reported_labels(&self) -> &[String] {
        &self.config().labels[..self.config().reported_labels()]
    }

    /// The output index of a label, for the reward (`toxicity`).
    pub fn label_index(&self, name: &str) -> Result<usize> {
        let labels = &self.config().labels;
        labels
            .iter()
            .position(|l| l == name)
            .ok_or_else(|| anyhow!("the classifier has no label \"{name}\" (its labels: {})", labels.join(", ")))
    }

    /// A text's ids with the tokenizer's special tokens, truncated to the model's limit.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc =
            self.tokenizer.encode(text, true).map_err(|e| anyhow!("tokenizing a text for the classifier: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Logits `[texts][labels]` in input order. Texts are batched longest first, `batch_size` at a
    /// time, so each batch pads little; `done(n)` is called after each batch of `n` texts.
    pub fn logits<S: AsRef<str> + Sync>(
        &self,
        be: &B,
        texts: &[S],
        batch_size: usize,
        mut done: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        ensure!(batch_size > 0, "batch size must be at least 1");
        // Tokenizing row by row on one core took most of a rollout's reward phase.
        let encoded: Vec<Vec<u32>> = texts.par_iter().map(|t| self.encode(t.as_ref())).collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let n = self.config().labels.len();
        let mut out = vec![Vec::new(); encoded.len()];
        for chunk in order.chunks(batch_size) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let batch = pad_batch(&seqs, self.config().pad_token_id);
            let shape = [batch.rows, batch.width];
            let positions = self.model.position_ids(&batch.ids, batch.width);
            let logits = self.model.logits(
                be,
                &be.upload_ids(&batch.ids, &shape)?,
                &be.upload_ids(&positions, &shape)?,
                &be.upload_ids(&batch.lengths, &[batch.rows])?,
            )?;
            let host = be.download(&logits)?;
            for (&i, row) in chunk.iter().zip(host.chunks(n)) {
                out[i] = row.to_vec();
            }
            done(chunk.len());
        }
        Ok(out)
    }

    /// Probabilities `[texts][labels]` (sigmoid of each logit, every label) in input order.
    pub fn score<S: AsRef<str> + Sync>(
        &self,
        be: &B,
        texts: &[S],
        batch_size: usize,
        done: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let logits = self.logits(be, texts, batch_size, done)?;
        Ok(logits.into_iter().map(|row| row.into_iter().map(sigmoid).collect()).collect())
    }
}
