//! One whole PPO step against a PyTorch transcription of TRL 0.4.7's (tests/fixtures/ppo_step, from
//! tools/make_ppo_step_fixture.py): rollout and reference log-probs, values, rewards, every
//! minibatch's advantages, losses and statistics, the first minibatch's gradients of every LoRA
//! matrix and of the value head, the parameters after the step, and the KL coefficient.

use crate::common::{Expected, fixture, rel_l2_err, rel_max_err};
use detox::backend::Backend;
use detox::checkpoint::Checkpoint;
use detox::parallel::Solo;
use detox::ppo::policy::Policy;
use detox::ppo::step::{Optimizer, Rollout, StepOptions, grad_tensors, ppo_step, trainable_names, trainables};
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

pub fn ppo_step_matches_trl<B: Backend>(be: &B) {
    let dir = fixture("ppo_step");
    let exp = Expected::open(dir.join("step.safetensors"));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("step.json")).unwrap()).unwrap();
    let mut model = T5::load(be, &dir.join("model")).unwrap();
    model.load_adapter(be, &dir.join("adapter")).unwrap();
    let value_head = ValueHead::load(be, &dir.join("adapter/value_head.safetensors"), model.config.d_model).unwrap();
    let mut policy = Policy { model, value_head, value_dropout: 0.0 };

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
    let mut opt = Optimizer::new(be, &mut policy, cfg.learning_rate).unwrap();
    let mut kl = KlController::from_config(&cfg);
    let opts = StepOptions { shuffle: false, seed: 0, loss_scale: 1.0 };
    let grads_file = Checkpoint::open_file(&dir.join("grads/e0m0.safetensors")).unwrap();
    let order = trainable_names(&mut policy);
    let mut compared = 0;
    let report = ppo_step(be, &Solo, &mut policy, &mut opt, &mut kl, &cfg, &rollout, &opts, |e, m, grads| {
        if (e, m) == (0, 0) {
            for (name, g) in order.iter().zip(grad_tensors(grads)) {
                let want = grads_file.get(name).unwrap().to_f32();
                check(be, &be.download(g).unwrap(), &want, &format!("gradient of {name}"));
                compared += 1;
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(compared, order.len(), "every gradient was compared");

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
    let after = Checkpoint::open_file(&dir.join("params_after.safetensors")).unwrap();
    let order = trainable_names(&mut policy);
    for (name, p) in order.iter().zip(trainables(&mut policy)) {
        check(be, &be.download(p).unwrap(), &after.get(name).unwrap().to_f32(), &format!("{name} after the step"));
    }
    let want_kl = meta["kl_coef_after"].as_f64().unwrap();
    assert!((kl.value() - want_kl).abs() < 1e-9 * want_kl, "KL coefficient {} vs {want_kl}", kl.value());
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

// Registration only: tests/gpu.rs runs it on CUDA; tests/ppo_parity.rs runs it on the CPU.
crate::common::suite!("ppo_step": gpu ppo_step_matches_trl);
