//! `detox sft`: supervised fine-tuning of a T5 summarizer on dialogue–summary pairs.

use crate::backend::Backend;
use crate::parallel::Collective;
use crate::parallel::launch::{ParallelJob, launch};
use crate::sft::SftSettings;
use crate::sft::trainer::SftTrainer;
use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML file of settings (every section and field optional: see examples/sft.toml). Without
    /// it, the defaults: full fine-tuning of models/flan-t5-small on SAMSum's train split for one
    /// epoch, evaluated on its validation split after each epoch and at the end; runs/sft/model
    /// holds the model of the best held-out ROUGE-L (its log line says `best: true`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start afresh in a `[run] out` that already holds a run, removing its log and model (without
    /// this, such a directory is refused).
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
        Some(p) => SftSettings::load(p)?,
        None => {
            let s = SftSettings::default();
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
    super::claim_run_dir(&settings.run.out, false, a.overwrite_output_dir, "`detox sft` cannot resume")?;
    let stop = super::interrupt_flag("evaluating and saving")?;
    let job = Sft { settings, stop: stop.clone() };
    let Some((dir, step, total, best)) = launch(device, &a.workers.topology(), &job)? else { return Ok(()) };
    if stop.load(Ordering::SeqCst) && step < total {
        return Err(super::Interrupted(format!(
            "interrupted after step {step} of {total}; evaluated; the best model (step {best}): {}",
            dir.display()
        ))
        .into());
    }
    eprintln!("finished {step} steps; the best model by held-out ROUGE-L (step {best}): {}", dir.display());
    Ok(())
}

struct Sft {
    settings: SftSettings,
    stop: Arc<AtomicBool>,
}

impl ParallelJob for Sft {
    /// The model's directory, the steps taken, the steps planned and the saved (best) model's step.
    type Output = (PathBuf, usize, usize, usize);

    fn run<B: Backend>(&self, be: &B, group: &dyn Collective<B>) -> Result<(PathBuf, usize, usize, usize)> {
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
        let (dir, best) = trainer.run(&self.stop)?;
        Ok((dir, trainer.step, trainer.total_steps(), best.step))
    }
}
