//! `detox bench ppo`: whole PPO iterations on random weights, timed phase by phase. Every phase is
//! the trainer's own function — `phases::rollout`, `phases::reward`, `ppo_step` — so what is timed is
//! what `detox train` runs.

use super::{PEAK_FLOPS, Phase, PpoArgs, Report, gib, median, random_model_dir, random_prompts};
use crate::backend::Backend;
use crate::classifier::Classifier;
use crate::parallel::Collective;
use crate::parallel::launch::ParallelJob;
use crate::ppo::phases::{self, RewardModel};
use crate::ppo::policy::Policy;
use crate::ppo::settings::{RewardKind, RewardSettings, RewardTransform};
use crate::ppo::step::{Learner, Optimizer, Rollout, StepEnv, StepOptions, ppo_step};
use crate::ppo::{KlController, PpoConfig};
use crate::t5::config::T5Config;
use crate::t5::{GenConfig, LoraSettings, T5, ValueHead};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

pub(super) struct BenchPpo(pub PpoArgs);

/// What an iteration needs: the policy and its optimiser, the reward model, the prompts.
struct Bench<B: Backend> {
    policy: Policy<B>,
    opt: Optimizer<B>,
    kl: KlController,
    cfg: PpoConfig,
    reward: RewardSettings,
    classifier: Option<(Classifier<B>, usize, tokenizers::Tokenizer)>,
    prompts: Vec<Vec<u32>>,
    streams: Vec<u32>,
    sampling: GenConfig,
}

impl ParallelJob for BenchPpo {
    type Output = Report;

    /// Each worker generates and scores its share of the prompts; the PPO step shards the rest.
    fn run<B: Backend>(&self, be: &B, group: &dyn Collective<B>) -> Result<Report> {
        let a = &self.0;
        let tmp = random_model_dir(&a.size)?;
        let mut bench = Bench::new(be, a, T5::load(be, tmp.path())?)?;
        let mut phases: Vec<[f64; 5]> = Vec::new();
        be.reset_peak_memory();
        for it in 0..=a.iters {
            let profile = Some(a.profile).filter(|_| it == a.iters).flatten();
            let times = bench.iteration(be, group, it, profile)?;
            if it > 0 {
                phases.push(times);
            }
        }
        let config = bench.policy.model.config.clone();
        Ok(report(be, group, a, &config, bench.classifier.is_some(), &phases))
    }
}

impl<B: Backend> Bench<B> {
    fn new(be: &B, a: &PpoArgs, mut model: T5<B>) -> Result<Self> {
        model.attach_lora(be, LoraSettings::seed_default(), 0)?;
        let c = model.config.clone();
        let value_head = ValueHead::init(be, c.d_model, 0)?;
        let policy = Policy { model, value_head, value_dropout: 0.1 };
        let cfg =
            PpoConfig { batch_size: a.batch, mini_batch_size: a.mini, ppo_epochs: a.epochs, ..PpoConfig::default() };
        let classifier = match (&a.classifier, &a.tokenizer) {
            (Some(dir), Some(tok)) => {
                let clf = Classifier::load(be, dir, None)?;
                let label = clf.label_index("toxicity")?;
                Some((clf, label, crate::text::load_tokenizer(tok)?))
            }
            _ => None,
        };
        let reward = RewardSettings {
            kind: if classifier.is_some() { RewardKind::Classifier } else { RewardKind::TokenShare },
            token_below: 16064,
            transform: RewardTransform::NegLogit,
            batch_size: 64,
            ..RewardSettings::default()
        };
        let g = a.gen_tokens;
        Ok(Self {
            opt: Optimizer::new(be, &policy, cfg.learning_rate)?,
            kl: KlController::from_config(&cfg),
            policy,
            cfg,
            reward,
            classifier,
            prompts: random_prompts(a.batch, a.src, c.eos_token_id),
            streams: (0..a.batch as u32).collect(),
            sampling: GenConfig { max_new_tokens: g, min_new_tokens: g, sample: true, ..GenConfig::default() },
        })
    }

    /// One iteration, `profile`'s phase inside the profiler's range: the seconds of generation,
    /// reward, the reference and rollout passes, the PPO epochs, and the whole iteration.
    fn iteration(&mut self, be: &B, group: &dyn Collective<B>, it: usize, profile: Option<Phase>) -> Result<[f64; 5]> {
        let range = |phase: Phase, on: bool| if profile == Some(phase) { be.profiler_range(on) } else { Ok(()) };
        be.sync()?;
        let t0 = Instant::now();
        range(Phase::Iteration, true)?;
        range(Phase::Generate, true)?;
        let batch = (self.prompts.as_slice(), self.streams.as_slice());
        let responses = phases::rollout(be, group, &mut self.policy.model, batch, &self.sampling, &mut |_| {})?;
        range(Phase::Generate, false)?;
        range(Phase::Reward, true)?;
        let t1 = Instant::now();
        let decode = |r: &[u32]| -> Result<String> {
            let (_, _, tok) = self.classifier.as_ref().expect("decoding needs the classifier's tokenizer");
            tok.decode(r, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
        };
        let classifier = self.classifier.as_ref().map(|(clf, label, _)| (clf, *label));
        let rm = RewardModel { settings: &self.reward, classifier, decode: &decode };
        let (scores, _) = phases::reward(be, group, &rm, &responses, &mut |_, _| {})?;
        range(Phase::Reward, false)?;
        range(Phase::Step, true)?;
        be.sync()?;
        let t2 = Instant::now();
        let rollout = Rollout { prompts: self.prompts.clone(), responses, scores, streams: self.streams.clone() };
        let opts = StepOptions { shuffle: true, seed: it as u64, loss_scale: be.default_loss_scale() };
        let env = StepEnv { be, group, cfg: &self.cfg, opts };
        let learner = Learner { policy: &mut self.policy, opt: &mut self.opt, kl: &mut self.kl };
        let report = ppo_step(&env, learner, &rollout, &mut |_, _, _| Ok(()))?;
        let t3 = Instant::now();
        range(Phase::Step, false)?;
        range(Phase::Iteration, false)?;
        let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
        Ok([s(t0, t1), s(t1, t2), report.time_passes_s, report.time_epochs_s, s(t0, t3)])
    }
}

/// The medians of every phase beside the epochs' FLOP floor, as text and JSON.
fn report<B: Backend>(
    be: &B,
    group: &dyn Collective<B>,
    a: &PpoArgs,
    c: &T5Config,
    classifier: bool,
    phases: &[[f64; 5]],
) -> Report {
    let peak = be.peak_memory();
    let med = |k: usize| median(phases.iter().map(|p| p[k]).collect());
    let (gen_s, reward_s, passes_s, epochs_s, total_s) = (med(0), med(1), med(2), med(3), med(4));
    let (b, l, g) = (a.batch, a.src, a.gen_tokens);
    let epochs_flops = epochs_flops(c, b, l, g) * a.epochs as f64;
    let text = format!(
        "ppo iteration: batch {b}, minibatch {}, {} epochs, src {l}, gen {g}, random flan-t5-{}, LoRA r 32 on q,v, {} × {}\n\
         generate        {:8.3} s\n\
         reward          {:8.3} s  ({})\n\
         ref + old       {:8.3} s\n\
         ppo epochs      {:8.3} s  ({:.1} TFLOP of products ≈ {:.0} TFLOP/s; floor {:.3} s at 790 TFLOP/s)\n\
         iteration       {:8.3} s  →  {:.1} samples/s\n\
         peak memory     {} (worker 0)",
        a.mini,
        a.epochs,
        a.size,
        group.world(),
        be.name(),
        gen_s,
        reward_s,
        if classifier { "classifier" } else { "toy reward" },
        passes_s,
        epochs_s,
        epochs_flops / 1e12,
        epochs_flops / epochs_s / 1e12,
        epochs_flops / PEAK_FLOPS,
        total_s,
        b as f64 / total_s,
        gib(peak),
    );
    let json = json!({
        "phase": "ppo", "device": be.name(), "workers": group.world(), "size": a.size, "batch": b, "mini": a.mini, "epochs": a.epochs, "src": l, "gen": g,
        "seconds": { "generate": gen_s, "reward": reward_s, "ref_and_old": passes_s, "ppo_epochs": epochs_s, "total": total_s },
        "samples_per_s": b as f64 / total_s, "epochs_tflop": epochs_flops / 1e12, "peak_bytes": peak,
    });
    Report { text, json }
}

/// One epoch's products: every row runs one forward and one backward. The weights are frozen, so
/// the backward's products are the input gradients, as many FLOPs as the forward's (the adapters'
/// own gradients are thin); attention counted as 4·Lq·Lk·inner.
fn epochs_flops(c: &T5Config, b: usize, l: usize, g: usize) -> f64 {
    let (d, inner, ff, v) = (c.d_model as f64, c.inner_dim() as f64, c.d_ff as f64, c.vocab_size as f64);
    let (le, ld) = (c.num_layers as f64, c.num_decoder_layers as f64);
    let (bf, lf, gf) = (b as f64, l as f64, g as f64);
    let linear = 2.0
        * (bf * lf * (le * (4.0 * d * inner + 3.0 * d * ff) + ld * 2.0 * d * inner)
            + bf * gf * (ld * (6.0 * d * inner + 3.0 * d * ff) + v * d));
    let attention = 4.0 * bf * inner * (le * lf * lf + ld * (gf * gf + gf * lf));
    2.0 * (linear + attention)
}
