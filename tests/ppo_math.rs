//! src/ppo against TRL 0.4.7's PPO arithmetic as PyTorch computes it (tests/fixtures/ppo/step.json,
//! written by tools/ppo_reference.py), the analytic loss gradients against finite differences of an
//! f64 transcription of the loss, and the edge cases of the masks, the max/clip branches, the KL
//! controllers, Adam and the config.

mod common;
mod oracles;

use common::{fixture, rel_max_err};
use detox::ppo::{
    Dims, FirstToken, KlController, LossOutput, MinibatchInputs, PpoConfig, compute_advantages, compute_rewards,
    early_stop, masked_mean, masked_var, masked_whiten, ppo_loss, record_step_stats, response_mask,
    response_mask_from_lengths,
};
use oracles::{
    Adam, AdamState, clip_grad_norm, entropy_from_logits, logprobs_from_logits, logprobs_from_logits_backward,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
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

/// TRL's total loss in f64, written independently of src/ppo: the reference the analytic gradients
/// are differentiated against.
#[allow(clippy::too_many_arguments)]
fn loss_f64(
    cfg: &PpoConfig,
    old: &[f32],
    values: &[f32],
    adv: &[f32],
    ret: &[f32],
    mask: &[f32],
    logp: &[f64],
    vpred: &[f64],
) -> f64 {
    let (mut pg, mut vf, mut n) = (0.0, 0.0, 0.0);
    for i in 0..mask.len() {
        if mask[i] == 0.0 {
            continue;
        }
        let (a, r, v) = (adv[i] as f64, ret[i] as f64, values[i] as f64);
        let ratio = (logp[i] - old[i] as f64).exp();
        let clipped = ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange);
        pg += (-a * ratio).max(-a * clipped);
        let vc = vpred[i].clamp(v - cfg.cliprange_value, v + cfg.cliprange_value);
        vf += (vpred[i] - r).powi(2).max((vc - r).powi(2));
        n += 1.0;
    }
    pg / n + cfg.vf_coef * 0.5 * vf / n
}

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

#[test]
fn loss_gradients_match_finite_differences() {
    let cfg = PpoConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dims = Dims::new(5, 12);
    let n = dims.numel();
    let lengths = [12, 7, 1, 0, 10];
    let mask = response_mask_from_lengths(&lengths, dims.cols, FirstToken::Keep).unwrap();
    let old = random(&mut rng, n, 3.0).iter().map(|x| x - 3.0).collect::<Vec<_>>();
    let logp: Vec<f32> = old.iter().zip(random(&mut rng, n, 0.6)).map(|(o, d)| o + d).collect();
    let values = random(&mut rng, n, 1.0);
    let vpred: Vec<f32> = values.iter().zip(random(&mut rng, n, 0.6)).map(|(v, d)| v + d).collect();
    let adv = masked(&random(&mut rng, n, 1.5), &mask);
    let ret = masked(&random(&mut rng, n, 1.5), &mask);
    let x = MinibatchInputs {
        old_logprobs: &old,
        values: &values,
        advantages: &adv,
        returns: &ret,
        logprobs: &logp,
        vpreds: &vpred,
        mask: &mask,
        entropy: None,
    };
    let out = ppo_loss(&x, dims, &cfg).unwrap();
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let f = |lp: &[f64], vp: &[f64]| loss_f64(&cfg, &old, &values, &adv, &ret, &mask, lp, vp);
    let (lp64, vp64) = (to64(&logp), to64(&vpred));
    let forward = f(&lp64, &vp64);
    eprintln!("loss f32 {} vs f64 {forward}", out.loss);
    assert!((out.loss as f64 - forward).abs() <= 1e-6 * forward.abs().max(1.0));

    let h = 1e-6;
    let (lo, hi) = (1.0 - cfg.cliprange, 1.0 + cfg.cliprange);
    let mut branches = [0usize; 4];
    let (mut worst_lp, mut worst_vp) = (0.0f64, 0.0f64);
    let scale_lp = out.d_logprobs.iter().fold(0.0f32, |m, g| m.max(g.abs())) as f64;
    let scale_vp = out.d_vpreds.iter().fold(0.0f32, |m, g| m.max(g.abs())) as f64;
    for i in 0..n {
        let ratio = (lp64[i] - old[i] as f64).exp();
        let v = values[i] as f64;
        let near_kink = (ratio - lo).abs() < 1e-4
            || (ratio - hi).abs() < 1e-4
            || (vp64[i] - v - cfg.cliprange_value).abs() < 1e-4
            || (vp64[i] - v + cfg.cliprange_value).abs() < 1e-4
            || ((vp64[i] - ret[i] as f64).abs()
                - (vp64[i].clamp(v - cfg.cliprange_value, v + cfg.cliprange_value) - ret[i] as f64).abs())
            .abs()
                < 1e-4
                && (vp64[i] - v).abs() > cfg.cliprange_value;
        if near_kink {
            continue;
        }
        let fd = |x: &mut Vec<f64>, which: bool| {
            let orig = x[i];
            x[i] = orig + h;
            let up = if which { f(x, &vp64) } else { f(&lp64, x) };
            x[i] = orig - h;
            let down = if which { f(x, &vp64) } else { f(&lp64, x) };
            x[i] = orig;
            (up - down) / (2.0 * h)
        };
        let fd_lp = fd(&mut lp64.clone(), true);
        let fd_vp = fd(&mut vp64.clone(), false);
        worst_lp = worst_lp.max((fd_lp - out.d_logprobs[i] as f64).abs() / scale_lp);
        worst_vp = worst_vp.max((fd_vp - out.d_vpreds[i] as f64).abs() / scale_vp);
        if mask[i] != 0.0 {
            let a = adv[i] as f64;
            let clipped_pg = (a > 0.0 && ratio > hi) || (a < 0.0 && ratio < lo);
            let clipped_vf = (vp64[i] - v).abs() > cfg.cliprange_value
                && (vp64[i].clamp(v - cfg.cliprange_value, v + cfg.cliprange_value) - ret[i] as f64).abs()
                    > (vp64[i] - ret[i] as f64).abs();
            branches[clipped_pg as usize] += 1;
            branches[2 + clipped_vf as usize] += 1;
        }
    }
    eprintln!("finite differences: d_logprobs max err {worst_lp:.2e}, d_vpreds {worst_vp:.2e}; branches {branches:?}");
    assert!(worst_lp <= 1e-5 && worst_vp <= 1e-5);
    assert!(branches.iter().all(|&c| c >= 3), "every branch is exercised: {branches:?}");
}

#[test]
fn logprob_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, vocab) = (4, 9);
    let logits = random(&mut rng, rows * vocab, 4.0);
    let labels = [0u32, 8, 3, 3];
    let d_logp = [0.7f32, -1.3, 0.2, 2.0];
    let analytic = logprobs_from_logits_backward(&logits, vocab, &labels, &d_logp);
    let objective = |l: &[f64]| -> f64 {
        l.chunks(vocab)
            .zip(labels.iter().zip(d_logp))
            .map(|(row, (&y, g))| {
                let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
                g as f64 * (row[y as usize] - lse)
            })
            .sum()
    };
    let mut l64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let h = 1e-6;
    let mut worst = 0.0f64;
    for i in 0..l64.len() {
        let orig = l64[i];
        l64[i] = orig + h;
        let up = objective(&l64);
        l64[i] = orig - h;
        let down = objective(&l64);
        l64[i] = orig;
        worst = worst.max(((up - down) / (2.0 * h) - analytic[i] as f64).abs() / 2.0);
    }
    eprintln!("logprob backward vs finite differences: max err {worst:.2e}");
    assert!(worst <= 1e-6);
}

// ---- edge cases -----------------------------------------------------------------------------------

/// A one-row minibatch's loss, for single-token branch checks.
fn one_row(
    cfg: &PpoConfig,
    old: &[f32],
    logp: &[f32],
    values: &[f32],
    vpred: &[f32],
    adv: &[f32],
    ret: &[f32],
) -> LossOutput {
    let mask = vec![1.0; old.len()];
    let x = MinibatchInputs {
        old_logprobs: old,
        values,
        advantages: adv,
        returns: ret,
        logprobs: logp,
        vpreds: vpred,
        mask: &mask,
        entropy: None,
    };
    ppo_loss(&x, Dims::new(1, old.len()), cfg).unwrap()
}

#[test]
fn policy_clip_branches() {
    let cfg = PpoConfig::default();
    let m = 4.0f32;
    // Ratios 1.5 and 0.5 (outside [0.8, 1.2]) under positive and negative advantages.
    let old = [0.0f32; 4];
    let logp = [1.5f32.ln(), 0.5f32.ln(), 1.5f32.ln(), 0.5f32.ln()];
    let adv = [1.0f32, 1.0, -1.0, -1.0];
    let zeros = [0.0f32; 4];
    let out = one_row(&cfg, &old, &logp, &zeros, &zeros, &adv, &zeros);
    let ratio: Vec<f32> = logp.iter().map(|l| l.exp()).collect();
    // A > 0, ρ > 1 + ε: the clipped term wins, no gradient. A > 0, ρ < 1 − ε: the unclipped term wins.
    assert_eq!(out.d_logprobs[0], 0.0);
    assert_eq!(out.d_logprobs[1], -ratio[1] / m);
    // A < 0 mirrors it.
    assert_eq!(out.d_logprobs[2], ratio[2] / m);
    assert_eq!(out.d_logprobs[3], 0.0);
    assert_eq!(out.stats.clipfrac, 0.5);
}

#[test]
fn ratio_of_exactly_one_and_zero_advantages() {
    let cfg = PpoConfig::default();
    let old = [-1.0f32, -2.0, -0.5];
    let adv = [0.8f32, 0.0, -0.3];
    let zeros = [0.0f32; 3];
    let out = one_row(&cfg, &old, &old, &zeros, &zeros, &adv, &zeros);
    // ρ = 1: both terms tie, autograd splits the gradient evenly, and both halves are −A/M.
    for (got, want) in out.d_logprobs.iter().zip([-0.8f32 / 3.0, 0.0, 0.3 / 3.0]) {
        assert!((got - want).abs() <= 1e-7, "{got} vs {want}");
    }
    assert_eq!(out.stats.clipfrac, 0.0);
    assert_eq!(out.stats.ratio_mean, 1.0);
    // Zero advantage far outside the clip range: no gradient, not counted as clipped.
    let logp = [2.0f32, 2.0, 2.0];
    let out = one_row(&cfg, &[0.0; 3], &logp, &zeros, &zeros, &[0.0; 3], &zeros);
    assert_eq!(out.d_logprobs, vec![0.0; 3]);
    assert_eq!((out.pg_loss, out.stats.clipfrac), (0.0, 0.0));
}

#[test]
fn value_clip_branches_and_ties() {
    let cfg = PpoConfig::default();
    let cv = cfg.cliprange_value as f32;
    let g = cfg.vf_coef as f32 * 0.5 / 4.0;
    let values = [0.0f32; 4];
    let ret = [2.0f32, 0.1, 1.0, 1.0];
    // Above the band with the clipped error (1.8²) the larger; below it with the unclipped one (0.6²)
    // the larger; exactly on the upper bound; unchanged.
    let vpred = [0.9, -0.5, values[2] + cv, values[3]];
    let out = one_row(&cfg, &[0.0; 4], &[0.0; 4], &values, &vpred, &[0.0; 4], &ret);
    assert_eq!(out.d_vpreds[0], 0.0, "the clipped error is larger and does not depend on vpred");
    assert_eq!(out.d_vpreds[1], g * (2.0 * (vpred[1] - ret[1])));
    // Tie in max((vp − R)², (V̂ − R)²) (half each), and V̂ = min(vp, V + ε) ties too (half of that).
    let d = vpred[2] - ret[2];
    assert_eq!(out.d_vpreds[2], g * 0.5 * (2.0 * d) + g * 0.5 * (2.0 * d) * 1.0 * 0.5);
    assert_eq!(out.d_vpreds[3], g * 0.5 * (2.0 * (vpred[3] - ret[3])) * 2.0);
    assert_eq!(out.stats.val_clipfrac, 0.25);
}

#[test]
fn fully_masked_rows_contribute_nothing() {
    let cfg = PpoConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dims = Dims::new(3, 6);
    let mask = response_mask_from_lengths(&[6, 0, 4], 6, FirstToken::Keep).unwrap();
    let n = dims.numel();
    let t: Vec<Vec<f32>> = (0..6).map(|_| random(&mut rng, n, 1.0)).collect();
    let run = |mask: &[f32], rows: &[usize]| {
        let pick = |v: &[f32]| gather_rows(v, 6, rows);
        let (old, values, adv, ret, logp, vp, mk) =
            (pick(&t[0]), pick(&t[1]), pick(&t[2]), pick(&t[3]), pick(&t[4]), pick(&t[5]), pick(mask));
        let x = MinibatchInputs {
            old_logprobs: &old,
            values: &values,
            advantages: &adv,
            returns: &ret,
            logprobs: &logp,
            vpreds: &vp,
            mask: &mk,
            entropy: None,
        };
        ppo_loss(&x, Dims::new(rows.len(), 6), &cfg).unwrap()
    };
    let with = run(&mask, &[0, 1, 2]);
    let without = run(&mask, &[0, 2]);
    assert_eq!(with.loss, without.loss);
    assert_eq!(with.stats, without.stats);
    assert!(with.d_logprobs[6..12].iter().chain(&with.d_vpreds[6..12]).all(|&g| g == 0.0));
    assert_eq!([&with.d_logprobs[..6], &with.d_logprobs[12..]].concat(), without.d_logprobs);
    // Garbage, even NaN, in masked-out slots never reaches a result.
    let mut poisoned = t.clone();
    for v in &mut poisoned {
        v[7] = f32::NAN;
        v[17] = f32::INFINITY;
    }
    let x = MinibatchInputs {
        old_logprobs: &poisoned[0],
        values: &poisoned[1],
        advantages: &poisoned[2],
        returns: &poisoned[3],
        logprobs: &poisoned[4],
        vpreds: &poisoned[5],
        mask: &mask,
        entropy: None,
    };
    let out = ppo_loss(&x, dims, &cfg).unwrap();
    assert_eq!(out.loss, with.loss);
    assert!(out.d_logprobs.iter().chain(&out.d_vpreds).all(|g| g.is_finite()));
    let empty = vec![0.0; n];
    let x = MinibatchInputs { mask: &empty, ..x };
    assert!(ppo_loss(&x, dims, &cfg).is_err(), "an all-masked minibatch is an error");
}

#[test]
fn nan_in_a_response_token_surfaces_in_the_loss() {
    let cfg = PpoConfig::default();
    let zeros = [0.0f32; 2];
    // A NaN new value could otherwise vanish into the clipped branch (min/max dropping NaN).
    let out = one_row(&cfg, &zeros, &zeros, &zeros, &[f32::NAN, 0.1], &[1.0, -1.0], &[1.0, 1.0]);
    assert!(out.vf_loss.is_nan() && out.loss.is_nan());
    let out = one_row(&cfg, &zeros, &[f32::NAN, 0.0], &zeros, &zeros, &[1.0, -1.0], &[1.0, 1.0]);
    assert!(out.pg_loss.is_nan());
}

#[test]
fn ratio_threshold_zeroes_the_update() {
    let cfg = PpoConfig { ratio_threshold: 1.5, ..PpoConfig::default() };
    let zeros = [0.0f32; 2];
    let out = one_row(&cfg, &[0.0, 0.0], &[1.0, 0.5], &zeros, &[0.3, -0.2], &[1.0, -1.0], &[1.0, 1.0]);
    assert!(out.stats.ratio_mean > 1.5 && out.stats.skipped);
    assert_eq!((out.pg_loss, out.vf_loss, out.loss), (0.0, 0.0, 0.0));
    assert!(out.d_logprobs.iter().chain(&out.d_vpreds).all(|&g| g == 0.0));
    assert!(out.stats.approxkl > 0.0, "the statistics are still reported");
    let ok = one_row(&PpoConfig::default(), &[0.0, 0.0], &[1.0, 0.5], &zeros, &[0.3, -0.2], &[1.0, -1.0], &[1.0, 1.0]);
    assert!(!ok.stats.skipped && ok.loss != 0.0);
}

#[test]
fn rewards_put_the_score_on_the_last_masked_token() {
    let dims = Dims::new(2, 4);
    let mask = response_mask_from_lengths(&[3, 4], 4, FirstToken::Drop).unwrap();
    assert_eq!(mask, vec![0., 1., 1., 0., 0., 1., 1., 1.]);
    let logp = [-1.0f32, -2.0, -0.5, 9.0, -1.0, -1.0, -1.0, -1.0];
    let ref_logp = [-1.5f32, -1.0, -0.5, f32::NAN, -1.0, -2.0, -1.0, -0.5];
    let r = compute_rewards(&[3.0, -1.0], &logp, &ref_logp, &mask, dims, 0.5).unwrap();
    assert_eq!(r.non_score_reward, vec![0.0, 0.5, -0.0, 0.0, 0.0, -0.5, -0.0, 0.25]);
    assert_eq!(r.rewards, vec![0.0, 0.5, 3.0, 0.0, 0.0, -0.5, -0.0, -0.75]);
    let one_token = response_mask_from_lengths(&[1, 4], 4, FirstToken::Drop).unwrap();
    let err = compute_rewards(&[3.0, -1.0], &logp, &ref_logp, &one_token, dims, 0.5).unwrap_err();
    assert!(format!("{err}").contains("response 0"), "{err}");
    let bad = [0.5f32; 8];
    assert!(compute_rewards(&[3.0, -1.0], &logp, &ref_logp, &bad, dims, 0.5).is_err(), "a mask is 0 or 1");
}

#[test]
fn gae_by_hand() {
    let (gamma, lam) = (0.9f64, 0.8f64);
    let dims = Dims::new(1, 4);
    let mask = [1.0f32, 1.0, 1.0, 0.0];
    let values = [0.5f32, -0.25, 1.0, 7.0];
    let rewards = [0.1f32, 0.0, 2.0, 5.0];
    let adv = compute_advantages(&values, &rewards, &mask, dims, gamma, lam).unwrap();
    // The slot after the response contributes neither a value nor a reward.
    let (v, r) = ([0.5f64, -0.25, 1.0, 0.0], [0.1f64, 0.0, 2.0, 0.0]);
    let mut raw = [0.0f64; 4];
    let mut last = 0.0;
    for t in (0..4).rev() {
        let next = if t < 3 { v[t + 1] } else { 0.0 };
        last = r[t] + gamma * next - v[t] + gamma * lam * last;
        raw[t] = last;
    }
    for t in 0..3 {
        assert!((adv.returns[t] as f64 - (raw[t] + v[t])).abs() < 1e-6, "returns[{t}]");
    }
    assert_eq!(adv.returns[3], 0.0);
    let mean = raw[..3].iter().sum::<f64>() / 3.0;
    let var = raw[..3].iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 2.0;
    for (t, a) in raw[..3].iter().enumerate() {
        let want = (a - mean) / (var + 1e-8).sqrt();
        assert!((adv.advantages[t] as f64 - want).abs() < 1e-5, "advantages[{t}]");
    }
    assert_eq!(adv.advantages[3], 0.0);
    let single = [1.0f32, 0.0, 0.0, 0.0];
    assert!(compute_advantages(&values, &rewards, &single, dims, gamma, lam).is_err(), "one token cannot be whitened");
}

#[test]
fn masked_statistics() {
    let v = [1.0f32, 2.0, 3.0, 100.0];
    let m = [1.0f32, 1.0, 1.0, 0.0];
    assert_eq!(masked_mean(&v, &m), 2.0);
    assert_eq!(masked_var(&v, &m, false), 2.0 / 3.0);
    assert_eq!(masked_var(&v, &m, true), 1.0);
    let w = masked_whiten(&v, &m, true);
    assert!((w[0] + 1.0).abs() < 1e-6 && w[1].abs() < 1e-6 && (w[2] - 1.0).abs() < 1e-6);
    let w = masked_whiten(&v, &m, false);
    assert!((w[1] - 2.0).abs() < 1e-6);
    assert!(masked_mean(&v, &[0.0; 4]).is_nan(), "an empty mask gives NaN, as in TRL");
    assert!(masked_var(&v, &[1.0, 0.0, 0.0, 0.0], true).is_nan(), "one element has no unbiased variance");
}

#[test]
fn response_masks() {
    let eos = 1;
    let responses: Vec<Vec<u32>> = vec![vec![5, 6, 1, 0, 0], vec![1], vec![7, 8, 9, 4, 4], vec![]];
    let keep = response_mask(&responses, 5, eos, FirstToken::Keep).unwrap();
    let drop = response_mask(&responses, 5, eos, FirstToken::Drop).unwrap();
    #[rustfmt::skip]
    assert_eq!(keep, vec![
        1., 1., 1., 0., 0.,
        1., 0., 0., 0., 0.,
        1., 1., 1., 1., 1.,
        0., 0., 0., 0., 0.,
    ]);
    #[rustfmt::skip]
    assert_eq!(drop, vec![
        0., 1., 1., 0., 0.,
        0., 0., 0., 0., 0.,
        0., 1., 1., 1., 1.,
        0., 0., 0., 0., 0.,
    ]);
    assert!(response_mask_from_lengths(&[6], 5, FirstToken::Keep).is_err(), "longer than the columns");
}

#[test]
fn kl_controllers_and_early_stopping() {
    let mut fixed = KlController::from_config(&PpoConfig { adap_kl_ctrl: false, ..PpoConfig::default() });
    fixed.update(100.0, 16);
    assert_eq!(fixed.value(), 0.2);
    let mut adaptive = KlController::from_config(&PpoConfig::default());
    adaptive.update(1000.0, 16);
    assert_eq!(adaptive.value(), 0.2 * (1.0 + 0.2 * 16.0 / 10000.0));
    adaptive.update(6.0, 16);
    assert_eq!(adaptive.value(), 0.2 * (1.0 + 0.2 * 16.0 / 10000.0), "at target the coefficient holds");
    let json = serde_json::to_string(&adaptive).unwrap();
    let back: KlController = serde_json::from_str(&json).unwrap();
    assert!(matches!(back, KlController::Adaptive { .. }) && (back.value() - adaptive.value()).abs() < 1e-15, "{json}");

    let off = PpoConfig::default();
    assert!(!early_stop(&off, 10.0), "early stopping is off by default");
    let on = PpoConfig { early_stopping: true, target_kl: 0.1, ..PpoConfig::default() };
    assert!(!early_stop(&on, 0.15) && early_stop(&on, 0.1501));
}

#[test]
fn adam_zero_gradient_still_moves_along_momentum() {
    let adam = Adam::new(0.1);
    let mut p = vec![1.0f32, -1.0];
    let mut s = AdamState::new(2);
    adam.step(&mut p, &[0.5, -0.5], &mut s).unwrap();
    // The first step moves every coordinate by lr against its gradient's sign.
    assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6);
    let before = p.clone();
    adam.step(&mut p, &[0.0, 0.0], &mut s).unwrap();
    assert!(p[0] < before[0] && p[1] > before[1], "a skipped minibatch still moves: {p:?}");
    assert_eq!(s.step, 2);
    assert!(adam.step(&mut p, &[0.0], &mut s).is_err());
}

#[test]
fn config_defaults_toml_and_validation() {
    let d = PpoConfig::default();
    assert_eq!((d.learning_rate, d.batch_size, d.mini_batch_size, d.ppo_epochs), (1.41e-5, 16, 4, 1));
    assert_eq!((d.init_kl_coef, d.adap_kl_ctrl, d.target, d.horizon), (0.2, true, 6.0, 10000.0));
    assert_eq!((d.gamma, d.lam, d.cliprange, d.cliprange_value, d.vf_coef), (1.0, 0.95, 0.2, 0.2, 0.1));
    assert_eq!((d.ratio_threshold, d.max_grad_norm, d.early_stopping, d.target_kl), (10.0, None, false, 0.1));
    assert_eq!(d.first_token, FirstToken::Keep);
    d.validate().unwrap();

    let text = d.to_toml_string().unwrap();
    assert_eq!(PpoConfig::from_toml_str(&text).unwrap(), d);
    let c = PpoConfig::from_toml_str("ppo_epochs = 4\nmax_grad_norm = 1.0\nfirst_token = \"drop\"\n").unwrap();
    assert_eq!((c.ppo_epochs, c.max_grad_norm, c.first_token, c.batch_size), (4, Some(1.0), FirstToken::Drop, 16));

    let err = |toml: &str| format!("{:#}", PpoConfig::from_toml_str(toml).unwrap_err());
    assert!(err("mini_batch_size = 5").contains("mini_batch_size"));
    assert!(err("learning_rate = -1.0").contains("learning_rate"));
    assert!(err("lam = 1.5").contains("lam"));
    assert!(err("cliprange = 1.0").contains("cliprange"));
    assert!(err("max_grad_norm = 0.0").contains("max_grad_norm"));
    assert!(err("early_stopping = true\ntarget_kl = 0.0").contains("target_kl"));
    assert!(err("ppo_epoch = 2").contains("ppo_epoch"), "unknown fields are errors");
    assert!(err("seed = 0").contains("seed"), "[ppo] seed is gone: [run] seed seeds the run");
    assert!(err("horizon = 0.0").contains("horizon"));
}
