//! `detox sft`'s configuration file, in TOML: the model, the (dialogue, summary) data, full-parameter
//! or LoRA-only training, AdamW with warmup and decay, and evaluation. Every field has a default
//! that works from a fresh checkout (SAMSum from ../shared, the model `detox init` writes to
//! models/flan-t5-small).

use super::step::{Hyper, OptimizerKind};
use crate::backend::AdafactorOptions;
use crate::device::Device;
use crate::t5::{EarlyStopping, GenConfig, LoraSettings, Targets};
use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftSettings {
    pub model: ModelSettings,
    pub data: DataSettings,
    pub lora: LoraToml,
    pub optim: OptimSettings,
    pub eval: EvalSettings,
    pub run: RunSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// The T5 checkpoint to start from, in Hugging Face layout.
    pub path: PathBuf,
    /// A tokenizer.json to use instead of the model directory's.
    pub tokenizer: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    /// JSON Lines with a dialogue and a summary per row.
    pub train: PathBuf,
    /// Held-out JSON Lines of the same form, for the evaluation after each epoch.
    pub eval: PathBuf,
    pub dialogue_field: String,
    pub summary_field: String,
    /// Train on the first this many usable rows (0: all).
    pub train_limit: usize,
    pub prompt: String,
    pub max_source_len: usize,
    /// Longer summaries are cut to this many tokens, EOS kept last.
    pub max_target_len: usize,
}

/// Which parameters train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every weight of the model, with f32 masters.
    Full,
    /// LoRA adapters only (the `[lora]` section), the model frozen.
    Lora,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraToml {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Module names (PEFT's suffix match): q, k, v, o, wi_0, wi_1, wo.
    pub target_modules: Vec<String>,
    pub init_seed: u64,
}

/// How the learning rate moves over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup, then linear decay to 0 at the last step (transformers' default).
    Linear,
    /// Linear warmup, then a half cosine to 0.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// The optimiser of `[optim] optimizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// torch's AdamW (beta1, beta2, eps).
    Adamw,
    /// transformers' Adafactor (the T5 papers' optimiser): factored second moments, update
    /// clipping, and its own relative step size unless `relative_step = false`.
    Adafactor,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSettings {
    pub method: Method,
    pub optimizer: Optimizer,
    /// The external rate, which warmup and the schedule shape. Unused by Adafactor with
    /// `relative_step` (transformers refuses an lr there; its rate is min(1e-2, 1/√t)).
    pub learning_rate: f64,
    /// AdamW's decoupled decay or Adafactor's weight_decay (both p ← p − lr·wd·p), on every weight
    /// but the layer norms' scales (as transformers' Trainer leaves norms out).
    pub weight_decay: f64,
    /// The first moment's β₁; unset: 0.9 for AdamW, none for Adafactor (transformers' defaults).
    pub beta1: Option<f64>,
    /// AdamW's.
    pub beta2: f64,
    /// AdamW's ε.
    pub eps: f64,
    /// Adafactor's eps = (eps1, eps2): added to g², and the least parameter RMS.
    pub adafactor_eps: [f64; 2],
    /// Adafactor: the update's RMS is clipped to this.
    pub clip_threshold: f64,
    /// Adafactor: β₂ of step t is 1 − t^decay_rate.
    pub decay_rate: f64,
    /// Adafactor: the rate is multiplied by each weight's RMS (at least eps2).
    pub scale_parameter: bool,
    /// Adafactor: the rate is min(1e-2, 1/√t), not learning_rate with warmup and schedule.
    pub relative_step: bool,
    /// Adafactor with relative_step: the rate is min(1e-6·t, 1/√t).
    pub warmup_init: bool,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// torch's CrossEntropyLoss label_smoothing.
    pub label_smoothing: f32,
    /// Dialogue–summary pairs per step.
    pub batch_size: usize,
    /// Loss scale for the GPU's half-precision gradient products; 0 picks one per device (1 on
    /// the CPU, 1024 on CUDA). Halved when gradients overflow.
    pub loss_scale: f32,
    /// Double the loss scale after this many overflow-free steps in a row, up to 2^24 (0: never).
    /// torch's GradScaler waits 2000; SFT runs here are a few thousand steps, so 250 lets a scale
    /// halved by an early spike recover within the run, at one skipped step per 250 if it
    /// overshoots.
    pub loss_scale_growth_interval: usize,
}

/// The held-out evaluation; the summaries for ROUGE are generated with Hugging Face's `generate`
/// options of the same names (defaults: greedy decoding).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSettings {
    /// Held-out rows for the loss and ROUGE (0: all).
    pub limit: usize,
    /// Summaries for ROUGE are cut at this many tokens.
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// Beam search with this many beams (1: greedy).
    pub num_beams: usize,
    pub length_penalty: f64,
    /// true, false or "never".
    pub early_stopping: EarlyStopping,
    pub no_repeat_ngram_size: usize,
    pub repetition_penalty: f32,
    pub batch_size: usize,
}

impl EvalSettings {
    /// The generation settings of the summaries for ROUGE.
    pub fn generation(&self) -> GenConfig {
        GenConfig {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            repetition_penalty: self.repetition_penalty,
            ..GenConfig::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    pub epochs: usize,
    /// Stop after this many steps (0: when the epochs end); the schedule spans the shorter.
    pub max_steps: usize,
    /// Stop after the step that passes this many seconds of training (0: no limit), evaluate and
    /// save: a time-boxed run.
    pub time_limit_s: f64,
    /// Seeds data order, LoRA init and dropout.
    pub seed: u64,
    /// auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
    pub device: String,
    /// The trained model (Hugging Face layout, in `out/model`) and the log go here.
    pub out: PathBuf,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self { path: PathBuf::from("models/flan-t5-small"), tokenizer: None }
    }
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            train: PathBuf::from("../shared/data/samsum/train.jsonl"),
            eval: PathBuf::from("../shared/data/samsum/validation.jsonl"),
            dialogue_field: "dialogue".into(),
            summary_field: "summary".into(),
            train_limit: 0,
            prompt: crate::text::DEFAULT_TEMPLATE.into(),
            max_source_len: crate::text::DEFAULT_MAX_SOURCE_LEN,
            max_target_len: 128,
        }
    }
}

impl Default for LoraToml {
    fn default() -> Self {
        let s = LoraSettings::seed_default();
        let Targets::Names(names) = s.targets else { unreachable!("the seed names its modules") };
        Self { r: s.r, alpha: s.alpha, dropout: s.dropout, target_modules: names, init_seed: 0 }
    }
}

impl Default for OptimSettings {
    fn default() -> Self {
        Self {
            method: Method::Full,
            optimizer: Optimizer::Adamw,
            learning_rate: 3e-4,
            weight_decay: 0.01,
            beta1: None,
            beta2: 0.999,
            eps: 1e-8,
            adafactor_eps: [1e-30, 1e-3],
            clip_threshold: 1.0,
            decay_rate: -0.8,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
            warmup_steps: 100,
            schedule: Schedule::Linear,
            max_grad_norm: 1.0,
            label_smoothing: 0.0,
            batch_size: 16,
            loss_scale: 0.0,
            loss_scale_growth_interval: 250,
        }
    }
}

impl Default for EvalSettings {
    fn default() -> Self {
        let g = GenConfig::default();
        Self {
            limit: 200,
            max_new_tokens: g.max_new_tokens,
            min_new_tokens: g.min_new_tokens,
            num_beams: g.num_beams,
            length_penalty: g.length_penalty,
            early_stopping: g.early_stopping,
            no_repeat_ngram_size: g.no_repeat_ngram_size,
            repetition_penalty: g.repetition_penalty,
            batch_size: 64,
        }
    }
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: 0,
            time_limit_s: 0.0,
            seed: 0,
            device: "auto".into(),
            out: PathBuf::from("runs/sft"),
        }
    }
}

impl OptimSettings {
    /// A step's hyperparameters: these settings at learning rate `lr` (Adafactor's external rate),
    /// loss scale `loss_scale` and dropout seed `dropout_seed`.
    pub fn hyper(&self, lr: f64, loss_scale: f32, dropout_seed: u64) -> Hyper {
        Hyper {
            lr,
            beta1: self.adam_beta1(),
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            adafactor: self.adafactor(),
            max_grad_norm: self.max_grad_norm,
            label_smoothing: self.label_smoothing,
            loss_scale,
            dropout_seed,
        }
    }

    /// AdamW's β₁: `beta1`, or 0.9.
    pub fn adam_beta1(&self) -> f64 {
        self.beta1.unwrap_or(0.9)
    }

    /// Adafactor's options, when it is the optimiser.
    pub fn adafactor(&self) -> Option<AdafactorOptions> {
        (self.optimizer == Optimizer::Adafactor).then_some(AdafactorOptions {
            eps1: self.adafactor_eps[0],
            eps2: self.adafactor_eps[1],
            clip_threshold: self.clip_threshold,
            decay_rate: self.decay_rate,
            beta1: self.beta1,
            scale_parameter: self.scale_parameter,
            relative_step: self.relative_step,
            warmup_init: self.warmup_init,
        })
    }

    /// The state the optimiser keeps.
    pub fn kind(&self) -> OptimizerKind {
        match self.optimizer {
            Optimizer::Adamw => OptimizerKind::AdamW,
            Optimizer::Adafactor => OptimizerKind::Adafactor { first_moment: self.beta1.is_some() },
        }
    }

    /// The learning rate of step `step` (1-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let lr = self.learning_rate;
        if step <= self.warmup_steps {
            return lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let done = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Linear => lr * (1.0 - done),
            Schedule::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
            Schedule::Constant => lr,
        }
    }
}

impl SftSettings {
    pub fn load(path: &Path) -> Result<Self> {
        let s: Self = crate::fsutil::read_toml(path, "detox sft config")?;
        s.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(s)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn lora_settings(&self) -> LoraSettings {
        LoraSettings {
            r: self.lora.r,
            alpha: self.lora.alpha,
            dropout: self.lora.dropout,
            targets: Targets::Names(self.lora.target_modules.clone()),
            use_rslora: false,
        }
    }

    pub fn device(&self) -> Result<Device> {
        self.run.device.parse().context("run.device")
    }

    pub fn validate(&self) -> Result<()> {
        let o = &self.optim;
        if o.method == Method::Lora {
            self.lora_settings().validate().context("[lora]")?;
        }
        ensure!(o.learning_rate > 0.0 && o.learning_rate.is_finite(), "[optim] learning_rate must be > 0");
        ensure!(o.weight_decay >= 0.0, "[optim] weight_decay must be ≥ 0");
        ensure!(o.beta1.is_none_or(|b| (0.0..1.0).contains(&b)), "[optim] beta1 must be in [0, 1)");
        ensure!((0.0..1.0).contains(&o.beta2), "[optim] beta2 must be in [0, 1)");
        ensure!(o.eps > 0.0, "[optim] eps must be > 0");
        ensure!(o.adafactor_eps.iter().all(|e| *e >= 0.0 && e.is_finite()), "[optim] adafactor_eps must be ≥ 0");
        ensure!(o.clip_threshold > 0.0 && o.clip_threshold.is_finite(), "[optim] clip_threshold must be > 0");
        ensure!(o.decay_rate < 0.0, "[optim] decay_rate must be < 0 (β₂ of step t is 1 − t^decay_rate)");
        ensure!(!o.warmup_init || o.relative_step, "[optim] warmup_init = true requires relative_step = true");
        ensure!(o.max_grad_norm >= 0.0, "[optim] max_grad_norm must be ≥ 0");
        ensure!((0.0..1.0).contains(&o.label_smoothing), "[optim] label_smoothing must be in [0, 1)");
        ensure!(o.batch_size > 0, "[optim] batch_size must be at least 1");
        ensure!(o.loss_scale >= 0.0 && o.loss_scale.is_finite(), "[optim] loss_scale must be ≥ 0");
        ensure!(self.data.prompt.contains("{dialogue}"), "[data] prompt has no {{dialogue}} placeholder");
        ensure!(self.data.max_target_len >= 1, "[data] max_target_len must be at least 1");
        ensure!(self.eval.batch_size > 0, "[eval] batch_size must be at least 1");
        self.eval.generation().validate().context("[eval]")?;
        ensure!(self.run.epochs > 0 || self.run.max_steps > 0, "[run] needs epochs or max_steps");
        ensure!(self.run.time_limit_s >= 0.0, "[run] time_limit_s must be ≥ 0");
        self.device()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_fields_are_named() {
        let s = SftSettings::default();
        s.validate().unwrap();
        let back: SftSettings = toml::from_str(&s.to_toml().unwrap()).unwrap();
        assert_eq!(back, s);
        let e = toml::from_str::<SftSettings>("[optim]\nlearning_rat = 1.0\n").unwrap_err().to_string();
        assert!(e.contains("learning_rat"), "{e}");
    }

    #[test]
    fn adafactor_options_are_validated_by_name() {
        let bad = |toml: &str, field: &str| {
            let s: SftSettings = toml::from_str(toml).unwrap();
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        bad("[optim]\noptimizer = \"adafactor\"\nrelative_step = false\nwarmup_init = true\n", "warmup_init");
        bad("[optim]\nclip_threshold = 0.0\n", "clip_threshold");
        bad("[optim]\ndecay_rate = 0.8\n", "decay_rate");
        bad("[optim]\nbeta1 = 1.0\n", "beta1");
        let s: SftSettings = toml::from_str("[optim]\noptimizer = \"adafactor\"\nbeta1 = 0.9\n").unwrap();
        let a = s.optim.adafactor().unwrap();
        assert_eq!((a.beta1, a.eps1, a.eps2, a.relative_step), (Some(0.9), 1e-30, 1e-3, true));
        assert_eq!(s.optim.kind(), OptimizerKind::Adafactor { first_moment: true });
        assert_eq!(SftSettings::default().optim.adam_beta1(), 0.9);
    }

    #[test]
    fn the_example_file_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sft.toml");
        assert_eq!(SftSettings::load(&path).unwrap(), SftSettings::default());
    }

    #[test]
    fn eval_generation_keys_parse_and_are_checked() {
        let s: SftSettings = toml::from_str(
            "[eval]\nnum_beams = 4\nlength_penalty = 0.6\nearly_stopping = \"never\"\nno_repeat_ngram_size = 3\n\
             repetition_penalty = 1.2\nmin_new_tokens = 5\n",
        )
        .unwrap();
        let g = s.eval.generation();
        assert_eq!((g.num_beams, g.length_penalty, g.early_stopping), (4, 0.6, EarlyStopping::Never));
        assert_eq!((g.no_repeat_ngram_size, g.repetition_penalty, g.min_new_tokens), (3, 1.2, 5));
        assert!(!g.sample);
        s.validate().unwrap();
        let t: SftSettings = toml::from_str("[eval]\nearly_stopping = true\n").unwrap();
        assert_eq!(t.eval.early_stopping, EarlyStopping::True);
        let e = toml::from_str::<SftSettings>("[eval]\nearly_stopping = \"sometimes\"\n").unwrap_err().to_string();
        assert!(e.contains("early_stopping") && e.contains("sometimes"), "{e}");
        let bad =
            SftSettings { eval: EvalSettings { num_beams: 0, ..EvalSettings::default() }, ..SftSettings::default() };
        let e = format!("{:#}", bad.validate().unwrap_err());
        assert!(e.contains("[eval]") && e.contains("num_beams"), "{e}");
        let back: SftSettings = toml::from_str(&s.to_toml().unwrap()).unwrap();
        assert_eq!(back, s, "the keys round-trip, early_stopping = \"never\" too");
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let o = OptimSettings { learning_rate: 1.0, warmup_steps: 10, ..OptimSettings::default() };
        assert_eq!(o.lr_at(5, 110), 0.5);
        assert_eq!(o.lr_at(10, 110), 1.0);
        assert!((o.lr_at(60, 110) - 0.5).abs() < 1e-12);
        assert_eq!(o.lr_at(110, 110), 0.0);
        let c = OptimSettings { schedule: Schedule::Cosine, ..o.clone() };
        assert!((c.lr_at(60, 110) - 0.5).abs() < 1e-12);
        let k = OptimSettings { schedule: Schedule::Constant, ..o };
        assert_eq!(k.lr_at(100, 110), 1.0);
    }
}
