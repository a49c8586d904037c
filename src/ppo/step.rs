//! One PPO step as TRL 0.4.7's `PPOTrainer.step` reads for a seq2seq policy, each stage a function:
//! `batched_forward_pass` (the rollout pass — old log-probs and values, adapters on — and the
//! reference pass, adapters off) → `compute_rewards` (KL-shaped) → `ppo_epochs` × shuffled
//! minibatches of `train_minibatch` (GAE and whitening on the minibatch, a training pass, the
//! clipped losses, the backward, clipping, Adam) → `record_step_stats` → the KL controller's update.

pub use super::optim::Optimizer;
use super::policy::{Policy, PolicyGrads, Responses};
use super::{
    Dims, KlController, LossOutput, MinibatchInputs, PpoConfig, Rewards, StepStats, compute_advantages,
    compute_rewards, early_stop, ppo_loss, record_step_stats, response_mask_from_lengths,
};
use crate::backend::Backend;
use crate::parallel::{Collective, gather_concat, shard, worker_seed};
use crate::seeds;
use crate::t5::Prompts;
use crate::t5::model::Fwd;
use crate::text::pad_batch;
use anyhow::{Result, bail, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

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

/// How a step draws its randomness and scales its loss.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// Shuffle each epoch's minibatches (TRL does); off for parity with a fixed order.
    pub shuffle: bool,
    /// Seeds the shuffles and the dropout masks of this step (`seeds::ppo_step`).
    pub seed: u64,
    /// Gradients are computed for `loss_scale · loss` and divided back before clipping and Adam,
    /// so that half-precision products on the GPU keep small gradients.
    pub loss_scale: f32,
}

/// Where and how a step runs: the backend, this worker's data-parallel group, the PPO settings
/// and the step's options.
pub struct StepEnv<'a, B: Backend> {
    pub be: &'a B,
    pub group: &'a dyn Collective<B>,
    pub cfg: &'a PpoConfig,
    pub opts: StepOptions,
}

/// What a step updates: the policy, its optimiser and the KL controller.
pub struct Learner<'a, B: Backend> {
    pub policy: &'a mut Policy<B>,
    pub opt: &'a mut Optimizer<B>,
    pub kl: &'a mut KlController,
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

/// `on_grads(epoch, minibatch, grads)`: a look at each minibatch's summed gradients.
pub type OnGrads<'a, B> = dyn FnMut(usize, usize, &PolicyGrads<B>) -> Result<()> + 'a;

/// The rollout with everything computed before the minibatches: the mask, the two passes' results
/// and the KL-shaped rewards, all `[rows, cols]`.
struct Experience<'a> {
    rollout: &'a Rollout,
    dims: Dims,
    mask: Vec<f32>,
    old_logprobs: Vec<f32>,
    values: Vec<f32>,
    ref_logprobs: Vec<f32>,
    rewards: Rewards,
}

/// One PPO step on `rollout`. `on_grads` sees each minibatch's summed gradients as the backward
/// left them, times `opts.loss_scale`, before the optimiser unscales and clips them (tests compare
/// them with PyTorch's).
///
/// Data-parallel workers pass the same whole rollout and their group. Each scores and
/// backpropagates its share of every minibatch's rows. The losses are computed on the host over
/// the whole minibatch from the gathered log-probabilities and values, and the gradients are
/// summed, so every worker applies the update a single worker would.
pub fn ppo_step<B: Backend>(
    env: &StepEnv<'_, B>,
    mut learner: Learner<'_, B>,
    rollout: &Rollout,
    on_grads: &mut OnGrads<'_, B>,
) -> Result<StepReport> {
    let started = Instant::now();
    let exp = batched_forward_pass(env, learner.policy, rollout, learner.kl.value())?;
    env.be.sync()?;
    let passed = Instant::now();
    let minibatches = run_epochs(env, &mut learner, &exp, on_grads)?;
    env.be.sync()?;
    let optimised = Instant::now();
    let stats = step_stats(&exp, learner.kl.value(), &minibatches)?;
    learner.kl.update(stats.kl as f64, env.cfg.batch_size);
    Ok(StepReport {
        dims: exp.dims,
        mask: exp.mask,
        old_logprobs: exp.old_logprobs,
        ref_logprobs: exp.ref_logprobs,
        values: exp.values,
        rewards: exp.rewards.rewards,
        non_score_reward: exp.rewards.non_score_reward,
        minibatches,
        stats,
        time_passes_s: (passed - started).as_secs_f64(),
        time_epochs_s: (optimised - passed).as_secs_f64(),
    })
}

/// TRL's `batched_forward_pass` twice — the rollout pass (old log-probs and values, evaluation
/// mode, adapters on) and the reference pass (adapters off) — then `compute_rewards` with the
/// controller's current coefficient `kl_coef`.
fn batched_forward_pass<'a, B: Backend>(
    env: &StepEnv<'_, B>,
    policy: &Policy<B>,
    rollout: &'a Rollout,
    kl_coef: f64,
) -> Result<Experience<'a>> {
    let (cfg, rows) = (env.cfg, rollout.prompts.len());
    ensure!(rows == cfg.batch_size, "a PPO step takes batch_size = {} rollouts, got {rows}", cfg.batch_size);
    ensure!(rollout.responses.len() == rows && rollout.scores.len() == rows, "rollout rows disagree");
    let lengths: Vec<usize> = rollout.responses.iter().map(Vec::len).collect();
    let cols = lengths.iter().copied().max().unwrap_or(0).max(1);
    let dims = Dims::new(rows, cols);
    let mask = response_mask_from_lengths(&lengths, cols, cfg.first_token)?;
    let rollout_pass = |first_row: usize| match cfg.rollout_dropout {
        true => Fwd::train(worker_seed(seeds::ppo_rollout_dropout(env.opts.seed, first_row), env.group.rank())),
        false => Fwd::eval(true),
    };
    let (old_logprobs, values) = score_all(env, policy, rollout, cols, rollout_pass)?;
    let (ref_logprobs, _) = score_all(env, policy, rollout, cols, |_| Fwd::eval(false))?;
    let rewards = compute_rewards(&rollout.scores, &old_logprobs, &ref_logprobs, &mask, dims, kl_coef)?;
    Ok(Experience { rollout, dims, mask, old_logprobs, values, ref_logprobs, rewards })
}

/// Scores every row in chunks of `mini_batch_size` rows (as TRL's `batched_forward_pass`), each
/// worker its share of the rows, gathered back in row order.
fn score_all<B: Backend>(
    env: &StepEnv<'_, B>,
    policy: &Policy<B>,
    r: &Rollout,
    cols: usize,
    pass: impl Fn(usize) -> Fwd,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (be, group) = (env.be, env.group);
    let (mut lp, mut values) = (Vec::new(), Vec::new());
    let mine: Vec<usize> = shard(r.prompts.len(), group.rank(), group.world()).collect();
    for rows in mine.chunks(env.cfg.mini_batch_size) {
        let (p, resp) = upload_rows(be, policy, r, rows, cols)?;
        let s = policy.score(be, &p, &resp, pass(rows[0]), false)?;
        lp.extend(s.logprobs);
        values.extend(s.values);
    }
    Ok((gather_concat(group, be, &lp)?, gather_concat(group, be, &values)?))
}

fn upload_rows<B: Backend>(
    be: &B,
    policy: &Policy<B>,
    r: &Rollout,
    rows: &[usize],
    cols: usize,
) -> Result<(Prompts<B>, Responses<B>)> {
    let c = &policy.model.config;
    let prompts: Vec<Vec<u32>> = rows.iter().map(|&i| r.prompts[i].clone()).collect();
    let responses: Vec<Vec<u32>> = rows.iter().map(|&i| r.responses[i].clone()).collect();
    let streams: Vec<u32> = rows.iter().map(|&i| r.streams[i]).collect();
    Ok((
        Prompts::upload(be, &pad_batch(&prompts, c.pad_token_id), &streams)?,
        Responses::upload(be, &responses, cols, c.decoder_start_token_id, c.pad_token_id)?,
    ))
}

/// `ppo_epochs` passes over the batch in shuffled minibatches (a fresh permutation per epoch, as
/// TRL's `DataLoader(shuffle=True)`), stopping early when `early_stop` trips.
fn run_epochs<B: Backend>(
    env: &StepEnv<'_, B>,
    learner: &mut Learner<'_, B>,
    exp: &Experience<'_>,
    on_grads: &mut OnGrads<'_, B>,
) -> Result<Vec<MinibatchReport>> {
    let mut minibatches = Vec::new();
    // One set of gradient tensors for the whole step, zeroed before each minibatch's backward.
    let mut grads = PolicyGrads::zeros(env.be, learner.policy)?;
    for epoch in 0..env.cfg.ppo_epochs {
        let mut order: Vec<usize> = (0..exp.dims.rows).collect();
        if env.opts.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seeds::ppo_shuffle(env.opts.seed, epoch)));
        }
        for (m, rows) in order.chunks(env.cfg.mini_batch_size).enumerate() {
            let report = train_minibatch(env, learner, exp, (epoch, m), rows, &mut grads, on_grads)?;
            let stop = early_stop(env.cfg, report.loss.stats.policykl);
            minibatches.push(report);
            if stop {
                return Ok(minibatches);
            }
        }
    }
    Ok(minibatches)
}

/// The rows `rows` of a row-major `[_, cols]` tensor.
fn take_rows(x: &[f32], rows: &[usize], cols: usize) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// TRL's `train_minibatch` with the `loss` before it: GAE and whitening on the minibatch's rows, a
/// training pass over this worker's share, `ppo_loss` over the whole minibatch, the backward, the
/// gradients summed over the group into `grads` and clipped, and one Adam step.
fn train_minibatch<B: Backend>(
    env: &StepEnv<'_, B>,
    learner: &mut Learner<'_, B>,
    exp: &Experience<'_>,
    (epoch, m): (usize, usize),
    rows: &[usize],
    grads: &mut PolicyGrads<B>,
    on_grads: &mut OnGrads<'_, B>,
) -> Result<MinibatchReport> {
    let (be, group, cfg, cols) = (env.be, env.group, env.cfg, exp.dims.cols);
    let mdims = Dims::new(rows.len(), cols);
    let pick = |x: &[f32]| take_rows(x, rows, cols);
    let (old, values, rewards, mask) =
        (pick(&exp.old_logprobs), pick(&exp.values), pick(&exp.rewards.rewards), pick(&exp.mask));
    let adv = compute_advantages(&values, &rewards, &mask, mdims, cfg.gamma, cfg.lam)?;
    let part = shard(rows.len(), group.rank(), group.world());
    let (p, resp) = upload_rows(be, learner.policy, exp.rollout, &rows[part.clone()], cols)?;
    let f = Fwd::train(worker_seed(seeds::ppo_dropout(env.opts.seed, epoch, m), group.rank()));
    be.zero_grads(&mut grads.tensors_mut())?;
    let scored = learner.policy.score(be, &p, &resp, f, true)?;
    let (logprobs, vpreds, entropy) = (
        gather_concat(group, be, &scored.logprobs)?,
        gather_concat(group, be, &scored.values)?,
        gather_concat(group, be, &scored.entropy)?,
    );
    let inputs = MinibatchInputs {
        old_logprobs: &old,
        values: &values,
        advantages: &adv.advantages,
        returns: &adv.returns,
        logprobs: &logprobs,
        vpreds: &vpreds,
        mask: &mask,
        entropy: Some(&entropy),
    };
    let loss = finite_loss(ppo_loss(&inputs, mdims, cfg)?, epoch, m)?;
    let my = part.start * cols..part.end * cols;
    let (d_logprobs, d_vpreds) = (&loss.d_logprobs[my.clone()], &loss.d_vpreds[my]);
    learner.policy.backward(be, &p, &resp, scored, d_logprobs, d_vpreds, env.opts.loss_scale, grads)?;
    group.all_reduce_sum(be, &mut grads.tensors_mut())?;
    let (grad_norm, factor) = clip(env, grads, (epoch, m))?;
    on_grads(epoch, m, grads)?;
    learner.opt.step(be, learner.policy, grads, factor as f32)?;
    let (advantages, returns) = (adv.advantages, adv.returns);
    Ok(MinibatchReport { epoch, rows: rows.to_vec(), advantages, returns, logprobs, vpreds, loss, grad_norm })
}

/// The loss, or an error before the parameters are updated when it is not finite.
fn finite_loss(loss: LossOutput, epoch: usize, m: usize) -> Result<LossOutput> {
    if !loss.loss.is_finite() {
        bail!(
            "the PPO loss became {} (epoch {epoch}, minibatch {m}: policy loss {}, value loss {}): \
             stopping before the parameters are updated",
            loss.loss,
            loss.pg_loss,
            loss.vf_loss
        );
    }
    Ok(loss)
}

/// The summed gradients' global L2 norm (unscaled), and the factor Adam multiplies them by:
/// `1 / loss_scale`, times `max_grad_norm / (norm + 1e-6)` when clipping applies
/// (`torch.nn.utils.clip_grad_norm_`).
fn clip<B: Backend>(env: &StepEnv<'_, B>, grads: &PolicyGrads<B>, (epoch, m): (usize, usize)) -> Result<(f64, f64)> {
    let unscale = 1.0 / env.opts.loss_scale as f64;
    let grad_norm = env.be.sum_squares(&grads.tensors())?.sqrt() * unscale;
    if !grad_norm.is_finite() {
        bail!("the gradients became non-finite (epoch {epoch}, minibatch {m}): stopping before the update");
    }
    let mut factor = unscale;
    if let Some(max) = env.cfg.max_grad_norm
        && grad_norm > max
    {
        factor *= max / (grad_norm + 1e-6);
    }
    Ok((grad_norm, factor))
}

/// TRL's `record_step_stats` over the whole batch, with the coefficient the rewards used.
fn step_stats(exp: &Experience<'_>, kl_coef: f64, minibatches: &[MinibatchReport]) -> Result<StepStats> {
    let losses: Vec<_> = minibatches.iter().map(|m| m.loss.stats.clone()).collect();
    let r = exp.rollout;
    record_step_stats(
        &r.scores,
        &exp.old_logprobs,
        &exp.ref_logprobs,
        &exp.rewards.non_score_reward,
        &exp.mask,
        exp.dims,
        kl_coef,
        &losses,
    )
}
