//! `detox plot`: line charts of a training log's metrics against the step, or with `--tradeoff` the
//! trade-off chart of evaluated runs (mean toxicity against ROUGE-L and against KL).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A JSON Lines log written by `detox train` or `detox sft` (not with --tradeoff).
    #[arg(required_unless_present = "tradeoff", conflicts_with = "tradeoff")]
    pub log: Option<PathBuf>,
    /// The chart: .svg, or .png (rendered with the system's sans-serif font).
    #[arg(long)]
    pub out: PathBuf,
    /// Comma-separated keys to plot, one panel each (the PPO log's reward, toxicity and KL by
    /// default; for an SFT log e.g. loss,eval_loss,rougeL).
    #[arg(long, value_delimiter = ',', default_value = "reward_mean,toxicity_mean,kl")]
    pub keys: Vec<String>,
    /// A run of the trade-off chart, as LABEL=EVAL.json or LABEL=EVAL.json,LOG.jsonl: `detox eval`'s
    /// --output (its mean toxicity and ROUGE-L) and the PPO run's training log (its KL, the mean of
    /// the last 5 steps; a run without a log, such as the SFT model, appears against ROUGE-L only).
    /// Repeat for each run.
    #[arg(long, value_name = "LABEL=EVAL[,LOG]")]
    pub tradeoff: Vec<String>,
    /// The chart's title (the log's path, or "Toxicity trade-off", by default).
    #[arg(long)]
    pub title: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let svg = match &a.log {
        Some(log) => {
            let rows = crate::text::read_jsonl(&log.to_string_lossy())?;
            let series = a
                .keys
                .iter()
                .map(|k| crate::plot::series_from_log(&rows, k))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| e.context(format!("plotting {}", log.display())))?;
            crate::plot::svg(a.title.as_deref().unwrap_or(&log.display().to_string()), &series)?
        }
        None => {
            let runs = a.tradeoff.iter().map(|spec| run_point(spec)).collect::<Result<Vec<_>>>()?;
            crate::plot::tradeoff_svg(a.title.as_deref().unwrap_or("Toxicity trade-off"), &runs)?
        }
    };
    crate::plot::write(&a.out, &svg)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// One `--tradeoff LABEL=EVAL.json[,LOG.jsonl]` run.
fn run_point(spec: &str) -> Result<crate::plot::RunPoint> {
    let Some((label, files)) = spec.split_once('=') else {
        bail!("--tradeoff {spec}: expected LABEL=EVAL.json or LABEL=EVAL.json,LOG.jsonl");
    };
    let (eval_path, log_path) = match files.split_once(',') {
        Some((e, l)) => (e, Some(l)),
        None => (files, None),
    };
    let eval: serde_json::Value = serde_json::from_str(&crate::fsutil::read_text(eval_path.as_ref())?)
        .with_context(|| format!("--tradeoff {label}: {eval_path} is not JSON"))?;
    let log = log_path.map(crate::text::read_jsonl).transpose()?;
    crate::plot::RunPoint::new(label, eval_path, &eval, log.as_deref()).with_context(|| format!("--tradeoff {spec}"))
}
