//! `detox eval`: the seed's results table. Summaries from a model (optionally with its adapter), or
//! the LEAD-N baseline, for dialogues with reference summaries; the classifier's scores of both;
//! ROUGE-1/2/L/Lsum against the references, as rouge_score computes them.

use crate::backend::Backend;
use crate::classifier::Classifier;
use crate::device::{Device, Job, run_on};
use crate::t5::{Fwd, T5};
use crate::text::{self, Prompter};
use anyhow::{Result, bail, ensure};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model directory (Hugging Face layout); not needed with --lead.
    #[arg(long, required_unless_present = "lead")]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory (e.g. a training checkpoint).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The toxicity classifier (Hugging Face layout).
    #[arg(long)]
    pub classifier: PathBuf,
    /// JSON Lines with "dialogue" and "summary" fields.
    #[arg(long)]
    pub data: String,
    /// Evaluate the first N rows (all when absent; at least 1).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where to write the results as JSON (with every row's summary and scores).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Dialogues (and texts to score) per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Score the LEAD-N baseline instead of a model's summaries: each dialogue's first N lines
    /// (turns), joined by newlines, so that ROUGE-Lsum sees N sentences.
    #[arg(long, conflicts_with_all = ["model", "adapter"], value_parser = clap::value_parser!(u64).range(1..))]
    pub lead: Option<u64>,
    /// Porter-stem tokens of more than three letters before ROUGE, as rouge_score's
    /// `use_stemmer=True` does (NLTK's stemmer). Off by default, as rouge_score's is.
    #[arg(long)]
    pub use_stemmer: bool,
    /// The classifier label the table leads with.
    #[arg(long, default_value = "toxicity")]
    pub label: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[command(flatten)]
    pub generation: super::generation::GenArgs,
}

/// One group of texts' scores.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    /// Mean probability per label.
    pub label_means: Vec<(String, f64)>,
    /// Share of texts whose lead label's probability exceeds 0.5.
    pub share_above_half: f64,
    pub lead_mean: f64,
}

fn group(labels: &[String], scores: &[Vec<f32>], lead: usize) -> Group {
    let n = scores.len().max(1) as f64;
    let label_means = labels
        .iter()
        .enumerate()
        .map(|(j, l)| (l.clone(), scores.iter().map(|s| s[j] as f64).sum::<f64>() / n))
        .collect();
    Group {
        label_means,
        share_above_half: scores.iter().filter(|s| s[lead] > 0.5).count() as f64 / n,
        lead_mean: scores.iter().map(|s| s[lead] as f64).sum::<f64>() / n,
    }
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.limit != Some(0), "--limit 0 evaluates nothing: give at least 1, or leave it out for every row");
    a.generation.config()?;
    let output = a.output.as_ref().map(|p| crate::fsutil::Output::create(&p.to_string_lossy())).transpose()?;
    let rows = text::read_jsonl(&a.data)?;
    let rows = &rows[..a.limit.unwrap_or(rows.len()).min(rows.len())];
    ensure!(!rows.is_empty(), "{} holds no rows to evaluate", a.data);
    let dialogues: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| text::string_field(r, "dialogue", i, &a.data).map(str::to_owned))
        .collect::<Result<_>>()?;
    let references: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| text::string_field(r, "summary", i, &a.data).map(str::to_owned))
        .collect::<Result<_>>()?;
    let report = run_on(a.device, Eval { args: a.clone(), dialogues, references })?;
    println!("{}", report.0);
    if let Some(mut out) = output {
        out.text(&serde_json::to_string_pretty(&report.1)?)?;
        out.commit()?;
    }
    Ok(())
}

struct Eval {
    args: Args,
    dialogues: Vec<String>,
    references: Vec<String>,
}

impl Job for Eval {
    type Output = (String, serde_json::Value);

    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let a = &self.args;
        let summaries = match (a.lead, &a.model) {
            (Some(n), _) => self.dialogues.iter().map(|d| lead_turns(d, n as usize)).collect(),
            (None, Some(model)) => self.generate(be, model)?,
            (None, None) => bail!("give --model, or --lead for the LEAD-N baseline"),
        };
        self.score(be, summaries)
    }
}

/// The first `n` lines of a dialogue (SAMSum's turns; CRLF counts as one line end).
fn lead_turns(dialogue: &str, n: usize) -> String {
    dialogue.lines().filter(|l| !l.trim().is_empty()).take(n).collect::<Vec<_>>().join("\n")
}

impl Eval {
    /// The model's summaries of the dialogues.
    fn generate<B: Backend>(&self, be: &B, model_dir: &std::path::Path) -> Result<Vec<String>> {
        let a = &self.args;
        super::check_finite_weights(model_dir, a.adapter.as_deref())?;
        let mut model = T5::load(be, model_dir)?;
        if let Some(dir) = &a.adapter {
            model.load_adapter(be, dir)?;
            model.merge_lora(be)?;
        }
        let c = &model.config;
        let prompter = Prompter::new(
            &text::tokenizer_path(model_dir, None),
            text::DEFAULT_TEMPLATE,
            text::DEFAULT_MAX_SOURCE_LEN,
            c.eos_token_id,
            c.vocab_size,
        )?;
        let generation = a.generation.config()?;
        let pb = crate::progress::bar(self.dialogues.len(), "summarizing");
        let f = Fwd::eval(model.lora.is_some());
        let summaries: Vec<String> =
            crate::summaries::summarize(be, &model, &prompter, &self.dialogues, &generation, a.batch_size, f, |n| {
                pb.inc(n as u64)
            })?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        pb.finish_and_clear();
        Ok(summaries)
    }

    /// The classifier's scores and ROUGE of `summaries`, as the printed table and the JSON.
    fn score<B: Backend>(&self, be: &B, summaries: Vec<String>) -> Result<(String, serde_json::Value)> {
        let a = &self.args;
        let clf = Classifier::load(be, &a.classifier, None)?;
        let labels = clf.config().labels.clone();
        let lead = clf.label_index(&a.label)?;
        let ref_scores = clf.score(be, &self.references, 64, |_| {})?;
        let model_scores = clf.score(be, &summaries, 64, |_| {})?;
        let pairs: Vec<(String, String)> = summaries.iter().cloned().zip(self.references.iter().cloned()).collect();
        let rouge = crate::rouge::means(&pairs, a.use_stemmer);
        let (gr, gm) = (group(&labels, &ref_scores, lead), group(&labels, &model_scores, lead));
        let n = self.dialogues.len();
        let table = results_table(a, n, &labels, (&gr, &gm), &rouge);
        let rows: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                json!({ "summary": summaries[i], "reference": self.references[i],
                        "scores": model_scores[i], "reference_scores": ref_scores[i] })
            })
            .collect();
        let value = json!({
            "data": a.data, "model": a.model, "adapter": a.adapter, "lead": a.lead, "classifier": a.classifier,
            "dialogues": n, "labels": labels, "label": a.label, "reference": gr, "model_summaries": gm,
            "rouge": rouge, "use_stemmer": a.use_stemmer, "rows": rows,
        });
        Ok((table, value))
    }
}

/// The seed's results table: toxicity of the references and of the model's summaries, ROUGE, and
/// each label's means when the classifier has several.
fn results_table(
    a: &Args,
    n: usize,
    labels: &[String],
    (gr, gm): (&Group, &Group),
    rouge: &crate::rouge::MeanF,
) -> String {
    let stemmed = if a.use_stemmer { ", stemmed" } else { "" };
    let mut table = format!(
        "{n} dialogues from {} (ROUGE F-measures{stemmed})\n{:<22} {:>10} {:>12} {:>8} {:>8} {:>8} {:>9}\n",
        a.data,
        "",
        format!("{} mean", a.label),
        "share > 0.5",
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
        "ROUGE-Lsum"
    );
    table.push_str(&format!(
        "{:<22} {:>10.4} {:>11.2}% {:>8} {:>8} {:>8} {:>9}\n",
        "reference summaries",
        gr.lead_mean,
        100.0 * gr.share_above_half,
        "-",
        "-",
        "-",
        "-"
    ));
    table.push_str(&format!(
        "{:<22} {:>10.4} {:>11.2}% {:>8.4} {:>8.4} {:>8.4} {:>9.4}",
        match a.lead {
            Some(k) => format!("LEAD-{k}"),
            None => "model summaries".into(),
        },
        gm.lead_mean,
        100.0 * gm.share_above_half,
        rouge.rouge1,
        rouge.rouge2,
        rouge.rouge_l,
        rouge.rouge_lsum
    ));
    if labels.len() > 1 {
        table.push_str("\nlabel means (reference / model):");
        for ((l, x), (_, y)) in gr.label_means.iter().zip(&gm.label_means) {
            table.push_str(&format!("\n  {l:<18} {x:.4} / {y:.4}"));
        }
    }
    table
}
