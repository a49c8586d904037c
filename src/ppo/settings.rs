//! `detox train`'s configuration file: every setting of a run, in TOML, whose defaults are the seed's
//! (LoRA r 32 / alpha 32 / dropout 0.05 on q and v; 50 PPO steps over 500 SAMSum training dialogues;
//! TRL 0.4.7's values otherwise).

use super::PpoConfig;
use crate::device::Device;
use crate::t5::{LoraSettings, Targets};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    pub model: ModelSettings,
    pub lora: LoraToml,
    pub data: DataSettings,
    pub generation: GenerationSettings,
    pub reward: RewardSettings,
    pub ppo: PpoConfig,
    pub run: RunSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A T5 checkpoint in Hugging Face layout (`detox init` makes random ones).
    pub path: PathBuf,
    /// A tokenizer.json to use instead of the model directory's.
    pub tokenizer: Option<PathBuf>,
    /// Start from this PEFT adapter instead of a fresh one.
    pub adapter: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraToml {
    pub r: usize,
    pub alpha: f32,
    /// Dropout on the LoRA branch's input in training passes (the seed's PEFT config: 0.05).
    pub dropout: f32,
    /// Module names (PEFT's suffix match): q, k, v, o, wi_0, wi_1, wo.
    pub target_modules: Vec<String>,
    /// TRL's value head dropout, in training passes (TRL: 0.1).
    pub value_dropout: f32,
    /// Seeds the fresh adapter's A and the value head.
    pub init_seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    /// JSON Lines with a dialogue per row.
    pub path: PathBuf,
    pub field: String,
    /// Use the first this many non-empty dialogues.
    pub limit: usize,
    pub prompt: String,
    pub max_source_len: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    /// The seed's `min_length: 5` counts the decoder start token: 4 generated tokens.
    pub min_new_tokens: usize,
    pub temperature: f32,
    /// 0 keeps every token (the seed: top_k 0.0, top_p 1.0, do_sample).
    pub top_k: usize,
    pub top_p: f32,
}

impl GenerationSettings {
    /// The rollout's sampling with these settings, drawn from `seed`.
    pub fn sampling(&self, seed: u64) -> crate::t5::GenConfig {
        crate::t5::GenConfig {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            sample: true,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed,
            ..crate::t5::GenConfig::default()
        }
    }
}

/// How the classifier's score becomes the PPO reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardTransform {
    /// −logit(p): the logit of "not toxic", as the seed's reward was the classifier's raw logit of
    /// its "nothate" class (`function_to_apply: "none"`).
    NegLogit,
    /// 1 − p.
    OneMinusProb,
    /// −p.
    NegProb,
}

impl RewardTransform {
    /// The reward of a text whose label has logit `z`.
    pub fn apply(self, z: f32) -> f32 {
        let p = crate::classifier::sigmoid(z);
        match self {
            RewardTransform::NegLogit => -z,
            RewardTransform::OneMinusProb => 1.0 - p,
            RewardTransform::NegProb => -p,
        }
    }
}

/// Where rewards come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// The classifier's score of the decoded summary, through `transform`.
    Classifier,
    /// A toy reward for smoke tests and demos, no classifier needed: the share of a response's
    /// tokens whose id is below `token_below`.
    TokenShare,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSettings {
    pub kind: RewardKind,
    /// See `RewardKind::TokenShare`.
    pub token_below: u32,
    /// A toxicity classifier in Hugging Face layout (BERT or RoBERTa sequence classification).
    pub classifier: PathBuf,
    /// The label whose score is the reward's input.
    pub label: String,
    pub transform: RewardTransform,
    /// Responses per classifier batch, longest first. A rollout of up to this many is scored in
    /// one batch: each batch costs a launch sequence and a wait for its logits.
    pub batch_size: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    /// PPO steps (one batch of `ppo.batch_size` rollouts each).
    pub steps: usize,
    /// Seeds data order, sampling and dropout.
    pub seed: u64,
    /// auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
    pub device: String,
    /// Checkpoints and the log go here.
    pub out: PathBuf,
    /// Write a checkpoint every this many steps (and always at the end or on Ctrl-C).
    pub checkpoint_every: usize,
    /// Loss scale for the GPU's half-precision gradient products; 0 picks one per device
    /// (1 on the CPU, 1024 on CUDA).
    pub loss_scale: f32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self { path: PathBuf::from("models/flan-t5-small"), tokenizer: None, adapter: None }
    }
}

impl Default for LoraToml {
    fn default() -> Self {
        let s = LoraSettings::seed_default();
        let Targets::Names(names) = s.targets else { unreachable!("the seed names its modules") };
        Self { r: s.r, alpha: s.alpha, dropout: s.dropout, target_modules: names, value_dropout: 0.1, init_seed: 0 }
    }
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("../shared/data/samsum/train.jsonl"),
            field: "dialogue".into(),
            limit: 500,
            prompt: crate::text::DEFAULT_TEMPLATE.into(),
            max_source_len: crate::text::DEFAULT_MAX_SOURCE_LEN,
        }
    }
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self { max_new_tokens: 128, min_new_tokens: 4, temperature: 1.0, top_k: 0, top_p: 1.0 }
    }
}

impl Default for RewardSettings {
    fn default() -> Self {
        Self {
            kind: RewardKind::Classifier,
            token_below: 16064,
            classifier: PathBuf::from("../shared/models/minilm-toxicity"),
            label: "toxicity".into(),
            transform: RewardTransform::NegLogit,
            batch_size: 256,
        }
    }
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            steps: 50,
            seed: 0,
            device: "auto".into(),
            out: PathBuf::from("runs/detox"),
            checkpoint_every: 10,
            loss_scale: 0.0,
        }
    }
}

impl TrainSettings {
    pub fn load(path: &Path) -> Result<Self> {
        let s: Self = crate::fsutil::read_toml(path, "detox train config")?;
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
        self.ppo.validate().context("[ppo]")?;
        self.lora_settings().validate().context("[lora]")?;
        ensure!((0.0..1.0).contains(&self.lora.value_dropout), "[lora] value_dropout must be in [0, 1)");
        ensure!(self.data.limit > 0, "[data] limit must be at least 1");
        ensure!(self.data.prompt.contains("{dialogue}"), "[data] prompt has no {{dialogue}} placeholder");
        ensure!(self.generation.max_new_tokens > 0, "[generation] max_new_tokens must be at least 1");
        ensure!(
            self.generation.min_new_tokens <= self.generation.max_new_tokens,
            "[generation] min_new_tokens exceeds max_new_tokens"
        );
        if self.ppo.first_token == super::FirstToken::Drop && self.generation.min_new_tokens < 2 {
            bail!("[generation] min_new_tokens must be at least 2 when [ppo] first_token = \"drop\"");
        }
        ensure!(self.run.steps > 0, "[run] steps must be at least 1");
        ensure!(self.run.checkpoint_every > 0, "[run] checkpoint_every must be at least 1");
        ensure!(self.run.loss_scale >= 0.0 && self.run.loss_scale.is_finite(), "[run] loss_scale must be ≥ 0");
        ensure!(self.reward.batch_size > 0, "[reward] batch_size must be at least 1");
        self.device()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds_setting_and_round_trip() {
        let s = TrainSettings::default();
        assert_eq!((s.lora.r, s.lora.alpha, s.lora.dropout), (32, 32.0, 0.05));
        assert_eq!(s.lora.target_modules, vec!["q".to_string(), "v".to_string()]);
        assert_eq!((s.run.steps, s.data.limit, s.ppo.batch_size), (50, 500, 16));
        assert_eq!(s.ppo.learning_rate, 1.41e-5);
        let back: TrainSettings = toml::from_str(&s.to_toml().unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn partial_files_take_defaults_and_bad_fields_are_named() {
        let s: TrainSettings =
            toml::from_str("[run]\nsteps = 3\n[ppo]\nbatch_size = 8\nmini_batch_size = 2\n").unwrap();
        assert_eq!((s.run.steps, s.ppo.batch_size, s.lora.r), (3, 8, 32));
        let e = toml::from_str::<TrainSettings>("[run]\nstepz = 3\n").unwrap_err().to_string();
        assert!(e.contains("stepz"), "{e}");
        let mut bad = TrainSettings::default();
        bad.generation.min_new_tokens = 500;
        assert!(bad.validate().unwrap_err().to_string().contains("min_new_tokens"));
    }

    #[test]
    fn reward_transforms() {
        let z = 2.0f32;
        assert_eq!(RewardTransform::NegLogit.apply(z), -2.0);
        assert!((RewardTransform::NegProb.apply(z) + 0.880_797).abs() < 1e-5);
        assert!((RewardTransform::OneMinusProb.apply(z) - 0.119_203).abs() < 1e-5);
    }
}
