//! The seq2seq policy PPO trains: T5 with LoRA adapters and TRL's value head. It scores
//! (prompt, response) pairs teacher-forced — each response token's log-probability, the entropy at
//! its position, and the value of the state that chose it — and backpropagates gradients of those
//! scores to the adapters and the value head.

use crate::backend::{Backend, Dropout, Shaped};
use crate::t5::model::{Fwd, T5};
use crate::t5::train::{LoraGrads, Tape};
use crate::t5::{Prompts, ValueHead};
use anyhow::{Result, ensure};

/// The value head's dropout stream, apart from every module's (`Part::slot`).
const VALUE_HEAD_STREAM: u64 = u64::MAX;

pub struct Policy<B: Backend> {
    pub model: T5<B>,
    pub value_head: ValueHead<B>,
    /// TRL's `ValueHead` dropout (0.1 in TRL), applied in training passes only.
    pub value_dropout: f32,
}

/// Responses laid out for teacher forcing: `decoder_in [B, T]` is the decoder start token then all
/// but the last token of each response, `targets [B·T]` the response tokens themselves (pad past
/// a response's end), so that position t's logits score token t.
pub struct Responses<B: Backend> {
    pub decoder_in: B::Ids,
    pub targets: B::Ids,
    pub rows: usize,
    pub cols: usize,
}

impl<B: Backend> Responses<B> {
    /// `responses[i]` are row i's generated tokens, at most `cols` of them.
    pub fn upload(be: &B, responses: &[Vec<u32>], cols: usize, start: u32, pad: u32) -> Result<Self> {
        ensure!(cols > 0, "responses need at least one token slot");
        let rows = responses.len();
        let mut dec = vec![pad; rows * cols];
        let mut tgt = vec![pad; rows * cols];
        for (r, toks) in responses.iter().enumerate() {
            ensure!(toks.len() <= cols, "response {r} has {} tokens, more than the {cols} slots", toks.len());
            dec[r * cols] = start;
            for (t, &tok) in toks.iter().enumerate() {
                tgt[r * cols + t] = tok;
                if t + 1 < cols {
                    dec[r * cols + t + 1] = tok;
                }
            }
        }
        Ok(Self {
            decoder_in: be.upload_ids(&dec, &[rows, cols])?,
            targets: be.upload_ids(&tgt, &[rows * cols])?,
            rows,
            cols,
        })
    }
}

/// One scoring pass: per-token results on the host, and what the backward needs on the device.
pub struct Scored<B: Backend> {
    /// `[B·T]` row-major, one per response slot (slots past a response's end score pad).
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
    pub values: Vec<f32>,
    saved: Option<Saved<B>>,
}

struct Saved<B: Backend> {
    tape: Tape<B>,
    /// The decoder's final states `[B·T, d]` and the logits `[B·T, V]`.
    hidden: B::Tensor,
    logits: B::Tensor,
    /// The value head's input when its dropout ran (otherwise `hidden`).
    dropped: Option<(B::Tensor, Dropout)>,
}

/// Gradients of everything the optimiser updates.
pub struct PolicyGrads<B: Backend> {
    pub lora: LoraGrads<B>,
    pub value_weight: B::Tensor,
    pub value_bias: B::Tensor,
}

impl<B: Backend> PolicyGrads<B> {
    pub fn zeros(be: &B, policy: &Policy<B>) -> Result<Self> {
        Ok(Self {
            lora: LoraGrads::zeros(be, &policy.model)?,
            value_weight: be.zeros(policy.value_head.weight.shape())?,
            value_bias: be.zeros(policy.value_head.bias.shape())?,
        })
    }
}

impl<B: Backend> Policy<B> {
    /// Scores `responses` to `prompts`, with the adapters' and the value head's dropout drawn from
    /// `f.dropout_seed` when it is set. `train` keeps what `backward` needs.
    pub fn score(
        &self,
        be: &B,
        prompts: &Prompts<B>,
        responses: &Responses<B>,
        f: Fwd,
        train: bool,
    ) -> Result<Scored<B>> {
        let (hidden, tape) = if train {
            let (h, t) = self.model.forward_train(be, &prompts.ids, &prompts.lengths, &responses.decoder_in, f)?;
            (h, Some(t))
        } else {
            let (_, h) = self.model.forward(be, &prompts.ids, &prompts.lengths, &responses.decoder_in, f)?;
            (h, None)
        };
        let (n, d) = (responses.rows * responses.cols, self.model.config.d_model);
        let hidden = be.reshape(hidden, &[n, d])?;
        let logits = self.model.lm_logits(be, &hidden)?;
        let (lp, ent) = be.token_logprobs(&logits, &responses.targets)?;
        let dropped = match f.dropout_seed.filter(|_| self.value_dropout > 0.0) {
            Some(seed) => {
                let drop = Dropout { p: self.value_dropout, seed, stream: VALUE_HEAD_STREAM };
                Some((be.dropout(&hidden, &drop)?, drop))
            }
            None => None,
        };
        let value_in = dropped.as_ref().map(|(x, _)| x).unwrap_or(&hidden);
        let values = be.download(&self.value_head.forward(be, value_in)?)?;
        Ok(Scored {
            logprobs: be.download(&lp)?,
            entropy: be.download(&ent)?,
            values,
            saved: tape.map(|tape| Saved { tape, hidden, logits, dropped }),
        })
    }

    /// Accumulates into `grads` the gradients of `loss_scale · Σ (d_logprobs·logprob + d_values·value)`
    /// for a training pass `scored` of `responses` to `prompts`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        prompts: &Prompts<B>,
        responses: &Responses<B>,
        scored: Scored<B>,
        d_logprobs: &[f32],
        d_values: &[f32],
        loss_scale: f32,
        grads: &mut PolicyGrads<B>,
    ) -> Result<()> {
        let saved = scored.saved.ok_or_else(|| anyhow::anyhow!("backward needs a training pass (score with train)"))?;
        let n = responses.rows * responses.cols;
        ensure!(
            d_logprobs.len() == n && d_values.len() == n,
            "gradients for {} / {} slots, expected {n}",
            d_logprobs.len(),
            d_values.len()
        );
        let scaled = |g: &[f32]| -> Vec<f32> { g.iter().map(|x| x * loss_scale).collect() };
        let dlp = be.upload(&scaled(d_logprobs), &[n])?;
        let mut dlogits = be.token_logprobs_backward(&saved.logits, &responses.targets, &dlp)?;
        if let Some(s) = self.model.config.lm_head_scale() {
            be.scale_assign(&mut dlogits, s)?;
        }
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.shared);
        let d = saved.hidden.shape()[1];
        let mut d_hidden = be.zeros(&[n, d])?;
        be.linear_backward(&saved.hidden, head, &[], &dlogits, Some(&mut d_hidden), None, &mut [])?;

        let dv = be.upload(&scaled(d_values), &[n, 1])?;
        let value_in = saved.dropped.as_ref().map(|(x, _)| x).unwrap_or(&saved.hidden);
        let mut d_value_in = be.zeros(&[n, d])?;
        be.affine_backward(
            value_in,
            &self.value_head.weight,
            &dv,
            Some(&mut d_value_in),
            &mut grads.value_weight,
            Some(&mut grads.value_bias),
        )?;
        let d_value_in = match &saved.dropped {
            Some((_, drop)) => be.dropout(&d_value_in, drop)?,
            None => d_value_in,
        };
        be.add_assign(&mut d_hidden, &d_value_in)?;
        let d_hidden = be.reshape(d_hidden, &[responses.rows, responses.cols, d])?;
        self.model.backward(be, &saved.tape, &prompts.lengths, &d_hidden, &mut grads.lora)
    }
}
