//! `detox train`: PPO on dialogue summaries with a toxicity classifier as the reward.

use crate::backend::Backend;
use crate::parallel::Collective;
use crate::parallel::launch::{ParallelJob, launch};
use crate::ppo::checkpoint;
use crate::ppo::settings::TrainSettings;
use crate::ppo::trainer::Trainer;
use crate::t5::GenConfig;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML file of settings (every section and field optional; the defaults are the seed's
    /// setting: see examples/seed.toml). Without it, the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from a checkpoint directory, or from a run directory's latest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start afresh in a `[run] out` that already holds a run, removing its log and checkpoints
    /// (without this, or --resume, such a directory is refused).
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Where to compute: auto, cpu, cuda or cuda:N (overrides `[run] device`).
    #[arg(long)]
    pub device: Option<String>,
    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub workers: super::Workers,
}

pub fn run(a: Args) -> Result<()> {
    let mut settings = match &a.config {
        Some(p) => TrainSettings::load(p)?,
        None => {
            let s = TrainSettings::default();
            s.validate()?;
            s
        }
    };
    if let Some(d) = &a.device {
        settings.run.device = d.clone();
    }
    if a.print_config {
        print!("{}", settings.to_toml()?);
        return Ok(());
    }
    let device = settings.device()?;
    generation(&settings).validate().context("[generation]")?;
    let out = settings.run.out.clone();
    let config = a.config.as_ref().map(|p| format!(" --config {}", p.display())).unwrap_or_default();
    super::claim_run_dir(
        &out,
        a.resume.is_some(),
        a.overwrite_output_dir,
        &format!("resume it with `detox train{config} --resume {}`", out.display()),
    )?;
    let stop = super::interrupt_flag("writing a checkpoint")?;
    let total = settings.run.steps;
    let job = Train { settings, resume: a.resume, stop: stop.clone() };
    let Some(dir) = launch(device, &a.workers.topology(), &job)? else { return Ok(()) };
    let step = checkpoint::read_state(&dir).map(|s| s.step).unwrap_or(0);
    if stop.load(Ordering::SeqCst) && step < total {
        return Err(super::Interrupted(format!(
            "interrupted after step {step} of {total}; checkpoint: {}; continue with `detox train{config} --resume {}`",
            dir.display(),
            out.display()
        ))
        .into());
    }
    eprintln!("finished {step} steps; checkpoint: {}", dir.display());
    Ok(())
}

/// The rollouts' sampling settings, checked before any work.
fn generation(s: &TrainSettings) -> GenConfig {
    let g = &s.generation;
    GenConfig {
        max_new_tokens: g.max_new_tokens,
        min_new_tokens: g.min_new_tokens,
        sample: true,
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        seed: 0,
        ..GenConfig::default()
    }
}

struct Train {
    settings: TrainSettings,
    resume: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl ParallelJob for Train {
    type Output = PathBuf;

    fn run<B: Backend>(&self, be: &B, group: &dyn Collective<B>) -> Result<PathBuf> {
        let mut trainer = Trainer::new(be, self.settings.clone(), self.resume.as_deref(), group)?;
        trainer.run(&self.stop)
    }
}
