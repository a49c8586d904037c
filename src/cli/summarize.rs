//! `detox summarize`: JSON Lines dialogues in, JSON Lines summaries out.

use crate::backend::Backend;
use crate::device::{Device, Job, run_on};
use crate::t5::{Fwd, GenConfig, T5};
use crate::text::{self, Prompter};
use anyhow::{Result, ensure};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model directory (Hugging Face layout: config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON Lines with a "dialogue" field (an "id" is carried through); - reads stdin.
    #[arg(long)]
    pub input: String,
    /// Where to write JSON Lines rows {id, summary, tokens}; - writes stdout.
    #[arg(long, default_value = "-")]
    pub output: String,
    /// Dialogues per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Prompts longer than this many tokens are truncated (EOS kept).
    #[arg(long, default_value_t = text::DEFAULT_MAX_SOURCE_LEN)]
    pub max_source_len: usize,
    /// Prompt template; {dialogue} is replaced by the dialogue.
    #[arg(long, default_value = text::DEFAULT_TEMPLATE)]
    pub prompt: String,
    /// A tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[command(flatten)]
    pub generation: super::generation::GenArgs,
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    let generation = a.generation.config()?;
    let rows = text::read_jsonl(&a.input)?;
    let source = if a.input == "-" { "standard input" } else { a.input.as_str() };
    let dialogues: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| text::string_field(r, "dialogue", i, source).map(str::to_owned))
        .collect::<Result<_>>()?;
    let mut out = crate::fsutil::Output::create(&a.output)?;
    let stop = super::interrupt_flag("writing the summaries done so far")?;
    let job = Summarize { args: &a, dialogues: &dialogues, rows: &rows, generation, out: &mut out, stop: &stop };
    let finished = run_on(a.device, job)?;
    let written = out.rows;
    out.commit()?;
    if !finished {
        return Err(super::Interrupted(format!(
            "interrupted after {written} of {} rows; they are in {}",
            rows.len(),
            a.output
        ))
        .into());
    }
    Ok(())
}

struct Summarize<'a> {
    args: &'a Args,
    dialogues: &'a [String],
    rows: &'a [Value],
    generation: GenConfig,
    out: &'a mut crate::fsutil::Output,
    stop: &'a AtomicBool,
}

impl Job for Summarize<'_> {
    /// Whether every row was written (false: Ctrl-C stopped it after a window of rows).
    type Output = bool;

    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let a = self.args;
        super::check_finite_weights(&a.model, a.adapter.as_deref())?;
        let mut model = T5::load(be, &a.model)?;
        if let Some(dir) = &a.adapter {
            model.load_adapter(be, dir)?;
            model.merge_lora(be)?;
        }
        let c = &model.config;
        let prompter = Prompter::new(
            &text::tokenizer_path(&a.model, a.tokenizer.as_deref()),
            &a.prompt,
            a.max_source_len,
            c.eos_token_id,
            c.vocab_size,
        )?;
        let pb = crate::progress::bar(self.dialogues.len(), "summarizing");
        let f = Fwd::eval(model.lora.is_some());
        let (rows, out, stop) = (self.rows, self.out, self.stop);
        let mut finished = true;
        let r = crate::summaries::summarize_each(
            be,
            &model,
            &prompter,
            self.dialogues,
            &self.generation,
            a.batch_size,
            f,
            |i, (summary, tokens)| {
                let id = rows[i].get("id").cloned().unwrap_or(Value::from(i));
                out.line(&json!({ "id": id, "summary": summary, "tokens": tokens }).to_string())?;
                pb.inc(1);
                if crate::fsutil::test_point("DETOX_TEST_INTERRUPT_AT", &format!("summarize-row-{}", i + 1)) {
                    stop.store(true, Ordering::SeqCst);
                }
                // A Ctrl-C stops at the end of a window, whose rows are all written.
                let window_end = (i + 1) % (a.batch_size * crate::summaries::WINDOW_BATCHES) == 0;
                if window_end && i + 1 < rows.len() && stop.load(Ordering::SeqCst) {
                    finished = false;
                    anyhow::bail!("stopped");
                }
                Ok(())
            },
        );
        pb.finish_and_clear();
        match r {
            Err(_) if !finished => Ok(false),
            r => r.map(|()| true),
        }
    }
}
