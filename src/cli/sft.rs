//! `detox sft`: supervised fine-tuning of a T5 summarizer on dialogue–summary pairs.

use crate::backend::Backend;
use crate::parallel::Collective;
use crate::parallel::launch::{ParallelJob, launch};
use crate::sft::SftSettings;
use crate::sft::trainer::SftTrainer;
use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML file of settings (every section and field optional: see examples/sft.toml). Without
    /// it, the defaults: full fine-tuning of models/flan-t5-small on SAMSum's train split for one
    /// epoch, evaluated on its validation split, saved to runs/sft/model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub workers: super::Workers,
}

pub fn run(a: Args) -> Result<()> {
    let settings = match &a.config {
        Some(p) => SftSettings::load(p)?,
        None => {
            let s = SftSettings::default();
            s.validate()?;
            s
        }
    };
    if a.print_config {
        print!("{}", settings.to_toml()?);
        return Ok(());
    }
    let stop = super::interrupt_flag("evaluating and saving")?;
    let device = settings.device()?;
    if let Some(dir) = launch(device, &a.workers.topology(), &Sft { settings, stop })? {
        eprintln!("model: {}", dir.display());
    }
    Ok(())
}

struct Sft {
    settings: SftSettings,
    stop: Arc<AtomicBool>,
}

impl ParallelJob for Sft {
    type Output = PathBuf;

    fn run<B: Backend>(&self, be: &B, group: &dyn Collective<B>) -> Result<PathBuf> {
        let mut trainer = SftTrainer::new(be, self.settings.clone(), group)?;
        if group.rank() == 0 {
            eprintln!(
                "{}: {} steps on {} worker(s), worker 0 on {}",
                trainer.settings.data.train.display(),
                trainer.total_steps(),
                group.world(),
                be.name()
            );
        }
        Ok(trainer.run(&self.stop)?.0)
    }
}
