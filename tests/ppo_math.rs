//! src/ppo against TRL 0.4.7's PPO arithmetic as PyTorch computes it (tests/fixtures/ppo/step.json,
//! written by tools/ppo_reference.py): masks, rewards, advantages, losses with their gradients,
//! statistics, the KL controller, Adam and gradient clipping. The edge cases and the finite
//! differences are tests/ppo_edges.rs.

mod common;
mod oracles;

use common::{fixture, rel_max_err};
use detox::ppo::{
    Dims, FirstToken, KlController, LossOutput, MinibatchInputs, PpoConfig, compute_advantages, compute_rewards,
    ppo_loss, record_step_stats, response_mask,
};
use oracles::{
    Adam, AdamState, clip_grad_norm, entropy_from_logits, logprobs_from_logits, logprobs_from_logits_backward,
};
use serde::Deserialize;
use std::collections::HashMap;

/// The bound on every comparison with PyTorch: f32 arithmetic of this size agrees to a few ulps.
const TOL: f32 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    config: FxConfig,
    step: FxStep,
    kl_sequence: FxKlSequence,
    adam: FxAdam,
    clip_grad_norm: FxClip,
}

#[derive(Deserialize)]
struct FxConfig {
    init_kl_coef: f64,
    target: f64,
    horizon: f64,
    gamma: f64,
    lam: f64,
    cliprange: f64,
    cliprange_value: f64,
    vf_coef: f64,
    ratio_threshold: f64,
    batch_size: usize,
}

#[derive(Deserialize)]
struct FxStep {
    rows: usize,
    cols: usize,
    vocab: usize,
    responses: Vec<Vec<u32>>,
    mask: Vec<f32>,
    labels: Vec<u32>,
    rollout_logits: Vec<f32>,
    logprobs: Vec<f32>,
    ref_logprobs: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    rewards: Vec<f32>,
    non_score_reward: Vec<f32>,
    minibatches: Vec<FxMinibatch>,
    step_stats: HashMap<String, serde_json::Value>,
    kl_coef_after: f64,
}

#[derive(Deserialize)]
struct FxMinibatch {
    rows: Vec<usize>,
    logits: Vec<f32>,
    logprobs: Vec<f32>,
    vpreds: Vec<f32>,
    advantages: Vec<f32>,
    returns: Vec<f32>,
    skipped: bool,
    stats: HashMap<String, f64>,
    d_logprobs: Vec<f32>,
    d_vpreds: Vec<f32>,
    d_logits: Vec<f32>,
}

#[derive(Deserialize)]
struct FxKlSequence {
    updates: Vec<(f64, usize)>,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct FxAdam {
    lr: f64,
    init: Vec<Vec<f32>>,
    steps: Vec<FxAdamStep>,
}

#[derive(Deserialize)]
struct FxAdamStep {
    grads: Vec<Vec<f32>>,
    params: Vec<Vec<f32>>,
    exp_avg: Vec<Vec<f32>>,
    exp_avg_sq: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct FxClip {
    grads: Vec<Vec<f32>>,
    cases: Vec<FxClipCase>,
}

#[derive(Deserialize)]
struct FxClipCase {
    max_norm: f64,
    total_norm: f32,
    clipped: Vec<Vec<f32>>,
}

fn load() -> Fixture {
    let path = fixture("ppo/step.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("step.json parses")
}

fn config(c: &FxConfig) -> PpoConfig {
    PpoConfig {
        init_kl_coef: c.init_kl_coef,
        target: c.target,
        horizon: c.horizon,
        gamma: c.gamma,
        lam: c.lam,
        cliprange: c.cliprange,
        cliprange_value: c.cliprange_value,
        vf_coef: c.vf_coef,
        ratio_threshold: c.ratio_threshold,
        batch_size: c.batch_size,
        ..PpoConfig::default()
    }
}

/// TRL leaves values in masked-out slots; src/ppo writes 0 there. They agree on the rest.
fn masked(values: &[f32], mask: &[f32]) -> Vec<f32> {
    values.iter().zip(mask).map(|(v, m)| if *m != 0.0 { *v } else { 0.0 }).collect()
}

fn gather_rows(x: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// Asserts `max|a − b| / max|b| ≤ TOL` and reports it.
fn check(name: &str, a: &[f32], b: &[f32]) {
    let e = rel_max_err(a, b);
    eprintln!("{name}: max rel err {e:.2e}");
    assert!(e <= TOL, "{name}: max relative error {e:e} exceeds {TOL:e}");
}

/// Asserts `|a − b| ≤ TOL · max(|b|, scale)`: `scale` is the size of the terms a near-zero statistic
/// (a mean of whitened advantages) is summed from.
fn check_scalar(name: &str, a: f64, b: f64, scale: f64) {
    let e = (a - b).abs() / b.abs().max(scale);
    eprintln!("{name}: {a:.8e} vs {b:.8e}, rel err {e:.2e}");
    assert!(e <= TOL as f64, "{name}: {a} vs {b}, relative error {e:e}");
}

/// A minibatch's rows of the batch.
struct Mini {
    dims: Dims,
    mask: Vec<f32>,
    old_logprobs: Vec<f32>,
    values: Vec<f32>,
    rewards: Vec<f32>,
    labels: Vec<u32>,
}

/// Gathers `mb`'s rows, taking the rewards from `rewards` (the whole batch's).
fn minibatch(step: &FxStep, mb: &FxMinibatch, rewards: &[f32]) -> Mini {
    let c = step.cols;
    let labels = mb.rows.iter().flat_map(|&r| step.labels[r * c..(r + 1) * c].iter().copied()).collect();
    Mini {
        dims: Dims::new(mb.rows.len(), c),
        mask: gather_rows(&step.mask, c, &mb.rows),
        old_logprobs: gather_rows(&step.logprobs, c, &mb.rows),
        values: gather_rows(&step.values, c, &mb.rows),
        rewards: gather_rows(rewards, c, &mb.rows),
        labels,
    }
}

/// Where a minibatch's loss inputs come from.
#[derive(Clone, Copy, PartialEq)]
enum Inputs {
    /// PyTorch's new log-probs, advantages and returns: the loss arithmetic alone.
    Torch,
    /// src/ppo's own, from the logits and the rewards: the whole pipeline.
    Rust,
}

fn run_minibatch(cfg: &PpoConfig, m: &Mini, mb: &FxMinibatch, vocab: usize, from: Inputs) -> LossOutput {
    let entropy = entropy_from_logits(&mb.logits, vocab);
    let (logprobs, advantages, returns) = match from {
        Inputs::Torch => (mb.logprobs.clone(), mb.advantages.clone(), mb.returns.clone()),
        Inputs::Rust => {
            let adv = compute_advantages(&m.values, &m.rewards, &m.mask, m.dims, cfg.gamma, cfg.lam).unwrap();
            (logprobs_from_logits(&mb.logits, vocab, &m.labels), adv.advantages, adv.returns)
        }
    };
    let x = MinibatchInputs {
        old_logprobs: &m.old_logprobs,
        values: &m.values,
        advantages: &advantages,
        returns: &returns,
        logprobs: &logprobs,
        vpreds: &mb.vpreds,
        mask: &m.mask,
        entropy: Some(&entropy),
    };
    ppo_loss(&x, m.dims, cfg).unwrap()
}

// ---- against PyTorch -----------------------------------------------------------------------------

#[test]
fn response_mask_reproduces_trl_seq2seq_mask() {
    let f = load();
    let s = &f.step;
    let drop = response_mask(&s.responses, s.cols, 1, FirstToken::Drop).unwrap();
    assert_eq!(drop, s.mask, "FirstToken::Drop is TRL 0.4.7's mask");
    let keep = response_mask(&s.responses, s.cols, 1, FirstToken::Keep).unwrap();
    for row in 0..s.rows {
        let r = row * s.cols;
        assert_eq!(keep[r], 1.0, "row {row}: Keep covers the first generated token");
        assert_eq!(keep[r + 1..r + s.cols], s.mask[r + 1..r + s.cols], "row {row}: Keep agrees after slot 0");
    }
}

#[test]
fn logprobs_entropy_and_logit_gradients_match_torch() {
    let f = load();
    let s = &f.step;
    let lp = logprobs_from_logits(&s.rollout_logits, s.vocab, &s.labels);
    check("rollout logprobs", &lp, &s.logprobs);
    let cfg = config(&f.config);
    for (k, mb) in f.step.minibatches.iter().enumerate() {
        let m = minibatch(s, mb, &s.rewards);
        let lp = logprobs_from_logits(&mb.logits, s.vocab, &m.labels);
        check(&format!("minibatch {k} logprobs"), &lp, &mb.logprobs);
        let out = run_minibatch(&cfg, &m, mb, s.vocab, Inputs::Torch);
        let d_logits = logprobs_from_logits_backward(&mb.logits, s.vocab, &m.labels, &out.d_logprobs);
        check(&format!("minibatch {k} d_logits"), &d_logits, &mb.d_logits);
        let entropy = out.stats.entropy.expect("entropy given");
        check_scalar(&format!("minibatch {k} entropy"), entropy as f64, mb.stats["policy/entropy"], 0.0);
    }
}

#[test]
fn rewards_match_trl_compute_rewards() {
    let f = load();
    let s = &f.step;
    let dims = Dims::new(s.rows, s.cols);
    let r = compute_rewards(&s.scores, &s.logprobs, &s.ref_logprobs, &s.mask, dims, f.config.init_kl_coef).unwrap();
    check("rewards", &r.rewards, &masked(&s.rewards, &s.mask));
    check("non_score_reward", &r.non_score_reward, &masked(&s.non_score_reward, &s.mask));
}

#[test]
fn advantages_and_returns_match_trl_per_minibatch() {
    let f = load();
    let s = &f.step;
    let cfg = config(&f.config);
    for (k, mb) in s.minibatches.iter().enumerate() {
        let m = minibatch(s, mb, &s.rewards);
        let adv = compute_advantages(&m.values, &m.rewards, &m.mask, m.dims, cfg.gamma, cfg.lam).unwrap();
        check(&format!("minibatch {k} advantages"), &adv.advantages, &masked(&mb.advantages, &m.mask));
        check(&format!("minibatch {k} returns"), &adv.returns, &masked(&mb.returns, &m.mask));
    }
}

#[test]
fn loss_gradients_and_stats_match_autograd() {
    let f = load();
    let s = &f.step;
    let cfg = config(&f.config);
    for (k, mb) in s.minibatches.iter().enumerate() {
        let m = minibatch(s, mb, &s.rewards);
        let out = run_minibatch(&cfg, &m, mb, s.vocab, Inputs::Torch);
        assert_eq!(out.stats.skipped, mb.skipped);
        check(&format!("minibatch {k} d_logprobs"), &out.d_logprobs, &masked(&mb.d_logprobs, &m.mask));
        check(&format!("minibatch {k} d_vpreds"), &out.d_vpreds, &masked(&mb.d_vpreds, &m.mask));
        assert!(mb.d_logprobs.iter().zip(&m.mask).all(|(g, mk)| *mk != 0.0 || *g == 0.0));
        let st = &out.stats;
        let want = |key: &str| mb.stats[key];
        check_scalar("loss/policy", out.pg_loss as f64, want("loss/policy"), 0.0);
        check_scalar("loss/value", out.vf_loss as f64, want("loss/value"), 0.0);
        check_scalar("loss/total", out.loss as f64, want("loss/total"), 0.0);
        for (key, got, scale) in [
            ("policy/approxkl", st.approxkl, 0.0),
            ("policy/policykl", st.policykl, 0.0),
            ("policy/clipfrac", st.clipfrac, 0.0),
            ("policy/advantages_mean", st.advantages_mean, 1.0),
            ("policy/ratio_mean", st.ratio_mean, 0.0),
            ("returns/mean", st.returns_mean, 0.0),
            ("returns/var", st.returns_var, 0.0),
            ("val/vpred", st.vpred, 0.0),
            ("val/error", st.val_error, 0.0),
            ("val/clipfrac", st.val_clipfrac, 0.0),
            ("val/mean", st.val_mean, 0.0),
            ("val/var", st.val_var, 0.0),
        ] {
            check_scalar(&format!("minibatch {k} {key}"), got as f64, want(key), scale);
        }
    }
}

#[test]
fn fixture_exercises_every_branch() {
    let f = load();
    let s = &f.step;
    let cfg = config(&f.config);
    let mb = &s.minibatches[0];
    let m = minibatch(s, mb, &s.rewards);
    let cv = cfg.cliprange_value as f32;
    let on_bound = (0..m.dims.numel())
        .filter(|&i| m.mask[i] != 0.0)
        .filter(|&i| mb.vpreds[i] == m.values[i] + cv || mb.vpreds[i] == m.values[i] - cv)
        .count();
    let unchanged = (0..m.dims.numel()).filter(|&i| m.mask[i] != 0.0 && mb.logprobs[i] == m.old_logprobs[i]).count();
    assert!(on_bound >= 4, "{on_bound} new values on the clip bounds");
    assert!(unchanged >= 3, "{unchanged} tokens with ratio exactly 1");
    for mb in &s.minibatches {
        let st = &mb.stats;
        assert!(st["policy/clipfrac"] > 0.0 && st["policy/clipfrac"] < 1.0);
        assert!(st["val/clipfrac"] > 0.0 && st["val/clipfrac"] < 1.0);
    }
}

#[test]
fn step_stats_match_trl_record_step_stats() {
    let f = load();
    let s = &f.step;
    let cfg = config(&f.config);
    let dims = Dims::new(s.rows, s.cols);
    let r = compute_rewards(&s.scores, &s.logprobs, &s.ref_logprobs, &s.mask, dims, cfg.init_kl_coef).unwrap();
    // End to end: the minibatches' losses from src/ppo's own rewards, advantages and log-probs.
    let per_mb: Vec<_> = s
        .minibatches
        .iter()
        .map(|mb| run_minibatch(&cfg, &minibatch(s, mb, &r.rewards), mb, s.vocab, Inputs::Rust).stats)
        .collect();
    let st = record_step_stats(
        &s.scores,
        &s.logprobs,
        &s.ref_logprobs,
        &r.non_score_reward,
        &s.mask,
        dims,
        cfg.init_kl_coef,
        &per_mb,
    )
    .unwrap();
    let want = |k: &str| s.step_stats[k].as_f64().unwrap();
    let kl_dist: Vec<f32> =
        s.step_stats["objective/kl_dist"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    check("objective/kl_dist", &st.kl_dist, &kl_dist);
    check_scalar("objective/kl", st.kl as f64, want("objective/kl"), 0.0);
    check_scalar("objective/kl_coef", st.kl_coef, want("objective/kl_coef"), 0.0);
    check_scalar("objective/entropy", st.entropy as f64, want("objective/entropy"), 0.0);
    check_scalar("ppo/mean_non_score_reward", st.mean_non_score_reward as f64, want("ppo/mean_non_score_reward"), 0.0);
    check_scalar("ppo/mean_scores", st.mean_scores as f64, want("ppo/mean_scores"), 0.0);
    check_scalar("ppo/std_scores", st.std_scores as f64, want("ppo/std_scores"), 0.0);
    check_scalar("ppo/loss/total", st.train.total_loss as f64, want("ppo/loss/total"), 0.0);
    check_scalar("ppo/policy/clipfrac", st.train.clipfrac as f64, want("ppo/policy/clipfrac"), 0.0);
    check_scalar("ppo/returns/var", st.train.returns_var as f64, want("ppo/returns/var"), 0.0);
    check_scalar("ppo/val/var_explained", st.var_explained as f64, want("ppo/val/var_explained"), 0.0);
    assert_eq!((st.minibatches, st.skipped_minibatches), (2, 0));
    let json = serde_json::to_value(&st).unwrap();
    assert!(json.get("ppo/policy/approxkl").is_some() && json.get("objective/kl").is_some(), "TRL's keys: {json}");

    let mut kl = KlController::from_config(&cfg);
    kl.update(st.kl as f64, cfg.batch_size);
    check_scalar("kl_coef after the step", kl.value(), s.kl_coef_after, 0.0);
}

#[test]
fn adaptive_kl_controller_matches_trl() {
    let f = load();
    let cfg = config(&f.config);
    let mut kl = KlController::from_config(&cfg);
    for (&(current, n_steps), &want) in f.kl_sequence.updates.iter().zip(&f.kl_sequence.values) {
        kl.update(current as f32 as f64, n_steps);
        check_scalar(&format!("kl_coef after KL {current}, {n_steps} steps"), kl.value(), want, 0.0);
    }
}

#[test]
fn adam_matches_torch_optim_adam() {
    let f = load();
    let a = &f.adam;
    let adam = Adam::new(a.lr);
    let mut params = a.init.clone();
    let mut states: Vec<AdamState> = params.iter().map(|p| AdamState::new(p.len())).collect();
    for (k, st) in a.steps.iter().enumerate() {
        let before = params.clone();
        for ((p, g), s) in params.iter_mut().zip(&st.grads).zip(&mut states) {
            adam.step(p, g, s).unwrap();
        }
        for i in 0..params.len() {
            check(&format!("adam step {k} tensor {i} exp_avg"), &states[i].exp_avg, &st.exp_avg[i]);
            check(&format!("adam step {k} tensor {i} exp_avg_sq"), &states[i].exp_avg_sq, &st.exp_avg_sq[i]);
            check(&format!("adam step {k} tensor {i} params"), &params[i], &st.params[i]);
            // The update itself, ~lr in size, relative to lr: much stricter than the parameters'.
            let delta: Vec<f32> = params[i].iter().zip(&before[i]).map(|(p, b)| p - b).collect();
            let want: Vec<f32> = st.params[i].iter().zip(&before[i]).map(|(p, b)| p - b).collect();
            let e = delta.iter().zip(&want).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / a.lr as f32;
            eprintln!("adam step {k} tensor {i} update: max err / lr {e:.2e}");
            assert!(e <= 1e-3, "adam step {k} tensor {i}: update differs by {e} × lr");
        }
        assert_eq!(states[0].step, k as u64 + 1);
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let f = load();
    let c = &f.clip_grad_norm;
    for case in &c.cases {
        let mut grads = c.grads.clone();
        let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
        let total = clip_grad_norm(&mut views, case.max_norm);
        check_scalar(&format!("total norm (max {})", case.max_norm), total as f64, case.total_norm as f64, 0.0);
        for (i, (g, w)) in grads.iter().zip(&case.clipped).enumerate() {
            check(&format!("clipped grad {i} (max {})", case.max_norm), g, w);
        }
    }
    assert!(c.cases[0].total_norm > c.cases[0].max_norm as f32, "the first case clips");
    assert_eq!(c.cases[1].clipped, c.grads, "below max_norm the gradients are untouched");
}

// ---- finite differences --------------------------------------------------------------------------
