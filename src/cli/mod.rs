//! The subcommands of `detox`, one file each.

mod bench;
mod convert;
mod eval;
mod generation;
mod info;
mod init;
mod plot;
mod score;
mod sft;
mod summarize;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Detoxify FLAN-T5 dialogue summaries: LoRA + PPO with a toxicity classifier as the reward,
/// on the CPU or an NVIDIA GPU.
#[derive(Parser, Debug)]
#[command(name = "detox", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune the summarizer's LoRA adapters with PPO against a toxicity classifier.
    #[command(
        after_help = "Exit status: 0 when it finishes, 130 when Ctrl-C stopped it (after its checkpoint), 1 on an error."
    )]
    Train(train::Args),
    /// Supervised fine-tuning on dialogue–summary pairs (every weight or LoRA only), saved in Hugging Face layout.
    #[command(
        after_help = "Exit status: 0 when it finishes, 130 when Ctrl-C stopped it (after its evaluation and save), 1 on an error."
    )]
    Sft(sft::Args),
    /// The seed's results table: toxicity of reference and model summaries, ROUGE against the references.
    Eval(eval::Args),
    /// Summarize dialogues from JSON Lines with a T5 model (and optionally a LoRA adapter).
    #[command(
        after_help = "Exit status: 0 when it finishes, 130 when Ctrl-C stopped it (the rows done so far are kept), 1 on an error."
    )]
    Summarize(summarize::Args),
    /// Score texts from JSON Lines with a toxicity classifier (BERT / RoBERTa, Detoxify's layout).
    Score(score::Args),
    /// Write a T5 checkpoint of FLAN-T5's shapes with deterministic random weights.
    Init(init::Args),
    /// Copy a Hugging Face T5 checkpoint as fp16 safetensors (config and tokenizer included).
    Convert(convert::Args),
    /// Draw a training log's metrics against the step, or the toxicity trade-off of evaluated runs, as SVG or PNG.
    Plot(plot::Args),
    /// Print a checkpoint's configuration and parameter counts.
    Info(info::Args),
    /// Time whole phases on random weights of FLAN-T5's shapes, beside their roofline floors.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Summarize(a) => summarize::run(a),
        Command::Score(a) => score::run(a),
        Command::Init(a) => init::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// The error of a run that Ctrl-C stopped after saving its work: `detox` prints it as the final
/// line and exits with [`INTERRUPTED`] instead of 0.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const INTERRUPTED: u8 = 130;

/// Data-parallel workers, for `detox train`, `detox sft` and `detox bench ppo`.
#[derive(clap::Args, Debug, Clone)]
pub struct Workers {
    /// GPUs on this machine to train on, one worker each, gradients summed through NCCL: the first N
    /// visible ones (CUDA_VISIBLE_DEVICES chooses).
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Machines in the run, each starting the same command with its own --node-rank.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// This machine's place among them, 0 to nodes − 1; machine 0 writes logs and checkpoints.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// HOST:PORT where machine 0 hands the other machines the NCCL group's id.
    #[arg(long)]
    pub rendezvous: Option<String>,
    /// Form the NCCL group even for one GPU: checks a machine's NCCL before a multi-GPU run.
    #[arg(long)]
    pub nccl: bool,
}

impl Workers {
    pub fn topology(&self) -> crate::parallel::launch::Topology {
        crate::parallel::launch::Topology {
            gpus: self.gpus,
            nodes: self.nodes,
            node_rank: self.node_rank,
            rendezvous: self.rendezvous.clone(),
            nccl: self.nccl,
        }
    }
}

/// A flag the first Ctrl-C raises, so the loop can finish its step and `then` (what it does before
/// exiting, for the message); a second Ctrl-C exits at once.
pub fn interrupt_flag(then: &'static str) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then {then} (Ctrl-C again to abort)");
    })?;
    Ok(stop)
}

/// Checks that `out` (a `[run] out`) holds no earlier run before a run starts there: a directory is
/// never mixed. `resuming` accepts one (the resumed run cuts its log back); `overwrite` removes
/// its log, checkpoints and model; otherwise the error says how to `resume` or overwrite.
pub fn claim_run_dir(out: &std::path::Path, resuming: bool, overwrite: bool, resume: &str) -> Result<()> {
    let found = crate::fsutil::run_files(out);
    if found.is_empty() || resuming {
        return Ok(());
    }
    if overwrite {
        eprintln!("--overwrite-output-dir: removing {} from {}", found.join(", "), out.display());
        return crate::fsutil::clear_run(out);
    }
    anyhow::bail!(
        "{} already holds a run ({}); {resume}, or start over with --overwrite-output-dir, or set another [run] out",
        out.display(),
        found.join(", ")
    )
}

/// Refuses a model (and adapter) whose weights hold NaN or infinite values, which would make every
/// output garbage; the error names the tensor.
pub fn check_finite_weights(model: &std::path::Path, adapter: Option<&std::path::Path>) -> Result<()> {
    let mut files = vec![crate::checkpoint::Checkpoint::open_dir(model)?];
    if let Some(dir) = adapter {
        let f = dir.join("adapter_model.safetensors");
        if f.is_file() {
            files.push(crate::checkpoint::Checkpoint::open_file(&f)?);
        }
    }
    for ckpt in &files {
        for name in ckpt.names() {
            let bad = ckpt.get(name)?.to_f32().iter().filter(|x| !x.is_finite()).count();
            anyhow::ensure!(
                bad == 0,
                "{}: tensor {name} holds {bad} NaN or infinite values; the weights are corrupt",
                ckpt.file_of(name).map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
    }
    Ok(())
}
