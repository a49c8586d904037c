//! Data parallelism on the CPU: the same global batch on one worker and on a group of workers
//! (threads exchanging through host memory, the arithmetic NCCL does on GPUs) gives the same losses
//! and parameters, for a PPO step (tests/fixtures/ppo_step, batch 4 in minibatches of 2, two epochs)
//! and for a full-parameter SFT step (tests/fixtures/sft).

mod common;

use common::{Expected, fixture, rel_max_err};
use detox::backend::Backend;
use detox::backend::cpu::Cpu;
use detox::checkpoint::Checkpoint;
use detox::parallel::{Collective, Solo, Threads, shard};
use detox::ppo::policy::Policy;
use detox::ppo::step::{Optimizer, Rollout, StepOptions, ppo_step, trainables};
use detox::ppo::{KlController, PpoConfig};
use detox::sft::data::{Pair, SftBatch};
use detox::sft::step::{Hyper, SftOptimizer, Trainables, sft_step};
use detox::t5::{T5, ValueHead};

/// Runs `work` on every member of a group of `world` workers, in threads; returns their outputs.
fn in_group<T: Send>(world: usize, work: impl Fn(&dyn Collective<Cpu>) -> T + Sync) -> Vec<T> {
    let group = Threads::group(world);
    std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = group.iter().map(|g| s.spawn(move || work(g))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One PPO step on the fixture's rollout: (total losses of every minibatch, parameters after).
fn ppo(group: &dyn Collective<Cpu>) -> (Vec<f32>, Vec<Vec<f32>>) {
    let dir = fixture("ppo_step");
    let exp = Expected::open(dir.join("step.safetensors"));
    let mut model = T5::load(&Cpu, &dir.join("model")).unwrap();
    model.load_adapter(&Cpu, &dir.join("adapter")).unwrap();
    let value_head = ValueHead::load(&Cpu, &dir.join("adapter/value_head.safetensors"), model.config.d_model).unwrap();
    let mut policy = Policy { model, value_head, value_dropout: 0.0 };
    let cfg =
        PpoConfig { batch_size: 4, mini_batch_size: 2, ppo_epochs: 2, learning_rate: 1e-3, ..PpoConfig::default() };
    let (qids, qshape) = exp.ids("query_ids");
    let (qlens, _) = exp.ids("query_lengths");
    let (rids, rshape) = exp.ids("response_ids");
    let (glens, _) = exp.ids("generated_lengths");
    let rollout = Rollout {
        prompts: (0..4).map(|r| qids[r * qshape[1]..r * qshape[1] + qlens[r] as usize].to_vec()).collect(),
        responses: (0..4).map(|r| rids[r * rshape[1] + 1..r * rshape[1] + 1 + glens[r] as usize].to_vec()).collect(),
        scores: exp.get("scores").0,
        streams: (0..4).collect(),
    };
    let mut opt = Optimizer::new(&Cpu, &mut policy, cfg.learning_rate).unwrap();
    let mut kl = KlController::from_config(&cfg);
    let opts = StepOptions { shuffle: true, seed: 7, loss_scale: 1.0 };
    let report =
        ppo_step(&Cpu, group, &mut policy, &mut opt, &mut kl, &cfg, &rollout, &opts, |_, _, _| Ok(())).unwrap();
    let losses = report.minibatches.iter().map(|m| m.loss.loss).collect();
    (losses, trainables(&mut policy).into_iter().map(|t| t.data.clone()).collect())
}

#[test]
fn a_ppo_step_is_the_same_on_one_worker_and_on_two() {
    let (want_losses, want_params) = ppo(&Solo);
    assert_eq!(want_losses.len(), 4, "two epochs of two minibatches");
    for (losses, params) in in_group(2, ppo) {
        let err = rel_max_err(&losses, &want_losses);
        assert!(err <= 1e-5, "minibatch losses {losses:?} vs {want_losses:?}");
        for (got, want) in params.iter().zip(&want_params) {
            let err = rel_max_err(got, want);
            assert!(err <= 1e-5, "a parameter after the step differs by {err}");
        }
    }
}

/// The SFT fixture's batch as pairs.
fn pairs() -> Vec<Pair> {
    let x = Expected::open(fixture("sft/flan/batch.safetensors"));
    let (ids, is) = x.ids("input_ids");
    let (lengths, _) = x.ids("lengths");
    let (labels, ls) = x.ids("labels");
    let (mask, _) = x.get("mask");
    (0..is[0])
        .map(|r| Pair {
            source: ids[r * is[1]..r * is[1] + lengths[r] as usize].to_vec(),
            target: (0..ls[1]).filter(|&t| mask[r * ls[1] + t] > 0.0).map(|t| labels[r * ls[1] + t]).collect(),
        })
        .collect()
}

/// One full-parameter SFT step over the fixture's batch: (loss, every master after the step).
fn sft(group: &dyn Collective<Cpu>) -> (f64, Vec<Vec<f32>>) {
    let dir = fixture("sft/flan/model");
    let mut model = T5::load(&Cpu, &dir).unwrap();
    let mut opt = SftOptimizer::full(&Cpu, &mut model, &Checkpoint::open_dir(&dir).unwrap()).unwrap();
    let all = pairs();
    let total: usize = all.iter().map(|p| p.target.len()).sum();
    let mine: Vec<&Pair> = all[shard(all.len(), group.rank(), group.world())].iter().collect();
    let batch = SftBatch::new(&mine, 0, 0);
    let h = Hyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        loss_scale: 1.0,
        dropout_seed: 0,
    };
    let r = sft_step(&Cpu, &mut model, &mut opt, &batch, total, group, &h).unwrap();
    let Trainables::Full { masters, .. } = &opt.trainables else { panic!("full-parameter training") };
    (r.loss, masters.iter().map(|m| Cpu.download(m).unwrap()).collect())
}

#[test]
fn an_sft_step_is_the_same_on_one_worker_and_on_two_or_three() {
    let (want_loss, want_params) = sft(&Solo);
    for world in [2, 3] {
        for (loss, params) in in_group(world, sft) {
            assert!(((loss - want_loss) / want_loss).abs() < 1e-6, "{world} workers: loss {loss} vs {want_loss}");
            for (got, want) in params.iter().zip(&want_params) {
                let err = rel_max_err(got, want);
                assert!(err <= 1e-5, "{world} workers: a weight after the step differs by {err}");
            }
        }
    }
}
