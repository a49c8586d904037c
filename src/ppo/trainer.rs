//! `detox train`: the PPO loop. One iteration reads top-down as DESIGN.md lists it — batch, rollout,
//! reward, then advantages and optimisation (`ppo_step`) — and the loop around it logs every step as
//! JSON Lines, shows progress, checkpoints, and stops cleanly on Ctrl-C or a non-finite loss.
//! Data-parallel workers each sample, score and backpropagate their share of the batch; worker 0
//! logs and checkpoints.

use super::checkpoint::{self, TrainerState};
use super::data::Dialogues;
use super::phases::{self, RewardModel};
use super::policy::Policy;
use super::settings::{RewardKind, TrainSettings};
use super::step::{Learner, Optimizer, Rollout, StepEnv, StepOptions, ppo_step};
use super::{KlController, StepStats};
use crate::backend::Backend;
use crate::classifier::Classifier;
use crate::device::GpuStats;
use crate::parallel::{Collective, sum_host};
use crate::progress::Progress;
use crate::t5::{T5, ValueHead};
use crate::text::{Prompter, tokenizer_path};
use anyhow::{Context, Result, ensure};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// One line of the training log.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub reward_mean: f32,
    /// The classifier's probability of the reward label (toxicity), averaged over the batch.
    pub toxicity_mean: f32,
    pub kl: f32,
    pub kl_coef: f64,
    pub entropy: Option<f32>,
    pub policy_loss: f32,
    pub value_loss: f32,
    pub clipfrac: f32,
    pub val_clipfrac: f32,
    pub approxkl: f32,
    pub response_length_mean: f32,
    pub grad_norm_mean: f64,
    pub time_rollout_s: f64,
    pub time_reward_s: f64,
    pub time_optimise_s: f64,
    pub time_step_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_percent: Option<u32>,
    /// Every statistic TRL 0.4.7 logs, under its key.
    pub trl: StepStats,
}

pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    /// This worker's data-parallel group (`Solo` alone).
    group: &'a dyn Collective<B>,
    pub settings: TrainSettings,
    pub policy: Policy<B>,
    optimizer: Optimizer<B>,
    kl: KlController,
    /// The reward model and the index of its reward label (None for the toy reward).
    classifier: Option<(Classifier<B>, usize)>,
    prompter: Prompter,
    data: Dialogues,
    /// PPO steps completed.
    pub step: usize,
    gpu: Option<GpuStats>,
    /// Phase ticks within a step (hidden but on worker 0 during `run`).
    progress: Progress,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Loads the model, the adapter (fresh, from `[model] adapter`, or from a checkpoint when
    /// resuming), the classifier and the data.
    pub fn new(
        be: &'a B,
        settings: TrainSettings,
        resume: Option<&Path>,
        group: &'a dyn Collective<B>,
    ) -> Result<Self> {
        let s = &settings;
        ensure!(
            s.ppo.mini_batch_size >= group.world(),
            "[ppo] mini_batch_size {} is smaller than the {} workers",
            s.ppo.mini_batch_size,
            group.world()
        );
        let mut model = T5::load(be, &s.model.path)?;
        match &s.model.adapter {
            Some(dir) => model.load_adapter(be, dir)?,
            None => {
                model.attach_lora(be, s.lora_settings(), s.lora.init_seed)?;
            }
        }
        let value_head = ValueHead::init(be, model.config.d_model, crate::seeds::value_head_init(s.lora.init_seed))?;
        let c = model.config.clone();
        let mut policy = Policy { model, value_head, value_dropout: s.lora.value_dropout };
        let mut optimizer = Optimizer::new(be, &policy, s.ppo.learning_rate)?;
        let mut kl = KlController::from_config(&s.ppo);
        let mut step = 0;
        if let Some(dir) = resume {
            let dir = checkpoint::resolve(dir)?;
            let state = checkpoint::load(be, &dir, &mut policy, &mut optimizer)?;
            if state.settings != settings && group.rank() == 0 {
                eprintln!("warning: the settings differ from those {} was trained with", dir.display());
            }
            kl = state.kl;
            step = state.step;
            if group.rank() == 0 {
                eprintln!("resuming from {} (step {step})", dir.display());
            }
        }
        let classifier = match s.reward.kind {
            RewardKind::Classifier => {
                let c = Classifier::load(be, &s.reward.classifier, None)?;
                let label = c.label_index(&s.reward.label)?;
                Some((c, label))
            }
            RewardKind::TokenShare => None,
        };
        let prompter = Prompter::new(
            &tokenizer_path(&s.model.path, s.model.tokenizer.as_deref()),
            &s.data.prompt,
            s.data.max_source_len,
            c.eos_token_id,
            c.vocab_size,
        )?;
        let data = Dialogues::load(&s.data)?;
        let gpu = be.ordinal().and_then(GpuStats::open);
        let progress = Progress::hidden();
        Ok(Self { be, group, settings, policy, optimizer, kl, classifier, prompter, data, step, gpu, progress })
    }

    /// One PPO iteration.
    pub fn iteration(&mut self) -> Result<StepLog> {
        let be = self.be;
        let s = self.settings.clone();
        let started = Instant::now();

        // 1. Batch: dialogues → prompts → token ids.
        let rows = self.data.batch(self.step, s.ppo.batch_size, s.run.seed);
        let prompts: Vec<Vec<u32>> =
            rows.iter().map(|&i| self.prompter.encode(&self.data.texts[i])).collect::<Result<_>>()?;
        let streams: Vec<u32> = rows.iter().map(|&i| i as u32).collect();

        // 2. Rollout: the current policy samples a summary of each; its adapters stay fixed for it.
        self.progress.phase("rollout", 0, s.generation.max_new_tokens, "tokens");
        let responses = self.rollout(&prompts, &streams)?;
        let rolled = Instant::now();
        let tokens: usize = responses.iter().map(Vec::len).sum();
        self.progress.phase("reward", 0, responses.len(), &format!("summaries ({tokens} tokens sampled)"));

        // 3. Reward: the classifier's verdict on each decoded summary.
        let (scores, toxicity) = self.reward(&responses)?;
        let rewarded = Instant::now();
        let per_epoch = s.ppo.batch_size.div_ceil(s.ppo.mini_batch_size);
        let minibatches = s.ppo.ppo_epochs * per_epoch;
        self.progress.phase("optimise", 0, minibatches, "minibatches");
        let progress = &self.progress;

        // 4–5. Advantages and optimisation: the reference and rollout passes, KL-shaped rewards,
        // minibatch epochs of the clipped losses with the backward and Adam, the KL controller.
        let rollout = Rollout { prompts, responses, scores, streams };
        let loss_scale = match s.run.loss_scale {
            x if x > 0.0 => x,
            _ => be.default_loss_scale(),
        };
        let opts = StepOptions { shuffle: true, seed: crate::seeds::ppo_step(s.run.seed, self.step), loss_scale };
        let env = StepEnv { be, group: self.group, cfg: &s.ppo, opts };
        let learner = Learner { policy: &mut self.policy, opt: &mut self.optimizer, kl: &mut self.kl };
        let report = ppo_step(&env, learner, &rollout, &mut |epoch, m, _| {
            progress.phase("optimise", epoch * per_epoch + m + 1, minibatches, "minibatches");
            Ok(())
        })?;
        self.step += 1;
        let done = Instant::now();

        let (gpu_memory_bytes, gpu_utilization_percent) = self.gpu.as_ref().map(GpuStats::read).unwrap_or((None, None));
        let st = report.stats;
        let n = rollout.scores.len() as f32;
        Ok(StepLog {
            step: self.step,
            reward_mean: rollout.scores.iter().sum::<f32>() / n,
            toxicity_mean: toxicity.iter().sum::<f32>() / n,
            kl: st.kl,
            kl_coef: st.kl_coef,
            entropy: st.train.entropy,
            policy_loss: st.train.policy_loss,
            value_loss: st.train.value_loss,
            clipfrac: st.train.clipfrac,
            val_clipfrac: st.train.val_clipfrac,
            approxkl: st.train.approxkl,
            response_length_mean: rollout.responses.iter().map(|r| r.len() as f32).sum::<f32>() / n,
            grad_norm_mean: report.minibatches.iter().map(|m| m.grad_norm).sum::<f64>()
                / report.minibatches.len() as f64,
            time_rollout_s: (rolled - started).as_secs_f64(),
            time_reward_s: (rewarded - rolled).as_secs_f64(),
            time_optimise_s: (done - rewarded).as_secs_f64(),
            time_step_s: (done - started).as_secs_f64(),
            gpu_memory_bytes,
            gpu_utilization_percent,
            trl: st,
        })
    }

    /// Each response's reward, and the classifier's probability of the reward label (0 for the toy
    /// reward): each worker scores its share, gathered back in order.
    fn reward(&self, responses: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<f32>)> {
        let decode = |t: &[u32]| self.prompter.decode(t);
        let classifier = self.classifier.as_ref().map(|(c, label)| (c, *label));
        let rm = RewardModel { settings: &self.settings.reward, classifier, decode: &decode };
        phases::reward(self.be, self.group, &rm, responses, &mut |scored, total| {
            self.progress.phase("reward", scored, total, "summaries")
        })
    }

    /// Samples one response per prompt with the policy's adapters merged (they are fixed until the
    /// optimisation), seeded by (run seed, step) and each prompt's data-set index, so that a
    /// prompt's sample does not depend on which worker draws it. Each worker samples its share.
    fn rollout(&mut self, prompts: &[Vec<u32>], streams: &[u32]) -> Result<Vec<Vec<u32>>> {
        let cfg = self.settings.generation.sampling(crate::seeds::rollout(self.settings.run.seed, self.step));
        let most = cfg.max_new_tokens;
        let progress = &self.progress;
        phases::rollout(self.be, self.group, &mut self.policy.model, (prompts, streams), &cfg, &mut |n| {
            progress.phase("rollout", n, most, "tokens")
        })
    }

    /// Runs the remaining steps: a JSON Lines log in `run.out` (cut back to the resumed step, so a
    /// resumed run logs each step once), progress on stderr, checkpoints every `checkpoint_every`
    /// steps and at the end. When `stop` turns true (Ctrl-C) the current step finishes, a
    /// checkpoint is written and the loop returns.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<PathBuf> {
        let root = self.group.rank() == 0;
        let out = self.settings.run.out.clone();
        let log_path = out.join("log.jsonl");
        let mut log = if root {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            crate::fsutil::remove_debris(&out)?;
            crate::fsutil::truncate_log(&log_path, self.step)?;
            let gone = checkpoint::discard_after(&out, self.step)?;
            if !gone.is_empty() {
                eprintln!("resuming at step {}: removed the later {}", self.step, gone.join(", "));
            }
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&log_path);
            Some(f.with_context(|| format!("opening {}", log_path.display()))?)
        } else {
            None
        };
        let total = self.settings.run.steps;
        self.progress = if root { Progress::stderr(total, "training") } else { Progress::hidden() };
        self.progress.set_position(self.step);
        let mut last = None;
        while self.step < total {
            let entry = match self.iteration() {
                Ok(e) => e,
                Err(e) => {
                    self.progress.stop();
                    let kept = checkpoint::resolve(&out).map(|d| d.display().to_string());
                    return Err(e.context(format!(
                        "training stopped at step {}; the last good checkpoint is {}",
                        self.step + 1,
                        kept.unwrap_or_else(|_| "none (no checkpoint was written yet)".into())
                    )));
                }
            };
            if let Some(f) = log.as_mut() {
                writeln!(f, "{}", serde_json::to_string(&entry)?)
                    .with_context(|| format!("writing {}", log_path.display()))?;
            }
            self.progress.step(
                format!("reward {:.3} toxicity {:.4} kl {:.3}", entry.reward_mean, entry.toxicity_mean, entry.kl),
                entry.time_step_s,
            );
            // A Ctrl-C on any machine stops every worker after the same step.
            let stopping = sum_host(self.group, self.be, &[stop.load(Ordering::SeqCst) as u8 as f32])?[0] > 0.0;
            let due = self.step.is_multiple_of(self.settings.run.checkpoint_every) || self.step == total;
            if root && (due || stopping) {
                last = Some(self.checkpoint()?);
            }
            if stopping {
                break;
            }
        }
        self.progress.stop();
        self.progress = Progress::hidden();
        match last {
            Some(dir) => Ok(dir),
            None if root => self.checkpoint(),
            None => Ok(out),
        }
    }

    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let state = TrainerState {
            step: self.step,
            kl: self.kl.clone(),
            optimizer_steps: self.optimizer.steps,
            settings: self.settings.clone(),
        };
        checkpoint::save(self.be, &self.settings.run.out.clone(), &self.policy, &self.optimizer, &state)
    }
}
