//! `detox sft`'s loop: epochs of `sft_step` over seeded batches, a JSON Lines log of every step and
//! every evaluation, a progress bar, and after each epoch the held-out loss and ROUGE, the model
//! saved in Hugging Face layout when its ROUGE-L is the best so far. Stops early, evaluating, at
//! `max_steps`, at the time limit, or on Ctrl-C; with a time limit the learning-rate decay is
//! re-spanned from measured step times to end where the limit will stop the run. Data-parallel
//! workers each take their share of every batch.

use super::data::{Pairs, SftBatch};
use super::export::save_model;
use super::scaler::LossScaler;
use super::settings::{Method, SftSettings};
use super::step::{SftOptimizer, eval_loss, sft_step};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::device::GpuStats;
use crate::parallel::{Collective, shard, sum_host};
use crate::progress::Progress;
use crate::t5::T5;
use crate::t5::model::Fwd;
use crate::text::{Prompter, tokenizer_path};
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub kind: &'static str,
    pub step: usize,
    pub epoch: usize,
    /// The objective (label-smoothed when `label_smoothing` > 0).
    pub loss: f64,
    /// Plain cross-entropy of the targets, no smoothing.
    pub ce: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub skipped: bool,
    pub loss_scale: f32,
    pub time_step_s: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_percent: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalLog {
    pub kind: &'static str,
    pub step: usize,
    pub epoch: usize,
    pub eval_loss: f64,
    /// Plain held-out cross-entropy, no smoothing.
    pub eval_ce: f64,
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    pub eval_rows: usize,
    pub time_eval_s: f64,
    /// This evaluation's ROUGE-L is the run's best so far, and its model was saved.
    pub best: bool,
}

pub struct SftTrainer<'a, B: Backend> {
    be: &'a B,
    /// This worker's data-parallel group (`Solo` alone).
    group: &'a dyn Collective<B>,
    pub settings: SftSettings,
    pub model: T5<B>,
    opt: SftOptimizer<B>,
    prompter: Prompter,
    train: Pairs,
    eval: Pairs,
    /// Steps taken.
    pub step: usize,
    scaler: LossScaler,
    /// The steps the learning-rate schedule spans: the run's planned length, or with a time limit
    /// the step it is expected to stop at (`fit_schedule`).
    schedule_span: usize,
    gpu: Option<GpuStats>,
}

impl<'a, B: Backend> SftTrainer<'a, B> {
    pub fn new(be: &'a B, settings: SftSettings, group: &'a dyn Collective<B>) -> Result<Self> {
        let s = &settings;
        ensure!(
            s.optim.batch_size >= group.world(),
            "[optim] batch_size {} is smaller than the {} workers",
            s.optim.batch_size,
            group.world()
        );
        let mut model = T5::load(be, &s.model.path)?;
        let opt = match s.optim.method {
            Method::Full => SftOptimizer::full(be, &model, &Checkpoint::open_dir(&s.model.path)?, s.optim.kind())?,
            Method::Lora => {
                model.attach_lora(be, s.lora_settings(), s.lora.init_seed)?;
                SftOptimizer::lora(be, &model, s.optim.kind())?
            }
        };
        let c = &model.config;
        let prompter = Prompter::new(
            &tokenizer_path(&s.model.path, s.model.tokenizer.as_deref()),
            &s.data.prompt,
            s.data.max_source_len,
            c.eos_token_id,
            c.vocab_size,
        )?;
        let fields = (s.data.dialogue_field.as_str(), s.data.summary_field.as_str());
        let train = Pairs::load(&s.data.train, fields, s.data.train_limit, &prompter, s.data.max_target_len)?;
        let eval = Pairs::load(&s.data.eval, fields, s.eval.limit, &prompter, s.data.max_target_len)?;
        let loss_scale = match s.optim.loss_scale {
            x if x > 0.0 => x,
            _ => be.default_loss_scale(),
        };
        let scaler = LossScaler::new(loss_scale, s.optim.loss_scale_growth_interval);
        let gpu = be.ordinal().and_then(GpuStats::open);
        let mut t =
            Self { be, group, settings, model, opt, prompter, train, eval, step: 0, scaler, schedule_span: 0, gpu };
        t.schedule_span = t.total_steps();
        Ok(t)
    }

    fn batches_per_epoch(&self) -> usize {
        self.train.pairs.len().div_ceil(self.settings.optim.batch_size)
    }

    /// The run's planned length in steps, which the learning-rate schedule spans unless a time
    /// limit ends the run sooner.
    pub fn total_steps(&self) -> usize {
        let r = &self.settings.run;
        let by_epochs = r.epochs * self.batches_per_epoch();
        match (r.max_steps, by_epochs) {
            (0, n) => n,
            (m, 0) => m,
            (m, n) => m.min(n),
        }
    }

    fn batch(&self, rows: &[usize], pairs: &Pairs) -> SftBatch {
        let c = &self.model.config;
        let refs: Vec<_> = rows.iter().map(|&i| &pairs.pairs[i]).collect();
        SftBatch::new(&refs, c.decoder_start_token_id, c.pad_token_id)
    }

    /// One step on `rows` of the training pairs, this worker taking its share.
    pub fn iteration(&mut self, rows: &[usize], epoch: usize) -> Result<StepLog> {
        let started = Instant::now();
        let o = &self.settings.optim;
        let adafactor = o.adafactor();
        let lr = match adafactor {
            // Adafactor's own rate (before each weight's scale), for the log.
            Some(a) if a.relative_step => a.step(0.0, self.opt.steps + 1, 1.0).relative_lr(),
            _ => o.lr_at(self.step + 1, self.schedule_span),
        };
        let h = o.hyper(lr, self.scaler.scale(), crate::seeds::sft_dropout(self.settings.run.seed, self.step));
        let total: usize = rows.iter().map(|&i| self.train.pairs[i].target.len()).sum();
        let mine = &rows[shard(rows.len(), self.group.rank(), self.group.world())];
        let batch = self.batch(mine, &self.train);
        let r = sft_step(self.be, &mut self.model, &mut self.opt, &batch, total, self.group, &h)?;
        if !r.loss.is_finite() {
            bail!("the loss is {} at step {}", r.loss, self.step + 1);
        }
        let used_scale = self.scaler.scale();
        // Overflowed gradients made no update; the next batch retries at a smaller scale.
        self.scaler.update(r.skipped, self.step + 1)?;
        self.step += 1;
        let secs = started.elapsed().as_secs_f64();
        let (gpu_memory_bytes, gpu_utilization_percent) = self.gpu.as_ref().map(GpuStats::read).unwrap_or((None, None));
        Ok(StepLog {
            kind: "step",
            step: self.step,
            epoch,
            loss: r.loss,
            ce: r.ce,
            lr,
            grad_norm: r.grad_norm,
            tokens: r.tokens,
            skipped: r.skipped,
            loss_scale: used_scale,
            time_step_s: secs,
            tokens_per_s: r.tokens as f64 / secs,
            gpu_memory_bytes,
            gpu_utilization_percent,
        })
    }

    /// The held-out loss and the ROUGE of summaries (generated as `[eval]` says) against the references.
    pub fn evaluate(&mut self, epoch: usize) -> Result<EvalLog> {
        let started = Instant::now();
        let be = self.be;
        let es = self.settings.eval.clone();
        let mut order: Vec<usize> = (0..self.eval.pairs.len()).collect();
        order.sort_by_key(|&i| self.eval.pairs[i].source.len());
        let (mut sum, mut ce, mut tokens) = (0.0, 0.0, 0);
        for rows in order.chunks(es.batch_size) {
            let (s, c, t) =
                eval_loss(be, &self.model, &self.batch(rows, &self.eval), self.settings.optim.label_smoothing)?;
            sum += s;
            ce += c;
            tokens += t;
        }
        let lora = self.model.lora.is_some();
        if lora {
            self.model.merge_lora(be)?;
        }
        let generation = es.generation();
        let summaries = crate::summaries::summarize(
            be,
            &self.model,
            &self.prompter,
            &self.eval.dialogues,
            &generation,
            es.batch_size,
            Fwd::eval(lora),
            |_| {},
        );
        self.model.unmerge_lora();
        let pairs: Vec<(String, String)> =
            summaries?.into_iter().map(|(s, _)| s).zip(self.eval.summaries.iter().cloned()).collect();
        let (rouge1, rouge2, rouge_l) = crate::rouge::mean_f(&pairs);
        Ok(EvalLog {
            kind: "eval",
            step: self.step,
            epoch,
            eval_loss: sum / tokens.max(1) as f64,
            eval_ce: ce / tokens.max(1) as f64,
            rouge1,
            rouge2,
            rouge_l,
            eval_rows: pairs.len(),
            time_eval_s: started.elapsed().as_secs_f64(),
            best: false,
        })
    }

    fn save(&mut self) -> Result<PathBuf> {
        let s = &self.settings;
        let dest = s.run.out.join("model");
        let tok = tokenizer_path(&s.model.path, s.model.tokenizer.as_deref());
        save_model(self.be, &mut self.model, &self.opt, &s.model.path, &tok, &dest)?;
        Ok(dest)
    }

    /// Evaluates, and saves the model to `out/model` when its ROUGE-L beats `best`'s (or there is
    /// none yet), marking the evaluation `best`.
    fn evaluate_and_keep(&mut self, epoch: usize, best: &mut Option<EvalLog>) -> Result<EvalLog> {
        let mut e = self.evaluate(epoch)?;
        if best.as_ref().is_none_or(|b| e.rouge_l > b.rouge_l) {
            self.save()?;
            e.best = true;
            *best = Some(e.clone());
        }
        Ok(e)
    }

    /// The whole run; returns the saved (best) model's directory and its evaluation, whose `step`
    /// is the best step. Worker 0 logs, evaluates and saves; every worker steps, and they stop
    /// together.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(PathBuf, EvalLog)> {
        let root = self.group.rank() == 0;
        let out = self.settings.run.out.clone();
        let log_path = out.join("log.jsonl");
        let mut log = if root {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            Some(std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?)
        } else {
            None
        };
        let mut write = |line: String| -> Result<()> {
            match log.as_mut() {
                Some(f) => writeln!(f, "{line}").with_context(|| format!("writing {}", log_path.display())),
                None => Ok(()),
            }
        };
        let total = self.total_steps();
        let limit = self.settings.run.time_limit_s;
        let started = Instant::now();
        let mut clock = RunClock::default();
        let mut pb = if root { Progress::stderr(total, "fine-tuning") } else { Progress::hidden() };
        let mut best = None;
        'epochs: for epoch in 0.. {
            let batches = self.train.epoch(epoch, self.settings.optim.batch_size, self.settings.run.seed);
            for (i, rows) in batches.iter().enumerate() {
                let entry = self.iteration(rows, epoch)?;
                write(serde_json::to_string(&entry)?)?;
                pb.step(format!("epoch {} loss {:.4} lr {:.2e}", epoch + 1, entry.loss, entry.lr), entry.time_step_s);
                clock.step(entry.time_step_s);
                let epoch_ends = i + 1 == batches.len();
                if crate::fsutil::test_point("DETOX_TEST_INTERRUPT_AT", &format!("sft-step-{}", self.step)) {
                    stop.store(true, Ordering::SeqCst);
                }
                // Any worker's time limit or Ctrl-C stops them all at the same step.
                let timed_out = limit > 0.0 && started.elapsed().as_secs_f64() >= limit;
                let flags = [timed_out as u8 as f32, stop.load(Ordering::SeqCst) as u8 as f32];
                let flags = sum_host(self.group, self.be, &flags)?;
                let last = self.step >= total || flags.iter().any(|&f| f > 0.0);
                if last && flags[0] > 0.0 {
                    pb.println(format!("time limit of {limit} s reached after step {}", self.step));
                }
                if root && (last || epoch_ends) {
                    let eval_started = Instant::now();
                    let e = self.evaluate_and_keep(epoch, &mut best)?;
                    clock.eval(eval_started.elapsed().as_secs_f64());
                    pb.println(eval_line(&e));
                    write(serde_json::to_string(&e)?)?;
                }
                if last {
                    break 'epochs;
                }
                let fit_due = limit > 0.0 && (clock.fit_due(self.step) || epoch_ends);
                if fit_due && let Some(fit) = self.fit_schedule(&clock, started.elapsed().as_secs_f64())? {
                    pb.println(format!(
                        "schedule: the time limit should stop the run at step {}; the decay now ends there",
                        fit.estimated_total_steps
                    ));
                    write(serde_json::to_string(&fit)?)?;
                }
            }
        }
        pb.stop();
        let dir = out.join("model");
        Ok((dir, best.unwrap_or_else(|| EvalLog::none(self.step))))
    }

    /// Re-spans the learning-rate decay so that it ends where `[run] time_limit_s` will stop the
    /// run, from the measured step and evaluation times (worker 0's, which every worker adopts, so
    /// that all apply the same rate). Returns the log entry when the span moved.
    fn fit_schedule(&mut self, clock: &RunClock, elapsed: f64) -> Result<Option<ScheduleLog>> {
        let root = self.group.rank() == 0;
        let mine = if root {
            let left = self.settings.run.time_limit_s - elapsed;
            clock.steps_within(left, self.step, self.batches_per_epoch()) as f32
        } else {
            0.0
        };
        let more = sum_host(self.group, self.be, &[mine])?[0] as usize;
        // The run ends after the step that passes the limit: one more than fit within it.
        let span = (self.step + more + 1).min(self.total_steps());
        if span == self.schedule_span {
            return Ok(None);
        }
        self.schedule_span = span;
        Ok(Some(ScheduleLog {
            kind: "schedule",
            step: self.step,
            estimated_total_steps: span,
            time_step_s: clock.mean_step_s(),
            time_eval_s: clock.eval_s,
        }))
    }
}

/// A change of the learning-rate schedule's span to fit the time limit.
#[derive(Clone, Debug, Serialize)]
pub struct ScheduleLog {
    pub kind: &'static str,
    /// Steps taken when the estimate was made.
    pub step: usize,
    /// The step at which the run is now expected to stop and the decay to end.
    pub estimated_total_steps: usize,
    /// The mean step time the estimate used.
    pub time_step_s: f64,
    /// The last evaluation's time, charged once for each epoch end still to come.
    pub time_eval_s: f64,
}

/// Step and evaluation times measured so far, for fitting the schedule to the time limit.
#[derive(Clone, Debug, Default)]
struct RunClock {
    /// Steps timed, and their seconds, leaving out the first (kernel loading, allocator warm-up).
    timed: usize,
    secs: f64,
    steps: usize,
    eval_s: f64,
}

impl RunClock {
    /// Steps timed before the first estimate, and between later ones.
    const FIT_EVERY: usize = 50;
    const FIRST_FIT: usize = 10;

    fn step(&mut self, secs: f64) {
        self.steps += 1;
        if self.steps > 1 {
            self.timed += 1;
            self.secs += secs;
        }
    }

    fn eval(&mut self, secs: f64) {
        self.eval_s = secs;
    }

    fn mean_step_s(&self) -> f64 {
        self.secs / self.timed.max(1) as f64
    }

    fn fit_due(&self, step: usize) -> bool {
        step == Self::FIRST_FIT || (step > Self::FIRST_FIT && step.is_multiple_of(Self::FIT_EVERY))
    }

    /// How many more steps fit in `left` seconds after step `step`, each epoch end among them
    /// (every `per_epoch` steps) costing one evaluation.
    fn steps_within(&self, left: f64, step: usize, per_epoch: usize) -> usize {
        let per = self.mean_step_s();
        if left <= 0.0 || per <= 0.0 {
            return 0;
        }
        let mut n = (left / per) as usize;
        // Evaluations shorten the estimate, which can drop an epoch end: a few rounds settle it.
        for _ in 0..4 {
            let ends = (step + n) / per_epoch.max(1) - step / per_epoch.max(1);
            n = ((left - ends as f64 * self.eval_s).max(0.0) / per) as usize;
        }
        n
    }
}

impl EvalLog {
    /// What a worker other than 0, which does not evaluate, reports.
    fn none(step: usize) -> Self {
        Self {
            kind: "eval",
            step,
            epoch: 0,
            eval_loss: f64::NAN,
            eval_ce: f64::NAN,
            rouge1: f64::NAN,
            rouge2: f64::NAN,
            rouge_l: f64::NAN,
            eval_rows: 0,
            time_eval_s: 0.0,
            best: false,
        }
    }
}

fn eval_line(e: &EvalLog) -> String {
    format!(
        "step {} (epoch {}): eval loss {:.4} (plain CE {:.4}), ROUGE-1/2/L {:.4} / {:.4} / {:.4} on {} held-out rows{}",
        e.step,
        e.epoch + 1,
        e.eval_loss,
        e.eval_ce,
        e.rouge1,
        e.rouge2,
        e.rouge_l,
        e.eval_rows,
        if e.best { "; best so far, saved" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::RunClock;

    /// A clock of `steps` timed at `secs` each (the first, untimed, slow) and one evaluation.
    fn clock(steps: usize, secs: f64, eval_s: f64) -> RunClock {
        let mut c = RunClock::default();
        c.step(100.0);
        (1..steps).for_each(|_| c.step(secs));
        c.eval(eval_s);
        c
    }

    #[test]
    fn the_estimate_divides_the_time_left_by_the_step_time_less_evaluations() {
        let c = clock(11, 0.5, 0.0);
        assert_eq!(c.mean_step_s(), 0.5, "the first step is left out");
        assert_eq!(c.steps_within(50.0, 10, 1000), 100);
        // Epochs of 30 steps: 100 steps would cross three epoch ends of 6 s each; 64 steps cross
        // two ends (at 30 and 60 of 10 + 64), so 38 s of stepping remain: 76 steps; they end at
        // 86, again two ends: settled at 76.
        let c = clock(11, 0.5, 6.0);
        assert_eq!(c.steps_within(50.0, 10, 30), 76);
        assert_eq!(c.steps_within(0.0, 10, 30), 0, "no time left");
    }

    #[test]
    fn estimates_come_after_ten_steps_then_every_fifty() {
        let c = RunClock::default();
        let due: Vec<usize> = (1..=160).filter(|&s| c.fit_due(s)).collect();
        assert_eq!(due, [10, 50, 100, 150]);
    }
}
