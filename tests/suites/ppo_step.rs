//! One whole PPO step against a PyTorch transcription of TRL 0.4.7's (tests/fixtures/ppo_step, from
//! tools/make_ppo_step_fixture.py): rollout and reference log-probs, values, rewards, every
//! minibatch's advantages, losses and statistics, the first minibatch's gradients of every LoRA
//! matrix and of the value head, the parameters after the step, and the KL coefficient.

use crate::common::{Expected, fixture, rel_l2_err, rel_max_err};
use detox::backend::Backend;
use detox::checkpoint::Checkpoint;
use detox::parallel::Solo;
use detox::ppo::policy::Policy;
use detox::ppo::step::{Learner, Optimizer, Rollout, StepEnv, StepOptions, StepReport, ppo_step};
use detox::ppo::trainables::{trainable_names, trainable_tensors};
use detox::ppo::{FirstToken, KlController, PpoConfig};
use detox::t5::{T5, ValueHead};
use serde_json::Value;

/// CPU f32 against PyTorch f32: rounding only. CUDA: half-precision products.
fn check<B: Backend>(be: &B, got: &[f32], want: &[f32], what: &str) {
    if be.ordinal().is_none() {
        let err = rel_max_err(got, want);
        assert!(err <= 2e-4, "{what}: max error {err} (relative to the reference's scale)");
    } else {
        let err = rel_l2_err(got, want);
        assert!(err <= 2e-2, "{what}: relative L2 error {err}");
    }
}

fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    x.iter().zip(mask).map(|(v, m)| if *m > 0.5 { *v } else { 0.0 }).collect()
}

/// The fixture's model with its adapter and value head, its PPO settings and its rollout.
fn load_case<B: Backend>(be: &B, exp: &Expected, meta: &Value) -> (Policy<B>, PpoConfig, Rollout) {
    let dir = fixture("ppo_step");
    let mut model = T5::load(be, &dir.join("model")).unwrap();
    model.load_adapter(be, &dir.join("adapter")).unwrap();
    let value_head = ValueHead::load(be, &dir.join("adapter/value_head.safetensors"), model.config.d_model).unwrap();
    let policy = Policy { model, value_head, value_dropout: 0.0 };
    let pc = &meta["ppo_config"];
    let cfg = PpoConfig {
        learning_rate: pc["learning_rate"].as_f64().unwrap(),
        batch_size: pc["batch_size"].as_u64().unwrap() as usize,
        mini_batch_size: pc["mini_batch_size"].as_u64().unwrap() as usize,
        ppo_epochs: pc["ppo_epochs"].as_u64().unwrap() as usize,
        first_token: FirstToken::Drop,
        ..PpoConfig::default()
    };
    let (qids, qshape) = exp.ids("query_ids");
    let (qlens, _) = exp.ids("query_lengths");
    let (rids, rshape) = exp.ids("response_ids");
    let (glens, _) = exp.ids("generated_lengths");
    let rows = qshape[0];
    let rollout = Rollout {
        prompts: (0..rows).map(|r| qids[r * qshape[1]..r * qshape[1] + qlens[r] as usize].to_vec()).collect(),
        responses: (0..rows).map(|r| rids[r * rshape[1] + 1..r * rshape[1] + 1 + glens[r] as usize].to_vec()).collect(),
        scores: exp.get("scores").0,
        streams: (0..rows as u32).collect(),
    };
    (policy, cfg, rollout)
}

pub fn ppo_step_matches_trl<B: Backend>(be: &B) {
    let dir = fixture("ppo_step");
    let exp = Expected::open(dir.join("step.safetensors"));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("step.json")).unwrap()).unwrap();
    let (mut policy, cfg, rollout) = load_case(be, &exp, &meta);
    let mut opt = Optimizer::new(be, &policy, cfg.learning_rate).unwrap();
    let mut kl = KlController::from_config(&cfg);
    let opts = StepOptions { shuffle: false, seed: 0, loss_scale: 1.0 };
    let grads_file = Checkpoint::open_file(&dir.join("grads/e0m0.safetensors")).unwrap();
    let order = trainable_names(&policy);
    let mut compared = 0;
    let env = StepEnv { be, group: &Solo, cfg: &cfg, opts };
    let learner = Learner { policy: &mut policy, opt: &mut opt, kl: &mut kl };
    let report = ppo_step(&env, learner, &rollout, &mut |e, m, grads| {
        if (e, m) == (0, 0) {
            for (name, g) in order.iter().zip(grads.tensors()) {
                let want = grads_file.get(name).unwrap().to_f32();
                check(be, &be.download(g).unwrap(), &want, &format!("gradient of {name}"));
                compared += 1;
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(compared, order.len(), "every gradient was compared");
    check_passes_and_minibatches(be, &report, &exp, &meta);
    let after = Checkpoint::open_file(&dir.join("params_after.safetensors")).unwrap();
    for (name, p) in trainable_tensors(&policy) {
        check(be, &be.download(p).unwrap(), &after.get(&name).unwrap().to_f32(), &format!("{name} after the step"));
    }
    let want_kl = meta["kl_coef_after"].as_f64().unwrap();
    assert!((kl.value() - want_kl).abs() < 1e-9 * want_kl, "KL coefficient {} vs {want_kl}", kl.value());
    check_stats(be, &report, &meta);
}

/// The rollout and reference passes, the rewards, and every minibatch's tensors and losses.
fn check_passes_and_minibatches<B: Backend>(be: &B, report: &StepReport, exp: &Expected, meta: &Value) {
    let mask = exp.get("masks").0;
    assert_eq!(report.mask, mask, "TRL's seq2seq response mask");
    check(be, &masked(&report.old_logprobs, &mask), &masked(&exp.get("old_logprobs").0, &mask), "old log-probs");
    check(be, &masked(&report.ref_logprobs, &mask), &masked(&exp.get("ref_logprobs").0, &mask), "reference log-probs");
    check(be, &masked(&report.values, &mask), &masked(&exp.get("values").0, &mask), "values");
    check(be, &masked(&report.rewards, &mask), &masked(&exp.get("rewards").0, &mask), "rewards");
    for (i, mb) in report.minibatches.iter().enumerate() {
        let key = format!("e{}m{}", mb.epoch, i % 2);
        let mmask: Vec<f32> =
            mb.rows.iter().flat_map(|&r| mask[r * report.dims.cols..(r + 1) * report.dims.cols].to_vec()).collect();
        for (name, got) in [
            ("advantages", &mb.advantages),
            ("returns", &mb.returns),
            ("logprobs", &mb.logprobs),
            ("vpreds", &mb.vpreds),
        ] {
            check(
                be,
                &masked(got, &mmask),
                &masked(&exp.get(&format!("{key}.{name}")).0, &mmask),
                &format!("{key} {name}"),
            );
        }
        let want = &meta["minibatches"][i];
        // e0m0's policy loss is −mean(whitened advantages) ≈ 0: compare losses on an absolute scale.
        for (name, got) in [("pg_loss", mb.loss.pg_loss), ("vf_loss", mb.loss.vf_loss), ("total", mb.loss.loss)] {
            let w = want[name].as_f64().unwrap() as f32;
            let tol = if be.ordinal().is_none() { 1e-5 } else { 2e-2 };
            assert!((got - w).abs() <= tol * w.abs().max(1.0), "{key} {name}: {got} vs {w}");
        }
    }
}

/// The statistics TRL logs.
fn check_stats<B: Backend>(be: &B, report: &StepReport, meta: &Value) {
    let st = &meta["step_stats"];
    for (key, got) in [
        ("objective/kl", report.stats.kl),
        ("objective/entropy", report.stats.entropy),
        ("ppo/mean_non_score_reward", report.stats.mean_non_score_reward),
        ("ppo/policy/clipfrac", report.stats.train.clipfrac),
        ("ppo/val/clipfrac", report.stats.train.val_clipfrac),
        ("ppo/policy/approxkl", report.stats.train.approxkl),
    ] {
        let w = st[key].as_f64().unwrap() as f32;
        let tol = if be.ordinal().is_none() { 1e-4 } else { 3e-2 };
        assert!((got - w).abs() <= tol * w.abs().max(1e-2), "{key}: {got} vs {w}");
    }
    assert!(report.minibatches.iter().all(|m| m.grad_norm > 0.0));
}

/// `[ppo] rollout_dropout`: off, the rollout pass is the dropout-free pass the fixture recorded;
/// on, as in the seed's stack, the adapters' and the value head's masks apply there too (the
/// reference pass keeps none), so the first minibatch's ratio no longer starts at 1.
pub fn rollout_dropout_applies_masks<B: Backend>(be: &B) {
    let dir = fixture("ppo_step");
    let exp = Expected::open(dir.join("step.safetensors"));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("step.json")).unwrap()).unwrap();
    let mask = exp.get("masks").0;
    let run = |rollout_dropout: bool| {
        let (mut policy, cfg, rollout) = load_case(be, &exp, &meta);
        policy.model.lora.as_mut().unwrap().dropout = 0.05;
        policy.value_dropout = 0.1;
        let cfg = PpoConfig { rollout_dropout, ..cfg };
        let mut opt = Optimizer::new(be, &policy, cfg.learning_rate).unwrap();
        let mut kl = KlController::from_config(&cfg);
        let env =
            StepEnv { be, group: &Solo, cfg: &cfg, opts: StepOptions { shuffle: false, seed: 7, loss_scale: 1.0 } };
        let learner = Learner { policy: &mut policy, opt: &mut opt, kl: &mut kl };
        ppo_step(&env, learner, &rollout, &mut |_, _, _| Ok(())).unwrap()
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        masked(a, &mask).iter().zip(masked(b, &mask)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    };
    let (want_old, want_values) = (exp.get("old_logprobs").0, exp.get("values").0);

    let off = run(false);
    check(be, &masked(&off.old_logprobs, &mask), &masked(&want_old, &mask), "old log-probs, rollout_dropout off");
    check(be, &masked(&off.values, &mask), &masked(&want_values, &mask), "values, rollout_dropout off");

    let on = run(true);
    check(be, &masked(&on.ref_logprobs, &mask), &masked(&exp.get("ref_logprobs").0, &mask), "reference log-probs");
    let (dlp, dv) = (max_diff(&on.old_logprobs, &want_old), max_diff(&on.values, &want_values));
    assert!(dlp > 1e-2, "old log-probs with rollout_dropout on moved by at most {dlp}: no adapter masks applied");
    assert!(dv > 1e-2, "values with rollout_dropout on moved by at most {dv}: no value-head mask applied");
    let first = &on.minibatches[0];
    let cols = on.dims.cols;
    let (mut moved, mut tokens) = (0.0f64, 0);
    for (k, &row) in first.rows.iter().enumerate() {
        for c in 0..cols {
            if mask[row * cols + c] > 0.5 {
                let ratio = f64::from(first.logprobs[k * cols + c] - on.old_logprobs[row * cols + c]).exp();
                moved += (ratio - 1.0).abs();
                tokens += 1;
            }
        }
    }
    let mean = moved / tokens as f64;
    assert!(mean > 1e-3, "the first minibatch's ratio stayed at 1 (mean |ratio − 1| = {mean}) with rollout_dropout on");
}

// Registration only: tests/gpu.rs runs them on CUDA; tests/ppo_parity.rs runs them on the CPU.
crate::common::suite!("ppo_step": gpu ppo_step_matches_trl, gpu rollout_dropout_applies_masks);
