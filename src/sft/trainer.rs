//! `detox sft`'s loop: epochs of `sft_step` over seeded batches, a JSON Lines log of every step and
//! every evaluation, a progress bar, and after each epoch the held-out loss and ROUGE with the model
//! saved in Hugging Face layout. Stops early, evaluating and saving, at `max_steps`, at the time
//! limit, or on Ctrl-C. Data-parallel workers each take their share of every batch.

use super::data::{Pairs, SftBatch};
use super::export::save_model;
use super::settings::{Method, SftSettings};
use super::step::{Hyper, SftOptimizer, eval_loss, sft_step};
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
    pub loss: f64,
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
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    pub eval_rows: usize,
    pub time_eval_s: f64,
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
    loss_scale: f32,
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
            Method::Full => SftOptimizer::full(be, &model, &Checkpoint::open_dir(&s.model.path)?)?,
            Method::Lora => {
                model.attach_lora(be, s.lora_settings(), s.lora.init_seed)?;
                SftOptimizer::lora(be, &model)?
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
        let gpu = be.ordinal().and_then(GpuStats::open);
        Ok(Self { be, group, settings, model, opt, prompter, train, eval, step: 0, loss_scale, gpu })
    }

    fn batches_per_epoch(&self) -> usize {
        self.train.pairs.len().div_ceil(self.settings.optim.batch_size)
    }

    /// The run's length in steps, which the learning-rate schedule spans.
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
        let lr = o.lr_at(self.step + 1, self.total_steps());
        let h = Hyper {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            max_grad_norm: o.max_grad_norm,
            label_smoothing: o.label_smoothing,
            loss_scale: self.loss_scale,
            dropout_seed: crate::seeds::sft_dropout(self.settings.run.seed, self.step),
        };
        let total: usize = rows.iter().map(|&i| self.train.pairs[i].target.len()).sum();
        let mine = &rows[shard(rows.len(), self.group.rank(), self.group.world())];
        let batch = self.batch(mine, &self.train);
        let r = sft_step(self.be, &mut self.model, &mut self.opt, &batch, total, self.group, &h)?;
        if !r.loss.is_finite() {
            bail!("the loss is {} at step {}", r.loss, self.step + 1);
        }
        let used_scale = self.loss_scale;
        if r.skipped {
            // Dynamic loss scaling: the gradients overflowed half precision, so this step made
            // no update; a smaller scale retries on the next batch.
            self.loss_scale = (self.loss_scale / 2.0).max(1.0);
            if used_scale == 1.0 {
                bail!("non-finite gradients at step {} with no loss scaling left to reduce", self.step + 1);
            }
        }
        self.step += 1;
        let secs = started.elapsed().as_secs_f64();
        let (gpu_memory_bytes, gpu_utilization_percent) = self.gpu.as_ref().map(GpuStats::read).unwrap_or((None, None));
        Ok(StepLog {
            kind: "step",
            step: self.step,
            epoch,
            loss: r.loss,
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
        let (mut sum, mut tokens) = (0.0, 0);
        for rows in order.chunks(es.batch_size) {
            let (s, t) =
                eval_loss(be, &self.model, &self.batch(rows, &self.eval), self.settings.optim.label_smoothing)?;
            sum += s;
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
            rouge1,
            rouge2,
            rouge_l,
            eval_rows: pairs.len(),
            time_eval_s: started.elapsed().as_secs_f64(),
        })
    }

    fn save(&mut self) -> Result<PathBuf> {
        let s = &self.settings;
        let dest = s.run.out.join("model");
        let tok = tokenizer_path(&s.model.path, s.model.tokenizer.as_deref());
        save_model(self.be, &mut self.model, &self.opt, &s.model.path, &tok, &dest)?;
        Ok(dest)
    }

    /// The whole run; returns the saved model's directory and the last evaluation. Worker 0 logs,
    /// evaluates and saves; every worker steps, and they stop together.
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
        let mut pb = if root { Progress::stderr(total, "fine-tuning") } else { Progress::hidden() };
        let mut last = None;
        'epochs: for epoch in 0.. {
            let batches = self.train.epoch(epoch, self.settings.optim.batch_size, self.settings.run.seed);
            for rows in &batches {
                let entry = self.iteration(rows, epoch)?;
                write(serde_json::to_string(&entry)?)?;
                pb.step(format!("epoch {} loss {:.4} lr {:.2e}", epoch + 1, entry.loss, entry.lr), entry.time_step_s);
                if crate::fsutil::test_point("DETOX_TEST_INTERRUPT_AT", &format!("sft-step-{}", self.step)) {
                    stop.store(true, Ordering::SeqCst);
                }
                // Any worker's time limit or Ctrl-C stops them all at the same step.
                let timed_out = limit > 0.0 && started.elapsed().as_secs_f64() >= limit;
                let flags = [timed_out as u8 as f32, stop.load(Ordering::SeqCst) as u8 as f32];
                let flags = sum_host(self.group, self.be, &flags)?;
                if self.step >= total || flags.iter().any(|&f| f > 0.0) {
                    if flags[0] > 0.0 {
                        pb.println(format!("time limit of {limit} s reached after step {}", self.step));
                    }
                    if root {
                        let e = self.evaluate(epoch)?;
                        pb.println(eval_line(&e));
                        write(serde_json::to_string(&e)?)?;
                        last = Some(e);
                    }
                    break 'epochs;
                }
            }
            if root {
                let e = self.evaluate(epoch)?;
                pb.println(eval_line(&e));
                write(serde_json::to_string(&e)?)?;
                self.save()?;
                last = Some(e);
            }
        }
        pb.stop();
        let dir = out.join("model");
        match last {
            Some(e) => {
                self.save()?;
                Ok((dir, e))
            }
            None => Ok((dir, EvalLog::none(self.step))),
        }
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
            rouge1: f64::NAN,
            rouge2: f64::NAN,
            rouge_l: f64::NAN,
            eval_rows: 0,
            time_eval_s: 0.0,
        }
    }
}

fn eval_line(e: &EvalLog) -> String {
    format!(
        "step {} (epoch {}): eval loss {:.4}, ROUGE-1/2/L {:.4} / {:.4} / {:.4} on {} held-out rows",
        e.step,
        e.epoch + 1,
        e.eval_loss,
        e.rouge1,
        e.rouge2,
        e.rouge_l,
        e.eval_rows
    )
}
