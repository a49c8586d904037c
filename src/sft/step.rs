//! One supervised fine-tuning step, top-down: `sft_gradients` (upload the batch, the teacher-forced
//! forward with its tape, cross-entropy with label smoothing at the LM head, the backward into every
//! weight or into the adapters), then `sft_update` (unscale and clip, AdamW or Adafactor on the f32
//! masters, the model's weights refreshed from them). Also the held-out loss. Both report the plain
//! cross-entropy beside the (smoothed) objective.

use super::adafactor::{AdafactorState, adafactor_slots, zero_states};
use super::data::SftBatch;
use crate::backend::AdafactorOptions;
use crate::backend::{AdamStep, Backend, Shaped};
use crate::checkpoint::Checkpoint;
use crate::parallel::{Collective, sum_host, worker_seed};
use crate::t5::T5;
use crate::t5::model::Fwd;
use crate::t5::params::{FullGrads, read_masters};
use crate::t5::train::LoraGrads;
use crate::t5::trainable::{Trainable, adam_slots, zero_moments};
use anyhow::{Result, anyhow, ensure};

/// Which optimiser's state the trainables carry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    AdamW,
    /// With a first moment when `first_moment` (Adafactor's beta1 set).
    Adafactor {
        first_moment: bool,
    },
}

/// Each trainable tensor's optimiser state, in the trainables' order.
pub enum Moments<B: Backend> {
    /// AdamW's `(m, v)`.
    AdamW(Vec<(B::Tensor, B::Tensor)>),
    Adafactor(Vec<AdafactorState<B>>),
}

impl<B: Backend> Moments<B> {
    /// Zero state for tensors of these `(shape, rows of each Hugging Face tensor it stacks)`.
    fn zeros(be: &B, kind: OptimizerKind, tensors: Vec<(Vec<usize>, Vec<usize>)>) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::AdamW => Moments::AdamW(zero_moments(be, tensors.iter().map(|(s, _)| s.as_slice()))?),
            OptimizerKind::Adafactor { first_moment } => Moments::Adafactor(zero_states(be, &tensors, first_moment)?),
        })
    }
}

/// What trains, with the optimiser's state of each tensor.
pub enum Trainables<B: Backend> {
    /// f32 masters of every weight in `T5::params_mut`'s order, each named by its first Hugging
    /// Face tensor (weight decay applies to all but the layer norms' scales).
    Full { masters: Vec<B::Tensor>, moments: Moments<B>, names: Vec<String> },
    /// The adapters' A and B (already f32 masters) in `T5::lora_trainables`' order.
    Lora { moments: Moments<B> },
}

pub struct SftOptimizer<B: Backend> {
    pub trainables: Trainables<B>,
    /// Updates applied so far (AdamW's bias correction and Adafactor's β₂ₜ count these).
    pub steps: u64,
}

impl<B: Backend> SftOptimizer<B> {
    /// Full-parameter training: masters read in f32 from the checkpoint the model came from.
    pub fn full(be: &B, model: &T5<B>, ckpt: &Checkpoint, kind: OptimizerKind) -> Result<Self> {
        ensure!(model.lora.is_none(), "full-parameter training runs on a model without LoRA adapters");
        let masters = read_masters(be, model, ckpt)?;
        let params = model.params();
        let names = params.iter().map(|p| p.names[0].0.clone()).collect();
        let parts = params.iter().map(|p| p.names.iter().map(|(_, rows)| *rows).collect());
        let moments = Moments::zeros(be, kind, masters.iter().map(|m| m.shape().to_vec()).zip(parts).collect())?;
        Ok(Self { trainables: Trainables::Full { masters, moments, names }, steps: 0 })
    }

    /// LoRA-only training of the adapters the model carries.
    pub fn lora(be: &B, model: &T5<B>, kind: OptimizerKind) -> Result<Self> {
        ensure!(model.lora.is_some(), "LoRA training needs adapters on the model");
        let tensors = model.lora_tensors().into_iter().map(|(_, t)| (t.shape().to_vec(), vec![t.shape()[0]])).collect();
        let moments = Moments::zeros(be, kind, tensors)?;
        Ok(Self { trainables: Trainables::Lora { moments }, steps: 0 })
    }
}

/// The step's hyperparameters.
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// AdamW's decoupled decay, or Adafactor's `weight_decay` (both `p ← p − lr · wd · p`).
    pub weight_decay: f64,
    /// Adafactor's options, when the optimiser is Adafactor (`lr` is then its external rate).
    pub adafactor: Option<AdafactorOptions>,
    /// 0: no clipping.
    pub max_grad_norm: f64,
    pub label_smoothing: f32,
    /// The loss is multiplied by this before the backward and the gradients divided by it after,
    /// so that small gradients survive the half-precision products.
    pub loss_scale: f32,
    /// Seeds the dropout masks: the adapters', and T5's own (`seeds::model_dropout` of it).
    pub dropout_seed: u64,
}

/// A batch's mean losses per target token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    /// The objective: cross-entropy with the label smoothing.
    pub loss: f64,
    /// Plain cross-entropy (no smoothing): the negative log-likelihood of the targets.
    pub ce: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// Mean (label-smoothed) cross-entropy per target token.
    pub loss: f64,
    /// Mean plain cross-entropy per target token.
    pub ce: f64,
    pub tokens: usize,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The gradients were not finite (a loss scale too large for half precision): no update.
    pub skipped: bool,
}

/// The gradients of one step.
pub enum SftGrads<B: Backend> {
    Full(FullGrads<B>),
    Lora(LoraGrads<B>),
}

impl<B: Backend> SftGrads<B> {
    /// In the optimiser's order.
    pub fn tensors_mut(&mut self) -> Vec<&mut B::Tensor> {
        match self {
            SftGrads::Full(g) => g.tensors_mut(),
            SftGrads::Lora(g) => g.tensors_mut().collect(),
        }
    }
}

/// The device copies of a batch.
struct Uploaded<B: Backend> {
    ids: B::Ids,
    lengths: B::Ids,
    decoder_input: B::Ids,
    labels: B::Ids,
}

fn upload<B: Backend>(be: &B, b: &SftBatch) -> Result<Uploaded<B>> {
    let (rows, t) = (b.source.rows, b.width);
    Ok(Uploaded {
        ids: be.upload_ids(&b.source.ids, &[rows, b.source.width])?,
        lengths: be.upload_ids(&b.source.lengths, &[rows])?,
        decoder_input: be.upload_ids(&b.decoder_input, &[rows, t])?,
        labels: be.upload_ids(&b.labels, &[rows * t])?,
    })
}

/// Σ mask · loss over the batch's rows.
fn masked_sum(loss: &[f32], mask: &[f32]) -> f64 {
    loss.iter().zip(mask).map(|(l, m)| *l as f64 * *m as f64).sum()
}

/// One step of a worker on its share `batch` of a batch of `total_tokens` target tokens; the
/// group sums the gradients and the loss, so that every worker applies the same update.
#[allow(clippy::too_many_arguments)]
pub fn sft_step<B: Backend>(
    be: &B,
    model: &mut T5<B>,
    opt: &mut SftOptimizer<B>,
    batch: &SftBatch,
    total_tokens: usize,
    group: &dyn Collective<B>,
    h: &Hyper,
) -> Result<StepReport> {
    let full = matches!(opt.trainables, Trainables::Full { .. });
    let h_mine = Hyper { dropout_seed: worker_seed(h.dropout_seed, group.rank()), ..*h };
    let (losses, mut grads) = sft_gradients(be, model, full, batch, total_tokens, &h_mine)?;
    group.all_reduce_sum(be, &mut grads.tensors_mut())?;
    let summed = sum_host(group, be, &[losses.loss as f32, losses.ce as f32])?;
    let (grad_norm, skipped) = sft_update(be, model, opt, &mut grads, h)?;
    Ok(StepReport { loss: summed[0] as f64, ce: summed[1] as f64, tokens: total_tokens, grad_norm, skipped })
}

/// The forward and backward of one batch: the mean losses, and the gradients scaled by
/// `h.loss_scale`.
///
/// Data-parallel workers each pass their share of the batch and the whole batch's `total_tokens`:
/// the loss and gradients are then each worker's part of the batch mean, and their sums over the
/// workers are the whole batch's.
pub fn sft_gradients<B: Backend>(
    be: &B,
    model: &T5<B>,
    full: bool,
    batch: &SftBatch,
    total_tokens: usize,
    h: &Hyper,
) -> Result<(Losses, SftGrads<B>)> {
    ensure!(total_tokens > 0, "an SFT batch with no target tokens");
    let zeros = || -> Result<SftGrads<B>> {
        Ok(if full {
            SftGrads::Full(FullGrads::zeros(be, model)?)
        } else {
            SftGrads::Lora(LoraGrads::zeros(be, model)?)
        })
    };
    if batch.tokens() == 0 {
        // A worker whose share of a short last batch is empty contributes nothing.
        return Ok((Losses::default(), zeros()?));
    }

    // 1. The batch on the device; each label weighs loss_scale / total_tokens (the mean, scaled).
    let x = upload(be, batch)?;
    let w = h.loss_scale / total_tokens as f32;
    let weights = be.upload(&batch.mask.iter().map(|m| m * w).collect::<Vec<_>>(), &[batch.mask.len()])?;

    // 2. Teacher-forced forward, keeping the tape.
    // Train mode: the adapters' dropout and T5's own (`dropout_rate` of config.json).
    let f = Fwd {
        lora: !full,
        dropout_seed: Some(h.dropout_seed),
        model_dropout: Some(crate::seeds::model_dropout(h.dropout_seed)),
    };
    let (hidden, tape) = model.forward_train(be, &x.ids, &x.lengths, &x.decoder_input, f)?;

    // 3. Cross-entropy at the LM head.
    let d = hidden.shape()[2];
    let flat = be.reshape(hidden, &[batch.mask.len(), d])?;
    let logits = model.lm_logits(be, &flat)?;
    let (loss_rows, d_logits) = be.cross_entropy(&logits, &x.labels, &weights, h.label_smoothing)?;
    let (loss, ce) = token_losses(be, &logits, &x.labels, &loss_rows, &batch.mask, h.label_smoothing)?;
    drop(logits);
    let losses = Losses { loss: loss / total_tokens as f64, ce: ce / total_tokens as f64 };

    // 4. Backward into every weight, or into the adapters.
    let mut grads = zeros()?;
    let head_grads = match &mut grads {
        SftGrads::Full(g) => Some(g),
        SftGrads::Lora(_) => None,
    };
    let d_flat = model.lm_logits_backward(be, &flat, &d_logits, head_grads)?;
    drop(d_logits);
    let d_hidden = be.reshape(d_flat, &[batch.source.rows, batch.width, d])?;
    match &mut grads {
        SftGrads::Full(g) => model.backward_full(be, &tape, (&x.ids, &x.lengths, &x.decoder_input), &d_hidden, g)?,
        SftGrads::Lora(g) => model.backward(be, &tape, &x.lengths, &d_hidden, g)?,
    }
    Ok((losses, grads))
}

/// `(Σ mask · smoothed loss, Σ mask · plain cross-entropy)` of a batch's rows, given the smoothed
/// rows `loss_rows`; the plain one is −log p(target), the same rows when there is no smoothing.
fn token_losses<B: Backend>(
    be: &B,
    logits: &B::Tensor,
    labels: &B::Ids,
    loss_rows: &B::Tensor,
    mask: &[f32],
    smoothing: f32,
) -> Result<(f64, f64)> {
    let loss = masked_sum(&be.download(loss_rows)?, mask);
    if smoothing == 0.0 {
        return Ok((loss, loss));
    }
    let (logp, _) = be.token_logprobs(logits, labels)?;
    Ok((loss, -masked_sum(&be.download(&logp)?, mask)))
}

/// Unscales and clips the gradients (torch's `clip_grad_norm_`: coefficient max / (norm + 1e-6), at
/// most 1), then AdamW or Adafactor and the model's weights (or the adapters' copies) refreshed from the masters.
/// Returns the gradient norm before clipping, and whether the step was skipped for non-finite
/// gradients.
pub fn sft_update<B: Backend>(
    be: &B,
    model: &mut T5<B>,
    opt: &mut SftOptimizer<B>,
    grads: &mut SftGrads<B>,
    h: &Hyper,
) -> Result<(f64, bool)> {
    let gs: Vec<&B::Tensor> = grads.tensors_mut().into_iter().map(|g| &*g).collect();
    let sq = be.sum_squares(&gs)?;
    let grad_norm = sq.sqrt() / h.loss_scale as f64;
    if !grad_norm.is_finite() {
        return Ok((grad_norm, true));
    }
    let clip = if h.max_grad_norm > 0.0 { (h.max_grad_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
    let grad_scale = (clip / h.loss_scale as f64) as f32;

    opt.steps += 1;
    let wd = h.weight_decay;
    let steps = opt.steps;
    let update = |be: &B, trainables: Vec<Trainable<'_, B>>, moments: &mut Moments<B>, decay: &dyn Fn(usize) -> f64| {
        match moments {
            Moments::AdamW(m) => {
                let step = AdamStep { lr: h.lr, beta1: h.beta1, beta2: h.beta2, eps: h.eps, step: steps, grad_scale };
                be.adam(&mut adam_slots(trainables, gs.clone(), m, decay)?, &step)
            }
            Moments::Adafactor(states) => {
                let o = h.adafactor.ok_or_else(|| anyhow!("Adafactor state but no Adafactor options"))?;
                be.adafactor(
                    &mut adafactor_slots(trainables, gs.clone(), states, decay)?,
                    &o.step(h.lr, steps, grad_scale),
                )
            }
        }
    };
    match &mut opt.trainables {
        Trainables::Full { masters, moments, names } => {
            let trainables = masters.iter_mut().zip(names.iter()).map(|(param, name)| Trainable {
                name: name.clone(),
                param,
                copy: None,
            });
            let decay = |i: usize| if names[i].contains("layer_norm") { 0.0 } else { wd };
            update(be, trainables.collect(), moments, &decay)?;
            let mut params = model.params_mut();
            ensure!(params.len() == masters.len(), "optimizer state does not match the model");
            for (param, master) in params.iter_mut().zip(masters.iter()) {
                be.set_weight(param.weight, master)?;
            }
        }
        Trainables::Lora { moments } => {
            update(be, model.lora_trainables(), moments, &|_| wd)?;
            model.lora_updated(be)?;
        }
    }
    Ok((grad_norm, false))
}

/// The held-out losses of a batch, no dropout: `(Σ token losses, Σ plain token cross-entropies,
/// tokens)`.
pub fn eval_loss<B: Backend>(be: &B, model: &T5<B>, batch: &SftBatch, smoothing: f32) -> Result<(f64, f64, usize)> {
    let x = upload(be, batch)?;
    let (logits, _) = model.forward(be, &x.ids, &x.lengths, &x.decoder_input, Fwd::eval(model.lora.is_some()))?;
    let v = logits.shape()[2];
    let logits = be.reshape(logits, &[batch.mask.len(), v])?;
    let weights = be.upload(&batch.mask, &[batch.mask.len()])?;
    let (loss_rows, _) = be.cross_entropy(&logits, &x.labels, &weights, smoothing)?;
    let (loss, ce) = token_losses(be, &logits, &x.labels, &loss_rows, &batch.mask, smoothing)?;
    Ok((loss, ce, batch.tokens()))
}
