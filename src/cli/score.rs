//! `detox score`: JSON Lines texts in, per-label toxicity probabilities out, with a per-label summary
//! (mean and share above 0.5) on stderr.

use crate::backend::Backend;
use crate::classifier::Classifier;
use crate::device::{Device, Job, run_on};
use crate::text;
use anyhow::{Result, ensure};
use serde_json::Value;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Classifier directory (Hugging Face layout: config.json with id2label, safetensors,
    /// tokenizer.json), e.g. one written by tools/convert_detoxify.py.
    #[arg(long)]
    pub classifier: PathBuf,
    /// JSON Lines with the text to score in --field (an "id" is carried through); - reads stdin.
    #[arg(long)]
    pub input: String,
    /// The field holding the text.
    #[arg(long, default_value = "summary")]
    pub field: String,
    /// Where to write JSON Lines rows {id, <label>: probability, ...}; - writes stdout.
    #[arg(long, default_value = "-")]
    pub output: String,
    /// Texts per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// A tokenizer.json to use instead of the classifier directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    let rows = text::read_jsonl(&a.input)?;
    let source = if a.input == "-" { "standard input" } else { a.input.as_str() };
    let texts: Vec<&str> =
        rows.iter().enumerate().map(|(i, r)| text::string_field(r, &a.field, i, source)).collect::<Result<_>>()?;
    let mut out = crate::fsutil::Output::create(&a.output)?;
    let (labels, scores) = run_on(a.device, Score { args: &a, texts: &texts, rows: &rows, out: &mut out })?;
    out.commit()?;
    eprint!("{}", summary(&labels, &scores));
    Ok(())
}

/// Mean probability and share above 0.5 per label.
fn summary(labels: &[String], scores: &[Vec<f32>]) -> String {
    let n = scores.len();
    if n == 0 {
        return "no rows to score\n".into();
    }
    let width = labels.iter().map(String::len).max().unwrap_or(0).max(5);
    let mut s = format!("{n} rows\n{:width$}  {:>8}  {:>8}\n", "label", "mean", "> 0.5");
    for (j, label) in labels.iter().enumerate() {
        let mean = scores.iter().map(|r| r[j] as f64).sum::<f64>() / n as f64;
        let above = scores.iter().filter(|r| r[j] > 0.5).count();
        s.push_str(&format!(
            "{label:width$}  {mean:>8.6}  {:>7.2}% ({above} of {n})\n",
            100.0 * above as f64 / n as f64
        ));
    }
    s
}

struct Score<'a> {
    args: &'a Args,
    texts: &'a [&'a str],
    rows: &'a [Value],
    out: &'a mut crate::fsutil::Output,
}

/// Texts scored together before their rows are written.
const WINDOW_BATCHES: usize = 8;

impl Job for Score<'_> {
    /// The reported labels and, per text, their probabilities.
    type Output = (Vec<String>, Vec<Vec<f32>>);

    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        let a = self.args;
        let clf = Classifier::load(be, &a.classifier, a.tokenizer.as_deref())?;
        let pb = crate::progress::bar(self.texts.len(), "scoring");
        let labels = clf.reported_labels().to_vec();
        let mut scores = Vec::with_capacity(self.texts.len());
        let window = a.batch_size * WINDOW_BATCHES;
        for (w, texts) in self.texts.chunks(window).enumerate() {
            let mut part = clf.score(be, texts, a.batch_size, |n| pb.inc(n as u64))?;
            for (k, probs) in part.iter_mut().enumerate() {
                probs.truncate(labels.len());
                let i = w * window + k;
                // Written by hand so that the id comes first and the labels keep the model's order.
                let id = self.rows[i].get("id").cloned().unwrap_or(Value::from(i));
                let mut line = format!("{{\"id\":{id}");
                for (label, p) in labels.iter().zip(probs.iter()) {
                    line.push_str(&format!(",{}:{}", Value::from(label.as_str()), Value::from(*p)));
                }
                line.push('}');
                self.out.line(&line)?;
            }
            scores.extend(part);
        }
        pb.finish_and_clear();
        Ok((labels, scores))
    }
}
