//! Data parallelism: the same global batch on one worker and on a group of workers (threads that
//! exchange through host memory, the sums NCCL makes on GPUs) gives the same losses, gradients and
//! updates, for a PPO step (tests/fixtures/ppo_step, batch 4 in minibatches of 2, two epochs) and a
//! full-parameter SFT step (tests/fixtures/sft). Each worker makes its own backend, as each GPU
//! worker does. Adam's first step barely depends on the gradients' scale, so the gradients and
//! their norms are compared too, and updates rather than parameters.

use crate::common::{Expected, fixture, rel_l2_err, rel_max_err};
use detox::backend::Backend;
use detox::checkpoint::Checkpoint;
use detox::parallel::{Collective, Solo, Threads, shard};
use detox::ppo::policy::Policy;
use detox::ppo::step::{Learner, Optimizer, Rollout, StepEnv, StepOptions, ppo_step};
use detox::ppo::trainables::trainable_tensors;
use detox::ppo::{KlController, PpoConfig};
use detox::sft::data::{Pair, SftBatch};
use detox::sft::step::{Hyper, OptimizerKind, SftOptimizer, Trainables, sft_step};
use detox::t5::{T5, ValueHead};

/// CPU: the same f32 sums in another order. CUDA: half-precision products of other shapes.
fn check(cpu: bool, got: &[f32], want: &[f32], what: &str) {
    if cpu {
        let err = rel_max_err(got, want);
        assert!(err <= 1e-5, "{what}: max error {err} (relative to the one worker's scale)");
    } else {
        let err = rel_l2_err(got, want);
        assert!(err <= 1e-2, "{what}: relative L2 error {err}");
    }
}

/// Adam's first update is g / (|g| + ε): where |g| is near ε, rounding moves single elements, so
/// updates are compared as a whole.
fn check_update(cpu: bool, got: &[f32], want: &[f32], what: &str) {
    let err = rel_l2_err(got, want);
    let tol = if cpu { 1e-4 } else { 1e-2 };
    assert!(err <= tol, "{what}: relative L2 error {err}");
}

/// Runs `work` on every member of a group of `world` workers, in threads; returns their outputs.
fn in_group<B: Backend, T: Send>(
    world: usize,
    make: fn() -> B,
    work: impl Fn(&B, &dyn Collective<B>) -> T + Sync,
) -> Vec<T> {
    let group = Threads::group(world);
    std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = group.iter().map(|g| s.spawn(move || work(&make(), g))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn delta(after: &[Vec<f32>], before: &[Vec<f32>]) -> Vec<Vec<f32>> {
    after.iter().zip(before).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect()).collect()
}

struct PpoOutcome {
    losses: Vec<f32>,
    grad_norms: Vec<f64>,
    first_grads: Vec<Vec<f32>>,
    updates: Vec<Vec<f32>>,
}

/// One PPO step on the fixture's rollout.
fn ppo<B: Backend>(be: &B, group: &dyn Collective<B>) -> PpoOutcome {
    let dir = fixture("ppo_step");
    let exp = Expected::open(dir.join("step.safetensors"));
    let mut model = T5::load(be, &dir.join("model")).unwrap();
    model.load_adapter(be, &dir.join("adapter")).unwrap();
    let value_head = ValueHead::load(be, &dir.join("adapter/value_head.safetensors"), model.config.d_model).unwrap();
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
    let params = |p: &Policy<B>| -> Vec<Vec<f32>> {
        trainable_tensors(p).into_iter().map(|(_, t)| be.download(t).unwrap()).collect()
    };
    let before = params(&policy);
    let mut opt = Optimizer::new(be, &policy, cfg.learning_rate).unwrap();
    let mut kl = KlController::from_config(&cfg);
    let opts = StepOptions { shuffle: true, seed: 7, loss_scale: 1.0 };
    let mut first_grads = Vec::new();
    let env = StepEnv { be, group, cfg: &cfg, opts };
    let learner = Learner { policy: &mut policy, opt: &mut opt, kl: &mut kl };
    let report = ppo_step(&env, learner, &rollout, &mut |e, m, grads| {
        if (e, m) == (0, 0) {
            first_grads = grads.tensors().into_iter().map(|g| be.download(g).unwrap()).collect();
        }
        Ok(())
    })
    .unwrap();
    PpoOutcome {
        losses: report.minibatches.iter().map(|m| m.loss.loss).collect(),
        grad_norms: report.minibatches.iter().map(|m| m.grad_norm).collect(),
        first_grads,
        updates: delta(&params(&policy), &before),
    }
}

pub fn a_ppo_step_is_the_same_on_one_worker_and_on_two<B: Backend>(make: fn() -> B) {
    let cpu = make().ordinal().is_none();
    let want = ppo(&make(), &Solo);
    assert_eq!(want.losses.len(), 4, "two epochs of two minibatches");
    for got in in_group(2, make, ppo) {
        check(cpu, &got.losses, &want.losses, "minibatch losses");
        let norms = |n: &[f64]| n.iter().map(|&x| x as f32).collect::<Vec<_>>();
        check(cpu, &norms(&got.grad_norms), &norms(&want.grad_norms), "gradient norms");
        assert_eq!(got.first_grads.len(), want.first_grads.len());
        for (i, (g, w)) in got.first_grads.iter().zip(&want.first_grads).enumerate() {
            check(cpu, g, w, &format!("the first minibatch's gradient {i}"));
        }
        for (i, (g, w)) in got.updates.iter().zip(&want.updates).enumerate() {
            check_update(cpu, g, w, &format!("the update of parameter {i}"));
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

/// One full-parameter SFT step over the fixture's batch: (loss, gradient norm, every master's update).
fn sft<B: Backend>(be: &B, group: &dyn Collective<B>) -> (f64, f64, Vec<Vec<f32>>) {
    let dir = fixture("sft/flan/model");
    let mut model = T5::load(be, &dir).unwrap();
    let mut opt = SftOptimizer::full(be, &model, &Checkpoint::open_dir(&dir).unwrap(), OptimizerKind::AdamW).unwrap();
    let masters = |opt: &SftOptimizer<B>| -> Vec<Vec<f32>> {
        let Trainables::Full { masters, .. } = &opt.trainables else { panic!("full-parameter training") };
        masters.iter().map(|m| be.download(m).unwrap()).collect()
    };
    let before = masters(&opt);
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
        adafactor: None,
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        loss_scale: be.default_loss_scale(),
        dropout_seed: 0,
    };
    let r = sft_step(be, &mut model, &mut opt, &batch, total, group, &h).unwrap();
    (r.loss, r.grad_norm, delta(&masters(&opt), &before))
}

pub fn an_sft_step_is_the_same_on_one_worker_and_on_two_or_three<B: Backend>(make: fn() -> B) {
    let cpu = make().ordinal().is_none();
    let (want_loss, want_norm, want_updates) = sft(&make(), &Solo);
    for world in [2, 3] {
        for (loss, norm, updates) in in_group(world, make, sft) {
            let what = format!("{world} workers");
            check(
                cpu,
                &[loss as f32, norm as f32],
                &[want_loss as f32, want_norm as f32],
                &format!("{what}: loss, norm"),
            );
            for (i, (g, w)) in updates.iter().zip(&want_updates).enumerate() {
                check_update(cpu, g, w, &format!("{what}: the update of weight {i}"));
            }
        }
    }
}

// Registration only: each worker makes its own backend (in tests/gpu.rs, its own stream and cuBLAS
// handle on GPU 0, as on N GPUs); tests/data_parallel.rs runs them on the CPU.
crate::common::suite!("data_parallel":
    workers a_ppo_step_is_the_same_on_one_worker_and_on_two,
    workers an_sft_step_is_the_same_on_one_worker_and_on_two_or_three,
);
