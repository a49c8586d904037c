//! `detox bench`: whole phases timed on random weights of FLAN-T5's shapes, each beside its
//! roofline floor (FLOPs at the measured bf16 ceiling, bytes at the measured copy bandwidth).

mod beam;
mod ppo;
mod sft;

use beam::BenchBeam;
use ppo::BenchPpo;
use sft::BenchSft;

use crate::backend::Backend;
use crate::checkpoint::DType;
use crate::device::{Device, Job, run_on};
use crate::parallel::launch::launch;
use crate::t5::config::T5Config;
use crate::t5::init::{InitScheme, random_weights};
use crate::t5::{Fwd, GenConfig, LoraSettings, Prompts, T5, ValueHead, generate};
use crate::text::pad_batch;
use anyhow::{Context, Result, ensure};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Ceilings measured on the H200 here (KINDS.md, BASELINE.md).
const PEAK_FLOPS: f64 = 790e12;
const PEAK_BYTES: f64 = 4.3e12;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Rollout generation: encoder, cached decoding with sampling, log-probs and values.
    Generate(GenArgs),
    /// Reward scoring: tokenization and the classifier over a JSON Lines field.
    Score(ScoreArgs),
    /// One whole PPO iteration: rollout, reward, reference and rollout passes, minibatch epochs.
    Ppo(PpoArgs),
    /// Beam-search generation (tools/bench_hf_beam.py times Hugging Face's with the same settings).
    Beam(BeamArgs),
    /// Full-parameter SFT steps: the gradients (forward, loss, backward) and the optimiser's update.
    Sft(SftArgs),
}

/// What `bench generate` and `bench beam` share: the model, the prompt and output sizes, the runs.
#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// FLAN-T5 shape for random weights (tiny, small, base, large, xl).
    #[arg(long, default_value = "base")]
    pub size: String,
    /// A model directory to use instead of random weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts generated together.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    pub src: usize,
    /// Generated tokens per prompt (EOS is suppressed so that every row, and every beam, runs them all).
    #[arg(long = "gen", default_value_t = 64)]
    pub gen_tokens: usize,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl DecodeArgs {
    fn validate(&self) -> Result<()> {
        ensure!(
            self.batch > 0 && self.src > 1 && self.gen_tokens > 0 && self.iters > 0,
            "batch, src, gen and iters must be positive"
        );
        Ok(())
    }

    /// The model's directory: `--model`, or random weights of `--size` in a temporary directory
    /// that lives as long as the returned guard.
    fn model_dir(&self) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
        match &self.model {
            Some(d) => Ok((d.clone(), None)),
            None => {
                let tmp = random_model_dir(&self.size)?;
                Ok((tmp.path().to_path_buf(), Some(tmp)))
            }
        }
    }

    /// How the report names the model.
    fn model_name(&self) -> String {
        self.model.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| format!("random flan-t5-{}", self.size))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BeamArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Beams per prompt.
    #[arg(long, default_value_t = 4)]
    pub num_beams: usize,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PpoArgs {
    /// FLAN-T5 shape for random weights.
    #[arg(long, default_value = "base")]
    pub size: String,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Rows per minibatch.
    #[arg(long, default_value_t = 16)]
    pub mini: usize,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 256)]
    pub src: usize,
    #[arg(long = "gen", default_value_t = 64)]
    pub gen_tokens: usize,
    /// Timed iterations after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// A classifier for the reward (with `--tokenizer` to decode); without it, the toy reward.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The same global batch spread over data-parallel workers, as `detox train` spreads it.
    #[command(flatten)]
    pub workers: super::Workers,
    /// Open the profiler's range around this phase of the last iteration only, for
    /// `ncu --profile-from-start off detox bench ppo --profile step …`.
    #[arg(long, value_enum)]
    pub profile: Option<Phase>,
}

/// The phases of a PPO iteration that `--profile` can single out.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Generate,
    Reward,
    /// The PPO step: the reference and rollout passes, then the minibatch epochs.
    Step,
    Iteration,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SftArgs {
    /// FLAN-T5 shape for random weights (tiny, small, base, large, xl).
    #[arg(long, default_value = "small")]
    pub size: String,
    /// Pairs per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    pub src: usize,
    /// Target length in tokens.
    #[arg(long, default_value_t = 64)]
    pub tgt: usize,
    /// The optimiser, with `detox sft`'s defaults for it.
    #[arg(long, value_enum, default_value = "adafactor")]
    pub optimizer: crate::sft::settings::Optimizer,
    /// Timed steps after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Open the profiler's range around the last step only, for
    /// `ncu --profile-from-start off detox bench sft --profile …`.
    #[arg(long)]
    pub profile: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Classifier directory (Hugging Face layout).
    #[arg(long)]
    pub classifier: PathBuf,
    /// JSON Lines file whose `--field` holds the texts.
    #[arg(long)]
    pub input: String,
    #[arg(long, default_value = "summary")]
    pub field: String,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Timed passes after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// LoRA rank on q and v (0: no adapter), as the seed's policy.
    #[arg(long, default_value_t = 32)]
    pub lora_r: usize,
}

pub fn run(a: Args) -> Result<()> {
    match a.what {
        What::Ppo(p) => {
            ensure!(p.batch > 0 && p.mini > 0 && p.batch % p.mini == 0, "--mini must divide --batch");
            ensure!(p.mini >= p.workers.gpus * p.workers.nodes, "--mini must give every worker a row");
            // Machines other than the first time their share but leave the report to machine 0.
            if let Some(report) = launch(p.device, &p.workers.topology(), &BenchPpo(p.clone()))? {
                println!("{}", report.text);
                if let Some(path) = &p.json {
                    crate::fsutil::write_atomic(path, serde_json::to_string_pretty(&report.json)?.as_bytes())?;
                }
            }
            Ok(())
        }
        What::Score(s) => {
            ensure!(s.batch_size > 0 && s.iters > 0, "batch size and iters must be positive");
            let rows = crate::text::read_jsonl(&s.input)?;
            let texts: Vec<String> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| crate::text::string_field(r, &s.field, i, &s.input).map(str::to_owned))
                .collect::<Result<_>>()?;
            let report = run_on(s.device, BenchScore { args: s.clone(), texts })?;
            println!("{}", report.text);
            if let Some(p) = &s.json {
                crate::fsutil::write_atomic(p, serde_json::to_string_pretty(&report.json)?.as_bytes())?;
            }
            Ok(())
        }
        What::Beam(g) => {
            g.decode.validate()?;
            print_report(run_on(g.decode.device, BenchBeam(g.clone()))?, g.decode.json.as_deref())
        }
        What::Sft(s) => {
            ensure!(s.batch > 0 && s.src > 1 && s.tgt > 1 && s.iters > 0, "batch, src, tgt and iters must be positive");
            print_report(run_on(s.device, BenchSft(s.clone()))?, s.json.as_deref())
        }
        What::Generate(g) => {
            g.decode.validate()?;
            print_report(run_on(g.decode.device, BenchGenerate(g.clone()))?, g.decode.json.as_deref())
        }
    }
}

struct Report {
    text: String,
    json: serde_json::Value,
}

/// Prints a report, and writes its JSON to `json` when given.
fn print_report(report: Report, json: Option<&std::path::Path>) -> Result<()> {
    println!("{}", report.text);
    if let Some(p) = json {
        crate::fsutil::write_atomic(p, serde_json::to_string_pretty(&report.json)?.as_bytes())?;
    }
    Ok(())
}

struct BenchGenerate(GenArgs);

/// A report's peak memory in GiB, or "n/a" where the backend does not track it.
fn gib(peak: Option<usize>) -> String {
    peak.map(|p| format!("{:.2} GiB", p as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "n/a".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Job for BenchGenerate {
    type Output = Report;

    fn run<B: Backend>(self, be: &B) -> Result<Report> {
        let a = self.0;
        let (dir, _tmp) = a.decode.model_dir()?;
        let mut model = T5::load(be, &dir)?;
        if a.lora_r > 0 {
            model.attach_lora(
                be,
                LoraSettings { r: a.lora_r, alpha: a.lora_r as f32, ..LoraSettings::seed_default() },
                0,
            )?;
        }
        let c = model.config.clone();
        let vh = ValueHead::init(be, c.d_model, 0)?;
        let f = Fwd::eval(a.lora_r > 0);
        let (b, l, g) = (a.decode.batch, a.decode.src, a.decode.gen_tokens);
        let seqs = random_prompts(b, l, c.eos_token_id);
        let streams: Vec<u32> = (0..b as u32).collect();
        let prompts = Prompts::upload(be, &pad_batch(&seqs, c.pad_token_id), &streams)?;
        let sampling = GenConfig { max_new_tokens: g, min_new_tokens: g, sample: true, ..GenConfig::default() };

        let mut rollout = Vec::new();
        let mut prefill = Vec::new();
        be.reset_peak_memory();
        for it in 0..=a.decode.iters {
            be.sync()?;
            let t0 = Instant::now();
            let enc = model.encode(be, &prompts.ids, &prompts.lengths, f)?;
            let cache = model.start_decoding(be, &enc, &prompts.lengths, g, f)?;
            be.sync()?;
            let t1 = Instant::now();
            drop(cache);
            drop(enc);
            let out = generate(be, &model, Some(&vh), &prompts, &sampling, f)?;
            let t2 = Instant::now();
            ensure!(out.iter().all(|o| o.tokens.len() == g), "every row should run {g} steps");
            if it > 0 {
                prefill.push((t1 - t0).as_secs_f64());
                rollout.push((t2 - t1).as_secs_f64());
            }
        }
        Ok(generate_report(be, &a, &c, (median(rollout), median(prefill))))
    }
}

/// The generation medians beside their floors, as text and JSON.
fn generate_report<B: Backend>(be: &B, a: &GenArgs, c: &T5Config, (t_roll, t_pre): (f64, f64)) -> Report {
    let (b, l, g) = (a.decode.batch, a.decode.src, a.decode.gen_tokens);
    let peak = be.peak_memory();
    let step_ms = (t_roll - t_pre).max(0.0) / g as f64 * 1e3;

    // The floors. Prefill: the encoder's products and attention, and the decoder's cross K/V.
    let (d, inner, ff, v) = (c.d_model as f64, c.inner_dim() as f64, c.d_ff as f64, c.vocab_size as f64);
    let (le, ld) = (c.num_layers as f64, c.num_decoder_layers as f64);
    let tokens = (b * l) as f64;
    let enc_linear = le * (4.0 * d * inner + 3.0 * d * ff);
    let prefill_flops = 2.0 * tokens * enc_linear
        + le * 4.0 * (b as f64) * (l as f64).powi(2) * inner
        + 2.0 * tokens * ld * 2.0 * d * inner;
    // A decoding step reads the decoder's weights and the LM head once, both K/V caches, and
    // writes and reads the logits.
    let step_weights = 2.0 * (ld * (6.0 * d * inner + 3.0 * d * ff) + v * d);
    let cross_kv = ld * 2.0 * tokens * inner * 2.0;
    let self_kv = ld * 2.0 * (b as f64) * (g as f64 / 2.0) * inner * 2.0;
    let logits = 2.0 * (b as f64) * v * 4.0;
    let step_bytes = step_weights + cross_kv + self_kv + logits;
    let step_floor_ms = step_bytes / PEAK_BYTES * 1e3;
    let tok_s = (b * g) as f64 / t_roll;
    let name = a.decode.model_name();
    let text = format!(
        "generate: batch {b}, src {l}, gen {g}, {name}, LoRA r {} on q,v, sampling, value head, {}\n\
         rollout      {:9.2} ms median of {}  →  {:.0} generated tokens/s\n\
         prefill      {:9.2} ms  {:6.1} TFLOP/s  (floor {:.2} ms at 790 TFLOP/s)\n\
         decode step  {:9.3} ms  (floor {:.3} ms: {:.0} MB at 4.3 TB/s; {:.1}× the floor)\n\
         peak memory  {}",
        a.lora_r,
        be.name(),
        t_roll * 1e3,
        a.decode.iters,
        tok_s,
        t_pre * 1e3,
        prefill_flops / t_pre / 1e12,
        prefill_flops / PEAK_FLOPS * 1e3,
        step_ms,
        step_floor_ms,
        step_bytes / 1e6,
        step_ms / step_floor_ms,
        gib(peak),
    );
    let json = json!({
        "phase": "generate", "device": be.name(), "model": name, "batch": b, "src": l, "gen": g, "lora_r": a.lora_r,
        "iters": a.decode.iters, "rollout_s": t_roll, "prefill_s": t_pre, "decode_step_ms": step_ms,
        "gen_tokens_per_s": tok_s, "prefill_tflops": prefill_flops / t_pre / 1e12,
        "prefill_floor_ms": prefill_flops / PEAK_FLOPS * 1e3, "decode_step_floor_ms": step_floor_ms,
        "peak_bytes": peak,
    });
    Report { text, json }
}

struct BenchScore {
    args: ScoreArgs,
    texts: Vec<String>,
}

impl Job for BenchScore {
    type Output = Report;

    fn run<B: Backend>(self, be: &B) -> Result<Report> {
        let a = self.args;
        let clf = crate::classifier::Classifier::load(be, &a.classifier, None)?;
        let texts: Vec<&str> = self.texts.iter().map(String::as_str).collect();
        let label = clf.config().labels.iter().position(|l| l == "toxicity").unwrap_or(0);
        let mut times = Vec::new();
        let mut mean = 0.0;
        for it in 0..=a.iters {
            be.sync()?;
            let t0 = Instant::now();
            let scores = clf.score(be, &texts, a.batch_size, |_| {})?;
            let dt = t0.elapsed().as_secs_f64();
            mean = scores.iter().map(|s| s[label] as f64).sum::<f64>() / scores.len().max(1) as f64;
            if it > 0 {
                times.push(dt);
            }
        }
        let t = median(times);
        let n = texts.len();
        let text = format!(
            "score: {n} texts from {}, batch {}, {}, tokenization included\n\
             pass         {:9.2} ms median of {}  →  {:.0} texts/s\n\
             mean {:<8} {mean:.6}",
            a.input,
            a.batch_size,
            be.name(),
            t * 1e3,
            a.iters,
            n as f64 / t,
            clf.config().labels[label],
        );
        let json = json!({
            "phase": "score", "device": be.name(), "classifier": a.classifier.display().to_string(), "texts": n,
            "batch": a.batch_size, "iters": a.iters, "seconds": t, "texts_per_s": n as f64 / t, "mean": mean,
        });
        Ok(Report { text, json })
    }
}

/// `b` prompts of `l` pseudo-random tokens, EOS last.
fn random_prompts(b: usize, l: usize, eos: u32) -> Vec<Vec<u32>> {
    (0..b)
        .map(|r| {
            let mut s: Vec<u32> = (0..l - 1).map(|i| 3 + ((r * 7919 + i * 104_729) % 31_000) as u32).collect();
            s.push(eos);
            s
        })
        .collect()
}

/// A random model of `size` written to a temporary directory (kept alive by the returned guard).
fn random_model_dir(size: &str) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir().context("creating a temporary model directory")?;
    let cfg = T5Config::preset(size)?;
    crate::checkpoint::write_safetensors(
        &tmp.path().join("model.safetensors"),
        &random_weights(&cfg, 0, DType::F16, InitScheme::Hf),
        None,
    )?;
    crate::fsutil::write_atomic(&tmp.path().join("config.json"), cfg.to_json().to_string().as_bytes())?;
    Ok(tmp)
}
