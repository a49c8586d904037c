//! The optimisation half of one PPO step, as TRL 0.4.7's `PPOTrainer.step` does it for a seq2seq
//! policy: given prompts, sampled responses and their scores — the rollout pass (old log-probs and
//! values, adapters on) and the reference pass (adapters off), KL-shaped rewards, then epochs of
//! minibatches (GAE and whitening on the minibatch, a training pass, the clipped losses, the
//! backward, clipping, Adam), then the statistics and the KL controller's update.

use super::policy::{Policy, PolicyGrads, Responses};
use super::trainables::{trainable_tensors, trainables};
use super::{
    Dims, KlController, LossOutput, MinibatchInputs, PpoConfig, StepStats, compute_advantages, compute_rewards,
    early_stop, ppo_loss, record_step_stats, response_mask_from_lengths,
};
use crate::backend::rng::mix64;
use crate::backend::{AdamStep, Backend, Shaped};
use crate::parallel::{Collective, gather_concat, shard, worker_seed};
use crate::t5::Prompts;
use crate::t5::model::Fwd;
use crate::t5::trainable::{adam_slots, zero_moments};
use crate::text::pad_batch;
use anyhow::{Result, bail, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// One batch of the rollout, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Prompt ids, each ending with EOS.
    pub prompts: Vec<Vec<u32>>,
    /// Generated ids (no decoder start token; EOS last when generated).
    pub responses: Vec<Vec<u32>>,
    pub scores: Vec<f32>,
    /// Each prompt's index in the data set (keys its sampling RNG in generation).
    pub streams: Vec<u32>,
}

/// Adam over the policy's trainable tensors (`trainables`' order).
pub struct Optimizer<B: Backend> {
    pub moments: Vec<(B::Tensor, B::Tensor)>,
    pub steps: u64,
    pub lr: f64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, policy: &Policy<B>, lr: f64) -> Result<Self> {
        let moments = zero_moments(be, trainable_tensors(policy).into_iter().map(|(_, t)| t.shape()))?;
        Ok(Self { moments, steps: 0, lr })
    }

    /// One Adam step of every trainable tensor with `grads` times `grad_scale`, rewriting the
    /// adapters' half copies in the same pass.
    pub fn step(&mut self, be: &B, policy: &mut Policy<B>, grads: &PolicyGrads<B>, grad_scale: f32) -> Result<()> {
        self.steps += 1;
        let h = AdamStep { lr: self.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: self.steps, grad_scale };
        let mut slots = adam_slots(trainables(policy), grads.tensors(), &mut self.moments, |_| 0.0)?;
        be.adam(&mut slots, &h)?;
        policy.model.lora_updated(be)
    }
}

/// How a step draws its randomness and scales its loss.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// Shuffle each epoch's minibatches (TRL does); off for parity with a fixed order.
    pub shuffle: bool,
    /// Seeds the shuffles and the dropout masks of this step.
    pub seed: u64,
    /// Gradients are computed for `loss_scale · loss` and divided back before clipping and Adam,
    /// so that half-precision products on the GPU keep small gradients.
    pub loss_scale: f32,
}

/// What one minibatch did.
pub struct MinibatchReport {
    pub epoch: usize,
    pub rows: Vec<usize>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
    pub logprobs: Vec<f32>,
    pub vpreds: Vec<f32>,
    pub loss: LossOutput,
    /// The gradients' global L2 norm before clipping.
    pub grad_norm: f64,
}

/// What the whole step did, `[rows, cols]` tensors row-major.
pub struct StepReport {
    pub dims: Dims,
    pub mask: Vec<f32>,
    pub old_logprobs: Vec<f32>,
    pub ref_logprobs: Vec<f32>,
    pub values: Vec<f32>,
    pub rewards: Vec<f32>,
    pub non_score_reward: Vec<f32>,
    pub minibatches: Vec<MinibatchReport>,
    pub stats: StepStats,
    /// Seconds in the rollout and reference passes, and in the minibatch epochs.
    pub time_passes_s: f64,
    pub time_epochs_s: f64,
}

/// The rows `rows` of a row-major `[_, cols]` tensor.
fn take_rows(x: &[f32], rows: &[usize], cols: usize) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r * cols..(r + 1) * cols].iter().copied()).collect()
}

fn upload_rows<B: Backend>(
    be: &B,
    r: &Rollout,
    rows: &[usize],
    cols: usize,
    start: u32,
    pad: u32,
) -> Result<(Prompts<B>, Responses<B>)> {
    let prompts: Vec<Vec<u32>> = rows.iter().map(|&i| r.prompts[i].clone()).collect();
    let responses: Vec<Vec<u32>> = rows.iter().map(|&i| r.responses[i].clone()).collect();
    let streams: Vec<u32> = rows.iter().map(|&i| r.streams[i]).collect();
    Ok((
        Prompts::upload(be, &pad_batch(&prompts, pad), &streams)?,
        Responses::upload(be, &responses, cols, start, pad)?,
    ))
}

/// Scores every row in chunks of `chunk` rows (TRL's `batched_forward_pass` uses the minibatch size),
/// each worker its share of the rows, gathered back in row order.
fn score_all<B: Backend>(
    be: &B,
    group: &dyn Collective<B>,
    policy: &Policy<B>,
    r: &Rollout,
    cols: usize,
    chunk: usize,
    f: Fwd,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let c = &policy.model.config;
    let (mut lp, mut values) = (Vec::new(), Vec::new());
    let mine: Vec<usize> = shard(r.prompts.len(), group.rank(), group.world()).collect();
    for rows in mine.chunks(chunk) {
        let (p, resp) = upload_rows(be, r, rows, cols, c.decoder_start_token_id, c.pad_token_id)?;
        let s = policy.score(be, &p, &resp, f, false)?;
        lp.extend(s.logprobs);
        values.extend(s.values);
    }
    Ok((gather_concat(group, be, &lp)?, gather_concat(group, be, &values)?))
}

/// One PPO step on `rollout`. `on_grads(epoch, minibatch, grads)` sees each minibatch's summed
/// gradients as the backward left them, times `opts.loss_scale`, before the optimiser unscales and
/// clips them (tests compare them with PyTorch's).
///
/// Data-parallel workers pass the same whole rollout and their group. Each scores and
/// backpropagates its share of every minibatch's rows. The losses are computed on the host over
/// the whole minibatch from the gathered log-probabilities and values, and the gradients are
/// summed, so every worker applies the update a single worker would.
#[allow(clippy::too_many_arguments)]
pub fn ppo_step<B: Backend>(
    be: &B,
    group: &dyn Collective<B>,
    policy: &mut Policy<B>,
    opt: &mut Optimizer<B>,
    kl: &mut KlController,
    cfg: &PpoConfig,
    rollout: &Rollout,
    opts: &StepOptions,
    mut on_grads: impl FnMut(usize, usize, &PolicyGrads<B>) -> Result<()>,
) -> Result<StepReport> {
    let rows = rollout.prompts.len();
    ensure!(rows == cfg.batch_size, "a PPO step takes batch_size = {} rollouts, got {rows}", cfg.batch_size);
    ensure!(rollout.responses.len() == rows && rollout.scores.len() == rows, "rollout rows disagree");
    let c = policy.model.config.clone();
    let cols = rollout.responses.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let dims = Dims::new(rows, cols);
    let lengths: Vec<usize> = rollout.responses.iter().map(Vec::len).collect();
    let mask = response_mask_from_lengths(&lengths, cols, cfg.first_token)?;

    let started = std::time::Instant::now();
    // Rollout and reference passes: evaluation mode, adapters on then off.
    let (old_logprobs, values) = score_all(be, group, policy, rollout, cols, cfg.mini_batch_size, Fwd::eval(true))?;
    let (ref_logprobs, _) = score_all(be, group, policy, rollout, cols, cfg.mini_batch_size, Fwd::eval(false))?;
    let kl_coef = kl.value();
    let rewards = compute_rewards(&rollout.scores, &old_logprobs, &ref_logprobs, &mask, dims, kl_coef)?;

    be.sync()?;
    let passed = std::time::Instant::now();
    let mut minibatches = Vec::new();
    let mut stopped = false;
    for epoch in 0..cfg.ppo_epochs {
        let mut order: Vec<usize> = (0..rows).collect();
        if opts.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix64(opts.seed ^ mix64(epoch as u64))));
        }
        for (m, mb_rows) in order.chunks(cfg.mini_batch_size).enumerate() {
            let mdims = Dims::new(mb_rows.len(), cols);
            let pick = |x: &[f32]| take_rows(x, mb_rows, cols);
            let (mb_old, mb_values, mb_rewards, mb_mask) =
                (pick(&old_logprobs), pick(&values), pick(&rewards.rewards), pick(&mask));
            let adv = compute_advantages(&mb_values, &mb_rewards, &mb_mask, mdims, cfg.gamma, cfg.lam)?;
            let part = shard(mb_rows.len(), group.rank(), group.world());
            let mine = &mb_rows[part.clone()];
            let (p, resp) = upload_rows(be, rollout, mine, cols, c.decoder_start_token_id, c.pad_token_id)?;
            let seed = mix64(opts.seed ^ mix64((epoch * 1_000_003 + m) as u64 + 1));
            let f = Fwd::train(worker_seed(seed, group.rank()));
            let scored = policy.score(be, &p, &resp, f, true)?;
            let (logprobs, vpreds, entropy) = (
                gather_concat(group, be, &scored.logprobs)?,
                gather_concat(group, be, &scored.values)?,
                gather_concat(group, be, &scored.entropy)?,
            );
            let inputs = MinibatchInputs {
                old_logprobs: &mb_old,
                values: &mb_values,
                advantages: &adv.advantages,
                returns: &adv.returns,
                logprobs: &logprobs,
                vpreds: &vpreds,
                mask: &mb_mask,
                entropy: Some(&entropy),
            };
            let loss = ppo_loss(&inputs, mdims, cfg)?;
            if !loss.loss.is_finite() {
                bail!(
                    "the PPO loss became {} (epoch {epoch}, minibatch {m}: policy loss {}, value loss {}): \
                     stopping before the parameters are updated",
                    loss.loss,
                    loss.pg_loss,
                    loss.vf_loss
                );
            }
            let mut grads = PolicyGrads::zeros(be, policy)?;
            let my = part.start * cols..part.end * cols;
            let (d_logprobs, d_vpreds) = (&loss.d_logprobs[my.clone()], &loss.d_vpreds[my]);
            policy.backward(be, &p, &resp, scored, d_logprobs, d_vpreds, opts.loss_scale, &mut grads)?;
            group.all_reduce_sum(be, &mut grads.tensors_mut())?;
            let sq = be.sum_squares(&grads.tensors())?;
            let unscale = 1.0 / opts.loss_scale as f64;
            let grad_norm = sq.sqrt() * unscale;
            if !grad_norm.is_finite() {
                bail!("the gradients became non-finite (epoch {epoch}, minibatch {m}): stopping before the update");
            }
            let mut factor = unscale;
            if let Some(max) = cfg.max_grad_norm
                && grad_norm > max
            {
                factor *= max / (grad_norm + 1e-6);
            }
            on_grads(epoch, m, &grads)?;
            opt.step(be, policy, &grads, factor as f32)?;
            let trip = early_stop(cfg, loss.stats.policykl);
            minibatches.push(MinibatchReport {
                epoch,
                rows: mb_rows.to_vec(),
                advantages: adv.advantages,
                returns: adv.returns,
                logprobs,
                vpreds,
                loss,
                grad_norm,
            });
            if trip {
                stopped = true;
                break;
            }
        }
        if stopped {
            break;
        }
    }
    be.sync()?;
    let optimised = std::time::Instant::now();
    let losses: Vec<_> = minibatches.iter().map(|m| m.loss.stats.clone()).collect();
    let stats = record_step_stats(
        &rollout.scores,
        &old_logprobs,
        &ref_logprobs,
        &rewards.non_score_reward,
        &mask,
        dims,
        kl_coef,
        &losses,
    )?;
    kl.update(stats.kl as f64, cfg.batch_size);
    Ok(StepReport {
        dims,
        mask,
        old_logprobs,
        ref_logprobs,
        values,
        rewards: rewards.rewards,
        non_score_reward: rewards.non_score_reward,
        minibatches,
        stats,
        time_passes_s: (passed - started).as_secs_f64(),
        time_epochs_s: (optimised - passed).as_secs_f64(),
    })
}
