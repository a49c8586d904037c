//! `detox plot`: line charts of a training log's metrics against the step.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A JSON Lines log written by `detox train` or `detox sft`.
    pub log: PathBuf,
    /// The chart: .svg, or .png (rendered with the system's sans-serif font).
    #[arg(long)]
    pub out: PathBuf,
    /// Comma-separated keys to plot, one panel each (the PPO log's reward, toxicity and KL by
    /// default; for an SFT log e.g. loss,eval_loss,rougeL).
    #[arg(long, value_delimiter = ',', default_value = "reward_mean,toxicity_mean,kl")]
    pub keys: Vec<String>,
    /// The chart's title (the log's path by default).
    #[arg(long)]
    pub title: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let rows = crate::text::read_jsonl(&a.log.to_string_lossy())?;
    let series = a
        .keys
        .iter()
        .map(|k| crate::plot::series_from_log(&rows, k))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| e.context(format!("plotting {}", a.log.display())))?;
    let title = a.title.unwrap_or_else(|| a.log.display().to_string());
    crate::plot::write(&a.out, &crate::plot::svg(&title, &series)?)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
