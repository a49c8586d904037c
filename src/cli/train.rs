//! `detox train`: PPO on dialogue summaries with a toxicity classifier as the reward.

use crate::backend::Backend;
use crate::parallel::Collective;
use crate::parallel::launch::{ParallelJob, launch};
use crate::ppo::settings::TrainSettings;
use crate::ppo::trainer::Trainer;
use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML file of settings (every section and field optional; the defaults are the seed's
    /// setting: see examples/seed.toml). Without it, the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from a checkpoint directory, or from a run directory's latest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub workers: super::Workers,
}

pub fn run(a: Args) -> Result<()> {
    let settings = match &a.config {
        Some(p) => TrainSettings::load(p)?,
        None => {
            let s = TrainSettings::default();
            s.validate()?;
            s
        }
    };
    if a.print_config {
        print!("{}", settings.to_toml()?);
        return Ok(());
    }
    let stop = super::interrupt_flag("writing a checkpoint")?;
    let device = settings.device()?;
    if let Some(dir) = launch(device, &a.workers.topology(), &Train { settings, resume: a.resume, stop })? {
        eprintln!("checkpoint: {}", dir.display());
    }
    Ok(())
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
