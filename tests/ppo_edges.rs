//! src/ppo's PPO arithmetic on its own: the analytic loss and log-prob gradients against finite
//! differences of an f64 transcription of TRL's loss, every clip and max branch on single tokens,
//! masked-out rows, NaN, `ratio_threshold`, rewards, GAE and masks by hand, the KL controllers,
//! Adam's zero-gradient step and the config. (tests/ppo_math.rs compares with PyTorch's numbers.)

mod oracles;

use detox::ppo::{
    Dims, FirstToken, KlController, LossOutput, MinibatchInputs, PpoConfig, compute_advantages, compute_rewards,
    early_stop, masked_mean, masked_var, masked_whiten, ppo_loss, response_mask, response_mask_from_lengths,
};
use oracles::{Adam, AdamState, logprobs_from_logits_backward};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// TRL leaves values in masked-out slots; src/ppo writes 0 there.
fn masked(values: &[f32], mask: &[f32]) -> Vec<f32> {
    values.iter().zip(mask).map(|(v, m)| if *m != 0.0 { *v } else { 0.0 }).collect()
}

fn gather_rows(x: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r * cols..(r + 1) * cols].iter().copied()).collect()
}

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
